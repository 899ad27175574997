"""Kernel paths chosen by measurement (dq.kernels.choice): the decision, the cache, the guard."""

import json
import logging
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from dq.kernels import choice, dispatch, set_execution
from dq.nn import QuantLinear
from dq.quant.spec import QuantSpec

W8 = QuantSpec(bits=8)
A8 = QuantSpec(bits=8, granularity="tensor", symmetric=False)


@pytest.fixture
def cache_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("DQ_CACHE_DIR", str(tmp_path))
    return tmp_path


def linear(width=64, out=48, act=A8):
    torch.manual_seed(0)
    return QuantLinear.from_float(torch.nn.Linear(width, out), W8, act, None if act is None else [(-3.0, 3.0)])


# -- the decision --------------------------------------------------------------------
@pytest.mark.parametrize(
    "times, dropped, expected",
    [
        ({"onednn": 1.0, "int_mm": 2.0, "dequant": 5.0}, {}, "onednn"),
        ({"onednn": 1.0, "int_mm": 2.0, "dequant": 5.0}, {"onednn": "wrong result"}, "int_mm"),
        ({"int_mm": 3.0, "float_copy": 1.0, "dequant": 2.0}, {}, "float_copy"),
        ({"int_mm": 1.02, "float_copy": 1.0}, {}, "int_mm"),  # a tie goes to the path without a float copy
        ({"int_mm": 1.2, "float_copy": 1.0}, {}, "float_copy"),
        ({"int_mm": float("inf"), "dequant": 9.0}, {}, "dequant"),
        ({}, {"int_mm": "raised"}, "dequant"),
    ],
)
def test_decide_takes_the_fastest_path_left(times, dropped, expected):
    assert choice.decide(times, dropped) == expected


@pytest.mark.parametrize("threads", [1, 2])
def test_measure_drops_wrong_raising_and_pathologically_slow_paths(threads, monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    x, probe = torch.randn(64, 16), torch.randn(8, 16)

    def slow(t):  # busy, not asleep: with one thread the chooser times CPU time
        end = time.perf_counter() + 0.05
        while time.perf_counter() < end:
            pass
        return t * 2

    def broken(t):
        raise RuntimeError("no kernel for this shape")

    found = choice.measure(
        {"onednn": slow, "int_mm": lambda t: t * 2, "float_copy": lambda t: t * 3, "dequant": broken},
        lambda t: t * 2, x, probe,
    )
    assert found.choice == "int_mm" and set(found.times) == {"int_mm"}
    assert "slower than the best path on 8 rows" in found.dropped["onednn"]
    assert "wrong result" in found.dropped["float_copy"]
    assert "RuntimeError" in found.dropped["dequant"]


def _busy(seconds):
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_the_screen_grows_its_rows_until_a_slow_path_shows(monkeypatch):
    """A reference kernel at a narrow width: on 8 rows it is under SCREEN_MIN_S (too little work to
    tell), so the screen grows the rows eightfold; on 64 it shows, and it never runs the full input."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    x = torch.randn(4096, 16)
    seen = []

    def reference_kernel(t):  # 0.3 ms per row: 2.4 ms on 8 rows, 19 ms on 64, 1.2 s on all
        seen.append(t.shape[0])
        _busy(3e-4 * t.shape[0])
        return t * 2

    candidates = {"onednn": reference_kernel, "int_mm": lambda t: t * 2}
    grow = lambda rows: x[: 8 * rows.shape[0]] if rows.shape[0] < x.shape[0] else None  # noqa: E731
    found = choice.measure(candidates, lambda t: t * 2, x, x[:8], grow=grow)
    assert found.choice == "int_mm"
    assert "slower than the best path on 64 rows" in found.dropped["onednn"]
    assert max(seen) == 64
    # without `grow`, the 8-row screen cannot tell, and the full-size race runs it
    seen.clear()
    found = choice.measure(candidates, lambda t: t * 2, x, x[:8])
    assert "onednn" not in found.dropped and max(seen) == 4096


def test_the_race_runs_a_hopeless_path_once(monkeypatch):
    calls = []

    def slow(t):
        calls.append(1)
        _busy(0.15)
        return t

    times = choice._race({"slow": lambda: slow(1), "fast": lambda: None}, lambda: None)
    assert len(calls) == 1 and times["slow"] >= 0.15 and times["fast"] < 0.01


# -- layers ----------------------------------------------------------------------------
def test_a_layer_runs_the_measured_choice_and_keeps_only_that_copy(cache_folder, monkeypatch):
    q = linear()
    set_execution(q, "real")
    monkeypatch.setattr(choice, "measure", lambda *a, **k: choice.Measurement("float_copy", {"float_copy": 1e-4}))
    x = torch.randn(5, 64)
    y = q(x)
    assert q._dq_paths == {8: "float_copy"} and "_dq_float_weight" in q.__dict__ and "_dq_prepacked" not in q.__dict__
    set_execution(q, "sim")
    assert torch.allclose(y, q(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("conv", [False, True])
def test_a_slow_path_on_a_narrow_layer_never_runs_its_full_input(cache_folder, monkeypatch, conv):
    """A layer's screen grows its probe (rows; a convolution's patch) until a reference-like path,
    4 us per input element, shows: it is dropped without ever running the whole input."""
    from dq.nn import QuantConv2d

    torch.manual_seed(0)
    if conv:
        layer = QuantConv2d.from_float(torch.nn.Conv2d(16, 16, 3, padding=1), W8, A8, [(-3.0, 3.0)])
        x = torch.randn(2, 16, 64, 64)
    else:
        layer, x = linear(width=64, out=64), torch.randn(4096, 64)
    seen = []
    fast = dispatch.runners.RUN["int_mm"]

    def slow(layer, t):
        seen.append(t.numel())
        _busy(4e-6 * t.numel())
        return fast(layer, t)

    monkeypatch.setitem(dispatch.runners.RUN, "onednn", slow)
    monkeypatch.setattr(dispatch, "candidate_paths", lambda *a: ["onednn", "int_mm"])
    set_execution(layer, "real")
    layer(x)
    assert dispatch.layer_paths(layer) == ["int_mm"]
    assert seen and max(seen) * 8 <= x.numel()


def test_every_allowed_path_matches_the_simulated_layer(cache_folder):
    q = linear()
    x = torch.randn(7, 64)
    set_execution(q, "sim")
    sim = q(x)
    set_execution(q, "real")
    paths = dispatch.candidate_paths(q, x.device, x.dtype)
    assert {"int_mm", "float_copy", "dequant"} <= set(paths)
    for path in paths:
        set_execution(q, "real", path=path)
        assert torch.allclose(q(x), sim, rtol=1e-4, atol=1e-4 * float(sim.abs().max())), path


def test_float_copies_only_for_small_layers(cache_folder):
    q = linear(64, 48)
    set_execution(q, "real", float_copy_max_bytes=64 * 48 * 4 - 1)
    assert "float_copy" not in dispatch.candidate_paths(q, torch.device("cpu"), torch.float32)
    assert "float_copy" in dispatch.candidate_paths(q, torch.device("cpu"), torch.bfloat16)  # half the bytes


def test_unknown_path_is_a_clear_error():
    with pytest.raises(Exception, match="unknown kernel path 'fast'.*choose one of"):
        set_execution(linear(), "real", path="fast")


def test_choices_are_cached_per_shape_class_and_reused(cache_folder, monkeypatch, caplog):
    calls = []
    real_measure = choice.measure
    monkeypatch.setattr(choice, "measure", lambda *a, **k: calls.append(1) or real_measure(*a, **k))
    layers = [linear(), linear()]
    x = torch.randn(20, 64)
    with caplog.at_level(logging.INFO, logger="dq.kernels"):
        for q in layers:
            set_execution(q, "real")
            q(x)
            q(x)
    assert len(calls) == 1, "a second layer of the same shape class must not be measured again"
    assert sum("kernel choice" in r.message for r in caplog.records) == 1, "the choice is logged once"
    (path,) = cache_folder.glob("kernels-*.json")
    data = json.loads(path.read_text())
    assert data["fingerprint"] == choice.fingerprint() and data["machine"]["cpu"]
    (key,) = data["entries"]
    assert key.endswith("|m32|torch.float32|cpu") and data["entries"][key]["choice"] in choice.PATHS
    assert not [p for p in cache_folder.iterdir() if p.name.startswith(".")], "no temporary file is left"


def test_a_cached_choice_serves_fewer_allowed_paths_and_more_are_measured(cache_folder, monkeypatch):
    """A shape class measured with an opt-in path allowed (w4a16's bf16) serves a recipe without
    it from the same numbers, without overwriting the entry; one that allows a path the entry
    never saw measures again (before: the first recipe's choice stuck, or the second overwrote it)."""
    calls = []
    real_measure = choice.measure
    monkeypatch.setattr(choice, "measure", lambda cands, *a, **k: calls.append(sorted(cands)) or real_measure(cands, *a, **k))
    fake = {"bf16": 1e-4, "float_copy": 5e-4, "dequant": 1e-3}
    monkeypatch.setattr(choice, "_race", lambda fns, sync, budget=0, clock=None: {p: fake[p] for p in fns})
    monkeypatch.setattr(choice, "SCREEN_FACTOR", float("inf"))  # the fake times decide, not the real screen
    x = torch.randn(20, 64)

    def run(**options):
        q = linear(act=None)
        set_execution(q, "real", **options)
        q(x)
        return q._dq_paths[32]

    assert run() == "float_copy" and len(calls) == 1
    assert run(weight_only_bf16=True) == "bf16" and len(calls) == 2  # bf16 was never measured: measured now
    assert "bf16" in calls[1] and "float_copy" in calls[1]
    assert run() == "float_copy" and len(calls) == 2  # from the stored numbers, nothing measured
    assert run(weight_only_bf16=True) == "bf16" and len(calls) == 2  # the entry was not overwritten
    # set_execution's scan of the cache (choices known before the first call) follows the same rule
    q = linear(act=None)
    set_execution(q, "real")
    assert q._dq_paths == {32: "float_copy"}
    m = choice.Measurement("bf16", {"bf16": 1.0, "dequant": 2.0}, {"float_copy": "wrong result"})
    assert m.choice_among(["float_copy", "dequant"]) == "dequant"
    assert m.choice_among(["int_mm_a8", "dequant"]) is None


def test_a_second_process_measures_nothing(cache_folder):
    q = linear()
    set_execution(q, "real")
    q(torch.randn(20, 64))
    script = textwrap.dedent("""
        import torch
        from dq.kernels import choice, set_execution
        from dq.nn import QuantLinear
        from dq.quant.spec import QuantSpec
        torch.set_num_threads(1)
        def refuse(*a, **k):
            raise SystemExit("measured again")
        choice.measure = refuse
        torch.manual_seed(0)
        q = QuantLinear.from_float(torch.nn.Linear(64, 48), QuantSpec(bits=8),
                                   QuantSpec(bits=8, granularity="tensor", symmetric=False), [(-3.0, 3.0)])
        set_execution(q, "real")
        q(torch.randn(20, 64))
        print(q._dq_paths)
    """)
    env = {**os.environ, "DQ_CACHE_DIR": str(cache_folder)}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == repr(q._dq_paths)


@pytest.mark.parametrize("content", ["{not json", json.dumps({"version": 1, "fingerprint": "someone-else", "entries": {}}),
                                     json.dumps({"version": choice.CACHE_VERSION, "fingerprint": "FP", "entries": {"k": {"choice": "rm -rf"}}})])
def test_a_corrupted_or_foreign_cache_is_ignored_and_rewritten(cache_folder, content, caplog):
    path = cache_folder / f"kernels-{choice.fingerprint()}-v{choice.CACHE_VERSION}.json"
    path.write_text(content.replace("FP", choice.fingerprint()))
    with caplog.at_level(logging.WARNING, logger="dq.kernels"):
        q = linear()
        set_execution(q, "real")
        q(torch.randn(3, 64))
    assert any("ignoring the kernel choice cache" in r.message for r in caplog.records)
    data = json.loads(path.read_text())
    assert data["fingerprint"] == choice.fingerprint() and len(data["entries"]) == 1


def test_compiled_layers_use_the_cached_choice_without_measuring(cache_folder, monkeypatch):
    q = linear()
    set_execution(q, "real")
    x = torch.randn(20, 64)
    eager = q(x)
    monkeypatch.setattr(choice, "measure", lambda *a, **k: pytest.fail("measured inside torch.compile"))
    compiled = torch.compile(q, fullgraph=True)
    assert torch.allclose(compiled(x), eager, rtol=1e-4, atol=1e-4)
    assert torch.allclose(compiled(torch.randn(3, 64)).float().sum().isfinite(), torch.tensor(True))


# -- the guard ----------------------------------------------------------------------------
def test_the_chosen_int8_path_is_never_far_slower_than_float_at_dit_width(cache_folder):
    """Not a speed target (benchmarks/speed.py has those): a guard against a kernel that runs
    100x slower than float on this machine (oneDNN's reference int8 kernel did)."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(1152, 1152)
    q = QuantLinear.from_float(layer, W8, A8, [(-4.0, 4.0)])
    set_execution(q, "real")
    x = torch.randn(256, 1152)
    with torch.no_grad():
        q(x)  # measures and chooses
        times = choice._race({"float": lambda: layer(x), "dq": lambda: q(x)}, lambda: None, budget=0.5)
    chosen = q._dq_paths[256]
    assert times["dq"] <= 2 * times["float"], f"{chosen}: {times['dq'] * 1e3:.1f} ms vs float {times['float'] * 1e3:.1f} ms"


def test_doctor_prints_the_machine_and_a_row_per_shape(cache_folder, capsys):
    from dq.cli import main

    assert main(["doctor", "--widths", "32", "--rows", "16", "--attention-tokens", "16,32",
                 "--json", str(cache_folder / "d.json")]) == 0
    out = capsys.readouterr().out
    assert "machine:" in out and "w8a8" in out and "w4a16" in out and "vs float" in out
    assert "attention core" in out and "sdpa_bf16" in out
    body = json.loads((cache_folder / "d.json").read_text())
    assert body["machine"]["cpu"] and {r["fmt"] for r in body["rows"]} == {"w8a8", "w8a8-dynamic", "w4a8", "w4a16"}
    assert [r["tokens"] for r in body["attention"]] == [16, 32]
    assert all(r["choice"] in ("sdpa", "sdpa_bf16") and r["times"]["sdpa"] > 0 for r in body["attention"])
    # the attention rows' choices are in the cache, as a model's first call would leave them
    assert {r["key"] for r in body["attention"]} <= set(choice.cache().entries)
    assert "tanh GELU" in out and [r["tokens"] for r in body["gelu"]] == [16, 32]
    assert all(r["choice"] in ("gelu", "gelu_sigmoid") and r["times"]["gelu"] > 0 for r in body["gelu"])
    assert {r["key"] for r in body["gelu"]} <= set(choice.cache().entries)
    assert main(["doctor", "--widths", "0"]) == 2
    assert main(["doctor", "--widths", "32", "--attention-tokens", "0"]) == 2
    before = choice.cache().path.stat().st_mtime_ns
    assert main(["doctor", "--widths", "32", "--rows", "16", "--fresh"]) == 0  # re-measures and rewrites
    assert choice.cache().path.stat().st_mtime_ns > before


def test_one_thread_on_the_cpu_is_timed_in_cpu_time(monkeypatch):
    x = torch.zeros(1)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert choice.clock_for(x) is time.thread_time
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert choice.clock_for(x) is time.perf_counter


def test_calls_under_inference_mode_keep_the_integer_paths(cache_folder):
    """`dq eval` and the app generate under torch.inference_mode: the row sums made on the first
    call there are inference tensors, which keep no version counter. The static int8 path read
    it (its table's key), raised, and was dropped from the choice (found on an AMD EPYC,
    2026-12-02: every static layer of the quick start fell back to float paths)."""
    q = linear(width=256, out=256)
    set_execution(q, "real")
    x = torch.randn(64, 256)
    with torch.inference_mode():
        y = q(x)
    found = next(iter(choice.cache().entries.values()))
    assert not [why for why in found.dropped.values() if "raised" in why], found.dropped
    assert "int_mm" in found.times
    set_execution(q, "sim")
    ref = q(x)
    assert float((y - ref).norm() / ref.norm()) < 1e-5
    # a layer made under inference mode (every tensor an inference tensor), forced onto int_mm
    with torch.inference_mode():
        q2 = linear(width=256, out=256)
        set_execution(q2, "real", path="int_mm")
        y2 = q2(x)
    assert float((y2 - ref).norm() / ref.norm()) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_keep_their_integer_paths(cache_folder, dtype):
    """A bfloat16/float16 model's simulated reference is itself rounded to its dtype: the integer
    paths (exact, rounded once) differ from it by about that rounding and must not be dropped as
    wrong (they were, until the check allowed for the dtype: every bfloat16 model then ran its
    slowest path), while a really wrong path still is."""
    q = linear(256, 128).to(dtype)
    set_execution(q, "real")
    x = torch.randn(64, 256).to(dtype)
    q(x)
    entries = [m for k, m in choice.cache().entries.items() if str(dtype) in k]
    assert entries and all("wrong result" not in why for m in entries for why in m.dropped.values()), entries
    assert {"int_mm", "dequant"} <= {p for m in entries for p in [*m.times, *m.dropped]}
    wrong = choice.measure({"off": lambda t: q.simulated(t) * 1.05, "dequant": q.simulated}, q.simulated, x, x[:8])
    assert "wrong result" in wrong.dropped["off"] and wrong.choice == "dequant"
