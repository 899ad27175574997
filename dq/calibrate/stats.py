"""Streaming, mergeable activation statistics.

Nothing here keeps raw activations: each (layer, timestep, CFG branch) holds
per-channel absmax/min/max and a sum of squares, a token count, and a signed
histogram whose range is a power of two, so two histograms always merge exactly
(the narrower one is folded into the wider one's bins). Every field reduces by sum,
max or min, which is what several processes need to calibrate together.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
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
    Accumulated in float32 on the device of the rows (half the memory of float64: a
    12288-wide FLUX MLP input is 0.6 GB, not 1.2 GB; GPTQ uses H in float32 anyway);
    merges by sum.
    """

    sum: torch.Tensor  # [D, D] float32
    count: int

    @classmethod
    def from_rows(cls, rows: torch.Tensor) -> SecondMoment:
        rows = rows.float()
        return cls(rows.T @ rows, rows.shape[0])

    def merge_(self, other: SecondMoment) -> SecondMoment:
        if other.sum.shape != self.sum.shape:
            raise DQError(f"cannot merge second moments of shapes {tuple(other.sum.shape)} and {tuple(self.sum.shape)}")
        self.sum += other.sum.to(self.sum.device, self.sum.dtype)  # in place: no second d x d buffer
        self.count += other.count
        return self

    def copy(self) -> SecondMoment:
        return SecondMoment(self.sum.clone(), self.count)


Key = tuple[str, float, str]  # (layer name, timestep value, branch)
StepKey = tuple[float, str]  # (timestep value, branch) within one layer
_MOMENT = "moment|"  # state-dict prefix of second moments
_SHARE = "share|"  # state-dict prefix of "layer|canonical": the layer reads the canonical's moment


def unshared_layers(maps: Sequence[tuple[dict[str, str], set[str]]]) -> set[str]:
    """Layers whose shared second moment cannot stay shared when stores are merged.

    maps: per store, (its `shared` map, the names of all layers it has a moment for). A layer l
    may read c's moment in the merge only if every store either has l -> c or has neither l nor
    c (it contributed nothing to both): otherwise the merged sums of l and c differ."""
    aliased = {(layer, canon) for shared, _ in maps for layer, canon in shared.items()}
    out = set()
    for layer, canon in aliased:
        for shared, names in maps:
            if shared.get(layer) != canon and (layer in names or canon in names):
                out.add(layer)
                break
    return out


class StatsStore:
    """All statistics of one calibration run, held per layer: ``by_layer[layer][(timestep,
    branch)]``, so a lookup touches one layer's entries, never the whole run.

    Every field reduces by sum, max or min, so several processes merge their stores exactly
    with `all_reduce_` (see `dq.calibrate.distributed`).

    Second moments are held once per distinct input: layers fed the identical tensor in every
    call (attention q/k/v, FLUX single blocks' MLP-in and attention projections) read one sum.
    ``moments`` is keyed by the first such layer; ``shared`` maps each other one to it, and
    `moment(layer)` resolves it."""

    def __init__(self) -> None:
        self.by_layer: dict[str, dict[StepKey, ActivationStats]] = {}
        self.moments: dict[str, SecondMoment] = {}
        self.shared: dict[str, str] = {}  # layer -> the layer whose moment it reads

    @property
    def entries(self) -> dict[Key, ActivationStats]:
        """Flat view {(layer, timestep, branch): stats} (a new dict; the stats are shared)."""
        return {(layer, t, b): stats for layer, steps in self.by_layer.items() for (t, b), stats in steps.items()}

    @entries.setter
    def entries(self, flat: dict[Key, ActivationStats]) -> None:
        self.by_layer = {}
        for (layer, t, b), stats in flat.items():
            self.by_layer.setdefault(layer, {})[(t, b)] = stats

    def view(self) -> StatsStore:
        """A new store over the same statistics: its own dicts, the same tensors, so a reader that
        drops or rebinds entries (a `dq.model.Calibration` frees the moments it has used) leaves
        this one whole. Readers must not change the statistics in place."""
        out = StatsStore()
        out.by_layer = {layer: dict(steps) for layer, steps in self.by_layer.items()}
        out.moments, out.shared = dict(self.moments), dict(self.shared)
        return out

    def add(self, key: Key, stats: ActivationStats) -> None:
        layer, t, b = key
        steps = self.by_layer.setdefault(layer, {})
        current = steps.get((t, b))
        if current is None:
            steps[(t, b)] = stats
        else:
            current.merge_(stats)

    def add_moment(self, layer: str, moment: SecondMoment) -> None:
        current = self.moments.get(layer)
        if current is None:
            self.moments[layer] = moment
        else:
            current.merge_(moment)

    def moment(self, layer: str) -> SecondMoment | None:
        return self.moments.get(self.shared.get(layer, layer))

    def moment_names(self) -> set[str]:
        """Every layer with a second moment (its own or a shared one)."""
        return set(self.moments) | set(self.shared)

    def unshare(self, layers: Iterable[str]) -> None:
        """Give each of `layers` its own copy of the moment it shares (exact: same sum)."""
        for layer in layers:
            canon = self.shared.pop(layer, None)
            if canon is not None and canon in self.moments:
                self.moments[layer] = self.moments[canon].copy()

    def merge_(self, other: StatsStore) -> StatsStore:
        for layer, steps in other.by_layer.items():
            for (t, b), stats in steps.items():
                self.add((layer, t, b), stats.copy())
        split = unshared_layers([(self.shared, self.moment_names()), (other.shared, other.moment_names())])
        self.unshare(split)
        for layer in other.moment_names():
            canon = other.shared.get(layer)
            if canon is not None and layer not in split:
                self.shared[layer] = canon
                continue
            moment = other.moment(layer)
            self.add_moment(layer, moment.copy())
        return self

    def all_reduce_(self, group=None) -> StatsStore:
        """Merge, in place, the stores of every process of a `torch.distributed` group (default:
        the world): afterwards each process holds the statistics of all prompts, exactly those
        one process would have collected (up to float summation order), also where processes
        saw different timesteps, branches or ranges. A no-op without a process group."""
        from .distributed import all_reduce_store

        return all_reduce_store(self, group)

    def layers(self) -> list[str]:
        return sorted(name for name, steps in self.by_layer.items() if steps)

    def timesteps(self) -> list[float]:
        return sorted({t for steps in self.by_layer.values() for t, _ in steps})

    def branches(self) -> list[str]:
        return sorted({b for steps in self.by_layer.values() for _, b in steps})

    def select(
        self, layer: str, timesteps: Iterable[float] | None = None, branch: str | None = None
    ) -> ActivationStats | None:
        """Merge of one layer's statistics over the given timesteps and branch (all if None)."""
        wanted = None if timesteps is None else set(timesteps)
        merged: ActivationStats | None = None
        for (t, b), stats in self.by_layer.get(layer, {}).items():
            if (wanted is not None and t not in wanted) or (branch is not None and b != branch):
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
        for layer, canon in self.shared.items():
            out[f"{_SHARE}{layer}|{canon}"] = torch.zeros(0, dtype=torch.int8)
        return out

    @classmethod
    def from_state_dict(cls, data: dict[str, torch.Tensor]) -> StatsStore:
        grouped: dict[Key, dict[str, torch.Tensor]] = {}
        moments: dict[str, dict[str, torch.Tensor]] = {}
        shared: dict[str, str] = {}
        for flat, tensor in data.items():
            if flat.startswith(_SHARE):
                layer, canon = flat[len(_SHARE) :].rsplit("|", 1)
                shared[layer] = canon
                continue
            if flat.startswith(_MOMENT):
                layer, field_name = flat[len(_MOMENT) :].rsplit("|", 1)
                moments.setdefault(layer, {})[field_name] = tensor
                continue
            layer, t, branch, field_name = flat.rsplit("|", 3)
            grouped.setdefault((layer, float(t), branch), {})[field_name] = tensor
        store = cls()
        for layer, fields_ in moments.items():
            store.moments[layer] = SecondMoment(fields_["sum"], int(fields_["count"]))
        for layer, canon in shared.items():
            if canon not in store.moments:
                raise DQError(f"statistics: layer {layer!r} shares the second moment of {canon!r}, which is missing")
            store.shared[layer] = canon
        for key, fields_ in grouped.items():
            store.add(key, ActivationStats.from_tensors(fields_))
        return store

    def nbytes(self) -> int:
        """Bytes held by the statistics (second moments included)."""
        total = sum(
            sum(t.numel() * t.element_size() for t in stats.to_tensors().values())
            for steps in self.by_layer.values() for stats in steps.values()
        )
        return total + sum(m.sum.numel() * m.sum.element_size() for m in self.moments.values())
