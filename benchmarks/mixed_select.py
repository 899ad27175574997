"""Does a closed-loop score choose mixed-precision plans better than the proxy? (issue 14)

For budgets 5 and 6.884 bits (uniform w4a8's), rounds around each budget's own plan as
`benchmarks/mixed.py --centre-each --max-rounds 3` takes them, then each candidate plan scored
three ways:

- proxy: its whole-model relative denoiser error on the recorded calibration calls
  (`dq.mixed.measure_plan`, what `select_plan` compares);
- sampled: what `mixed.select: sampled` compares (`dq.mixed.sample_plans`): the plan installed,
  the pipeline sampled on the first N calibration prompts (calib/shapes_calib.txt, seeds 20000+,
  apart from the evaluation's), the closeness in dB of its final latents to the float
  pipeline's (closed loop: the plan's own trajectory);
- held out: mean PSNR / SSIM on the first 64 prompts of calib/shapes_eval.txt (seeds 0-63), as
  benchmarks/mixed.py scores.

Reported: each score per candidate, the Spearman correlation of proxy and sampled scores with
the held-out PSNR, and the held-out result of the plan each score selects. The candidates are
`dq.mixed.candidate_plans`: the last solved plan, trust-region re-solves around the last centre
(at most K = 2, 4, 8, 16 layers changed) and the rounds' centres within the budget.

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
from mixed_trust import GEN, built_sensitivity, centred, plan_images  # noqa: E402

import dq  # noqa: E402
from dq.eval import generate_images  # noqa: E402
from dq.eval.metrics import psnr, ssim  # noqa: E402
from dq.kernels import choice  # noqa: E402
from dq.mixed import (  # noqa: E402
    Budget,
    candidate_plans,
    measure_plan,
    sample_plans,
    select_plan,
    spearman,
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
    calib = load_prompts("shapes_calib")[:16]
    ref_held = generate_images(dq.open_pipeline(None), held, **GEN)
    base, pipe, model, sens = built_sensitivity(calib)

    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": choice.machine(),
              "select_prompts": len(sel), "eval_prompts": len(held), "budgets": []}
    for b in (float(x) for x in args.budgets.split(",")):
        budget = Budget("bits", b)
        sb = centred(model, sens, base, budget)
        cands = candidate_plans(sb, budget)  # what `mixed.select: sampled` compares
        proxy = {name: measure_plan(model, sb, base, plan) for name, plan in cands.items()}
        sampled = sample_plans(pipe, model, sb, base, cands, sel, 10, {})  # dq's own closed-loop score
        rows = []
        for name, plan in cands.items():
            h_img = plan_images(sens, base, plan, held)
            row = {"plan": name, "proxy_error": proxy[name], "sampled_db": sampled[name],
                   "held_psnr": float(psnr(h_img, ref_held)), "held_ssim": float(ssim(h_img, ref_held))}
            rows.append(row)
            print(json.dumps({"budget": b, **row}), flush=True)
        by_proxy = min(rows, key=lambda r: r["proxy_error"])
        by_sampled = max(rows, key=lambda r: r["sampled_db"])
        sp_proxy = spearman([-r["proxy_error"] for r in rows], [r["held_psnr"] for r in rows])
        sp_sampled = spearman([r["sampled_db"] for r in rows], [r["held_psnr"] for r in rows])
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
