"""Quality cost of running weight-only layers with dynamic int8 activations (kernel path
"int_mm_a8", `Recipe.weight_only_int8_activations`).

Quantizes a pipeline's denoiser with `w4a16` (calibration-free), records the full-precision
denoiser calls of a few prompts, and replays them on the quantized copy three ways:
float activations (path "dequant", what w4a16 computes), int8 per-token activations (path
"int_mm_a8", forced on every layer), and full precision. Reports the denoiser-output SQNR
and PSNR of each against full precision, and the per-layer SQNR of the int8-activation
output against the float-activation output of the same layer on the recorded inputs.

    python benchmarks/weight_only_a8.py                 # embedded default pipeline
    python benchmarks/weight_only_a8.py --tiny pixart   # a tiny random-weight test pipeline
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ablation import CallRecorder, pooled_sqnr  # noqa: E402

import dq  # noqa: E402
from dq.engine import find_denoiser  # noqa: E402
from dq.kernels import layer_paths, runners, set_execution  # noqa: E402
from dq.kernels.choice import machine  # noqa: E402
from dq.nn import QuantLinear  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
logger = logging.getLogger("weight_only_a8")


def psnr(ref: list[torch.Tensor], out: list[torch.Tensor]) -> float:
    """PSNR of the denoiser outputs, peak = the largest |reference| value."""
    peak = max(float(r.abs().max()) for r in ref)
    mse = sum(float((r.double() - o.double()).pow(2).sum()) for r, o in zip(ref, out)) / sum(r.numel() for r in ref)
    return 10 * torch.log10(torch.tensor(peak**2 / max(mse, 1e-30))).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", default=None, metavar="KIND")
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("dq").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    if args.tiny:
        from dq.testing.tiny import default_call_kwargs, prompts_for, tiny_pipeline

        pipe = tiny_pipeline(args.tiny)
        kwargs = {k: v for k, v in default_call_kwargs(args.tiny).items() if k not in ("num_inference_steps", "output_type")}
        prompts = prompts_for(args.tiny, args.prompts)
    else:
        from dq.prompts import load_prompts

        pipe = dq.open_pipeline(None)
        pipe.set_progress_bar_config(disable=True)
        kwargs = {"clean_caption": False}
        prompts = load_prompts("shapes_eval")[: args.prompts]
    _, model = find_denoiser(pipe)
    with CallRecorder(model) as recorder, torch.no_grad():
        pipe(prompt=prompts, num_inference_steps=args.steps, generator=torch.Generator().manual_seed(0),
             output_type="latent", **kwargs)
    ref = recorder.replay(model)
    quantized = copy.deepcopy(pipe)
    dq.quantize(quantized, "w4a16", **kwargs)
    _, qmodel = find_denoiser(quantized)
    layers = {n: m for n, m in qmodel.named_modules() if isinstance(m, QuantLinear) and m.kernel == "dequant"}

    set_execution(qmodel, "real", path="dequant")
    w4a16 = recorder.replay(qmodel)
    # per-layer: int8-activation output against float-activation output on the same inputs
    noise = dict.fromkeys(layers, 0.0)
    signal = dict.fromkeys(layers, 0.0)

    def hook(name):
        def fn(m, inputs, _out):
            x = inputs[0] if m.input_transform is None else m.input_transform(inputs[0])
            a, b = m.simulated(x), runners.simulated_a8(m, x)
            signal[name] += float(a.double().pow(2).sum())
            noise[name] += float((a.double() - b.double()).pow(2).sum())
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
    recorder.replay(qmodel)
    for h in handles:
        h.remove()
    set_execution(qmodel, "real", path="int_mm_a8", weight_only_int8=True)
    forced = sum(layer_paths(m) == ["int_mm_a8"] for m in layers.values())
    a8 = recorder.replay(qmodel)
    layer_sqnr = {n: 10 * torch.log10(torch.tensor(signal[n] / max(noise[n], 1e-30))).item() for n in layers}
    out = {
        "model": f"tiny-{args.tiny}" if args.tiny else "embedded-default",
        "date": time.strftime("%Y-%m-%d"), "machine": machine()["cpu"], "prompts": len(prompts), "steps": args.steps,
        "denoiser_calls": len(ref), "layers": len(layers), "layers_on_int_mm_a8": forced,
        "w4a16": {"sqnr_db": pooled_sqnr(ref, w4a16), "psnr_db": psnr(ref, w4a16)},
        "w4a16_int8_activations": {"sqnr_db": pooled_sqnr(ref, a8), "psnr_db": psnr(ref, a8)},
        "a8_vs_w4a16": {"sqnr_db": pooled_sqnr(w4a16, a8)},
        "layer_sqnr_db": {"min": min(layer_sqnr.values()), "median": sorted(layer_sqnr.values())[len(layer_sqnr) // 2],
                          "worst": sorted(layer_sqnr.items(), key=lambda kv: kv[1])[:3]},
    }
    print(json.dumps(out, indent=2))
    path = args.out or RESULTS / f"weight-only-a8-{out['model']}-{out['date']}.json"
    path.write_text(json.dumps(out, indent=2))
    logger.info("wrote %s", path)


if __name__ == "__main__":
    main()
