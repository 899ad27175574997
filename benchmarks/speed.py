"""Speed and memory of dq's real low-bit execution, against full precision and torchao.

Everything runs in ONE process, variants interleaved round by round, so that the ratios
hold on a noisy shared machine (absolute times do not). Eager is compared with eager and
torch.compile with torch.compile.

CPU part:
  (a) the embedded default pipeline (`dq.open_pipeline(None)`; skipped with a note when it
      is absent): one denoiser step and a whole pipeline call;
  (b) a random-weight PixArt-Sigma-shaped transformer slice (hidden 1152, 16 heads x 72,
      `--blocks` blocks, 300 text tokens of width 1152) at 256 and 1024 image tokens, batch 2
      (classifier-free guidance): one denoiser step. Each preset runs as it ships: its
      smoothing as an input transform, its low-rank branch (w4a4: rank 32), its attention
      option (`--bare`: formats only, as measured before 2026-12-01). "w4a16-a8" is w4a16
      with `weight_only_int8_activations` (kernel path int_mm_a8 allowed);
      "w8a8+attn-int8" is w8a8 with real int8 attention; "w4a16-fp32-act" is w4a16 without
      its bfloat16 path (as before 2026-12-02), "w8a8-fp32-wo" w8a8 whose weight-only layers
      may not run in bfloat16 (as before 2026-12-02 08:30 UTC);
  (c) the attention core alone: float SDPA against dq's int8 attention
      (`dq.nn.attention.int8_attention`), eager and compiled, at the slice's token counts.
  Memory: bytes of the quantized modules (dq storage + runtime copies), a 4-bit
  PixArt-Sigma-size transformer (28 blocks, rank-32 low-rank branch) counted on the meta
  device, and the peak RSS of a fresh process that holds a slice and runs a step.
GPU part (`benchmarks/speed_gpu.py`; skipped without CUDA): bf16 vs fp8 vs int8 on full-size
random-weight FLUX.1, PixArt-Sigma and SDXL denoisers at 1024x1024.

    python benchmarks/speed.py            # the full run (tens of minutes on a 2-core CPU)
    python benchmarks/speed.py --quick    # smoke test: tiny shapes, one round, w8a8 and w4a8
    # issue 11's CPU targets (slice at 256 and 1024 tokens, one thread, attention core):
    python benchmarks/speed.py --threads 1 --skip default memory gpu

Writes benchmarks/results/speed-<date>-<machine>.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import logging
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dq  # noqa: E402
from dq.engine import find_denoiser, plan_layers, swap_modules  # noqa: E402
from dq.errors import DQError  # noqa: E402
from dq.kernels import choice, path_counts, set_execution  # noqa: E402
from dq.kernels.dispatch import runtime_nbytes  # noqa: E402
from dq.logs import quiet_third_party  # noqa: E402
from dq.nn import QuantLinear, TimestepRouter  # noqa: E402
from dq.nn.router import attach_router  # noqa: E402
from dq.quant.packing import weight_nbytes  # noqa: E402
from dq.recipe import Recipe, preset  # noqa: E402

logger = logging.getLogger("benchmarks.speed")
RESULTS = Path(__file__).resolve().parent / "results"
CPU_RECIPES = ("w8a8", "w8a8-all-static", "w8a8-dynamic", "w4a8", "w4a16", "w4a16-a8", "w4a4", "w8a8+attn-int8",
               "w8a8-dynamic-int-only", "w4a4-int-only", "w8a8+qkv-dyn", "w8a8+qkv+ff2-dyn", "w4a16-fp32-act",
               "w8a8-fp32-wo", "w8a8+float-act", "w4a8+float-act", "w8a8-fp32-attn", "w4a4-fp32-attn")
# per-token dynamic 8-bit activations (the overrides of the dynamic-inputs variants below)
_DYN8 = {"bits": 8, "granularity": "token", "symmetric": False, "dynamic": True}
# variants that are a preset plus one option
DERIVED = {
    "w4a16-a8": {"base": "w4a16", "weight_only_int8_activations": True},
    # w4a16 as before 2026-12-02: weight-only layers in float32 only (no path bf16)
    "w4a16-fp32-act": {"base": "w4a16", "weight_only_bf16_activations": False},
    # w8a8 as before 2026-12-02 (08:30 UTC): its weight-only layers (PixArt's caption projection)
    # in float32 only, no path bf16
    "w8a8-fp32-wo": {"base": "w8a8", "weight_only_bf16_activations": False},
    # the two presets as before 2026-12-02 (13:30 UTC): every layer rounds its activations (no
    # path float_input, which they now allow where no integer path pays)
    "w8a8-dynamic-int-only": {"base": "w8a8-dynamic", "float_activations_where_faster": False},
    "w4a4-int-only": {"base": "w4a4", "float_activations_where_faster": False},
    # the static presets with path float_input allowed where no integer path pays
    "w8a8+float-act": {"base": "w8a8", "float_activations_where_faster": True},
    "w4a8+float-act": {"base": "w4a8", "float_activations_where_faster": True},
    # issue 11 item 4 candidate: self-attention q/k/v inputs with dynamic per-token ranges
    "w8a8+qkv-dyn": {"base": "w8a8", "overrides": [{"pattern": r"\.attn1\.to_[qkv]$", "activation": _DYN8}]},
    "w8a8+qkv+ff2-dyn": {"base": "w8a8", "overrides": [{"pattern": r"\.attn1\.to_[qkv]$|\.ff\.net\.2$", "activation": _DYN8}]},
    "w8a8+attn-int8": {"base": "w8a8", "attention": {"int8": True}},
    # the presets as before 2026-12-03: the attention core in float32 only (no bfloat16 SDPA)
    "w8a8-fp32-attn": {"base": "w8a8", "attention_bf16_where_faster": False},
    "w4a4-fp32-attn": {"base": "w4a4", "attention_bf16_where_faster": False},
    # w8a8 with every layer static (before 2026-12-01): no architecture dynamic_inputs rule
    "w8a8-all-static": {"base": "w8a8", "overrides": [{"pattern": r"attn2\.to_out\.0$|attn1\.to_[qkv]$|ff\.net\.2$", "activation": {
        "bits": 8, "granularity": "tensor", "symmetric": False, "range": "mse"}}]},
}
# issue 11's CPU targets: compiled speed-up over fp32 on the slice at 256 tokens, one thread
TARGETS_256 = {"dq-w4a8": 2.5, "dq-w4a4": 2.5, "dq-w4a16": 1.0, "dq-w4a16-a8": 1.0}


def recipe_named(name: str) -> Recipe:
    if name in DERIVED:
        return Recipe.from_dict({**DERIVED[name], "name": name})
    return preset(name)
GPU_RECIPES = ("fp8", "w8a8")
CALIB_TIMESTEPS = (999, 800, 600, 400, 200, 1)


# -- quantizing a bare denoiser (no pipeline to calibrate with) -------------------------
def speed_recipe(recipe: Recipe, bare: bool = False) -> Recipe:
    """`recipe` with its value searches at their cheapest: smoothing at a fixed alpha of 0.5
    instead of the per-layer search, no GPTQ. Both choose values (smoothing scales, rounding),
    not the layers' structure, storage or kernel paths, so a step runs as the preset's does.
    With the searches, `dq.calibrate` took 74 s (w8a8) to 295 s (w4a4: the alpha search refits
    the rank-32 branch per candidate) on the 4-block slice (AMD EPYC, 2 threads, 2026-12-02);
    shortened, the five presets w8a8, w8a8-dynamic, w4a8, w4a16 and w4a4 took 108 s together,
    models built and torchao's baseline included (256 tokens, one thread, AMD EPYC, 2026-12-04).
    `bare`: formats only, without smoothing, low-rank branch and attention option (as measured
    before 2026-12-01)."""
    if bare:
        return replace(recipe, smooth=None, lowrank=None, attention=None, gptq=None)
    smooth = None if recipe.smooth is None else replace(recipe.smooth, alpha=0.5)
    return replace(recipe, smooth=smooth, gptq=None)


def quantize_denoiser(model: nn.Module, recipe: Recipe, make_call: Callable[[int], dict[str, Any]],
                      execution: str = "real", bare: bool = False) -> nn.Module:
    """`dq.calibrate` over `make_call(t)` at `CALIB_TIMESTEPS` with `speed_recipe(recipe)`, then
    `execution` ("real": the kernels the chooser picks)."""
    def run() -> None:
        for t in CALIB_TIMESTEPS:
            model(**make_call(t))

    with torch.no_grad():
        dq.calibrate(model, speed_recipe(recipe, bare), run=run)
    set_execution(model, execution)
    return model


def torchao_int8(model: nn.Module, names: set[str]) -> nn.Module:
    """torchao int8 dynamic activation x int8 weight on the same layers dq quantizes."""
    with quiet_third_party():  # torchao's import-time warnings
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    quantize_(model, Int8DynamicActivationInt8WeightConfig(), filter_fn=lambda m, fqn: fqn in names)
    return model


def torchao_fp8(model: nn.Module, names: set[str]) -> nn.Module:
    with quiet_third_party():  # torchao's import-time warnings
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, quantize_

    quantize_(model, Float8DynamicActivationFloat8WeightConfig(), filter_fn=lambda m, fqn: fqn in names)
    return model


# -- timing ------------------------------------------------------------------------------
def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# What `time_interleaved` reads: wall-clock time, or (`--clock cpu`) this process's CPU time,
# which other processes on a shared machine disturb far less; with one torch thread it is the
# compute time of a call (with several threads it adds them up: use wall time then).
CLOCK = {"clock": time.perf_counter}


def time_interleaved(fns: dict[str, Callable[[], Any]], rounds: int, inner: int, device: str = "cpu") -> dict[str, dict]:
    """Milliseconds per call: each round times every variant once (`inner` calls), in turn."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    clock = CLOCK["clock"] if device == "cpu" else time.perf_counter
    for _ in range(rounds):
        for name, fn in fns.items():
            _sync(device)
            start = clock()
            for _ in range(inner):
                fn()
            _sync(device)
            times[name].append((clock() - start) / inner * 1e3)
    return {k: {"min_ms": min(v), "median_ms": statistics.median(v), "rounds": v} for k, v in times.items()}


def warm_up(fns: dict[str, Callable[[], Any]], device: str = "cpu") -> dict[str, float]:
    """First call of each variant (compilation for compiled ones), in seconds."""
    out = {}
    for name, fn in fns.items():
        _sync(device)
        start = time.perf_counter()
        fn()
        fn()
        _sync(device)
        out[name] = time.perf_counter() - start
    return out


def module_bytes(model: nn.Module) -> int:
    """Stored bytes plus runtime copies (oneDNN prepacked int8 weights, float copies of small layers)."""
    extra = runtime_nbytes(model)
    return _tensor_bytes(model) + extra


def _tensor_bytes(model: nn.Module) -> int:
    """Bytes of parameters and buffers, torchao's quantized tensor subclasses included."""
    total = 0
    seen = set()
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) in seen:
            continue
        seen.add(id(t))
        inner = getattr(t, "__tensor_flatten__", None)
        if inner is not None and type(t) not in (torch.Tensor, nn.Parameter):
            names, _ = t.__tensor_flatten__()
            total += sum(getattr(t, n).numel() * getattr(t, n).element_size() for n in names)
        else:
            total += t.numel() * t.element_size()
    return total


# -- models --------------------------------------------------------------------------------
def pixart_slice(blocks: int, caption_channels: int = 1152, sample_size: int = 32, dtype=torch.float32,
                 device: str = "cpu") -> nn.Module:
    from diffusers import PixArtTransformer2DModel

    with torch.device(device):
        model = PixArtTransformer2DModel(
            num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=blocks,
            cross_attention_dim=1152, caption_channels=caption_channels, sample_size=sample_size, patch_size=2,
            norm_type="ada_norm_single", use_additional_conditions=False,
        )
    return model.to(dtype).eval()


def pixart_call(tokens: int, text: int, caption_channels: int, dtype=torch.float32, device: str = "cpu"):
    side = int(round(tokens**0.5)) * 2  # latent side; patch 2
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, side, side, generator=g).to(device, dtype)
    text_states = torch.randn(2, text, caption_channels, generator=g).to(device, dtype)

    def make(t: int) -> dict[str, Any]:
        return {"hidden_states": latents, "encoder_hidden_states": text_states,
                "timestep": torch.tensor([t, t], device=device), "return_dict": False}

    return make


def quant_names(model: nn.Module, recipe: str) -> set[str]:
    return {c.name for c in plan_layers(model, preset(recipe))}


def denoiser_variants(build: Callable[[], nn.Module], make_call, recipes, baselines, bare: bool = False) -> dict[str, nn.Module]:
    base = build()
    names = quant_names(base, "w8a8")
    variants = {"fp": base}
    for recipe in recipes:
        variants[f"dq-{recipe}"] = quantize_denoiser(copy.deepcopy(base), recipe_named(recipe), make_call, bare=bare)
    for name, fn in baselines.items():
        variants[name] = fn(copy.deepcopy(base), names)
    return variants


def measure_step(variants: dict[str, nn.Module], call: dict[str, Any], args, device: str = "cpu",
                 timestep: int = 500) -> dict[str, Any]:
    """Eager and compiled denoiser-step latency of every variant, interleaved."""
    out: dict[str, Any] = {"bytes": {k: module_bytes(m) for k, m in variants.items()}}
    with torch.no_grad():
        eager = {k: (lambda m=m: m(**call)) for k, m in variants.items()}
        warm_up(eager, device)  # the first eager call also measures and fixes each layer's kernel path
        out["bytes"] = {k: module_bytes(m) for k, m in variants.items()}  # runtime copies made by then
        out["paths"] = {k: path_counts(m) for k, m in variants.items()}
        out["eager"] = time_interleaved(eager, args.rounds, args.inner, device)
        log_ratios("eager", out["eager"])
        if not args.no_compile:
            compiled_models = {k: torch.compile(m) for k, m in variants.items()}
            compiled = {k: (lambda c=c: c(**call)) for k, c in compiled_models.items()}
            out["compile_s"] = warm_up(compiled, device)
            out["compiled"] = time_interleaved(compiled, args.rounds, args.inner, device)
            log_ratios("compiled", out["compiled"])
    return out


def log_ratios(mode: str, timing: dict[str, dict]) -> None:
    base = timing["fp"]["min_ms"]
    logger.info("%s: %s", mode, ", ".join(f"{k} {v['min_ms']:.1f} ms ({base / v['min_ms']:.2f}x)" for k, v in timing.items()))


# -- CPU sections ------------------------------------------------------------------------
def cpu_slice(args) -> list[dict[str, Any]]:
    results = []
    for tokens in args.tokens:
        make = pixart_call(tokens, args.text_tokens, 1152)
        side = int(round(tokens**0.5)) * 2
        recipes = [r for r in CPU_RECIPES if not args.recipes or r in args.recipes]
        baselines = {} if args.no_torchao else {"torchao-int8-dyn": torchao_int8}
        variants = denoiser_variants(lambda s=side: pixart_slice(args.blocks, sample_size=s), make, recipes,
                                     baselines, bare=args.bare)
        logger.info("PixArt-Sigma slice, %d blocks, %d tokens", args.blocks, tokens)
        res = measure_step(variants, make(500), args)
        results.append({"model": f"pixart-sigma-slice-{args.blocks}blocks", "tokens": tokens, "batch": 2, **res})
        del variants
    return results


def cpu_default_pipeline(args) -> dict[str, Any]:
    """The embedded default pipeline (the tiny PixArt test pipeline with --quick when absent)."""
    from dq.testing.tiny import default_call_kwargs, prompts_for, tiny_pipeline

    try:
        load = lambda: dq.open_pipeline(None)  # noqa: E731
        load()
        name, prompts = "default", ["a red circle above a blue square", "a green triangle"]
        call_kwargs = {"clean_caption": False}
    except DQError as exc:
        if not args.quick:
            return {"skipped": f"embedded default pipeline absent: {exc}"}
        load = lambda: tiny_pipeline("pixart")  # noqa: E731
        name, prompts = "tiny-pixart (default pipeline absent)", prompts_for("pixart", 2)
        call_kwargs = {k: v for k, v in default_call_kwargs("pixart").items() if k not in ("num_inference_steps", "output_type")}
    steps = 2 if args.quick else 20
    pipes = {"fp": load()}
    for recipe in (*CPU_RECIPES, "w4a8-rtn"):  # w4a8 uses GPTQ: see the note in the report
        if args.recipes and recipe not in args.recipes:
            continue
        pipe = load()
        dq.quantize(pipe, recipe_named(recipe), calib_prompts=prompts, num_inference_steps=2 if args.quick else 8, **call_kwargs)
        pipes[f"dq-{recipe}"] = pipe
    names = quant_names(find_denoiser(pipes["fp"])[1], "w8a8")
    ao = load()
    torchao_int8(find_denoiser(ao)[1], names)
    pipes["torchao-int8-dyn"] = ao
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
    # one denoiser call, recorded from the pipeline
    recorded: list = []
    model = find_denoiser(pipes["fp"])[1]
    handle = model.register_forward_pre_hook(lambda m, a, k: recorded.append((a, k)), with_kwargs=True)
    pipes["fp"](prompt=prompts, num_inference_steps=2, **call_kwargs)
    handle.remove()
    cargs, ckwargs = recorded[0]
    call = {**dict(zip(["hidden_states"], cargs)), **ckwargs, "return_dict": False}
    denoisers = {k: find_denoiser(p)[1] for k, p in pipes.items()}
    res = measure_step(denoisers, call, args)

    def run(pipe):
        return pipe(prompt=prompts, num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
                    output_type="np", **call_kwargs)

    with torch.no_grad():
        fns = {k: (lambda p=p: run(p)) for k, p in pipes.items()}
        run(pipes["fp"])
        res["pipeline_eager"] = time_interleaved(fns, max(1, args.rounds // 2), 1)
        log_ratios("pipeline eager", res["pipeline_eager"])
        if not args.no_compile:
            for p in pipes.values():
                name_, den = find_denoiser(p)
                setattr(p, name_, torch.compile(den))
            for fn in fns.values():
                fn()
            res["pipeline_compiled"] = time_interleaved(fns, max(1, args.rounds // 2), 1)
            log_ratios("pipeline compiled", res["pipeline_compiled"])
    return {"model": name, "pipeline_steps": steps, **res}


# -- attention core -----------------------------------------------------------------------
def attention_core(args) -> list[dict[str, Any]]:
    """Float SDPA against dq's int8 attention on the slice's attention shapes (batch 2, 16
    heads x 72), eager and compiled, interleaved; SQNR of int8 against float."""
    import torch.nn.functional as F

    from dq.nn.attention import int8_attention

    results = []
    sdpa = F.scaled_dot_product_attention
    for tokens in args.tokens:
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(2, 16, tokens, 72, generator=g) for _ in range(3))
        qkv = (q, k, v)
        fns = {"fp": lambda a=qkv: sdpa(*a), "dq-int8": lambda a=qkv: int8_attention(*a)}
        with torch.no_grad():
            ref, out = sdpa(q, k, v), int8_attention(q, k, v)
            sqnr = float(10 * torch.log10(ref.pow(2).sum() / (out - ref).pow(2).sum()))
            warm_up(fns)
            res: dict[str, Any] = {"tokens": tokens, "shape": [2, 16, tokens, 72], "sqnr_db": sqnr,
                                   "eager": time_interleaved(fns, args.rounds, args.inner)}
            log_ratios(f"attention {tokens} eager", res["eager"])
            if not args.no_compile:
                compiled = {"fp": torch.compile(sdpa), "dq-int8": torch.compile(int8_attention)}
                cfns = {n: (lambda c=c, a=qkv: c(*a)) for n, c in compiled.items()}
                res["compile_s"] = warm_up(cfns)
                res["compiled"] = time_interleaved(cfns, args.rounds, args.inner)
                log_ratios(f"attention {tokens} compiled", res["compiled"])
        results.append(res)
    return results


# -- memory ------------------------------------------------------------------------------
def pixart_sigma_4bit_bytes(blocks: int = 28, rank: int = 32, recipe: str = "w4a8", keep_defaults: bool = True) -> dict[str, Any]:
    """Bytes of a 4-bit PixArt-Sigma-size transformer, counted on the meta device.

    keep_defaults: the architecture's full-precision layers (embedders, adaLN, caption
    projection, output) stay in bf16, as `dq.quantize` does; False quantizes them too.
    """
    from dq.nn.transforms import LowRankBranch

    model = pixart_slice(blocks, caption_channels=4096, sample_size=128, device="meta")
    bf16 = sum(p.numel() * 2 for p in model.parameters())
    r = preset(recipe)
    r.keep_defaults = keep_defaults
    plan = plan_layers(model, r)
    bf16_quantized = sum(c.module.weight.numel() * 2 + (c.module.bias.numel() * 2 if c.module.bias is not None else 0) for c in plan)
    with torch.device("meta"):
        new = {}
        for c in plan:
            w = c.module.weight
            shell = QuantLinear(tuple(w.shape), c.module.bias is not None, c.weight, c.activation, 4)
            shell.branch = LowRankBranch(w.shape[1], w.shape[0], rank)
            new[c.name] = shell
    swap_modules(model, new)
    model.to(torch.bfloat16)  # float parts (kept layers, biases, branches) in bf16; dq storage keeps its dtypes
    total = weight_nbytes(model)
    quantized = sum(weight_nbytes(m) for m in new.values())
    branch = sum(weight_nbytes(m.branch) for m in new.values())
    return {
        "blocks": blocks, "rank": rank, "recipe": recipe, "keep_defaults": keep_defaults,
        "bf16_bytes": bf16, "dq_bytes": total, "ratio": total / bf16,
        "quantized_layers_bf16_bytes": bf16_quantized, "quantized_layers_dq_bytes": quantized,
        "quantized_layers_ratio": quantized / bf16_quantized, "branch_bytes": branch,
    }


_PEAK_SCRIPT = r"""
import sys, torch
sys.path.insert(0, {root!r})
torch.set_num_threads({threads})
from benchmarks.speed import pixart_slice, pixart_call, quantize_denoiser, meta_quantized_slice
from dq.recipe import preset
variant, blocks, tokens = {variant!r}, {blocks}, {tokens}
make = pixart_call(tokens, 300, 1152)
side = int(round(tokens ** 0.5)) * 2
def hwm():  # peak RSS in kB; VmHWM, unlike ru_maxrss, is not inherited across exec
    return int(next(x for x in open("/proc/self/status") if x.startswith("VmHWM")).split()[1])
base = hwm()
if variant == "fp":
    model = pixart_slice(blocks, sample_size=side)
else:
    model = meta_quantized_slice(blocks, side, preset(variant), make)
loaded = hwm()
with torch.no_grad():
    model(**make(500))
peak = hwm()
print("RESULT", base, loaded, peak)
"""


def meta_quantized_slice(blocks: int, side: int, recipe: Recipe, make) -> nn.Module:
    """A quantized slice built without ever holding its float weights (as a checkpoint load would).

    Shells are made on the meta device and filled with random codes; float parts are random.
    """
    model = pixart_slice(blocks, sample_size=side, device="meta")
    plan = plan_layers(model, recipe)
    router = TimestepRouter(torch.tensor([250.0, 500.0, 750.0]))
    with torch.device("meta"):
        new = {c.name: QuantLinear(tuple(c.module.weight.shape), c.module.bias is not None, c.weight, c.activation, 4)
               for c in plan}
    swap_modules(model, new)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if name.endswith("wmult"):
                t.fill_(1)
            elif t.dtype in (torch.int8, torch.uint8):
                t.copy_(torch.randint(-7 if t.dtype == torch.int8 else 0, 8 if t.dtype == torch.int8 else 256, t.shape, dtype=t.dtype))
            elif name.endswith(("wscale", "ascale")):
                t.fill_(0.01)
            elif name.endswith(("azero", "boundaries")):
                t.zero_()
            elif t.is_floating_point():
                t.normal_(0, 0.02)
    for m in new.values():
        m.bind_router(router)
    attach_router(model, router)
    router.boundaries.copy_(torch.tensor([250.0, 500.0, 750.0]))
    set_execution(model, "real")
    return model.eval()


def peak_rss(variant: str, blocks: int, tokens: int, threads: int) -> dict[str, float]:
    """Max RSS (MB) of a fresh process: at start, after building the model, after one step."""
    root = str(Path(__file__).resolve().parent.parent)
    code = _PEAK_SCRIPT.format(root=root, variant=variant, blocks=blocks, tokens=tokens, threads=threads)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, cwd=root)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT")), None)
    if line is None:
        return {"error": out.stderr[-2000:]}
    base, loaded, peak = (int(v) / 1024 for v in line.split()[1:])
    return {"start_mb": base, "after_build_mb": loaded, "peak_mb": peak, "model_mb": loaded - base, "step_mb": peak - loaded}


# -- report ------------------------------------------------------------------------------
def machine_name() -> str:
    cpu = choice.machine()["cpu"]
    gpu = f"-{torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return re.sub(r"[^A-Za-z0-9]+", "-", f"{cpu}-{os.cpu_count()}cores{gpu}").strip("-").lower()


def contention() -> dict[str, Any]:
    load1, load5, _ = os.getloadavg()
    return {"loadavg_1m": load1, "loadavg_5m": load5, "cpus": os.cpu_count()}


def markdown(report: dict[str, Any]) -> str:
    cpu = report.get("cpu", {})
    lines = [f"Machine: {report['machine']} ({report['date']}); CPU {cpu.get('cpu')} ({cpu.get('vendor')} "
             f"{cpu.get('family_model_stepping')}), ISA {', '.join(cpu.get('isa', [])) or 'none'}; torch {report['torch']}, threads {report['threads']}; "
             f"load average before/after: {report['load_before']['loadavg_1m']:.1f} / {report.get('load_after', report['load_before'])['loadavg_1m']:.1f}; clock: {report.get('clock', 'wall')}",
             "", "| model | tokens | variant | eager ms | eager x | compiled ms | compiled x | weight MB | kernel paths |",
             "|---|---|---|---|---|---|---|---|---|"]
    sections = [*report.get("cpu_slice", []), report.get("cpu_default", {})]
    for gpu in report.get("gpu", {}).get("results", []):
        sections += [{"model": f"{gpu['model']} (GPU)", **pair} for pair in gpu["pairs"].values()]
    seen: dict[str, set[str]] = {}
    for sec in sections:
        if "eager" not in sec:
            continue
        for variant, t in sec["eager"].items():
            if variant == "fp" and sec is not sections[0] and "(GPU)" in sec["model"] and variant in seen.get(sec["model"], ()):
                continue
            seen.setdefault(sec["model"], set()).add(variant)
            e0 = sec["eager"]["fp"]["min_ms"]
            c = sec.get("compiled", {}).get(variant)
            c0 = sec.get("compiled", {}).get("fp")
            comp = f"{c['min_ms']:.1f} | {c0['min_ms'] / c['min_ms']:.2f}" if c else "- | -"
            lines.append(f"| {sec['model']} | {sec.get('tokens', '')} | {variant} | {t['min_ms']:.1f} | "
                         f"{e0 / t['min_ms']:.2f} | {comp} | {sec['bytes'][variant] / 2**20:.1f} | "
                         f"{', '.join(f'{p} {n}' for p, n in sorted(sec.get('paths', {}).get(variant, {}).items()))} |")
    lines += targets(report)
    for att in report.get("attention", []):
        if not lines[-1].startswith("| attention"):
            lines += ["", "| attention core | tokens | eager fp ms | eager int8 ms | int8 x fp | compiled fp ms | "
                      "compiled int8 ms | int8 x fp | int8 SQNR dB |", "|---|---|---|---|---|---|---|---|---|"]
        e, c = att["eager"], att.get("compiled")
        comp = (f"{c['fp']['min_ms']:.1f} | {c['dq-int8']['min_ms']:.1f} | {c['fp']['min_ms'] / c['dq-int8']['min_ms']:.2f}"
                if c else "- | - | -")
        lines.append(f"| attention 2x16x72 | {att['tokens']} | {e['fp']['min_ms']:.1f} | {e['dq-int8']['min_ms']:.1f} | "
                     f"{e['fp']['min_ms'] / e['dq-int8']['min_ms']:.2f} | {comp} | {att['sqnr_db']:.1f} |")
    default = report.get("cpu_default", {})
    if "pipeline_eager" in default:
        lines += ["", f"Whole pipeline ({default['model']}, {default['pipeline_steps']} steps):", "",
                  "| variant | eager s | eager x | compiled s | compiled x |", "|---|---|---|---|---|"]
        e0 = default["pipeline_eager"]["fp"]["min_ms"]
        c0 = default.get("pipeline_compiled", {}).get("fp", {}).get("min_ms")
        for variant, t in default["pipeline_eager"].items():
            c = default.get("pipeline_compiled", {}).get(variant)
            comp = f"{c['min_ms'] / 1e3:.2f} | {c0 / c['min_ms']:.2f}" if c else "- | -"
            lines.append(f"| {variant} | {t['min_ms'] / 1e3:.2f} | {e0 / t['min_ms']:.2f} | {comp} |")
    elif default:
        lines += ["", f"Default pipeline: {default.get('skipped')}"]
    mem = report.get("memory", {})
    for key in ("pixart_sigma_4bit", "pixart_sigma_4bit_all_layers"):
        if key not in mem:
            continue
        m = mem[key]
        kept = "architecture's kept layers in bf16" if m["keep_defaults"] else "every linear layer 4-bit"
        lines += ["", f"4-bit PixArt-Sigma-size transformer ({m['blocks']} blocks, {m['recipe']}, rank-{m['rank']} branch, "
                  f"{kept}): {m['dq_bytes'] / 2**20:.0f} MB vs bf16 {m['bf16_bytes'] / 2**20:.0f} MB = "
                  f"{m['ratio']:.3f}x (quantized layers alone: {m['quantized_layers_ratio']:.3f}x)"]
    for variant, p in mem.get("peak_rss", {}).items():
        if "peak_mb" in p:
            lines.append(f"- peak RSS, slice {variant}: model {p['model_mb']:.0f} MB, step +{p['step_mb']:.0f} MB, "
                         f"peak {p['peak_mb']:.0f} MB")
    if "gpu" in report and "skipped" in report["gpu"]:
        lines += ["", f"GPU part: skipped ({report['gpu']['skipped']})"]
    for gpu in report.get("gpu", {}).get("results", []):
        for variant, pair in gpu["pairs"].items():
            if "error" in pair:
                lines.append(f"- GPU {gpu['model']} {variant}: FAILED: {pair['error']}")
    return "\n".join(lines)


def targets(report: dict[str, Any]) -> list[str]:
    """Issue 11's CPU targets, met or missed, from the slice's compiled (else eager) times."""
    lines = []
    for sec in report.get("cpu_slice", []):
        mode = "compiled" if "compiled" in sec else "eager"
        t = sec[mode]
        fp = t["fp"]["min_ms"]
        ratio = {k: fp / v["min_ms"] for k, v in t.items() if k != "fp"}
        if sec["tokens"] == 256:
            for variant, goal in TARGETS_256.items():
                if variant in ratio:
                    met = "met" if ratio[variant] >= goal else "MISSED"
                    lines.append(f"- 256 tokens, {mode}: {variant} {ratio[variant]:.2f}x fp32 (target >= {goal}x): {met}")
        if sec["tokens"] == 1024:
            for m in ("eager", "compiled"):
                if m not in sec:
                    continue
                fp_m = sec[m]["fp"]["min_ms"]
                slower = {k: fp_m / v["min_ms"] for k, v in sec[m].items() if k.startswith("dq-") and v["min_ms"] > fp_m}
                lines.append(f"- 1024 tokens, {m}: no dq variant slower than fp32: "
                             + ("met" if not slower else "MISSED (" + ", ".join(f"{k} {r:.2f}x" for k, r in slower.items()) + ")"))
    return ["", "Targets (issue 11):", *lines] if lines else []


def _block_counts(text: str) -> str:
    """`--gpu-flux-blocks`: two positive integers, "double,single"."""
    parts = text.split(",")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r}: give FLUX.1's double- and single-stream block counts as two "
                                         "positive integers, e.g. 19,38 (the full model) or 4,8")
    return text


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny shapes, one round")
    parser.add_argument("--blocks", type=int, default=None, help="transformer blocks of the CPU slice (default 4)")
    parser.add_argument("--tokens", type=int, nargs="+", default=None, help="image tokens of the CPU slice (256 1024)")
    parser.add_argument("--text-tokens", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds (default 5)")
    parser.add_argument("--inner", type=int, default=None, help="calls per variant per round (default 2)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--no-compile", action="store_true", help="eager only")
    parser.add_argument("--skip", nargs="*", default=[], choices=["slice", "attention", "default", "memory", "gpu"])
    parser.add_argument("--recipes", nargs="*", default=None, help=f"slice variants (default: all of {list(CPU_RECIPES)})")
    parser.add_argument("--no-torchao", action="store_true", help="slice: without the torchao baseline")
    parser.add_argument("--bare", action="store_true", help="slice: formats only, without the presets' smoothing, "
                        "low-rank branch and attention option")
    parser.add_argument("--gpu-models", default="", help="comma list of flux.1,pixart-sigma,sdxl (default: all)")
    parser.add_argument("--gpu-compile", choices=["full", "regional"], default="full",
                        help="GPU part: torch.compile of the whole denoiser, or diffusers' compile_repeated_blocks "
                             "(each block class compiled once: a much shorter compile)")
    parser.add_argument("--gpu-flux-blocks", default="19,38", type=_block_counts,
                        help="FLUX.1's double,single block counts (fewer: same shapes, shorter compile)")
    parser.add_argument("--gpu-variants", default="", help="comma list of dq-fp8,dq-w8a8,torchao-int8-dyn,torchao-fp8-dyn (default: all)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="CPU timings: wall-clock, or process CPU time (shared machines, with --threads 1)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    args.blocks = args.blocks or (1 if args.quick else 4)
    args.tokens = args.tokens or ([64] if args.quick else [256, 1024])
    args.rounds = args.rounds or (1 if args.quick else 5)
    args.inner = args.inner or (1 if args.quick else 2)
    if args.quick and not args.recipes:  # a smoke test: two presets, not every variant compiled
        args.recipes = ["w8a8", "w4a8"]
    if args.quick:
        args.text_tokens = min(args.text_tokens, 32)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu":
        CLOCK["clock"] = time.process_time
    # every variant is its own set of module objects: one compiled graph each
    torch._dynamo.config.cache_size_limit = 64
    torch._dynamo.config.accumulated_cache_size_limit = 1024
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("dq").setLevel(logging.WARNING)

    report: dict[str, Any] = {
        "date": dt.date.today().isoformat(), "machine": machine_name(), "cpu": choice.machine(), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "clock": args.clock, "quick": args.quick, "args": {k: str(v) for k, v in vars(args).items()},
        "load_before": contention(),
    }
    if "slice" not in args.skip:
        report["cpu_slice"] = cpu_slice(args)
    if "attention" not in args.skip:
        report["attention"] = attention_core(args)
    if "default" not in args.skip:
        report["cpu_default"] = cpu_default_pipeline(args)
    if "memory" not in args.skip:
        report["memory"] = {
            "pixart_sigma_4bit": pixart_sigma_4bit_bytes(2 if args.quick else 28),
            "pixart_sigma_4bit_all_layers": pixart_sigma_4bit_bytes(2 if args.quick else 28, keep_defaults=False),
            "peak_rss": {v: peak_rss(v, args.blocks, args.tokens[0], torch.get_num_threads()) for v in ("fp", "w8a8", "w4a8")},
        }
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "-quick" if args.quick else ""
    path = args.out / f"speed-{report['date']}-{report['machine']}{suffix}.json"
    if "gpu" not in args.skip:
        def partial(section: dict[str, Any]) -> None:
            path.write_text(json.dumps({**report, "gpu": section, "partial": True}, indent=2, default=str))

        from benchmarks.speed_gpu import gpu_section

        report["gpu"] = gpu_section(args, partial)
    report["load_after"] = contention()
    path.write_text(json.dumps(report, indent=2, default=str))
    table = markdown(report)
    print(table)
    print(f"\nwrote {path}")
    return report


if __name__ == "__main__":
    main()
