"""Image cost of an opt-in kernel path on the embedded default pipeline: the same quantized model
run with the path allowed and without it, each scored against full precision (PSNR, SSIM) on the
same seeds, and against each other.

- `--option bf16` (default): path "bf16", weight-only layers in bfloat16
  (`weight_only_bf16_activations`);
- `--option float_input`: path "float_input", narrow layers on their unrounded input where that
  is faster (`float_activations_where_faster`; on in w8a8-dynamic and w4a4);
- `--option attention_bf16`: the attention core on bfloat16 Q, K, V where that is faster
  (`attention_bf16_where_faster`, `dq.nn.bf16_attention`); `--force` takes it in every attention
  module whatever the timing says (its image cost on any machine).

    python benchmarks/bf16_quality.py --num-prompts 64 --steps 10
    python benchmarks/bf16_quality.py --recipe w8a8     # its weight-only caption projections
    python benchmarks/bf16_quality.py --option float_input --recipe w4a4
    python benchmarks/bf16_quality.py --option attention_bf16 --recipe w8a8 --force

Writes benchmarks/results/bf16-quality-<date>-<machine>.json (float-input-quality-... and
attention-bf16-quality-... for those options). On a CPU without bfloat16 matmul
instructions the chooser never takes the path and both runs are the same model (reported).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import dq
from dq.engine import find_denoiser
from dq.eval import generate_images
from dq.eval.metrics import psnr, ssim
from dq.kernels import choice, path_counts, set_execution
from dq.prompts import load_prompts

RESULTS = Path(__file__).resolve().parent / "results"
FLAGS = {"bf16": "weight_only_bf16", "float_input": "float_activations", "attention_bf16": "attention_bf16"}
STEMS = {"bf16": "bf16-quality", "float_input": "float-input-quality", "attention_bf16": "attention-bf16-quality"}


def attention_paths(model: torch.nn.Module) -> dict[str, int]:
    """How many bfloat16-capable attention modules chose each path (over their shape classes)."""
    from dq.nn.bf16_attention import BF16AttnProcessor

    counts: dict[str, int] = {}
    for m in model.modules():
        processor = m.__dict__.get("processor", m._modules.get("processor"))
        if isinstance(processor, BF16AttnProcessor):
            for path in processor.paths.values():
                counts[path] = counts.get(path, 0) + 1
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--recipe", default="w4a16", help="preset quantized (calibrated on its default prompts)")
    parser.add_argument("--option", choices=tuple(FLAGS), default="bf16", help="the path allowed, or not")
    parser.add_argument("--force", action="store_true", help="attention_bf16: take it everywhere, not where faster")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.force:
        if args.option != "attention_bf16":
            parser.error("--force is for --option attention_bf16")
        from dq.nn import bf16_attention

        bf16_attention.measure = lambda *a: choice.Measurement("sdpa_bf16", {"sdpa_bf16": 0.0})  # chosen everywhere
    prompts = load_prompts("shapes_eval")[: args.num_prompts]
    kw = dict(num_inference_steps=args.steps, progress=False)
    start = time.time()
    pipe = dq.open_pipeline(None)
    fp = generate_images(pipe, prompts, **kw)
    dq.quantize(pipe, args.recipe)
    _, model = find_denoiser(pipe)
    runs = {}
    for name, on in ((f"{args.recipe} ({args.option} allowed)", True), (f"{args.recipe}, without {args.option}", False)):
        set_execution(model, "auto", **{FLAGS[args.option]: on})
        images = generate_images(pipe, prompts, **kw)
        runs[name] = {"images": images, "paths": path_counts(model), "attention_paths": attention_paths(model),
                      "psnr": float(psnr(images, fp)), "ssim": float(ssim(images, fp))}
    a, b = (r["images"] for r in runs.values())
    info = choice.machine()
    result = {
        "date": time.strftime("%Y-%m-%d"), "cpu": info["cpu"], "family_model_stepping": info["family_model_stepping"],
        "isa": info["isa"], "recipe": args.recipe, "threads": args.threads, "num_prompts": len(prompts), "steps": args.steps,
        "variants": {k: {kk: v for kk, v in r.items() if kk != "images"} for k, r in runs.items()},
        "option": args.option, "forced": args.force,
        "with_vs_without": {"psnr": float(psnr(a, b)), "ssim": float(ssim(a, b))},
        "seconds": time.time() - start,
    }
    print(json.dumps(result, indent=1))
    args.out.mkdir(parents=True, exist_ok=True)
    name = info["cpu"].lower().replace(" ", "-").replace("(r)", "").replace("@", "")[:40]
    suffix = "" if args.recipe == "w4a16" else f"-{args.recipe}"
    stem = STEMS[args.option] + ("-forced" if args.force else "")
    (args.out / f"{stem}-{result['date']}-{name}{suffix}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
