"""dq as a diffusers quantization backend (dq.backend): DQConfig, from_pretrained of dq folders,
quantization_config at load, save_pretrained after dq.quantize. Tiny pixart pipelines."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, PipelineQuantizationConfig, PixArtTransformer2DModel
from diffusers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

import dq
from dq.backend import DQQuantizer
from dq.errors import DQError
from dq.nn import QuantModule
from dq.nn.dtype_guard import DtypeCastError
from dq.recipe import FORMAT_VERSION
from dq.testing.tiny import default_call_kwargs, prompt_kwargs, prompts_for, tiny_pipeline

KIND = "pixart"
REPO = Path(__file__).resolve().parents[1]


def images(pipe) -> np.ndarray:
    kw = default_call_kwargs(KIND)
    return pipe(**prompt_kwargs(KIND, 1), generator=torch.Generator().manual_seed(0), **kw).images


def quantized_layers(model) -> int:
    return sum(isinstance(m, QuantModule) for m in model.modules())


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("float") / "pipe"
    tiny_pipeline(KIND).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def w8a8(tmp_path_factory):
    """A tiny pixart quantized with w8a8 (static ranges, smoothing: needs calibration), saved by
    dq.save and by save_pretrained (whole and sharded); the reference images of dq.load."""
    root = tmp_path_factory.mktemp("w8a8")
    pipe = tiny_pipeline(KIND)
    kw = default_call_kwargs(KIND)
    kw.pop("num_inference_steps")
    kw.pop("output_type")
    dq.quantize(pipe, "w8a8", calib_prompts=prompts_for(KIND, 2), num_inference_steps=2, **kw)
    dq.save(pipe, root / "dq_save")
    pipe.save_pretrained(root / "save_pretrained")
    pipe.save_pretrained(root / "sharded", max_shard_size="50KB")
    return root, images(pipe), images(dq.load(root / "dq_save"))


# -- DQConfig ---------------------------------------------------------------------------------


def test_registered_with_diffusers():
    assert AUTO_QUANTIZER_MAPPING["dq"] is DQQuantizer
    assert AUTO_QUANTIZATION_CONFIG_MAPPING["dq"] is dq.DQConfig


def test_config_round_trips():
    config = dq.DQConfig(recipe="w4a16", modules_to_not_convert=["proj_out", r"transformer_blocks\.0\."])
    assert config.quant_method == "dq" and config.quant_method.value == "dq"
    assert config.recipe["keep"] == ["proj_out", r"transformer_blocks\.0\."]
    data = config.to_dict()
    assert data["quant_method"] == "dq" and json.loads(json.dumps(data)) == data
    again = dq.DQConfig.from_dict(data)
    assert again == config and again.to_dict() == data  # keep is not extended twice
    assert json.loads(config.to_json_string(use_diff=False)) == data
    assert json.loads(config.to_json_string())["recipe"]["name"] == "w4a16"  # to_diff_dict
    assert "DQConfig" in repr(config)
    # short with a plan: diffusers formats the config on every config update during a load
    planned = dq.DQConfig(recipe="w4a16", plan={f"blocks.{i}.proj": {"type": "QuantLinear"} for i in range(500)})
    assert "500 quantized layers" in repr(planned) and len(repr(planned)) < 120
    assert dq.DQConfig(recipe=dq.recipe.preset("w4a16")) == dq.DQConfig(recipe="w4a16")
    assert dq.DQConfig(recipe=dq.recipe.preset("w4a16").to_dict()) == dq.DQConfig(recipe="w4a16")


def test_config_keeps_saved_keys_and_unknown_ones(w8a8):
    root, _, _ = w8a8
    saved = json.loads((root / "dq_save" / "transformer" / "config.json").read_text())["quantization_config"]
    assert saved["plan"] and "source" in saved
    config = dq.DQConfig.from_dict({**saved, "later_key": [1, 2]})
    assert config.pre_quantized and config.to_dict() == {**saved, "later_key": [1, 2]}


def test_config_refuses_bad_input():
    with pytest.raises(DQError, match=r"unknown recipe 'w3a3'.*dq\.recipes\(\)"):
        dq.DQConfig(recipe="w3a3")
    with pytest.raises(DQError, match="format_version 99.*upgrade dq"):
        dq.DQConfig(format_version=99, plan={})
    with pytest.raises(DQError, match="needs a recipe"):
        dq.DQConfig()
    with pytest.raises(DQError, match="modules_to_not_convert"):
        dq.DQConfig(recipe="w4a16", modules_to_not_convert="proj_out")
    with pytest.raises(DQError, match="quant_method"):
        dq.DQConfig(recipe="w4a16", quant_method="torchao")
    with pytest.raises(DQError, match="'to_dict' is not a config field"):
        dq.DQConfig.from_dict({"recipe": "w4a16", "to_dict": 1})


# -- from_pretrained of saved folders ---------------------------------------------------------


@pytest.mark.parametrize("folder", ["dq_save", "save_pretrained", "sharded"])
def test_pipeline_from_pretrained_matches_dq_load(w8a8, folder):
    root, quantized, reference = w8a8
    np.testing.assert_array_equal(quantized, reference)
    pipe = DiffusionPipeline.from_pretrained(root / folder)
    assert isinstance(pipe.transformer.hf_quantizer, DQQuantizer)
    assert quantized_layers(pipe.transformer) == quantized_layers(dq.load(root / "dq_save").transformer)
    np.testing.assert_array_equal(images(pipe), reference)
    if folder != "dq_save":
        np.testing.assert_array_equal(images(dq.load(root / folder)), reference)  # dq.load reads them too


def test_sharded_save_is_sharded(w8a8):
    root, _, _ = w8a8
    assert (root / "sharded" / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()


def test_model_from_pretrained_subfolder(w8a8):
    root, _, reference = w8a8
    model = PixArtTransformer2DModel.from_pretrained(root / "dq_save", subfolder="transformer")
    assert quantized_layers(model) > 0 and not model.training
    pipe = DiffusionPipeline.from_pretrained(root / "dq_save", transformer=model)
    np.testing.assert_array_equal(images(pipe), reference)


def test_bfloat16_load_matches_dq_load(w8a8):
    root, _, _ = w8a8
    ours = DiffusionPipeline.from_pretrained(root / "dq_save", torch_dtype=torch.bfloat16)
    theirs = dq.load(root / "dq_save", torch_dtype=torch.bfloat16)
    a, b = ours.transformer.state_dict(), theirs.transformer.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key
    np.testing.assert_array_equal(images(ours), images(theirs))


def test_save_pretrained_after_dq_load_reloads(w8a8, tmp_path):
    root, _, reference = w8a8
    dq.load(root / "dq_save").save_pretrained(tmp_path / "again")
    np.testing.assert_array_equal(images(DiffusionPipeline.from_pretrained(tmp_path / "again")), reference)


def _edited_copy(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    path = dst / "transformer" / "config.json"
    config = json.loads(path.read_text())
    edit(config["quantization_config"])
    path.write_text(json.dumps(config))
    return dst


def test_plan_naming_missing_layers_is_refused(w8a8, tmp_path):
    root, _, _ = w8a8

    def edit(qc):
        name, entry = next(iter(qc["plan"].items()))
        qc["plan"]["no_such.layer"] = entry

    bad = _edited_copy(root / "dq_save", tmp_path / "bad", edit)
    with pytest.raises(DQError, match=r"plan names layers .*no_such\.layer"):
        PixArtTransformer2DModel.from_pretrained(bad, subfolder="transformer")
    with pytest.raises(DQError, match=r"config\.json.*plan names layers"):
        dq.load(bad)


def test_newer_format_version_is_refused(w8a8, tmp_path):
    root, _, _ = w8a8
    bad = _edited_copy(root / "dq_save", tmp_path / "newer", lambda qc: qc.update(format_version=FORMAT_VERSION + 1))
    with pytest.raises(DQError, match="format_version.*upgrade dq"):
        DiffusionPipeline.from_pretrained(bad)
    with pytest.raises(DQError, match="format_version.*upgrade dq"):
        dq.load(bad)


def test_fresh_process_needs_import_dq(w8a8):
    root, _, _ = w8a8
    script = f"""
import diffusers
try:
    diffusers.DiffusionPipeline.from_pretrained({str(root / 'dq_save')!r})
except ValueError as exc:
    assert "Unknown quantization type, got dq" in str(exc), exc
else:
    raise SystemExit("loaded without import dq")
import dq
pipe = diffusers.DiffusionPipeline.from_pretrained({str(root / 'dq_save')!r})
assert type(pipe.transformer.hf_quantizer).__name__ == "DQQuantizer"
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


# -- quantization_config at load --------------------------------------------------------------


def test_quantize_at_load_matches_dq_quantize(float_dir, tmp_path):
    model = PixArtTransformer2DModel.from_pretrained(
        float_dir, subfolder="transformer", quantization_config=dq.DQConfig(recipe="w4a16")
    )
    assert quantized_layers(model) > 0
    assert model.config.quantization_config.pre_quantized  # now describes the checkpoint
    pipe = DiffusionPipeline.from_pretrained(float_dir, transformer=model)
    reference = images(dq.quantize(DiffusionPipeline.from_pretrained(float_dir), "w4a16"))
    np.testing.assert_array_equal(images(pipe), reference)
    pipe.save_pretrained(tmp_path / "saved")
    np.testing.assert_array_equal(images(DiffusionPipeline.from_pretrained(tmp_path / "saved")), reference)
    np.testing.assert_array_equal(images(dq.load(tmp_path / "saved")), reference)


def test_pipeline_quantization_config(float_dir):
    config = PipelineQuantizationConfig(quant_mapping={"transformer": dq.DQConfig(recipe="w4a16", modules_to_not_convert=["proj_out"])})
    pipe = DiffusionPipeline.from_pretrained(float_dir, quantization_config=config)
    names = {n for n, m in pipe.transformer.named_modules() if isinstance(m, QuantModule)}
    assert names and "proj_out" not in names
    assert images(pipe).shape[0] == 1


def test_pipeline_level_quant_backend_quantizes_denoiser_and_text_encoder(float_dir, tmp_path):
    """diffusers' pipeline-level form: the denoiser through dq's diffusers backend, the T5 through
    its transformers backend; the same images as quantizing each by hand after a float load."""
    config = PipelineQuantizationConfig(quant_backend="dq", quant_kwargs={"recipe": "w4a16"},
                                        components_to_quantize=["transformer", "text_encoder"])
    pipe = DiffusionPipeline.from_pretrained(float_dir, quantization_config=config)
    assert quantized_layers(pipe.transformer) > 0 and quantized_layers(pipe.text_encoder) > 0
    by_hand = dq.quantize(DiffusionPipeline.from_pretrained(float_dir), "w4a16")
    dq.quantize_text_encoders(by_hand, "w4a16")
    np.testing.assert_array_equal(images(pipe), images(by_hand))
    with pytest.raises(DQError, match="cannot be saved quantized"):
        pipe.save_pretrained(tmp_path / "out")
    # transformers' model.dequantize(): plain Linear layers again, and the encoder saves as a float one
    encoder = pipe.text_encoder.dequantize()
    assert quantized_layers(encoder) == 0 and getattr(encoder, "hf_quantizer", None) is None
    encoder.save_pretrained(tmp_path / "te")
    assert "quantization_config" not in json.loads((tmp_path / "te" / "config.json").read_text())
    dq.dequantize(pipe)  # the denoiser too: the whole pipeline saves as a float one
    pipe.save_pretrained(tmp_path / "float")
    assert quantized_layers(DiffusionPipeline.from_pretrained(tmp_path / "float").transformer) == 0
    # a diffusers DQConfig in quant_mapping serves a text encoder too, and its modules_to_not_convert
    # stay plain Linear layers there
    mapped = DiffusionPipeline.from_pretrained(float_dir, quantization_config=PipelineQuantizationConfig(
        quant_mapping={"text_encoder": dq.DQConfig(recipe="w8a16", modules_to_not_convert=[r"block\.0\."])}))
    assert quantized_layers(mapped.text_encoder) > 0 and quantized_layers(mapped.transformer) == 0
    kept = [n for n, m in mapped.text_encoder.named_modules() if type(m) is torch.nn.Linear]
    assert kept and all("block.0." in n for n in kept)
    assert not any(isinstance(m, QuantModule) for n, m in mapped.text_encoder.named_modules() if "block.0." in n)


def test_text_encoder_backend_refuses_what_it_cannot_do(float_dir, tmp_path):
    config = PipelineQuantizationConfig(quant_backend="dq", quant_kwargs={"recipe": "w8a8"}, components_to_quantize=["text_encoder"])
    with pytest.raises(DQError, match=r"weight-only.*w8a16.*quant_mapping"):
        DiffusionPipeline.from_pretrained(float_dir, quantization_config=config)
    # a text encoder folder claiming to be dq-quantized: dq never writes one
    from transformers import T5EncoderModel

    folder = tmp_path / "te"
    T5EncoderModel.from_pretrained(float_dir, subfolder="text_encoder").save_pretrained(folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "dq", "recipe": "w8a16"}
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(DQError, match="never saves text encoders quantized"):
        T5EncoderModel.from_pretrained(folder)


def test_dynamic_recipe_without_smoothing_quantizes_at_load(float_dir):
    recipe = {"base": "w8a8-dynamic", "smooth": None}
    model = PixArtTransformer2DModel.from_pretrained(float_dir, subfolder="transformer", quantization_config=dq.DQConfig(recipe=recipe))
    assert quantized_layers(model) > 0


@pytest.mark.parametrize("recipe", ["w8a8", "w8a8-dynamic", "fp8", "w4a4"])
def test_recipes_needing_calibration_are_refused_at_load(float_dir, recipe):
    with pytest.raises(DQError, match=r"needs calibration.*dq\.quantize\(pipe, recipe\).*from_pretrained the saved folder"):
        PixArtTransformer2DModel.from_pretrained(float_dir, subfolder="transformer", quantization_config=dq.DQConfig(recipe=recipe))


def test_shard_index_naming_other_files_is_refused(w8a8, tmp_path):
    root, _, _ = w8a8
    bad = tmp_path / "bad-index"
    shutil.copytree(root / "sharded", bad)
    index_path = bad / "transformer" / "diffusion_pytorch_model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "../../elsewhere.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(DQError, match=r"lists shard '\.\./\.\./elsewhere\.safetensors'"):
        dq.load(bad)


def test_checkpoint_dtypes_kept_without_torch_dtype(tmp_path):
    """A pipeline quantized in bfloat16 loads in bfloat16 without torch_dtype, as with dq.load."""
    pipe = dq.quantize(tiny_pipeline(KIND, dtype=torch.bfloat16), "w4a16")
    dq.save(pipe, tmp_path / "bf16")
    ours = PixArtTransformer2DModel.from_pretrained(tmp_path / "bf16", subfolder="transformer")
    theirs = dq.load(tmp_path / "bf16").transformer
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys() and a["proj_out.weight"].dtype == torch.bfloat16
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    assert all(not p.requires_grad for p in ours.parameters()) == all(not p.requires_grad for p in theirs.parameters())


def test_dtype_guard_as_with_dq_load(w8a8):
    root, _, _ = w8a8
    model = PixArtTransformer2DModel.from_pretrained(root / "dq_save", subfolder="transformer")
    assert model.is_quantized  # set by diffusers: its ModelMixin.to refuses any dtype argument
    assert model.to(torch.float32) is model and model.float() is model and model.to("cpu", torch.float32) is model
    with pytest.raises(DtypeCastError, match="torch_dtype"):
        model.to(torch.float16)
    with pytest.raises(DtypeCastError):
        model.bfloat16()


def test_weights_not_matching_the_plan_are_refused(w8a8, tmp_path):
    root, _, _ = w8a8

    def edit(qc):
        entry = next(e for e in qc["plan"].values() if e["activation"] is not None and not e["activation"].get("dynamic"))
        entry["groups"] += 1  # one more static activation range than the weights hold

    bad = _edited_copy(root / "dq_save", tmp_path / "mismatch", edit)
    with pytest.raises(DQError, match=r"checkpoint holds shape .* save the pipeline again"):
        PixArtTransformer2DModel.from_pretrained(bad, subfolder="transformer")
    with pytest.raises(DQError, match=r"checkpoint holds shape .* save the pipeline again"):
        PixArtTransformer2DModel.from_pretrained(bad, subfolder="transformer", torch_dtype=torch.bfloat16)


def _loaded_tensors(model) -> dict:
    return {n: (type(t), t.dtype, t.requires_grad, t) for n, t in [*model.named_parameters(), *model.named_buffers()]}


@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("folder", ["dq_save", "sharded"])
def test_bulk_load_matches_the_per_tensor_hooks(w8a8, monkeypatch, dtype, folder):
    """`maybe_update_state_dict` sets the quantized layers' tensors itself: the same model as
    diffusers' per-tensor loop with `check_if_quantized_param` / `create_quantized_param`."""
    root, _, _ = w8a8
    kw = {} if dtype is None else {"torch_dtype": dtype}
    left: list[str] = []
    bulk = DQQuantizer.maybe_update_state_dict

    def spy(self, state_dict):
        rest = bulk(self, state_dict)
        left.extend(rest)
        return rest

    monkeypatch.setattr(DQQuantizer, "maybe_update_state_dict", spy)
    ours = PixArtTransformer2DModel.from_pretrained(root / folder, subfolder="transformer", **kw)
    modules = dict(ours.named_modules())
    assert left and not [n for n in left if isinstance(modules[n.rpartition(".")[0]], QuantModule)]
    assert len(left) < len(ours.state_dict()) / 4  # only the float model's own tensors went through diffusers' loop
    monkeypatch.setattr(DQQuantizer, "maybe_update_state_dict", lambda self, state_dict: state_dict)
    theirs = PixArtTransformer2DModel.from_pretrained(root / folder, subfolder="transformer", **kw)
    a, b = _loaded_tensors(ours), _loaded_tensors(theirs)
    assert a.keys() == b.keys()
    for name, (kind, t_dtype, grad, tensor) in a.items():
        assert (kind, t_dtype, grad) == b[name][:3], name
        assert tensor.device.type == "cpu" and torch.equal(tensor, b[name][3]), name
    pipe = DiffusionPipeline.from_pretrained(root / "dq_save", transformer=ours, **kw)
    np.testing.assert_array_equal(images(pipe), images(DiffusionPipeline.from_pretrained(root / "dq_save", transformer=theirs, **kw)))


def test_bulk_load_leaves_a_spread_device_map_to_diffusers(w8a8):
    """With a device map over several places the tensors go through diffusers' loop (it places
    each); with one device (or none) the quantizer places them."""
    quantizer = DQQuantizer(dq.DQConfig(recipe="w4a16", plan={}), pre_quantized=True)
    assert quantizer._bulk_device() == "cpu"
    quantizer.validate_environment(device_map={"": "cpu"})
    assert quantizer._bulk_device() == "cpu"
    quantizer.validate_environment(device_map={"transformer_blocks.0": "cpu", "proj_out": "disk"})
    assert quantizer._bulk_device() is None
    assert quantizer.maybe_update_state_dict({"x.qweight": torch.zeros(1)}) == {"x.qweight": torch.zeros(1)}


def test_loaded_model_shares_no_config_dict_with_its_quantizer(w8a8, tmp_path):
    """The hooks read the quantization config without copying its plan; what the model keeps
    (source, recipe) is its own, and the config is left as read (save_pretrained writes it back)."""
    from dq.provenance import SOURCE_ATTR

    root, _, reference = w8a8
    saved = json.loads((root / "dq_save" / "transformer" / "config.json").read_text())["quantization_config"]
    model = PixArtTransformer2DModel.from_pretrained(root / "dq_save", subfolder="transformer")
    config = model.hf_quantizer.quantization_config
    source = getattr(model, SOURCE_ATTR)
    assert source == config.source and source is not config.source
    assert config.plan == saved["plan"] and config.to_dict()["plan"] == saved["plan"]
    model.save_pretrained(tmp_path / "again")
    again = json.loads((tmp_path / "again" / "config.json").read_text())["quantization_config"]
    assert again["plan"] == saved["plan"] and again["recipe"] == saved["recipe"]
