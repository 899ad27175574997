"""4-bit and weight-only kernel paths: int8_copy (unpacked int8 weight kept), int_mm_a8 (weight-only
layers with dynamic int8 activations, opt-in), the low-rank branch added in place."""

import pytest
import torch
from conftest import favour_path

from dq.kernels import choice, dispatch, runners, set_execution
from dq.nn import QuantLinear
from dq.nn.transforms import LowRankBranch
from dq.quant import primitives as P
from dq.quant.spec import QuantSpec
from dq.recipe import Recipe, preset

W4G = QuantSpec(bits=4, granularity="group", group_size=32, range="mse")
A8 = QuantSpec(bits=8, granularity="tensor", symmetric=False)
TOKEN4 = QuantSpec(bits=4, granularity="token", symmetric=False)
FORMATS = {"w4a8": (W4G, A8, [(-3.0, 3.0)]), "w4a4": (W4G, TOKEN4, None), "w4a16": (W4G, None, None)}


@pytest.fixture(autouse=True)
def cache_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("DQ_CACHE_DIR", str(tmp_path))
    return tmp_path


def layer(fmt, width=128, out=96, rank=0):
    torch.manual_seed(0)
    weight, act, ranges = FORMATS[fmt]
    branch = None
    if rank:
        branch = LowRankBranch(width, out, rank)
        branch.down.normal_(0, 0.1)
        branch.up.normal_(0, 0.1)
    return QuantLinear.from_float(torch.nn.Linear(width, out), weight, act, ranges, branch=branch)


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("fmt", ["w4a8", "w4a4"])
@pytest.mark.parametrize("rank", [0, 8])
def test_int8_copy_matches_the_simulated_layer_and_counts_its_bytes(fmt, rank):
    q = layer(fmt, rank=rank)
    x = torch.randn(3, 40, 128)
    set_execution(q, "sim")
    sim = q(x)
    set_execution(q, "real")
    assert "int8_copy" in dispatch.candidate_paths(q, x.device, x.dtype)
    set_execution(q, "real", path="int8_copy")
    real = q(x)
    assert rel(real, sim) < 1e-5
    assert dispatch.runtime_nbytes(q) == 128 * 96  # one byte per weight, beside the packed codes
    set_execution(q, "real", int8_copy=False)
    assert "int8_copy" not in dispatch.candidate_paths(q, x.device, x.dtype)


def test_int8_codes_stored_unpacked_need_no_copy():
    q = QuantLinear.from_float(torch.nn.Linear(64, 32), QuantSpec(bits=8), A8, [(-3.0, 3.0)])
    set_execution(q, "real")
    assert "int8_copy" not in dispatch.candidate_paths(q, torch.device("cpu"), torch.float32)


def test_weight_only_int8_activations_are_opt_in():
    q = layer("w4a16")
    cpu = torch.device("cpu")
    set_execution(q, "real")
    assert "int_mm_a8" not in dispatch.candidate_paths(q, cpu, torch.float32)
    set_execution(q, "real", path="int_mm_a8")  # not allowed: the forced path is ignored, measured instead
    assert q.__dict__.get("_dq_forced_path") is None
    set_execution(q, "real", weight_only_int8=True)
    assert "int_mm_a8" in dispatch.candidate_paths(q, cpu, torch.float32)
    # from the model's recipe when not given
    model = torch.nn.Sequential(layer("w4a16"))
    model._dq_recipe = Recipe.from_dict({"base": "w4a16", "weight_only_int8_activations": True})
    set_execution(model, "real")
    assert "int_mm_a8" in dispatch.candidate_paths(model[0], cpu, torch.float32)
    assert preset("w4a16").weight_only_int8_activations is False


def test_weight_only_int8_flag_must_be_a_bool():
    with pytest.raises(Exception, match="weight_only_int8_activations"):
        Recipe.from_dict({"base": "w4a16", "weight_only_int8_activations": "yes"})


@pytest.mark.parametrize("rank", [0, 8])
def test_int_mm_a8_matches_its_simulation_and_stays_close_to_float(rank):
    q = layer("w4a16", rank=rank)
    x = torch.randn(2, 50, 128)
    set_execution(q, "sim")
    sim = q(x)
    set_execution(q, "real", path="int_mm_a8", weight_only_int8=True)
    assert q.__dict__["_dq_forced_path"] == "int_mm_a8"
    real = q(x)
    expected = runners.simulated_a8(q, x) + (q.branch(x) if rank else 0)
    assert rel(real, expected) < 1e-5  # the same function as its simulation
    # and the stated quality cost: dynamic per-token int8 inputs, about 40 dB layer SQNR here
    sqnr = 10 * torch.log10(sim.pow(2).sum() / (real - sim).pow(2).sum())
    assert 30 < float(sqnr) < 80


def test_the_chooser_can_pick_the_new_paths_and_checks_a8_against_its_own_reference(monkeypatch):
    q = layer("w4a16")
    set_execution(q, "real", weight_only_int8=True)
    seen = favour_path(monkeypatch, "int_mm_a8")
    x = torch.randn(64, 128)
    q(x)
    assert q._dq_paths[64] == "int_mm_a8" and "int_mm_a8" in seen  # not dropped as "wrong" against float
    q4 = layer("w4a8")
    set_execution(q4, "real")
    monkeypatch.setattr(choice, "_race", lambda fns, sync, budget=0, clock=None: {p: (1e-4 if p == "int8_copy" else 1e-3) for p in fns})
    q4(x)
    assert q4._dq_paths[64] == "int8_copy" and "_dq_int8_weight" in q4.__dict__


@pytest.mark.parametrize("failure", ["raises", "wrong"])
def test_the_chooser_drops_a_new_path_that_fails(monkeypatch, failure):
    q = layer("w4a8")
    set_execution(q, "real")
    run = dict(runners.RUN)

    def broken(layer_, x):
        if failure == "raises":
            raise RuntimeError("injected")
        return run["int8_copy"](layer_, x) * 1.1

    monkeypatch.setitem(runners.RUN, "int8_copy", broken)
    monkeypatch.setattr(choice, "_race", lambda fns, sync, budget=0, clock=None: {p: (1e-5 if p == "int8_copy" else 1e-3) for p in fns})
    x = torch.randn(32, 128)
    q(x)
    found = choice.cache().get(next(iter(choice.cache().entries)))
    assert q._dq_paths[32] != "int8_copy" and "int8_copy" in found.dropped
    assert ("RuntimeError" if failure == "raises" else "wrong result") in found.dropped["int8_copy"]


def test_a8_wrong_result_is_dropped_too(monkeypatch):
    q = layer("w4a16")
    set_execution(q, "real", weight_only_int8=True)
    # the float layer's result is not int_mm_a8's reference: a path returning it is wrong
    monkeypatch.setitem(runners.RUN, "int_mm_a8", lambda layer_, x: layer_.simulated(x) + 0.05 * x[..., :96])
    q(torch.randn(32, 128))
    found = next(iter(choice.cache().entries.values()))
    assert "wrong result" in found.dropped["int_mm_a8"]


def test_branch_is_added_in_place_and_matches_the_separate_sum():
    b = LowRankBranch(16, 12, 4)
    b.down.normal_()
    b.up.normal_()
    x, y = torch.randn(5, 16), torch.randn(5, 12)
    expected = y + b(x)
    out = b.add_to(y.clone(), x)
    assert torch.allclose(out, expected, atol=1e-5)
    ys = y.t().contiguous().t()  # not contiguous: the plain sum
    assert torch.allclose(b.add_to(ys, x), expected, atol=1e-5)


@pytest.mark.parametrize("path", ["int8_copy", "int_mm_a8"])
def test_new_paths_under_torch_compile(path):
    fmt = "w4a16" if path == "int_mm_a8" else "w4a4"
    q = layer(fmt, rank=4)
    set_execution(q, "real", path=path, weight_only_int8=True)
    x = torch.randn(24, 128)
    eager = q(x)
    compiled = torch.compile(q, fullgraph=True)
    assert rel(compiled(x), eager) < 1e-5


def test_a8_reference_is_the_documented_activation_format():
    assert runners.A8_SPEC.granularity == "token" and runners.A8_SPEC.bits == 8 and runners.A8_SPEC.dynamic
    q = layer("w4a16")
    x = torch.randn(4, 128)
    manual = torch.nn.functional.linear(P.fake_quantize(x, runners.A8_SPEC), q.dequantized_weight(), q.bias)
    assert torch.allclose(runners.simulated_a8(q, x), manual)


@pytest.mark.parametrize("fmt", ["w4a8", "w4a4"])
def test_float_activations_are_opt_in_and_compute_the_float_op_on_the_quantized_weight(fmt, monkeypatch):
    """Path "float_input" (`float_activations_where_faster`): the kept float weight on the input
    as it comes (no activation rounding); a candidate only when allowed, checked against
    that function (not the simulated layer, which rounds), and taken where it is fastest."""
    cpu = torch.device("cpu")
    q = layer(fmt, rank=8 if fmt == "w4a4" else 0)
    set_execution(q, "real")
    assert "float_input" not in dispatch.candidate_paths(q, cpu, torch.float32)
    assert "float_input" not in dispatch.candidate_paths(layer("w4a16"), cpu, torch.float32)  # no activations to skip
    model = torch.nn.Sequential(q)
    model._dq_recipe = Recipe.from_dict({"base": fmt, "float_activations_where_faster": True})
    set_execution(model, "real")
    assert "float_input" in dispatch.candidate_paths(q, cpu, torch.float32)
    monkeypatch.setattr(choice, "_race", lambda fns, sync, budget=0, clock=None: {p: (1e-4 if p == "float_input" else 1e-3) for p in fns})
    x = torch.randn(2, 32, 128)
    real = q(x)
    assert q._dq_paths[64] == "float_input"
    # one float copy: the branch folded into it from the first call on (w4a4), else the plain one
    assert ("_dq_float_folded" in q.__dict__) == (q.branch is not None) != ("_dq_float_weight" in q.__dict__)
    bias = q.bias
    expected = torch.nn.functional.linear(x, q.dequantized_weight(x.dtype), bias) + (q.branch(x) if q.branch is not None else 0)
    assert rel(real, expected) < 1e-6
    set_execution(q, "sim")
    sim = q(x)
    assert rel(real, sim) > 1e-4  # the simulated layer rounds its input; this path does not
    # on in every preset with quantized activations (no layer slower than its float one), off in
    # the naive baselines and in fp8 (no CPU kernel to compare with)
    assert all(preset(p).float_activations_where_faster for p in ("w8a8", "w8a8-dynamic", "w4a8", "w4a4"))
    assert not any(preset(p).float_activations_where_faster for p in ("w8a8-rtn", "w4a8-rtn", "w4a4-rtn", "fp8"))
    with pytest.raises(Exception, match="float_activations_where_faster"):
        Recipe.from_dict({"base": fmt, "float_activations_where_faster": "yes"})


@pytest.mark.parametrize("rotate", [0, 32])
def test_float_path_folds_the_input_transform_and_the_branch_into_its_weight(rotate, monkeypatch):
    """On path "float_input" a layer's smoothing (and rotation) and its low-rank branch are folded
    into the one kept weight, so the layer costs one float matmul on the raw input; the same
    function as transforming, multiplying and adding the branch."""
    from dq.nn.transforms import InputTransform

    torch.manual_seed(0)
    transform = InputTransform(128, smooth=True, rotate_block=rotate)
    transform.inv_scale.uniform_(0.5, 2.0)
    if rotate:
        transform.signs.copy_(torch.randint(0, 2, (128,)).float() * 2 - 1)
    branch = LowRankBranch(128, 96, 8)
    branch.down.normal_(0, 0.1)
    branch.up.normal_(0, 0.1)
    q = QuantLinear.from_float(torch.nn.Linear(128, 96), W4G, TOKEN4, None, input_transform=transform, branch=branch)
    x = torch.randn(2, 32, 128)
    t = transform(x)
    expected = torch.nn.functional.linear(t, q.dequantized_weight(x.dtype), q.bias) + branch(t)
    set_execution(q, "real", path="float_input", float_activations=True)
    calls = []
    monkeypatch.setitem(runners.RUN, "float_input", lambda *a: calls.append(1))  # the unfolded path
    with torch.no_grad():
        real = q(x)
    assert rel(real, expected) < 1e-5 and not calls
    assert "_dq_float_folded" in q.__dict__ and "_dq_float_weight" not in q.__dict__
    assert dispatch.runtime_nbytes(q) == 128 * 96 * 4  # one float32 copy


def test_folded_float_path_compiles_to_the_same_values():
    from dq.nn.transforms import InputTransform

    torch.manual_seed(0)
    transform = InputTransform(128, smooth=True)
    transform.inv_scale.uniform_(0.5, 2.0)
    q = QuantLinear.from_float(torch.nn.Linear(128, 96), W4G, TOKEN4, None, input_transform=transform)
    set_execution(q, "real", path="float_input", float_activations=True)
    x = torch.randn(2, 32, 128)
    with torch.no_grad():
        eager = q(x)
        compiled = torch.compile(q)(x)
    assert torch.allclose(eager, compiled, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", [True, False])
def test_dynamic_epilogue_compiled_matches_eager(bias):
    """Per-token activations: inside torch.compile the epilogue (row and column scales, the
    zero-point term, the bias) is one elementwise expression instead of the eager addmm_."""
    torch.manual_seed(0)
    spec = QuantSpec(bits=8, granularity="token", symmetric=False, dynamic=True)
    q = QuantLinear.from_float(torch.nn.Linear(128, 96, bias=bias), QuantSpec(bits=8), spec, None)
    set_execution(q, "real", path="int_mm")
    x = torch.randn(40, 128) * 3 + 1
    eager = q(x)
    compiled = torch.compile(q, fullgraph=True)(x)
    assert rel(compiled, eager) < 1e-5
    set_execution(q, "sim")
    assert rel(eager, q(x)) < 1e-5


def smoothed_branched(act=TOKEN4):
    """A 128 -> 96 layer with smoothing (scales 0.5-2) and a rank-8 branch: (layer, transform, branch)."""
    from dq.nn.transforms import InputTransform

    torch.manual_seed(0)
    transform = InputTransform(128, smooth=True)
    transform.inv_scale.uniform_(0.5, 2.0)
    branch = LowRankBranch(128, 96, 8)
    branch.down.normal_(0, 0.1)
    branch.up.normal_(0, 0.1)
    q = QuantLinear.from_float(torch.nn.Linear(128, 96), W4G, act, None, input_transform=transform, branch=branch)
    return q, transform, branch


def _spin(seconds: float) -> None:
    """Busy for `seconds` of this thread's CPU time (what the chooser's clock counts with one thread)."""
    clock = choice.clock_for(torch.zeros(1))
    end = clock() + seconds
    while clock() < end:
        pass


def test_chooser_times_the_transform_and_branch_on_paths_that_do_not_fold_them():
    """`measure(overhead=, folded=)`: a path whose op alone is faster loses to "float_input" when
    the work around its op (smoothing, the branch) makes the whole layer slower."""
    x = torch.randn(4, 8)
    ref = lambda t: t * 2  # noqa: E731
    cands = {"int_mm": lambda t: (_spin(2e-3), t * 2)[1], "float_input": lambda t: (_spin(3e-3), t * 2)[1]}
    plain = choice.measure(cands, ref, x, x[:2])
    assert plain.choice == "int_mm"
    whole = choice.measure(cands, ref, x, x[:2], overhead=lambda t: _spin(3e-3), folded=("float_input",))
    assert whole.choice == "float_input"
    assert whole.times["int_mm"] > whole.times["float_input"] and whole.times["int_mm"] >= 4.5e-3


def test_layer_choice_counts_its_transform_and_branch(monkeypatch, tmp_path):
    """A layer with smoothing and a branch is measured with them (its cache key says so), and the
    timed function of every path but "float_input" runs them."""
    monkeypatch.setenv("DQ_CACHE_DIR", str(tmp_path))
    q, _, _ = smoothed_branched()
    set_execution(q, "real", float_activations=True)
    seen = {}
    real_measure = choice.measure

    def spy(cands, reference, x, probe, **kw):
        seen.update(kw)
        return real_measure(cands, reference, x, probe, **kw)
    monkeypatch.setattr(choice, "measure", spy)
    with torch.no_grad():
        q(torch.randn(2, 32, 128))
    assert seen["overhead"] is not None and seen["folded"] == ("float_input",)
    keys = list(choice.cache().entries)
    assert len(keys) == 1 and "|around:tb|" in keys[0]
    # without float_input allowed nothing folds: the op alone is compared, the plain key
    choice.cache().clear()
    seen.clear()
    set_execution(q, "real", float_activations=False)
    with torch.no_grad():
        q(torch.randn(2, 32, 128))
    assert seen["overhead"] is None and "|around:" not in list(choice.cache().entries)[0]


def test_weight_only_layer_folds_its_transform_and_branch_without_opt_in():
    """A weight-only layer (no activation rounding to skip) with smoothing and a branch may take
    "float_input": the float op on its raw input with both folded in is its exact function."""
    q, _, _ = smoothed_branched(act=None)
    set_execution(q, "real")
    assert "float_input" in dispatch.candidate_paths(q, torch.device("cpu"), torch.float32)
    assert "float_input" not in dispatch.candidate_paths(layer("w4a16"), torch.device("cpu"), torch.float32)
    x = torch.randn(2, 32, 128)
    with torch.no_grad():
        set_execution(q, "sim")
        sim = q(x)
        set_execution(q, "real", path="float_input")
        real = q(x)
    assert rel(real, sim) < 1e-5
    assert "_dq_float_folded" in q.__dict__


@pytest.mark.parametrize("path", ["float_input", "int8_copy"])
def test_first_call_computes_what_later_calls_do(path, monkeypatch):
    """The call that measures the paths already runs the chosen one as later calls do (folded for
    "float_input"): a pipeline's first step rounds like its others, runs repeat bit for bit."""
    favour_path(monkeypatch, path)
    q, _, _ = smoothed_branched()
    set_execution(q, "real", float_activations=True)
    x = torch.randn(2, 32, 128)
    with torch.no_grad():
        first, second = q(x), q(x)
    assert q._dq_paths[64] == path
    assert torch.equal(first, second)


def test_folded_fast_path_only_serves_the_call_it_was_made_for(monkeypatch):
    """The folded layer's later calls skip every lookup, but only for the same input shape and
    dtype and the layer's own transform and branch: another branch (a LoRA's) or shape takes
    the full path."""
    favour_path(monkeypatch, "float_input")
    q, transform, branch = smoothed_branched()
    set_execution(q, "real", float_activations=True)

    def expected(x, b=branch):
        t = transform(x)
        return torch.nn.functional.linear(t, q.dequantized_weight(x.dtype), q.bias) + b(t)
    x = torch.randn(2, 32, 128)
    with torch.no_grad():
        q(x)
        assert "_dq_fold_fast" in q.__dict__
        assert rel(q(x), expected(x)) < 1e-5
        other = LowRankBranch(128, 96, 8)
        other.down.normal_(0, 0.1)
        other.up.normal_(0, 0.1)
        assert rel(dispatch.real_forward(q, x, other, transform), expected(x, other)) < 1e-5
        x3 = torch.randn(3, 5, 128)
        assert rel(q(x3), expected(x3)) < 1e-5
        q.double()  # another dtype: the runtime copies are released
        assert "_dq_fold_fast" not in q.__dict__


def test_layer_paths_and_path_counts_report_what_runs():
    from dq.kernels import layer_paths, path_counts

    model = torch.nn.Sequential(layer("w4a8"), layer("w4a16"))
    set_execution(model, "sim")
    assert layer_paths(model[0]) == ["sim"] and path_counts(model) == {"sim": 2}
    set_execution(model, "real", path="int8_copy")  # w4a16 has no such path: measured as usual
    assert layer_paths(model[0]) == ["int8_copy"] and layer_paths(model[1]) == []
    assert path_counts(model) == {"dequant": 1, "int8_copy": 1}  # not called yet: its default path
    model[1](torch.randn(2, 8, 128))
    chosen = layer_paths(model[1])
    assert len(chosen) == 1 and chosen[0] in dispatch.candidate_paths(model[1], torch.device("cpu"), torch.float32)
    assert path_counts(model) == dict(sorted({"int8_copy": 1, chosen[0]: 1}.items()))


def test_a_layer_set_up_from_the_cache_reads_the_choice_measured_for_its_own_calls(monkeypatch, tmp_path):
    """A smoothed, branched layer's calls fold (key `|around:tb`); a plain layer of the same shape
    and formats is measured under the plain key. A model set up later from the cache (a reload)
    must give the first layer the folded call's choice, not the plain layer's: else a reloaded
    model rounds differently from the one that was saved."""
    monkeypatch.setenv("DQ_CACHE_DIR", str(tmp_path))

    def race_won_by(winner):
        return lambda fns, sync, budget=0, clock=None: {p: (1e-4 if p == winner else 1e-3) for p in fns}

    folded, _, _ = smoothed_branched()
    set_execution(folded, "real", float_activations=True)
    monkeypatch.setattr(choice, "_race", race_won_by("float_input"))
    x = torch.randn(2, 32, 128)
    with torch.no_grad():
        folded(x)
    plain = QuantLinear.from_float(torch.nn.Linear(128, 96), W4G, TOKEN4, None)
    set_execution(plain, "real", float_activations=True)
    monkeypatch.setattr(choice, "_race", race_won_by("int8_copy"))
    with torch.no_grad():
        plain(x)
    keys = list(choice.cache().entries)
    assert len(keys) == 2 and sum("|around:tb|" in k for k in keys) == 1
    reloaded, _, _ = smoothed_branched()
    set_execution(reloaded, "real", float_activations=True)
    assert layer_paths_of(reloaded) == ["float_input"]
    again = QuantLinear.from_float(torch.nn.Linear(128, 96), W4G, TOKEN4, None)
    set_execution(again, "real", float_activations=True)
    assert layer_paths_of(again) == ["int8_copy"]


def layer_paths_of(q):
    from dq.kernels import layer_paths

    return layer_paths(q)
