"""Calibration cost: time and peak memory of the full W4A4 recipe (smoothing search, GPTQ, static
activation ranges: two calibration passes) against prompts x steps, against model size, and on
one process against two. Random-weight PixArt transformers (dq.testing.tiny's pipeline with the
denoiser swapped for a wider or deeper one), so nothing is downloaded.

Every measurement runs in a fresh subprocess with one torch thread and reads its own clock and
peak resident set size (ru_maxrss), so the numbers include everything the process held. Memory:
"overhead" is the calibration run's peak minus the peak of a plain full-precision run of the
same prompts in another process (activations are in both, so the difference is what calibrating
adds: statistics, second moments, the prepared layers).

    python benchmarks/calib.py work      # time against prompts x steps
    python benchmarks/calib.py size      # time and memory against width and depth
    python benchmarks/calib.py procs     # one process of one thread against two
    python benchmarks/calib.py all       # the three, then results/calib.json
    python benchmarks/calib.py flux      # FLUX.1-dev W4A4 on one H100, projected (nothing
                                         # downloaded: its config on the meta device, a tiny FLUX
                                         # for which inputs are shared, the measured CPU rate)

    python benchmarks/calib.py size --moments-budget largest --sizes 2x2,4x2,4x4
                                         # second moments under DQ_MOMENTS_BUDGET (one layer's
                                         # at a time); results/calib-size-budget-largest.json

The results go to benchmarks/results/calib-<what>.json; see BENCHMARKS.md for the numbers and
the FLUX.1 projection made from them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
RECIPE = "w4a4"
SIZES = ((2, 2), (4, 2), (8, 2), (16, 2), (4, 4), (4, 8))  # (heads of 64, blocks)


# ------------------------------------------------------------------ one measurement (a child)


def build(width_heads: int, depth: int):
    """The tiny PixArt pipeline with a random-weight transformer of `width_heads` heads of 64
    (hidden width 64*heads, MLP 4x) and `depth` blocks."""
    import torch
    from diffusers import PixArtTransformer2DModel

    from dq.testing.tiny import LATENT_CHANNELS, T5_DIM, tiny_pipeline

    pipe = tiny_pipeline("pixart", seed=0)
    torch.manual_seed(0)
    pipe.transformer = PixArtTransformer2DModel(
        sample_size=16, patch_size=2, in_channels=LATENT_CHANNELS, out_channels=2 * LATENT_CHANNELS,
        num_layers=depth, num_attention_heads=width_heads, attention_head_dim=64,
        cross_attention_dim=width_heads * 64, caption_channels=T5_DIM,
    ).eval()
    return pipe


def child(mode: str, heads: int, depth: int, prompts: int, steps: int, recipe_name: str = RECIPE) -> dict:
    import torch

    import dq
    from dq import engine
    from dq.calibrate import distributed
    from dq.calibrate.run import run_pipeline
    from dq.testing.tiny import default_call_kwargs, prompts_for

    torch.set_num_threads(1)
    distributed.setup(cpu=True)
    pipe = build(heads, depth)
    weights = sum(p.numel() * p.element_size() for p in pipe.transformer.parameters())
    largest = max((m.weight.numel() * m.weight.element_size(), n) for n, m in pipe.transformer.named_modules()
                  if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)))
    kwargs = {k: v for k, v in default_call_kwargs("pixart").items() if k not in ("num_inference_steps", "output_type")}
    plist = prompts_for("pixart", prompts)
    stats_bytes, timing = [], {"passes_s": 0.0, "passes_cpu_s": 0.0, "prepare_s": 0.0, "prepare_cpu_s": 0.0}
    calibrate, calibrate_pipeline = engine.calibrate, engine.calibrate_pipeline

    def timed(fn, key, record=None):
        def wrapper(*args, **kw):
            wall, cpu = time.perf_counter(), time.process_time()
            out = fn(*args, **kw)
            timing[f"{key}_s"] += time.perf_counter() - wall
            timing[f"{key}_cpu_s"] += time.process_time() - cpu
            if record is not None:
                record(out)
            return out
        return wrapper

    # the calibration passes (hooks, merge) and everything up to the layers' preparation (GPTQ,
    # smoothing search); the rest of dq.quantize (building the layers, kernel choice) is apart
    engine.calibrate = timed(calibrate, "passes", lambda store: stats_bytes.append(store.nbytes()))
    engine.calibrate_pipeline = timed(calibrate_pipeline, "prepare")  # passes + preparing the layers
    after_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    # the ranks finish importing at different times: start every clock together, so the first
    # collective does not bill one rank for the other's start-up
    distributed.barrier("the start of the measurement")
    start, cpu_start = time.perf_counter(), time.process_time()
    if mode == "fp":
        run_pipeline(pipe, plist, num_inference_steps=steps, batch_size=4, seed=0, call_kwargs=kwargs, desc="full precision")
        timing = {"passes_s": time.perf_counter() - start, "passes_cpu_s": time.process_time() - cpu_start}
    else:
        # simulated execution: the kernel choice (measured once per machine) is no part of calibration
        recipe = dq.Recipe.from_dict({**dq.Recipe.from_any(recipe_name).to_dict(), "execution": "sim"})
        dq.quantize(pipe, recipe, calib_prompts=plist, num_inference_steps=steps, **kwargs)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    return {
        "mode": mode, "heads": heads, "width": heads * 64, "depth": depth, "prompts": prompts, "steps": steps,
        "rank": distributed.rank(), "processes": distributed.world_size(),
        "seconds": seconds, "cpu_seconds": cpu_seconds, **timing, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "after_load_rss_mb": after_load / 2**20, "weights_mb": weights / 2**20,
        "largest_layer": largest[1], "largest_layer_mb": largest[0] / 2**20,
        "stats_mb_per_pass": [b / 2**20 for b in stats_bytes],
    }


# ------------------------------------------------------------------ the sweeps (the parent)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


MOMENTS_BUDGET: str | None = None  # --moments-budget: DQ_MOMENTS_BUDGET of the calibrating children


def run(mode: str, heads: int, depth: int, prompts: int, steps: int, processes: int = 1, recipe: str = RECIPE) -> list[dict]:
    """One measurement in `processes` fresh processes (gloo on CPU for 2); each row per rank."""
    base = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "DQ_DIST_TIMEOUT": "1800"}
    base.pop("DQ_MOMENTS_BUDGET", None)
    if MOMENTS_BUDGET and mode != "fp":
        base["DQ_MOMENTS_BUDGET"] = MOMENTS_BUDGET
    port = _free_port()
    procs = []
    for r in range(processes):
        env = dict(base)
        if processes > 1:
            env.update(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(processes), LOCAL_WORLD_SIZE=str(processes),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        cmd = [sys.executable, __file__, "child", "--mode", mode, "--heads", str(heads), "--depth", str(depth),
               "--prompts", str(prompts), "--steps", str(steps), "--recipe", recipe]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    rows = []
    for proc in procs:
        out, err = proc.communicate()
        if proc.returncode:
            raise SystemExit(f"child failed ({proc.returncode}):\n{err[-3000:]}")
        rows.append(json.loads(out.strip().splitlines()[-1]))
    return rows


def fit_linear(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares y = a + b x."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / max(sum((x - mx) ** 2 for x in xs), 1e-12)
    return my - b * mx, b


def sweep_work(heads: int, depth: int) -> dict:
    """Calibration (passes + preparing the layers) against prompts x steps, with a plain run of
    the same prompts beside it. Fits use CPU seconds (one thread: wall time on a quiet machine)."""
    rows = []
    for prompts in (2, 4):
        for steps in (2, 4):
            cal = run("calibrate", heads, depth, prompts, steps)[0]
            fp = run("fp", heads, depth, prompts, steps)[0]
            rows.append({"prompts": prompts, "steps": steps,
                         "passes_cpu_s": cal["passes_cpu_s"], "calibrate_cpu_s": cal["prepare_cpu_s"], "fp_cpu_s": fp["passes_cpu_s"],
                         "calibrate_wall_s": cal["prepare_s"], "fp_wall_s": fp["passes_s"]})
            print(json.dumps(rows[-1]), flush=True)
    work = [r["prompts"] * r["steps"] for r in rows]
    a, b = fit_linear(work, [r["calibrate_cpu_s"] for r in rows])
    pa, pb = fit_linear(work, [r["passes_cpu_s"] for r in rows])
    fa, fb = fit_linear(work, [r["fp_cpu_s"] for r in rows])
    return {"heads": heads, "depth": depth, "rows": rows,
            "fit_calibrate_cpu_s": {"fixed": a, "per_prompt_step": b},
            "fit_passes_cpu_s": {"fixed": pa, "per_prompt_step": pb},
            "fit_fp_cpu_s": {"fixed": fa, "per_prompt_step": fb},
            "passes_per_prompt_step_over_fp": pb / fb}


def sweep_size(prompts: int, steps: int, sizes=SIZES) -> dict:
    """Time and peak memory against width (heads of 64) and depth."""
    rows = []
    for heads, depth in sizes:
        cal = run("calibrate", heads, depth, prompts, steps)[0]
        fp = run("fp", heads, depth, prompts, steps)[0]
        rows.append({
            "width": cal["width"], "depth": depth, "weights_mb": cal["weights_mb"],
            "largest_layer": cal["largest_layer"], "largest_layer_mb": cal["largest_layer_mb"],
            "passes_cpu_s": cal["passes_cpu_s"], "calibrate_cpu_s": cal["prepare_cpu_s"], "fp_cpu_s": fp["passes_cpu_s"],
            "calibrate_peak_mb": cal["peak_rss_mb"], "fp_peak_mb": fp["peak_rss_mb"],
            "overhead_mb": cal["peak_rss_mb"] - fp["peak_rss_mb"], "stats_mb_per_pass": cal["stats_mb_per_pass"],
            "moments_budget": MOMENTS_BUDGET, "loadavg": os.getloadavg(),
        })
        print(json.dumps(rows[-1]), flush=True)
    return {"prompts": prompts, "steps": steps, "rows": rows}


def sweep_procs(heads: int, depth: int, prompts: int, steps: int, repeats: int, recipe: str) -> dict:
    """Calibration (passes + merge + preparing) on one process of one thread, then on two."""
    rows = []
    for _ in range(repeats):
        one = run("calibrate", heads, depth, prompts, steps, processes=1, recipe=recipe)[0]
        two = run("calibrate", heads, depth, prompts, steps, processes=2, recipe=recipe)
        rows.append({
            "one_process_wall_s": one["prepare_s"], "two_processes_wall_s": max(r["prepare_s"] for r in two),
            "one_process_passes_wall_s": one["passes_s"], "two_processes_passes_wall_s": max(r["passes_s"] for r in two),
            "one_process_cpu_s": one["prepare_cpu_s"], "two_processes_cpu_s_per_rank": [r["prepare_cpu_s"] for r in two],
            "loadavg": os.getloadavg(), "split_prepare": os.environ.get("DQ_SPLIT_PREPARE", "1") != "0",
        })
        rows[-1]["speedup_wall"] = rows[-1]["one_process_wall_s"] / rows[-1]["two_processes_wall_s"]
        rows[-1]["speedup_passes_wall"] = rows[-1]["one_process_passes_wall_s"] / rows[-1]["two_processes_passes_wall_s"]
        print(json.dumps(rows[-1]), flush=True)
    return {"recipe": recipe, "heads": heads, "depth": depth, "prompts": prompts, "steps": steps, "threads_per_process": 1, "rows": rows}


# ------------------------------------------------------------------ FLUX.1 projection

FLUX_TOKENS = {"image": 4096, "text": 512}  # 1024x1024: 64x64 packed latent patches; T5 at 512
FLUX_IMAGE_STEPS = 16 * 20  # the family default: 16 prompts x 20 steps, one branch (guidance-distilled)
# NVIDIA H100 SXM dense peaks (datasheet), FLOP/s; the measuring core's float32 peak is
# `core_fp32_peak` below. Projections assume 50 % of peak on both.
H100_PEAK = {"bf16": 989e12, "tf32": 494.7e12, "fp32": 66.9e12}


def core_fp32_peak(machine: dict) -> tuple[float, str]:
    """One core's float32 peak (FLOP/s) of the machine a calib-size.json row was measured on:
    FMA pipes x lanes x 2 x clock. Intel with AVX-512: 2 x 16 (Xeon Scalable); AMD family 25
    (Zen 3/4: Zen 4 runs AVX-512 on two 256-bit pipes) and other AVX2 CPUs: 2 x 8."""
    mhz = machine.get("cpu_mhz") or 2800.0  # results from before the clock was recorded: the 2.80 GHz Xeon
    vendor = machine.get("vendor") or "GenuineIntel"
    wide = vendor == "GenuineIntel" and machine.get("avx512f", True)
    per_cycle = 2 * (16 if wide else 8) * 2
    return per_cycle * mhz * 1e6, f"{per_cycle} FLOP/cycle x {mhz:.0f} MHz ({vendor}{', AVX-512' if wide else ''})"
EFFICIENCY = 0.5


def _role(name: str) -> str:
    """A layer name with its block numbers replaced by N: the same in the tiny and full FLUX."""
    return re.sub(r"\.\d+\.", ".N.", name)


def flux_roles() -> dict:
    """Run the tiny FLUX pipeline (FLUX.1's layer names, tiny widths) once under the W4A4 plan's
    moment hooks: which layers share one second moment, and which token stream each layer
    reads (image, text, both or one row per image). Keyed by role: the name with block numbers
    replaced by N, the same in FLUX.1-dev."""
    import torch

    from dq.calibrate.hooks import Calibrator, CalibTarget
    from dq.engine import plan_model
    from dq.recipe import preset
    from dq.testing.tiny import default_call_kwargs, prompts_for, tiny_pipeline

    pipe = tiny_pipeline("flux", seed=0)
    model = pipe.transformer
    plan, _ = plan_model(model, preset(RECIPE))
    modules = dict(model.named_modules())
    rows, streams = {}, {}
    model.register_forward_pre_hook(
        lambda m, a, k: streams.update(image=k["hidden_states"].shape[1], text=k["encoder_hidden_states"].shape[1]) and None,
        with_kwargs=True)
    def count_rows(name):
        def hook(module, args):  # rows per image (returns None: the input stays as it is)
            rows.setdefault(name, args[0].numel() // args[0].shape[0] // module.weight.shape[1])
        return hook

    for c in plan:
        modules[c.name].register_forward_pre_hook(count_rows(c.name))
    targets = [CalibTarget(c.name, modules[c.name], histogram=False, second_moment=True) for c in plan]
    kwargs = {**default_call_kwargs("flux"), "num_inference_steps": 1}
    with torch.no_grad(), Calibrator(pipe, model, targets, None) as cal:
        pipe(prompt=prompts_for("flux", 1), **kwargs)
    kind = {streams["image"]: "image", streams["text"]: "text", streams["image"] + streams["text"]: "both", 1: "one"}
    return {_role(c.name): {"stream": kind.get(rows[c.name], f"rows={rows[c.name]}"),
                            "shares_with": _role(cal.store.shared[c.name]) if c.name in cal.store.shared else None}
            for c in plan}


def prepare_rate() -> dict:
    """CPU seconds of layer preparation (GPTQ, smoothing search) per unit of sum D^2 (D + out)
    (`dq.model.prepare_cost`), from the widest row of results/calib-size.json."""
    from dq.engine import plan_model
    from dq.model import prepare_cost
    from dq.recipe import preset

    data = json.loads((RESULTS / "calib-size.json").read_text())
    row = max(data["rows"], key=lambda r: (r["width"], r["depth"]))
    model = build(row["width"] // 64, row["depth"]).transformer
    _, works = plan_model(model, preset(RECIPE))
    cost = sum(prepare_cost(w) for w in works.values())
    seconds = row["calibrate_cpu_s"] - row["passes_cpu_s"]
    return {"cpu_s_per_unit": seconds / cost, "machine": data["machine"], "from": f"calib-size.json, width {row['width']} x {row['depth']} blocks, "
            f"{seconds:.1f} CPU s of preparation ({data['machine']['cpu']}, {data['machine']['date']})"}


def project_flux() -> dict:
    """FLUX.1-dev under W4A4 on one H100 (and on 8, the preparation split), from FLOP counts."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    from dq.engine import plan_model
    from dq.model import prepare_cost
    from dq.recipe import preset

    roles = flux_roles()
    with init_empty_weights():
        model = FluxTransformer2DModel(guidance_embeds=True)  # diffusers' defaults are FLUX.1's sizes
    plan, works = plan_model(model, preset(RECIPE))
    modules = dict(model.named_modules())
    tokens = {"image": FLUX_TOKENS["image"], "text": FLUX_TOKENS["text"], "both": sum(FLUX_TOKENS.values()), "one": 1}
    linear = moments = moments_unshared = 0.0
    moment_bytes = moment_bytes_unshared = 0
    for c in plan:
        info = roles[_role(c.name)]
        weight = modules[c.name].weight
        n, d = tokens[info["stream"]], weight.shape[1]
        linear += n * d * weight.shape[0]
        moments_unshared += n * d * d
        moment_bytes_unshared += 4 * d * d
        if info["shares_with"] is None:
            moments += n * d * d
            moment_bytes += 4 * d * d
    cfg = model.config
    inner = cfg.num_attention_heads * cfg.attention_head_dim
    attention = 2 * tokens["both"] ** 2 * inner * (cfg.num_layers + cfg.num_single_layers)  # QK^T and PV, MACs
    rate = prepare_rate()
    core_peak, core_note = core_fp32_peak(rate.pop("machine"))
    prep_units = sum(prepare_cost(w) for w in works.values())
    prep_cpu_s = rate["cpu_s_per_unit"] * prep_units
    gpu_over_core = H100_PEAK["fp32"] / core_peak
    seconds = lambda macs, peak: 2 * macs * FLUX_IMAGE_STEPS / (EFFICIENCY * H100_PEAK[peak])  # noqa: E731
    forward = 2 * seconds(linear + attention, "bf16")  # two passes: statistics, then ranges
    out = {
        "model": "FLUX.1-dev config (diffusers FluxTransformer2DModel defaults, guidance_embeds=True), meta device",
        "parameters_b": sum(p.numel() for p in model.parameters()) / 1e9,
        "layers_planned": len(plan), "image_steps": FLUX_IMAGE_STEPS, "tokens": FLUX_TOKENS,
        "macs_per_image_step": {"linear": linear, "attention": attention, "moments": moments, "moments_unshared": moments_unshared},
        "moment_gb": {"shared": moment_bytes / 1e9, "unshared": moment_bytes_unshared / 1e9},
        "distinct_inputs": sum(1 for c in plan if roles[_role(c.name)]["shares_with"] is None),
        "prepare": {**rate, "units": prep_units, "cpu_s_this_core": prep_cpu_s, "h100_over_core_fp32": gpu_over_core,
                    "core_fp32_peak": core_note},
        "assumptions": f"{EFFICIENCY:.0%} of H100 SXM dense peak (bf16 forward, fp32 or tf32 moments, fp32 preparation "
                       "at this core's measured rate x the peak ratio); moments in host memory when they do not fit (transfer not counted)",
        "seconds_one_h100": {
            "forward_two_passes_bf16": forward,
            "moments_fp32": seconds(moments, "fp32"), "moments_tf32": seconds(moments, "tf32"),
            "moments_fp32_unshared": seconds(moments_unshared, "fp32"),
            "prepare_fp32": prep_cpu_s / gpu_over_core,
        },
    }
    s1 = out["seconds_one_h100"]
    out["total_minutes"] = {
        "one_h100_fp32_moments": (s1["forward_two_passes_bf16"] + s1["moments_fp32"] + s1["prepare_fp32"]) / 60,
        "one_h100_tf32_moments": (s1["forward_two_passes_bf16"] + s1["moments_tf32"] + s1["prepare_fp32"]) / 60,
        # prompts split over 8 processes (passes and moments / 8), each preparing a share
        "eight_h100_tf32_moments_split_prepare": (s1["forward_two_passes_bf16"] + s1["moments_tf32"] + s1["prepare_fp32"]) / 8 / 60,
    }
    return out


def machine_note() -> dict:
    """The machine of a results file: dq's kernel-cache identity of the CPU (`choice.machine`), plus
    the clock and AVX-512 that `core_fp32_peak` reads."""
    from dq.kernels import choice

    info = choice.machine()
    mhz = choice.cpuinfo().get("cpu MHz")
    return {"cpu": info["cpu"], "vendor": info["vendor"], "family_model_stepping": info["family_model_stepping"],
            "isa": info["isa"], "cpu_mhz": float(mhz) if mhz else None, "avx512f": "avx512f" in info["isa"],
            "cores": os.cpu_count(), "loadavg_at_start": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("work", "size", "procs", "all", "child", "flux"))
    parser.add_argument("--mode", default="calibrate", help=argparse.SUPPRESS)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--recipe", default=None, help=f"recipe (default: {RECIPE}; procs: w8a8-rtn, whose cost is the passes)")
    parser.add_argument("--moments-budget", default=None, help="DQ_MOMENTS_BUDGET for the calibrating runs (e.g. largest, 64MiB)")
    default_sizes = ",".join(f"{h}x{d}" for h, d in SIZES)
    parser.add_argument("--sizes", default=None, help=f"size sweep: HEADSxBLOCKS,... (default: {default_sizes})")
    args = parser.parse_args()
    global MOMENTS_BUDGET
    MOMENTS_BUDGET = args.moments_budget
    sizes = tuple(tuple(int(v) for v in item.split("x")) for item in args.sizes.split(",")) if args.sizes else SIZES
    if args.what == "child":
        print(json.dumps(child(args.mode, args.heads, args.depth, args.prompts, args.steps, args.recipe or RECIPE)))
        return
    RESULTS.mkdir(exist_ok=True)
    if args.what == "flux":
        result = {"machine": machine_note(), **project_flux()}
        (RESULTS / "calib-flux-projection.json").write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
        return
    for what in ("work", "size", "procs") if args.what == "all" else (args.what,):
        note = machine_note()
        if what == "work":
            result = sweep_work(args.heads, args.depth)
        elif what == "size":
            result = sweep_size(args.prompts, args.steps, sizes)
        else:
            result = sweep_procs(args.heads, args.depth, args.prompts, args.steps, args.repeats, args.recipe or "w8a8-rtn")
        result = {"recipe": RECIPE, "machine": note, "loadavg_at_end": os.getloadavg(), **result}
        suffix = f"-budget-{MOMENTS_BUDGET}" if MOMENTS_BUDGET and what == "size" else ""
        if what == "procs" and args.recipe and args.recipe != "w8a8-rtn":
            suffix = f"-{args.recipe}" + ("-unsplit" if os.environ.get("DQ_SPLIT_PREPARE") == "0" else "")
        (RESULTS / f"calib-{what}{suffix}.json").write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
