"""Generate images with fixed seeds and score them: FID, CLIP score, attribute accuracy, LPIPS,
PSNR and SSIM.

Generation and scoring are separate so a benchmark generates the reference images once and
scores many variants against them::

    reference = generate_images(full_pipe, prompts)
    scorer = Scorer(fid_features="clip")
    for name, pipe in variants.items():
        result = scorer.score(generate_images(pipe, prompts), prompts, reference_images=reference)

``evaluate(pipe, prompts, reference=...)`` does both in one call.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm

from dq.safeload import load_weights

from .attributes import attribute_accuracy
from .clip import ClipModel, check_clip_folder, clip_score, load_clip
from .errors import EvalError, MissingWeightsError
from .fid import FID_FEATURES, FidScorer, load_image_folder
from .lpips import LpipsScorer
from .metrics import ImageBatch, psnr, ssim, to_pil

logger = logging.getLogger(__name__)

METRICS = ("fid", "clip", "attr", "lpips", "psnr", "ssim")
_REFERENCE_METRICS = ("lpips", "psnr", "ssim")
_LABELS = {
    "fid": ("FID", "lower"),
    "clip": ("CLIP score", "higher"),
    "attr": ("attribute accuracy", "higher"),
    "lpips": ("LPIPS vs reference", "lower"),
    "psnr": ("PSNR vs reference (dB)", "higher"),
    "ssim": ("SSIM vs reference", "higher"),
}


def parse_metrics(spec: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """``"fid,clip"`` or a list of names -> validated tuple; ``None`` means automatic."""
    if spec is None:
        return None
    names = [n.strip().lower() for n in (spec.split(",") if isinstance(spec, str) else spec)]
    names = [n for n in names if n]
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise EvalError(f"unknown metric(s) {', '.join(unknown)}; choose from {', '.join(METRICS)}")
    if not names:
        raise EvalError(f"no metric named; choose from {', '.join(METRICS)}")
    return tuple(dict.fromkeys(names))


@dataclass
class EvalResult:
    """Scores of one image set. ``metrics`` maps every requested metric to a value, or to None
    when it could not be computed (``notes`` says why)."""

    metrics: dict[str, float | None]
    num_images: int
    attribute_slots: dict[str, float] | None = None
    per_image: dict[str, list[float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    images: list[Image.Image] = field(default_factory=list, repr=False)
    reference_images: list[Image.Image] | None = field(default=None, repr=False)
    attribute_slots_hits: dict[str, list[bool]] = field(default_factory=dict, repr=False)  # to merge processes
    attr_skipped: int = 0

    def to_dict(self, *, per_image: bool = False) -> dict[str, Any]:
        """JSON-able summary (non-finite values become null; images are left out)."""
        out: dict[str, Any] = {
            "metrics": {k: _finite(v) for k, v in self.metrics.items()},
            "attribute_slots": self.attribute_slots,
            "num_images": self.num_images,
            "notes": list(self.notes),
            "settings": dict(self.settings),
        }
        if per_image:
            out["per_image"] = {k: [_finite(v) for v in vs] for k, vs in self.per_image.items()}
        return out

    def to_table(self) -> str:
        """A markdown table of the metrics, then the notes."""
        rows = ["| metric | value | better |", "|---|---|---|"]
        for name, value in self.metrics.items():
            label, better = _LABELS[name]
            rows.append(f"| {label} | {_format(name, value)} | {better} |")
            if name == "attr" and self.attribute_slots:
                rows.extend(
                    f"| &nbsp;&nbsp;{slot} | {acc:.1%} | higher |"
                    for slot, acc in self.attribute_slots.items()
                )
        lines = [f"{self.num_images} images", "", *rows]
        if self.notes:
            lines += ["", *(f"- {note}" for note in self.notes)]
        return "\n".join(lines)


def check_weight_files(
    inception_weights: str | Path | None = None,
    lpips_weights: str | Path | None = None,
    clip_model: str | None = None,
    clip_pretrained: str | None = None,
) -> None:
    """Refuse, before any image is generated, a named weight file that holds more than tensors
    (``dq.safeload.UnsafeWeightsError``). Missing files are left to the metrics' own errors."""
    for path, option in (
        (inception_weights, "--inception-weights"),
        (lpips_weights, "--lpips-weights"),
        (clip_pretrained, "--clip-pretrained"),
    ):
        if path is not None and Path(path).is_file():
            load_weights(path, option)
    if clip_model is not None and clip_model.startswith("local-dir:"):
        check_clip_folder(clip_model.removeprefix("local-dir:"))


class Scorer:
    """Scores image sets; loads each network (CLIP, LPIPS, FID features) once and keeps it.

    ``metrics=None`` picks every metric the inputs allow and quietly leaves out (with a note)
    those whose weights are unavailable; metrics named explicitly must all be computed, or
    the call raises.
    """

    def __init__(
        self,
        metrics: str | Sequence[str] | None = None,
        *,
        fid_features: str = "inception",
        inception_weights: str | Path | None = None,
        lpips_net: str = "alex",
        lpips_weights: str | Path | None = None,
        clip_model: str | None = None,
        clip_pretrained: str | None = None,
        device: str = "cpu",
    ) -> None:
        if fid_features not in FID_FEATURES:
            raise EvalError(
                f"unknown FID feature network {fid_features!r}; choose one of {FID_FEATURES}"
            )
        self.metrics = parse_metrics(metrics)
        check_weight_files(inception_weights, lpips_weights, clip_model, clip_pretrained)
        self.fid_features = fid_features
        self.inception_weights = inception_weights
        self.lpips_net, self.lpips_weights = lpips_net, lpips_weights
        self.clip_model, self.clip_pretrained = clip_model, clip_pretrained
        self.device = device
        self._clip: ClipModel | None = None
        self._evaluator: ClipModel | None = None
        self._lpips: LpipsScorer | None = None
        self._fid: tuple[object, FidScorer] | None = None

    def score(
        self,
        images: ImageBatch,
        prompts: Sequence[str],
        *,
        reference_images: ImageBatch | None = None,
        real_images: ImageBatch | None = None,
    ) -> EvalResult:
        """Score ``images`` (one per prompt). Reference images (same prompts and seeds, from the
        full-precision pipeline) enable LPIPS/PSNR/SSIM and FID; ``real_images`` (any number)
        are the FID target instead when given."""
        images = to_pil(images)
        if len(images) != len(prompts):
            raise EvalError(
                f"got {len(images)} images for {len(prompts)} prompts; pass one prompt per image"
            )
        reference = to_pil(reference_images) if reference_images is not None else None
        if reference is not None and len(reference) != len(images):
            raise EvalError(
                f"got {len(reference)} reference images for {len(images)} images; generate the reference with the same prompts and seeds"
            )
        explicit = self.metrics is not None
        wanted = self.metrics if explicit else METRICS
        result = EvalResult(
            metrics={}, num_images=len(images), images=images, reference_images=reference
        )
        result.settings = {
            "fid_features": self.fid_features,
            "clip_model": self.clip_model or "dq-evaluator-clip",
        }
        fid_target = real_images if real_images is not None else reference_images
        for name in wanted:
            missing = self._missing_input(name, reference, fid_target)
            if missing:
                if explicit:
                    raise EvalError(f"metric {name!r} {missing}")
                result.notes.append(f"{name} not computed: it {missing}")
                continue
            try:
                self._compute(
                    name, images, prompts, reference, fid_target, result, fid_source=real_images
                )
            except MissingWeightsError as exc:
                if explicit:
                    raise
                result.metrics[name] = None
                result.notes.append(f"{name} skipped: {exc}")
                logger.warning("%s skipped: %s", name, exc)
        return result

    # -- one metric ---------------------------------------------------------------------------

    @staticmethod
    def _missing_input(name: str, reference, fid_target) -> str | None:
        if name in _REFERENCE_METRICS and reference is None:
            return "needs reference images (--reference MODEL: the full-precision pipeline)"
        if name == "fid" and fid_target is None:
            return "needs reference images (--reference MODEL) or a folder of real images (--real-images DIR)"
        return None

    def _compute(
        self, name, images, prompts, reference, fid_target, result: EvalResult, *, fid_source
    ) -> None:
        if name == "psnr":
            values = psnr(images, reference, reduction="none")
            if torch.isinf(values).any():
                result.notes.append(
                    f"psnr: {int(torch.isinf(values).sum())} image(s) identical to the reference (infinite PSNR)"
                )
            self._store(result, name, values)
        elif name == "ssim":
            self._store(result, name, ssim(images, reference, reduction="none"))
        elif name == "lpips":
            if self._lpips is None:
                self._lpips = LpipsScorer(self.lpips_net, self.lpips_weights)
            self._store(result, name, self._lpips(images, reference, reduction="none"))
            result.settings["lpips_net"] = self.lpips_net
        elif name == "clip":
            self._store(
                result, name, clip_score(images, prompts, self._clip_for_score(), reduction="none")
            )
        elif name == "attr":
            scored = attribute_accuracy(images, prompts, self._evaluator_clip())
            if scored is None:
                result.metrics[name] = None
                result.notes.append(
                    "attr: no prompt is in the default pipeline's grammar; attribute accuracy needs its captions"
                )
                return
            result.metrics[name] = scored.accuracy
            result.attribute_slots = scored.per_slot
            result.attribute_slots_hits = scored.slot_hits
            result.attr_skipped = scored.num_skipped
            result.per_image[name] = [float(c) for c in scored.correct]
            if scored.num_skipped:
                result.notes.append(
                    f"attr: {scored.num_skipped} prompt(s) outside the grammar were not scored"
                )
        elif name == "fid":
            fid_scorer = self._fid_scorer(fid_target, size=(images[0].height, images[0].width))
            result.metrics[name] = fid_scorer(images)
            target = "real images" if fid_source is not None else "reference images"
            result.notes.append(
                f"fid: {self.fid_features} features, {fid_scorer.num_fake} generated vs {fid_scorer.num_real} {target}"
                + (
                    "; few images bias FID upwards, compare only equal-sized runs"
                    if fid_scorer.num_fake < 1000
                    else ""
                )
            )

    @staticmethod
    def _store(result: EvalResult, name: str, values: torch.Tensor) -> None:
        result.per_image[name] = [float(v) for v in values]
        result.metrics[name] = float(values.mean())

    def _clip_for_score(self) -> ClipModel:
        if self.clip_model is None:
            return self._evaluator_clip()
        if self._clip is None:
            self._clip = load_clip(self.clip_model, self.clip_pretrained, device=self.device)
        return self._clip

    def _evaluator_clip(self) -> ClipModel:
        # Attribute accuracy always uses dq's evaluator: it is trained on the grammar's captions.
        if self._evaluator is None:
            self._evaluator = load_clip(None, device=self.device)
        return self._evaluator

    def _fid_scorer(self, target: ImageBatch | str | Path, *, size: tuple[int, int]) -> FidScorer:
        if self._fid is not None and self._fid[0] is target:
            return self._fid[1]
        if isinstance(target, (str, Path)):
            from dq.calibrate import distributed

            real = load_image_folder(target, size=size, shard=distributed.active())
        else:
            real = target
        clip = self._clip_for_score() if self.fid_features == "clip" else None
        scorer = FidScorer(
            real, features=self.fid_features, inception_weights=self.inception_weights, clip=clip
        )
        self._fid = (target, scorer)
        return scorer


def generate_images(
    pipe,
    prompts: Sequence[str],
    seeds: Sequence[int] | None = None,
    *,
    seed: int = 0,
    batch_size: int = 4,
    num_inference_steps: int | None = None,
    progress: bool = True,
    **call_kwargs: Any,
) -> list[Image.Image]:
    """One image per prompt, image ``i`` from its own CPU generator seeded ``seeds[i]``
    (default ``seed + i``), so the batch size never changes which image a prompt gets."""
    prompts = list(prompts)
    if not prompts:
        raise EvalError("no prompts to generate images for; pass at least one prompt")
    seeds = list(seeds) if seeds is not None else [seed + i for i in range(len(prompts))]
    if len(seeds) != len(prompts):
        raise EvalError(
            f"got {len(seeds)} seeds for {len(prompts)} prompts; pass one seed per prompt"
        )
    if batch_size < 1:
        raise EvalError(f"batch_size must be at least 1, got {batch_size}")
    if num_inference_steps is not None:
        call_kwargs["num_inference_steps"] = num_inference_steps
    call_kwargs["output_type"] = "pil"
    bar_config = dict(getattr(pipe, "_progress_bar_config", {}))
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)  # one bar for the whole run, below
    images: list[Image.Image] = []
    try:
        with tqdm(total=len(prompts), desc="generating", unit="img", disable=not progress) as bar:
            for start in range(0, len(prompts), batch_size):
                batch = prompts[start : start + batch_size]
                generators = [
                    torch.Generator("cpu").manual_seed(int(s))
                    for s in seeds[start : start + batch_size]
                ]
                with torch.inference_mode():
                    out = pipe(prompt=batch, generator=generators, **call_kwargs)
                images.extend(out.images)
                bar.update(len(batch))
    finally:
        if hasattr(pipe, "set_progress_bar_config"):
            pipe._progress_bar_config = bar_config
    return images


def evaluate(
    pipe,
    prompts: Sequence[str],
    *,
    reference=None,
    real_images: ImageBatch | str | Path | None = None,
    metrics: str | Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    seed: int = 0,
    batch_size: int = 4,
    num_inference_steps: int | None = None,
    scorer: Scorer | None = None,
    call_kwargs: dict[str, Any] | None = None,
    **scorer_options: Any,
) -> EvalResult:
    """Generate one image per prompt with ``pipe`` and score it.

    ``reference`` is the full-precision pipeline (its images, made with the same seeds, are
    the target of LPIPS/PSNR/SSIM and FID) or its already generated images. ``real_images``
    (a folder or images) replaces the reference as FID's target. ``scorer_options`` go to
    ``Scorer`` (``fid_features``, ``inception_weights``, ``lpips_weights``, ``clip_model``...).
    """
    if scorer is not None and scorer_options:
        raise EvalError(
            f"pass either a scorer or scorer options, not both (got {sorted(scorer_options)})"
        )
    scorer = scorer or Scorer(metrics, **scorer_options)
    prompts = list(prompts)
    seeds = list(seeds) if seeds is not None else [seed + i for i in range(len(prompts))]
    generate = {
        "batch_size": batch_size,
        "num_inference_steps": num_inference_steps,
        **(call_kwargs or {}),
    }
    from dq.calibrate import distributed

    if distributed.active():  # several processes: each makes and scores its share (see below)
        part = distributed.shard(len(prompts))
        mine = [prompts[i] for i in part]
        if reference is not None and _is_images(reference):
            reference = [reference[i] for i in part]
        if real_images is not None and not isinstance(real_images, (str, Path)):
            real_images = [real_images[i] for i in distributed.shard(len(real_images))]
        generate["progress"] = distributed.is_main()
        result = _generate_and_score(pipe, mine, [seeds[i] for i in part], reference, real_images, scorer, generate)
        result = merge_results(result, len(prompts))
    else:
        result = _generate_and_score(pipe, prompts, seeds, reference, real_images, scorer, generate)
    result.settings.update(
        num_prompts=len(prompts),
        seeds=[seeds[0], seeds[-1]],
        batch_size=batch_size,
        num_inference_steps=num_inference_steps,
    )
    return result


def _generate_and_score(pipe, prompts, seeds, reference, real_images, scorer: Scorer, generate) -> EvalResult:
    images = generate_images(pipe, prompts, seeds, **generate)
    reference_images = reference
    if reference is not None and not _is_images(reference):
        reference_images = generate_images(reference, prompts, seeds, **generate)
    return scorer.score(images, prompts, reference_images=reference_images, real_images=real_images)


_PER_IMAGE_MEANS = ("psnr", "ssim", "lpips", "clip")


def merge_results(local: EvalResult, num_images: int) -> EvalResult:
    """The result of all processes from each one's result on its contiguous share of the prompts
    (in rank order): per-image values are gathered and averaged again, attribute accuracy is
    recounted from every image's slot hits; FID is already global (torchmetrics reduced its
    feature sums across the processes in `FidScorer`). ``images`` stay this process's share."""
    from dq.calibrate import distributed

    shared = {
        "per_image": local.per_image,
        "attr": None if local.metrics.get("attr") is None or "attr" not in local.per_image else (
            local.per_image["attr"], local.attribute_slots_hits),
        "skipped": local.attr_skipped,
    }
    everyone = distributed.gather_objects(shared, "gathering the evaluation scores")
    merged = EvalResult(metrics=dict(local.metrics), num_images=num_images, settings=dict(local.settings),
                        images=local.images, reference_images=local.reference_images)
    for name in local.per_image:
        merged.per_image[name] = [v for theirs in everyone for v in theirs["per_image"].get(name, [])]
    for name in _PER_IMAGE_MEANS:
        if name in merged.per_image and merged.metrics.get(name) is not None:
            merged.metrics[name] = float(torch.tensor(merged.per_image[name], dtype=torch.float64).mean())
    notes = [n for n in local.notes if not n.startswith(("psnr:", "attr:"))]
    if "psnr" in merged.per_image:
        identical = sum(math.isinf(v) for v in merged.per_image["psnr"])
        if identical:
            notes.append(f"psnr: {identical} image(s) identical to the reference (infinite PSNR)")
    attr = [theirs["attr"] for theirs in everyone if theirs["attr"] is not None]
    if "attr" in merged.metrics:
        if attr:
            correct = [c for part, _ in attr for c in part]
            hits: dict[str, list[bool]] = {}
            for _, slots in attr:
                for slot, values in slots.items():
                    hits.setdefault(slot, []).extend(values)
            merged.metrics["attr"] = float(sum(correct) / len(correct))
            merged.per_image["attr"] = correct
            merged.attribute_slots = {slot: sum(v) / len(v) for slot, v in hits.items()}
            skipped = sum(theirs["skipped"] for theirs in everyone)
            if skipped:
                notes.append(f"attr: {skipped} prompt(s) outside the grammar were not scored")
        else:
            merged.metrics["attr"] = None
            notes += [n for n in local.notes if n.startswith("attr:")]
    merged.notes = notes
    merged.settings["processes"] = distributed.world_size()
    return merged


def _is_images(value: object) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    return isinstance(value, (list, tuple)) and (
        len(value) == 0 or isinstance(value[0], (Image.Image, torch.Tensor))
    )


def _finite(value: float | None) -> float | None:
    return value if value is None or math.isfinite(value) else None


_FORMATS = {"attr": "{:.1%}", "lpips": "{:.4f}", "ssim": "{:.4f}", "fid": "{:.3f}"}


def _format(name: str, value: float | None) -> str:
    if value is None:
        return "n/a"
    return _FORMATS.get(name, "{:.2f}").format(value)
