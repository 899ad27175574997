"""Which layers to keep in full precision: measured, per layer family.

For each family of layers (regex), quantize ONLY that family and measure the denoiser
output SQNR against full precision on recorded denoiser calls, beside the family's share
of the denoiser's multiply-accumulates. Families with low SQNR and small compute share are
the ones `dq/arch.py` keeps in full precision.

    python benchmarks/sensitivity.py                   # embedded default pipeline
    python benchmarks/sensitivity.py --tiny pixart     # a tiny test pipeline (smoke test)
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import time
from pathlib import Path

import torch
from torch import nn

import dq
from dq.arch import quantizable_layers
from dq.engine import find_denoiser

RESULTS = Path(__file__).parent / "results"

FAMILIES = {
    "patch embedding": r"^pos_embed\.|^x_embedder$|^conv_in$",
    "timestep embedding": r"^adaln_single\.emb\.|^time_text_embed\.|^time_embedding\.|\.norm1\.emb\.",
    "adaLN modulation": r"^adaln_single\.linear$|\.norm1\.linear$|\.norm1_context\.linear$|\.norm\.linear$",
    "caption projection": r"^caption_projection\.|^context_embedder$",
    "final projection": r"^proj_out|^norm_out\.|^conv_out$",
    "self-attention qkv": r"\.attn1\.to_[qkv]$|\.attn\.to_[qkv]$",
    "self-attention out": r"\.attn1\.to_out\.0$|\.attn\.to_out\.0$",
    "cross-attention q": r"\.attn2\.to_q$",
    "cross-attention kv": r"\.attn2\.to_[kv]$",
    "cross-attention out": r"\.attn2\.to_out\.0$",
    "feed-forward": r"\.ff\.net\.",
}


def record_calls(pipe, model, prompts, kwargs, steps):
    calls = []

    def hook(_m, args, kw):
        calls.append((copy.deepcopy(args), copy.deepcopy(kw)))

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            pipe(prompt=prompts, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="latent", **kwargs)
    finally:
        handle.remove()
    return calls


def replay(model, calls):
    with torch.no_grad():
        return [model(*a, **{**k, "return_dict": False})[0] for a, k in calls]


def sqnr(ref, out):
    num = sum(float(r.pow(2).sum()) for r in ref)
    den = sum(float((r - o).pow(2).sum()) for r, o in zip(ref, out))
    return 10 * torch.log10(torch.tensor(num / max(den, 1e-30))).item()


def macs_share(model, calls, pattern):
    counts = {}
    hooks = []
    for name, module in quantizable_layers(model):
        def hook(m, args, out, name=name):
            x = args[0]
            tokens = x.numel() // (x.shape[1] if isinstance(m, nn.Conv2d) else x.shape[-1])
            per_token = m.weight.numel() if isinstance(m, nn.Linear) else m.weight.numel()
            if isinstance(m, nn.Conv2d):
                tokens = out.numel() // out.shape[1]
            counts[name] = counts.get(name, 0) + tokens * per_token
        hooks.append(module.register_forward_hook(hook))
    replay(model, calls[:1])
    for h in hooks:
        h.remove()
    total = sum(counts.values())
    return {fam: sum(v for n, v in counts.items() if re.search(p, n)) / total for fam, p in pattern.items()}, counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tiny", default=None)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--recipe", default="w4a8")
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.tiny:
        from dq.testing.tiny import default_call_kwargs, prompts_for, tiny_pipeline

        build = lambda: tiny_pipeline(args.tiny)  # noqa: E731
        kwargs = {k: v for k, v in default_call_kwargs(args.tiny).items() if k not in ("num_inference_steps", "output_type")}
        prompts = prompts_for(args.tiny, args.prompts)
    else:
        from dq.prompts import load_prompts

        build = lambda: dq.open_pipeline(None)  # noqa: E731
        kwargs = {}
        prompts = load_prompts("shapes_calib")[: args.prompts]
    pipe = build()
    _, model = find_denoiser(pipe)
    eval_prompts = prompts[::-1]
    calls = record_calls(pipe, model, eval_prompts, kwargs, args.steps)
    ref = replay(model, calls)
    shares, counts = macs_share(model, calls, FAMILIES)
    base = dq.Recipe.from_any(args.recipe).to_dict()
    rows = []
    for family, pattern in FAMILIES.items():
        matched = [n for n, _ in quantizable_layers(model) if re.search(pattern, n)]
        if not matched:
            continue
        pipe = build()
        _, model = find_denoiser(pipe)
        recipe = dq.Recipe.from_dict({**base, "keep_defaults": False, "keep": [f"^(?!.*(?:{pattern}))"], "name": family})
        dq.quantize(pipe, recipe, calib_prompts=prompts, num_inference_steps=args.steps, **kwargs)
        rows.append({"family": family, "layers": len(matched), "macs_share": shares[family], "sqnr_db": sqnr(ref, replay(model, calls))})
        print(f"{family:22s} layers {len(matched):3d}  MACs {100 * shares[family]:5.1f}%  SQNR {rows[-1]['sqnr_db']:6.1f} dB", flush=True)
    result = {"model": args.tiny or "embedded-default", "recipe": args.recipe, "date": time.strftime("%Y-%m-%d"), "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"sensitivity-{result['model']}.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
