"""Which code path runs a quantized layer on this machine: chosen by measurement.

A kernel family (`dispatch.choose_kernel`: "int8", "dequant") says what the layer's
formats allow; a *path* is one concrete way to compute it, and the fastest one differs
between machines by orders of magnitude (oneDNN's fused int8 linear is 20% faster than
`torch._int_mm` on an Intel Xeon with VNNI, and runs its reference kernel, 1000x slower,
on an AMD EPYC). So nothing is chosen by availability:

- "onednn": the fused oneDNN int8 linear on a prepacked weight copy (CPU, static
  per-tensor activations, 8-bit weights; one more byte per weight);
- "int_mm": `torch._int_mm` and a fused epilogue (packed 4/5/6-bit weights unpacked per call);
- "int8_copy": the same with the int8 weight kept unpacked beside the packed codes (packed and
  two-level weights: one more byte per weight at run time, no unpacking per call);
- "float_copy": a dequantized weight kept in the input's dtype and the float op on the
  (fake-)quantized input: the same function in float, fastest where a layer is too small
  for integer matmuls to pay; only for layers whose copy is at most `FLOAT_COPY_MAX_BYTES`
  (large layers would lose the memory saving quantization is for);
- "dequant": the weight dequantized on every call (the simulated path; no extra memory);
- "int_mm_a8": weight-only layers (W4A16, W8A16) run as int8 x int8 with dynamic per-token
  int8 activations (`runners.A8_SPEC`) and a kept int8 weight copy. It changes the
  numerics (the activations are rounded), so it is a candidate only where the recipe allows
  it (`Recipe.weight_only_int8_activations`, `set_execution(weight_only_int8=True)`), and
  it is checked against the simulated layer *with* those activations, not the float one.
- "float_input": the "float_copy" weight with the input NOT quantized (layers with quantized
  activations, at most `FLOAT_COPY_MAX_BYTES`): where no integer path beats the float layer
  (narrow layers, dynamic per-token activations), the layer costs what the float one does.
  It changes the numerics (no activation rounding: closer to full precision than the
  simulated layer), so it is a candidate only where the recipe allows it
  (`Recipe.float_activations_where_faster`, on in w8a8, w8a8-dynamic, w4a8 and w4a4;
  `set_execution(float_activations=True)`), and it is checked against the float op on the same
  weight. The layer's input transform (smoothing, rotation) and low-rank branch fold into its
  copy, so it is timed against the other paths WITH those (`measure(overhead=)`): whole-layer
  costs, not the op alone, which had it lose to integer paths that were slower in the model.
  A weight-only layer with a transform or a branch (w4a4's caption projection) may take it
  without any opt-in: there the float op on the raw input is exactly its function.
- "bf16": weight-only layers (W4A16, W8A16) with a float32 input run their op in bfloat16:
  the input rounded to bfloat16, the weight made per call (no copy kept) as its exact int8
  integers where the layout has them, the per-channel scale applied to the product (else the
  dequantized weight rounded to bfloat16), float32 accumulation, the result rounded to
  bfloat16 and returned in float32, the scale and bias applied there.
  On CPUs with bfloat16 matmul instructions (AVX-512 BF16, AMX) it is about twice as fast as
  the float32 op; elsewhere the screen drops it. A "16-bit activations" format as the name
  W4A16 says, but not the float32 function the layer simulates, so it is a candidate only
  where the recipe allows it (`Recipe.weight_only_bf16_activations`, on in the w4a16 preset;
  `set_execution(weight_only_bf16=True)`), and it is checked against a float32 simulation of
  those roundings (`runners.simulated_bf16`).

On a layer's first eager call for a row count (bucketed to a power of two), each path its
formats allow is screened on a few rows (a path more than `SCREEN_FACTOR` x slower than
the best there is dropped: the reference kernels never get a full-size run; where a few rows
of a narrow layer are too little work to tell, the screen grows them until it can), checked
against the simulated result (`MAX_REL_ERROR`), then timed on the real input; the fastest
correct one is kept for every layer of that shape class. Choices are cached per machine
(CPU model and ISA flags, threads, torch version) in `cache_dir()`, written atomically,
so a second process measures nothing. Inside torch.compile nothing is measured: a compiled
graph uses the cached choice (or the layer's last one, or "int_mm").
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ..nn.layers import QuantModule

logger = logging.getLogger(__name__)

PATHS = ("onednn", "int_mm", "int8_copy", "float_copy", "dequant", "int_mm_a8", "float_input", "bf16")
# The attention core's paths (`dq.nn.bf16_attention`): float32 SDPA, SDPA on bfloat16 inputs.
ATTENTION_PATHS = ("sdpa", "sdpa_bf16")
# The feed-forward's tanh GELU (`dq.nn.gelu`): torch's kernel, the same function as x * sigmoid(2u).
ACTIVATION_PATHS = ("gelu", "gelu_sigmoid")
# Paths that keep a runtime copy of the weight: a tie goes to one that does not.
COPY_PATHS = ("int8_copy", "float_copy", "int_mm_a8", "float_input")
CACHE_VERSION = 8  # 2: int8_copy and int_mm_a8 (older choices never saw them); 3: one-pass static
# activation quantization and the in-place epilogue (2026-12-01) changed what the int paths cost;
# 4: path float_input (a dq without it would discard a whole file that names it); 5: path bf16, and
# entries measured under torch.inference_mode, where the static int8 path raised and was dropped;
# 6: the attention core's entries (ATTENTION_PATHS), and path bf16 on exact integer weights;
# 7: the tanh GELU's entries (ACTIVATION_PATHS); 8: the correctness check allows for a bfloat16 or
# float16 input's own rounding (`DTYPE_EPS_SLACK`): before, such entries dropped every integer path
FLOAT_COPY_MAX_BYTES = 1 << 20
SCREEN_ROWS = 8
SCREEN_FACTOR = 20.0
# A path this much slower than the best on a probe under SCREEN_MIN_S may be a reference kernel
# whose cost the best path's fixed overhead hides at that size: the probe grows (measure(grow=)).
SCREEN_GROW_FACTOR = 4.0
SCREEN_MIN_S = 5e-3
SCREEN_BUDGET_S = 0.05
MAX_REL_ERROR = 1e-3
# In a low-precision dtype the simulated reference itself is rounded to that dtype (a bfloat16
# matmul is off by about its unit roundoff, 3.9e-3), while an integer path computes exactly
# and rounds once: the check allows this many machine epsilons of the input's dtype.
DTYPE_EPS_SLACK = 2.0
TIME_BUDGET_S = 0.1
MIN_ROUNDS = 2
MAX_REPS = 7
# CPU flags that change which kernels oneDNN and ATen run.
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16", "avx512_fp16")


# -- the machine -------------------------------------------------------------------
def cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none)."""
    info: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.split("\n\n", 1)[0].splitlines():
        key, _, value = line.partition(":")
        info[key.strip()] = value.strip()
    return info


def machine() -> dict[str, object]:
    """What decides kernel speed here: CPU model, family/model/stepping, ISA flags, threads, torch."""
    info = cpuinfo()
    flags = set(info.get("flags", "").split())
    return {
        "cpu": info.get("model name") or platform.processor() or platform.machine(),
        "vendor": info.get("vendor_id", ""),
        "family_model_stepping": "/".join(info.get(k, "?") for k in ("cpu family", "model", "stepping")),
        "isa": sorted(f for f in ISA_FLAGS if f in flags),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def fingerprint(info: Mapping[str, object] | None = None) -> str:
    blob = json.dumps(info if info is not None else machine(), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cache_dir() -> Path:
    """$DQ_CACHE_DIR, else $XDG_CACHE_HOME/dq, else ~/.cache/dq."""
    if os.environ.get("DQ_CACHE_DIR"):
        return Path(os.environ["DQ_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dq"


# -- the cache -----------------------------------------------------------------------
@dataclass
class Measurement:
    """One shape class: each path's median time (s), the paths dropped and why, the choice."""

    choice: str
    times: dict[str, float] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return {"choice": self.choice, "times": self.times, "dropped": self.dropped}

    def choice_among(self, allowed: Sequence[str]) -> str | None:
        """The choice among the `allowed` paths by this measurement's numbers, or None where one of
        them was never measured here (an option allows a path the measurement did not see, e.g.
        a recipe's opt-in path): then it must be measured again. So a model whose recipe allows
        fewer paths reuses an entry without overwriting it, and one that allows more re-measures."""
        seen = set(self.times) | set(self.dropped)
        if any(p not in seen for p in allowed):
            return None
        if self.choice in allowed:
            return self.choice
        return decide({p: t for p, t in self.times.items() if p in allowed}, self.dropped)

    @classmethod
    def from_dict(cls, data: object) -> Measurement:
        known = PATHS + ATTENTION_PATHS + ACTIVATION_PATHS
        if not isinstance(data, dict) or data.get("choice") not in known:
            raise ValueError("not a measurement")
        times, dropped = data.get("times", {}), data.get("dropped", {})
        if not all(p in known and isinstance(t, (int, float)) and math.isfinite(t) for p, t in times.items()):
            raise ValueError("bad times")
        if not all(p in known and isinstance(r, str) for p, r in dropped.items()):
            raise ValueError("bad dropped")
        return cls(data["choice"], dict(times), dict(dropped))


def _load_entries(path: Path, key: str) -> dict[str, Measurement]:
    """The measurements in a cache file ({} if there is none); ValueError & co. if it is
    corrupted or was written for another machine or format."""
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    if data.get("version") != CACHE_VERSION or data.get("fingerprint") != key:
        raise ValueError("written for another machine or cache version")
    return {str(k): Measurement.from_dict(v) for k, v in data["entries"].items()}


class ChoiceCache:
    """Measurements of this machine, in memory and in one JSON file per machine fingerprint."""

    def __init__(self, folder: Path | None = None):
        self.info = machine()
        self.key = fingerprint(self.info)
        # the version in the name: processes of another dq version (other checkouts) keep their own file
        self.path = (folder or cache_dir()) / f"kernels-{self.key}-v{CACHE_VERSION}.json"
        self.entries: dict[str, Measurement] = {}
        self._lock = threading.Lock()
        self._read()

    def _read(self) -> None:
        try:
            self.entries = _load_entries(self.path, self.key)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            logger.warning("ignoring the kernel choice cache %s (%s); it will be measured again and rewritten", self.path, exc)
            self.entries = {}

    def get(self, key: str) -> Measurement | None:
        return self.entries.get(key)

    def put(self, key: str, measurement: Measurement) -> None:
        with self._lock:
            self.entries[key] = measurement
            self._write()

    def clear(self) -> None:
        """Forget every choice of this machine (in memory and on disk): all are measured again."""
        with self._lock:
            self.entries = {}
            self.path.unlink(missing_ok=True)

    def _write(self) -> None:
        """Atomically: merge with what another process wrote meanwhile, write a temporary
        file beside the cache, rename it over. A cache that cannot be written is not an error."""
        try:
            try:
                merged = {**_load_entries(self.path, self.key), **self.entries}
            except (ValueError, KeyError, TypeError, AttributeError):
                merged = dict(self.entries)  # unreadable: rewritten whole
            body = {
                "version": CACHE_VERSION, "fingerprint": self.key, "machine": self.info,
                "entries": {k: v.to_dict() for k, v in sorted(merged.items())},
            }
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(body, f, indent=1)
                os.replace(tmp, self.path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as exc:
            logger.debug("kernel choice cache %s not written: %s", self.path, exc)


_CACHE: ChoiceCache | None = None


def cache() -> ChoiceCache:
    """This process's cache (re-read when DQ_CACHE_DIR or the thread count changes)."""
    global _CACHE
    folder = cache_dir()
    if _CACHE is None or _CACHE.path.parent != folder or _CACHE.info["threads"] != torch.get_num_threads():
        _CACHE = ChoiceCache(folder)
    return _CACHE


# -- deciding --------------------------------------------------------------------------
def decide(times: Mapping[str, float], dropped: Mapping[str, str] = ()) -> str:
    """The fastest path that was not dropped ("dequant", the simulated path, if none is left).
    Paths within 3% of the fastest count as tied; a tie goes to one that keeps no runtime
    copy of the weight (`COPY_PATHS`), then to the first in `PATHS` order (the attention core's
    paths: "sdpa", the exact one, first; "sdpa" too if none is left; the GELU's: "gelu", torch's own)."""
    usable = {p: t for p, t in times.items() if p not in dropped and math.isfinite(t)}
    if not usable:
        seen = set(times) | set(dropped)
        for family in (ATTENTION_PATHS, ACTIVATION_PATHS):  # a non-layer choice falls back to its exact path
            if seen and seen <= set(family):
                return family[0]
        return "dequant"
    best = min(usable.values())
    near = [p for p in PATHS + ATTENTION_PATHS + ACTIVATION_PATHS if p in usable and usable[p] <= best * 1.03]
    lean = [p for p in near if p not in COPY_PATHS]
    return lean[0] if lean else near[0]


def _time_once(fn: Callable[[], object], sync: Callable[[], None], clock: Callable[[], float] = time.perf_counter) -> float:
    sync()
    start = clock()
    fn()
    sync()
    return clock() - start


def clock_for(x: torch.Tensor) -> Callable[[], float]:
    """The clock that times calls on `x`: with one torch thread on the CPU, the calling
    thread's CPU time (all the work runs in it, and other processes on a shared machine do
    not inflate it as they do wall-clock time); wall-clock time otherwise."""
    return time.thread_time if x.device.type == "cpu" and torch.get_num_threads() == 1 else time.perf_counter


def _best_time(fn: Callable[[], object], sync: Callable[[], None], budget: float = TIME_BUDGET_S,
               clock: Callable[[], float] = time.perf_counter) -> float:
    """Best of a few timed calls after one warm-up call (that call alone if it overran the
    budget: a reference kernel is not run twice). The minimum, not the median: on a shared
    machine a call is only ever slowed down by others, never sped up."""
    first = _time_once(fn, sync, clock)
    if first > budget:
        return first
    reps = max(MIN_ROUNDS, min(MAX_REPS, int(budget / max(first, 1e-9))))
    return min(_time_once(fn, sync, clock) for _ in range(reps))


def _race(fns: Mapping[str, Callable[[], object]], sync: Callable[[], None], budget: float = TIME_BUDGET_S,
          clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """The best time of each function over rounds that run them in turn (interleaved, so a
    busy spell of the machine hits all alike; the minimum is the least disturbed run)."""
    first = {name: _time_once(fn, sync, clock) for name, fn in fns.items()}  # warm-up round
    if not first:
        return first
    # a path far slower than the best already on its first full-size call (and over the budget)
    # is not run again: its first time stands (a reference kernel costs seconds per call)
    fastest = min(first.values())
    hopeless = {n for n, t in first.items() if t > SCREEN_FACTOR * fastest and t > budget}
    timed = {n: fn for n, fn in fns.items() if n not in hopeless}
    rounds = max(MIN_ROUNDS, min(MAX_REPS, int(budget / max(sum(first[n] for n in timed), 1e-9))))
    best = {n: (first[n] if n in hopeless else math.inf) for n in fns}
    for _ in range(rounds):
        for name, fn in timed.items():
            best[name] = min(best[name], _time_once(fn, sync, clock))
    return best


def _size(probe: torch.Tensor) -> str:
    """How much input a screen ran on, for its log line: rows, or a convolution's input shape."""
    return f"{probe.shape[0]} rows" if probe.dim() <= 2 else f"a {'x'.join(map(str, probe.shape))} input"


def _rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.float()
    return float((out.float() - ref).norm() / ref.norm().clamp(min=1e-12))


def measure(
    candidates: Mapping[str, Callable[[torch.Tensor], torch.Tensor]],
    reference: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    probe: torch.Tensor,
    *,
    tolerance: float = MAX_REL_ERROR,
    references: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
    overhead: Callable[[torch.Tensor], object] | None = None,
    folded: Sequence[str] = (),
    against: str = "the simulated layer",
    grow: Callable[[torch.Tensor], torch.Tensor | None] | None = None,
) -> Measurement:
    """Screen each candidate on `probe`, check it against `reference` (or its own entry of
    `references`: a path that computes another function, e.g. with rounded activations, is
    checked against a simulation of that function), time the survivors on `x`. `overhead`:
    work every path but those in `folded` does on top of its own call (a layer's input
    transform and low-rank branch, which a folded weight absorbs), timed with each of them.
    `against`: what `reference` computes, for the reason a wrong path is dropped. `grow(rows)`:
    more of `x` than `rows` (None at full size); where the probe is too little work to tell
    (a path over `SCREEN_GROW_FACTOR` x the best but under `SCREEN_MIN_S`), the screen is
    repeated on the larger part until it can. The tolerance is at least `DTYPE_EPS_SLACK`
    machine epsilons of `x`'s dtype (bfloat16, float16: their own rounding)."""
    if x.is_floating_point():
        tolerance = max(tolerance, DTYPE_EPS_SLACK * torch.finfo(x.dtype).eps)
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    clock = clock_for(x)
    dropped: dict[str, str] = {}
    screen: dict[str, float] = {}
    with torch.no_grad():
        ref = reference(probe)
        for path, fn in candidates.items():
            try:
                expected = ref if not references or path not in references else references[path](probe)
                sync()
                start = clock()
                out = fn(probe)
                sync()
                first = clock() - start  # with one-time costs (weight copies, JIT)
                error = _rel_error(out, expected)
                if not error <= tolerance:
                    dropped[path] = f"wrong result (relative error {error:.1e} against {against})"
                    continue
                screen[path] = first if first > SCREEN_BUDGET_S else _best_time(lambda fn=fn: fn(probe), sync, SCREEN_BUDGET_S, clock)
            except Exception as exc:  # a kernel that raises on this shape is dropped, not fatal
                dropped[path] = f"raised {type(exc).__name__}: {exc}"[:200]
        # the screen's verdicts: on the probe, then (`grow`) on larger parts of `x` for the paths
        # the probe could not judge, each time against the best path re-timed on the same part
        rows, judged = probe, screen
        while judged:
            best_path = min(judged, key=judged.get)
            best = judged[best_path]
            for path, t in judged.items():
                if t > SCREEN_FACTOR * best and t > SCREEN_MIN_S:
                    dropped[path] = f"{t / best:.0f}x slower than the best path on {_size(rows)}"
            unsure = [p for p, t in judged.items() if SCREEN_GROW_FACTOR * best < t <= SCREEN_MIN_S]
            larger = grow(rows) if unsure and grow is not None else None
            if larger is None:
                break
            rows, judged = larger, {}
            for path in (best_path, *unsure):
                try:
                    judged[path] = _best_time(lambda fn=candidates[path], r=rows: fn(r), sync, SCREEN_BUDGET_S, clock)
                except Exception as exc:
                    dropped[path] = f"raised {type(exc).__name__}: {exc}"[:200]
            if best_path not in judged:  # the best path raised on more rows: the race sorts it out
                break
        survivors = {p: (lambda fn=fn: fn(x)) if overhead is None or p in folded else (lambda fn=fn: (fn(x), overhead(x)))
                     for p, fn in candidates.items() if p not in dropped}
        try:
            times = _race(survivors, sync, clock=clock)
        except Exception:  # one raised on the full shape: find which, time the rest alone
            times = {}
            for path, fn in survivors.items():
                try:
                    times[path] = _best_time(fn, sync, clock=clock)
                except Exception as exc:
                    dropped[path] = f"raised {type(exc).__name__}: {exc}"[:200]
    return Measurement(decide(times, dropped), times, dropped)


def cached(key: str, measure: Callable[[], Measurement]) -> Measurement:
    """This machine's measurement for shape class `key`: from the cache, or `measure()` now,
    stored and logged once (the choices outside the layers: attention core, GELU; `dq doctor`)."""
    found = cache().get(key)
    if found is None:
        found = measure()
        cache().put(key, found)
        log_choice(key, found)
    return found


def cached_choices(prefix: str, allowed: Sequence[str]) -> dict[str, str]:
    """The cached choices among `allowed` of the shape classes whose key starts with `prefix`."""
    return {key: m.choice for key, m in cache().entries.items() if key.startswith(prefix) and m.choice in allowed}


def bucket(rows: int) -> int:
    """Row counts are measured per power of two."""
    return 1 << max(0, int(rows - 1).bit_length())


def is_compiling() -> bool:
    return torch.compiler.is_compiling()


def describe(layer: QuantModule) -> str:
    """A layer's shape class without its row count: what makes two layers time alike."""
    w, a, layout = layer.weight_spec, layer.act_spec, layer.weight_layout
    act = "none" if a is None else f"{a.kind}{a.bits}-{'dyn-' + a.granularity if a.dynamic else 'static'}-{'sym' if a.symmetric else 'asym'}"
    weight = f"{w.kind}{w.bits}{'-packed' if layout.packed else ''}{'-2lvl' if layout.two_level else ''}"
    geometry = "linear"
    if getattr(layer, "conv_groups", None) is not None:
        geometry = f"conv{'x'.join(map(str, layer.weight_shape[2:]))}-s{'x'.join(map(str, layer.stride))}"
    a8 = "|a8ok" if layer.__dict__.get("_dq_weight_only_int8") else ""
    fa = "|faok" if layer.__dict__.get("_dq_float_activations") else ""
    return f"{layer.kernel}|{geometry}|k{layout.cols}|n{layout.out_features}|w:{weight}|a:{act}{a8}{fa}"


def log_choice(key: str, m: Measurement) -> None:
    times = ", ".join(f"{p} {t * 1e3:.3g} ms" for p, t in sorted(m.times.items(), key=lambda kv: kv[1]))
    drops = "".join(f"; {p} dropped: {why}" for p, why in m.dropped.items())
    logger.info("kernel choice %s -> %s (%s%s)", key, m.choice, times, drops)
