"""The model-level API: dq.prepare -> the user's own loop -> dq.convert, statistics files, dq.state."""

from __future__ import annotations

import copy

import pytest
import torch

import dq
from dq.calibrate.run import run_pipeline
from dq.errors import DQError
from dq.nn.layers import QuantModule
from dq.testing.tiny import default_call_kwargs, prompts_for, tiny_pipeline

KIND = "flux"  # no CFG batches: statistics from recorded inputs equal the pipeline's own
PROMPTS = prompts_for(KIND, 2)
STEPS = 2


def _call_kwargs():
    kw = default_call_kwargs(KIND)
    kw.pop("num_inference_steps")
    kw.pop("output_type")
    return kw


def recorded_inputs(pipe) -> list[tuple[tuple, dict]]:
    """The denoiser's inputs during the calibration run `dq.quantize` makes (same prompts,
    steps, batches and seeds), recorded from the float model."""
    model = pipe.transformer
    seen: list[tuple[tuple, dict]] = []

    def hook(_m, args, kwargs):
        seen.append((tuple(a.clone() if torch.is_tensor(a) else a for a in args),
                     {k: v.clone() if torch.is_tensor(v) else v for k, v in kwargs.items()}))

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        recipe = dq.Recipe.from_any("w8a8")
        run_pipeline(pipe, PROMPTS, num_inference_steps=STEPS, batch_size=recipe.calib_batch_size,
                     seed=recipe.calib_seed, call_kwargs=_call_kwargs())
    finally:
        handle.remove()
    return seen


def replay(model, inputs):
    with torch.no_grad():
        for args, kwargs in inputs:
            model(*args, **kwargs)


def probe_output(model, inputs) -> torch.Tensor:
    args, kwargs = inputs[-1]
    with torch.no_grad():
        out = model(*args, **kwargs)
    return (out[0] if isinstance(out, tuple) else out.sample).detach().clone()


def has_hooks(model) -> bool:
    """Calibration hooks left (a quantized model's own timestep-router hook is not one)."""
    count = sum(len(m._forward_pre_hooks) for m in model.modules())
    return count > (1 if hasattr(model, "dq_router") else 0)


@pytest.fixture(scope="module")
def flux_inputs():
    return recorded_inputs(tiny_pipeline(KIND))


@pytest.mark.parametrize("recipe", ["w8a8", "w4a8"])
def test_own_loop_gives_the_same_model_as_quantize(recipe, flux_inputs):
    """The user's loop over recorded inputs and dq.quantize's own sampler make identical models."""
    pipe = tiny_pipeline(KIND)
    dq.quantize(pipe, recipe, calib_prompts=PROMPTS, num_inference_steps=STEPS, **_call_kwargs())
    model = tiny_pipeline(KIND).transformer
    cal = dq.prepare(model, recipe)
    passes = []
    for number in cal.passes():
        passes.append(number)
        replay(model, flux_inputs)
    dq.convert(model)
    assert passes and passes[0] in (1, 2)
    assert not has_hooks(model)
    expected = probe_output(pipe.transformer, flux_inputs)
    got = probe_output(model, flux_inputs)
    assert torch.equal(expected, got)
    st = dq.state(model)
    assert st.recipe.name == dq.Recipe.from_any(recipe).name
    assert st.plan == dq.state(pipe.transformer).plan and st.plan
    assert st.source == dq.state(pipe.transformer).source


def test_two_pass_recipe_asks_for_its_second_pass(flux_inputs):
    model = tiny_pipeline(KIND).transformer
    cal = dq.prepare(model, "w8a8")  # smoothing: raw statistics first, then ranges of smoothed inputs
    assert cal.pass_number == 1
    replay(model, flux_inputs)
    with pytest.raises(DQError, match="second calibration pass"):
        dq.convert(model)
    assert cal.pass_number == 2 and has_hooks(model)
    assert not any(isinstance(m, QuantModule) for m in model.modules())
    replay(model, flux_inputs)
    dq.convert(model)
    assert any(isinstance(m, QuantModule) for m in model.modules()) and not has_hooks(model)


def test_convert_before_running_is_refused_and_changes_nothing():
    model = tiny_pipeline(KIND).transformer
    dq.prepare(model, "w8a8")
    with pytest.raises(DQError, match="nothing ran since dq.prepare"):
        dq.convert(model)
    assert not any(isinstance(m, QuantModule) for m in model.modules())
    with pytest.raises(DQError, match="already being calibrated"):
        dq.prepare(model, "w8a8")
    with pytest.raises(DQError, match="was not prepared"):
        dq.convert(tiny_pipeline(KIND).transformer)


def test_error_in_the_loop_removes_the_hooks(flux_inputs):
    model = tiny_pipeline(KIND).transformer
    before = copy.deepcopy(model.state_dict())
    cal = dq.prepare(model, "w8a8")
    with pytest.raises(RuntimeError, match="user loop failed"):
        for _ in cal.passes():
            raise RuntimeError("user loop failed")
    assert not has_hooks(model)
    assert dq.model.calibration_of(model) is None
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    dq.prepare(model, "w8a8").close()  # can start again


def test_calibration_free_recipe_needs_no_pass():
    model = tiny_pipeline(KIND).transformer
    cal = dq.prepare(model, "w4a16")
    assert cal.ready and list(cal.passes()) == [] and not has_hooks(model)
    dq.convert(model)
    assert dq.state(model).recipe.name == "w4a16"
    assert dq.state(tiny_pipeline(KIND).transformer) is None


def test_calibrate_in_one_call_and_statistics_replay(flux_inputs, tmp_path):
    model = tiny_pipeline(KIND).transformer
    calls = []

    def run():
        calls.append(1)
        replay(model, flux_inputs)

    cal = dq.prepare(model, "w8a8")
    for _ in cal.passes():
        run()
    with pytest.raises(DQError, match="keep_stats=True"):
        cal.save_stats(tmp_path / "stats.safetensors")
    dq.model.calibration_of(model).close()
    cal = dq.prepare(model, "w8a8", keep_stats=True)
    for _ in cal.passes():
        run()
    stats = cal.save_stats(tmp_path / "stats.safetensors")
    dq.convert(model)
    expected = probe_output(model, flux_inputs)

    other = tiny_pipeline(KIND).transformer
    dq.calibrate(other, "w8a8", stats=stats)
    assert torch.equal(probe_output(other, flux_inputs), expected)

    third = tiny_pipeline(KIND).transformer
    dq.calibrate(third, "w8a8", run=lambda: replay(third, flux_inputs))
    assert torch.equal(probe_output(third, flux_inputs), expected)

    with pytest.raises(DQError, match="differs from"):
        dq.calibrate(tiny_pipeline(KIND).transformer, "w4a8", stats=stats)
    with pytest.raises(DQError, match="does not exist"):
        dq.calibrate(tiny_pipeline(KIND).transformer, "w8a8", stats=tmp_path / "none.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 20)
    with pytest.raises(DQError, match="not a readable dq statistics file"):
        dq.calibrate(tiny_pipeline(KIND).transformer, "w8a8", stats=bad)
    with pytest.raises(DQError, match="exactly one of"):
        dq.calibrate(tiny_pipeline(KIND).transformer, "w8a8")


def test_static_recipe_quantizes_at_load_from_a_statistics_file(flux_inputs, tmp_path):
    from diffusers import FluxTransformer2DModel

    float_dir = tmp_path / "float"
    tiny_pipeline(KIND).transformer.save_pretrained(float_dir)
    model = tiny_pipeline(KIND).transformer
    cal = dq.prepare(model, "w8a8", keep_stats=True)
    for _ in cal.passes():
        replay(model, flux_inputs)
    stats = cal.save_stats(tmp_path / "stats.safetensors")
    dq.convert(model)

    with pytest.raises(DQError, match="dq calibrate"):
        FluxTransformer2DModel.from_pretrained(float_dir, quantization_config=dq.DQConfig(recipe="w8a8"))
    with pytest.raises(DQError, match="does not exist"):
        FluxTransformer2DModel.from_pretrained(
            float_dir, quantization_config=dq.DQConfig(recipe="w8a8", stats=tmp_path / "missing.safetensors"))
    loaded = FluxTransformer2DModel.from_pretrained(
        float_dir, quantization_config=dq.DQConfig(recipe="w8a8", stats=str(stats)))
    assert torch.equal(probe_output(loaded, flux_inputs), probe_output(model, flux_inputs))
    # once quantized, the saved config describes the checkpoint, not the statistics file
    assert "stats" not in loaded.config.quantization_config.to_dict()


def test_dq_calibrate_cli_writes_statistics(tmp_path, monkeypatch):
    from dq import cli

    pipe = tiny_pipeline(KIND)
    monkeypatch.setattr(cli, "open_model", lambda *a, **k: pipe)
    monkeypatch.setattr(cli, "check_model", lambda *a, **k: None)
    out = tmp_path / "s.safetensors"
    assert cli.main(["calibrate", "some/model", "--recipe", "w8a8-rtn", "--stats-out", str(out), "--num-prompts", "1", "--steps", "1", "-q"]) == 0
    assert out.is_file()
    assert not any(isinstance(m, QuantModule) for m in pipe.transformer.modules())
    assert cli.main(["calibrate", "some/model", "--stats-out", str(out), "-q"]) != 0  # exists: refused
    assert cli.main(["calibrate", "some/model", "--stats-out", str(tmp_path / "s.bin"), "-q"]) != 0


def test_layer_preparation_shows_a_progress_bar_unless_quiet(flux_inputs, capfd):
    """The smoothing search, low-rank fit and GPTQ take minutes at DiT widths after the
    calibration passes' bar has ended: they get their own bar, off under --quiet and where
    the recipe has nothing to prepare."""
    from dq.logs import _show_progress

    def calibrate(recipe):
        model = tiny_pipeline(KIND).transformer
        dq.calibrate(model, recipe, run=lambda: replay(model, flux_inputs))
        return capfd.readouterr().err

    assert "preparing layers" in calibrate("w4a8")
    assert "preparing layers" not in calibrate("w8a8-rtn")  # static ranges only
    token = _show_progress.set(False)
    try:
        assert "preparing layers" not in calibrate("w4a8")
    finally:
        _show_progress.reset(token)
