"""A quantized model is a faithful object (deep copies, dtype at load, refused casts, device
moves), saves are transactional, and a dq folder remembers the model it was made from."""

import copy

import numpy as np
import pytest
import torch

import dq
from dq.cli import main
from dq.errors import DQError
from dq.nn import QuantModule
from dq.testing.tiny import default_call_kwargs, prompts_for, tiny_pipeline

KIND = "sd15"
STEPS = 4


def call_kwargs(steps=STEPS):
    return {**default_call_kwargs(KIND), "num_inference_steps": steps}


def draw(pipe, seed=0, steps=STEPS):
    generator = torch.Generator().manual_seed(seed)
    return pipe(prompt=prompts_for(KIND, 2), generator=generator, **call_kwargs(steps)).images


@pytest.fixture(scope="module")
def source_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("fp")
    tiny_pipeline(KIND).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def quantized(source_dir):
    """A pipeline quantized with static activations in two timestep groups."""
    pipe = dq.open_pipeline(source_dir)
    pipe.set_progress_bar_config(disable=True)
    kwargs = {k: v for k, v in call_kwargs().items() if k not in ("num_inference_steps", "output_type")}
    dq.quantize(pipe, dq.Recipe(timestep_groups=2, execution="sim"), calib_prompts=prompts_for(KIND, 2), num_inference_steps=STEPS, **kwargs)
    assert pipe.unet.dq_router.groups == 2
    return pipe


@pytest.fixture(scope="module")
def saved(quantized, tmp_path_factory):
    return dq.save(quantized, tmp_path_factory.mktemp("q") / "w8a8")


@pytest.fixture(scope="module")
def reference_images(saved):
    return draw(load(saved))


def load(path, **kwargs):
    pipe = dq.load(path, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def group_trace(model):
    """Record the router group of every call of ``model`` (a forward hook)."""
    seen = []
    model.register_forward_hook(lambda m, a, o: seen.append(int(m.dq_router.index)))
    return seen


# -- deep copies ---------------------------------------------------------------------------


def test_deepcopy_draws_the_same_images_and_routes_its_own_router(saved, reference_images):
    original = load(saved)
    clone = copy.deepcopy(original)
    routers = {id(m._router) for m in clone.unet.modules() if isinstance(m, QuantModule) and m._router is not None}
    assert routers == {id(clone.unet.dq_router)}
    assert clone.unet.dq_router is not original.unet.dq_router
    seen = group_trace(clone.unet)
    images = draw(clone)
    assert set(seen) == {0, 1}  # the copy's router follows the copy's timesteps
    assert int(original.unet.dq_router.index) == 0  # and the original's did not move
    np.testing.assert_array_equal(images, reference_images)
    np.testing.assert_array_equal(draw(original), reference_images)


def test_deepcopy_of_a_freshly_quantized_pipeline(quantized):
    clone = copy.deepcopy(quantized)
    quantized.unet.dq_router.index.fill_(0)
    seen = group_trace(clone.unet)
    images = draw(clone)
    assert set(seen) == {0, 1} and int(quantized.unet.dq_router.index) == 0
    np.testing.assert_array_equal(images, draw(quantized))


# -- dtype chosen at load ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_torch_dtype_at_load(saved, reference_images, dtype):
    pipe = load(saved, torch_dtype=dtype)
    unet = pipe.unet
    quantized = [m for m in unet.modules() if isinstance(m, QuantModule)]
    assert quantized and all(m.bias is None or m.bias.dtype == dtype for m in quantized)
    assert all(m.qweight.dtype == torch.int8 and m.wscale.dtype == torch.float32 for m in quantized)
    assert all(m.ascale.dtype == torch.float32 for m in quantized if getattr(m, "ascale", None) is not None)
    assert unet.conv_in.weight.dtype == dtype and unet.dq_router.boundaries.dtype == torch.float32
    assert pipe.vae.dtype == dtype and pipe.text_encoder.dtype == dtype
    # Rounding the inputs of static int8 activations to 16 bits moves some across a bin
    # boundary: measured max 0.057 / mean 0.010 (fp16 and bf16) on [0, 1] pixels, vs
    # 0.002 / 0.017 max for the unquantized pipeline in fp16 / bf16.
    error = np.abs(draw(pipe) - reference_images)
    assert error.max() < 0.12 and error.mean() < 0.02


def test_generate_cli_with_dtype(saved, tmp_path):
    out = tmp_path / "img.png"
    assert main(["generate", str(saved), "--prompt", "a cat", "--steps", "2", "--dtype", "fp16", "--out", str(out)]) == 0
    assert out.is_file()


def test_torch_dtype_must_be_a_float_dtype(saved):
    with pytest.raises(DQError, match="floating-point"):
        dq.load(saved, torch_dtype=torch.int8)


# -- dtype casts after load are refused; device moves work -----------------------------------


def _dtypes(pipe):
    return {name: {p.dtype for p in c.parameters()} for name, c in pipe.components.items() if isinstance(c, torch.nn.Module)}


CASTS = {
    "to(float16)": lambda m: m.to(torch.float16),
    "to(cpu, bfloat16)": lambda m: m.to("cpu", torch.bfloat16),
    "to(dtype=)": lambda m: m.to(dtype=torch.float16),
    "half()": lambda m: m.half(),
    "bfloat16()": lambda m: m.bfloat16(),
    "double()": lambda m: m.double(),
    "type(float16)": lambda m: m.type(torch.float16),
}


@pytest.mark.parametrize("cast", list(CASTS))
def test_dtype_cast_after_load_is_refused_and_changes_nothing(saved, cast):
    pipe = load(saved)
    before = _dtypes(pipe)
    with pytest.raises(DQError, match=r"dq\.load\(\.\.\., torch_dtype=\.\.\.\)"):
        CASTS[cast](pipe.unet)
    assert _dtypes(pipe) == before
    assert pipe.unet.float() is pipe.unet  # its own dtype: a no-op, allowed


def test_pipeline_dtype_cast_is_refused_before_any_component_changes(saved, quantized):
    from diffusers import DiffusionPipeline

    # dq.load, dq.quantize, and diffusers' own from_pretrained of a dq folder alike
    for pipe in (load(saved), quantized, DiffusionPipeline.from_pretrained(saved)):
        before = _dtypes(pipe)
        with pytest.raises(DQError, match="torch_dtype"):
            pipe.to(torch.float16)
        with pytest.raises(DQError, match="torch_dtype"):
            pipe.to("cpu", dtype=torch.bfloat16)
        assert _dtypes(pipe) == before


def test_float_on_a_half_model_is_refused(saved):
    pipe = load(saved, torch_dtype=torch.float16)
    with pytest.raises(DQError, match="torch_dtype"):
        pipe.unet.float()
    assert pipe.to(torch.float16) is not None  # its own dtype: allowed


def test_device_moves_keep_working_and_give_the_same_images(saved, reference_images):
    pipe = load(saved)
    assert pipe.unet.to("cpu") is pipe.unet
    assert pipe.unet.to(torch.device("cpu")) is pipe.unet
    pipe.to("cpu")
    np.testing.assert_array_equal(draw(pipe), reference_images)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_move_gives_the_same_images(saved, reference_images):
    pipe = load(saved)
    pipe.to("cuda")
    assert pipe.unet.dq_router.boundaries.device.type == "cuda"
    generator = torch.Generator("cuda").manual_seed(0)
    images = pipe(prompt=prompts_for(KIND, 2), generator=generator, **call_kwargs()).images
    # another device draws other noise: compare the pipeline with itself moved back
    pipe.to("cpu")
    np.testing.assert_array_equal(draw(pipe), reference_images)
    assert images.shape == reference_images.shape and np.isfinite(images).all()


# -- transactional saves -------------------------------------------------------------------


def _tree(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def _siblings(path):
    return sorted(p.name for p in path.parent.iterdir() if p.name != path.name)


@pytest.fixture
def target(saved, tmp_path):
    """An existing, complete dq folder (a copy of `saved`) to overwrite."""
    import shutil

    out = tmp_path / "out" / "model"
    shutil.copytree(saved, out)
    return out


class Boom(OSError):
    pass


def _fail_at(monkeypatch, module, name, at, *, always=False):
    """Make `module.name` raise Boom on its `at`-th call (and later calls when `always`)."""
    real = getattr(module, name)
    calls = []

    def patched(*args, **kwargs):
        calls.append(1)
        if len(calls) == at or (always and len(calls) > at):
            raise Boom(f"injected failure of {name} (call {len(calls)})")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, patched)
    return calls


STEPS_TO_FAIL = [
    ("json", 1), ("json", 2), ("save_file", 1), ("replace", 1), ("replace", 2),
]


@pytest.mark.parametrize(("step", "at"), STEPS_TO_FAIL)
@pytest.mark.parametrize("always", [False, True], ids=["once", "from-then-on"])
def test_failed_overwrite_leaves_the_old_folder(quantized, target, monkeypatch, step, at, always):
    import os

    import dq.io as io

    before = _tree(target)
    if step == "json":
        _fail_at(monkeypatch, io, "_write_json", at, always=always)
    elif step == "save_file":
        _fail_at(monkeypatch, io, "save_file", at, always=always)
    else:
        _fail_at(monkeypatch, os, "replace", at, always=always)
    with pytest.raises(Boom):
        dq.save(quantized, target, overwrite=True)
    monkeypatch.undo()
    # the old folder is in place, or the next dq call puts it back
    loaded = dq.load(target)
    assert _tree(target) == before and loaded.unet.dq_router.groups == 2
    dq.save(quantized, target, overwrite=True)  # cleans the failed save's leftovers
    assert _siblings(target) == []


def test_failed_first_save_leaves_nothing(quantized, tmp_path, monkeypatch):
    import os

    out = tmp_path / "fresh"
    _fail_at(monkeypatch, os, "replace", 1)
    with pytest.raises(Boom):
        dq.save(quantized, out)
    monkeypatch.undo()
    assert not out.exists() and list(tmp_path.iterdir()) == []


def _dead_pid():
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_interrupted_rename_is_restored_by_the_next_load(target, caplog):
    """Killed between the two renames: the target is missing, the old copy is beside it."""
    before = _tree(target)
    stranded = target.parent / f".{target.name}.old-{_dead_pid()}-abcd1234"
    target.rename(stranded)
    (target.parent / f".{target.name}.tmp-{_dead_pid()}-efgh5678").mkdir()  # the dead save's new copy
    with caplog.at_level("INFO", logger="dq.io"):
        dq.load(target)
    assert [r for r in caplog.records if "restored" in r.getMessage()].__len__() == 1
    assert _tree(target) == before and not stranded.exists()


def test_interrupted_rename_is_restored_by_open_pipeline_and_legacy_layout(target):
    before = _tree(target)
    legacy = target.parent / f".{target.name}.old.k2j4h5"  # dq before this change: `.NAME.old.XXXX/x`
    legacy.mkdir()
    target.rename(legacy / "x")
    dq.open_pipeline(target)
    assert _tree(target) == before and not legacy.exists()


def test_next_save_cleans_dead_leftovers_but_not_a_live_saves(quantized, target):
    import subprocess
    import sys

    dead_tmp = target.parent / f".{target.name}.tmp-{_dead_pid()}-aaaa1111"
    dead_old = target.parent / f".{target.name}.old-{_dead_pid()}-bbbb2222"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live_tmp = target.parent / f".{target.name}.tmp-{live.pid}-cccc3333"
        other = target.parent / f".other.tmp-{_dead_pid()}-dddd4444"  # another target's
        for folder in (dead_tmp, dead_old, live_tmp, other):
            folder.mkdir()
            (folder / "f").write_text("x")
        dq.save(quantized, target, overwrite=True)
        assert not dead_tmp.exists() and not dead_old.exists()
        assert live_tmp.exists() and other.exists()
    finally:
        live.kill()
        live.wait()


def test_overwrite_refuses_a_folder_with_other_files(quantized, target, tmp_path):
    (target / "notes.txt").write_text("mine")
    (target / "data").mkdir()
    with pytest.raises(DQError, match=r"notes\.txt") as err:
        dq.save(quantized, target, overwrite=True)
    assert "data" in str(err.value)
    assert (target / "notes.txt").read_text() == "mine"
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "photo.png").write_bytes(b"png")
    with pytest.raises(DQError, match=r"photo\.png"):
        dq.save(quantized, plain, overwrite=True)
    assert (plain / "photo.png").exists()
    (target / "notes.txt").unlink()
    (target / "data").rmdir()
    (target / "README.md").write_text("model card")
    dq.save(quantized, target, overwrite=True)  # a pipeline folder (README included) is replaced
    assert not (target / "README.md").exists()


# -- the source model is recorded, and is the default reference ---------------------------------


def test_the_folder_records_its_source(saved, source_dir):
    import json

    from dq.provenance import weights_sha256

    source = json.loads((saved / "unet" / "config.json").read_text())["quantization_config"]["source"]
    full = dq.open_pipeline(source_dir)
    assert source == {
        "model": str(source_dir.resolve()),
        "weights_sha256": weights_sha256(full.unet, torch.float32),
        "weights_dtype": "float32",
    }
    assert dq.load(saved).unet._dq_source == source  # kept through a load (and a re-save)


def _eval(argv, tmp_path, capsys):
    import json

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\na blue square\n")
    out = tmp_path / "r.json"
    code = main(["eval", *argv, "--prompts", str(prompts), "--steps", "2", "--json", str(out)])
    err = capsys.readouterr().err
    return code, (json.loads(out.read_text()) if code == 0 else None), err


def test_eval_without_reference_compares_with_the_source(saved, tmp_path, capsys):
    code, result, err = _eval([str(saved), "--metrics", "psnr"], tmp_path, capsys)
    assert code == 0, err
    assert result["metrics"]["psnr"] is not None and result["metrics"]["psnr"] > 10


def test_a_reference_with_other_weights_is_refused(saved, source_dir, tmp_path, capsys):
    from dq.provenance import open_reference

    other = tmp_path / "other"
    tiny_pipeline(KIND, seed=1).save_pretrained(other)  # same architecture, other weights
    code, _, err = _eval([str(saved), "--metrics", "psnr", "--reference", str(other)], tmp_path, capsys)
    assert code == 2 and "made from another model" in err
    loaded = dq.load(saved)
    with pytest.raises(DQError, match="made from another model"):
        open_reference(loaded, other)
    assert open_reference(loaded, source_dir).unet is not None
    with pytest.raises(DQError, match="itself quantized"):
        open_reference(loaded, saved)


def test_app_refuses_a_folder_made_from_other_weights(saved, tmp_path):
    import importlib
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    app = importlib.import_module("app")
    other = tmp_path / "other"
    tiny_pipeline(KIND, seed=1).save_pretrained(other)
    with pytest.raises(DQError, match="made from another model"):
        app.load_sides(str(other), quantized=str(saved))
