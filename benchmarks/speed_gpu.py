"""The GPU part of `benchmarks/speed.py` (run by `speed.py` unless `--skip gpu`; skipped
without CUDA): bf16 against dq's fp8 and int8 and torchao's on full-size random-weight FLUX.1,
PixArt-Sigma and SDXL denoisers at 1024x1024, eager and compiled, one model at a time.
`benchmarks/gpu_session.sh speed` is what one GPU lease runs."""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from benchmarks.ablation import pooled_sqnr
from benchmarks.speed import (
    GPU_RECIPES,
    log_ratios,
    module_bytes,
    pixart_slice,
    quant_names,
    quantize_denoiser,
    time_interleaved,
    torchao_fp8,
    torchao_int8,
    warm_up,
)
from dq.kernels.dispatch import path_counts
from dq.recipe import preset

logger = logging.getLogger("benchmarks.speed")


def gpu_models(quick: bool, device: str = "cuda", flux_blocks: tuple[int, int] = (19, 38)):
    """(name, builder, make_call) of full-size random-weight denoisers at 1024x1024 (`quick`:
    128x128, fewer blocks). `device="cpu"` builds the same models on the CPU, a dry run of
    the section's calibration route before a GPU lease is spent on it. `flux_blocks`: FLUX.1's
    double- and single-stream block counts (fewer: the same layer shapes, a shorter compile)."""
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    dtype, dev = torch.bfloat16, device
    lat = 16 if quick else 128  # latent side at 1024x1024

    def flux():
        with torch.device(dev):
            m = FluxTransformer2DModel(
                patch_size=1, in_channels=64, num_layers=1 if quick else flux_blocks[0],
                num_single_layers=2 if quick else flux_blocks[1],
                attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                guidance_embeds=True, axes_dims_rope=(16, 56, 56),
            )
        return m.to(dtype).eval()

    def flux_call(t):
        n = (lat // 2) ** 2
        g = torch.Generator(device=dev).manual_seed(0)
        ids = torch.zeros(n, 3, device=dev)
        return {"hidden_states": torch.randn(1, n, 64, device=dev, dtype=dtype, generator=g),
                "encoder_hidden_states": torch.randn(1, 512, 4096, device=dev, dtype=dtype, generator=g),
                "pooled_projections": torch.randn(1, 768, device=dev, dtype=dtype, generator=g),
                "timestep": torch.tensor([t / 1000], device=dev, dtype=dtype), "guidance": torch.tensor([3.5], device=dev, dtype=dtype),
                "img_ids": ids, "txt_ids": torch.zeros(512, 3, device=dev), "return_dict": False}

    def pixart():
        return pixart_slice(2 if quick else 28, caption_channels=4096, sample_size=lat, dtype=dtype, device=dev)

    def pixart_gpu_call(t):
        g = torch.Generator(device=dev).manual_seed(0)
        return {"hidden_states": torch.randn(2, 4, lat, lat, device=dev, dtype=dtype, generator=g),
                "encoder_hidden_states": torch.randn(2, 300, 4096, device=dev, dtype=dtype, generator=g),
                "timestep": torch.tensor([t, t], device=dev), "return_dict": False}

    def sdxl():
        with torch.device(dev):
            m = UNet2DConditionModel(
                sample_size=lat, in_channels=4, out_channels=4,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                block_out_channels=(320, 640, 1280), layers_per_block=2,
                transformer_layers_per_block=(1, 2, 2 if quick else 10), attention_head_dim=(5, 10, 20),
                cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
                addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
            )
        return m.to(dtype).eval()

    def sdxl_call(t):
        g = torch.Generator(device=dev).manual_seed(0)
        return {"sample": torch.randn(2, 4, lat, lat, device=dev, dtype=dtype, generator=g), "timestep": torch.tensor([t, t], device=dev),
                "encoder_hidden_states": torch.randn(2, 77, 2048, device=dev, dtype=dtype, generator=g),
                "added_cond_kwargs": {"text_embeds": torch.randn(2, 1280, device=dev, dtype=dtype, generator=g),
                                      "time_ids": torch.randn(2, 6, device=dev, dtype=dtype, generator=g)},
                "return_dict": False}

    return [("flux.1", flux, flux_call), ("pixart-sigma", pixart, pixart_gpu_call), ("sdxl", sdxl, sdxl_call)]


def _sqnr(reference: torch.Tensor, out: torch.Tensor) -> float:
    return round(pooled_sqnr([reference], [out]), 2)


def _compiled(model: nn.Module, build: Callable[[], nn.Module] | None, regional: bool) -> nn.Module:
    """`torch.compile(model)`, or (`regional`) diffusers' `compile_repeated_blocks`: each
    repeated block class compiled once for all its instances (minutes less for a full FLUX.1;
    dq's layers compile there without a recompile per block, checked on a CPU). That compiles
    in place, so the float model's compiled copy is a second build from the same seed (`build`);
    a quantized model is compiled itself, after its eager timing. `regional` is False for a class
    that declares no repeated blocks (PixArt-Sigma's): compiled whole."""
    if not regional:
        return torch.compile(model)
    if build is not None:
        torch.manual_seed(0)
        model = build()
    model.compile_repeated_blocks(fullgraph=True)
    return model


def gpu_section(args, on_result: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """bf16 against each quantized variant, one model at a time (a full-size FLUX.1 does not
    fit an 80 GB GPU several times over). The bf16 model is compiled once per model and timed
    interleaved with each variant in turn. A variant that fails is recorded with its error.
    `on_result` gets the section so far after every variant (partial results survive a limit)."""
    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device"}
    from dq.kernels import fp8

    has_fp8 = fp8.device_unsupported(torch.device("cuda")) is None
    section: dict[str, Any] = {"device": torch.cuda.get_device_name(), "has_fp8": has_fp8, "results": []}
    wanted_models = set(args.gpu_models.split(",")) if args.gpu_models else None
    regional = getattr(args, "gpu_compile", "full") == "regional"
    section["compile"] = "regional" if regional else "full"
    flux_blocks = tuple(int(n) for n in getattr(args, "gpu_flux_blocks", "19,38").split(","))
    section["flux_blocks"] = flux_blocks
    for name, build, make_call in gpu_models(args.quick, flux_blocks=flux_blocks):
        if wanted_models is not None and name not in wanted_models:
            continue
        logger.info("GPU: %s", name)
        torch.manual_seed(0)
        base = build()
        names = quant_names(base, "w8a8")
        makers: dict[str, Callable[[nn.Module], nn.Module]] = {
            f"dq-{r}": (lambda m, r=r, mc=make_call: quantize_denoiser(m, preset(r), mc)) for r in GPU_RECIPES
            if r != "fp8" or has_fp8
        }
        makers["torchao-int8-dyn"] = lambda m, n=names: torchao_int8(m, n)
        if has_fp8:
            makers["torchao-fp8-dyn"] = lambda m, n=names: torchao_fp8(m, n)
        if args.gpu_variants:  # in the order asked for: the first ones survive a time limit
            makers = {k: makers[k] for k in args.gpu_variants.split(",") if k in makers}
        regional_here = regional and bool(getattr(base, "_repeated_blocks", None))  # PixArt declares none
        entry: dict[str, Any] = {"model": name, "resolution": 128 if args.quick else 1024, "pairs": {},
                                 "compile": "regional" if regional_here else "full"}
        section["results"].append(entry)
        call = make_call(500)
        base_bytes = module_bytes(base)
        with torch.no_grad():
            reference = base(**call)[0].float()  # what each variant's output is compared with
            base_eager = lambda b=base, c=call: b(**c)  # noqa: E731
            base_compiled_model = None if args.no_compile else _compiled(base, build, regional_here)
            base_compiled = None if base_compiled_model is None else (lambda b=base_compiled_model, c=call: b(**c))
            both = {"fp": base_eager, **({} if base_compiled is None else {"fp-compiled": base_compiled})}
            base_compile_s = warm_up(both, "cuda")
        for variant, make in makers.items():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            try:
                torch.manual_seed(0)  # the base model's weights again: outputs are comparable
                fresh = build()
                start = time.perf_counter()
                quantized = make(fresh)
                torch.cuda.synchronize()
                res: dict[str, Any] = {"quantize_s": round(time.perf_counter() - start, 1),
                                       "bytes": {"fp": base_bytes, variant: module_bytes(quantized)}}
                with torch.no_grad():
                    q_eager = lambda q=quantized, c=call: q(**c)  # noqa: E731
                    res["warm_up_s"] = warm_up({variant: q_eager}, "cuda")[variant]  # dq: the kernel choice
                    eager_out = quantized(**call)[0].float()
                    res["sqnr_db_vs_fp"] = _sqnr(reference, eager_out)
                    if variant.startswith("dq-"):
                        res["paths"] = path_counts(quantized)
                        logger.info("%s kernel paths: %s", variant, res["paths"])
                    pair = {"fp": base_eager, variant: q_eager}
                    res["eager"] = time_interleaved(pair, args.rounds, args.inner, "cuda")
                    log_ratios("eager", res["eager"])
                    if base_compiled is not None:
                        q_model = _compiled(quantized, None, regional_here)
                        q_compiled = lambda q=q_model, c=call: q(**c)  # noqa: E731
                        res["compile_s"] = {
                            "fp": base_compile_s.get("fp-compiled"), **warm_up({variant: q_compiled}, "cuda")
                        }
                        res["sqnr_db_compiled_vs_eager"] = _sqnr(eager_out, q_model(**call)[0].float())
                        pair = {"fp": base_compiled, variant: q_compiled}
                        res["compiled"] = time_interleaved(pair, args.rounds, args.inner, "cuda")
                        log_ratios("compiled", res["compiled"])
                res["peak_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
            except Exception as exc:  # a failing variant is a result too
                logger.exception("GPU %s %s failed", name, variant)
                res = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            entry["pairs"][variant] = res
            # drop every reference to the variant before the next one is built (a second
            # full-size FLUX.1 beside the first does not fit)
            quantized = fresh = q_model = q_eager = q_compiled = pair = eager_out = None
            gc.collect()
            torch.cuda.empty_cache()
            if on_result is not None:
                on_result(section)
        base = base_compiled_model = base_eager = base_compiled = reference = None
        torch.cuda.empty_cache()
    return section
