"""Several processes calibrating (and evaluating) together.

Launched with ``accelerate launch`` (or torchrun), each process takes a contiguous share of
the prompts (`shard`), seeded by the prompts' global indices so any split makes the same
images, and the statistics are merged in place with `all_reduce_store`: every field of
`ActivationStats` reduces by sum, max or min and histograms over power-of-two ranges are
widened to the common range before they are summed, so the merge is exact. Second moments
reduce by sum one layer at a time, so no process ever holds more than one layer's buffers
beyond its own store.

Before calibrating, `check_agreement` compares what every process is about to do (recipe,
a SHA-256 of the denoiser's float weights, prompt count, steps, call arguments) and stops
them all, naming the processes that differ. A process that dies makes the others fail on
their next collective: at once where the connection drops, else after the process-group
timeout (``DQ_DIST_TIMEOUT`` seconds, default 600; gloo's own default is 30 minutes).

Without a process group (one process), every function here is a no-op.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from ..errors import DQError
from .stats import ActivationStats, SecondMoment, StatsStore, unshared_layers

logger = logging.getLogger(__name__)

TIMEOUT_ENV = "DQ_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0
T = TypeVar("T")


def timeout_seconds() -> float:
    """The process-group timeout: ``DQ_DIST_TIMEOUT`` (seconds) or 600."""
    text = os.environ.get(TIMEOUT_ENV)
    if text is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        raise DQError(f"{TIMEOUT_ENV}={text!r} is not a number of seconds") from None
    if not value > 0:
        raise DQError(f"{TIMEOUT_ENV}={text!r}: the timeout must be a positive number of seconds")
    return value


def launched_world_size() -> int:
    """Processes the launcher started (``WORLD_SIZE``), 1 when not launched."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def setup(cpu: bool | None = None) -> tuple[int, int]:
    """Join the launch's process group if ``accelerate launch``/torchrun started several
    processes and nobody has yet (through accelerate's `PartialState`, with a timeout of
    `timeout_seconds()`); returns (rank, world size). cpu: gloo on CPU even where CUDA exists
    (default: CPU when no CUDA device is available)."""
    if dist.is_available() and dist.is_initialized():
        return rank(), world_size()
    if launched_world_size() == 1:
        return 0, 1
    from accelerate import PartialState

    if cpu is None:
        cpu = not torch.cuda.is_available()
    PartialState(cpu=cpu, timeout=timedelta(seconds=timeout_seconds()))
    return rank(), world_size()


def active(group=None) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def rank(group=None) -> int:
    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


def world_size(group=None) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def is_main(group=None) -> bool:
    return rank(group) == 0


def shard(count: int, group=None) -> range:
    """This process's contiguous share of ``count`` items (`share`); the whole range for one
    process."""
    return share(count, world_size(group), rank(group))


def share(count: int, world: int, me: int) -> range:
    """Process ``me`` of ``world``'s contiguous share of ``count`` items, in rank order (the first
    processes take one more when it does not divide)."""
    if world > 1 and count < world:
        raise DQError(f"{count} prompt(s) for {world} processes; give at least one prompt per process")
    base, extra = divmod(count, world)
    start = me * base + min(me, extra)
    return range(start, start + base + (me < extra))


# Set when a collective failed in this process: the process group is broken, and torch's gloo
# backend can then abort the interpreter while tearing it down ("terminate called without an
# active exception", SIGABRT), which would replace dq's error and exit status (`leave`).
_BROKEN = False


def leave(code: int) -> int:
    """`code`; after a failed collective, this process exits with it at once (output flushed)
    instead of returning to a teardown that may abort. The CLI and launchers call it last."""
    if _BROKEN:
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(code)
    return code


@contextmanager
def collective(what: str, group=None):
    """Turn a failed collective (a peer died, or did not answer within the timeout) into one
    DQError naming this process and what it was doing."""
    global _BROKEN
    try:
        yield
    except DQError:
        raise
    except (RuntimeError, dist.DistError) as exc:  # DistBackendError, gloo's "Connection closed by peer"
        _BROKEN = True
        world = world_size(group)
        others = ", ".join(str(r) for r in range(world) if r != rank(group))
        raise DQError(
            f"rank {rank(group)} of {world}: lost the other process(es) (rank {others}) during {what}: "
            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}; a process died or hung "
            f"(timeout {timeout_seconds():g} s, set {TIMEOUT_ENV}); see the first failing rank's error"
        ) from exc


def gather_objects(obj: T, what: str, group=None) -> list[T]:
    """Every process's ``obj`` in rank order (a one-item list without a process group)."""
    if not active(group):
        return [obj]
    out: list[Any] = [None] * world_size(group)
    with collective(what, group):
        dist.all_gather_object(out, obj, group=group)
    return out


def barrier(what: str, group=None) -> None:
    if active(group):
        with collective(what, group):
            dist.barrier(group=group)


# -- agreement ---------------------------------------------------------------------------------


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=repr).encode()).hexdigest()[:16]


def cached_weights_sha256(model: torch.nn.Module) -> str:
    """`dq.provenance.weights_sha256`, remembered on the model while no weight is replaced or
    changed in place (keyed by each tensor's storage and version counter)."""
    from ..provenance import weights_sha256

    key = tuple((n, t.data_ptr(), t._version) for n, t in model.state_dict().items())
    cached = getattr(model, "_dq_weights_hash_cache", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    digest = weights_sha256(model)
    object.__setattr__(model, "_dq_weights_hash_cache", (key, digest))
    return digest


def check_agreement(facts: dict[str, Callable[[], Any]], group=None) -> None:
    """Stop every process, before any work, unless all agree on each fact (name -> function
    computing it; only called with a process group). The error names the fact and the
    processes that differ from rank 0."""
    if not active(group):
        return
    mine = {name: _digest(compute()) for name, compute in facts.items()}
    everyone = gather_objects(mine, "the agreement check", group)
    for name in facts:
        differ = [r for r, theirs in enumerate(everyone) if theirs[name] != everyone[0][name]]
        if differ:
            raise DQError(
                f"the processes disagree on the {name}: rank(s) {', '.join(map(str, differ))} differ from rank 0; "
                "every process must run the same command on the same model (stopped before calibrating)"
            )


# -- the exact merge -----------------------------------------------------------------------------


def _comm_device(group=None) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else torch.device("cpu")


def _entry_meta(stats: ActivationStats) -> tuple[int, int, int, int]:
    return stats.absmax.numel(), 0 if stats.hist is None else stats.hist.numel(), stats.hist_exp, stats.count


def _widen_to(hist: torch.Tensor, exp: int, new_exp: int) -> torch.Tensor:
    from .stats import _widen

    return _widen(hist, exp, new_exp)


# Second moments travel in flat float32 buffers of at most this many bytes per collective:
# few collectives (each costs a round trip), and a bounded extra copy of the moments.
MOMENT_BUFFER_BYTES = 64 << 20


def all_reduce_store(store: StatsStore, group=None) -> StatsStore:
    """Merge `store` in place across the processes of ``group`` (see `StatsStore.all_reduce_`).

    The keys, channel counts, histogram sizes and ranges and the token counts travel as one
    small object; then three collectives reduce every layer's tensors at once (sum: square
    sums and histograms widened to the common range, in float64; max: absmax and max; min:
    min), and the second moments are summed in flat buffers of at most `MOMENT_BUFFER_BYTES`
    (one collective each). A process that lacks a key contributes zeros / -inf / +inf.
    (One collective per tensor costs a gloo round trip each: hundreds per merge.)"""
    if not active(group):
        return store
    meta = {
        "entries": {layer: {k: _entry_meta(s) for k, s in steps.items()} for layer, steps in store.by_layer.items()},
        "moments": {layer: (tuple(m.sum.shape), m.count) for layer, m in store.moments.items()},
        "shared": dict(store.shared),
    }
    metas = gather_objects(meta, "the merge of calibration statistics", group)
    device = _comm_device(group)
    layers = sorted({layer for m in metas for layer in m["entries"]})
    _reduce_layers(store, {layer: [m["entries"].get(layer, {}) for m in metas] for layer in layers}, device, group)
    # one sum per distinct input: a layer stays shared only where every process agrees (else
    # each process gives it its own copy first, and it is reduced on its own)
    maps = [(m["shared"], set(m["moments"]) | set(m["shared"])) for m in metas]
    split = unshared_layers(maps)
    store.unshare(split)
    own: dict[str, dict[int, tuple]] = {}
    for m in metas:
        for layer, canon in m["shared"].items():
            if layer in split:
                own.setdefault(layer, {})[id(m)] = m["moments"][canon]
    held = {layer: [m["moments"].get(layer) or own.get(layer, {}).get(id(m)) for m in metas]
            for layer in sorted({layer for m in metas for layer in m["moments"]} | split)}
    _reduce_moments(store, held, device, group)
    store.shared = {layer: canon for shared, _ in maps for layer, canon in shared.items() if layer not in split}
    return store


def _all_reduce(tensor: torch.Tensor, op, group) -> None:
    with collective("the merge of calibration statistics", group):
        dist.all_reduce(tensor, op=op, group=group)


def _layer_plan(layer: str, metas: list[dict]) -> list[tuple]:
    """(key, channels, bins, exp, count) of every statistics entry any process has for `layer`."""
    keys = sorted({k for m in metas for k in m})
    plan = []
    for key in keys:
        held = [(r, m[key]) for r, m in enumerate(metas) if key in m]
        channels = {c for _, (c, _, _, _) in held}
        if len(channels) > 1:
            detail = ", ".join(f"rank {r}: {c}" for r, (c, _, _, _) in held)
            raise DQError(f"layer {layer!r} has different input widths on different processes ({detail}); the models differ")
        bins = {b for _, (_, b, _, _) in held}
        if len(bins - {0}) > 1:
            raise DQError(f"layer {layer!r}: the processes use different histogram bin counts {sorted(bins)}")
        has_hist = 0 not in bins
        plan.append((key, channels.pop(), max(bins) if has_hist else 0, max(e for _, (_, _, e, _) in held),
                     sum(n for _, (_, _, _, n) in held)))
    return plan


def _reduce_layers(store: StatsStore, metas_by_layer: dict[str, list[dict]], device: torch.device, group) -> None:
    plans = {layer: _layer_plan(layer, metas) for layer, metas in metas_by_layer.items()}
    sums, highs, lows = [], [], []
    for layer, plan in plans.items():
        steps = store.by_layer.get(layer, {})
        for key, channels, bins, exp, _count in plan:
            mine = steps.get(key)
            if mine is None:
                sums += [torch.zeros(channels + bins, dtype=torch.float64)]
                highs += [torch.zeros(channels), torch.full((channels,), -torch.inf)]
                lows += [torch.full((channels,), torch.inf)]
                continue
            hist = _widen_to(mine.hist, mine.hist_exp, exp).double().cpu() if bins else torch.zeros(0, dtype=torch.float64)
            sums += [mine.sumsq.double().cpu(), hist]
            highs += [mine.absmax.float().cpu(), mine.max.float().cpu()]
            lows += [mine.min.float().cpu()]
    if not sums:
        return
    buffers = [torch.cat(part).to(device) for part in (sums, highs, lows)]
    for buffer, op in zip(buffers, (dist.ReduceOp.SUM, dist.ReduceOp.MAX, dist.ReduceOp.MIN)):
        _all_reduce(buffer, op, group)
    sums_, highs_, lows_ = (b.cpu() for b in buffers)
    at_s = at_h = at_l = 0
    for layer, plan in plans.items():
        steps = store.by_layer.get(layer, {})
        merged = {}
        for key, channels, bins, exp, count in plan:
            like = steps.get(key)
            target = like.absmax if like is not None else torch.empty(0)
            dtype, where = (target.dtype, target.device) if like is not None else (torch.float32, torch.device("cpu"))
            sumsq, hist = sums_[at_s : at_s + channels], sums_[at_s + channels : at_s + channels + bins]
            absmax, high = highs_[at_h : at_h + channels], highs_[at_h + channels : at_h + 2 * channels]
            low = lows_[at_l : at_l + channels]
            at_s, at_h, at_l = at_s + channels + bins, at_h + 2 * channels, at_l + channels
            merged[key] = ActivationStats(
                count, *(x.to(where, dtype) for x in (absmax, low, high, sumsq)),
                hist.to(where, torch.float32) if bins else None, exp,
            )
        store.by_layer[layer] = merged


def _reduce_moments(store: StatsStore, held: dict[str, list], device: torch.device, group) -> None:
    """Sum every layer's second moment across processes, packed into flat float32 buffers of at
    most `MOMENT_BUFFER_BYTES` (a moment larger than that goes alone)."""
    plan = []  # (layer, shape, count, tensor or None)
    for layer, metas in held.items():
        shapes = {tuple(m[0]) for m in metas if m is not None}
        if len(shapes) > 1:
            raise DQError(f"layer {layer!r} has second moments of different shapes on different processes {sorted(shapes)}; the models differ")
        mine = store.moments.get(layer)
        plan.append((layer, shapes.pop(), sum(m[1] for m in metas if m is not None), None if mine is None else mine.sum))
    batch, size = [], 0
    for item in plan:
        numel = math.prod(item[1])
        if batch and (size + numel) * 4 > MOMENT_BUFFER_BYTES:
            _reduce_moment_batch(store, batch, device, group)
            batch, size = [], 0
        batch.append(item)
        size += numel
    if batch:
        _reduce_moment_batch(store, batch, device, group)


def _reduce_moment_batch(store: StatsStore, batch: list[tuple], device: torch.device, group) -> None:
    if len(batch) == 1:  # in place, no copy
        layer, shape, count, tensor = batch[0]
        tensor = torch.zeros(shape, dtype=torch.float32) if tensor is None else tensor
        buffer = tensor.to(device) if tensor.device != device else tensor
        _all_reduce(buffer, dist.ReduceOp.SUM, group)
        store.moments[layer] = SecondMoment(buffer.to(tensor.device) if buffer is not tensor else buffer, count)
        return
    flat = torch.cat([(torch.zeros(math.prod(shape), dtype=torch.float32) if t is None else t.reshape(-1).to(device, torch.float32))
                      for _, shape, _, t in batch]).to(device)
    _all_reduce(flat, dist.ReduceOp.SUM, group)
    at = 0
    for layer, shape, count, tensor in batch:
        numel = math.prod(shape)
        part = flat[at : at + numel].reshape(shape)
        at += numel
        where = tensor.device if tensor is not None else torch.device("cpu")
        store.moments[layer] = SecondMoment(part.to(where).clone(), count)  # its own memory, not a view of `flat`


def split_evenly(items: Sequence[T], group=None) -> tuple[range, list[T]]:
    """(global indices, items) of this process's share."""
    part = shard(len(items), group)
    return part, [items[i] for i in part]


def calibration_facts(model, recipe, prompts, num_inference_steps, call_kwargs, targets) -> dict[str, Callable[[], Any]]:
    """What the processes of one calibration pass must agree on (see `check_agreement`)."""
    return {
        "recipe": lambda: recipe.to_dict(),
        "model weights (SHA-256 of the float weights)": lambda: cached_weights_sha256(model),
        "calibration prompts": lambda: [str(p) for p in prompts],
        "number of sampler steps": lambda: num_inference_steps,
        "pipeline call arguments": lambda: sorted((k, repr(v)) for k, v in call_kwargs.items()),
        "calibrated layers": lambda: [(t.name, t.histogram, t.second_moment) for t in targets],
    }


def join(device: str | None) -> str | None:
    """For a command launched as several processes: join the process group (`setup`) and log
    how many processes take part; returns the device this process should use (``device``,
    or this process's own GPU when several processes share a machine with CUDA)."""
    if launched_world_size() == 1 and not (dist.is_available() and dist.is_initialized()):
        return device
    on_cpu = device == "cpu" or (device is None and not torch.cuda.is_available())
    with collective("joining the other processes"):
        me, world = setup(cpu=on_cpu)
    if world > 1 and not on_cpu and device in (None, "cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', me))}"
    if me == 0:
        logger.info("%d processes take part (%s)", world, dist.get_backend())
    return device
