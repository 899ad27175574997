"""Calibration hooks, owned by one object that removes every handle on exit.

`Calibrator` registers a forward pre-hook on the denoiser (to learn the current
timestep and whether the batch holds classifier-free-guidance halves) and one on
every target layer (to fold the layer's input into streaming statistics). Used
as a context manager, it removes all hooks when the block ends, error or not.
"""

from __future__ import annotations

import logging
import os
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
    if not target.second_moment:
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

    def __enter__(self) -> Calibrator:
        try:
            self.hooks.pre_hook(self.denoiser, self._on_denoiser, with_kwargs=True)
            for target in self.layers:
                self.hooks.pre_hook(target.module, self._layer_hook(target))
        except Exception:
            self.hooks.remove_all()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.hooks.remove_all()

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
            for branch, part in self._branches(x):
                stats = ActivationStats.from_rows(as_rows(part, channel_dim), bins)
                self.store.add((name, self.timestep, branch), stats)
            if target.second_moment:
                rows = conv_rows(x, target.unfold) if target.unfold is not None else as_rows(x, channel_dim)
                moment = SecondMoment.from_rows(rows)
                if self.moments_on_cpu:  # one d x d product on the device at a time; the sums in host memory
                    moment.sum = moment.sum.cpu()
                self.store.add_moment(name, moment)

        return hook
