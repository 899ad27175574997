"""`QuantSpec`: how one tensor (a weight or an activation) is quantized."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from ..errors import DQError

# name -> (max representable magnitude, exponent bits, mantissa bits)
FP_FORMATS: dict[str, tuple[float, int, int]] = {
    "fp8_e4m3": (448.0, 4, 3),
    "fp8_e5m2": (57344.0, 5, 2),
    "fp4_e2m1": (6.0, 2, 1),
}
KINDS = ("int", *FP_FORMATS)
GRANULARITIES = ("tensor", "channel", "group", "token")
RANGES = ("minmax", "percentile", "mse")


@dataclass
class QuantSpec:
    """One tensor's quantizer.

    kind: "int" (uniform integer, `bits` 2..8) or a simulated float format
        ("fp8_e4m3", "fp8_e5m2", "fp4_e2m1"; `bits` is implied).
    granularity: one scale per "tensor", per output "channel" (weights), per
        input "group" of `group_size` values, or per "token" (activations: one
        scale per row, computed at run time, so it implies `dynamic`).
    range: how the clipping range is chosen: "minmax", "percentile" (of |x|),
        or "mse" (grid search of the clip minimizing squared error).
    dynamic: activations only: compute the range at run time instead of
        using calibrated per-timestep static ranges.
    log: weights only: log2-domain levels instead of uniform ones (issue 4).
    """

    bits: int = 8
    kind: str = "int"
    symmetric: bool = True
    granularity: str = "channel"
    group_size: int = 64
    range: str = "minmax"
    percentile: float = 99.99
    dynamic: bool = False
    log: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise DQError(f"unknown quantizer kind {self.kind!r}; choose one of {list(KINDS)}")
        if self.kind == "int":
            if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
                raise DQError(
                    f"integer bit width {self.bits!r} is out of range; use an integer from 2 to 8 "
                    "(or a float kind such as 'fp8_e4m3')"
                )
        else:
            self.bits = 8 if self.kind.startswith("fp8") else 4
            if not self.symmetric:
                raise DQError(f"{self.kind} is a signed float format; set symmetric: true")
        if self.granularity not in GRANULARITIES:
            raise DQError(
                f"unknown granularity {self.granularity!r}; choose one of {list(GRANULARITIES)}"
            )
        if self.granularity == "group" and (not isinstance(self.group_size, int) or self.group_size < 2):
            raise DQError(f"group_size must be an integer >= 2, got {self.group_size!r}")
        if self.range not in RANGES:
            raise DQError(f"unknown range method {self.range!r}; choose one of {list(RANGES)}")
        if not 50.0 < self.percentile <= 100.0:
            raise DQError(f"percentile must be in (50, 100], got {self.percentile}")
        if self.granularity == "token":
            self.dynamic = True
        if self.log and self.kind != "int":
            raise DQError("log quantization applies to integer kinds only; set kind: int")

    # Codes are signed in both modes so that any bit width <= 8 is stored as int8:
    # symmetric uses the restricted range [-(2^(b-1)-1), 2^(b-1)-1] (zero is exact,
    # negation is closed), asymmetric the full [-2^(b-1), 2^(b-1)-1] with a zero point.
    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1) - 1) if self.symmetric else -(2 ** (self.bits - 1))

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | QuantSpec | None) -> QuantSpec | None:
        if data is None or isinstance(data, QuantSpec):
            return data
        if not isinstance(data, dict):
            raise DQError(f"a quantizer spec must be a mapping, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise DQError(f"unknown quantizer option(s) {unknown}; valid options: {sorted(known)}")
        return cls(**data)

    def replace(self, **changes: Any) -> QuantSpec:
        return QuantSpec(**{**self.to_dict(), **changes})
