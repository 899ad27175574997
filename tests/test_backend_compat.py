"""dq behaves like diffusers' own quantization backends (what their shared backend tests check),
and quantized pipelines offload and compile. Tiny random-weight pipelines."""

import copy
import json

import numpy as np
import pytest
import torch
import torch._dynamo.testing
import torch.nn.functional as F
from diffusers import DiffusionPipeline, PixArtTransformer2DModel
from torch import nn

import dq
from dq.backend import DQQuantizer
from dq.errors import DQError
from dq.kernels.dispatch import runtime_nbytes
from dq.nn import QuantModule
from dq.nn.bf16_attention import BF16AttnProcessor
from dq.nn.dtype_guard import DtypeCastError
from dq.nn.gelu import MeasuredGELU
from dq.testing.tiny import default_call_kwargs, prompt_kwargs, prompts_for, tiny_pipeline

KIND = "pixart"


def run(pipe, kind=KIND, **overrides) -> np.ndarray:
    kw = {**default_call_kwargs(kind), **overrides}
    return pipe(**prompt_kwargs(kind, 1), generator=torch.Generator().manual_seed(0), **kw).images


def quantize(pipe, recipe, kind=KIND):
    kw = default_call_kwargs(kind)
    kw.pop("num_inference_steps")
    kw.pop("output_type")
    return dq.quantize(pipe, recipe, calib_prompts=prompts_for(kind, 2), num_inference_steps=2, **kw)


def quantized(model) -> dict[str, QuantModule]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantModule)}


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("float") / "pipe"
    tiny_pipeline(KIND).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def w8a8_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("w8a8") / "pipe"
    dq.save(quantize(tiny_pipeline(KIND), "w8a8"), path)
    return path


# -- parameters and memory ----------------------------------------------------------------------


@pytest.mark.parametrize("recipe", ["w8a8", "w4a16"])
def test_num_parameters_is_the_unquantized_count(recipe, tmp_path):
    reference = tiny_pipeline("flux").transformer.num_parameters()
    pipe = quantize(tiny_pipeline("flux"), recipe, kind="flux")
    model = pipe.transformer
    assert quantized(model) and not any(p.dtype in (torch.int8, torch.uint8) for p in model.parameters())
    assert model.num_parameters() == reference
    # quantized weights are frozen: only_trainable counts the float parameters that train
    assert model.num_parameters(only_trainable=True) == sum(p.numel() for p in model.parameters() if p.requires_grad)
    dq.save(pipe, tmp_path / "q")
    loaded = type(model).from_pretrained(tmp_path / "q", subfolder="transformer")
    assert loaded.num_parameters() == reference
    assert dq.load(tmp_path / "q").transformer.num_parameters() == reference


@pytest.mark.parametrize("recipe", [{"base": "w4a16", "weight": {"bits": 8, "granularity": "channel"}}, "w4a16"])
def test_memory_footprint_shows_the_saving(float_dir, recipe):
    full = PixArtTransformer2DModel.from_pretrained(float_dir, subfolder="transformer")
    model = PixArtTransformer2DModel.from_pretrained(
        float_dir, subfolder="transformer", quantization_config=dq.DQConfig(recipe=recipe)
    )
    assert quantized(model)
    assert model.get_memory_footprint() < full.get_memory_footprint()
    pipe = DiffusionPipeline.from_pretrained(float_dir, transformer=model)
    assert np.isfinite(run(pipe)).all()  # inference without NaN
    # every stored copy counted: the kernels' runtime weight copies too
    plain = PixArtTransformer2DModel.get_memory_footprint(model)
    assert model.get_memory_footprint() == plain + runtime_nbytes(model)


# -- dtype ----------------------------------------------------------------------------------------


def _check_casts_refused(model, dtype):
    others = {torch.float32: model.float, torch.float16: model.half, torch.bfloat16: model.bfloat16}
    for target, cast in others.items():
        if target != dtype:
            with pytest.raises(DtypeCastError, match="torch_dtype"):
                cast()
            with pytest.raises(DtypeCastError, match="torch_dtype"):
                model.to(target)
    assert model.to("cpu") is not None  # device moves work


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_casts_refused_after_load_and_quantize(w8a8_dir, dtype):
    loaded = PixArtTransformer2DModel.from_pretrained(w8a8_dir, subfolder="transformer", torch_dtype=dtype)
    _check_casts_refused(loaded, dtype)
    pipe = DiffusionPipeline.from_pretrained(w8a8_dir, torch_dtype=dtype)
    _check_casts_refused(pipe.transformer, dtype)
    pipe.to("cpu")
    assert np.isfinite(run(pipe)).all()
    made = quantize(tiny_pipeline(KIND, dtype=dtype), "w4a16").transformer
    _check_casts_refused(made, dtype)


def test_pre_quantization_dtype_recorded(w8a8_dir, float_dir, tmp_path):
    assert PixArtTransformer2DModel.from_pretrained(w8a8_dir, subfolder="transformer").config._pre_quantization_dtype == torch.float32
    bf16 = PixArtTransformer2DModel.from_pretrained(w8a8_dir, subfolder="transformer", torch_dtype=torch.bfloat16)
    assert bf16.config._pre_quantization_dtype == torch.bfloat16
    at_load = PixArtTransformer2DModel.from_pretrained(float_dir, subfolder="transformer", quantization_config=dq.DQConfig(recipe="w4a16"))
    assert at_load.config._pre_quantization_dtype == torch.float32
    pipe = quantize(tiny_pipeline(KIND, dtype=torch.bfloat16), "w4a16")
    assert pipe.transformer.config._pre_quantization_dtype == torch.bfloat16
    dq.save(pipe, tmp_path / "bf16")  # recorded from the source, without torch_dtype
    again = PixArtTransformer2DModel.from_pretrained(tmp_path / "bf16", subfolder="transformer")
    assert again.config._pre_quantization_dtype == torch.bfloat16 and again.dtype == torch.bfloat16
    assert "_pre_quantization_dtype" not in json.loads((tmp_path / "bf16" / "transformer" / "config.json").read_text())


# -- layers ---------------------------------------------------------------------------------------


def test_quantized_layers_look_like_linear_layers(w8a8_dir):
    model = PixArtTransformer2DModel.from_pretrained(w8a8_dir, subfolder="transformer")
    layers = quantized(model)
    linear = {n: m for n, m in layers.items() if isinstance(m, nn.Linear)}
    assert linear
    for name, m in linear.items():
        assert m.weight.shape == (m.out_features, m.in_features) == m.weight_shape, name
        assert m.weight.dtype == torch.float32 and torch.isfinite(m.weight).all()
    state = model.state_dict()
    assert not any(f"{n}.weight" in state for n, m in layers.items() if m.weight_spec is not None)


def test_unquantized_layers_listed_the_diffusers_way(float_dir, monkeypatch):
    monkeypatch.setattr(PixArtTransformer2DModel, "_keep_in_fp32_modules", ["attn2"])
    model = PixArtTransformer2DModel.from_pretrained(
        float_dir, subfolder="transformer", quantization_config=dq.DQConfig(recipe="w4a16", modules_to_not_convert=[r"\.ff\."])
    )
    kept = model.hf_quantizer.modules_to_not_convert
    assert any(".attn2." in n for n in kept) and any(".ff." in n for n in kept)
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            assert (name in kept) != isinstance(module, QuantModule), name
            if ".attn2." in name or ".ff." in name:
                assert not isinstance(module, QuantModule), name


# -- dequantize -----------------------------------------------------------------------------------


def _reference_outputs(model, names):
    """What each layer computes without activation rounding, on a fixed input."""
    torch.manual_seed(0)
    outs = {}
    for name in names:
        layer = model.get_submodule(name)
        x = torch.randn(3, layer.in_features)
        t = layer.input_transform(x) if layer.input_transform is not None else x
        y = F.linear(t, layer.dequantized_weight(), layer.bias)
        outs[name] = (x, y + layer.branch(t) if layer.branch is not None else y)
    return outs


@pytest.mark.parametrize("recipe", ["w8a8", "w4a4"])  # smoothing; smoothing + low-rank branch + GPTQ
def test_model_dequantize(recipe, tmp_path):
    fp = tiny_pipeline(KIND)
    pipe = quantize(tiny_pipeline(KIND), recipe)
    model = pipe.transformer
    names = [n for n, m in quantized(model).items() if isinstance(m, nn.Linear)]
    with_parts = [n for n in names if model.get_submodule(n).input_transform is not None or model.get_submodule(n).branch is not None]
    assert with_parts
    reference = _reference_outputs(model, names)
    with torch.no_grad():
        run(pipe)  # real execution: measured attention cores and GELUs installed
    installed = [m for m in model.modules() if isinstance(getattr(m, "processor", None), BF16AttnProcessor)
                 or isinstance(m.__dict__.get("gelu"), MeasuredGELU)]
    assert installed
    assert model.dequantize() is model  # diffusers' ModelMixin.dequantize -> DQQuantizer._dequantize
    assert not [m for m in model.modules() if isinstance(getattr(m, "processor", None), BF16AttnProcessor)
                or isinstance(m.__dict__.get("gelu"), MeasuredGELU)]  # plain float32 attention and GELU again
    assert not quantized(model) and getattr(model, "hf_quantizer", None) is None and not model.is_quantized
    assert "quantization_config" not in model.config and not hasattr(model, "dq_router")
    for name, (x, y) in reference.items():
        layer = model.get_submodule(name)
        assert type(layer) is nn.Linear
        torch.testing.assert_close(layer(x), y, rtol=1e-4, atol=1e-4)
    images, full = run(pipe), run(fp)
    assert np.isfinite(images).all() and np.abs(images - full).mean() < 0.05
    assert copy.deepcopy(model).half().dtype == torch.float16  # a plain model again: casts work
    pipe.save_pretrained(tmp_path / "plain")
    assert "quantization_config" not in json.loads((tmp_path / "plain" / "transformer" / "config.json").read_text())
    reloaded = DiffusionPipeline.from_pretrained(tmp_path / "plain")
    np.testing.assert_allclose(run(reloaded), images, atol=1e-5)


def test_dq_dequantize_pipeline_from_pretrained(w8a8_dir):
    pipe = DiffusionPipeline.from_pretrained(w8a8_dir)
    quantized_images = run(pipe)
    assert dq.dequantize(pipe) is pipe
    assert not quantized(pipe.transformer)
    images = run(pipe)
    assert np.isfinite(images).all() and np.abs(images - quantized_images).mean() < 0.05
    pipe.to(torch.float32)
    with pytest.raises(DQError, match="not quantized by dq"):
        dq.dequantize(pipe)
    dq.quantize(pipe, "w4a16")  # can be quantized again


# -- device maps and config -----------------------------------------------------------------------


@pytest.mark.parametrize("device_map", ["auto", {"": "cpu"}])
def test_device_map_loads(w8a8_dir, device_map):
    model = PixArtTransformer2DModel.from_pretrained(w8a8_dir, subfolder="transformer", device_map=device_map)
    assert isinstance(model.hf_quantizer, DQQuantizer) and quantized(model)
    reference = DiffusionPipeline.from_pretrained(w8a8_dir)
    pipe = DiffusionPipeline.from_pretrained(w8a8_dir, transformer=model)
    np.testing.assert_array_equal(run(pipe), run(reference))


def test_config_round_trips_through_a_loaded_model(w8a8_dir, tmp_path):
    model = PixArtTransformer2DModel.from_pretrained(w8a8_dir, subfolder="transformer")
    config = model.config.quantization_config
    assert isinstance(config, dq.DQConfig)
    assert dq.DQConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    model.save_pretrained(tmp_path / "again")
    saved = json.loads((tmp_path / "again" / "config.json").read_text())["quantization_config"]
    assert dq.DQConfig.from_dict(saved) == config


# -- offload and compile --------------------------------------------------------------------------


def test_model_cpu_offload(w8a8_dir):
    reference = run(DiffusionPipeline.from_pretrained(w8a8_dir))
    pipe = DiffusionPipeline.from_pretrained(w8a8_dir)
    pipe.enable_model_cpu_offload(device="cpu")
    np.testing.assert_array_equal(run(pipe), reference)


def test_group_offload(w8a8_dir):
    reference = run(DiffusionPipeline.from_pretrained(w8a8_dir))
    pipe = DiffusionPipeline.from_pretrained(w8a8_dir)
    pipe.transformer.enable_group_offload(
        onload_device=torch.device("cpu"), offload_device=torch.device("cpu"), offload_type="block_level", num_blocks_per_group=1
    )
    np.testing.assert_array_equal(run(pipe), reference)


@pytest.mark.parametrize("recipe", ["w8a8", "w4a16"])
def test_compile_fullgraph_without_recompiles(recipe):
    """torch.compile(fullgraph=True) of a quantized denoiser: one graph, reused across timesteps
    (timestep groups switch inside it) and step counts. Dynamo's eager backend: what is checked here
    (graph breaks, guards) is decided before any backend runs; inductor is timed in BENCHMARKS."""
    pipe = quantize(tiny_pipeline(KIND), recipe)
    eager = run(pipe, num_inference_steps=3)
    counter = torch._dynamo.testing.CompileCounterWithBackend("eager")
    pipe.transformer = torch.compile(pipe.transformer, fullgraph=True, backend=counter)
    first = run(pipe, num_inference_steps=3)
    frames = counter.frame_count
    assert frames >= 1
    with torch._dynamo.config.patch(error_on_recompile=True):
        run(pipe, num_inference_steps=2)
        again = run(pipe, num_inference_steps=3)
    assert counter.frame_count == frames
    np.testing.assert_array_equal(first, again)
    np.testing.assert_allclose(first, eager, atol=2e-3)


def test_regional_compile_compiles_each_block_class_once():
    """diffusers' `compile_repeated_blocks` (each repeated block class compiled once for all its
    instances: the short compile for large DiTs) on a quantized FLUX: dq's per-layer state (scales,
    kernel choices) makes dynamo compile no more frames than the float model's (no recompile per
    block instance), and nothing more at another step count."""
    kind = "flux"

    def frames(pipe, steps=3):
        counter = torch._dynamo.testing.CompileCounterWithBackend("eager")
        pipe.transformer.compile_repeated_blocks(fullgraph=True, backend=counter)
        out = run(pipe, kind, num_inference_steps=steps)
        return counter, out

    def deeper():  # 3 + 4 blocks: a recompile per instance would show against 2 classes
        pipe = tiny_pipeline(kind)
        torch.manual_seed(0)
        config = {**pipe.transformer.config, "num_layers": 3, "num_single_layers": 4}
        pipe.transformer = type(pipe.transformer).from_config(config).eval()
        return pipe

    torch._dynamo.reset()
    float_counter, _ = frames(deeper())
    pipe = quantize(deeper(), "w8a8", kind=kind)
    model = pipe.transformer
    assert len([b for b in model.modules() if type(b).__name__ in model._repeated_blocks]) > len(model._repeated_blocks)
    eager = run(pipe, kind, num_inference_steps=3)
    torch._dynamo.reset()
    counter, first = frames(pipe)
    assert 1 <= counter.frame_count <= float_counter.frame_count < 7
    compiled = counter.frame_count
    with torch._dynamo.config.patch(error_on_recompile=True):
        again = run(pipe, kind, num_inference_steps=2)
    assert counter.frame_count == compiled and again.shape == first.shape
    np.testing.assert_allclose(first, eager, atol=2e-3)
