"""Time per call of every kernel path of one DiT-width layer, forced path by path, interleaved
(best of rounds), against the float `nn.Linear` it replaces; and the low-rank branch added in
place against a separate sum. Run on a shared machine, only the ratios within one run count;
`--clock cpu` times the calling thread's CPU time (one torch thread: all the work is in it),
which other processes on the machine disturb far less than wall-clock time.

    python benchmarks/layer_paths.py --width 1152 --rows 512 --threads 1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dq.kernels import choice, dispatch, set_execution  # noqa: E402
from dq.nn import QuantLinear  # noqa: E402
from dq.nn.transforms import LowRankBranch  # noqa: E402
from dq.quant.spec import QuantSpec  # noqa: E402

W4G = QuantSpec(bits=4, granularity="group", group_size=64, range="mse")
FORMATS = {
    "w4a8": (W4G, QuantSpec(bits=8, granularity="tensor", symmetric=False)),
    "w4a4": (W4G, QuantSpec(bits=4, granularity="token", symmetric=False)),
    "w4a16": (W4G, None),
}


def race(fns, budget: float, clock) -> dict[str, float]:
    """Best time of each function over interleaved rounds (after one warm-up round)."""
    for fn in fns.values():
        fn()
    best = dict.fromkeys(fns, float("inf"))
    end = time.perf_counter() + budget
    rounds = 0
    while rounds < 3 or time.perf_counter() < end:
        for name, fn in fns.items():
            start = clock()
            fn()
            best[name] = min(best[name], clock() - start)
        rounds += 1
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--width", type=int, default=1152)
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--budget", type=float, default=3.0, help="seconds of interleaved rounds per format")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="cpu")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    k = n = args.width
    float_layer = torch.nn.Linear(k, n)
    x = torch.randn(args.rows, k)
    report = {"date": time.strftime("%Y-%m-%d"), "machine": choice.machine(), "width": k, "rows": args.rows,
              "clock": args.clock, "loadavg_before": list(__import__("os").getloadavg()), "formats": {}}
    with torch.no_grad():
        for fmt, (w, a) in FORMATS.items():
            ranges = None if a is None or a.dynamic else [(-4.0, 4.0)]
            q = QuantLinear.from_float(float_layer, w, a, ranges)
            set_execution(q, "real", weight_only_int8=True, float_copy_max_bytes=1 << 40)
            paths = dispatch.candidate_paths(q, x.device, x.dtype)
            layers = {"float": float_layer}
            for path in paths:
                if path == "onednn":
                    continue
                lq = QuantLinear.from_float(float_layer, w, a, ranges)
                set_execution(lq, "real", path=path, weight_only_int8=True, float_copy_max_bytes=1 << 40)
                layers[path] = lq
            if fmt == "w4a4":  # the rank-32 branch: added in place (real) against a separate sum (sim-style)
                for name in ("int8_copy+branch(addmm_)", "int8_copy+branch(sum)"):
                    lq = QuantLinear.from_float(float_layer, w, a, ranges, branch=LowRankBranch(k, n, args.rank))
                    set_execution(lq, "real", path="int8_copy")
                    layers[name] = lq if "addmm" in name else (lambda t, m=lq: m.compute(t) + m.branch(t))
            fns = {name: (lambda m=m: m(x)) for name, m in layers.items()}
            times = race(fns, args.budget, time.thread_time if args.clock == "cpu" else time.perf_counter)
            report["formats"][fmt] = {p: t * 1e3 for p, t in times.items()}
            base = times["float"]
            print(fmt, ", ".join(f"{p} {t * 1e3:.2f} ms ({base / t:.2f}x float)" for p, t in times.items()), flush=True)
    report["loadavg_after"] = list(__import__("os").getloadavg())
    if args.out:
        args.out.write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
