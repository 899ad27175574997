"""Calibration hooks, owned by one object that removes every handle on exit.

`Calibrator` registers a forward pre-hook on the denoiser (to learn the current
timestep and whether the batch holds classifier-free-guidance halves) and one on
every target layer (to fold the layer's input into streaming statistics). Used
as a context manager, it removes all hooks when the block ends, error or not.
"""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CalibrationError
from ..nn.router import read_timestep, timestep_position
from .stats import ActivationStats, SecondMoment, StatsStore

logger = logging.getLogger(__name__)

NO_TIMESTEP = -1.0


class HookSet:
    """Records every hook handle it registers and removes them all at once."""

    def __init__(self) -> None:
        self.handles: list[torch.utils.hooks.RemovableHandle] = []

    def pre_hook(self, module: nn.Module, fn, **kwargs) -> None:
        self.handles.append(module.register_forward_pre_hook(fn, **kwargs))

    def remove_all(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def as_rows(x: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """[tokens, channels] float32 view of a layer input."""
    x = x.detach()
    if channel_dim != -1 and channel_dim != x.dim() - 1:
        x = x.movedim(channel_dim, -1)
    return x.reshape(-1, x.shape[-1]).float()


def conv_rows(x: torch.Tensor, geometry: dict[str, Any]) -> torch.Tensor:
    """[patches, C*kh*kw] float32 im2col rows of a conv input (the conv's matrix-view inputs)."""
    cols = F.unfold(
        x.detach().float(), geometry["kernel_size"], geometry["dilation"], geometry["padding"], geometry["stride"]
    )
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


MOMENTS_ENV = "DQ_MOMENTS_ON"  # "cpu", "device" or "auto" (default)


def moment_bytes(target: CalibTarget) -> int:
    """Bytes of the float32 second moment H [D, D] a target collects (0 if none)."""
    if not target.second_moment or target.moment_optional:  # optional: only ever shares a sum
        return 0
    weight = getattr(target.module, "weight", None)
    width = weight[0].numel() if weight is not None else 0
    return 4 * width * width


def moments_on_cpu(targets: Sequence[CalibTarget], device: torch.device, free_bytes: int | None = None) -> bool:
    """Whether to keep the second-moment sums in host memory: ``DQ_MOMENTS_ON`` says so
    ("cpu" / "device"), else (auto) when the model is on an accelerator and all the sums
    together would take more than a quarter of its free memory (FLUX.1 under W4A4: 67 GB of
    sums beside 22 GB of weights). The device then holds one layer's product at a time, so the
    overhead grows with the largest layer, not with the model."""
    choice = os.environ.get(MOMENTS_ENV, "auto").lower()
    if choice not in ("auto", "cpu", "device"):
        raise CalibrationError(f"{MOMENTS_ENV}={choice!r}: use cpu, device or auto")
    if choice != "auto" or device.type == "cpu":
        return choice == "cpu" and device.type != "cpu"
    total = sum(moment_bytes(t) for t in targets)
    if free_bytes is None:
        if device.type != "cuda":
            return False
        free_bytes = torch.cuda.mem_get_info(device)[0]
    offload = total > free_bytes // 4
    if offload:
        logger.info("second moments: %.1f GB, more than a quarter of the %.1f GB free on %s: summed in host memory",
                    total / 2**30, free_bytes / 2**30, device)
    return offload


@dataclass
class CalibTarget:
    """One layer to observe. histogram: collect the value histogram (static activation
    ranges); second_moment: collect H = sum x x^T (conv layers: of their im2col patches,
    `unfold` giving the geometry); transform: applied to the input before any statistic
    (the layer's future input transform, so ranges are those of what gets quantized)."""

    name: str
    module: nn.Module
    channel_dim: int = -1
    histogram: bool = True
    second_moment: bool = False
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None
    unfold: dict[str, Any] | None = None
    # H only where it comes free: the layer joins the sum of a collecting layer fed the very
    # same input, and is dropped (no moment, no memory) where it would need a sum of its own.
    # Passes under a moments budget use it for the layers still waiting for theirs.
    moment_optional: bool = False
    channel_stats: bool = True  # False: a pass that only collects second moments


class Calibrator:
    """Collects per-(layer, timestep, CFG branch) input statistics of `layers`.

    pipe: the pipeline (read for `do_classifier_free_guidance`; CFG batches are
    [uncond; cond] halves in every diffusers text-to-image pipeline).
    """

    def __init__(
        self,
        pipe,
        denoiser: nn.Module,
        layers: Iterable[CalibTarget | tuple[str, nn.Module, int]],
        histogram_bins: int | None,
    ):
        self.pipe = pipe
        self.denoiser = denoiser
        self.layers = [t if isinstance(t, CalibTarget) else CalibTarget(*t) for t in layers]
        self.bins = histogram_bins
        self.store = StatsStore()
        self.hooks = HookSet()
        self._t_pos = timestep_position(denoiser)
        self.timestep = NO_TIMESTEP
        self.batch = None
        self.cfg = False
        self.prompt_batch: int | None = None  # images the current pipeline call makes
        self.moments_on_cpu = moments_on_cpu(self.layers, next(denoiser.parameters(), torch.empty(0)).device)

        self.moments = SharedMoments(self.store, self.moments_on_cpu, os.environ.get(SHARE_ENV, "1") != "0")

    def __enter__(self) -> Calibrator:
        try:
            self.hooks.pre_hook(self.denoiser, self._on_denoiser, with_kwargs=True)
            self.hooks.handles.append(self.denoiser.register_forward_hook(lambda *_: self.moments.flush_all()))
            for target in self.layers:
                self.hooks.pre_hook(target.module, self._layer_hook(target))
        except Exception:
            self.hooks.remove_all()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.hooks.remove_all()
        self.moments.finish()

    def _on_denoiser(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        t = read_timestep(self._t_pos, args, kwargs)
        self.timestep = NO_TIMESTEP if t is None else round(float(torch.as_tensor(t).reshape(-1)[0]), 6)
        sample = args[0] if args else next(iter(kwargs.values()), None)
        self.batch = sample.shape[0] if isinstance(sample, torch.Tensor) else None
        # Pipelines with the property say so; the others (PixArt) run CFG as a doubled batch.
        self.cfg = bool(getattr(self.pipe, "do_classifier_free_guidance", False)) or (
            self.prompt_batch is not None and self.batch == 2 * self.prompt_batch
        )

    def _branches(self, x: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        n = x.shape[0]
        if self.cfg and n == self.batch and n % 2 == 0:
            return [("uncond", x[: n // 2]), ("cond", x[n // 2 :])]
        return [("all", x)]

    def _layer_hook(self, target: CalibTarget):
        name, channel_dim = target.name, target.channel_dim
        bins = self.bins if target.histogram else None

        def hook(_module: nn.Module, args: tuple) -> None:
            x = args[0]
            if not torch.isfinite(x).all():
                raise CalibrationError(
                    f"non-finite (NaN/Inf) input to layer {name!r} at timestep {self.timestep:g}: the "
                    "full-precision model itself overflows here; run it in float32 or check the "
                    "calibration inputs"
                )
            if target.transform is not None:
                x = target.transform(x)
            if target.channel_stats:
                for branch, part in self._branches(x):
                    stats = ActivationStats.from_rows(as_rows(part, channel_dim), bins)
                    self.store.add((name, self.timestep, branch), stats)
            if target.second_moment:
                self.moments.add(target, x)

        return hook


SHARE_ENV = "DQ_SHARE_MOMENTS"  # "0": one second moment per layer, as before sharing


class _Group:
    """Layers whose inputs were the identical tensor in every call so far: one sum for all."""

    def __init__(self, members: list[str], total: SecondMoment | None, adds: int) -> None:
        self.members = members  # in first-seen order; the first names the sum in the store
        self.total = total  # sum of the flushed calls' products
        self.adds = adds  # calls flushed into `total`
        self.pending: SecondMoment | None = None  # this call's product, until every member saw it
        self.seen: set[str] = set()
        self.last: tuple | None = None  # (weakref, version, signature) of the last input


def _content(x: torch.Tensor):
    """What changes when `x` is modified in place: its version counter, or (an inference tensor
    has none) the integer sum of its bits, with its storage address."""
    try:
        return x._version
    except RuntimeError:
        bits = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]
        return x.data_ptr(), int(x.detach().reshape(-1).view(bits).sum(dtype=torch.int64))


def _identity(x: torch.Tensor, signature) -> tuple | None:
    """What identifies `x` while it lives (None: cannot tell)."""
    try:
        return weakref.ref(x), _content(x), signature
    except (RuntimeError, TypeError, KeyError):
        return None


def _same(x: torch.Tensor, mark: tuple | None, signature) -> bool:
    """Whether `x` is the very tensor `mark` was taken of, unchanged since."""
    if mark is None:
        return False
    ref, content, sig = mark
    if ref() is not x or sig != signature:
        return False
    try:
        return _content(x) == content
    except (RuntimeError, TypeError, KeyError):
        return False


class SharedMoments:
    """Second moments H = sum x x^T, one per distinct input.

    Layers fed the identical tensor (the same object, unchanged since: its version counter,
    or under inference mode its address and the sum of its bits) in every call share one sum: the product is computed once, when the first of them sees the
    input, and added when every member has seen it (or the denoiser call ends). A member whose
    input differs in some call (or that was not called) leaves the group with a copy of the sum
    before that call, so every layer's H is exactly the sum of its own inputs' products, in the
    same order as without sharing: the results are bit-identical, the memory and the D x D
    products drop. A layer joins a group only in the group's first call."""

    def __init__(self, store: StatsStore, on_cpu: bool, share: bool) -> None:
        self.store = store
        self.on_cpu = on_cpu
        self.share = share
        self.group_of: dict[str, _Group] = {}
        self.groups: list[_Group] = []
        self.optional: set[str] = set()  # members that may only share (`moment_optional`)
        self.dropped: set[str] = set()  # optional layers that could not share: no moment

    @staticmethod
    def _product(target: CalibTarget, x: torch.Tensor) -> SecondMoment:
        rows = conv_rows(x, target.unfold) if target.unfold is not None else as_rows(x, target.channel_dim)
        return SecondMoment.from_rows(rows)

    def _new_group(self, name: str, total: SecondMoment | None, adds: int) -> _Group:
        group = _Group([name], total, adds)
        self.groups.append(group)
        self.group_of[name] = group
        return group

    def _start(self, group: _Group, name: str, target: CalibTarget, x: torch.Tensor, signature) -> None:
        group.pending = self._product(target, x)
        group.seen = {name}
        group.last = _identity(x, signature) if self.share else None
        if len(group.seen) == len(group.members):
            self._flush(group)

    def _flush(self, group: _Group) -> None:
        moment, group.pending = group.pending, None
        if moment is None:
            return
        absent = [m for m in group.members if m not in group.seen]
        for name in absent:  # not called in this call: its H stays the sum before it
            if name in group.members:  # (a dissolution may have dropped it already)
                self._leave(group, name)
        if not group.members:  # dissolved: only optional layers were left
            return
        if self.on_cpu:  # one d x d product on the device at a time; the sums in host memory
            moment.sum = moment.sum.cpu()
        group.total = moment if group.total is None else group.total.merge_(moment)
        group.adds += 1
        group.seen = set()

    def _drop(self, name: str) -> None:
        self.group_of.pop(name, None)
        self.dropped.add(name)

    def _leave(self, group: _Group, name: str) -> _Group | None:
        """`name` leaves `group` with its own copy of the sum so far. An optional layer is
        dropped instead (a sum of its own would cost memory the budget did not plan), and so
        are optional layers left alone in a group: the leaver takes the sum itself."""
        group.members.remove(name)
        if name in self.optional:
            self._drop(name)
            return None
        if group.members and all(m in self.optional for m in group.members):
            for member in group.members:
                self._drop(member)
            total, adds = group.total, group.adds
            group.members, group.total, group.pending, group.seen = [], None, None, set()
            self.groups.remove(group)
            return self._new_group(name, total, adds)
        return self._new_group(name, None if group.total is None else group.total.copy(), group.adds)

    def add(self, target: CalibTarget, x: torch.Tensor) -> None:
        name = target.name
        if name in self.dropped:
            return
        signature = (target.channel_dim, repr(target.unfold)) if self.share and target.transform is None else None
        group = self.group_of.get(name)
        if target.moment_optional:
            self.optional.add(name)
        if group is None:
            if signature is not None:
                for other in self.groups:  # join the group whose only call so far read this very tensor
                    if _same(x, other.last, signature) and (
                        (other.pending is not None and other.adds == 0) or (other.pending is None and other.adds == 1)
                    ):
                        other.members.append(name)
                        self.group_of[name] = other
                        if other.pending is not None:
                            other.seen.add(name)
                            if len(other.seen) == len(other.members):
                                self._flush(other)
                        return
            if target.moment_optional:  # nothing to share: no moment for it in this pass
                self.dropped.add(name)
                return
            group = self._new_group(name, None, 0)
            self._start(group, name, target, x, signature)
            return
        if group.pending is not None:
            if name in group.seen:  # a new call began before every member saw the last one
                self._flush(group)
            elif signature is not None and _same(x, group.last, signature):
                group.seen.add(name)
                if len(group.seen) == len(group.members):
                    self._flush(group)
                return
            else:  # another input than the group's in this call: leave with the sum before it
                left = self._leave(group, name)
                if group.members and len(group.seen) == len(group.members):
                    self._flush(group)
                if left is None:
                    return
                group = left
        self._start(group, name, target, x, signature)

    def flush_all(self) -> None:
        for group in self.groups:
            self._flush(group)

    def finish(self) -> None:
        """Flush every pending product and write the sums into the store."""
        self.flush_all()
        for group in self.groups:
            if group.total is None:
                continue
            first, *others = group.members
            self.store.add_moment(first, group.total)
            for name in others:
                self.store.shared[name] = first
        self.groups, self.group_of = [], {}
