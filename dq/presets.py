"""The preset recipes as data (`dq.recipe.preset` turns one into a `Recipe`), each beside the
measurement that chose it."""

from __future__ import annotations

from typing import Any

from .quant.spec import QuantSpec


def _w(bits: int, **kw: Any) -> QuantSpec:
    return QuantSpec(bits=bits, **kw)


# Presets. Weights: int8 per output channel; 4-bit per group of 64 with an MSE clip
# search. Activations: int8 static per tensor, a range per timestep group chosen by
# MSE on the calibration histogram; 4-bit activations dynamic per token.
#
# Outlier handling, chosen by measurement on the embedded default pipeline (its previous
# training, 2026-11-22, before the 2026-11-23 retraining; pooled denoiser-output SQNR over 10
# steps of 4 unseen prompts, 16 calibration prompts; benchmarks/ablation.py measures images,
# BENCHMARKS.md has the re-run on the current model): rtn -> preset
#   W8A8 36.1 -> 42.6 dB (no outlier handling 40.3; + smoothing 42.2; + GPTQ 42.6)
#   W4A8 27.6 -> 33.9 dB (no outlier handling 28.0; + GPTQ 33.6; + smoothing 33.9)
#   W4A4  9.1 -> 31.4 dB (per-token, no outlier handling 21.5; + low-rank 28.6; + smoothing
#                         and GPTQ 31.4)
# - smoothing needs its per-layer alpha search: SmoothQuant's fixed alpha 0.5 is *worse*
#   than no smoothing at W8A8 (39.3 dB), the search gives 42.2. Channel ranges aggregate
#   the timesteps by RMS: per-step maxima ("max", "mean", "salience") are noisy, smoothing
#   equalizes that noise and the scales then clip unseen inputs (tiny sd15/dit, W8A8, out of
#   sample: 2 to 7 dB worse than RMS); on the trained model RMS is also best at W4A4 (31.4
#   vs 30.6 "max", 30.9 "mean", 30.7 "salience").
# - w8a8 uses static per-tensor activation ranges per timestep group: no per-call range
#   search, the fastest int8 path (benchmarks/speed.py). Per-token dynamic ranges cost a
#   reduction per token but are more accurate: on 256 prompts of the embedded pipeline
#   (benchmarks/quality.py, 2026-11-22) PSNR 33.2 (static) vs 36.3 dB (w8a8-dynamic), where
#   torchao's int8 dynamic (no smoothing) gets 34.6; on the retrained model (2026-11-23)
#   34.4 vs 40.2, torchao 36.5. Of the static layers, PixArt's cross-attention output projection
#   loses most (its input mixes the caption's values per prompt), then the self-attention q/k/v
#   and the MLP output projection: the architecture rules `dynamic_inputs` / `dynamic_inputs_w8`
#   (dq/arch.py; the latter for 8-bit weights only: at W4A8 static measured better) give
#   them per-token ranges, 34.1 -> 35.7 dB (cross-attention outputs, 2026-12-01) -> 37.9 dB
#   (all three, 2026-12-02) on 256 prompts, torchao 36.5, at 1.84x fp32 eager on the
#   PixArt-Sigma slice instead of 2.09x all static (BENCHMARKS.md "Static W8A8 against torchao").
# - GPTQ is the largest single gain for 4-bit weights (+5.6 dB at W4A8, +6.4 at W4A16) and
#   comes almost free once H is collected for the smoothing search.
# - the rank-32 low-rank branch (SVDQuant) is what makes W4A4 usable (+7 dB); it would add
#   7 dB at W4A8 too, but its float branch costs r(in+out) MACs per token (+50% on this
#   128-wide model, about +5% at width 1152), so only W4A4, where nothing else recovers
#   quality, pays for it.
# - Hadamard rotation gains +2.0 dB at W8A8, +1.5 at W4A8, +0.1 at W4A4 on top of the
#   presets, but it runs online (LayerNorm and adaLN modulation sit between every producer
#   and its consumers, so it cannot be folded) and costs about as much as a 128-wide fp32
#   layer: more than the int8 matmul it precedes. Left out; `rotate: true` buys the quality.
# - attention quantization only adds error in simulation (no kernel uses it yet): off.
# - w4a16 stays calibration-free; `base: w4a16, gptq: true` gives +6.4 dB with calibration.
# - weight-only layers (the architecture's `weight_only`: PixArt's caption projection) may run in
#   bfloat16 where the CPU's bfloat16 matmul is faster (path "bf16"), in every calibrated preset:
#   on the PixArt-Sigma slice (AMD EPYC Zen 4, 2026-12-02, two quiet runs) w8a8 +2/+4 % eager and
#   -1.5/+8 % compiled against its caption layers in float32 (2.97-3.37x fp32 compiled); on the
#   embedded pipeline (64 prompts, the 2 caption layers took it) PSNR w8a8 38.41 -> 38.72 dB,
#   w4a8 27.33 -> 27.26, w4a16 23.13 -> 23.10: no loss beyond noise.
# - `float_activations_where_faster` (path "float_input": a narrow layer runs the float op on its
#   quantized weight where no integer path beats it, whole-layer costs) is on in every preset with
#   quantized activations, so that no layer runs slower than the float layer it replaces. At one
#   torch thread the static presets' int8 paths beat float even at width 128, but at two threads
#   (torch's default on the 2-core CI machines) they did not: on the embedded pipeline (AMD EPYC
#   Zen 4, 2026-12-02, wall clock, 2-3 runs) w8a8's denoiser step was 0.94-0.99x fp32 without it
#   (24 layers on the dequantize-per-call path) and 1.06-1.07x with it, w4a8's 1.14-1.21x and
#   1.28-1.35x. At DiT widths no layer is small enough to keep the float copy (1 MiB at most).
#   Where it is taken the layer skips its activation rounding; the quality benchmark has a
#   `-int-only` row per preset with the literal numerics.
PRESETS: dict[str, dict[str, Any]] = {
    "w8a8": dict(
        weight=_w(8, granularity="channel"),
        activation=_w(8, granularity="tensor", symmetric=False, range="mse"),
        smooth=dict(alpha="search", aggregate="rms"),
        weight_only_bf16_activations=True,
        attention_bf16_where_faster=True,
        float_activations_where_faster=True,
        description="int8 weights (per channel) and int8 static activations per timestep group; smoothing",
    ),
    "w8a8-dynamic": dict(
        weight=_w(8, granularity="channel"),
        activation=_w(8, granularity="token", symmetric=False, dynamic=True),
        smooth=dict(alpha="search", aggregate="rms"),
        weight_only_bf16_activations=True,
        attention_bf16_where_faster=True,
        float_activations_where_faster=True,
        description="int8 weights (per channel) and int8 dynamic per-token activations; smoothing "
        "(best W8A8 image quality; static w8a8 is the faster one)",
    ),
    "w4a8": dict(
        weight=_w(4, granularity="group", group_size=64, range="mse"),
        activation=_w(8, granularity="tensor", symmetric=False, range="mse"),
        smooth=dict(alpha="search", aggregate="rms"),
        gptq=dict(),
        weight_only_bf16_activations=True,
        attention_bf16_where_faster=True,
        float_activations_where_faster=True,
        description="int4 weights (group 64, GPTQ) and int8 static activations per timestep group; smoothing",
    ),
    "w4a16": dict(
        weight=_w(4, granularity="group", group_size=64, range="mse"),
        activation=None,
        weight_only_bf16_activations=True,
        attention_bf16_where_faster=True,
        description="int4 weights (group 64), 16-bit activations: float32, or bfloat16 where its matmul is faster",
    ),
    "w8a16": dict(
        weight=_w(8, granularity="channel"),
        activation=None,
        description="int8 weights per output channel, activations in full precision (e.g. for text encoders)",
    ),
    "w4a4": dict(
        weight=_w(4, granularity="group", group_size=64, range="mse"),
        activation=_w(4, granularity="token", symmetric=False),
        smooth=dict(alpha="search", aggregate="rms"),
        lowrank=dict(rank=32),
        gptq=dict(),
        weight_only_bf16_activations=True,
        attention_bf16_where_faster=True,
        float_activations_where_faster=True,
        description="int4 weights (group 64, GPTQ) and int4 dynamic per-token activations; "
        "smoothing and a rank-32 float branch (SVDQuant)",
    ),
    "w8a8-rtn": dict(
        weight=_w(8, granularity="channel"),
        activation=_w(8, granularity="tensor"),
        timestep_groups=1,
        description="naive baseline: round-to-nearest, min/max ranges, one activation range for all steps",
    ),
    "w4a8-rtn": dict(
        weight=_w(4, granularity="group", group_size=64),
        activation=_w(8, granularity="tensor"),
        timestep_groups=1,
        description="naive baseline: round-to-nearest, min/max ranges, one activation range for all steps",
    ),
    "w4a4-rtn": dict(
        weight=_w(4, granularity="group", group_size=64),
        activation=_w(4, granularity="tensor"),
        timestep_groups=1,
        description="naive baseline: round-to-nearest, min/max ranges, one activation range for all steps",
    ),
    "fp8": dict(
        weight=QuantSpec(kind="fp8_e4m3", granularity="channel"),
        activation=QuantSpec(kind="fp8_e4m3", granularity="tensor", range="mse"),
        description="fp8 e4m3 weights (per channel) and static fp8 activations per timestep group",
    ),
}
