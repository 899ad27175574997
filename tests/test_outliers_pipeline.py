"""Outlier handling through `dq.quantize` on tiny pipelines: each component improves the
denoiser's output, presets beat the naive baselines, checkpoints restore every component,
the attention processor installs and uninstalls cleanly, and what cannot apply is logged."""

import copy
import logging
import re

import pytest
import torch
from conftest import DenoiserRecorder, sqnr_db
from torch import nn

import dq
from dq.engine import find_denoiser
from dq.errors import DQError
from dq.nn import QuantModule
from dq.nn.attention import QuantAttnProcessor, dequantize_attention, quantize_attention
from dq.nn.transforms import InputTransform, LowRankBranch
from dq.recipe import AttentionConfig
from dq.testing.tiny import default_call_kwargs, prompts_for, tiny_pipeline

# Where to plant outlier channels: attention / MLP inputs of the transformer blocks, and
# resnet convs plus transformer layers of the UNet (not the kept time projections).
PLANT = {
    "pixart": r"^transformer_blocks\.\d+\.(attn\d|ff)\.",
    "sd15": r"(down|up)_blocks\.\d+\.(resnets\.\d+\.conv\d|attentions\.\d+\.transformer_blocks\.\d+\.(attn\d|ff)\.)",
}


class ChannelScale(nn.Module):
    """Multiplies a few input channels by a large factor (a producer with outlier channels)."""

    def __init__(self, scale: torch.Tensor, dim: int):
        super().__init__()
        self.register_buffer("scale", scale)
        self.dim = dim

    def forward(self, x):
        shape = [1] * x.dim()
        shape[self.dim] = -1
        return x * self.scale.reshape(shape)


def plant_outliers(model: nn.Module, pattern: str, channels: int = 3, factor: float = 8.0) -> int:
    """Give the inputs of matching layers `channels` outlier channels, `factor` times larger,
    without changing the float model: layer -> Sequential(ChannelScale, layer with W[:, c] / factor)."""
    gen = torch.Generator().manual_seed(0)
    count = 0
    for name, module in list(model.named_modules()):
        if type(module) not in (nn.Linear, nn.Conv2d) or not re.search(pattern, name):
            continue
        conv = isinstance(module, nn.Conv2d)
        width = module.in_channels if conv else module.in_features
        picked = torch.randperm(width, generator=gen)[:channels]
        scale = torch.ones(width)
        scale[picked] = factor
        scaled = copy.deepcopy(module)
        with torch.no_grad():
            scaled.weight[:, picked] /= factor
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, nn.Sequential(ChannelScale(scale, 1 if conv else -1), scaled))
        count += 1
    return count


def call_kwargs(kind):
    kw = default_call_kwargs(kind)
    kw.pop("num_inference_steps", None)
    kw.pop("output_type", None)
    return kw


def generate(pipe, kind, steps=3):
    # unseen prompts and seeds: the calibration uses the first prompts, seed 0
    return pipe(
        prompt=prompts_for(kind, 8)[4:6], generator=torch.Generator().manual_seed(7),
        num_inference_steps=steps, output_type="np", **call_kwargs(kind),
    )


class Reference:
    """A full-precision pipeline and its denoiser calls on unseen prompts, to replay."""

    def __init__(self, kind: str, planted: bool):
        self.kind = kind
        self.pipe = tiny_pipeline(kind)
        _, model = find_denoiser(self.pipe)
        if planted:
            assert plant_outliers(model, PLANT[kind]) > 4
        self.recorder = DenoiserRecorder(model)
        with self.recorder:
            generate(self.pipe, kind)
        self.outputs = self.recorder.replay()

    def sqnr(self, recipe) -> float:
        """Mean denoiser-output SQNR (dB) of a fresh copy quantized with `recipe`."""
        pipe = copy.deepcopy(self.pipe)
        dq.quantize(pipe, recipe, calib_prompts=prompts_for(self.kind, 2), num_inference_steps=3, **call_kwargs(self.kind))
        _, self.recorder.model = find_denoiser(pipe)
        got = self.recorder.replay()
        return sum(sqnr_db(r, g) for r, g in zip(self.outputs, got)) / len(got)


_CACHE: dict = {}


def reference(kind, planted=True):
    key = (kind, planted)
    if key not in _CACHE:
        _CACHE[key] = Reference(kind, planted)
    return _CACHE[key]


# ----------------------------------------------------------------------------- each component


@pytest.mark.parametrize("kind", ["pixart", "sd15"])
@pytest.mark.parametrize(
    "component", [{"smooth": {"grid": 10}}, {"rotate": True}, {"lowrank": {"rank": 32, "iters": 1}}],
    ids=["smooth", "rotate", "lowrank"],
)
def test_component_raises_w4a4_sqnr_on_planted_outliers(kind, component):
    ref = reference(kind)
    naive = ref.sqnr("w4a4-rtn")
    improved = ref.sqnr({"base": "w4a4-rtn", **component})
    assert improved > naive + 1.5, f"{kind} {component}: {naive:.2f} -> {improved:.2f} dB"


@pytest.mark.parametrize(("kind", "margin"), [("pixart", 0.8), ("sd15", 0.1)])
def test_gptq_raises_w4a4_sqnr(kind, margin):
    # GPTQ compensates weight rounding, so it is measured where weight error is a visible
    # share: per-token activations, no planted activation outliers.
    ref = reference(kind, planted=False)
    per_token = {"base": "w4a4", "smooth": None, "lowrank": None, "gptq": None}
    without = ref.sqnr(per_token)
    with_gptq = ref.sqnr({**per_token, "gptq": True})
    assert with_gptq > without + margin > ref.sqnr("w4a4-rtn"), (without, with_gptq)


@pytest.mark.parametrize("bits", ["w8a8", "w4a8", "w4a4"])
def test_presets_beat_their_naive_baselines_on_planted_outliers(bits):
    ref = reference("pixart")
    naive, preset = ref.sqnr(f"{bits}-rtn"), ref.sqnr(bits)
    assert preset > naive + 3, (bits, naive, preset)


# ----------------------------------------------------------------------------- checkpoints


EVERYTHING = {
    "base": "w4a4",
    "smooth": {"grid": 5},
    "rotate": True,
    "lowrank": {"rank": 16, "iters": 1},
    "gptq": True,
    "attention": {"probs": "log2", "probs_bits": 4, "qkv": {"bits": 8, "granularity": "token"}},
}


@pytest.mark.parametrize("kind", ["pixart", "sd15"])
def test_save_and_load_restore_every_component(kind, tmp_path):
    pipe = tiny_pipeline(kind)
    dq.quantize(pipe, EVERYTHING, calib_prompts=prompts_for(kind, 2), num_inference_steps=2, **call_kwargs(kind))
    _, model = find_denoiser(pipe)
    layers = [m for m in model.modules() if isinstance(m, QuantModule)]
    assert all(isinstance(m.input_transform, InputTransform) for m in layers)
    assert all(isinstance(m.branch, LowRankBranch) for m in layers)
    assert any(isinstance(getattr(m, "processor", None), QuantAttnProcessor) for m in model.modules())
    expected = generate(pipe, kind, steps=2).images
    loaded = dq.load(dq.save(pipe, tmp_path / "q"))
    _, model2 = find_denoiser(loaded)
    for (name, a), (_, b) in zip(model.named_modules(), model2.named_modules()):
        if isinstance(a, QuantModule):
            assert a.plan_entry() == b.plan_entry(), name
            sa, sb = a.state_dict(), b.state_dict()
            assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), name
            assert any(k.startswith("input_transform.") for k in sa) and "branch.down" in sa
    assert sum(isinstance(getattr(m, "processor", None), QuantAttnProcessor) for m in model2.modules()) == sum(
        isinstance(getattr(m, "processor", None), QuantAttnProcessor) for m in model.modules()
    )
    got = generate(loaded, kind, steps=2).images
    assert torch.equal(torch.as_tensor(got), torch.as_tensor(expected))


# ----------------------------------------------------------------------------- attention


@pytest.mark.parametrize("kind", ["pixart", "sd15"])
def test_attention_processor_runs_and_is_removed_cleanly(kind):
    ref = reference(kind, planted=False)
    _, model = find_denoiser(ref.pipe)
    ref.recorder.model = model
    before = {n: m.processor for n, m in model.named_modules() if hasattr(m, "set_processor")}
    # the processor itself is exact: no quantization -> the original outputs
    for name, module in model.named_modules():
        if name in before:
            module.set_processor(QuantAttnProcessor(probs="none", original=module.processor))
    exact = ref.recorder.replay()
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(ref.outputs, exact))
    assert dequantize_attention(model) == len(before)

    scores = {}
    for probs in ("log2", "uniform"):
        installed = quantize_attention(model, AttentionConfig(probs=probs, probs_bits=4))
        assert installed == len(before)
        got = ref.recorder.replay()
        scores[probs] = sum(sqnr_db(r, g) for r, g in zip(ref.outputs, got)) / len(got)
        assert dequantize_attention(model) == installed
    assert scores["log2"] > scores["uniform"] + 5, scores
    assert {n: m.processor for n, m in model.named_modules() if hasattr(m, "set_processor")} == before
    assert all(torch.equal(a, b) for a, b in zip(ref.outputs, ref.recorder.replay()))
    images = generate(ref.pipe, kind).images
    assert torch.isfinite(torch.as_tensor(images)).all()


def test_attention_selection_and_unsupported_processors_are_logged_once(caplog):
    pipe = tiny_pipeline("pixart")
    n = quantize_attention(pipe.transformer, AttentionConfig(include=[r"\.attn1$"]))
    assert n == 2  # self-attention of the two blocks only
    flux = tiny_pipeline("flux").transformer
    with caplog.at_level(logging.INFO, logger="dq.nn.attention"):
        assert quantize_attention(flux, AttentionConfig()) == 0
    lines = [r.getMessage() for r in caplog.records if "attention quantization skipped" in r.getMessage()]
    assert len(lines) == 1 and "FluxAttention" in lines[0]


# ----------------------------------------------------------------------------- errors and skips


def test_components_that_cannot_apply_are_skipped_with_one_log_line_each(caplog):
    pipe = tiny_pipeline("pixart")
    with caplog.at_level(logging.INFO, logger="dq.outliers"):
        dq.quantize(pipe, {"base": "w4a16", "rotate": {"block_size": 128}})
    skipped = [r.getMessage() for r in caplog.records if "rotate skipped" in r.getMessage()]
    layers = {n: m for n, m in pipe.transformer.named_modules() if isinstance(m, QuantModule)}
    rotated = {n for n, m in layers.items() if m.input_transform is not None}
    assert rotated and all(m.in_features % 128 == 0 for n, m in layers.items() if n in rotated)
    assert len(skipped) == len(layers) - len(rotated)
    assert all("does not divide the 64 input channels" in line for line in skipped)


def test_bad_rank_and_missing_statistics_are_clear_errors():
    pipe = tiny_pipeline("pixart")
    with pytest.raises(DQError, match=r"transformer_blocks\.0\..*larger than the layer allows"):
        dq.quantize(pipe, {"base": "w4a16", "lowrank": {"rank": 65}})
    assert not any(isinstance(m, QuantModule) for m in pipe.transformer.modules())


def test_smoothing_with_dynamic_activations_calibrates_without_histograms(monkeypatch):
    pipe = tiny_pipeline("pixart")
    seen = []
    original = dq.engine.calibrate

    def spy(*args, targets=None, **kwargs):
        seen.append(targets)
        return original(*args, targets=targets, **kwargs)

    monkeypatch.setattr("dq.engine.calibrate", spy)
    dq.quantize(pipe, {"base": "w4a4", "lowrank": None}, calib_prompts=prompts_for("pixart", 2), num_inference_steps=2, **call_kwargs("pixart"))
    assert len(seen) == 1, "dynamic activations need one statistics pass only"
    assert seen[0] and all(t.second_moment and not t.histogram for t in seen[0])
    assert pipe.transformer.dq_router.groups == 1  # nothing is looked up by timestep


def test_log_domain_weights_quantize_through_the_engine():
    pipe = tiny_pipeline("pixart")
    dq.quantize(pipe, {"base": "w4a16", "weight": {"bits": 4, "granularity": "channel", "log": True}})
    layer = pipe.transformer.transformer_blocks[0].attn1.to_q
    w = layer.dequantized_weight()
    ratio = w.abs() / w.abs().amax(dim=1, keepdim=True)
    exps = torch.log2(ratio[ratio > 0])
    assert torch.allclose(exps, exps.round(), atol=1e-5), "log-domain weights lie on powers of two of the row scale"
    assert torch.isfinite(torch.as_tensor(generate(pipe, "pixart", steps=2).images)).all()
