"""Loading a saved dq checkpoint with plain diffusers `from_pretrained`: time and peak memory,
against loading the same model's bf16 checkpoint (issue 13's target: at most 1.5x the time,
and a peak no higher than the quantized size plus one layer: no full-precision copy built).

A random-weight PixArt-Sigma-size transformer (28 blocks, hidden 1152) is quantized once with
the model-level API (`dq.prepare` -> a few random denoiser calls -> `dq.convert`; random weights
and inputs: only sizes and times matter here) and saved with `save_pretrained`, beside its bf16
checkpoint. Each load then runs in a fresh process (`--child`), alternating bf16 and dq, several
rounds; the peak is the process's max RSS minus its RSS after imports. Each load's wall time and
process CPU time are both recorded (the CPU time is steadier on a shared machine), with the
1-minute load average before and after the loads.

    python benchmarks/load.py [--recipe RECIPE_OR_JSON] [--rounds 3] [--blocks 28]

The default recipe is w4a8 with a fixed smoothing alpha and round-to-nearest weights instead of
the alpha search, the weights' MSE range search and GPTQ: the checkpoint has the same storage (packed 4-bit codes, group scales,
smoothing vectors, static int8 ranges), and building it takes minutes instead of an hour on a
2-core CPU. Only the load is measured.

Writes benchmarks/results/load-<date>-<machine>.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

RESULTS = Path(__file__).resolve().parent / "results"
FAST_W4A8 = {"base": "w4a8", "name": "w4a8-fixed-alpha-rtn", "smooth": {"alpha": 0.5}, "gptq": None,
             "weight": {"bits": 4, "granularity": "group", "group_size": 64}}  # min/max: no range search


def sigma_config(blocks: int) -> dict:
    return dict(
        num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=blocks,
        cross_attention_dim=1152, caption_channels=4096, sample_size=128, patch_size=2,
        norm_type="ada_norm_single", use_additional_conditions=False, interpolation_scale=2,
    )


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak() -> None:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux: clear_refs 5), so
    that the peak measured afterwards is the load's, not the imports' transient one."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def child(kind: str, folder: str) -> None:
    """Load one checkpoint in this fresh process; print a JSON line of time and memory."""
    from diffusers import PixArtTransformer2DModel

    import dq  # noqa: F401  (registers the backend; imported for both kinds: same baseline)

    base = rss_bytes()
    reset_peak()
    start, cpu_start = time.perf_counter(), time.process_time()
    model = PixArtTransformer2DModel.from_pretrained(folder, torch_dtype=torch.bfloat16)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    peak = peak_rss_bytes()
    held = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    print(json.dumps({"kind": kind, "seconds": seconds, "cpu_seconds": cpu_seconds, "peak_above_imports": peak - base,
                      "held_bytes": held}))


def build(folder: Path, blocks: int, recipe: str) -> dict:
    from diffusers import PixArtTransformer2DModel

    import dq

    torch.manual_seed(0)
    model = PixArtTransformer2DModel(**sigma_config(blocks)).eval()
    model.to(torch.bfloat16).save_pretrained(folder / "bf16")
    model.float()
    cal = dq.prepare(model, recipe)
    gen = torch.Generator().manual_seed(0)
    inputs = [
        dict(hidden_states=torch.randn(1, 4, 32, 32, generator=gen),  # 256 image tokens
             encoder_hidden_states=torch.randn(1, 16, 4096, generator=gen),
             timestep=torch.tensor([t]), added_cond_kwargs={"resolution": None, "aspect_ratio": None})
        for t in (999, 500)
    ]
    start = time.perf_counter()
    for _ in cal.passes():
        with torch.no_grad():
            for kw in inputs:
                model(**kw)
    dq.convert(model)
    quantize_s = time.perf_counter() - start
    model.save_pretrained(folder / "dq")
    largest_layer = max(m.weight.numel() * 2 for m in PixArtTransformer2DModel(**sigma_config(1)).modules()
                        if isinstance(m, torch.nn.Linear))
    return {"quantize_seconds": quantize_s, "largest_layer_bf16_bytes": largest_layer}


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def machine() -> str:
    from dq.kernels import choice

    m = choice.machine()
    return f"{m.get('cpu', 'cpu')} ({os.cpu_count()} cores)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=json.dumps(FAST_W4A8))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--blocks", type=int, default=28)
    parser.add_argument("--tag", default="", help="appended to the result file's name")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    with tempfile.TemporaryDirectory(prefix="dq-load-") as tmp:
        tmp = Path(tmp)
        recipe = json.loads(args.recipe) if args.recipe.lstrip().startswith("{") else args.recipe
        built = build(tmp, args.blocks, recipe)
        load_before = os.getloadavg()[0]  # 1-minute load average before the loads (after the build)
        sizes = {k: folder_bytes(tmp / k) for k in ("bf16", "dq")}
        runs: dict[str, list[dict]] = {"bf16": [], "dq": []}
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
        for _ in range(args.rounds):
            for kind in ("bf16", "dq"):
                out = subprocess.run([sys.executable, __file__, "--child", kind, str(tmp / kind)],
                                     capture_output=True, text=True, env=env, check=True)
                runs[kind].append(json.loads(out.stdout.strip().splitlines()[-1]))
    fields = ("seconds", "cpu_seconds", "peak_above_imports", "held_bytes")
    med = {k: {f: statistics.median(r[f] for r in v) for f in fields} for k, v in runs.items()}
    load_after = os.getloadavg()[0]  # 1-minute load average after the loads
    bound = sizes["dq"] + built["largest_layer_bf16_bytes"]
    result = {
        "date": dt.date.today().isoformat(), "machine": machine(), "recipe": recipe, "blocks": args.blocks,
        "checkpoint_bytes": sizes, **built, "median": med, "runs": runs,
        "time_ratio_dq_over_bf16": med["dq"]["seconds"] / med["bf16"]["seconds"],
        # process CPU time of the load (all threads): less sensitive than wall time to other work on a shared machine
        "cpu_time_ratio_dq_over_bf16": med["dq"]["cpu_seconds"] / med["bf16"]["cpu_seconds"],
        "load_average_before_after": [load_before, load_after],
        "peak_bound_bytes": bound,
        "targets": {
            "time_at_most_1.5x_bf16": med["dq"]["seconds"] <= 1.5 * med["bf16"]["seconds"],
            "peak_at_most_quantized_plus_one_layer": med["dq"]["peak_above_imports"] <= bound,
        },
    }
    RESULTS.mkdir(exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", result["machine"].lower()).strip("-")
    path = RESULTS / f"load-{result['date']}-{slug}{'-' + args.tag if args.tag else ''}.json"
    path.write_text(json.dumps(result, indent=2))
    mb = 2**20
    print(f"| checkpoint | file MB | load s (median of {args.rounds}) | load CPU s | peak RSS above imports MB | held MB |")
    print("|---|---|---|---|---|---|")
    for k in ("bf16", "dq"):
        print(f"| {k if k == 'bf16' else 'dq ' + str(recipe if isinstance(recipe, str) else recipe['name'])} | {sizes[k] / mb:.0f} | {med[k]['seconds']:.2f} | "
              f"{med[k]['cpu_seconds']:.2f} | {med[k]['peak_above_imports'] / mb:.0f} | {med[k]['held_bytes'] / mb:.0f} |")
    print(f"\ntime ratio {result['time_ratio_dq_over_bf16']:.2f}x (CPU time {result['cpu_time_ratio_dq_over_bf16']:.2f}x; "
          f"load average {load_before:.1f} -> {load_after:.1f}) (target <= 1.5x); peak bound "
          f"{bound / mb:.0f} MB (quantized + one bf16 layer): {result['targets']}")
    print(f"written {path}")


if __name__ == "__main__":
    main()
