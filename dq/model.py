"""The model-level API: prepare -> run -> convert, on a bare denoiser and any loop the user owns.

    cal = dq.prepare(model, "w8a8")       # plan the layers, hook the ones that need statistics
    for _ in cal.passes():                # one pass, or two for smoothing / rotation / GPTQ
        for inputs in my_inputs:          # the user's sampler, a video pipeline, recorded inputs
            model(**inputs)
    dq.convert(model)                     # swap in the quantized layers

or in one call: ``dq.calibrate(model, "w8a8", run=lambda: my_loop(model))``.

`dq.quantize(pipe, recipe)` is this API with the pipeline's own sampler as the loop.

A recipe needs up to two passes over the same inputs. Pass 1 collects what the outlier
components need from the raw inputs (channel ranges for smoothing, H = sum x x^T for the
alpha search and GPTQ) and the histograms of static layers whose input stays untransformed;
the layers are then prepared. Pass 2 collects the histograms of the *transformed* inputs of the
remaining static layers (what they will quantize). Calibration-free recipes (weight-only,
dynamic activations) need no pass at all.

Under a second-moment budget (``DQ_MOMENTS_BUDGET`` / ``moments_budget=``) pass 1 collects the
moments of the first layers that fit only; each further pass over the same inputs collects the
next layers' moments, which are prepared and freed before the next: the moments held at once
follow the budget (at least the largest layer's), not the model, and the model is the same.
Layers still waiting for their pass ride along where it is free: fed the very input of a
collecting layer, they share its sum (`CalibTarget.moment_optional`), so layers that share an
input (q, k, v) never cost a pass each.

Each pass's statistics (`dq.calibrate.stats.StatsStore`: streaming, mergeable by sum/max/min)
go through `reduce` when the pass ends (several processes merge theirs there) and can be
saved with `Calibration.save_stats` and replayed with `Calibration.replay` (what
``DQConfig(stats=...)`` does at ``from_pretrained``): the same statistics give the same model.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from .calibrate import distributed
from .calibrate.hooks import Calibrator, CalibTarget, moment_bytes
from .calibrate.stats import StatsStore
from .calibrate.timesteps import TimestepGroups
from .errors import DQError
from .logs import show_progress
from .outliers import PreparedLayer, calibration_targets, prepare_layer, summarize
from .provenance import describe_source
from .recipe import Recipe

logger = logging.getLogger(__name__)

CALIBRATION_ATTR = "_dq_calibration"
STATS_FORMAT = 2  # 2: second moments held once per distinct input ("share|" entries)
READABLE_STATS_FORMATS = ("1", "2")  # format 1 (one moment per layer) reads as is
Reduce = Callable[[StatsStore], StatsStore]


class Calibration:
    """The state of one prepare -> run -> convert: the per-layer plan (`plan`, a list of
    `dq.engine.LayerChoice`), the passes still to run, their statistics and the prepared
    layers. Made by `dq.prepare`; `dq.convert` finishes it."""

    def __init__(self, model: nn.Module, recipe: str | Recipe | dict[str, Any], *, pipe=None,
                 reduce: Reduce | None = None, keep_stats: bool = False,
                 keep_rules: str = "the recipe's keep/overrides", plan: list | None = None,
                 moments_budget: int | str | None = None):
        from .engine import check_offload, plan_model
        from .outliers import plan_components

        check_offload(model)
        self.model = model
        self.recipe = Recipe.from_any(recipe)
        if plan is None:
            self.plan, self.works = plan_model(model, self.recipe, keep_rules)
        else:  # an explicit layer plan (dq.mixed builds each candidate format's layers)
            self.plan, self.works = list(plan), plan_components(plan, self.recipe)
        self.source = describe_source(model)  # hash of the float weights, before any swap
        self.pipe = pipe
        self.reduce = reduce
        self.store: StatsStore | None = None
        self.groups = TimestepGroups([], [[]])
        self.prepared: dict[str, PreparedLayer] | None = None
        # each pass's (reduced) statistics, for save_stats; off by default: pass 1's second
        # moments (d x d per layer) would otherwise stay in memory until convert
        self.keep_stats = keep_stats
        self.recorded: dict[str, StatsStore] = {}
        self.stage = "pass1"  # pass1 -> pass2 -> ready
        self.targets: list[CalibTarget] = []
        self._calibrator: Calibrator | None = None
        self._done_first: set[str] = set()
        # second moments under a memory budget: the moment layers in chunks, one pass each
        self.moments_budget = env_moments_budget() if moments_budget is None else parse_bytes(moments_budget)
        self._chunks: list[list[str]] = []
        self._first: StatsStore | None = None  # pass 1's channel statistics while chunks remain
        self._split_prepare = False  # the statistics were merged across processes: split the work
        self._loads: list[float] | None = None  # preparation cost given to each process so far
        self._advance(None)

    # -- the state machine ------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self.stage == "ready"

    @property
    def pass_number(self) -> int | None:
        """1 or 2 while a pass waits for inputs; None once ready."""
        return {"pass1": 1, "pass2": 2}.get(self.stage)

    def _advance(self, store: StatsStore | None) -> None:
        """Finish the current stage with `store` (None: nothing to finish) and move on to the
        next stage that needs inputs, preparing the layers on the way."""
        works = self.works
        if self.stage == "pass1" and store is None:
            first = calibration_targets(works, first_pass=True)
            if any(w.needs_channel_stats or w.needs_moment for w in works.values()):
                self._chunks = moment_chunks(first, self.moments_budget)
                self.targets = self._with_moments(first, self._chunks[0] if self._chunks else [])
                return  # pass 1 waits for inputs
            self._prepare_layers(None)
        elif self.stage == "pass1":
            if self._first is None:  # pass 1 proper: channel statistics, histograms, first moments
                self.groups = TimestepGroups.from_timesteps(store.timesteps(), self.recipe.timestep_groups)
                self._first = store
                self.prepared = {}
            view = StatsStore()  # pass 1's channel statistics with this pass's moments
            view.by_layer, view.moments, view.shared = self._first.by_layer, store.moments, store.shared
            have = view.moment_names()
            self._chunks = [left for left in ([n for n in chunk if n not in have] for chunk in self._chunks) if left]
            waiting = {n for chunk in self._chunks for n in chunk}
            self._prepare_layers(view, [n for n in self.works if n not in self.prepared and n not in waiting])
            if store is not self._first or not self.keep_stats:  # prepared: their moments go
                store.moments, store.shared = {}, {}
            if self._chunks:  # moments of the next layers, in another pass over the same inputs
                logger.info("second moments under the budget of %s: %d more pass(es) over the inputs",
                            format_bytes(self.moments_budget), len(self._chunks))
                self.targets = self._with_moments([], self._chunks[0])
                return
            first, store, self._first = calibration_targets(works, first_pass=True), self._first, None
            # H is only needed to prepare the layers; the ranges need the histograms of the
            # layers whose input stays untransformed (copied: `store` may be kept as recorded)
            self._done_first = {t.name for t in first if t.histogram}
            self.store = StatsStore()
            self.store.entries = {k: v.copy() for k, v in store.entries.items() if k[0] in self._done_first}
        elif self.stage == "pass2":
            self.store = store if self.store is None else self.store.merge_(store)
            self.groups = TimestepGroups.from_timesteps(self.store.timesteps(), self.recipe.timestep_groups)
            self._finish()
            return
        second = [t for t in calibration_targets(works, first_pass=False, prepared=self.prepared)
                  if t.name not in self._done_first]
        if second:
            self.stage, self.targets = "pass2", second
            return
        self._finish()

    def _prepare_layers(self, store: StatsStore | None, names: list[str] | None = None) -> None:
        if self.prepared is None:
            self.prepared = {}
        names = list(self.works) if names is None else names
        if self._split_prepare:  # each process prepares a share, then all exchange the results
            if self._loads is None:
                self._loads = [0.0] * distributed.world_size()
            self.prepared.update(prepare_split(self.works, names, store, self.groups, self._loads))
            return
        with torch.no_grad():
            for name in preparing(names, self.works):
                self.prepared[name] = prepare_layer(self.works[name], store, self.groups)
        if len(self.prepared) == len(self.works):  # in plan order, whatever pass prepared them
            self.prepared = {name: self.prepared[name] for name in self.works}

    def _with_moments(self, first: list[CalibTarget], chunk: list[str]) -> list[CalibTarget]:
        """Pass 1's targets collecting second moments for the layers of `chunk` only (first
        empty: moment-only targets for `chunk`, a further pass under the budget)."""
        wanted = set(chunk)
        # the layers of later chunks collect too where it is free: a layer fed the very input
        # of a layer of this chunk shares its sum (no memory), and then needs no pass of its own
        later = {n for c in self._chunks for n in c} - wanted
        if first:
            return [replace(t, second_moment=t.second_moment and (t.name in wanted or t.name in later),
                            moment_optional=t.name in later) for t in first]
        return [replace(t, histogram=False, channel_stats=False, second_moment=True, moment_optional=t.name in later)
                for t in calibration_targets(self.works, first_pass=True) if t.name in wanted or t.name in later]

    def _agree_on_optional(self, store: StatsStore) -> None:
        """Keep the optional (shared for free) moments every process has: one process may have
        dropped a layer another kept, and a sum merged from some processes only is wrong. The
        dropped layers wait for a pass of their own."""
        optional = {t.name for t in self.targets if t.moment_optional}
        if not optional:
            return
        have = store.moment_names() & optional
        keep = set(have)
        if distributed.active():
            for theirs in distributed.gather_objects(sorted(have), "the agreement on shared second moments"):
                keep &= set(theirs)
        drop = have - keep
        if drop:
            store.unshare({layer for layer, canon in store.shared.items() if canon in drop} | drop)
            for name in drop:
                store.moments.pop(name, None)

    def _finish(self) -> None:
        self.stage, self.targets = "ready", []
        if not any(w.static_act for w in self.works.values()):
            self.groups = TimestepGroups([], [[]])  # no static ranges to look up by timestep

    def _collected(self, store: StatsStore, reduce: bool = True) -> StatsStore:
        # several processes (torch.distributed / accelerate): merged exactly; a no-op in one
        if reduce:
            self._agree_on_optional(store)
            store = self.reduce(store) if self.reduce is not None else store.all_reduce_()
            # every process now holds the same statistics: each prepares a share of the layers
            self._split_prepare = self.reduce is None and distributed.active() and split_enabled()
        if not store.entries and not store.moments:
            raise DQError(
                f"calibration pass {self.pass_number} saw no inputs: none of the {len(self.targets)} hooked layers "
                f"of {type(self.model).__name__} ran. Run the model (its forward, with a timestep) between "
                "dq.prepare and dq.convert, or inside `for _ in cal.passes(): ...`"
            )
        if self.keep_stats and self.stage == "pass1" and self._first is not None:
            self.recorded["pass1"].moments.update(store.moments)  # a further pass's moments
            self.recorded["pass1"].shared.update(store.shared)
        elif self.keep_stats:  # a replay prepares the layers again: pass 1's moments included
            self.recorded[self.stage] = store
        logger.info(
            "calibration pass %d: %d layers over %d timesteps (branches: %s); statistics: %.1f MB",
            self.pass_number, len(store.layers()) or len(store.moment_names()), len(store.timesteps()),
            ", ".join(store.branches()) or "-", store.nbytes() / 2**20,
        )
        return store

    # -- hooks --------------------------------------------------------------------------
    def start_pass(self) -> None:
        """Hook the current pass's layers (done by `dq.prepare` and between passes)."""
        if self.ready or self._calibrator is not None:
            return
        calibrator = Calibrator(self.pipe, self.model, self.targets, self.recipe.histogram_bins)
        calibrator.__enter__()
        self._calibrator = calibrator

    def end_pass(self) -> None:
        """Unhook, reduce and keep the pass's statistics, prepare what they allow, and hook the
        next pass if there is one."""
        calibrator, self._calibrator = self._calibrator, None
        if calibrator is None:
            return
        calibrator.__exit__(None, None, None)
        self.feed(calibrator.store)
        self.start_pass()

    def feed(self, store: StatsStore, *, reduce: bool = True) -> None:
        """Finish the current pass with statistics collected elsewhere (`dq.quantize` runs the
        pipeline with its own hooks; `replay` reads a file). reduce=False: `store` already holds
        every process's statistics (a file), so it is not merged across processes again."""
        if self.ready:
            raise DQError("calibration is complete; no further pass is needed: call dq.convert(model)")
        self._advance(self._collected(store, reduce))

    def stop_hooks(self) -> None:
        if self._calibrator is not None:
            self._calibrator.__exit__(None, None, None)
            self._calibrator = None

    def close(self) -> None:
        """Remove every hook without quantizing (the model stays as it was)."""
        self.stop_hooks()
        if getattr(self.model, CALIBRATION_ATTR, None) is self:
            delattr(self.model, CALIBRATION_ATTR)

    def passes(self) -> Iterator[int]:
        """Yield once per pass still needed (the pass number), with that pass's hooks on. Run
        the model over the calibration inputs in the loop body. Leaving the loop early (an
        error) removes the hooks."""
        try:
            while not self.ready:
                self.start_pass()
                yield self.pass_number
                self.end_pass()
        except BaseException:
            self.close()
            raise

    @property
    def calibrator(self) -> Calibrator | None:
        """The running pass's hooks (`prompt_batch` is set on it by pipeline runners)."""
        return self._calibrator

    # -- statistics files -----------------------------------------------------------------
    def save_stats(self, path: str | Path) -> Path:
        """Write every pass's statistics to a safetensors file (with the recipe and the layer
        plan in its metadata) that `replay` and ``DQConfig(stats=...)`` read back."""
        if not self.ready:
            raise DQError(f"calibration is still waiting for pass {self.pass_number}; run it before save_stats")
        if not self.keep_stats:
            raise DQError("statistics were not kept: pass keep_stats=True to dq.prepare (or Calibration) to save them")
        path = Path(path)
        tensors: dict[str, torch.Tensor] = {}
        for stage, store in self.recorded.items():
            for key, tensor in store.state_dict().items():
                tensors[f"{stage}/{key}"] = tensor.detach().contiguous().cpu()
        meta = {
            "dq_stats_format": str(STATS_FORMAT),
            "recipe": json.dumps(self.recipe.to_dict()),
            "layers": json.dumps([c.name for c in self.plan]),
            "model_class": type(self.model).__name__,
            "weights_sha256": self.source.get("weights_sha256") or "",
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        scratch = path.with_name(f".{path.name}.partial")
        save_file(tensors, scratch, metadata=meta)
        scratch.replace(path)  # atomic: a reader never sees half a file
        logger.info("calibration statistics written to %s (%.1f MB)", path, path.stat().st_size / 2**20)
        return path

    def replay(self, path: str | Path) -> Calibration:
        """Finish calibration from a statistics file written by `save_stats` (or ``dq
        calibrate``) for the same model class, recipe and layers, instead of running inputs."""
        self.stop_hooks()
        stages = read_stats(path, self)
        while not self.ready:
            stage = self.stage
            if stage not in stages:
                raise DQError(f"{path} holds no statistics for calibration {stage}; write it again with dq calibrate")
            missing = sorted({t.name for t in self.targets if not t.moment_optional}
                             - set(stages[stage].layers()) - stages[stage].moment_names())
            if missing:
                raise DQError(
                    f"{path} has no {stage} statistics for layers {missing[:5]}: it was written for another "
                    "plan; run dq calibrate again with this recipe"
                )
            self.feed(stages[stage], reduce=False)
        return self


SPLIT_ENV = "DQ_SPLIT_PREPARE"  # "0": every process prepares every layer


def split_enabled() -> bool:
    return os.environ.get(SPLIT_ENV, "1") != "0"


def prepare_cost(work) -> float:
    """Rough cost of preparing one layer: D^2 (D + out) for H's D x D work (GPTQ's Cholesky and
    column sweep, the smoothing search's error tr(E H E^T) per alpha); 0 without components."""
    if not (work.has_transform or work.lowrank or work.gptq):
        return 0.0
    width = float(work.channels * work.kernel)
    return width * width * (width + work.module.weight.shape[0])


def assign_shares(costs: dict[str, float], world: int, loads: list[float] | None = None) -> list[list[str]]:
    """Layers per process, balanced by cost (largest first onto the least loaded process; the
    same on every process: the order and ties are fixed). loads: each process's cost so far
    (updated), so that successive calls (the passes under a moments budget) balance too."""
    loads = [0.0] * world if loads is None else loads
    shares: list[list[str]] = [[] for _ in range(world)]
    for name in sorted(costs, key=lambda n: (-costs[n], n)):
        rank = min(range(world), key=lambda r: (loads[r], r))
        shares[rank].append(name)
        loads[rank] += costs[name]
    return shares


def _prepared_to(prepared: PreparedLayer, device: torch.device | str) -> PreparedLayer:
    if prepared.weight is not None:
        prepared.weight = prepared.weight.to(device)
    if prepared.weight_codes is not None:
        prepared.weight_codes = tuple(None if t is None else t.to(device) for t in prepared.weight_codes)
    for part in ("input_transform", "branch"):
        module = getattr(prepared, part)
        if module is not None:
            setattr(prepared, part, module.to(device))
    return prepared


def preparing(names: list[str], works: dict) -> Iterable[str]:
    """`names` to iterate over, behind a progress bar when any of them has preparation to do
    (smoothing search, low-rank fit, GPTQ: seconds to minutes per layer at DiT widths, after the
    calibration passes' own bar has ended); no bar under ``--quiet`` or for static-range recipes."""
    busy = any(prepare_cost(works[n]) > 0 for n in names)
    return tqdm(names, desc="preparing layers", unit="layer", disable=not (busy and show_progress()))


def prepare_split(works: dict, names: list[str], store: StatsStore | None, groups: TimestepGroups,
                  loads: list[float] | None = None) -> dict[str, PreparedLayer]:
    """Prepare `names` across the processes: each prepares its share (balanced by
    `prepare_cost`), then every process receives every prepared layer, so all hold the model one
    process preparing all would make, bit for bit (the statistics are the same everywhere)."""
    world, me = distributed.world_size(), distributed.rank()
    costly = {n: prepare_cost(works[n]) for n in names}
    shares = assign_shares({n: c for n, c in costly.items() if c > 0}, world, loads)
    out: dict[str, PreparedLayer] = {}
    with torch.no_grad():
        for name in names:
            if costly[name] == 0:  # nothing to prepare: no exchange
                out[name] = prepare_layer(works[name], store, groups)
        mine = {name: _prepared_to(prepare_layer(works[name], store, groups), "cpu") for name in preparing(shares[me], works)}
    logger.info("preparing %d of %d layers on this process (%d processes)", len(mine), sum(map(len, shares)), world)
    for theirs in distributed.gather_objects(mine, "the exchange of the prepared layers"):
        for name, prepared in theirs.items():
            out[name] = _prepared_to(prepared, works[name].module.weight.device)
    return out


MOMENTS_BUDGET_ENV = "DQ_MOMENTS_BUDGET"
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str | int) -> int | str:
    """A byte count with explicit units ("512MiB", "2 GB", "100B"), or "largest" (one layer's
    second moment at a time)."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 1:
            raise DQError(f"moments budget must be positive, got {text}")
        return text
    raw = str(text).strip().lower().replace(" ", "")
    if raw == "largest":
        return "largest"
    number = raw.rstrip("kmgtib")
    unit = raw[len(number):]
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit not in _UNITS or not value > 0:
        raise DQError(
            f"moments budget {text!r}: give bytes with explicit units (e.g. 512MiB, 2GB, 100B) or 'largest'"
        )
    return int(value * _UNITS[unit])


def format_bytes(budget: int | str | None) -> str:
    return budget if isinstance(budget, str) else "-" if budget is None else f"{budget / 2**20:.1f} MiB"


def env_moments_budget() -> int | str | None:
    """The second-moment budget from ``DQ_MOMENTS_BUDGET`` (None: no budget, one pass)."""
    raw = os.environ.get(MOMENTS_BUDGET_ENV, "").strip()
    return parse_bytes(raw) if raw else None


def shared_first_pass(cals: list[Calibration]) -> list[CalibTarget] | None:
    """The targets of ONE pass 1 that serves several calibrations of one model over the same
    inputs (the union of theirs), or None where one pass cannot serve them all: fewer than two
    waiting in pass 1, several models, several processes (their merge runs per calibration), a
    reducer, pass 1 split under a second-moments budget, or targets of one layer that disagree.
    Pass 1 reads the raw inputs (channel ranges, H, histograms of untransformed inputs), which do
    not depend on the formats a plan gives the layers: `dq.mixed` builds every candidate format
    from one pass 1, feeding each calibration a view of its statistics (`StatsStore.view`) when
    that format's turn comes (so one format's prepared layers are held at a time), and each
    format still runs its own pass 2. Each calibration ends as if it had run its own pass 1."""
    waiting = [c for c in cals if c.stage == "pass1"]
    if (len(waiting) < 2 or len({id(c.model) for c in waiting}) > 1 or distributed.active()
            or any(c.reduce is not None or len(c._chunks) > 1 for c in waiting)):
        return None
    union: dict[str, CalibTarget] = {}
    for cal in waiting:
        for t in cal.targets:
            u = union.get(t.name)
            if u is None:
                union[t.name] = t
                continue
            if (u.module is not t.module or u.channel_dim != t.channel_dim or u.unfold != t.unfold
                    or u.transform is not None or t.transform is not None):
                return None
            moment = u.second_moment or t.second_moment
            optional = all(x.moment_optional for x in (u, t) if x.second_moment) if moment else False
            union[t.name] = replace(u, histogram=u.histogram or t.histogram, second_moment=moment,
                                    moment_optional=optional, channel_stats=u.channel_stats or t.channel_stats)
    return list(union.values())


def moment_chunks(targets: list[CalibTarget], budget: int | str | None) -> list[list[str]]:
    """The layers that collect second moments, in consecutive groups whose float32 moments fit
    in `budget` bytes together (a layer larger than the budget alone; "largest": one layer per
    group). Counted unshared: layers that share an input only make a group smaller."""
    chunks: list[list[str]] = []
    size = 0
    for target in targets:
        if not target.second_moment:
            continue
        need = moment_bytes(target)
        fits = budget is None or (isinstance(budget, int) and size + need <= budget)
        if chunks and fits:
            chunks[-1].append(target.name)
            size += need
        else:
            chunks.append([target.name])
            size = need
    return chunks


def read_stats(path: str | Path, cal: Calibration) -> dict[str, StatsStore]:
    """The per-pass statistics in a `save_stats` file, checked against `cal`'s model and recipe."""
    path = Path(path)
    if not path.is_file():
        raise DQError(f"calibration statistics file {path} does not exist; write it with `dq calibrate MODEL --recipe R --stats-out {path}`")
    try:
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_len))
        meta = header.get("__metadata__") or {}
        data = load_file(path)
    except (OSError, ValueError, SafetensorError) as exc:
        raise DQError(f"{path} is not a readable dq statistics file ({exc}); write it again with dq calibrate") from exc
    if meta.get("dq_stats_format") not in READABLE_STATS_FORMATS:
        raise DQError(
            f"{path} is not a dq statistics file of format {' or '.join(READABLE_STATS_FORMATS)} (format "
            f"{meta.get('dq_stats_format')!r}, metadata: {sorted(meta)}); write it again with dq calibrate"
        )
    if meta.get("model_class") != type(cal.model).__name__:
        raise DQError(f"{path} was written for a {meta.get('model_class')}, not a {type(cal.model).__name__}")
    recorded = Recipe.from_dict(json.loads(meta["recipe"]))
    # `keep` may grow at load (modules_to_not_convert, _keep_in_fp32_modules): the layer list
    # below is what must match then
    if {**recorded.to_dict(), "keep": None} != {**cal.recipe.to_dict(), "keep": None}:
        raise DQError(
            f"{path} was calibrated with recipe {recorded.name!r}, which differs from {cal.recipe.name!r}; "
            "statistics depend on the recipe (smoothing, rotation, which layers): calibrate again with this one"
        )
    layers = json.loads(meta.get("layers", "[]"))
    if layers != [c.name for c in cal.plan]:
        raise DQError(f"{path} plans other layers than this model ({len(layers)} vs {len(cal.plan)}); it was written for another model")
    if meta.get("weights_sha256") and cal.source.get("weights_sha256") and meta["weights_sha256"] != cal.source["weights_sha256"]:
        logger.warning("%s was calibrated on other weights than this model's (hash differs); the ranges may not fit", path)
    stages: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in data.items():
        stage, _, rest = key.partition("/")
        stages.setdefault(stage, {})[rest] = tensor
    return {stage: StatsStore.from_state_dict(d) for stage, d in stages.items()}


def prepare(model: nn.Module, recipe: str | Recipe | dict[str, Any] = "w8a8", *, pipe=None,
            reduce: Reduce | None = None, keep_stats: bool = False,
            moments_budget: int | str | None = None) -> Calibration:
    """Plan `model`'s quantization with `recipe` and hook the layers whose statistics the recipe
    needs. Run the model over calibration inputs (inside ``for _ in cal.passes():`` when the
    recipe may need two passes), then call `dq.convert(model)`.

    pipe: the pipeline that drives the model, if any (read for classifier-free guidance
    batches). reduce: applied to each pass's statistics when it ends; default: the exact merge
    across the processes of a torch.distributed / accelerate launch (`StatsStore.all_reduce_`,
    `dq.calibrate.distributed`; nothing in a single process). keep_stats: keep every pass's statistics
    for `Calibration.save_stats` (costs the second moments' memory until convert).
    moments_budget: bytes (an int, or text with explicit units: "4GiB") of second moments
    held at once, or "largest" (one layer's); default ``DQ_MOMENTS_BUDGET``, else no bound.
    Under a budget `cal.passes()` yields further passes over the same inputs, each collecting
    the moments of the next layers that fit, which are then prepared and freed: the model is
    the unbounded one, bit for bit."""
    if not isinstance(model, nn.Module):
        raise DQError(f"dq.prepare takes the denoiser module (pipe.transformer or pipe.unet), got {type(model).__name__}")
    current = getattr(model, CALIBRATION_ATTR, None)
    if current is not None:
        raise DQError(f"{type(model).__name__} is already being calibrated (dq.prepare was called); call dq.convert(model) or cal.close() first")
    cal = Calibration(model, recipe, pipe=pipe, reduce=reduce, keep_stats=keep_stats, moments_budget=moments_budget)
    setattr(model, CALIBRATION_ATTR, cal)
    cal.start_pass()
    return cal


def calibration_of(model: nn.Module) -> Calibration | None:
    return getattr(model, CALIBRATION_ATTR, None)


def convert(model: nn.Module) -> nn.Module:
    """Swap the layers `dq.prepare` planned for quantized ones, from the statistics collected
    since; returns the same (now quantized) model. Nothing changes if it refuses."""
    cal = getattr(model, CALIBRATION_ATTR, None)
    if cal is None:
        raise DQError(f"{type(model).__name__} was not prepared: call cal = dq.prepare(model, recipe), run the model, then dq.convert(model)")
    if not cal.ready and cal.calibrator is not None and not cal.calibrator.store.entries and not cal.calibrator.store.moments:
        raise DQError(
            f"nothing ran since dq.prepare: recipe {cal.recipe.name!r} needs calibration pass {cal.pass_number}; "
            "run the model over calibration inputs before dq.convert (or use `for _ in cal.passes(): ...`)"
        )
    if not cal.ready:
        cal.end_pass()
    if not cal.ready:
        raise DQError(
            f"recipe {cal.recipe.name!r} needs a second calibration pass over the same inputs (its smoothing/rotation "
            "changes what the layers quantize); its hooks are on now: run the model again, then call dq.convert "
            "again (or write the loop as `for _ in cal.passes(): ...`)"
        )
    cal.close()
    return apply_calibration(cal)


def apply_calibration(cal: Calibration) -> nn.Module:
    """Quantize `cal.model` from a complete calibration (shared by `convert` and `dq.quantize`)."""
    from .engine import apply_quantization

    model = cal.model
    apply_quantization(model, cal.plan, cal.store, cal.groups, cal.prepared, cal.recipe, cal.source)
    summary = summarize(cal.prepared)
    if summary:
        logger.info("outlier handling: %s", summary)
    logger.info("quantized %d layers of %s with recipe %s (%d timestep groups)",
                len(cal.plan), type(model).__name__, cal.recipe.name, len(cal.groups))
    return model


def calibrate(model: nn.Module, recipe: str | Recipe | dict[str, Any] = "w8a8", run: Callable[[], Any] | None = None,
              *, pipe=None, stats: str | Path | None = None, reduce: Reduce | None = None) -> nn.Module:
    """prepare -> run -> convert in one call: `run()` runs the model over the calibration inputs
    (it is called once per pass), or `stats` names a statistics file to replay instead. Any
    failure leaves the model as it was."""
    if (run is None) == (stats is None):
        raise DQError("dq.calibrate needs exactly one of run= (a function that runs the model over calibration inputs) or stats= (a statistics file)")
    if stats is not None:
        cal = Calibration(model, recipe, pipe=pipe, reduce=reduce, keep_stats=True).replay(stats)
        return apply_calibration(cal)
    cal = prepare(model, recipe, pipe=pipe, reduce=reduce)
    try:
        for _ in cal.passes():
            run()
    except BaseException:
        cal.close()
        raise
    return convert(model)
