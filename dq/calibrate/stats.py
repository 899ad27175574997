"""Streaming, mergeable activation statistics.

Nothing here keeps raw activations: each (layer, timestep, CFG branch) holds
per-channel absmax/min/max and a sum of squares, a token count, and a signed
histogram whose range is a power of two, so two histograms always merge exactly
(the narrower one is folded into the wider one's bins). Every field reduces by sum,
max or min, which is what several processes need to calibrate together.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from ..errors import DQError


@dataclass
class ActivationStats:
    """Statistics of one layer input for one timestep and branch."""

    count: int
    absmax: torch.Tensor  # [C]
    min: torch.Tensor  # [C]
    max: torch.Tensor  # [C]
    sumsq: torch.Tensor  # [C]
    hist: torch.Tensor | None  # [bins] over [-2**hist_exp, 2**hist_exp]
    hist_exp: int

    @classmethod
    def from_rows(cls, rows: torch.Tensor, bins: int | None) -> ActivationStats:
        """Statistics of `rows` ([tokens, channels], float32)."""
        lo, hi = rows.amin(dim=0), rows.amax(dim=0)
        absmax = torch.maximum(hi.abs(), lo.abs())
        exp = _range_exp(float(absmax.max()))
        hist = None
        if bins:
            limit = 2.0**exp
            hist = torch.histc(rows, bins=bins, min=-limit, max=limit)
        return cls(rows.shape[0], absmax, lo, hi, rows.pow(2).sum(dim=0), hist, exp)

    @property
    def mean_sq(self) -> torch.Tensor:
        return self.sumsq / max(self.count, 1)

    def merge_(self, other: ActivationStats) -> ActivationStats:
        if other.absmax.shape != self.absmax.shape:
            raise DQError(f"cannot merge statistics of {other.absmax.numel()} and {self.absmax.numel()} channels")
        self.count += other.count
        self.absmax = torch.maximum(self.absmax, other.absmax)
        self.min = torch.minimum(self.min, other.min)
        self.max = torch.maximum(self.max, other.max)
        self.sumsq = self.sumsq + other.sumsq
        if self.hist is not None and other.hist is not None:
            exp = max(self.hist_exp, other.hist_exp)
            self.hist = _widen(self.hist, self.hist_exp, exp) + _widen(other.hist, other.hist_exp, exp)
            self.hist_exp = exp
        else:
            self.hist = None
            self.hist_exp = max(self.hist_exp, other.hist_exp)
        return self

    def copy(self) -> ActivationStats:
        return ActivationStats(
            self.count, self.absmax.clone(), self.min.clone(), self.max.clone(), self.sumsq.clone(),
            None if self.hist is None else self.hist.clone(), self.hist_exp,
        )

    def to_tensors(self) -> dict[str, torch.Tensor]:
        out = {
            "count": torch.tensor(self.count, dtype=torch.int64),
            "absmax": self.absmax, "min": self.min, "max": self.max, "sumsq": self.sumsq,
            "hist_exp": torch.tensor(self.hist_exp, dtype=torch.int64),
        }
        if self.hist is not None:
            out["hist"] = self.hist
        return out

    @classmethod
    def from_tensors(cls, data: dict[str, torch.Tensor]) -> ActivationStats:
        return cls(
            int(data["count"]), data["absmax"], data["min"], data["max"], data["sumsq"],
            data.get("hist"), int(data["hist_exp"]),
        )


def _range_exp(absmax: float) -> int:
    if not math.isfinite(absmax):
        raise DQError("non-finite activation range")
    return max(-30, math.ceil(math.log2(absmax))) if absmax > 0 else -30


def _widen(hist: torch.Tensor, exp: int, new_exp: int) -> torch.Tensor:
    """Re-bin a histogram over [-2**exp, 2**exp] onto [-2**new_exp, 2**new_exp]."""
    bins = hist.numel()
    for _ in range(new_exp - exp):
        if bins % 4:
            raise DQError("histogram bin count must be a multiple of 4")
        pairs = hist.reshape(-1, 2).sum(dim=1)  # bins/2 bins, each twice as wide
        pad = torch.zeros(bins // 4, dtype=hist.dtype, device=hist.device)
        hist = torch.cat([pad, pairs, pad])
    return hist


@dataclass
class SecondMoment:
    """H = sum x x^T over every token seen by one layer (all timesteps and branches).

    Collected only for layers whose recipe needs it (smoothing search, GPTQ): it is
    d x d per layer. Rows are the layer's input vectors (a conv's im2col patches).
    Accumulated in float64; merges by sum.
    """

    sum: torch.Tensor  # [D, D] float64
    count: int

    @classmethod
    def from_rows(cls, rows: torch.Tensor) -> SecondMoment:
        rows = rows.float()
        return cls((rows.T @ rows).double(), rows.shape[0])

    def merge_(self, other: SecondMoment) -> SecondMoment:
        if other.sum.shape != self.sum.shape:
            raise DQError(f"cannot merge second moments of shapes {tuple(other.sum.shape)} and {tuple(self.sum.shape)}")
        self.sum = self.sum + other.sum
        self.count += other.count
        return self

    def copy(self) -> SecondMoment:
        return SecondMoment(self.sum.clone(), self.count)


Key = tuple[str, float, str]  # (layer name, timestep value, branch)
_MOMENT = "moment|"  # state-dict prefix of second moments


class StatsStore:
    """All statistics of one calibration run, keyed by (layer, timestep, branch)."""

    def __init__(self) -> None:
        self.entries: dict[Key, ActivationStats] = {}
        self.moments: dict[str, SecondMoment] = {}

    def add(self, key: Key, stats: ActivationStats) -> None:
        current = self.entries.get(key)
        if current is None:
            self.entries[key] = stats
        else:
            current.merge_(stats)

    def add_moment(self, layer: str, moment: SecondMoment) -> None:
        current = self.moments.get(layer)
        if current is None:
            self.moments[layer] = moment
        else:
            current.merge_(moment)

    def moment(self, layer: str) -> SecondMoment | None:
        return self.moments.get(layer)

    def merge_(self, other: StatsStore) -> StatsStore:
        for key, stats in other.entries.items():
            self.add(key, stats.copy())
        for layer, moment in other.moments.items():
            self.add_moment(layer, moment.copy())
        return self

    def layers(self) -> list[str]:
        return sorted({k[0] for k in self.entries})

    def timesteps(self) -> list[float]:
        return sorted({k[1] for k in self.entries})

    def branches(self) -> list[str]:
        return sorted({k[2] for k in self.entries})

    def select(
        self, layer: str, timesteps: Iterable[float] | None = None, branch: str | None = None
    ) -> ActivationStats | None:
        """Merge of one layer's statistics over the given timesteps and branch (all if None)."""
        wanted = None if timesteps is None else set(timesteps)
        merged: ActivationStats | None = None
        for (name, t, b), stats in self.entries.items():
            if name != layer or (wanted is not None and t not in wanted) or (branch is not None and b != branch):
                continue
            merged = stats.copy() if merged is None else merged.merge_(stats)
        return merged

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat tensors (safetensors- and all_gather-friendly)."""
        out: dict[str, torch.Tensor] = {}
        for (layer, t, branch), stats in self.entries.items():
            for field_name, tensor in stats.to_tensors().items():
                out[f"{layer}|{t!r}|{branch}|{field_name}"] = tensor
        for layer, moment in self.moments.items():
            out[f"{_MOMENT}{layer}|sum"] = moment.sum
            out[f"{_MOMENT}{layer}|count"] = torch.tensor(moment.count, dtype=torch.int64)
        return out

    @classmethod
    def from_state_dict(cls, data: dict[str, torch.Tensor]) -> StatsStore:
        grouped: dict[Key, dict[str, torch.Tensor]] = {}
        moments: dict[str, dict[str, torch.Tensor]] = {}
        for flat, tensor in data.items():
            if flat.startswith(_MOMENT):
                layer, field_name = flat[len(_MOMENT) :].rsplit("|", 1)
                moments.setdefault(layer, {})[field_name] = tensor
                continue
            layer, t, branch, field_name = flat.rsplit("|", 3)
            grouped.setdefault((layer, float(t), branch), {})[field_name] = tensor
        store = cls()
        for layer, fields_ in moments.items():
            store.moments[layer] = SecondMoment(fields_["sum"], int(fields_["count"]))
        for key, fields_ in grouped.items():
            store.entries[key] = ActivationStats.from_tensors(fields_)
        return store

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())
