import json

import pytest

import dq
from dq.errors import DQError
from dq.recipe import Recipe, preset


def test_presets_listed_and_round_trip():
    names = dq.recipes()
    for required in ("w8a8", "w4a8", "w4a16", "w4a4", "w8a8-rtn", "w4a8-rtn", "w4a4-rtn"):
        assert required in names
    for name in names:
        r = preset(name)
        assert Recipe.from_dict(r.to_dict()) == r
        assert Recipe.from_dict(json.loads(json.dumps(r.to_dict()))) == r


def test_w4a16_is_weight_only_and_w4a4_dynamic():
    assert preset("w4a16").activation is None
    assert not preset("w4a16").needs_calibration
    assert preset("w4a4").activation.dynamic
    assert preset("w8a8").needs_calibration
    dynamic = preset("w8a8-dynamic")
    assert dynamic.activation.dynamic and dynamic.activation.granularity == "token"
    assert dynamic.smooth is not None and dynamic.needs_calibration  # the alpha search needs statistics


def test_yaml_and_json_files(tmp_path):
    y = tmp_path / "mine.yaml"
    y.write_text("base: w4a8\ntimestep_groups: 2\nkeep: ['proj_out']\noverrides:\n  - pattern: 'attn2'\n    weight: {bits: 8}\n")
    r = Recipe.from_any(str(y))
    assert r.name == "mine" and r.timestep_groups == 2 and r.weight.bits == 4
    assert r.overrides[0].weight.bits == 8
    j = tmp_path / "r.json"
    r.save(j)
    assert Recipe.from_any(j) == r
    r.save(tmp_path / "r.yaml")
    assert Recipe.from_file(tmp_path / "r.yaml") == r


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"weight": {"bits": 12}}, "out of range"),
        ({"activation": {"granularity": "channel"}}, "activation granularity"),
        ({"weight": {"granularity": "token"}}, "weights cannot"),
        ({"weight": None, "activation": None}, "quantizes nothing"),
        ({"timestep_groups": 0}, "positive integer"),
        ({"colour": 1}, "unknown recipe field"),
        ({"keep": ["("]}, "regular expression"),
        ({"overrides": [{"weight": {"bits": 4}}]}, "pattern"),
        ({"base": "w9a9"}, "unknown recipe"),
    ],
)
def test_bad_recipes(data, match):
    with pytest.raises(DQError, match=match):
        Recipe.from_dict(data)


def test_unknown_preset_lists_presets(tmp_path):
    with pytest.raises(DQError) as info:
        Recipe.from_any("w3a3")
    assert "w8a8" in str(info.value) and "w4a4" in str(info.value)
    bad = tmp_path / "bad.yaml"
    bad.write_text("weight: [1, 2\n")
    with pytest.raises(DQError, match="not valid YAML"):
        Recipe.from_any(bad)
