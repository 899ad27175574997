"""Second moments H = sum x x^T: one per distinct input (layers fed the identical tensor share one,
exactly), and collected under a memory budget in several passes, to the same model bit for bit."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import dq
from dq.calibrate.hooks import Calibrator, CalibTarget
from dq.calibrate.stats import SecondMoment, StatsStore
from dq.engine import calibrate_pipeline
from dq.errors import DQError
from dq.model import apply_calibration
from dq.testing.tiny import default_call_kwargs, prompts_for, tiny_pipeline


class Toy(nn.Module):
    """q, k, v read x; `late` reads x in the first call only (then x + 1); `odd` is skipped in
    the third call; `after` reads x after an in-place change; `other` reads its own input."""

    def __init__(self):
        super().__init__()
        for name in ("q", "k", "v", "late", "odd", "after", "other"):
            setattr(self, name, nn.Linear(8, 8))
        self.calls = 0

    def forward(self, x, timestep=None):
        self.calls += 1
        out = self.q(x) + self.k(x) + self.v(x)
        out = out + self.late(x if self.calls == 1 else x + 1)
        if self.calls != 3:
            out = out + self.odd(x)
        y = x * 2
        out = out + self.other(y)
        y.mul_(3)  # same object, new content: `after` must not share with `other`'s input
        return out + self.after(y)


NAMES = ("q", "k", "v", "late", "odd", "after", "other")


def _collect(monkeypatch, share: bool, mode) -> StatsStore:
    monkeypatch.setenv("DQ_SHARE_MOMENTS", "1" if share else "0")
    torch.manual_seed(0)
    model = Toy()
    targets = [CalibTarget(n, getattr(model, n), histogram=False, second_moment=True) for n in NAMES]
    gen = torch.Generator().manual_seed(1)
    inputs = [torch.randn(2, 5, 8, generator=gen) for _ in range(4)]
    with Calibrator(None, model, targets, None) as cal, mode():
        for x in inputs:
            model(x)
    return cal.store


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_each_layer_reads_exactly_its_own_moment(monkeypatch, mode):
    """Shared where the input was the identical tensor in every call, split (with the sum so
    far) where it diverged or the layer was skipped: every H equals the unshared one bit for bit."""
    own = _collect(monkeypatch, False, mode)
    shared = _collect(monkeypatch, True, mode)
    assert own.shared == {} and len(own.moments) == len(NAMES)
    assert shared.shared == {"k": "q", "v": "q"}  # late diverged in call 2, odd skipped call 3
    assert set(shared.moments) == {"q", "late", "odd", "after", "other"}
    for name in NAMES:
        assert shared.moment(name).count == own.moment(name).count, name
        assert torch.equal(shared.moment(name).sum, own.moment(name).sum), name
    assert shared.nbytes() < own.nbytes()


class Swap(nn.Module):
    """a and b read x in call 1; in call 2 b reads x first, then a reads x + 1."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)
        self.calls = 0

    def forward(self, x, timestep=None):
        self.calls += 1
        if self.calls == 1:
            return self.a(x) + self.b(x)
        return self.b(x) + self.a(x + 1)


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_optional_moments_only_ever_share(monkeypatch, mode):
    """An optional layer (a layer waiting for its own pass under a moments budget) gets the
    moment of a collecting layer fed the very same input in every call, exactly, and nothing
    where it would need a sum of its own (never joined, diverged, skipped a call, or was left
    alone in a group its collector left): no memory beyond the collecting layers' sums."""
    own = _collect(monkeypatch, False, torch.no_grad)
    monkeypatch.setenv("DQ_SHARE_MOMENTS", "1")
    torch.manual_seed(0)
    model = Toy()
    collect = {"q", "other"}
    targets = [CalibTarget(n, getattr(model, n), histogram=False, second_moment=True, moment_optional=n not in collect)
               for n in NAMES]
    gen = torch.Generator().manual_seed(1)
    with Calibrator(None, model, targets, None) as cal, mode():
        for x in [torch.randn(2, 5, 8, generator=gen) for _ in range(4)]:
            model(x)
    store = cal.store
    assert set(store.moments) == collect and store.shared == {"k": "q", "v": "q"}
    for name in ("q", "k", "v", "other"):
        assert torch.equal(store.moment(name).sum, own.moment(name).sum), name
    # the collector leaves a group where only an optional layer is left: it keeps the sum
    swap = Swap()
    targets = [CalibTarget("a", swap.a, histogram=False, second_moment=True),
               CalibTarget("b", swap.b, histogram=False, second_moment=True, moment_optional=True)]
    xs = [torch.randn(3, 8, generator=gen) for _ in range(2)]
    with Calibrator(None, swap, targets, None) as cal, mode():
        for x in xs:
            swap(x)
    assert set(cal.store.moment_names()) == {"a"}
    want = SecondMoment.from_rows(xs[0]).merge_(SecondMoment.from_rows(xs[1] + 1))
    assert torch.allclose(cal.store.moment("a").sum, want.sum) and cal.store.moment("a").count == want.count


def test_merge_splits_what_the_stores_disagree_on():
    gen = torch.Generator().manual_seed(0)

    def moment(scale=1.0):
        return SecondMoment.from_rows(torch.randn(20, 4, generator=gen) * scale)

    a, b = StatsStore(), StatsStore()
    a.add_moment("x", moment())
    a.shared["y"] = "x"
    b.add_moment("x", moment())
    b.add_moment("y", moment(3.0))  # b saw another input for y
    want_y = a.moment("y").sum + b.moment("y").sum
    want_x = a.moment("x").sum + b.moment("x").sum
    merged = StatsStore().merge_(a).merge_(b)
    assert merged.shared == {} and torch.equal(merged.moment("y").sum, want_y)
    assert torch.equal(merged.moment("x").sum, want_x)
    both = StatsStore().merge_(a).merge_(a)
    assert both.shared == {"y": "x"} and torch.equal(both.moment("y").sum, 2 * a.moment("x").sum)
    round_trip = StatsStore.from_state_dict(both.state_dict())
    assert round_trip.shared == {"y": "x"} and torch.equal(round_trip.moment("y").sum, both.moment("y").sum)


KIND = "flux"


def _kwargs():
    kw = default_call_kwargs(KIND)
    kw.pop("num_inference_steps")
    kw.pop("output_type")
    return kw


def _quantized(monkeypatch, share: bool, recipe: str):
    monkeypatch.setenv("DQ_SHARE_MOMENTS", "1" if share else "0")
    pipe = tiny_pipeline(KIND)
    cal = calibrate_pipeline(pipe, recipe, calib_prompts=prompts_for(KIND, 2), num_inference_steps=2,
                             keep_stats=True, **_kwargs())
    store = cal.recorded["pass1"]
    model = apply_calibration(cal)
    return cal, store, {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("recipe", ["w4a4", "w4a8"])
def test_quantized_pipeline_is_bit_identical_with_fewer_moments(monkeypatch, recipe, tmp_path):
    """Smoothing search + GPTQ read the shared moment: the same model to the bit, fewer bytes;
    the statistics file replays to the same model."""
    _, own, want = _quantized(monkeypatch, False, recipe)
    cal, shared, got = _quantized(monkeypatch, True, recipe)
    assert want.keys() == got.keys()
    assert [k for k in want if not torch.equal(want[k], got[k])] == []
    assert shared.shared, "q/k/v of the tiny FLUX read one input"
    assert any(layer.endswith("attn.to_k") and canon.endswith("attn.to_q") for layer, canon in shared.shared.items())
    assert len(shared.moments) < len(own.moments)
    assert shared.moment_names() == set(own.moments)
    assert shared.nbytes() < own.nbytes()
    path = cal.save_stats(tmp_path / "stats.safetensors")
    model = tiny_pipeline(KIND).transformer
    dq.calibrate(model, recipe, stats=path)
    state = model.state_dict()
    assert [k for k in want if not torch.equal(want[k], state[k])] == []


def _rewrite(path, out, fmt, drop_shares=False):
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta["dq_stats_format"] = fmt
    if drop_shares:
        tensors = {k: v for k, v in tensors.items() if "/share|" not in k}
    save_file(tensors, out, metadata=meta)
    return out


def test_statistics_files_of_format_1_still_replay_and_unknown_formats_are_refused(monkeypatch, tmp_path):
    """A format-1 file (one moment per layer, before sharing) replays to the same model; a
    newer format is refused with a clear message."""
    monkeypatch.setenv("DQ_SHARE_MOMENTS", "0")
    pipe = tiny_pipeline(KIND)
    cal = calibrate_pipeline(pipe, "w4a8", calib_prompts=prompts_for(KIND, 2), num_inference_steps=2,
                             keep_stats=True, **_kwargs())
    path = cal.save_stats(tmp_path / "new.safetensors")
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["dq_stats_format"] == "2"
        assert json.loads(f.metadata()["layers"])
    want = {k: v.clone() for k, v in apply_calibration(cal).state_dict().items()}
    old = _rewrite(path, tmp_path / "old.safetensors", "1", drop_shares=True)
    monkeypatch.delenv("DQ_SHARE_MOMENTS")
    model = tiny_pipeline(KIND).transformer
    dq.calibrate(model, "w4a8", stats=old)
    state = model.state_dict()
    assert [k for k in want if not torch.equal(want[k], state[k])] == []
    future = _rewrite(path, tmp_path / "future.safetensors", "3")
    with pytest.raises(DQError, match="format 1 or 2"):
        dq.calibrate(tiny_pipeline(KIND).transformer, "w4a8", stats=future)


def _recorded(pipe):
    """The denoiser's inputs during the calibration run dq.quantize makes."""
    from dq.calibrate.run import run_pipeline

    seen = []

    def hook(_m, args, kwargs):
        seen.append((tuple(a.clone() if torch.is_tensor(a) else a for a in args),
                     {k: v.clone() if torch.is_tensor(v) else v for k, v in kwargs.items()}))

    handle = pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        recipe = dq.Recipe.from_any("w4a4")
        run_pipeline(pipe, prompts_for(KIND, 2), num_inference_steps=2, batch_size=recipe.calib_batch_size,
                     seed=recipe.calib_seed, call_kwargs=_kwargs())
    finally:
        handle.remove()
    return seen


def test_parse_budget():
    from dq.model import parse_bytes

    assert parse_bytes("512MiB") == 512 * 2**20 and parse_bytes("2 GB") == 2 * 10**9 and parse_bytes("100B") == 100
    assert parse_bytes("largest") == "largest" and parse_bytes(4096) == 4096
    for bad in ("512", "1.5 parsecs", "-3MB", "0GB", ""):
        with pytest.raises(DQError, match="explicit units"):
            parse_bytes(bad)


@pytest.mark.parametrize("budget", ["largest", "100KiB"])
def test_moments_budget_gives_the_unbounded_model_in_more_passes(monkeypatch, budget):
    """Under a budget, the user's loop runs as many passes as the budget needs; each holds the
    moments of at most `budget` bytes of layers (or one layer larger than it), freed once those
    layers are prepared; the model equals the unbounded one bit for bit."""
    from dq.calibrate.hooks import moment_bytes
    from dq.model import moment_chunks, parse_bytes
    from dq.outliers import calibration_targets

    monkeypatch.delenv("DQ_SHARE_MOMENTS", raising=False)
    inputs = _recorded(tiny_pipeline(KIND))

    def run(budget):
        model = tiny_pipeline(KIND).transformer
        held = []  # bytes of second moments alive at the end of each pass: its own and any kept
        distinct = []  # sums (distinct inputs) collected per pass
        mine = []

        def reduce(store):
            kept = mine[0]._first.moments if mine and mine[0]._first is not None else {}
            held.append(sum(m.sum.numel() * 4 for m in [*store.moments.values(), *kept.values()]))
            distinct.append(len(store.moments))
            return store

        cal = dq.prepare(model, "w4a4", reduce=reduce) if budget is None else None
        if budget is not None:
            monkeypatch.setenv("DQ_MOMENTS_BUDGET", budget)
            cal = dq.prepare(model, "w4a4", reduce=reduce)
            monkeypatch.delenv("DQ_MOMENTS_BUDGET")
        mine.append(cal)
        passes = 0
        for _ in cal.passes():
            passes += 1
            with torch.no_grad():
                for args, kwargs in inputs:
                    model(*args, **kwargs)
        dq.convert(model)
        return model.state_dict(), passes, held, cal, distinct

    want, passes, held, _, distinct = run(None)
    got, passes_b, held_b, cal, _ = run(budget)
    assert [k for k in want if not torch.equal(want[k], got[k])] == []
    first = calibration_targets(cal.works, first_pass=True)
    chunks = moment_chunks(first, parse_bytes(budget))
    sizes = {t.name: moment_bytes(t) for t in first if t.second_moment}
    limit = max(sizes.values()) if budget == "largest" else max(parse_bytes(budget), max(sizes.values()))
    # layers fed one input (q, k, v) share one sum and one pass: a pass per distinct input at
    # most, never one per layer
    assert len(chunks) > 2 and passes_b <= passes + len(chunks) - 1
    if budget == "largest":
        assert passes_b == passes + distinct[0] - 1 < passes + len(chunks) - 1, (passes_b, distinct, len(chunks))
    assert max(held_b) <= limit < max(held)
    assert sum(held_b) >= sum(held)  # the same moments, spread over the passes


def test_moments_budget_through_dq_quantize(monkeypatch, tmp_path):
    """dq.quantize (the pipeline's own sampler) runs the extra passes itself: same model; kept
    statistics hold every pass's moments and replay to it."""
    monkeypatch.delenv("DQ_SHARE_MOMENTS", raising=False)
    pipe = tiny_pipeline(KIND)
    dq.quantize(pipe, "w4a8", calib_prompts=prompts_for(KIND, 2), num_inference_steps=2, **_kwargs())
    want = pipe.transformer.state_dict()
    monkeypatch.setenv("DQ_MOMENTS_BUDGET", "largest")
    pipe = tiny_pipeline(KIND)
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda *_: calls.append(1))
    dq.quantize(pipe, "w4a8", calib_prompts=prompts_for(KIND, 2), num_inference_steps=2, **_kwargs())
    got = pipe.transformer.state_dict()
    assert [k for k in want if not torch.equal(want[k], got[k])] == []
    assert len(calls) > 2 * 2 * 2  # more than two passes of 2 prompts x 2 steps
    cal = calibrate_pipeline(tiny_pipeline(KIND), "w4a8", calib_prompts=prompts_for(KIND, 2), num_inference_steps=2,
                             keep_stats=True, **_kwargs())
    path = cal.save_stats(tmp_path / "stats.safetensors")
    for budget in ("largest", None):
        if budget is None:
            monkeypatch.delenv("DQ_MOMENTS_BUDGET")
        model = tiny_pipeline(KIND).transformer
        dq.calibrate(model, "w4a8", stats=path)
        state = model.state_dict()
        assert [k for k in want if not torch.equal(want[k], state[k])] == []
    monkeypatch.setenv("DQ_MOMENTS_BUDGET", "largest")
    monkeypatch.setenv("DQ_MOMENTS_BUDGET", "12")
    with pytest.raises(DQError, match="explicit units"):
        dq.quantize(tiny_pipeline(KIND), "w4a8", calib_prompts=prompts_for(KIND, 2), num_inference_steps=2, **_kwargs())


def test_optional_moments_are_kept_only_where_every_process_has_them(monkeypatch):
    """A shared-for-free moment one process dropped is dropped everywhere before the merge (a
    sum of some processes' inputs only would be wrong); a layer reading a dropped layer's sum
    keeps an exact copy."""
    import types

    from dq.calibrate import distributed
    from dq.model import Calibration

    store = StatsStore()
    q, late = SecondMoment.from_rows(torch.randn(4, 8)), SecondMoment.from_rows(torch.randn(4, 8))
    store.add_moment("q", q)
    store.add_moment("late", late)
    store.shared = {"k": "q", "v": "q", "x": "late"}
    monkeypatch.setattr(distributed, "active", lambda *a: True)
    monkeypatch.setattr(distributed, "gather_objects", lambda obj, what, *a: [obj, ["v"]])  # the other process has v only
    me = types.SimpleNamespace(targets=[CalibTarget(n, None, second_moment=True, moment_optional=n in ("k", "v", "late"))
                                        for n in ("q", "k", "v", "late", "x")])
    Calibration._agree_on_optional(me, store)
    assert store.moment_names() == {"q", "v", "x"} and store.shared == {"v": "q"}
    assert torch.equal(store.moment("x").sum, late.sum)
