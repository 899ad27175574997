"""Mixed precision (dq.mixed): the exact allocation, budgets, the plan in the recipe and the
checkpoint, and real execution of a model with int4, int8 and float layers."""

import itertools
import math
import random

import pytest
import torch
from conftest import DenoiserRecorder, sqnr_db
from mixed_common import KIND, STEPS, budget_recipe, call_kwargs, quantize, real_and_simulated

import dq
from dq.cli import main as cli_main
from dq.engine import find_denoiser
from dq.errors import DQError
from dq.kernels import set_execution
from dq.mixed import (
    Budget,
    allocate,
    format_of,
    layer_report,
    measure_sensitivity,
    solve_allocation,
    spearman,
)
from dq.nn import QuantModule
from dq.recipe import Recipe, parse_memory
from dq.testing.tiny import prompts_for, tiny_pipeline


# -- the integer program ----------------------------------------------------------------------
def brute_force(damage, cost, capacity):
    best, pick = math.inf, None
    for choice in itertools.product(*[range(len(d)) for d in damage]):
        if sum(cost[i][j] for i, j in enumerate(choice)) <= capacity:
            value = sum(damage[i][j] for i, j in enumerate(choice))
            if value < best:
                best, pick = value, choice
    return best, pick


@pytest.mark.parametrize("seed", range(12))
def test_milp_matches_brute_force(seed):
    rng = random.Random(seed)
    items = rng.randint(2, 7)
    damage, cost = [], []
    for _ in range(items):
        options = rng.randint(1, 3)
        # float-like option: zero damage, big cost; quantized ones: cheaper, damaging
        damage.append([0.0] + [rng.random() * 10 ** rng.uniform(-6, 0) for _ in range(options)])
        cost.append([rng.randint(200, 400)] + [rng.randint(20, 150) for _ in range(options)])
    low = sum(min(c) for c in cost)
    high = sum(max(c) for c in cost)
    capacity = rng.randint(low, high)
    best, _ = brute_force(damage, cost, capacity)
    picks = solve_allocation(damage, cost, capacity)
    assert sum(cost[i][j] for i, j in enumerate(picks)) <= capacity
    assert sum(damage[i][j] for i, j in enumerate(picks)) == pytest.approx(best, rel=1e-9, abs=1e-15)


@pytest.mark.parametrize("seed", range(6))
def test_milp_trust_region_matches_brute_force(seed):
    """With `around` and `max_changes`, the exact optimum among plans changing at most that many
    items from `around`."""
    rng = random.Random(100 + seed)
    damage = [[rng.uniform(0, 10) for _ in range(3)] for _ in range(5)]
    cost = [[rng.randint(1, 9) for _ in range(3)] for _ in range(5)]
    around = [min(range(3), key=lambda j: c[j]) for c in cost]  # the cheapest plan: always feasible
    capacity = sum(min(c) for c in cost) + rng.randint(5, 15)
    for k in (0, 1, 2, 5):
        best, pick = math.inf, None
        for choice in itertools.product(range(3), repeat=5):
            changed = sum(a != b for a, b in zip(choice, around))
            if changed <= k and sum(cost[i][j] for i, j in enumerate(choice)) <= capacity:
                value = sum(damage[i][j] for i, j in enumerate(choice))
                if value < best:
                    best, pick = value, choice
        got = solve_allocation(damage, cost, capacity, around=around, max_changes=k)
        assert sum(a != b for a, b in zip(got, around)) <= k
        assert sum(damage[i][j] for i, j in enumerate(got)) == pytest.approx(best), (k, got, pick)
    with pytest.raises(DQError, match="max_changes needs"):
        solve_allocation(damage, cost, capacity, max_changes=1)


def test_milp_beats_greedy_on_a_knapsack_trap():
    # greedy by damage-per-byte takes item 0's upgrade first and then cannot afford item 1's
    damage = [[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]
    cost = [[1, 2], [1, 3], [1, 3]]
    picks = solve_allocation(damage, cost, 7)
    assert sorted(picks) == [0, 1, 1] and picks[0] == 0


def test_milp_refuses_an_impossible_budget():
    with pytest.raises(DQError, match="cannot be met"):
        solve_allocation([[0.0, 1.0]], [[10, 5]], 4)


def test_spearman_against_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = random.Random(0)
    a = [rng.random() for _ in range(30)]
    b = [x + rng.random() for x in a]
    b[3] = b[4]  # a tie
    assert spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic, abs=1e-12)


# -- recipe fields ----------------------------------------------------------------------------
def test_parse_memory_units_and_errors():
    assert parse_memory("2GB") == 2 * 10**9
    assert parse_memory("1.5MiB") == 3 * 2**19
    assert parse_memory(123456) == 123456
    for bad in ("2XB", "GB", "-1MB", "", "1..5GB"):
        with pytest.raises(DQError, match="not a size|at least 1 byte"):
            parse_memory(bad)


def test_budget_recipe_round_trips_through_dict_file_and_dqconfig(tmp_path):
    recipe = budget_recipe(budget=4.5, allocation={"proj_out": "int8", "pos_embed.proj": "float"})
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    path = tmp_path / "mixed.yaml"
    recipe.save(path)
    loaded = Recipe.from_file(path)
    assert loaded.budget == 4.5 and loaded.allocation == recipe.allocation and loaded.mixed == recipe.mixed
    config = dq.DQConfig(recipe=recipe)
    assert config.recipe_object() == recipe
    memory = Recipe.from_dict({"base": "w4a8", "memory": "2GB"})
    assert memory.memory == 2 * 10**9 and Recipe.from_dict(memory.to_dict()) == memory


def test_recipe_refuses_bad_budget_fields():
    with pytest.raises(DQError, match="either a budget"):
        Recipe.from_dict({"budget": 5, "memory": "1GB"})
    with pytest.raises(DQError, match="positive number"):
        Recipe.from_dict({"budget": -2})
    with pytest.raises(DQError, match="not a size"):
        Recipe.from_dict({"memory": "2XB"})
    with pytest.raises(DQError, match="unknown mixed.weights"):
        Recipe.from_dict({"budget": 5, "mixed": {"weights": ["int3"]}})
    with pytest.raises(DQError, match="allocation"):
        Recipe.from_dict({"allocation": {"proj_out": "int7"}})


# -- on a tiny pipeline -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def mixed_pipe():
    pipe = tiny_pipeline(KIND)
    _, model = find_denoiser(pipe)
    with DenoiserRecorder(model) as rec:
        pipe(prompt=prompts_for(KIND, 2), generator=torch.Generator().manual_seed(1), num_inference_steps=STEPS,
             **{**call_kwargs(), "output_type": "latent"})
    ref = rec.replay()
    quantize(pipe, budget_recipe(budget=6.0))
    return pipe, rec, ref


def test_budget_respected_exactly_with_mixed_formats(mixed_pipe):
    pipe, _, _ = mixed_pipe
    _, model = find_denoiser(pipe)
    plan = model._dq_mixed
    rows = layer_report(model)
    # the real layers' storage, not the plan's prediction
    real_bits = 8 * sum(r["bytes"] for r in rows) / sum(r["weights"] for r in rows)
    assert real_bits <= 6.0
    assert real_bits == pytest.approx(plan.average_bits(), rel=1e-12)
    formats = {r["format"] for r in rows}
    assert {"int4", "int8"} <= formats, formats
    # every allocated layer is installed in its format
    for r in rows:
        assert r["format"] == model._dq_recipe.allocation[r["name"]]
    # the plan is optimal for its sensitivity: the solver's damage is the brute-force one on a subset
    assert plan.sensitivity.mode == "measure"
    assert all(o.measured is not None for s in plan.sensitivity.layers for o in s.options if o.format != "float")


def test_mixed_model_real_execution_matches_simulation(mixed_pipe):
    pipe, rec, ref = mixed_pipe
    _, model = find_denoiser(pipe)
    kernels = {format_of(m) for m in model.modules() if isinstance(m, QuantModule)}
    assert {"int4", "int8"} <= kernels
    real, sim = real_and_simulated(model, rec)
    assert min(sqnr_db(s, r) for s, r in zip(sim, real)) > 35
    assert min(sqnr_db(f, r) for f, r in zip(ref, real)) > 20


def test_plan_saved_and_reloaded_identical_without_resolving(mixed_pipe, tmp_path, monkeypatch):
    pipe, rec, _ = mixed_pipe
    _, model = find_denoiser(pipe)
    before = rec.replay()
    dq.save(pipe, tmp_path / "mixed")

    def no_solving(*a, **k):
        raise AssertionError("the saved plan must not be solved again")

    monkeypatch.setattr("dq.mixed.measure_sensitivity", no_solving)
    loaded = dq.load(tmp_path / "mixed")
    _, lmodel = find_denoiser(loaded)
    assert layer_report(lmodel) == [{**r, "damage": None, "sqnr_db": None, "damages": None} for r in layer_report(model)]
    assert lmodel._dq_recipe.allocation == model._dq_recipe.allocation
    rec.model = lmodel
    try:
        after = rec.replay()
    finally:
        rec.model = model
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    # and compiles like any dq model (dynamo traces the mixed int4/int8/float layers)
    torch._dynamo.reset()
    compiled = torch.compile(lmodel, backend="eager")
    args, kwargs = rec.calls[0]
    with torch.no_grad():
        got = compiled(*args, **{**kwargs, "return_dict": False})[0]
    assert torch.allclose(got, after[0], rtol=1e-4, atol=1e-4 * float(after[0].abs().max()))
    # the saved recipe re-quantizes a fresh model into the same layers, following its allocation
    fresh = tiny_pipeline(KIND)
    quantize(fresh, lmodel._dq_recipe)
    again = {r["name"]: (r["format"], r["bytes"]) for r in layer_report(find_denoiser(fresh)[1])}
    assert again == {r["name"]: (r["format"], r["bytes"]) for r in layer_report(model)}


def test_report_data_and_plot(mixed_pipe, tmp_path):
    pipe, _, _ = mixed_pipe
    _, model = find_denoiser(pipe)
    rows = layer_report(pipe)
    assert rows and all({"name", "format", "bits", "damage", "damages"} <= set(r) for r in rows)
    quantized = [r for r in rows if r["format"] != "float"]
    assert all(r["damage"] > 0 for r in quantized)
    table = model._dq_mixed.table()
    assert "average" in table and rows[0]["name"] in table
    pytest.importorskip("matplotlib")
    from dq.mixed import plot_allocation

    path = plot_allocation(rows, tmp_path / "plan.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_keep_and_overrides_win_over_the_allocation():
    pipe = tiny_pipeline(KIND)
    recipe = budget_recipe(
        budget=6.5, keep=["attn2\\.to_q$"],
        overrides=[{"pattern": "ff\\.net\\.2$", "weight": {"bits": 8, "granularity": "channel"}}],
    )
    quantize(pipe, recipe)
    _, model = find_denoiser(pipe)
    alloc = model._dq_recipe.allocation
    assert not any(n.endswith(("attn2.to_q", "ff.net.2")) for n in alloc)
    for name, module in model.named_modules():
        if name.endswith("attn2.to_q"):
            assert not isinstance(module, QuantModule)
        if name.endswith("ff.net.2"):
            assert format_of(module) == "int8"
    assert model._dq_mixed.average_bits() <= 6.5


def test_memory_budget_and_estimated_sensitivity():
    pipe = tiny_pipeline(KIND)
    _, model = find_denoiser(pipe)
    recipe = budget_recipe(memory=10**9)
    sens = measure_sensitivity(pipe, model, recipe, prompts_for(KIND, 2), STEPS, call_kwargs(), mode="estimate")
    assert sens.mode == "estimate"
    assert all(o.estimated is not None and o.estimated > 0 for s in sens.layers for o in s.options if o.format != "float")
    from dq.mixed import achievable

    lo, hi = achievable(sens, "memory")
    target = (lo + hi) / 2
    allocation = allocate(sens, Budget("memory", target))
    chosen = sum(next(o.bytes for o in s.options if o.format == allocation[s.name]) for s in sens.layers)
    assert chosen + sens.fixed_bytes + sens.kept_bytes + sens.other_bytes <= target
    for bad, match in ((lo - 1, "cannot be met"), (hi + 1, "already holds")):
        with pytest.raises(DQError, match=match) as err:
            allocate(sens, Budget("memory", bad))
        assert "achievable range" in str(err.value) or "lower it" in str(err.value)


@pytest.mark.parametrize("budget, match", [(1.0, "below the smallest plan"), (40.0, "at or above float")])
def test_bad_bit_budgets_refused_before_calibration(budget, match, monkeypatch):
    pipe = tiny_pipeline(KIND)
    monkeypatch.setattr("dq.mixed.measure_sensitivity", lambda *a, **k: pytest.fail("calibrated before refusing"))
    with pytest.raises(DQError, match=match) as err:
        quantize(pipe, budget_recipe(budget=budget))
    assert "achievable range" in str(err.value)
    assert not any(isinstance(m, QuantModule) for m in find_denoiser(pipe)[1].modules())


def test_memory_budget_that_cannot_be_met_is_refused():
    pipe = tiny_pipeline(KIND)
    with pytest.raises(DQError, match="cannot be met.*achievable range"):
        quantize(pipe, budget_recipe(memory="1KB"))


def test_budget_recipe_at_load_needs_calibration():
    from dq.mixed import apply_allocation

    pipe = tiny_pipeline(KIND)
    _, model = find_denoiser(pipe)
    with pytest.raises(DQError, match="dq.quantize"):
        apply_allocation(model, [], budget_recipe(budget=5.0))


def test_cli_budget_and_memory_options(tmp_path, capsys):
    assert cli_main(["quantize", "--memory", "2XB", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "2XB" in err and "GiB" in err
    assert cli_main(["quantize", "--budget", "abc", "--out", str(tmp_path / "o")]) == 2
    assert "average weight bits" in capsys.readouterr().err
    from dq.cli import recipe_with_overrides

    recipe = recipe_with_overrides("w4a8", budget=4.5)
    assert recipe.budget == 4.5 and recipe.mixed is not None and recipe.allocation is None
    assert recipe_with_overrides("w4a8", memory=parse_memory("2GB")).memory == 2 * 10**9


def test_installed_allocation_equals_dq_quantize_with_it():
    """The benchmark's shortcut (layers built once per format, installed per budget) builds exactly
    what dq.quantize builds for the same allocation."""
    from dq.mixed import install_allocation

    recipe = budget_recipe(budget=6.0)
    pipe = tiny_pipeline(KIND)
    _, model = find_denoiser(pipe)
    sens = measure_sensitivity(pipe, model, recipe, prompts_for(KIND, 2), STEPS, call_kwargs(), keep_built=True)
    allocation = allocate(sens, Budget("bits", 6.0))
    solved = Recipe.from_dict({**recipe.to_dict(), "allocation": allocation})
    installed = tiny_pipeline(KIND)
    install_allocation(installed, sens, solved)
    quantized = tiny_pipeline(KIND)
    quantize(quantized, solved)
    a = find_denoiser(installed)[1].state_dict()
    b = find_denoiser(quantized)[1].state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), rtol=1e-5, atol=1e-6), key


# -- formats: what a plan can hold --------------------------------------------------------------
def test_five_and_six_bit_layers_run_save_and_reload(tmp_path):
    """int5 / int6 (per channel, packed in bit planes) beside int4 in groups of 64 and of 32, int8
    and float in one model: stored in their bits, real execution matches the simulation, the
    checkpoint reloads identical."""
    from dq.mixed import allocation_scope

    pipe = tiny_pipeline(KIND)
    _, model = find_denoiser(pipe)
    recipe = Recipe.from_dict({"base": "w4a8", "calib_num_prompts": 2, "calib_batch_size": 2})
    free = [name for name, _, _ in allocation_scope(model, recipe).free]
    cycle = ["int5", "int6", "int4", "int4g32", "int8", "float"]
    allocation = {name: cycle[i % len(cycle)] for i, name in enumerate(free)}
    with DenoiserRecorder(model) as rec:
        pipe(prompt=prompts_for(KIND, 1), generator=torch.Generator().manual_seed(1), num_inference_steps=STEPS,
             **{**call_kwargs(), "output_type": "latent"})
    quantize(pipe, Recipe.from_dict({**recipe.to_dict(), "allocation": allocation}))
    _, model = find_denoiser(pipe)
    rows = {r["name"]: r for r in layer_report(model)}
    for name, fmt in allocation.items():
        assert rows[name]["format"] == fmt
        if fmt in ("int5", "int6"):
            layer = model.get_submodule(name)
            assert layer.qweight.dtype == torch.uint8 and layer.weight_layout.packed
            # codes at exactly their bits; a float32 scale per output channel (plus smoothing and ranges)
            codes_bits = 8 * layer.qweight.numel() / rows[name]["weights"]
            assert codes_bits == pytest.approx(int(fmt[3:]), abs=0.1), (name, codes_bits)
        if fmt.startswith("int4"):
            layer = model.get_submodule(name)
            group = 32 if fmt == "int4g32" else 64
            assert layer.weight_spec.group_size == group
            # one 8-bit multiplier per group: a quarter bit per weight at 32, an eighth at 64
            assert layer.wmult.dtype == torch.uint8 and layer.wmult.shape[1] == layer.weight_shape[1] // group
    rec.model = model
    real, sim = real_and_simulated(model, rec)
    assert min(sqnr_db(s, r) for s, r in zip(sim, real)) > 35
    dq.save(pipe, tmp_path / "m")
    loaded = find_denoiser(dq.load(tmp_path / "m"))[1]
    assert {r["name"]: r["format"] for r in layer_report(loaded)} == {n: r["format"] for n, r in rows.items()}
    rec.model = loaded
    set_execution(loaded, "sim")
    assert all(torch.equal(a, b) for a, b in zip(rec.replay(), sim))


def test_allocated_layers_get_the_activation_format_a_uniform_recipe_gives_them():
    """An allocation's layer at format F has the activations the uniform recipe of F gives it:
    the architecture's per-token `dynamic_inputs` (and `dynamic_inputs_w8` under 8-bit weights)
    included, so a mixed plan is not penalized against the uniform presets it is compared with."""
    from dq.engine import plan_layers, plan_model
    from dq.mixed import allocation_scope

    model = find_denoiser(tiny_pipeline(KIND))[1]
    base = Recipe.from_any("w4a8")
    free = [n for n, _, _ in allocation_scope(model, base).free]
    for fmt, bits in (("int4", None), ("int6", 6), ("int8", 8)):
        uniform = base if bits is None else Recipe.from_dict(
            {**base.to_dict(), "weight": {"bits": bits, "granularity": "channel"}})
        expected = {c.name: c.activation for c in plan_layers(model, uniform)}
        allocation = {n: (fmt if n in expected else "float") for n in free}
        plan, _ = plan_model(model, Recipe.from_dict({**base.to_dict(), "allocation": allocation}))
        got = {c.name: c.activation for c in plan}
        assert got == expected, fmt
        dynamic = {n for n, a in got.items() if a is not None and a.dynamic}
        assert any(n.endswith("attn2.to_out.0") for n in dynamic), fmt
        assert any(n.endswith("attn1.to_q") for n in dynamic) == (fmt == "int8"), fmt


def test_int4g32_is_named_by_the_plan_when_the_recipe_own_4bit_spec_has_groups_of_32():
    """A recipe whose 4-bit spec is in groups of 32 calls its 4-bit format "int4" in the plan; the
    report follows the plan, and a w4a8 recipe's "int4g32" is its spec with groups of 32."""
    from dq.mixed import allocation_scope, weight_formats

    base = Recipe.from_dict({"base": "w4a8"})
    assert weight_formats(base)["int4g32"].group_size == 32 and weight_formats(base)["int4"].group_size == 64
    assert weight_formats(base)["int4g32"].range == base.weight.range
    pipe = tiny_pipeline(KIND)
    _, model = find_denoiser(pipe)
    recipe = Recipe.from_dict({"base": "w4a8", "calib_num_prompts": 2, "calib_batch_size": 2,
                               "weight": {"bits": 4, "granularity": "group", "group_size": 32, "range": "mse"}})
    free = [name for name, _, _ in allocation_scope(model, recipe).free]
    allocation = {name: ("int4" if i % 2 else "int8") for i, name in enumerate(free)}
    quantize(pipe, Recipe.from_dict({**recipe.to_dict(), "allocation": allocation}))
    _, model = find_denoiser(pipe)
    rows = {r["name"]: r["format"] for r in layer_report(model)}
    assert {n: rows[n] for n in allocation} == allocation
    assert all(model.get_submodule(n).weight_spec.group_size == 32 for n, f in allocation.items() if f == "int4")


def test_one_first_pass_serves_several_calibrations_exactly():
    """`shared_first_pass`: one pass 1 over the inputs, with the union of two recipes' targets, fed
    to each calibration as a view, gives each exactly what its own pass 1 would (same built layers)."""
    from dq.engine import build_layers, calibrate, run_passes
    from dq.model import Calibration, shared_first_pass
    from dq.nn.router import TimestepRouter

    pipe = tiny_pipeline(KIND)
    _, model = find_denoiser(pipe)
    prompts = prompts_for(KIND, 2)
    recipes = [Recipe.from_dict({"base": name, "calib_batch_size": 2}) for name in ("w4a8", "w8a8")]

    def built(cal):
        router = TimestepRouter(cal.groups.tensor())
        with torch.no_grad():
            layers = build_layers(cal.plan, cal.store, cal.groups, router, cal.prepared)
        return {f"{n}.{k}": v for n, m in layers.items() for k, v in m.state_dict().items()}

    shared = [Calibration(model, r, pipe=pipe) for r in recipes]
    union = shared_first_pass(shared)
    assert union is not None and {t.name for c in shared for t in c.targets} == {t.name for t in union}
    store = calibrate(pipe, model, [], prompts, recipe=recipes[0], num_inference_steps=STEPS,
                      call_kwargs=call_kwargs(), targets=union)
    for cal, recipe in zip(shared, recipes):
        cal.feed(store.view(), reduce=False)
        assert cal.pass_number == 2  # pass 1 done from the shared statistics; its own pass 2 next
        run_passes(pipe, cal, prompts, STEPS, call_kwargs())
        alone = run_passes(pipe, Calibration(model, recipe, pipe=pipe), prompts, STEPS, call_kwargs())
        a, b = built(cal), built(alone)
        assert a.keys() == b.keys() and a
        for key in a:
            assert torch.equal(a[key], b[key]), f"{recipe.name}: {key}"
    # where one pass cannot serve them all: None, and nothing changed
    single = Calibration(model, recipes[0], pipe=pipe)
    assert shared_first_pass([single]) is None and single.pass_number == 1
