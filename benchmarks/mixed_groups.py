"""benchmarks/mixed.py with the allocation's int5 and int6 formats in groups instead of per output
channel (run L in BENCHMARKS.md): each group gets a one-byte integer multiplier of the channel
scale (two-level scales, `dq.quant.packing.WeightLayout`; 0.125 bits per weight in groups of 64).
Multiplier times code must fit int8, so the multipliers span 1-8 at 5 bits and 1-4 at 6 bits.

    python benchmarks/mixed_groups.py --group-size 64 --budgets 5,6,8 --centre-each --max-rounds 3 --presets "" --out /tmp/x.json

Every other argument goes to benchmarks/mixed.py unchanged. It rewrites the mixed section of
BENCHMARKS.md and the plots as mixed.py does (restore them with git when the run is exploratory).
"""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--group-size", type=int, default=64)
    args, rest = parser.parse_known_args()
    sys.path.insert(0, str(HERE))
    import dq.mixed.budget as budget
    import dq.mixed.sensitivity as sensitivity
    from dq.quant.spec import QuantSpec

    per_channel = budget.weight_formats

    def grouped(recipe):
        table = per_channel(recipe)
        for bits in (5, 6):
            table[f"int{bits}"] = QuantSpec(bits=bits, granularity="group", group_size=args.group_size, range="mse")
        return table

    budget.weight_formats = grouped  # apply_allocation and precheck look it up here
    sensitivity.weight_formats = grouped  # measure_sensitivity imported it by name
    sys.argv = [str(HERE / "mixed.py"), *rest]
    runpy.run_path(str(HERE / "mixed.py"), run_name="__main__")


if __name__ == "__main__":
    main()
