"""How mixed precision's damages are measured, compared on the same built layers.

Base recipe w4a8 on the embedded default pipeline, candidate formats int4 / int5 / int6 / int8 /
float, every format built once (`dq.mixed.measure_sensitivity(..., keep_built=True)`). For each
way of measuring a (layer, format)'s damage, the integer program solves the plan of each budget
and the plan is scored on images against full precision (PSNR / SSIM, the evaluation prompts):

- recorded:   each layer alone on recorded calls (teacher forced), `measure: alone`;
- closed-all: every (layer, format) alone, closed loop: relative error of the final latents of
              `--prompts` calibration prompts sampled with the layer in that format;
- closed-tf:  closed loop for the lowest format only, the other formats scaled by the
              teacher-forced ratio (recorded damage of the format / of the lowest);
- trajectory: closed loop for the lowest format only, the other formats scaled by the
              layer's own output-error ratio (what `measure: trajectory` ships).

    python benchmarks/mixed_trajectory.py                                   # 64 prompts, budgets 5 and 6.884
    python benchmarks/mixed_trajectory.py --num-prompts 4 --steps 4 --calib-prompts 2 --budgets 6.884  # smoke
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from report import RESULTS, machine

import dq
from dq.engine import find_denoiser
from dq.eval import generate_images
from dq.eval.metrics import psnr, ssim
from dq.mixed import Budget, allocate, install_allocation, measure_sensitivity
from dq.mixed.sensitivity import _Execution, _Routed, built_layers
from dq.mixed.trajectory import closed_loop_errors, layer_output_errors, scale_by_format
from dq.prompts import load_prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--calib-prompts", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--prompts", type=int, default=2, help="calibration prompts sampled per closed-loop run")
    parser.add_argument("--budgets", default="5,6.884")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS / f"mixed-trajectory-{time.strftime('%Y-%m-%d')}.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    calib = load_prompts("shapes_calib")[: args.calib_prompts]
    base = dq.Recipe.from_dict({"base": "w4a8", "budget": 5.0, "float_activations_where_faster": False,
                                "mixed": {"sensitivity": "measure", "measure": "alone",
                                          "weights": ["int4", "int5", "int6", "int8"]}})
    pipe = dq.open_pipeline(None)
    _, model = find_denoiser(pipe)
    sens = measure_sensitivity(pipe, model, base, calib, args.steps, {}, keep_built=True)
    names = [s.name for s in sens.layers]
    recorded = {s.name: {o.format: o.measured for o in s.options if o.format != "float"} for s in sens.layers}
    prompts, seed, low = calib[: args.prompts], base.calib_seed, sens.low
    for built in sens.built.values():  # one router routes every format (same boundaries)
        for layer in built.values():
            layer.bind_router(sens.router)
    seconds = {}
    with _Execution(built_layers(sens), base.execution, False), _Routed(model, sens.router):
        t = time.process_time()
        outputs = layer_output_errors(model, names, sens.built, sens.calls.calls)
        seconds["layer_outputs"] = time.process_time() - t
        closed = {}
        for fmt, built in sens.built.items():
            t = time.process_time()
            for name, err in closed_loop_errors(pipe, model, {n: built[n] for n in names}, prompts, args.steps, seed, {}).items():
                closed.setdefault(name, {})[fmt] = err
            seconds[f"closed_{fmt}"] = time.process_time() - t
    tables = {
        "recorded": recorded,
        "closed-all": closed,
        "closed-tf": {n: {f: closed[n][low] * recorded[n][f] / recorded[n][low] for f in recorded[n]} for n in names},
        "trajectory": scale_by_format({n: closed[n][low] for n in names}, outputs, low),
    }
    evals = load_prompts("shapes_eval")[: args.num_prompts]
    gen = dict(batch_size=16, num_inference_steps=args.steps, progress=False)
    reference = generate_images(dq.open_pipeline(None), evals, **gen)
    rows = []
    for label, table in tables.items():
        for s in sens.layers:
            for o in s.options:
                o.damage = 0.0 if o.format == "float" else table[s.name][o.format]
        for b in (float(x) for x in args.budgets.split(",")):
            plan = allocate(sens, Budget("bits", b))
            p = dq.open_pipeline(None)
            install_allocation(p, sens, dq.Recipe.from_dict({**base.to_dict(), "allocation": plan}))
            images = generate_images(p, evals, **gen)
            row = {"method": label, "budget": b, "psnr": float(psnr(images, reference)), "ssim": float(ssim(images, reference)),
                   "counts": {f: sum(v == f for v in plan.values()) for f in (*sens.built, "float")}, "plan": plan}
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "plan"}), flush=True)
    out = {"machine": machine(), "num_prompts": len(evals), "calib_prompts": len(calib), "steps": args.steps,
           "closed_loop_prompts": len(prompts), "cpu_seconds": seconds, "rows": rows, "tables": tables}
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
