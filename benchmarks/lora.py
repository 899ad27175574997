"""What a LoRA costs on a dq-quantized denoiser step: issue 13's target "LoRA of rank 16 on every
attention projection costs at most 10% of a denoiser step on the CPU slice of benchmarks/speed.py",
and what merging the LoRA with a layer's low-rank branch (`dq.nn.lora.merge_with_branches`) saves.

The slice is speed.py's (random-weight PixArt-Sigma-shaped transformer, hidden 1152, `--blocks`
blocks, 300 text tokens, batch 2, `--tokens` image tokens, presets as they ship: smoothing, and for
w4a4 its rank-32 branch). Each variant is timed eagerly in one process, interleaved round by round;
a LoRA variant is its quantized model with a random rank-16 peft LoRA (`peft.inject_adapter_in_model`) on to_q, to_k,
to_v and to_out.0 of every attention (self and cross). "merged": the same LoRA run together with the
low-rank branch where a layer has one (what `load_lora_weights` installs).

    python benchmarks/lora.py --threads 1 --clock cpu [--blocks 4] [--tokens 256] [--rounds 5]

Writes benchmarks/results/lora-<date>-<machine>.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import speed  # noqa: E402
from dq.nn.lora import merge_with_branches  # noqa: E402

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def with_lora(model: torch.nn.Module, rank: int, merged: bool) -> torch.nn.Module:
    from peft import LoraConfig, inject_adapter_in_model

    model = copy.deepcopy(model)
    torch.manual_seed(1)  # PixArt's model class has no add_adapter: peft directly
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS, init_lora_weights=False), model)
    if merged:
        assert merge_with_branches(model) > 0, "no layer with a low-rank branch to merge with"
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--recipes", nargs="*", default=["w4a8", "w4a4"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--inner", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="cpu")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    if args.clock == "cpu":
        speed.CLOCK["clock"] = time.process_time
    before = speed.contention()
    make = speed.pixart_call(args.tokens, 300, 1152)
    side = int(round(args.tokens**0.5)) * 2
    base = speed.pixart_slice(args.blocks, sample_size=side)
    variants = {"fp32": base, "fp32+lora": with_lora(base, args.rank, False)}
    for recipe in args.recipes:
        q = speed.quantize_denoiser(copy.deepcopy(base), speed.recipe_named(recipe), make)
        variants[f"dq-{recipe}"] = q
        variants[f"dq-{recipe}+lora"] = with_lora(q, args.rank, False)
        if any(getattr(m, "branch", None) is not None for m in q.modules()):
            variants[f"dq-{recipe}+lora-merged"] = with_lora(q, args.rank, True)
    call = make(500)
    with torch.no_grad():
        fns = {k: (lambda m=m: m(**call)) for k, m in variants.items()}
        outs = {k: fn()[0] for k, fn in fns.items()}  # first call: kernel paths chosen, runtime state made
        speed.warm_up(fns)
        timing = speed.time_interleaved(fns, args.rounds, args.inner)
    after = speed.contention()
    med = {k: v["median_ms"] for k, v in timing.items()}
    cost = {k: med[k] / med[k.split("+")[0]] - 1 for k in med if "+" in k}
    merged_vs_separate = {
        k: float((outs[k] - outs[k.replace("-merged", "")]).norm() / outs[k.replace("-merged", "")].norm())
        for k in outs if k.endswith("-merged")
    }
    result = {
        "date": dt.date.today().isoformat(), "machine": speed.machine_name(), "args": vars(args),
        "contention_before": before, "contention_after": after, "timing": timing,
        "lora_cost_fraction": cost, "merged_output_rel_diff": merged_vs_separate,
        "target_at_most_10pct": {k: v <= 0.10 for k, v in cost.items()},
    }
    speed.RESULTS.mkdir(exist_ok=True)
    path = speed.RESULTS / f"lora-{result['date']}-{result['machine']}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"| variant | step ms ({args.clock} clock, median of {args.rounds}) | rounds | LoRA cost |")
    print("|---|---|---|---|")
    for k, v in timing.items():
        extra = f"+{cost[k] * 100:.1f}%" if k in cost else ""
        print(f"| {k} | {v['median_ms']:.1f} | {', '.join(f'{t:.0f}' for t in v['rounds'])} | {extra} |")
    print(f"\nmerged vs separate output, relative difference: {merged_vs_separate}")
    print(f"load average {before['loadavg_1m']:.1f} before, {after['loadavg_1m']:.1f} after; written {path}")


if __name__ == "__main__":
    main()
