"""Recipes: what to quantize and how, as one validated config.

A recipe is plain data: it round-trips through `to_dict`/`from_dict` and loads from
YAML or JSON. `Recipe.from_any` accepts a preset name, a recipe object, a mapping or
a file path, which is what `dq.quantize` and the CLI take.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .errors import DQError
from .quant.spec import QuantSpec

FORMAT_VERSION = 1


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
        try:
            re.compile(self.pattern)
        except re.error as exc:
            raise DQError(f"override pattern {self.pattern!r} is not a valid regular expression: {exc}") from exc
        self.weight = QuantSpec.from_dict(self.weight)
        self.activation = QuantSpec.from_dict(self.activation)

    def to_dict(self) -> dict[str, Any]:
        return {
            "pattern": self.pattern,
            "weight": self.weight.to_dict() if self.weight else None,
            "activation": self.activation.to_dict() if self.activation else None,
            "keep": self.keep,
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
    description: str = ""

    def __post_init__(self) -> None:
        self.weight = QuantSpec.from_dict(self.weight)
        self.activation = QuantSpec.from_dict(self.activation)
        if self.weight is None and self.activation is None:
            raise DQError("the recipe quantizes nothing: give it a weight and/or an activation spec")
        if self.weight is not None and self.weight.granularity == "token":
            raise DQError("weights cannot use granularity 'token'; use 'channel' or 'group'")
        if self.activation is not None and self.activation.granularity in ("channel", "group"):
            raise DQError(
                f"activation granularity {self.activation.granularity!r} is not supported; use 'tensor' "
                "(static, calibrated per timestep group) or 'token' (dynamic)"
            )
        for key in ("timestep_groups", "calib_num_prompts", "calib_steps", "calib_batch_size", "histogram_bins"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise DQError(f"recipe field {key} must be a positive integer, got {value!r}")
        for pattern in self.keep:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise DQError(f"keep pattern {pattern!r} is not a valid regular expression: {exc}") from exc
        if self.execution not in ("auto", "real", "sim"):
            raise DQError(f"execution must be 'auto', 'real' or 'sim', got {self.execution!r}")
        self.overrides = [o if isinstance(o, LayerOverride) else _override_from_dict(o) for o in self.overrides]

    @property
    def needs_calibration(self) -> bool:
        specs = [self.activation] + [o.activation for o in self.overrides]
        return any(s is not None and not s.dynamic for s in specs)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, QuantSpec):
                value = value.to_dict()
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
        version = data.pop("format_version", FORMAT_VERSION)
        if version > FORMAT_VERSION:
            raise DQError(f"recipe format version {version} is newer than this dq ({FORMAT_VERSION}); upgrade dq")
        base = data.pop("base", None)
        if base is not None:
            merged = preset(base).to_dict()
            merged.pop("format_version")
            merged["name"] = "custom"
            merged["description"] = f"based on {base}"
            merged.update(data)
            data = merged
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise DQError(f"unknown recipe field(s) {unknown}; valid fields: {sorted(known | {'base'})}")
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
        recipe = cls.from_dict(data or {})
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
            if text in _PRESETS:
                return preset(text)
            if Path(text).suffix in (".yaml", ".yml", ".json") or Path(text).exists():
                return cls.from_file(text)
            raise DQError(f"unknown recipe {text!r}; presets are {recipes()}, or pass a .yaml/.json recipe file")
        raise DQError(f"recipe must be a preset name, a path, a mapping or a Recipe, got {type(recipe).__name__}")


def _override_from_dict(data: Any) -> LayerOverride:
    if not isinstance(data, dict) or "pattern" not in data:
        raise DQError("each override needs a mapping with a 'pattern' key (a regex of layer names)")
    known = {f.name for f in fields(LayerOverride)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise DQError(f"unknown override field(s) {unknown}; valid fields: {sorted(known)}")
    return LayerOverride(**data)


def _w(bits: int, **kw: Any) -> QuantSpec:
    return QuantSpec(bits=bits, **kw)


# Presets. Weights: int8 per output channel; 4-bit per group of 64 with an MSE clip
# search. Activations: int8 static per tensor, a range per timestep group chosen by
# MSE on the calibration histogram; 4-bit activations dynamic per token.
_PRESETS: dict[str, dict[str, Any]] = {
    "w8a8": dict(
        weight=_w(8, granularity="channel"),
        activation=_w(8, granularity="tensor", symmetric=False, range="mse"),
        description="int8 weights (per channel) and int8 static activations per timestep group",
    ),
    "w4a8": dict(
        weight=_w(4, granularity="group", group_size=64, range="mse"),
        activation=_w(8, granularity="tensor", symmetric=False, range="mse"),
        description="int4 weights (group 64) and int8 static activations per timestep group",
    ),
    "w4a16": dict(
        weight=_w(4, granularity="group", group_size=64, range="mse"),
        activation=None,
        description="int4 weights (group 64), activations in full precision",
    ),
    "w4a4": dict(
        weight=_w(4, granularity="group", group_size=64, range="mse"),
        activation=_w(4, granularity="token", symmetric=False),
        description="int4 weights (group 64) and int4 dynamic per-token activations",
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


def recipes() -> list[str]:
    """Names of the preset recipes."""
    return list(_PRESETS)


def preset(name: str) -> Recipe:
    if name not in _PRESETS:
        raise DQError(f"unknown recipe {name!r}; presets are {recipes()}, or pass a .yaml/.json recipe file")
    spec = _PRESETS[name]
    copy = {k: (v.replace() if isinstance(v, QuantSpec) else v) for k, v in spec.items()}
    return Recipe(name=name, **copy)
