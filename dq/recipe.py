"""Recipes: what to quantize and how, as one validated config.

A recipe is plain data: it round-trips through `to_dict`/`from_dict` and loads from
YAML or JSON. `Recipe.from_any` accepts a preset name, a recipe object, a mapping or
a file path, which is what `dq.quantize` and the CLI take.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import yaml

from .errors import DQError
from .presets import PRESETS
from .quant.spec import QuantSpec

FORMAT_VERSION = 1


def check_format_version(version: object, where: str) -> None:
    """Refuse a checkpoint `format_version` that is not an integer or is newer than this dq reads
    (`where`: the file or object it comes from)."""
    if isinstance(version, bool) or not isinstance(version, int):
        raise DQError(f"{where}: quantization_config.format_version must be an integer, got {version!r}; the file is damaged")
    if version > FORMAT_VERSION:
        raise DQError(
            f"{where} was written by a newer dq (quantization_config.format_version {version}, this dq reads up to "
            f"{FORMAT_VERSION}); upgrade dq (pip install -U dq)"
        )


def _kind(value: Any) -> str:
    """How a value reads in YAML/JSON terms, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"a {type(value).__name__}"


def _type_error(where: str, value: Any, expected: str) -> DQError:
    hint = ""
    if expected == "true or false" and isinstance(value, str):
        hint = "; write true or false without quotes"
    elif expected.startswith(("an integer", "a positive integer", "a number")) and isinstance(value, str):
        hint = "; write the number without quotes"
    return DQError(f"{where} must be {expected}, got {value!r} ({_kind(value)}){hint}")


def _check_type(value: Any, expected: str, where: str, *, nullable: bool = False) -> None:
    """Refuse `value` unless it is of the `expected` JSON type: "bool" (true/false only, no
    strings like "no"), "int" (not a bool, not a float), "number" (int or float, not a bool)
    or "str"; `nullable` also accepts null."""
    if value is None and nullable:
        return
    ok = {
        "bool": isinstance(value, bool),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "number": isinstance(value, (int, float)) and not isinstance(value, bool),
        "str": isinstance(value, str),
    }[expected]
    if not ok:
        names = {"bool": "true or false", "int": "an integer", "number": "a number", "str": "a string"}
        raise _type_error(where, value, names[expected] + (" or null" if nullable else ""))


# The JSON type of each QuantSpec option (checked before QuantSpec's own range checks).
_SPEC_TYPES: dict[str, str] = {
    "bits": "int",
    "kind": "str",
    "symmetric": "bool",
    "granularity": "str",
    "group_size": "int",
    "range": "str",
    "percentile": "number",
    "dynamic": "bool",
    "log": "bool",
}


def _spec(value: Any, where: str) -> QuantSpec | None:
    """A nested quantizer spec (null, a mapping of QuantSpec options or a QuantSpec), type-checked
    option by option; errors name the field (e.g. ``weight.symmetric``)."""
    if value is None:
        return None
    if isinstance(value, QuantSpec):
        options = value.to_dict()
    elif isinstance(value, dict):
        options = value
    else:
        raise _type_error(where, value, "a mapping of quantizer options (bits, kind, granularity, ...) or null")
    for key, option in options.items():
        if not isinstance(key, str):
            raise DQError(f"{where}: option names must be strings, got {key!r}")
        if key in _SPEC_TYPES:
            _check_type(option, _SPEC_TYPES[key], f"{where}.{key}")
    try:
        return QuantSpec.from_dict(value)
    except DQError as exc:
        raise DQError(f"{where}: {exc}") from exc


@dataclass
class LayerOverride:
    """Per-layer exception to the recipe: layers whose name matches `pattern`
    (a regular expression, searched) get these weight/activation specs, or stay in
    full precision with `keep: true`. Later overrides win."""

    pattern: str
    weight: QuantSpec | None = None
    activation: QuantSpec | None = None
    keep: bool = False

    def __post_init__(self) -> None:
        _check_type(self.pattern, "str", "override pattern")
        try:
            re.compile(self.pattern)
        except re.error as exc:
            raise DQError(f"override pattern {self.pattern!r} is not a valid regular expression: {exc}") from exc
        self.weight = _spec(self.weight, f"override {self.pattern!r} weight")
        self.activation = _spec(self.activation, f"override {self.pattern!r} activation")
        _check_type(self.keep, "bool", f"override {self.pattern!r} keep")

    def to_dict(self) -> dict[str, Any]:
        return {
            "pattern": self.pattern,
            "weight": self.weight.to_dict() if self.weight else None,
            "activation": self.activation.to_dict() if self.activation else None,
            "keep": self.keep,
        }


def _check_patterns(patterns: Any, where: str) -> list[str]:
    if isinstance(patterns, str):
        patterns = [patterns]
    if not isinstance(patterns, (list, tuple)) or not all(isinstance(p, str) for p in patterns):
        raise _type_error(where, patterns, "a list of regular expressions (strings)")
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise DQError(f"{where} pattern {pattern!r} is not a valid regular expression: {exc}") from exc
    return list(patterns)


@dataclass
class Component:
    """An outlier-handling stage of a recipe. `include` / `exclude`: regexes (searched) of the
    layer names it applies to (empty include: every quantized layer it can apply to)."""

    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)

    name = "component"
    # JSON type of each option of the subclass ("bool", "int", "number", "str"; "?" suffix: or null),
    # checked before the subclass's own range checks
    option_types: ClassVar[dict[str, str]] = {}

    def __post_init__(self) -> None:
        for key, expected in self.option_types.items():
            _check_type(getattr(self, key), expected.rstrip("?"), f"{self.name}.{key}", nullable=expected.endswith("?"))
        self.include = _check_patterns(self.include, f"{self.name}.include")
        self.exclude = _check_patterns(self.exclude, f"{self.name}.exclude")

    def applies_to(self, layer: str) -> bool:
        if self.include and not any(re.search(p, layer) for p in self.include):
            return False
        return not any(re.search(p, layer) for p in self.exclude)

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.to_dict() if isinstance(value, QuantSpec) else (list(value) if isinstance(value, list) else value)
        return out

    @classmethod
    def from_any(cls, value: Any) -> Component | None:
        """None / false: off; true: the defaults; a mapping of options; or an instance."""
        if value is None or value is False:
            return None
        if value is True:
            return cls()
        if isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise _type_error(f"recipe field {cls.name}", value, "null, true/false or a mapping of options")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise DQError(f"unknown {cls.name} option(s) {unknown}; valid options: {sorted(known)}")
        return cls(**value)


def _positive_int(value: Any, where: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise DQError(f"{where} must be a positive integer, got {value!r}")


@dataclass
class SmoothConfig(Component):
    """Smoothing (SmoothQuant): per-channel scales s = a^alpha / w^(1-alpha) move activation
    outliers into the weight. alpha: a number in [0, 1], or "search" (per layer, the value of
    an (grid+1)-point grid refined to half its step, or no smoothing, with the smallest
    estimated output error). aggregate: how per-timestep channel ranges combine (dq.quant.smooth.AGGREGATIONS)."""

    alpha: float | str = "search"
    grid: int = 10
    aggregate: str = "rms"

    name = "smooth"
    option_types: ClassVar[dict[str, str]] = {"grid": "int", "aggregate": "str"}

    def __post_init__(self) -> None:
        super().__post_init__()
        from .quant.smooth import AGGREGATIONS

        if isinstance(self.alpha, str):
            if self.alpha != "search":
                raise DQError(f"smooth.alpha must be a number in [0, 1] or 'search', got {self.alpha!r}")
        elif isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 <= self.alpha <= 1:
            raise DQError(f"smooth.alpha must be a number in [0, 1] or 'search', got {self.alpha!r}")
        else:
            self.alpha = float(self.alpha)
        _positive_int(self.grid, "smooth.grid")
        if self.aggregate not in AGGREGATIONS:
            raise DQError(f"unknown smooth.aggregate {self.aggregate!r}; choose one of {list(AGGREGATIONS)}")


@dataclass
class RotateConfig(Component):
    """Randomized Hadamard rotation of layer inputs and weights. block_size: a power of two
    (null: the largest power of two dividing each layer's input width); seed: the random
    signs' seed (mixed with each layer's name)."""

    block_size: int | None = None
    seed: int = 0

    name = "rotate"
    option_types: ClassVar[dict[str, str]] = {"block_size": "int?", "seed": "int"}

    def __post_init__(self) -> None:
        super().__post_init__()
        from .quant.hadamard import is_power_of_two

        if self.block_size is not None and (
            isinstance(self.block_size, bool) or not is_power_of_two(self.block_size) or self.block_size < 2
        ):
            raise DQError(
                f"cannot build a Hadamard matrix of size {self.block_size!r}: rotate.block_size must be a "
                "power of two >= 2, or null for the largest power of two dividing each layer's width"
            )
        if not isinstance(self.seed, int):
            raise DQError(f"rotate.seed must be an integer, got {self.seed!r}")


@dataclass
class LowRankConfig(Component):
    """SVDQuant low-rank branch: W = L1 L2 (rank `rank`, float) + R (quantized), the split refit
    `iters` times to W - Q(R)."""

    rank: int = 32
    iters: int = 3

    name = "lowrank"
    option_types: ClassVar[dict[str, str]] = {"rank": "int", "iters": "int"}

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive_int(self.rank, "lowrank.rank")
        if not isinstance(self.iters, int) or self.iters < 0:
            raise DQError(f"lowrank.iters must be a non-negative integer, got {self.iters!r}")


@dataclass
class GPTQConfig(Component):
    """GPTQ error-compensating rounding from the calibration inputs' second moment.
    damp: fraction of mean(diag H) added to the diagonal; block_size: columns per lazy
    update block; act_order: process columns by decreasing input energy (static groups)."""

    damp: float = 0.01
    block_size: int = 128
    act_order: bool = False

    name = "gptq"
    option_types: ClassVar[dict[str, str]] = {"damp": "number", "block_size": "int", "act_order": "bool"}

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.damp, bool) or not isinstance(self.damp, (int, float)) or not 0 < self.damp < 1:
            raise DQError(f"gptq.damp must be a number in (0, 1), got {self.damp!r}")
        self.damp = float(self.damp)
        _positive_int(self.block_size, "gptq.block_size")
        if not isinstance(self.act_order, bool):
            raise DQError(f"gptq.act_order must be true or false, got {self.act_order!r}")


PROBS_QUANTIZERS = ("log2", "uniform", "none")


@dataclass
class AttentionConfig(Component):
    """Quantized attention (through diffusers attention processors). probs: quantizer of the
    post-softmax probabilities, "log2" (levels 2^-k and zero), "uniform" (on [0, 1]) or
    "none"; probs_bits: its width (log2 is the better choice up to 4 bits, where uniform levels
    round most probabilities to zero; from 6 bits on, uniform is more accurate); qkv:
    quantizer of Q, K and V (dynamic per token and head),
    or null. include / exclude match attention module names (e.g. 'attn1' for self-attention).
    int8: run Q K^T and P V as real int8 matmuls instead (`dq.nn.attention.int8_attention`:
    K smoothed by its mean over tokens, Q and K int8 per token, V int8 per channel, P as 7-bit
    codes of exp(s - max)); probs, probs_bits and qkv are then not used (qkv must be null)."""

    probs: str = "log2"
    probs_bits: int = 4
    qkv: QuantSpec | None = None
    int8: bool = False

    name = "attention"
    option_types: ClassVar[dict[str, str]] = {"probs": "str", "probs_bits": "int", "int8": "bool"}

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.probs not in PROBS_QUANTIZERS:
            raise DQError(f"unknown attention.probs quantizer {self.probs!r}; choose one of {list(PROBS_QUANTIZERS)}")
        if isinstance(self.probs_bits, bool) or not isinstance(self.probs_bits, int) or not 2 <= self.probs_bits <= 8:
            raise DQError(f"attention.probs_bits must be an integer from 2 to 8, got {self.probs_bits!r}")
        self.qkv = _spec(self.qkv, "attention.qkv")
        if self.qkv is not None:
            if self.qkv.granularity not in ("token", "tensor") or self.qkv.log:
                raise DQError("attention.qkv must be a dynamic 'token' or 'tensor' quantizer without log")
            self.qkv = self.qkv.replace(dynamic=True)
        if not isinstance(self.int8, bool):
            raise DQError(f"attention.int8 must be true or false, got {self.int8!r}")
        if self.int8 and self.qkv is not None:
            raise DQError("attention.int8 quantizes Q, K and V itself; set attention.qkv to null")
        if self.probs == "none" and self.qkv is None and not self.int8:
            raise DQError("attention quantizes nothing: set probs to 'log2' or 'uniform', or give a qkv quantizer")


SENSITIVITY_MODES = ("auto", "estimate", "measure")
# How a measured sensitivity is taken (dq.mixed): "trajectory" (this layer alone in the lowest format,
# damage on the final latents of sampled trajectories; other formats scaled by the layer's own output
# error, dq.mixed.trajectory), "in-context" (leave-one-in: every other layer at the lowest format,
# this one raised) or "alone" (this layer quantized alone in the float model, recorded calls).
MEASURE_METHODS = ("trajectory", "in-context", "alone")
SELECT_METHODS = ("proxy", "sampled")
# Weight formats a mixed-precision allocation chooses among, besides float (dq.mixed.weight_formats).
WEIGHT_FORMATS = ("int4", "int4g32", "int5", "int6", "int8", "fp8")


@dataclass
class MixedConfig:
    """Options of the mixed-precision allocation (used when a recipe has a `budget` or `memory`).

    weights: candidate weight formats per layer ("int4": 4-bit groups of 64, or the recipe's own
        4-bit spec; "int4g32": 4-bit groups of 32, a quarter bit more per weight; "int5", "int6": per
        channel with an MSE range, packed in bit planes; "int8": per channel; "fp8": e4m3 per
        channel), each with the activation format a uniform recipe of that weight format gives the
        layer (`dq.mixed.activation_rule`); float is always a candidate. sensitivity: "measure"
        (damage measured as `measure` says), "estimate" (analytic from the inputs' second moments) or "auto" (estimate,
        validated against measurement on `sample` layers; measure everything when their rank
        correlation is below 0.8). measure: "trajectory" (the default: this layer alone in the
        lowest format, the damage on the final latents of `trajectory_prompts` calibration prompts
        sampled closed loop with the calibration steps and the pipeline's guidance; each other
        format scaled by the layer's own output error, `dq.mixed.trajectory`), "in-context"
        (leave-one-in on recorded calls: every layer in scope at the lowest format, the damage
        when this one alone is raised to a higher format or float) or "alone" (this layer alone
        quantized in the float model, on recorded calls). rounds: in context, with a
        budget, measure again around the plan the previous measurement solves (up to `rounds`
        measurements in all; 1: only around the lowest format). num_prompts / steps:
        calibration prompts and sampler steps of the recorded calls (steps null: the recipe's
        calib_steps). trajectory_prompts: calibration prompts sampled per layer by "trajectory"
        (each run: the calibration steps). select: how the final plan is chosen among the plans the measurement
        produced: "proxy" (the lowest whole-model error on the recorded calls, `select_plan`) or
        "sampled" (each candidate sampled closed loop on `select_prompts` calibration prompts,
        the closest final latents to full precision; `dq.mixed.sampled`: about 9 candidates, one
        pipeline run of `select_prompts` prompts each)."""

    weights: list[str] = field(default_factory=lambda: ["int4", "int5", "int6", "int8"])
    sensitivity: str = "auto"
    num_prompts: int = 1
    steps: int | None = 4
    sample: int = 12
    measure: str = "trajectory"
    trajectory_prompts: int = 2
    rounds: int = 2
    select: str = "proxy"
    select_prompts: int = 8

    def __post_init__(self) -> None:
        if isinstance(self.weights, str):
            self.weights = [self.weights]
        if not isinstance(self.weights, (list, tuple)) or not self.weights:
            raise _type_error("mixed.weights", self.weights, f"a non-empty list of weight formats from {list(WEIGHT_FORMATS)}")
        bad = [w for w in self.weights if w not in WEIGHT_FORMATS]
        if bad:
            raise DQError(f"unknown mixed.weights format(s) {bad}; choose from {list(WEIGHT_FORMATS)} (float is always a candidate)")
        self.weights = list(dict.fromkeys(self.weights))
        if self.sensitivity not in SENSITIVITY_MODES:
            raise DQError(f"mixed.sensitivity must be one of {list(SENSITIVITY_MODES)}, got {self.sensitivity!r}")
        if self.measure not in MEASURE_METHODS:
            raise DQError(f"mixed.measure must be one of {list(MEASURE_METHODS)}, got {self.measure!r}")
        _positive_int(self.num_prompts, "mixed.num_prompts")
        _positive_int(self.sample, "mixed.sample")
        _positive_int(self.rounds, "mixed.rounds")
        _positive_int(self.trajectory_prompts, "mixed.trajectory_prompts")
        _positive_int(self.select_prompts, "mixed.select_prompts")
        if self.select not in SELECT_METHODS:
            raise DQError(f"mixed.select must be one of {list(SELECT_METHODS)}, got {self.select!r}")
        if self.select == "sampled" and self.measure != "in-context":
            raise DQError(f"mixed.select: sampled chooses among the plans an in-context measurement produces; with "
                          f"mixed.measure: {self.measure} there is one plan per budget. Set mixed.measure: in-context, "
                          "or leave mixed.select at proxy")
        if self.steps is not None:
            _positive_int(self.steps, "mixed.steps")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: (list(getattr(self, f.name)) if f.name == "weights" else getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_any(cls, value: Any) -> MixedConfig:
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise _type_error("recipe field mixed", value, "a mapping of mixed-precision options or null")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise DQError(f"unknown mixed option(s) {unknown}; valid options: {sorted(known)}")
        return cls(**value)


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_memory(value: Any, where: str = "memory") -> int:
    """Bytes from an integer or a size string: "2GB" (10^9), "1.5GiB" (2^30), "800MB", "512KiB", "123456"."""
    if isinstance(value, bool):
        raise _type_error(where, value, "a size such as 2GB, 1.5GiB or a number of bytes")
    if isinstance(value, (int, float)):
        number, unit = float(value), ""
    elif isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", value)
        if match is None or match[2].upper() not in _UNITS:
            raise DQError(
                f"{where} {value!r} is not a size: write a number with an optional unit B, KB, MB, GB, TB "
                "(powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024), e.g. 2GB or 1.5MiB"
            )
        number, unit = float(match[1]), match[2].upper()
    else:
        raise _type_error(where, value, "a size such as 2GB, 1.5GiB or a number of bytes")
    size = number * _UNITS[unit]
    if not math.isfinite(size) or size < 1:
        raise DQError(f"{where} must be at least 1 byte, got {value!r}")
    return int(size)


# The outlier-handling stages a recipe can switch on, in the order they are applied to a layer
# (attention acts on attention modules, beside the layers).
COMPONENTS: dict[str, type[Component]] = {
    "smooth": SmoothConfig,
    "rotate": RotateConfig,
    "lowrank": LowRankConfig,
    "gptq": GPTQConfig,
    "attention": AttentionConfig,
}


@dataclass
class Recipe:
    """How to quantize a denoiser.

    weight / activation: the default quantizers (activation None = weight-only).
    timestep_groups: number of groups of denoising steps that get their own static
        activation ranges (looked up by timestep value at inference).
    calib_prompts: name of a prompt set in calib/ or a path; calib_steps: sampler
        steps per calibration prompt; calib_batch_size: prompts per pipeline call.
    keep: extra regexes of layers to leave in full precision, on top of the
        architecture's defaults (`keep_defaults: false` drops those defaults).
    overrides: per-layer specs (mixed precision).
    execution: "real" runs low-bit kernels (int8/fp8 matmuls, packed 4-bit weights),
        "sim" fake-quantizes in float (research), "auto" picks real where supported.
    budget / memory: mixed precision (dq.mixed): choose each layer's weight format (or float)
        to minimize the measured damage under an average of `budget` weight bits or a denoiser
        of at most `memory` bytes (an integer or a size string such as "2GB"); `mixed` holds
        its options (`MixedConfig`), `allocation` the solved plan ({layer: format}), which
        `dq.quantize` fills in and follows as is when given (no re-solving).
    weight_only_int8_activations: weight-only layers (activation null, e.g. w4a16) may run
        as int8 x int8 with dynamic per-token int8 activations where that is faster (kernel
        path "int_mm_a8"): it rounds their inputs, so it is off unless set.
    weight_only_bf16_activations: weight-only layers may run their op in bfloat16 from a float32
        input (kernel path "bf16": input, weight and product rounded to bfloat16, float32
        accumulation) where the kernel choice measures it faster: on CPUs with bfloat16 matmul
        instructions (AVX-512 BF16, AMX) about 2x the float32 op. 16-bit activations, as "A16"
        says; on in the w4a16 preset and, for their weight-only layers (PixArt's caption
        projection, SD3's context embedder), in w8a8, w8a8-dynamic, w4a8 and w4a4; off in the
        RTN baselines and unless set.
    attention_bf16_where_faster: the attention core, softmax(Q K^T / sqrt(d)) V, of `Attention`
        modules with diffusers' default SDPA processor (`AttnProcessor2_0`) may run on bfloat16
        Q, K, V from float32 inputs (`dq.nn.bf16_attention`) where the kernel choice measures it
        faster: 1.7-2.6x the float32 core on an AMX Xeon; about 49 dB SQNR on the attention
        output. On in the calibrated W*A* presets (w8a8, w8a8-dynamic, w4a8, w4a4, w4a16), off
        in the RTN baselines, fp8, w8a16 and unless set; a recipe's `attention` option wins.
    float_activations_where_faster: small layers whose quantized activations cost more than
        the integer matmul saves (narrow layers, dynamic per-token activations on a CPU) may
        run as the float op on their quantized weight with the input not quantized (kernel
        path "float_input": a kept float weight copy, only for layers of at most 1 MiB), where the
        kernel choice measures it faster, the layer's smoothing and low-rank branch counted (they
        fold into that copy; the integer paths pay them on top). It skips their activation
        rounding (closer to full precision than the recipe simulates). On in every preset with
        quantized activations but fp8 and the RTN baselines: on the embedded default pipeline
        (width 128) it takes the denoiser step from 0.86x to 1.01x fp32 (w4a4) and 1.02x to
        1.05x (w8a8-dynamic) at one thread, and w8a8 from 0.94-0.99x to 1.06-1.07x at two
        (AMD EPYC Zen 4, 2026-12-02); at DiT widths no layer is small enough (a 1152-wide
        layer's copy is over 1 MiB), so nothing changes there. Off unless set otherwise;
        `set_execution(model, "real", float_activations=False)` turns it off on a loaded model.
    smooth / rotate / lowrank / gptq / attention: outlier-handling components (see
        `COMPONENTS`), each null (off), true (defaults) or a mapping of its options. Per
        layer they apply as: x -> (x / s) R,  W -> ((W * s) R = L1 L2 + R_w),  R_w rounded by
        GPTQ or to nearest; attention quantizes softmax probabilities and Q/K/V.
    """

    name: str = "custom"
    weight: QuantSpec | None = field(default_factory=lambda: QuantSpec(bits=8))
    activation: QuantSpec | None = field(default_factory=lambda: QuantSpec(bits=8, granularity="tensor"))
    timestep_groups: int = 4
    calib_prompts: str = "default"
    calib_num_prompts: int = 16
    calib_steps: int = 20
    calib_batch_size: int = 4
    calib_seed: int = 0
    histogram_bins: int = 1024
    keep: list[str] = field(default_factory=list)
    keep_defaults: bool = True
    overrides: list[LayerOverride] = field(default_factory=list)
    execution: str = "auto"
    weight_only_int8_activations: bool = False
    float_activations_where_faster: bool = False
    weight_only_bf16_activations: bool = False
    attention_bf16_where_faster: bool = False
    smooth: SmoothConfig | None = None
    rotate: RotateConfig | None = None
    lowrank: LowRankConfig | None = None
    gptq: GPTQConfig | None = None
    attention: AttentionConfig | None = None
    budget: float | None = None
    memory: int | str | None = None
    mixed: MixedConfig | None = None
    allocation: dict[str, str] | None = None
    description: str = ""

    def __post_init__(self) -> None:
        for key in ("name", "calib_prompts", "execution", "description"):
            _check_type(getattr(self, key), "str", f"recipe field {key}")
        _check_type(self.keep_defaults, "bool", "recipe field keep_defaults")
        _check_type(self.weight_only_int8_activations, "bool", "recipe field weight_only_int8_activations")
        _check_type(self.float_activations_where_faster, "bool", "recipe field float_activations_where_faster")
        _check_type(self.weight_only_bf16_activations, "bool", "recipe field weight_only_bf16_activations")
        _check_type(self.attention_bf16_where_faster, "bool", "recipe field attention_bf16_where_faster")
        for key in ("timestep_groups", "calib_num_prompts", "calib_steps", "calib_batch_size", "histogram_bins"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise _type_error(f"recipe field {key}", value, "a positive integer")
        _check_type(self.calib_seed, "int", "recipe field calib_seed")
        if self.calib_seed < 0:
            raise DQError(f"recipe field calib_seed must be a non-negative integer, got {self.calib_seed!r}")
        self.weight = _spec(self.weight, "recipe field weight")
        self.activation = _spec(self.activation, "recipe field activation")
        if self.weight is None and self.activation is None:
            raise DQError("the recipe quantizes nothing: give it a weight and/or an activation spec")
        if self.weight is not None and self.weight.granularity == "token":
            raise DQError("weights cannot use granularity 'token'; use 'channel' or 'group'")
        if self.activation is not None and self.activation.granularity in ("channel", "group"):
            raise DQError(
                f"activation granularity {self.activation.granularity!r} is not supported; use 'tensor' "
                "(static, calibrated per timestep group) or 'token' (dynamic)"
            )
        self.keep = _check_patterns(self.keep, "recipe field keep")
        if self.execution not in ("auto", "real", "sim"):
            raise DQError(f"recipe field execution must be 'auto', 'real' or 'sim', got {self.execution!r}")
        if not isinstance(self.overrides, (list, tuple)):
            raise _type_error("recipe field overrides", self.overrides, "a list of mappings with a 'pattern' key")
        self.overrides = [o if isinstance(o, LayerOverride) else _override_from_dict(o) for o in self.overrides]
        for key, cls in COMPONENTS.items():
            setattr(self, key, cls.from_any(getattr(self, key)))
        self._check_mixed()

    def _check_mixed(self) -> None:
        if self.budget is not None:
            _check_type(self.budget, "number", "recipe field budget (average weight bits)", nullable=True)
            if not math.isfinite(self.budget) or self.budget <= 0:
                raise DQError(f"recipe field budget must be a positive number of average weight bits, got {self.budget!r}")
            self.budget = float(self.budget)
        if self.memory is not None:
            self.memory = parse_memory(self.memory, "recipe field memory")
        if self.budget is not None and self.memory is not None:
            raise DQError("give a recipe either a budget (average weight bits) or a memory budget (bytes), not both")
        self.mixed = None if self.mixed is None and self.budget is None and self.memory is None else MixedConfig.from_any(self.mixed)
        if self.allocation is not None:
            if not isinstance(self.allocation, dict):
                raise _type_error("recipe field allocation", self.allocation, "a mapping of layer names to formats")
            allowed = (*WEIGHT_FORMATS, "float")
            bad = {k: v for k, v in self.allocation.items() if not isinstance(k, str) or v not in allowed}
            if bad:
                raise DQError(f"recipe field allocation: formats must be one of {list(allowed)}, got {bad}")
            self.allocation = dict(self.allocation)

    def components(self) -> dict[str, Component]:
        """The outlier-handling components switched on, by name, in application order."""
        return {key: getattr(self, key) for key in COMPONENTS if getattr(self, key) is not None}

    @property
    def needs_calibration(self) -> bool:
        specs = [self.activation] + [o.activation for o in self.overrides]
        # smoothing needs activation ranges, GPTQ the inputs' second moment
        return any(s is not None and not s.dynamic for s in specs) or self.smooth is not None or self.gptq is not None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (QuantSpec, Component, MixedConfig)):
                value = value.to_dict()
            elif isinstance(value, dict):
                value = dict(value)
            elif f.name == "overrides":
                value = [o.to_dict() for o in value]
            elif isinstance(value, list):
                value = list(value)
            out[f.name] = value
        out["format_version"] = FORMAT_VERSION
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        if not isinstance(data, dict):
            raise DQError(f"a recipe must be a mapping, got {type(data).__name__}")
        data = dict(data)
        bad_keys = [k for k in data if not isinstance(k, str)]
        if bad_keys:
            raise DQError(f"recipe field names must be strings, got {bad_keys!r}")
        version = data.pop("format_version", FORMAT_VERSION)
        _check_type(version, "int", "recipe field format_version")
        if version > FORMAT_VERSION:
            raise DQError(f"recipe format version {version} is newer than this dq ({FORMAT_VERSION}); upgrade dq")
        base = data.pop("base", None)
        if base is not None:
            _check_type(base, "str", "recipe field base")
            merged = preset(base).to_dict()
            merged.pop("format_version")
            merged["name"] = "custom"
            merged["description"] = f"based on {base}"
            merged.update(data)
            data = merged
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise DQError(
                f"unknown recipe field(s) {unknown}; valid fields: {sorted(known | {'base'})} "
                f"(the outlier-handling components are {list(COMPONENTS)})"
            )
        return cls(**data)

    @classmethod
    def from_file(cls, path: str | Path) -> Recipe:
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise DQError(f"cannot read recipe file {path}: {exc}") from exc
        try:
            data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as exc:
            raise DQError(f"recipe file {path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {exc}") from exc
        try:
            recipe = cls.from_dict(data if data is not None else {})
        except DQError as exc:
            raise DQError(f"recipe file {path}: {exc}") from exc
        if recipe.name == "custom":
            recipe.name = path.stem
        return recipe

    def save(self, path: str | Path) -> None:
        path = Path(path)
        text = json.dumps(self.to_dict(), indent=2) if path.suffix == ".json" else yaml.safe_dump(self.to_dict(), sort_keys=False)
        path.write_text(text)

    @classmethod
    def from_any(cls, recipe: str | Path | Recipe | dict[str, Any]) -> Recipe:
        if isinstance(recipe, Recipe):
            return recipe
        if isinstance(recipe, dict):
            return cls.from_dict(recipe)
        if isinstance(recipe, (str, Path)):
            text = str(recipe)
            if text in PRESETS:
                return preset(text)
            if Path(text).suffix in (".yaml", ".yml", ".json") or Path(text).exists():
                return cls.from_file(text)
            raise DQError(f"unknown recipe {text!r}; presets are {recipes()}, or pass a .yaml/.json recipe file")
        raise DQError(f"recipe must be a preset name, a path, a mapping or a Recipe, got {type(recipe).__name__}")


def _override_from_dict(data: Any) -> LayerOverride:
    if not isinstance(data, dict) or "pattern" not in data:
        raise DQError(f"each override needs a mapping with a 'pattern' key (a regex of layer names), got {data!r}")
    known = {f.name for f in fields(LayerOverride)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise DQError(f"unknown override field(s) {unknown}; valid fields: {sorted(known)}")
    return LayerOverride(**data)


def recipes() -> list[str]:
    """Names of the preset recipes."""
    return list(PRESETS)


def preset(name: str) -> Recipe:
    if name not in PRESETS:
        raise DQError(f"unknown recipe {name!r}; presets are {recipes()}, or pass a .yaml/.json recipe file")
    spec = PRESETS[name]
    copy = {k: (v.replace() if isinstance(v, QuantSpec) else v) for k, v in spec.items()}
    return Recipe(name=name, **copy)
