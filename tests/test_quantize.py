"""dq.quantize on every supported architecture (tiny random-weight pipelines)."""

import pytest
import torch
from conftest import DenoiserRecorder, sqnr_db

import dq
from dq.engine import find_denoiser
from dq.errors import CalibrationError, DQError
from dq.nn import QuantModule
from dq.testing.tiny import KINDS, default_call_kwargs, prompts_for, tiny_pipeline

CALIB_STEPS = 4


def calib_kwargs(kind):
    kw = default_call_kwargs(kind)
    kw.pop("num_inference_steps", None)
    kw.pop("output_type", None)
    return kw


def prompt_arg(kind, n):
    prompts = prompts_for(kind, n)
    return {"class_labels": prompts} if kind == "dit" else {"prompt": prompts}


def run(pipe, kind, steps=CALIB_STEPS, **extra):
    kw = {**default_call_kwargs(kind), "num_inference_steps": steps, **extra}
    return pipe(**prompt_arg(kind, 2), generator=torch.Generator().manual_seed(1), **kw)


def record_fp(pipe, kind):
    _, model = find_denoiser(pipe)
    with DenoiserRecorder(model) as rec:
        run(pipe, kind)
    return rec, rec.replay()


def hooks_on(module):
    return len(module._forward_pre_hooks) + len(module._forward_hooks)


@pytest.mark.parametrize("kind", KINDS)
def test_w8a8_close_to_full_precision_and_no_hooks_left(kind):
    pipe = tiny_pipeline(kind)
    rec, ref = record_fp(pipe, kind)
    _, model = find_denoiser(pipe)
    before = {n: hooks_on(m) for n, m in model.named_modules()}
    out_pipe = dq.quantize(pipe, "w8a8", calib_prompts=prompts_for(kind, 4), num_inference_steps=CALIB_STEPS, **calib_kwargs(kind))
    assert out_pipe is pipe
    quantized = [m for m in model.modules() if isinstance(m, QuantModule)]
    assert len(quantized) >= 4
    # calibration hooks are gone; the only hook left is the timestep router's, on the denoiser
    assert all(hooks_on(m) == 0 for m in quantized)
    assert hooks_on(model) == before[""] + 1
    got = rec.replay()
    worst = min(sqnr_db(r, g) for r, g in zip(ref, got))
    assert worst > 25, f"{kind}: W8A8 denoiser output SQNR {worst:.1f} dB"
    images = run(pipe, kind).images
    assert torch.isfinite(torch.as_tensor(images)).all()


@pytest.mark.parametrize("kind", KINDS)
def test_w4a8_runs_and_stays_correlated(kind):
    pipe = tiny_pipeline(kind)
    rec, ref = record_fp(pipe, kind)
    dq.quantize(pipe, "w4a8", calib_prompts=prompts_for(kind, 4), num_inference_steps=CALIB_STEPS, **calib_kwargs(kind))
    got = rec.replay()
    worst = min(sqnr_db(r, g) for r, g in zip(ref, got))
    assert worst > 8, f"{kind}: W4A8 denoiser output SQNR {worst:.1f} dB"


def test_activation_ranges_differ_per_timestep_group():
    pipe = tiny_pipeline("pixart")
    dq.quantize(pipe, dq.Recipe(timestep_groups=4), calib_prompts=prompts_for("pixart", 2), num_inference_steps=8, **calib_kwargs("pixart"))
    scales = [m.ascale for m in pipe.transformer.modules()
              if isinstance(m, QuantModule) and m.act_spec is not None and not m.act_spec.dynamic]
    assert scales and all(s.numel() == 4 for s in scales)
    spread = max(float(s.max() / s.min()) for s in scales)
    assert spread > 1.05, "adaLN-modulated activations should need different ranges per step group"


def test_inference_looks_up_groups_by_timestep_with_other_step_count_and_scheduler():
    from diffusers import DDIMScheduler

    pipe = tiny_pipeline("sd15")
    dq.quantize(pipe, "w8a8", calib_prompts=prompts_for("sd15", 2), num_inference_steps=4, **calib_kwargs("sd15"))
    router = pipe.unet.dq_router
    assert router.groups == 4
    seen = []
    handle = pipe.unet.register_forward_hook(lambda *_: seen.append(int(router.index)))
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    run(pipe, "sd15", steps=9)
    handle.remove()
    assert len(seen) == 9
    assert seen == sorted(seen, reverse=True) and seen[0] == 3 and seen[-1] == 0


@pytest.mark.parametrize("kind", ["sd15", "flux", "dit"])
def test_save_and_load_give_identical_outputs(kind, tmp_path):
    pipe = tiny_pipeline(kind)
    dq.quantize(pipe, "w4a8", calib_prompts=prompts_for(kind, 2), num_inference_steps=3, **calib_kwargs(kind))
    expected = run(pipe, kind).images
    out = dq.save(pipe, tmp_path / "q")
    weights = list(out.rglob("*.safetensors"))
    assert weights and not list(out.rglob("*.bin")) and not list(out.rglob("*.pt"))
    loaded = dq.load(out)
    got = run(loaded, kind).images
    assert torch.equal(torch.as_tensor(got), torch.as_tensor(expected))
    _, model = find_denoiser(loaded)
    # 4-bit codes are stored packed, two per byte (dq.quant.packing)
    assert any(m.qweight.dtype == torch.uint8 for m in model.modules() if isinstance(m, QuantModule))
    with pytest.raises(DQError, match="not empty"):
        dq.save(pipe, out)
    dq.save(pipe, out, overwrite=True)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary folders left behind"


def test_dynamic_and_weight_only_recipes_need_no_calibration(monkeypatch):
    pipe = tiny_pipeline("pixart")
    monkeypatch.setattr("dq.engine.calibrate", lambda *a, **k: pytest.fail("calibrated"))
    dq.quantize(pipe, "w4a16")
    assert isinstance(pipe.transformer.transformer_blocks[0].attn1.to_q, QuantModule)
    run(pipe, "pixart")


def test_bad_inputs():
    pipe = tiny_pipeline("pixart")
    with pytest.raises(DQError, match="presets"):
        dq.quantize(pipe, "w5a5")
    with pytest.raises(DQError, match="no quantizable"):
        dq.quantize(pipe, dq.Recipe(keep=[".*"]), calib_prompts=["x"])
    with pytest.raises(DQError, match="empty"):
        dq.quantize(pipe, "w8a8", calib_prompts=[])
    with pytest.raises(DQError, match="not quantized"):
        dq.save(pipe, "/tmp/never-written")
    assert not any(isinstance(m, QuantModule) for m in pipe.transformer.modules())


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_nan_during_calibration_names_layer_and_step_and_leaves_pipeline_untouched():
    pipe = tiny_pipeline("pixart")
    model = pipe.transformer
    target = model.transformer_blocks[1].ff.net[2]
    before = state(model)
    hooks_before = {n: hooks_on(m) for n, m in model.named_modules()}
    bad = target.register_forward_pre_hook(lambda m, a: (a[0] * float("nan"),))
    # the NaN injector runs before dq's hook only if registered first, so swap order:
    bad.remove()
    original_forward = model.transformer_blocks[1].ff.net[1].forward

    def poisoned(x):
        return original_forward(x) * float("nan")

    model.transformer_blocks[1].ff.net[1].forward = poisoned
    with pytest.raises(CalibrationError, match=r"transformer_blocks\.1\.ff\.net\.2.*timestep"):
        dq.quantize(pipe, "w8a8", calib_prompts=prompts_for("pixart", 2), num_inference_steps=2, **calib_kwargs("pixart"))
    del model.transformer_blocks[1].ff.net[1].forward
    after = state(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert {n: hooks_on(m) for n, m in model.named_modules()} == hooks_before
    assert not hasattr(model, "dq_router")


def test_pipeline_failure_mid_calibration_leaves_pipeline_as_it_was(monkeypatch):
    pipe = tiny_pipeline("sd15")
    before = state(pipe.unet)
    calls = {"n": 0}
    step = pipe.scheduler.step

    def failing_step(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")
        return step(*a, **k)

    monkeypatch.setattr(pipe.scheduler, "step", failing_step)
    with pytest.raises(CalibrationError, match="boom"):
        dq.quantize(pipe, "w8a8", calib_prompts=prompts_for("sd15", 2), num_inference_steps=4, **calib_kwargs("sd15"))
    assert all(hooks_on(m) == 0 for n, m in pipe.unet.named_modules() if n)
    after = state(pipe.unet)
    assert all(torch.equal(before[k], after[k]) for k in before) and before.keys() == after.keys()


def test_already_quantized_is_refused():
    pipe = tiny_pipeline("pixart")
    dq.quantize(pipe, "w4a16")
    with pytest.raises(DQError, match="already quantized"):
        dq.quantize(pipe, "w4a16")


@pytest.mark.parametrize(("kind", "branches"), [("pixart", ["cond", "uncond"]), ("sd15", ["cond", "uncond"]), ("flux", ["all"])])
def test_cfg_branches_told_apart(kind, branches, monkeypatch):
    from dq import engine

    seen = {}
    real = engine.calibrate

    def spy(*a, **k):
        store = real(*a, **k)
        seen["branches"] = store.branches()
        return store

    monkeypatch.setattr(engine, "calibrate", spy)
    pipe = tiny_pipeline(kind)
    dq.quantize(pipe, "w8a8-rtn", calib_prompts=prompts_for(kind, 2), num_inference_steps=2, **calib_kwargs(kind))
    assert seen["branches"] == branches


@pytest.mark.parametrize("kind,layer", [("pixart", "caption_projection.linear_1"), ("sd3", "context_embedder"), ("flux", "context_embedder")])
def test_text_projections_are_weight_only_by_default(kind, layer):
    """The architecture's weight-only layers: weights quantized, activations left in float
    (unless keep_defaults is off); kept layers stay untouched."""
    from dq.engine import plan_layers
    from dq.recipe import Recipe

    _, model = find_denoiser(tiny_pipeline(kind))
    by_name = {c.name: c for c in plan_layers(model, Recipe.from_any("w8a8"))}
    assert by_name[layer].weight is not None and by_name[layer].activation is None
    assert any(c.activation is not None for c in by_name.values())
    everything = {c.name: c for c in plan_layers(model, Recipe.from_any({"base": "w8a8", "keep_defaults": False}))}
    assert everything[layer].activation is not None and len(everything) > len(by_name)


def test_cross_attention_output_gets_dynamic_ranges_under_a_static_recipe():
    """PixArt's cross-attention output projections and self-attention q/k/v (the architecture's
    `dynamic_inputs`) get per-token dynamic ranges of the recipe's bits under a static-activation
    recipe; every other layer keeps the recipe's static ranges; an explicit override and
    keep_defaults: false win."""
    from dq.engine import plan_layers
    from dq.recipe import Recipe

    _, model = find_denoiser(tiny_pipeline("pixart"))
    plan = {c.name: c for c in plan_layers(model, Recipe.from_any("w8a8"))}
    cross_out = sorted(n for n in plan if n.endswith(("attn2.to_out.0", "attn1.to_q", "attn1.to_k", "attn1.to_v", "ff.net.2")))
    assert len(cross_out) == 5 * len([n for n in plan if n.endswith("attn2.to_out.0")]) > 0
    for name, c in plan.items():
        if c.activation is None:
            continue
        if name in cross_out:
            assert c.activation.dynamic and c.activation.granularity == "token" and c.activation.bits == 8
        else:
            assert not c.activation.dynamic and c.activation.granularity == "tensor", name
    static = {"bits": 8, "granularity": "tensor", "symmetric": False, "range": "mse"}
    pinned = Recipe.from_any({"base": "w8a8", "overrides": [{"pattern": r"attn2\.to_out|attn1\.to_[qkv]$|ff\.net\.2$", "activation": static}]})
    assert not any(c.activation.dynamic for c in plan_layers(model, pinned) if c.activation is not None)
    # with 4-bit weights only the cross-attention outputs (q/k/v and the MLP output measured better static)
    w4 = {c.name: c for c in plan_layers(model, Recipe.from_any("w4a8")) if c.activation is not None}
    assert {n for n, c in w4.items() if c.activation.dynamic} == {n for n in cross_out if n.endswith("attn2.to_out.0")}
    bare = Recipe.from_any({"base": "w8a8", "keep_defaults": False})
    assert not any(c.activation.dynamic for c in plan_layers(model, bare) if c.activation is not None)
    # dynamic recipes are untouched; other architectures have no such rule
    _, unet = find_denoiser(tiny_pipeline("sd15"))
    assert not any(c.activation.dynamic for c in plan_layers(unet, Recipe.from_any("w8a8")) if c.activation is not None)
