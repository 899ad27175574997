"""Mixed precision against uniform presets on the embedded default pipeline.

Sensitivity is taken once (dq.mixed.measure_sensitivity, base recipe w4a8: each layer in
one of `--weights` (default int4, int5, int6, int8) or float, activations as the uniform recipe
of that weight format gives them: static int8, per-token where the architecture says), then
one allocation per budget of the sweep, each quantized (dq.quantize with the solved allocation)
and scored against the full-precision images of the same seeds (PSNR, SSIM), beside
uniform w4a8, uniform int8 weights, the other uniform formats and the `--presets`. Also: estimate-vs-measurement rank correlation over all layers, a plot
of quality against bytes, and the per-layer plot of the 5-bit plan.

    python benchmarks/mixed.py                      # 64 eval prompts, 10 steps
    python benchmarks/mixed.py --num-prompts 8 --steps 4 --budgets 5   # smoke test
    python benchmarks/mixed.py --budgets 5,6,8 --centre-each --max-rounds 3 --presets ""  # BENCHMARKS run F
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import time

import torch
from report import RESULTS, machine, module_bytes, update_section

import dq
from dq.engine import find_denoiser, plan_layers
from dq.eval import generate_images
from dq.eval.metrics import psnr, ssim
from dq.mixed import (
    Budget,
    LayerOption,
    LayerSensitivity,
    MixedPlan,
    allocate,
    estimate_pairs,
    install_allocation,
    layer_report,
    measure_around,
    measure_plan,
    measure_sensitivity,
    plot_allocation,
    select_plan,
    spearman,
)
from dq.prompts import load_prompts


def average_bits(model) -> float:
    rows = layer_report(model)
    return 8 * sum(r["bytes"] for r in rows) / sum(r["weights"] for r in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--calib-prompts", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--budgets", default="4.6,5,6,7,8")
    parser.add_argument("--weights", default="int4,int5,int6,int8",
                        help="mixed.weights: the candidate weight formats (float is always one)")
    parser.add_argument("--presets", default="w8a8", help="comma-separated presets also quantized with dq.quantize")
    parser.add_argument("--measure", default="trajectory", choices=["trajectory", "in-context", "alone"], help="mixed.measure")
    parser.add_argument("--trajectory-prompts", type=int, default=2, help="mixed.trajectory_prompts")
    parser.add_argument("--rounds", type=int, default=2, help="mixed.rounds (in context: measure again around the plan)")
    parser.add_argument("--centre-budget", type=float, default=5.0, help="the budget the second round measures around")
    parser.add_argument("--record-prompts", type=int, default=None, help="mixed.num_prompts (default: the recipe's)")
    parser.add_argument("--record-steps", type=int, default=None, help="mixed.steps (default: the recipe's)")
    parser.add_argument("--centre-each", action="store_true",
                        help="in context: every other budget of the sweep gets its own second round, centred at the plan "
                             "round one solves for it (dq.mixed.measure_around), instead of the --centre-budget numbers")
    parser.add_argument("--max-rounds", type=int, default=1,
                        help="with --centre-each: rounds per budget at most (stops when the plan solved around a centre "
                             "is that centre)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--out", default=str(RESULTS / "mixed.json"))
    parser.add_argument("--render", default=None, metavar="JSON", help="only render the table of an earlier run (and update BENCHMARKS.md)")
    args = parser.parse_args()
    if args.render:
        with open(args.render) as f:
            table = render(json.load(f))
        print(table)
        update_section("mixed", table)
        return
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("dq.mixed").setLevel(logging.INFO)
    torch.set_num_threads(args.threads)
    start_all = time.perf_counter()
    load_start = os.getloadavg()

    prompts = load_prompts("shapes_eval")[: args.num_prompts]
    calib = load_prompts("shapes_calib")[: args.calib_prompts]
    gen = dict(batch_size=args.batch_size, num_inference_steps=args.steps, progress=False)
    reference = generate_images(dq.open_pipeline(None), prompts, **gen)
    fp_bytes = module_bytes(find_denoiser(dq.open_pipeline(None))[1])

    def score(name: str, pipe, extra: dict) -> dict:
        t = time.perf_counter()
        images = generate_images(pipe, prompts, **gen)
        _, model = find_denoiser(pipe)
        row = {
            "variant": name, "psnr": float(psnr(images, reference)), "ssim": float(ssim(images, reference)),
            "weight_bytes": module_bytes(model), "avg_bits": average_bits(model), "generate_s": time.perf_counter() - t, **extra,
        }
        print(json.dumps(row), flush=True)
        with open(args.out + ".partial", "a") as f:  # a killed run keeps what it measured
            f.write(json.dumps(row) + "\n")
        return row

    # "auto" with a sample of every layer: estimated AND measured everywhere; the allocation
    # then uses the measurement. The built layers are kept: every variant below is installed
    # from them (dq.mixed.install_allocation: the layers dq.quantize builds, without
    # re-calibrating; tests/test_mixed.py checks they are identical).
    weights = [w for w in args.weights.split(",") if w]
    mixed_cfg = {"sensitivity": "auto", "sample": 10_000, "measure": args.measure, "rounds": args.rounds,
                 "weights": weights, "trajectory_prompts": args.trajectory_prompts}
    if args.record_prompts:
        mixed_cfg["num_prompts"] = args.record_prompts
    if args.record_steps:
        mixed_cfg["steps"] = args.record_steps
    # the literal numerics (every layer rounds its activations: no path float_input, which the w4a8
    # preset allows where faster and which depends on this machine's timings and the batch), as
    # the sensitivity pass measures them: the images then score the allocation, not the kernel choice
    base = dq.Recipe.from_dict({"base": "w4a8", "budget": args.centre_budget, "mixed": mixed_cfg,
                                "float_activations_where_faster": False})
    pipe = dq.open_pipeline(None)
    _, model = find_denoiser(pipe)
    t = time.perf_counter()
    sens = measure_sensitivity(pipe, model, base, calib, args.steps, {}, keep_built=True)
    sens_s = time.perf_counter() - t
    pairs = estimate_pairs(sens)
    rho = spearman([p[0] for p in pairs], [p[1] for p in pairs])
    sens.mode = "measure"
    for ls in sens.layers:
        for o in ls.options:
            if sens.method == "in-context":
                o.damage = o.measured if o.measured is not None else math.inf  # None: infeasible, not measured
            else:
                o.damage = o.measured if o.format != "float" else 0.0
    print(f"sensitivity in {sens_s:.0f} s ({json.dumps(sens.seconds)}); estimate vs measured Spearman over "
          f"{len(pairs)} (layer, option): {rho:.3f}", flush=True)

    def install(name: str, allocation: dict, extra: dict) -> dict:
        pipe = dq.open_pipeline(None)
        install_allocation(pipe, sens, dq.Recipe.from_dict({**base.to_dict(), "allocation": allocation}))
        return score(name, pipe, {**extra, "layers": {f: sum(v == f for v in allocation.values()) for f in (*weights, "float")}})

    # uniform baselines under the same recipe: the layers w4a8 quantizes, all int4 (= the w4a8
    # preset) or all int8 (w4a8's smoothing + GPTQ + static int8 activations, int8 weights)
    planned = {c.name for c in plan_layers(find_denoiser(dq.open_pipeline(None))[1], dq.Recipe.from_any("w4a8"))}
    rows = []
    uniform = [("int4", "uniform w4a8"), ("int8", "uniform w8a8 (w4a8 recipe, int8 weights)")]
    uniform += [(f, f"uniform {f} (w4a8 recipe, {f} weights)") for f in weights if f not in ("int4", "int8")]
    for fmt, label in uniform:
        allocation = {s.name: (fmt if s.name in planned else "float") for s in sens.layers}
        rows.append(install(label, allocation, {"kind": "uniform"}))

    budgets = [float(b) for b in args.budgets.split(",") if b]
    budgets.append(round(rows[0]["avg_bits"], 3))  # the same average bits as uniform w4a8
    plans = {}
    allocate_cpu = []
    per_budget = {}  # --centre-each: each budget's own rounds (seconds, rounds, whether the plan settled)
    for b in sorted(set(budgets)):
        budget = Budget("bits", b)
        try:
            sb = sens
            if args.centre_each and sens.round_one is not None:
                # the centre budget continues from its two rounds; every other budget starts its own
                # from the plan round one solves for it
                own = b != args.centre_budget
                sb = round_one(sens) if own else sens
                t, c, settled, rounds = time.perf_counter(), time.process_time(), False, 0
                for _ in range(args.max_rounds if own else args.max_rounds - 1):
                    if sb.centre is not None and allocate(sb, budget) == sb.centre:
                        settled = True  # the plan solved around the centre is the centre
                        break
                    rounds += 1
                    sb = measure_around(model, sb, base, budget)
                settled = settled or (sb.centre is not None and allocate(sb, budget) == sb.centre)
                per_budget[b] = {"rounds": rounds, "settled": settled, "wall": time.perf_counter() - t,
                                 "cpu": time.process_time() - c}
                print(f"budget {b}: {json.dumps(per_budget[b])}", flush=True)
            c = time.process_time()
            solved = allocate(sb, budget)
            allocate_cpu.append(time.process_time() - c)
            if sb.method == "in-context" and sb.calls is not None:
                measure_plan(model, sb, base, solved)  # one replay: the last solved plan, measured whole
            allocation = select_plan(sb, budget)  # what dq.quantize takes
        except dq.DQError as exc:
            print(f"budget {b}: {exc}", flush=True)
            rows.append({"variant": f"mixed {b:g} bits", "kind": "mixed", "budget": b, "error": str(exc)})
            continue
        plan = MixedPlan(allocation, sb, budget)
        plans[b] = plan
        errors = {json.dumps(p, sort_keys=True): e for p, e in sb.tried}
        rows.append(install(f"mixed {b:g} bits", allocation, {
            "kind": "mixed", "budget": b, "plan_avg_bits": plan.average_bits(), "predicted_error": plan.predicted_damage(),
            "measured_error": errors.get(json.dumps(allocation, sort_keys=True)),
            "selected": "solved" if allocation == solved else "an earlier measured plan",
        }))
        if allocation != solved:  # the last solved plan too, to see what the selection did
            other = MixedPlan(solved, sb, budget)
            rows.append(install(f"mixed {b:g} bits, last solved plan (not selected)", solved, {
                "kind": "mixed-unselected", "budget": b, "plan_avg_bits": other.average_bits(),
                "predicted_error": other.predicted_damage(), "measured_error": errors.get(json.dumps(solved, sort_keys=True)),
            }))
    for preset in [p for p in args.presets.split(",") if p]:  # the real presets, calibrated on their own
        pipe = dq.open_pipeline(None)
        t, c = time.perf_counter(), time.process_time()
        dq.quantize(pipe, preset, calib_prompts=calib, num_inference_steps=args.steps)
        rows.append(score(f"preset {preset}", pipe, {"kind": "preset", "quantize_s": time.perf_counter() - t,
                                                     "quantize_cpu": time.process_time() - c}))

    if 5.0 in plans:
        plot_allocation(plans[5.0].rows(), RESULTS / "mixed-5bits-layers.png")
        (RESULTS / "mixed-5bits-layers.txt").write_text(plans[5.0].table() + "\n")
    plot_sweep(rows, fp_bytes, RESULTS / "mixed-sweep.png")
    result = {
        "machine": machine(), "num_prompts": len(prompts), "calib_prompts": len(calib), "steps": args.steps,
        "sensitivity": {"mode": "measure", "method": sens.method, "rounds": base.mixed.rounds,
                        "centre_budget": args.centre_budget, "record_prompts": base.mixed.num_prompts,
                        "record_steps": base.mixed.steps, "seconds": sens_s,
                        "trajectory_prompts": base.mixed.trajectory_prompts, "phases": sens.seconds,
                        "calibration_passes": sens.calibration_passes,
                        "allocate_cpu_per_budget": allocate_cpu, "load_start": load_start, "load_end": os.getloadavg(),
                        "spearman_estimate_vs_measured": rho, "pairs": len(pairs),
                        "round_one": sens.round_one, "centre": sens.centre, "baseline": sens.baseline,
                        "threads": args.threads, "centre_each": args.centre_each, "max_rounds": args.max_rounds,
                        "per_budget": {str(k): v for k, v in per_budget.items()}},
        "fp_bytes": fp_bytes, "rows": rows, "total_s": time.perf_counter() - start_all, "formats": weights,
    }
    RESULTS.mkdir(exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    table = render(result)
    print(table)
    if args.num_prompts >= 16:
        update_section("mixed", table)


def round_one(sens):
    """A copy of an in-context sensitivity holding its first round's numbers (centred at every
    layer in the lowest format), to centre another budget's second round on."""
    one = copy.copy(sens)
    one.layers = [LayerSensitivity(s.name, s.weights, [
        LayerOption(o.format, o.bytes, measured=sens.round_one[s.name][o.format], estimated=o.estimated,
                    damage=sens.round_one[s.name][o.format] if sens.round_one[s.name][o.format] is not None else math.inf)
        for o in s.options]) for s in sens.layers]
    one.centre, one.round_one = None, None
    one.baseline = sens.round_one[sens.layers[0].name][sens.low]
    one.tried = list(sens.tried[:1])  # the first round's centre (every layer at the lowest format)
    return one


def plot_sweep(rows: list[dict], fp_bytes: int, path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no sweep plot")
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("psnr", "ssim")):
        mixed = sorted((r for r in rows if r.get("kind") == "mixed" and "psnr" in r), key=lambda r: r["weight_bytes"])
        ax.plot([r["weight_bytes"] / 2**20 for r in mixed], [r[metric] for r in mixed], "o-", label="dq mixed (budget sweep)")
        for r in mixed:
            ax.annotate(f"{r['budget']:g}b", (r["weight_bytes"] / 2**20, r[metric]), fontsize=7)
        for r in rows:
            if r.get("kind") in ("uniform", "preset"):
                ax.plot(r["weight_bytes"] / 2**20, r[metric], "s", label=r["variant"])
        ax.set_xlabel("denoiser MiB")
        ax.set_ylabel(f"{metric.upper()} vs full precision")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def render(result: dict) -> str:
    m = result["machine"]
    s = result["sensitivity"]
    rows = result["rows"]
    by = {r["variant"]: r for r in rows}
    formats = result.get("formats", ["int4", "int8"])
    lines = [
        "## Mixed precision (`python benchmarks/mixed.py`)",
        "",
        f"Embedded default pipeline, {result['num_prompts']} evaluation prompts (calib/shapes_eval.txt), "
        f"{result['calib_prompts']} calibration prompts, {result['steps']} steps; {m['cpu']}, {m['cores']} cores, "
        f"torch {m['torch']}, {m['date']}. PSNR/SSIM against the full-precision images of the same seeds. Mixed: "
        "base recipe w4a8 (smoothing, GPTQ, static int8 activations, fixed for every layer), each layer "
        + ", ".join(formats) + " or float (int4: groups of 64; int5, int6: per channel, packed in bit planes; int8: "
        "per channel), chosen by the integer program on measured sensitivity "
        f"({s.get('method', 'alone')}"
        + ((f", {s['rounds']} rounds, the second around the {s['centre_budget']:g}-bit plan"
            + (f" (every other budget: its own rounds, at most {s.get('max_rounds', 1)}, centred at the plan round one "
               "solves for it)" if s.get("centre_each") else ""))
           if s.get("method") == "in-context" else "")
        + (f": each layer alone in int4, final latents of {s.get('trajectory_prompts')} calibration prompts sampled "
           f"closed loop with {result['steps']} steps, other formats scaled by the layer's own output-error ratio"
           if s.get("method") == "trajectory" else "")
        + f"; {s['record_prompts']} prompts x {s['record_steps']} steps of recorded denoiser calls; "
        f"{s['seconds']:.0f} s). Average bits: 8 x stored bytes (codes, scales, zero points, smoothing "
        "scales, activation ranges) / weights, over every Linear/Conv2d, float layers at 32 bits. "
        f"Analytic estimate vs measurement, Spearman over all {s['pairs']} (layer, format) pairs: "
        f"{s['spearman_estimate_vs_measured']:.3f}.",
        "",
        f"| variant | avg weight bits | {' / '.join(formats)} / float layers | denoiser MiB | PSNR dB | SSIM |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | refused: {r['error'][:80]}... | | | | |")
            continue
        layers = r.get("layers")
        counts = " / ".join(str(layers.get(f, 0)) for f in (*formats, "float")) if layers else "uniform"
        lines.append(f"| {r['variant']} | {r['avg_bits']:.3f} | {counts} | {r['weight_bytes'] / 2**20:.3f} | {r['psnr']:.2f} | {r['ssim']:.4f} |")
    lo, hi = by.get("uniform w4a8"), by.get("uniform w8a8 (w4a8 recipe, int8 weights)")
    same = f"mixed {round(lo['avg_bits'], 3):g} bits" if lo else None
    if lo and hi:
        lines.append("")
        for label, target in (("5 bits", by.get("mixed 5 bits")), (f"{round(lo['avg_bits'], 3):g} bits (uniform w4a8's)", by.get(same))):
            if not target or "psnr" not in target:
                continue
            for metric in ("psnr", "ssim"):
                gap = hi[metric] - lo[metric]
                got = (target[metric] - lo[metric]) / gap if gap else float("nan")
                verdict = "met" if got >= 0.75 else "MISSED"
                lines.append(
                    f"- mixed at {label} recovers {100 * got:.0f}% of the {metric.upper()} gap between uniform w4a8 "
                    f"({lo[metric]:.4g}) and uniform int8 ({hi[metric]:.4g}): target 75%, {verdict}."
                )
    ph = s.get("phases") or {}
    if "calibration_cpu" in ph:
        sens_cpu = ph.get("record_cpu", 0) + ph.get("measure_cpu", 0) + ph.get("allocate_cpu", 0)
        alloc_cpu = sum(s.get("allocate_cpu_per_budget") or [0]) / max(1, len(s.get("allocate_cpu_per_budget") or [0]))
        builds = len(formats)
        lines.append(
            f"- time (process CPU, {s.get('threads', 2)} thread(s)): sensitivity {sens_cpu:.0f} s (record {ph.get('record_cpu', 0):.0f} s, "
            f"measure {ph.get('measure_cpu', 0):.0f} s, re-centring solves {ph.get('allocate_cpu', 0):.2f} s) + allocation "
            f"{alloc_cpu:.2f} s per budget, against the calibration it reuses: {ph['calibration_cpu']:.0f} s for the "
            f"{builds} format builds ({ph['calibration_cpu'] / builds:.0f} s each"
            + (f"; {s['calibration_passes']} pipeline passes over the calibration prompts" if s.get("calibration_passes") else "")
            + f"); wall {ph.get('record_wall', 0) + ph.get('measure_wall', 0):.0f} s "
            f"vs {ph['calibration_wall']:.0f} s. Target (sensitivity + allocation below the calibration): "
            + ("met" if sens_cpu + alloc_cpu < ph["calibration_cpu"] else "MISSED")
            + f" against all {builds} builds, " + ("met" if sens_cpu + alloc_cpu < ph["calibration_cpu"] / builds else "MISSED")
            + " against one build. Load average at start/end: "
            + f"{'/'.join(f'{v:.1f}' for v in s.get('load_start', []))} / {'/'.join(f'{v:.1f}' for v in s.get('load_end', []))}."
        )
    lines.append(f"\nTotal run {result['total_s'] / 60:.1f} min. Plots: benchmarks/results/mixed-sweep.png, mixed-5bits-layers.png.")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
