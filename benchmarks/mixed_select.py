"""Does a closed-loop score choose mixed-precision plans better than the proxy? (issue 14)

For budgets 5 and 6.884 bits (uniform w4a8's), the candidate plans are the ones `select_plan`
and `benchmarks/mixed_trust.py` produce: the rounds' centres (as `benchmarks/mixed.py
--centre-each --max-rounds 3` takes them), the last solved plan, and trust-region re-solves
around the last centre with at most K = 2, 4, 8, 16 layers changed. Each candidate is scored
three ways:

- proxy: its whole-model relative denoiser error on the recorded calibration calls
  (`dq.mixed.measure_plan`, what `select_plan` compares);
- sampled: mean PSNR of images generated from SELECTION prompts (the first N of
  calib/shapes_calib.txt, seeds 20000+, disjoint from the evaluation) against the
  full-precision pipeline's images of the same seeds (closed loop: the plan's own trajectory);
- held out: mean PSNR / SSIM on the first 64 prompts of calib/shapes_eval.txt (seeds 0-63), as
  benchmarks/mixed.py scores.

Reported: each score per candidate, the Spearman correlation of proxy and sampled scores with
the held-out PSNR, and the held-out result of the plan each score selects.

    python benchmarks/mixed_select.py --select-prompts 8 > select.log
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from mixed import round_one  # noqa: E402

import dq  # noqa: E402
from dq.engine import find_denoiser  # noqa: E402
from dq.eval import generate_images  # noqa: E402
from dq.eval.metrics import psnr, ssim  # noqa: E402
from dq.kernels import choice  # noqa: E402
from dq.mixed import (  # noqa: E402
    Budget,
    allocate,
    install_allocation,
    measure_around,
    measure_plan,
    measure_sensitivity,
    plan_cost,
    select_plan,
    spearman,
    trust_region_plan,
)
from dq.prompts import load_prompts  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--select-prompts", type=int, default=8)
    parser.add_argument("--eval-prompts", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--budgets", default="5,6.884")
    parser.add_argument("--out", type=Path, default=RESULTS / f"mixed-select-{time.strftime('%Y-%m-%d')}.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.time()
    held = load_prompts("shapes_eval")[: args.eval_prompts]
    sel = load_prompts("shapes_calib")[: args.select_prompts]
    sel_seeds = [20000 + i for i in range(len(sel))]
    calib = load_prompts("shapes_calib")[:16]
    gen = dict(batch_size=16, num_inference_steps=10, progress=False)
    fp_pipe = dq.open_pipeline(None)
    ref_held = generate_images(fp_pipe, held, **gen)
    ref_sel = generate_images(fp_pipe, sel, sel_seeds, **gen)
    base = dq.Recipe.from_dict({"base": "w4a8", "budget": 5.0, "mixed": {
        "sensitivity": "measure", "rounds": 1, "weights": ["int4", "int5", "int6", "int8"]}})
    pipe = dq.open_pipeline(None)
    _, model = find_denoiser(pipe)
    sens = measure_sensitivity(pipe, model, base, calib, 10, {}, keep_built=True)
    sens.round_one = {s.name: {o.format: o.measured for o in s.options} for s in sens.layers}

    def images(allocation, prompts, seeds=None):
        p = dq.open_pipeline(None)
        install_allocation(p, sens, dq.Recipe.from_dict({**base.to_dict(), "allocation": allocation}))
        return generate_images(p, prompts, seeds, **gen)

    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": choice.machine(),
              "select_prompts": len(sel), "eval_prompts": len(held), "budgets": []}
    for b in (float(x) for x in args.budgets.split(",")):
        budget = Budget("bits", b)
        sb = round_one(sens)
        for _ in range(3):
            if sb.centre is not None and allocate(sb, budget) == sb.centre:
                break
            sb = measure_around(model, sb, base, budget)
        solved = allocate(sb, budget)
        measure_plan(model, sb, base, solved)
        cands = {"solved": solved}
        for k in (2, 4, 8, 16):
            cands[f"K={k}"] = trust_region_plan(sb, budget, k)
            measure_plan(model, sb, base, cands[f"K={k}"])
        for i, (plan, _e) in enumerate(sb.tried):
            if set(plan) == set(solved) and plan not in cands.values():
                cands[f"centre {i}"] = plan
        capacity = budget.capacity(sb)
        rows = []
        for name, plan in cands.items():
            if plan_cost(sb, budget, plan) > capacity * (1 + 1e-9):
                continue  # a centre of another budget's round (over this one)
            proxy = next(e for p, e in sb.tried if p == plan)
            s_img = images(plan, sel, sel_seeds)
            h_img = images(plan, held)
            row = {"plan": name, "proxy_error": proxy, "sampled_psnr": float(psnr(s_img, ref_sel)),
                   "held_psnr": float(psnr(h_img, ref_held)), "held_ssim": float(ssim(h_img, ref_held))}
            rows.append(row)
            print(json.dumps({"budget": b, **row}), flush=True)
        by_proxy = min(rows, key=lambda r: r["proxy_error"])
        by_sampled = max(rows, key=lambda r: r["sampled_psnr"])
        sp_proxy = spearman([-r["proxy_error"] for r in rows], [r["held_psnr"] for r in rows])
        sp_sampled = spearman([r["sampled_psnr"] for r in rows], [r["held_psnr"] for r in rows])
        chosen = select_plan(sb, budget)
        out = {"budget": b, "candidates": rows, "select_plan": next((r["plan"] for r in rows if cands[r["plan"]] == chosen), None),
               "by_proxy": by_proxy["plan"], "by_sampled": by_sampled["plan"],
               "spearman_proxy_vs_held": sp_proxy, "spearman_sampled_vs_held": sp_sampled,
               "best_held": max(rows, key=lambda r: r["held_psnr"])["plan"]}
        print(json.dumps({k: v for k, v in out.items() if k != "candidates"}), flush=True)
        report["budgets"].append(out)
    report["seconds"] = time.time() - start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
