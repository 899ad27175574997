"""Trust-region candidates for a mixed-precision plan, each measured whole on the proxy (run M in
BENCHMARKS.md). For budgets 5 and 6.884 bits (uniform w4a8's): rounds around each budget's own
plan as `benchmarks/mixed.py --centre-each --max-rounds 3` takes them; then, around the last
centre, the integer program solved again with at most K layers changed (K = 2, 4, 8, 16); every
candidate's whole-model error measured on the recorded calls (`dq.mixed.measure_plan`); the
lowest picked by `dq.mixed.select_plan`; it and the unconstrained solution scored on 64 prompts
against full precision. An experiment on whether lowering the proxy error further improves the
images (it did not).

    python benchmarks/mixed_trust.py > trust.log
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from mixed import round_one  # noqa: E402

import dq  # noqa: E402
from dq.engine import find_denoiser  # noqa: E402
from dq.eval import generate_images  # noqa: E402
from dq.eval.metrics import psnr, ssim  # noqa: E402
from dq.mixed import (  # noqa: E402
    Budget,
    allocate,
    install_allocation,
    measure_around,
    measure_plan,
    measure_sensitivity,
    select_plan,
    trust_region_plan,
)
from dq.prompts import load_prompts  # noqa: E402

GEN = dict(batch_size=16, num_inference_steps=10, progress=False)


def built_sensitivity(calib):
    """(base recipe, pipeline, denoiser, sensitivity): the table's w4a8 recipe with int4/5/6/8
    candidates, every format built once and kept, one in-context round around all-int4."""
    base = dq.Recipe.from_dict({"base": "w4a8", "budget": 5.0, "mixed": {
        "sensitivity": "measure", "measure": "in-context", "rounds": 1, "weights": ["int4", "int5", "int6", "int8"]}})
    pipe = dq.open_pipeline(None)
    _, model = find_denoiser(pipe)
    sens = measure_sensitivity(pipe, model, base, calib, 10, {}, keep_built=True)
    sens.round_one = {s.name: {o.format: o.measured for o in s.options} for s in sens.layers}
    return base, pipe, model, sens


def centred(model, sens, base, budget: Budget, rounds: int = 3):
    """The sensitivity re-measured around `budget`'s own plan, as `benchmarks/mixed.py --centre-each
    --max-rounds 3` takes its rounds."""
    sb = round_one(sens)
    for _ in range(rounds):
        if sb.centre is not None and allocate(sb, budget) == sb.centre:
            break
        sb = measure_around(model, sb, base, budget)
    return sb


def plan_images(sens, base, allocation, prompts):
    """Images of `prompts` (seeds 0..) from a fresh pipeline with `allocation` installed."""
    p = dq.open_pipeline(None)
    install_allocation(p, sens, dq.Recipe.from_dict({**base.to_dict(), "allocation": allocation}))
    return generate_images(p, prompts, **GEN)


def main() -> None:
    torch.set_num_threads(2)
    prompts = load_prompts("shapes_eval")[:64]
    calib = load_prompts("shapes_calib")[:16]
    reference = generate_images(dq.open_pipeline(None), prompts, **GEN)
    base, _pipe, model, sens = built_sensitivity(calib)

    def score(allocation):
        images = plan_images(sens, base, allocation, prompts)
        return float(psnr(images, reference)), float(ssim(images, reference))

    for b in (5.0, 6.884):
        budget = Budget("bits", b)
        sb = centred(model, sens, base, budget)
        solved = allocate(sb, budget)
        solved_error = measure_plan(model, sb, base, solved)
        candidates = {k: trust_region_plan(sb, budget, k) for k in (2, 4, 8, 16)}
        errors = {k: measure_plan(model, sb, base, p) for k, p in candidates.items()}
        best = select_plan(sb, budget)
        measured = {json.dumps(p, sort_keys=True): e for p, e in sb.tried}
        print(json.dumps({"budget": b, "solved_err": solved_error, "trust_errs": errors,
                          "changes": {k: sum(p[n] != sb.centre[n] for n in p) for k, p in candidates.items()},
                          "centre_err": sb.baseline, "best_err": measured[json.dumps(best, sort_keys=True)],
                          "best_is_solved": best == solved}), flush=True)
        solved_scores = score(solved)
        best_scores = score(best) if best != solved else solved_scores
        print(json.dumps({"budget": b, "solved": solved_scores, "selected": best_scores}), flush=True)


if __name__ == "__main__":
    main()
