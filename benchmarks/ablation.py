"""Ablation of dq's outlier handling: each component added alone, then stacked, at W4A8 and
W4A4, against naive round-to-nearest, on images of the same seeds as full precision.

For each bit width the rows are:
- "rtn": the naive baseline preset (`w4a8-rtn` / `w4a4-rtn`: min/max ranges, one range);
- "base": the preset's quantizers without any outlier handling (MSE ranges, timestep
  groups; per-token activations at W4A4);
- "+smooth", "+rotate", "+lowrank", "+gptq", "+attention": base plus one component;
  "+attention-int8": base plus real int8 attention (`attention: {int8: true}`: int8 Q K^T
  and P V with smoothed K, dq.nn.attention.int8_attention);
- "smooth+lowrank", ..., "all": components stacked in application order;
- "preset": the shipped preset (its measured best combination);
- "preset+attention-int8": the preset with real int8 attention added.

Metrics: PSNR and SSIM of each variant's images against the full-precision images of the
same prompts and seeds (plus LPIPS and CLIP score when their weights are available), and
the denoiser-output SQNR over every denoising step of the evaluation prompts. Calibration
uses calib/shapes_calib.txt, evaluation calib/shapes_eval.txt (disjoint).

    python benchmarks/ablation.py                 # embedded default pipeline, full run
    python benchmarks/ablation.py --quick         # smoke test (2 prompts, 3 steps)
    python benchmarks/ablation.py --tiny pixart   # a tiny random-weight test pipeline
    python benchmarks/ablation.py --render results/ablation.json  # table + targets of a run

A full run writes the table and the issue's W4A4 target check into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

import dq
from dq.engine import find_denoiser
from dq.kernels.choice import machine as cpu_info
from dq.recipe import preset

RESULTS = Path(__file__).parent / "results"
COMPONENT_ROWS: dict[str, dict[str, Any]] = {
    "+smooth": {"smooth": {"alpha": "search"}},
    "+rotate": {"rotate": True},
    "+lowrank": {"lowrank": {"rank": 32}},
    "+gptq": {"gptq": True},
    "+attention": {"attention": {"probs": "log2", "probs_bits": 4}},
    "+attention-int8": {"attention": {"int8": True}},
}
STACKS: dict[str, tuple[str, ...]] = {
    "smooth+gptq": ("+smooth", "+gptq"),
    "smooth+lowrank": ("+smooth", "+lowrank"),
    "smooth+lowrank+gptq": ("+smooth", "+lowrank", "+gptq"),
    "all": ("+smooth", "+rotate", "+lowrank", "+gptq"),
}
REFERENCE_ONLY = {"psnr", "ssim", "lpips", "fid"}  # metrics scored against the full-precision images
NO_COMPONENTS = {"smooth": None, "rotate": None, "lowrank": None, "gptq": None, "attention": None}

logger = logging.getLogger("ablation")


def variants(bits: str) -> dict[str, dict[str, Any] | str]:
    """Every recipe of the ablation for one bit width, by row name."""
    base = {"base": bits, **NO_COMPONENTS}
    # the preset's own smoothing options (timestep aggregation) apply to every smoothed row
    smooth = preset(bits).smooth.to_dict() if preset(bits).smooth is not None else {}
    rows: dict[str, dict[str, Any] | str] = {"rtn": f"{bits}-rtn", "base": base}
    for name, component in COMPONENT_ROWS.items():
        if name == "+smooth":
            component = {"smooth": {**smooth, **component["smooth"]}}
        rows[name] = {**base, **component}
    for name, parts in STACKS.items():
        recipe = dict(base)
        for part in parts:
            recipe.update(rows[part] if isinstance(rows[part], str) else {k: v for k, v in rows[part].items() if k in NO_COMPONENTS and v is not None})
        rows[name] = recipe
    rows["preset"] = bits
    rows["preset+attention-int8"] = {"base": bits, **COMPONENT_ROWS["+attention-int8"]}
    return rows


class CallRecorder:
    """The denoiser's (args, kwargs) of every call, to replay on a quantized copy."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.calls = model, []

    def __enter__(self) -> CallRecorder:
        self.handle = self.model.register_forward_pre_hook(
            lambda _m, args, kwargs: self.calls.append((copy.deepcopy(args), copy.deepcopy(kwargs))), with_kwargs=True
        )
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()

    def replay(self, model: torch.nn.Module) -> list[torch.Tensor]:
        with torch.no_grad():
            return [model(*a, **{**k, "return_dict": False})[0] for a, k in self.calls]


def pooled_sqnr(ref: list[torch.Tensor], out: list[torch.Tensor]) -> float:
    signal = sum(float(r.double().pow(2).sum()) for r in ref)
    noise = sum(float((r.double() - o.double()).pow(2).sum()) for r, o in zip(ref, out))
    return 10 * torch.log10(torch.tensor(signal / max(noise, 1e-30))).item()


def load(args) -> tuple[Any, dict[str, Any], list[str], list[str]]:
    """(full-precision pipeline, call kwargs, calibration prompts, evaluation prompts)."""
    if args.tiny:
        from dq.testing.tiny import default_call_kwargs, prompts_for, tiny_pipeline

        pipe = tiny_pipeline(args.tiny)
        kwargs = {k: v for k, v in default_call_kwargs(args.tiny).items() if k not in ("num_inference_steps", "output_type")}
        pool = prompts_for(args.tiny, args.calib_prompts + args.num_prompts)
        return pipe, kwargs, pool[: args.calib_prompts], pool[args.calib_prompts :]
    from dq.prompts import load_prompts

    pipe = dq.open_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    calib, evaluation = load_prompts("shapes_calib"), load_prompts("shapes_eval")
    return pipe, {}, calib[: args.calib_prompts], evaluation[: args.num_prompts]


def make_scorer(metrics: list[str]):
    from dq.eval import Scorer

    return Scorer(metrics, fid_features="clip")  # FID on the evaluator CLIP features: works offline


def score(scorer, images, prompts, reference) -> tuple[dict[str, float | None], list[str]]:
    from dq.eval import MissingWeightsError

    try:
        result = scorer.score(images, prompts, reference_images=reference)
        return dict(result.metrics), list(result.notes)
    except MissingWeightsError as exc:  # an explicitly requested network is missing
        return {}, [str(exc)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="pipeline folder or hub id (default: the embedded default pipeline)")
    parser.add_argument("--tiny", default=None, metavar="KIND", help="use a tiny random-weight pipeline instead (pixart, sd15, ...)")
    parser.add_argument("--bits", default="w4a8,w4a4", help="comma-separated bit widths (presets with a -rtn baseline)")
    parser.add_argument("--rows", default=None, help="comma-separated subset of rows (default: all)")
    parser.add_argument("--num-prompts", type=int, default=16, help="evaluation prompts (one image each)")
    parser.add_argument("--calib-prompts", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20, help="sampler steps, for calibration and evaluation")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--metrics", default="psnr,ssim,lpips,clip,fid,attr", help="image metrics (dq.eval); missing weights are noted, not fatal")
    parser.add_argument("--quick", action="store_true", help="smoke test: 2 prompts, 3 steps, 2 calibration prompts, psnr/ssim")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS / "ablation.json"))
    parser.add_argument("--render", default=None, metavar="JSON", help="only render the table of an earlier run (and update BENCHMARKS.md)")
    args = parser.parse_args()
    if args.render:
        table = render(json.loads(Path(args.render).read_text()))
        print(table)
        _update_benchmarks(table)
        return
    if args.quick:
        args.num_prompts, args.calib_prompts, args.steps, args.metrics = 2, 2, 3, "psnr,ssim"
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("dq", "diffusers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)

    from dq.eval import generate_images

    pipe, kwargs, calib, prompts = load(args)
    _, model = find_denoiser(pipe)
    gen = dict(num_inference_steps=args.steps, batch_size=args.batch_size, progress=False, **kwargs)
    started = time.perf_counter()
    with CallRecorder(model) as recorder:
        reference = generate_images(pipe, prompts, **gen)
    ref_out = recorder.replay(model)
    logger.info("reference: %d images in %.1f s", len(reference), time.perf_counter() - started)

    metric_names = [m for m in args.metrics.split(",") if m]
    scorers = {name: make_scorer([name]) for name in metric_names}
    # metrics that need no reference (CLIP score) are also given for full precision itself
    reference_metrics: dict[str, float | None] = {}
    for name in set(metric_names) - REFERENCE_ONLY:
        got, _ = score(scorers[name], reference, prompts, None)
        reference_metrics[name] = got.get(name)
    results: dict[str, list[dict[str, Any]]] = {}
    wanted = None if args.rows is None else set(args.rows.split(","))
    for bits in args.bits.split(","):
        results[bits] = []
        for row, recipe in variants(bits).items():
            if wanted is not None and row not in wanted:
                continue
            quantized = copy.deepcopy(pipe)
            t0 = time.perf_counter()
            dq.quantize(quantized, recipe, calib_prompts=calib, num_inference_steps=args.steps, **kwargs)
            t_quant = time.perf_counter() - t0
            _, qmodel = find_denoiser(quantized)
            sqnr = pooled_sqnr(ref_out, recorder.replay(qmodel))
            images = generate_images(quantized, prompts, **gen)
            metrics: dict[str, float | None] = {}
            notes: list[str] = []
            for name, scorer in scorers.items():
                got, why = score(scorer, images, prompts, reference)
                metrics[name] = got.get(name)
                notes += why
            entry = {
                "row": row,
                "recipe": dq.Recipe.from_any(recipe).to_dict(),
                "denoiser_sqnr_db": sqnr,
                "metrics": metrics,
                "quantize_s": round(t_quant, 2),
                "notes": notes,
            }
            results[bits].append(entry)
            shown = "  ".join(f"{k} {v:.4g}" for k, v in metrics.items() if v is not None)
            logger.info("%-5s %-20s SQNR %6.2f dB  %s  (quantize %.1f s)", bits, row, sqnr, shown, t_quant)
            del quantized

    out = {
        "model": f"tiny-{args.tiny}" if args.tiny else (args.model or "embedded-default"),
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{cpu_info()['cpu']} (ISA {', '.join(cpu_info()['isa']) or 'none'}), {args.threads} threads",
        "settings": {
            "num_prompts": len(prompts), "calib_prompts": len(calib), "steps": args.steps,
            "quick": args.quick, "metrics": metric_names,
        },
        "full_precision": reference_metrics,
        "results": results,
    }
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    logger.info("wrote %s (%.0f s in all)", path, time.perf_counter() - started)
    table = render(out)
    print(table)
    if not args.quick and not args.tiny and args.rows is None:
        _update_benchmarks(table)


def _update_benchmarks(table: str) -> None:
    from report import update_section  # benchmarks/ is on sys.path when this runs as a script

    update_section("ablation", table)


COLUMNS = (("psnr", "PSNR dB", ".2f"), ("ssim", "SSIM", ".4f"), ("lpips", "LPIPS", ".4f"),
           ("clip", "CLIP", ".2f"), ("fid", "FID (CLIP feat.)", ".4f"), ("attr", "attr. acc.", ".3f"))


def targets(fp: dict[str, Any], rtn: dict[str, Any], best: dict[str, Any]) -> list[str]:
    """The outlier issue's W4A4 targets for `best` against naive `rtn`, each with its margin."""
    out = []

    def line(name: str, ok: bool | None, detail: str) -> None:
        out.append(f"- {name}: {'met' if ok else ('n/a' if ok is None else 'MISSED')} ({detail})")

    p, p0 = best.get("psnr"), rtn.get("psnr")
    if p is not None and p0 is not None:
        line("PSNR at least 2 dB above naive", p - p0 >= 2.0, f"{p:.2f} vs {p0:.2f} dB: {p - p0:+.2f} dB")
    s, s0 = best.get("ssim"), rtn.get("ssim")
    if s is not None and s0 is not None:
        ratio = (1 - s) / max(1 - s0, 1e-12)
        line("(1 - SSIM) at most 0.6x naive's", ratio <= 0.6, f"{1 - s:.4f} vs {1 - s0:.4f}: {ratio:.2f}x")
    f, f0 = best.get("fid"), rtn.get("fid")
    if f is not None and f0 is not None:
        closed = (f0 - f) / f0 if f0 > 0 else None  # full precision's FID against itself is 0
        line("70% of naive's FID gap to full precision closed", None if closed is None else closed >= 0.7,
             f"FID {f:.4f} vs naive {f0:.4f}, full precision 0: {closed:.0%} closed" if closed is not None else "naive FID is 0")
    c, c0, cf = best.get("clip"), rtn.get("clip"), fp.get("clip")
    if None not in (c, c0, cf):
        gap = cf - c0
        closed = (c - c0) / gap if abs(gap) > 1e-9 else None
        line("70% of naive's CLIP-score gap closed", None if closed is None else closed >= 0.7,
             f"CLIP {c:.2f} vs naive {c0:.2f}, full precision {cf:.2f}: "
             + (f"{closed:.0%} closed" if closed is not None else "no gap to close"))
    lp, lp0 = best.get("lpips"), rtn.get("lpips")
    line("LPIPS at most 0.6x naive's", None if lp is None or lp0 is None else lp <= 0.6 * lp0,
         "no LPIPS weights offline" if lp is None else f"{lp:.4f} vs {lp0:.4f}")
    return out


def render(out: dict[str, Any]) -> str:
    """Markdown: one table per bit width, and the W4A4 targets (preset against rtn)."""
    st = out["settings"]
    fp = out.get("full_precision", {})
    lines = [
        "## Outlier-handling ablation (`python benchmarks/ablation.py`)",
        "",
        f"{out['model']}, {out['date']}, {out['machine']}: {st['num_prompts']} evaluation prompts (calib/shapes_eval.txt), "
        f"{st['calib_prompts']} calibration prompts (calib/shapes_calib.txt, disjoint), {st['steps']} sampler steps. "
        "Every image metric is against the full-precision images of the same prompts and seeds (CLIP score and attribute "
        "accuracy are absolute; full precision: "
        + ", ".join(f"{k} {v:.3g}" for k, v in fp.items() if v is not None) + "). "
        "SQNR: denoiser output over every recorded sampler call. LPIPS: n/a without its backbone weights (offline).",
        "",
    ]
    for bits, rows in out["results"].items():
        header = ["row", "SQNR dB", *[c[1] for c in COLUMNS], "quantize s"]
        lines += [f"**{bits.upper()}**", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for r in rows:
            m = r["metrics"]
            cells = [r["row"], f"{r['denoiser_sqnr_db']:.2f}"]
            cells += ["n/a" if m.get(k) is None else format(m[k], f) for k, _, f in COLUMNS]
            cells.append(f"{r['quantize_s']:.0f}")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        by_row = {r["row"]: r["metrics"] for r in rows}
        if bits == "w4a4" and "rtn" in by_row and "preset" in by_row:
            lines += ["W4A4 targets (preset `w4a4` against naive `w4a4-rtn`):", "", *targets(fp, by_row["rtn"], by_row["preset"]), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
