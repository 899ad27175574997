"""Full precision and dq-quantized side by side, in a Gradio app.

    python app.py                                   # embedded default pipeline, w8a8, on 127.0.0.1
    python app.py --recipe w4a8                     # another preset (or a recipe .yaml/.json)
    python app.py --quantized out/w8a8              # a folder written by `dq quantize --out`
    python app.py PixArt-alpha/PixArt-XL-2-512x512 --recipe w8a8 --device cuda

The page draws a prompt over several seeds with both pipelines: a slider to drag between the
full-precision and the quantized image, a grid over the seeds, a metrics panel (PSNR, SSIM,
LPIPS where its weights are on this machine, CLIP score, latency and denoiser memory of each
side) and per-layer bits and error of the recipe. The model, the recipe and a saved dq folder
can be changed in the page: quantized models are cached (least recently used first out, under
``--cache-mb``), each behind its own lock. Offline: Gradio's analytics are off and the theme
uses system fonts. ``pip install "dq[app]"`` installs Gradio.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # read when gradio is imported

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections import OrderedDict  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

import dq  # noqa: E402
from dq.cli import check_model, recipe_with_overrides  # noqa: E402
from dq.engine import find_denoiser  # noqa: E402
from dq.errors import DQError  # noqa: E402
from dq.eval.metrics import psnr, ssim  # noqa: E402
from dq.io import is_dq_folder  # noqa: E402
from dq.kernels.dispatch import runtime_nbytes  # noqa: E402
from dq.nn.layers import QuantModule  # noqa: E402
from dq.provenance import made_from  # noqa: E402
from dq.quant.packing import weight_nbytes  # noqa: E402

logger = logging.getLogger("dq.app")

EXAMPLES = [
    "a red circle above a blue square",
    "a green triangle to the left of a yellow circle",
    "a purple square",
]
EMBEDDED_DEFAULT = "the embedded default"
# Mixed precision (dq.mixed; the recipe field `budget`, the average weight bits): the page shows a
# bit-budget slider when dq.Recipe has that field (always, since mixed precision landed).
HAS_BUDGET = "budget" in {f.name for f in dataclasses.fields(dq.Recipe)}
ERROR_MEASURE = (
    "per-layer error: SQNR (dB, higher is better) of each quantized layer's output against the "
    "full-precision layer fed the same input, measured with forward hooks over one run of the "
    "quantized pipeline"
)
CLIP_NOTE = (
    "CLIP score (0-100, higher is better) is dq's offline evaluator CLIP, trained on the embedded "
    "default's procedural scenes (shapes, colours, positions): it ranks images of those scenes; for "
    "other models and prompts it says little, and it is never comparable with published CLIP scores "
    "(OpenAI/LAION CLIP). Compare the two sides with each other only."
)


# -- one pipeline, behind its lock ---------------------------------------------------------------
@dataclass
class Side:
    """One of the two pipelines the app compares. A pipeline's scheduler and dq's timestep router
    are mutable: every call goes through ``draw``, which holds ``lock``."""

    name: str
    pipe: object
    weight_bytes: int
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    layer_report: LayerReport | None = field(default=None, repr=False, compare=False)

    @property
    def denoiser(self) -> nn.Module:
        return find_denoiser(self.pipe)[1]

    def draw(self, prompt: str, seed: int, **kwargs: Any) -> tuple[object, float]:
        """(PIL image, seconds) of one prompt from one seed."""
        with self.lock:
            return self.draw_locked(prompt, seed, **kwargs)

    def draw_locked(self, prompt: str, seed: int, **kwargs: Any) -> tuple[object, float]:
        """``draw`` for a caller that already holds ``lock``."""
        generator = torch.Generator("cpu").manual_seed(int(seed))
        with torch.inference_mode():
            start = time.perf_counter()
            image = self.pipe(prompt, generator=generator, **kwargs).images[0]
            return image, time.perf_counter() - start

    def memory_bytes(self) -> tuple[int, int]:
        """(stored weight bytes, runtime kernel copies) of the denoiser."""
        return self.weight_bytes, runtime_nbytes(self.denoiser)

    def nbytes(self) -> int:
        """Bytes of every component's parameters and buffers, plus runtime kernel copies (what
        the cache counts against its cap)."""
        parts = getattr(self.pipe, "components", {}) or {"denoiser": self.denoiser}
        modules = [m for m in parts.values() if isinstance(m, nn.Module)]
        return sum(weight_nbytes(m) + runtime_nbytes(m) for m in modules)


@dataclass
class Comparison:
    full: object  # PIL image
    quantized: object
    report: str  # markdown
    seconds: tuple[float, float]
    psnr_db: float
    ssim: float


class SideBySide:
    """The full-precision pipeline and its quantized copy, and the comparison of one prompt."""

    def __init__(self, full: Side, quantized: Side, *, default_steps: int | None = None):
        self.full, self.quantized = full, quantized
        self.default_steps = default_steps

    def call_kwargs(self, steps: int | None, guidance_scale: float | None) -> dict[str, Any]:
        steps = int(steps) if steps else self.default_steps
        if steps is not None and steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        kwargs: dict[str, Any] = {"num_inference_steps": steps} if steps else {}
        if guidance_scale is not None:
            kwargs["guidance_scale"] = float(guidance_scale)
        return kwargs

    def compare(
        self,
        prompt: str,
        seed: int = 0,
        steps: int | None = None,
        guidance_scale: float | None = None,
    ) -> Comparison:
        prompt = check_prompt(prompt)
        kwargs = self.call_kwargs(steps, guidance_scale)
        (full, t_full), (quantized, t_quant) = (
            side.draw(prompt, seed, **kwargs) for side in (self.full, self.quantized)
        )
        db = float(psnr([quantized], [full]))
        similarity = float(ssim([quantized], [full]))
        ratio = self.quantized.weight_bytes / max(1, self.full.weight_bytes)
        report = "\n".join(
            [
                "| | time | denoiser weights |",
                "|---|---|---|",
                f"| {self.full.name} | {t_full:.2f} s | {_mib(self.full.weight_bytes)} |",
                f"| {self.quantized.name} | {t_quant:.2f} s | "
                f"{_mib(self.quantized.weight_bytes)} ({ratio:.2f}x) |",
                "",
                f"Quantized against full precision, same seed: PSNR **{db:.2f} dB**, SSIM **{similarity:.4f}**.",
            ]
        )
        return Comparison(full, quantized, report, (t_full, t_quant), db, similarity)


def check_prompt(prompt: str | None) -> str:
    prompt = (prompt or "").strip()
    if not prompt:
        raise ValueError(
            "the prompt is empty; type what to draw, e.g. 'a red circle above a blue square'"
        )
    return prompt


def size_kwargs(pipe, size: int | None) -> dict[str, Any]:
    """Call arguments for square ``size``-pixel images (None: the pipeline's default size);
    PixArt's resolution binning, which would snap the size to its trained bins, is turned off."""
    if not size:
        return {}
    kwargs: dict[str, Any] = {"height": int(size), "width": int(size)}
    if "use_resolution_binning" in inspect.signature(pipe.__call__).parameters:
        kwargs["use_resolution_binning"] = False
    return kwargs


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.2f} MiB"


# -- opening the two sides -----------------------------------------------------------------------
def open_full(model: str | None, *, device: str | None = None) -> Side:
    """The full-precision side: MODEL (hub id or diffusers folder, None for the embedded default)."""
    if model is not None:
        check_model(model)
        if is_dq_folder(model):
            raise DQError(
                f"{model} is already quantized; pass the full-precision model as MODEL and the dq "
                f"folder as --quantized {model}"
            )
    pipe = dq.open_pipeline(model, device=device)
    _quiet(pipe)
    return Side("full precision", pipe, weight_nbytes(find_denoiser(pipe)[1]))


def quantize_side(
    model: str | None,
    recipe: dq.Recipe,
    *,
    steps: int | None = None,
    device: str | None = None,
    size: int | None = None,
) -> Side:
    """A second copy of MODEL quantized with ``recipe`` (calibrated with ``steps`` sampler steps
    on ``size``-pixel images)."""
    if model is not None:
        check_model(model)
    pipe = dq.open_pipeline(model, device=device)
    dq.quantize(pipe, recipe, num_inference_steps=steps, **size_kwargs(pipe, size))
    _quiet(pipe)
    return Side(f"dq {recipe.name}", pipe, weight_nbytes(find_denoiser(pipe)[1]))


def check_folder(folder: str) -> None:
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise DQError(
            f"quantized folder {folder}: no such folder; give a folder written by `dq quantize --out` / "
            "dq.save, or leave it empty to quantize with the recipe"
        )
    if not is_dq_folder(path):
        raise DQError(
            f"quantized folder {folder}: not a folder written by `dq quantize --out` / dq.save (no dq "
            "quantization_config in it); leave it empty to quantize with the recipe"
        )


def load_folder_side(folder: str, full: Side, model: str | None, *, device: str | None = None) -> Side:
    """A dq folder, checked to be made from the full-precision side's weights."""
    check_folder(folder)
    pipe = dq.load(folder, device=device)
    _quiet(pipe)
    # the same weights (hash recorded at quantization; older folders: the same architecture)
    if _architecture(full.pipe) != _architecture(pipe) or made_from(find_denoiser(pipe)[1], full.denoiser) is False:
        raise DQError(
            f"--quantized {folder} was made from another model than "
            f"{model or EMBEDDED_DEFAULT}; pass the full-precision model it was quantized from as MODEL"
        )
    name = f"dq {recipe_name(pipe) or 'quantized'} ({Path(folder).name})"
    return Side(name, pipe, weight_nbytes(find_denoiser(pipe)[1]))


def load_sides(
    model: str | None,
    *,
    recipe: str = "w8a8",
    quantized: str | None = None,
    num_prompts: int | None = None,
    steps: int | None = None,
    device: str | None = None,
) -> SideBySide:
    """Open the full-precision pipeline; quantize a second copy with ``recipe`` (calibrated with
    ``num_prompts`` prompts and ``steps`` sampler steps) or load ``quantized``, a dq folder."""
    if quantized is not None:
        check_folder(quantized)
    full = open_full(model, device=device)
    if quantized is not None:
        q_side = load_folder_side(quantized, full, model, device=device)
    else:
        chosen = recipe_with_overrides(recipe, num_prompts=num_prompts)
        q_side = quantize_side(model, chosen, steps=steps, device=device)
    return SideBySide(full, q_side, default_steps=steps)


def _quiet(pipe) -> None:
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)


def _architecture(pipe) -> tuple[str, dict]:
    """The denoiser's class and config, without what quantization adds."""
    model = find_denoiser(pipe)[1]
    config = dict(getattr(model, "config", {}) or {})
    return type(model).__name__, {
        k: v for k, v in config.items() if k != "quantization_config" and not k.startswith("_")
    }


def recipe_name(pipe) -> str | None:
    """The recipe a quantized pipeline was made with (``dq.state``)."""
    st = dq.state(find_denoiser(pipe)[1])
    return st.recipe.name if st is not None and st.recipe is not None else None


# -- per-layer bits and error --------------------------------------------------------------------
@dataclass
class LayerReport:
    """Per quantized layer: its weight and activation bits, and the SQNR of its output."""

    names: list[str]
    weight_bits: list[float]
    act_bits: list[float]
    sqnr_db: list[float]
    measured_on: str

    def frames(self):
        """(bits, error) as pandas DataFrames for Gradio's plots."""
        import pandas as pd

        bits = pd.DataFrame(
            {
                "layer": list(range(len(self.names))) * 2,
                "name": self.names * 2,
                "bits": self.weight_bits + self.act_bits,
                "tensor": ["weight"] * len(self.names) + ["activation"] * len(self.names),
            }
        )
        error = pd.DataFrame(
            {"layer": list(range(len(self.names))), "name": self.names, "SQNR (dB)": self.sqnr_db}
        )
        return bits, error


def _bits(spec: dict | None, float_bits: int) -> float:
    if spec is None:
        return float(float_bits)  # kept in full precision
    kind = spec.get("kind", "int")
    return float({"fp8_e4m3": 8, "fp8_e5m2": 8, "fp4_e2m1": 4}.get(kind, spec.get("bits", float_bits)))


def measure_layers(full: Side, quantized: Side, prompt: str, seed: int, **kwargs: Any) -> LayerReport:
    """Bits of every quantized layer (from the saved plan) and its output SQNR against the
    full-precision layer on the same input (forward hooks on the quantized denoiser, running sums
    only; hooks removed whatever happens)."""
    q_model, f_model = quantized.denoiser, full.denoiser
    plan = dq.state(q_model).plan
    float_bits = torch.finfo(next(f_model.parameters()).dtype).bits
    sums: dict[str, list[float]] = {name: [0.0, 0.0] for name in plan}

    def hook_for(name: str, reference: nn.Module) -> Callable:
        def hook(module, args, output):
            expected = reference(args[0].to(next(reference.parameters()).dtype)).double()
            sums[name][0] += float(expected.pow(2).sum())
            sums[name][1] += float((output.double() - expected).pow(2).sum())

        return hook

    handles = []
    with quantized.lock:  # no other request may run through the hooks
        try:
            for name, module in q_model.named_modules():
                if isinstance(module, QuantModule) and name in plan:
                    handles.append(module.register_forward_hook(hook_for(name, f_model.get_submodule(name))))
            quantized.draw_locked(prompt, seed, **kwargs)
        finally:
            for handle in handles:
                handle.remove()
    names = list(plan)
    # identical outputs: +99 dB; an all-zero reference: -99 dB (the plot needs finite numbers)
    sqnr = [99.0 if n == 0 else -99.0 if s == 0 else max(-99.0, min(99.0, 10 * math.log10(s / n)))
            for s, n in (sums[name] for name in names)]
    steps = kwargs.get("num_inference_steps", "default")
    return LayerReport(
        names,
        [_bits(plan[n]["weight"], float_bits) for n in names],
        [_bits(plan[n]["activation"], float_bits) for n in names],
        sqnr,
        f"'{prompt}', seed {seed}, {steps} steps",
    )


# -- the model cache -----------------------------------------------------------------------------
class ModelCache:
    """Pipelines keyed by (model, recipe), least recently used first out once their bytes pass
    ``cap_bytes`` (the entry just used stays, even alone over the cap). Builds run one at a time,
    so two requests for a new recipe calibrate it once."""

    def __init__(self, cap_bytes: int):
        self.cap_bytes = int(cap_bytes)
        self._entries: OrderedDict[tuple, Side] = OrderedDict()
        self._lock = threading.Lock()
        self._build_lock = threading.Lock()

    def keys(self) -> list[tuple]:
        with self._lock:
            return list(self._entries)

    def get(self, key: tuple, build: Callable[[], Side]) -> tuple[Side, bool]:
        """(the cached side for ``key``, whether it was built now)."""
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key], False
        with self._build_lock:
            with self._lock:
                if key in self._entries:  # built by the request we waited for
                    self._entries.move_to_end(key)
                    return self._entries[key], False
            side = build()
            with self._lock:
                self._entries[key] = side
                self._evict(keep=key)
            return side, True

    def _evict(self, keep: tuple) -> None:
        sizes = {k: s.nbytes() for k, s in self._entries.items()}
        while sum(sizes.values()) > self.cap_bytes and len(self._entries) > 1:
            oldest = next(k for k in self._entries if k != keep)
            logger.info("cache over %s: dropping %s", _mib(self.cap_bytes), oldest)
            del self._entries[oldest], sizes[oldest]


def model_key(model: str | None) -> str:
    if not model:
        return EMBEDDED_DEFAULT
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else model


# -- metrics ---------------------------------------------------------------------------------------
class Scorers:
    """CLIP score (dq's evaluator, or an open_clip model) and LPIPS (only with torchvision's real
    AlexNet weights: from ``lpips_weights`` or torch's hub cache; never downloaded, never another
    network in its place). Loaded on first use, each behind a lock."""

    def __init__(self, *, lpips_weights: str | None = None, clip_model: str | None = None,
                 clip_pretrained: str | None = None):
        self.lpips_weights, self.clip_model, self.clip_pretrained = lpips_weights, clip_model, clip_pretrained
        self._clip = self._lpips = None
        self._clip_error = self._lpips_error = None
        self._lock = threading.Lock()

    def lpips_status(self) -> str | None:
        """None when LPIPS can be computed, else why not and how to enable it."""
        from dq.eval.lpips import backbone_file

        filename = backbone_file("alex")
        if self.lpips_weights is not None:
            return None if Path(self.lpips_weights).is_file() else (
                f"LPIPS: --lpips-weights {self.lpips_weights} does not exist; give the path of {filename}")
        if (Path(torch.hub.get_dir()) / "checkpoints" / filename).is_file():
            return None
        return (f"LPIPS: not shown, torchvision's AlexNet weights ({filename}) are not on this machine; "
                f"start the app with --lpips-weights PATH (or put the file in {torch.hub.get_dir()}/checkpoints)")

    def lpips(self, images: list, references: list) -> tuple[list[float] | None, str | None]:
        with self._lock:
            if self._lpips is None and self._lpips_error is None:
                self._lpips_error = self.lpips_status()
                if self._lpips_error is None:
                    try:
                        from dq.eval.lpips import LpipsScorer

                        self._lpips = LpipsScorer("alex", self.lpips_weights)
                    except Exception as exc:  # a wrong file: say so, keep the other metrics
                        self._lpips_error = f"LPIPS: not shown ({exc})"
            if self._lpips is None:
                return None, self._lpips_error
            return self._lpips(images, references, reduction="none").tolist(), None

    def clip(self, images: list, prompt: str) -> tuple[float | None, str | None]:
        with self._lock:
            if self._clip is None and self._clip_error is None:
                try:
                    from dq.eval.clip import load_clip

                    self._clip = load_clip(self.clip_model, self.clip_pretrained)
                except Exception as exc:
                    self._clip_error = f"CLIP score: not shown ({exc})"
            if self._clip is None:
                return None, self._clip_error
            from dq.eval.clip import clip_score

            return float(clip_score(images, [prompt] * len(images), self._clip)), None

    def clip_note(self) -> str:
        if self.clip_model is None:
            return CLIP_NOTE
        return f"CLIP score (0-100) with open_clip {self.clip_model} / {self.clip_pretrained}."


# -- one request -----------------------------------------------------------------------------------
@dataclass
class Result:
    seeds: list[int]
    full: list  # PIL images, one per seed
    quantized: list
    seconds: tuple[list[float], list[float]]
    psnr_db: list[float]
    ssim: list[float]
    lpips: list[float] | None
    clip: tuple[float | None, float | None]
    notes: list[str]
    names: tuple[str, str]
    memory: tuple[tuple[int, int], tuple[int, int]]
    layers: LayerReport | None

    def metrics_markdown(self) -> str:
        def mean(values: Sequence[float]) -> float:
            return sum(values) / len(values)

        (fw, fr), (qw, qr) = self.memory
        clip = [f"{c:.1f}" if c is not None else "n/a" for c in self.clip]
        lines = [
            f"| | {self.names[0]} | {self.names[1]} |",
            "|---|---|---|",
            f"| latency per image (mean of {len(self.seeds)}) | {mean(self.seconds[0]):.2f} s | {mean(self.seconds[1]):.2f} s |",
            f"| denoiser memory (weights + runtime kernel copies) | {_mib(fw + fr)} | {_mib(qw + qr)} "
            f"({(qw + qr) / max(1, fw + fr):.2f}x; weights {_mib(qw)}, runtime {_mib(qr)}) |",
            f"| CLIP score (mean over seeds) | {clip[0]} | {clip[1]} |",
            "",
            "| quantized vs full precision | PSNR (dB) | SSIM | LPIPS |",
            "|---|---|---|---|",
        ]
        lp = self.lpips
        lines.append(f"| slider (seed {self.seeds[0]}) | {self.psnr_db[0]:.2f} | {self.ssim[0]:.4f} | "
                     f"{f'{lp[0]:.4f}' if lp else 'n/a'} |")
        if len(self.seeds) > 1:
            lines.append(f"| grid, mean of {len(self.seeds)} seeds | {mean(self.psnr_db):.2f} | "
                         f"{mean(self.ssim):.4f} | {f'{mean(lp):.4f}' if lp else 'n/a'} |")
        lines += [""] + [f"- {note}" for note in self.notes]
        return "\n".join(lines)


class App:
    """What the page runs: both sides from the cache, drawn over several seeds, with metrics."""

    def __init__(
        self,
        model: str | None = None,
        *,
        recipe: str = "w8a8",
        quantized: str | None = None,
        num_prompts: int | None = None,
        steps: int | None = None,
        device: str | None = None,
        cache_mb: float = 4096,
        scorers: Scorers | None = None,
        num_seeds: int = 4,
        size: int | None = None,
    ):
        self.model, self.recipe, self.quantized = model, recipe, quantized
        self.num_prompts, self.steps, self.device = num_prompts, steps, device
        self.num_seeds, self.size = num_seeds, size
        self.cache = ModelCache(int(cache_mb * 2**20))
        self.scorers = scorers or Scorers()

    # the two sides
    def full_side(self, model: str | None) -> Side:
        return self.cache.get(("full", model_key(model)), lambda: open_full(model, device=self.device))[0]

    def quantized_side(self, model: str | None, recipe: str | None, folder: str | None,
                       budget: float | None = None, progress: Callable[[str], None] | None = None) -> Side:
        if folder:
            check_folder(folder)  # before opening anything
        full = self.full_side(model)
        if folder:
            path = Path(folder).expanduser()
            config = path / "model_index.json"
            stamp = config.stat().st_mtime if config.is_file() else None
            key = ("folder", model_key(model), str(path.resolve()), stamp)
            build = lambda: load_folder_side(folder, full, model, device=self.device)  # noqa: E731
            what = f"loading {folder}"
        else:
            chosen = recipe_with_overrides(recipe or "w8a8", num_prompts=self.num_prompts)
            if HAS_BUDGET and budget:  # HOOK (mixed precision): the average weight bits asked for
                chosen = dq.Recipe.from_dict({**chosen.to_dict(), "budget": float(budget)})
            key = ("recipe", model_key(model), json.dumps(chosen.to_dict(), sort_keys=True), self.steps, self.size)
            build = lambda: quantize_side(model, chosen, steps=self.steps, device=self.device, size=self.size)  # noqa: E731
            what = f"calibrating and quantizing {model or EMBEDDED_DEFAULT} with {chosen.name} (first request for it)"
        if progress is not None and key not in self.cache.keys():
            progress(what)
        return self.cache.get(key, build)[0]

    def prewarm(self) -> None:
        """Build the command line's choice (bad arguments fail here, before the page starts)."""
        self.quantized_side(self.model, self.recipe, self.quantized)

    def run(
        self,
        prompt: str,
        *,
        model: str | None = None,
        recipe: str | None = None,
        folder: str | None = None,
        seed: int = 0,
        num_seeds: int = 1,
        steps: int | None = None,
        guidance_scale: float | None = None,
        budget: float | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> Result:
        prompt = check_prompt(prompt)
        model = (model or "").strip() or None
        folder = (folder or "").strip() or None
        num_seeds = int(num_seeds)
        if num_seeds < 1:
            raise ValueError(f"the number of seeds must be at least 1, got {num_seeds}")
        if int(seed) < 0:
            raise ValueError(f"the seed must be 0 or more, got {seed}")
        quantized = self.quantized_side(model, recipe, folder, budget, progress)
        full = self.full_side(model)
        pair = SideBySide(full, quantized, default_steps=self.steps)
        kwargs = {**pair.call_kwargs(steps, guidance_scale), **size_kwargs(full.pipe, self.size)}
        seeds = [int(seed) + i for i in range(num_seeds)]
        images: tuple[list, list] = ([], [])
        seconds: tuple[list[float], list[float]] = ([], [])
        for i, s in enumerate(seeds):
            if progress is not None:
                progress(f"drawing seed {s} ({i + 1} of {num_seeds}) with both pipelines")
            for side, out, t in ((full, images[0], seconds[0]), (quantized, images[1], seconds[1])):
                image, took = side.draw(prompt, s, **kwargs)
                out.append(image)
                t.append(took)
        if quantized.layer_report is None:  # once per cached quantized model, after the timed draws
            if progress is not None:
                progress("measuring per-layer error")
            quantized.layer_report = measure_layers(full, quantized, prompt, seeds[0], **kwargs)
        notes = []
        lpips_values, why = self.scorers.lpips(images[1], images[0])
        if why:
            notes.append(why)
        clip_full, why = self.scorers.clip(images[0], prompt)
        clip_quant, _ = self.scorers.clip(images[1], prompt) if why is None else (None, None)
        notes.append(why or self.scorers.clip_note())
        notes.append("Latency: seconds per image of the whole pipeline call, one request at a time; "
                     "the first draw of a newly loaded model includes one-time setup (dq chooses its "
                     "kernels by measurement on its first call).")
        return Result(
            seeds, images[0], images[1], seconds,
            psnr(images[1], images[0], reduction="none").tolist(),
            ssim(images[1], images[0], reduction="none").tolist(),
            lpips_values, (clip_full, clip_quant), notes, (full.name, quantized.name),
            (full.memory_bytes(), quantized.memory_bytes()), quantized.layer_report,
        )


# -- the page ----------------------------------------------------------------------------------------
def theme():
    """Gradio's default theme with system fonts only (nothing fetched from a font server)."""
    import gradio as gr

    return gr.themes.Default(
        font=["ui-sans-serif", "system-ui", "sans-serif"],
        font_mono=["ui-monospace", "Consolas", "monospace"],
    )


def build_demo(app: App):
    """The Gradio page (``gradio.Blocks``) around ``app.run``."""
    import gradio as gr

    presets = dq.recipes()
    recipe_default = app.recipe if isinstance(app.recipe, str) else presets[0]
    if recipe_default not in presets:
        presets = [recipe_default, *presets]  # a recipe file given on the command line

    def generate(prompt, model, recipe, folder, seed, num_seeds, steps, guidance,
                 progress=gr.Progress(track_tqdm=True)):  # noqa: B008 (Gradio's own idiom)
        return draw(prompt, model, recipe, folder, seed, num_seeds, steps, guidance, None, progress)

    def generate_with_budget(prompt, model, recipe, folder, seed, num_seeds, steps, guidance, budget,
                             progress=gr.Progress(track_tqdm=True)):  # noqa: B008
        return draw(prompt, model, recipe, folder, seed, num_seeds, steps, guidance, budget, progress)

    def draw(prompt, model, recipe, folder, seed, num_seeds, steps, guidance, budget, progress):
        try:
            result = app.run(
                prompt, model=model, recipe=recipe, folder=folder,
                seed=int(seed if seed is not None else 0), num_seeds=int(num_seeds or 1),
                steps=int(steps) if steps else None, guidance_scale=guidance, budget=budget,
                # a number, not (index, None): Gradio draws the text only beside a progress level
                progress=lambda text: progress(0.0, desc=text),
            )
        except (ValueError, DQError) as error:
            raise gr.Error(str(error), duration=None) from error
        except Exception as error:  # anything else: say what failed; the app stays up
            logger.exception("request failed")
            raise gr.Error(f"the request failed: {type(error).__name__}: {error}", duration=None) from error
        gallery = []
        for s, f, q, db in zip(result.seeds, result.full, result.quantized, result.psnr_db):
            gallery += [(f, f"seed {s}: {result.names[0]}"), (q, f"seed {s}: {result.names[1]}, {db:.1f} dB")]
        bits, error = result.layers.frames()
        caption = (f"{len(result.layers.names)} quantized layers of {result.names[1]}; "
                   f"{ERROR_MEASURE} ({result.layers.measured_on}). Bits: the layer's weight and "
                   "activation formats (full-precision activations at the model dtype's bits).")
        return ((result.full[0], result.quantized[0]), gallery, result.metrics_markdown(),
                bits, error, caption)

    with gr.Blocks(title="dq: full precision vs quantized", analytics_enabled=False) as demo:
        gr.Markdown("## dq: full precision vs quantized, same prompt, same seeds")
        with gr.Row():
            model = gr.Textbox(label="model (hub id or diffusers folder; empty: the embedded default)",
                               value=app.model or "", elem_id="model")
            recipe = gr.Dropdown(presets, value=recipe_default, label="recipe (a preset, or type a .yaml/.json path)",
                                 allow_custom_value=True, elem_id="recipe")
            folder = gr.Textbox(label="saved dq folder (instead of the recipe)", value=app.quantized or "",
                                elem_id="folder")
        extra = []
        if HAS_BUDGET:  # HOOK (mixed precision): shown once dq.Recipe has `budget`
            extra.append(gr.Slider(0, 8, value=0, step=0.25, label="bit budget (average weight bits; 0: the recipe as is)"))
        with gr.Row():
            prompt = gr.Textbox(label="prompt", value=EXAMPLES[0], scale=4, elem_id="prompt")
            button = gr.Button("generate", variant="primary", scale=1, elem_id="generate")
        with gr.Row():
            seed = gr.Number(label="first seed", value=0, precision=0, minimum=0)
            num_seeds = gr.Slider(1, 8, value=app.num_seeds, step=1, label="seeds in the grid")
            steps = gr.Slider(1, 50, value=app.steps or 20, step=1, label="steps")
            guidance = gr.Slider(1.0, 10.0, value=4.5, step=0.5, label="guidance scale")
        with gr.Row():
            slider = gr.ImageSlider(label="full precision | quantized (drag to compare)", type="pil",
                                    elem_id="slider", max_height=512)
            gallery = gr.Gallery(label="grid over seeds: full precision, quantized", columns=2,
                                 elem_id="grid", height=512)
        metrics = gr.Markdown(elem_id="metrics")
        with gr.Row():
            bits_plot = gr.LinePlot(x="layer", y="bits", color="tensor", label="bits per quantized layer",
                                    tooltip=["name", "bits", "tensor"], y_lim=[0, 33])
            error_plot = gr.BarPlot(x="layer", y="SQNR (dB)", label="output SQNR per quantized layer",
                                    tooltip=["name", "SQNR (dB)"])
        caption = gr.Markdown(elem_id="layers-caption")
        gr.Examples(EXAMPLES, inputs=prompt)
        inputs = [prompt, model, recipe, folder, seed, num_seeds, steps, guidance, *extra]
        outputs = [slider, gallery, metrics, bits_plot, error_plot, caption]
        run = generate_with_budget if extra else generate  # HOOK (mixed precision)
        button.click(run, inputs, outputs, api_name="generate")
        prompt.submit(run, inputs, outputs, api_name=False)
    return demo


def launch(demo, *, host: str = "127.0.0.1", port: int | None = 7860, share: bool = False,
           concurrency: int = 2, block: bool = True):
    """Queue requests (``concurrency`` run at once; per-model locks keep them apart) and serve."""
    demo.queue(default_concurrency_limit=concurrency)
    return demo.launch(server_name=host, server_port=port, share=share, theme=theme(),
                       prevent_thread_lock=not block, quiet=not block)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", nargs="?", default=None,
                        help="hub id or diffusers folder (default: the embedded default pipeline)")
    parser.add_argument("--recipe", default="w8a8",
                        help="preset name or recipe file used to quantize at start (default: w8a8)")
    parser.add_argument("--quantized", default=None,
                        help="a dq folder to compare instead of quantizing at start")
    parser.add_argument("--num-prompts", type=int, default=None,
                        help="calibration prompts (default: the recipe's)")
    parser.add_argument("--steps", type=int, default=None,
                        help="sampler steps for calibration and the page's default")
    parser.add_argument("--seeds", type=int, default=4, help="seeds in the page's grid (default 4)")
    parser.add_argument("--size", type=int, default=None,
                        help="image height and width in pixels (default: the pipeline's own)")
    parser.add_argument("--device", default=None, help="e.g. cuda (default: where the pipeline loads, the CPU)")
    parser.add_argument("--cache-mb", type=float, default=4096,
                        help="memory cap of the cached pipelines in MiB (least recently used dropped first)")
    parser.add_argument("--concurrency", type=int, default=2, help="requests run at once (default 2)")
    parser.add_argument("--lpips-weights", default=None,
                        help="torchvision's AlexNet checkpoint for LPIPS (default: torch's hub cache)")
    parser.add_argument("--clip-model", default=None, help="open_clip model for the CLIP score (default: dq's evaluator)")
    parser.add_argument("--clip-pretrained", default=None, help="its pretrained tag or checkpoint file")
    parser.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (this machine only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="a public Gradio link (needs the network)")
    args = parser.parse_args(argv)
    for option in ("seeds", "concurrency", "steps", "num_prompts", "size"):
        value = getattr(args, option)
        if value is not None and value < 1:
            parser.error(f"--{option.replace('_', '-')} must be at least 1, got {value}")
    if args.cache_mb <= 0:
        parser.error(f"--cache-mb must be positive, got {args.cache_mb}")
    return args


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        import gradio  # noqa: F401
    except ImportError:
        sys.exit('app.py needs Gradio: pip install "dq[app]" (or pip install gradio)')
    app = App(
        args.model, recipe=args.recipe, quantized=args.quantized, num_prompts=args.num_prompts,
        steps=args.steps, device=args.device, cache_mb=args.cache_mb, num_seeds=args.seeds, size=args.size,
        scorers=Scorers(lpips_weights=args.lpips_weights, clip_model=args.clip_model,
                        clip_pretrained=args.clip_pretrained),
    )
    try:
        app.prewarm()
    except DQError as error:
        sys.exit(f"app.py: {error}")
    launch(build_demo(app), host=args.host, port=args.port, share=args.share,
           concurrency=args.concurrency)


if __name__ == "__main__":
    main()
