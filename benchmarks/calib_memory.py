"""Peak memory of calibration against a plain full-precision run of the same pipeline.

Each measurement runs in a fresh subprocess and reads its peak resident set size, so
the numbers include everything the process held. Usage:

    python benchmarks/calib_memory.py                 # embedded default pipeline
    python benchmarks/calib_memory.py --tiny pixart   # a tiny test pipeline
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def child(mode: str, tiny: str | None, prompts: int, steps: int) -> None:
    import torch

    import dq
    from dq.calibrate.run import run_pipeline
    from dq.families import family_defaults
    from dq.prompts import load_prompts

    torch.set_num_threads(2)
    if tiny:
        from dq.testing.tiny import default_call_kwargs, prompts_for, tiny_pipeline

        pipe = tiny_pipeline(tiny)
        kwargs = {k: v for k, v in default_call_kwargs(tiny).items() if k not in ("num_inference_steps", "output_type")}
        plist = prompts_for(tiny, prompts)
    else:
        pipe = dq.open_pipeline(None)
        kwargs = {}
        plist = load_prompts(family_defaults(pipe)["calib_prompts"])[:prompts]
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if mode == "fp":
        run_pipeline(pipe, plist, num_inference_steps=steps, batch_size=4, seed=0, call_kwargs=kwargs, desc="full precision")
    else:
        recipe = dq.Recipe.from_any("w8a8")
        recipe.calib_batch_size = 4
        dq.quantize(pipe, recipe, calib_prompts=plist, num_inference_steps=steps, **kwargs)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"mode": mode, "peak_rss_mb": peak / 1024, "after_load_rss_mb": base / 1024, "seconds": seconds}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tiny", default=None, help="tiny pipeline kind instead of the embedded default")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.tiny, args.prompts, args.steps)
        return
    rows = []
    for mode in ("fp", "calibrate"):
        cmd = [sys.executable, __file__, "--child", mode, "--prompts", str(args.prompts), "--steps", str(args.steps)]
        if args.tiny:
            cmd += ["--tiny", args.tiny]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    fp, cal = rows
    # imported here, not at the top: the children measure their own memory
    from dq.kernels.choice import machine

    result = {
        "model": args.tiny or "embedded-default",
        "prompts": args.prompts,
        "steps": args.steps,
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "full_precision": fp,
        "calibration_w8a8": cal,
        "peak_ratio": cal["peak_rss_mb"] / fp["peak_rss_mb"],
        "extra_mb": cal["peak_rss_mb"] - fp["peak_rss_mb"],
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"calib_memory-{result['model']}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
