"""Outlier-handling recipe components (validation, round trips, presets) and the
second-moment statistics they calibrate."""

import json

import pytest
import torch

from dq.calibrate.stats import SecondMoment, StatsStore
from dq.errors import DQError
from dq.recipe import COMPONENTS, Recipe, preset


def test_every_component_round_trips_through_dict_json_and_yaml(tmp_path):
    recipe = Recipe.from_dict({
        "base": "w4a4",
        "smooth": {"alpha": 0.6, "aggregate": "salience", "exclude": ["proj_out"]},
        "rotate": {"block_size": 32, "seed": 3, "include": [r"\.attn1\."]},
        "lowrank": {"rank": 16, "iters": 2},
        "gptq": {"damp": 0.05, "act_order": True},
        "attention": {"probs": "uniform", "probs_bits": 6, "qkv": {"bits": 8, "granularity": "token"}},
        "name": "everything",
    })
    assert list(recipe.components()) == list(COMPONENTS)
    assert recipe.attention.qkv.dynamic
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    assert Recipe.from_dict(json.loads(json.dumps(recipe.to_dict()))) == recipe
    recipe.save(tmp_path / "r.yaml")
    assert Recipe.from_file(tmp_path / "r.yaml") == recipe


def test_components_switch_on_and_off_in_a_recipe_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("base: w4a4\nsmooth: false\nlowrank: null\ngptq: true\nrotate: true\n")
    recipe = Recipe.from_any(path)
    assert recipe.smooth is None and recipe.lowrank is None
    assert recipe.gptq.damp == 0.01 and recipe.rotate.block_size is None
    assert list(recipe.components()) == ["rotate", "gptq"]


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"hadamard": True}, "components are"),
        ({"smooth": {"alpha": 1.5}}, "alpha"),
        ({"smooth": {"alpha": "auto"}}, "alpha"),
        ({"smooth": {"aggregate": "median"}}, "aggregate"),
        ({"smooth": {"strength": 1}}, "unknown smooth option"),
        ({"smooth": 3}, "null, true/false or a mapping"),
        ({"rotate": {"block_size": 48}}, "cannot build a Hadamard matrix of size 48"),
        ({"lowrank": {"rank": 0}}, "rank"),
        ({"lowrank": {"iters": -1}}, "iters"),
        ({"gptq": {"damp": 0}}, "damp"),
        ({"gptq": {"block_size": 0}}, "block_size"),
        ({"attention": {"probs": "log10"}}, "probs"),
        ({"attention": {"probs": "none"}}, "quantizes nothing"),
        ({"attention": {"qkv": {"granularity": "channel"}}}, "qkv"),
        ({"rotate": {"include": ["("]}}, "regular expression"),
    ],
)
def test_bad_components_are_clear_errors(data, match):
    with pytest.raises(DQError, match=match):
        Recipe.from_dict(data)


def test_presets_use_their_measured_components_and_baselines_stay_naive():
    assert list(preset("w8a8").components()) == ["smooth"]
    assert list(preset("w4a8").components()) == ["smooth", "gptq"]
    assert list(preset("w4a4").components()) == ["smooth", "lowrank", "gptq"]
    assert preset("w4a4").lowrank.rank == 32
    for name in ("w8a8-rtn", "w4a8-rtn", "w4a4-rtn", "w4a16"):
        assert preset(name).components() == {}
    for name in ("w4a8-rtn", "w4a4-rtn"):
        assert preset(name).weight.range == "minmax" and preset(name).activation.range == "minmax"
    assert preset("w4a4").needs_calibration  # smoothing and GPTQ need statistics
    assert preset("w4a4").smooth is not preset("w4a4").smooth  # presets hand out fresh configs


def test_second_moments_merge_and_round_trip():
    a, b = torch.randn(50, 8), torch.randn(30, 8)
    store = StatsStore()
    store.add_moment("layer", SecondMoment.from_rows(a))
    other = StatsStore()
    other.add_moment("layer", SecondMoment.from_rows(b))
    store.merge_(other)
    both = torch.cat([a, b]).double()
    assert store.moment("layer").count == 80
    assert store.moment("layer").sum.dtype == torch.float32  # float32: half the memory of float64
    assert torch.allclose(store.moment("layer").sum.double(), both.T @ both, atol=1e-4)
    again = StatsStore.from_state_dict(store.state_dict())
    assert torch.equal(again.moment("layer").sum, store.moment("layer").sum)
    assert again.moment("layer").count == 80
    with pytest.raises(DQError, match="shapes"):
        store.add_moment("layer", SecondMoment.from_rows(torch.randn(3, 4)))
