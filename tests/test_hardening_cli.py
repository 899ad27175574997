"""Issue 12 items 4-5: bad input exits with status 2 and ONE line saying what to change (no
traceback), through the CLI and the Python API; the default output carries no third-party noise."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import pytest
import torch

import dq
from dq.cli import main
from dq.errors import DQError
from dq.logs import quiet_third_party
from dq.testing.tiny import tiny_pipeline

LOG_LINE = re.compile(r"^(DEBUG|INFO|WARNING) dq[.:]")


@pytest.fixture(scope="module")
def sd15_dir(tmp_path_factory) -> Path:
    """A full-precision tiny diffusers folder."""
    path = tmp_path_factory.mktemp("sd15")
    tiny_pipeline("sd15").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def quantized_dir(tmp_path_factory) -> Path:
    """A tiny pipeline quantized once per module and saved with dq.save: the source of the
    corrupted copies."""
    path = tmp_path_factory.mktemp("quantized") / "q"
    pipe = tiny_pipeline("sd15")
    dq.quantize(pipe, "w8a8-rtn", calib_prompts=["a cat", "a dog"], num_inference_steps=2)
    dq.save(pipe, path)
    return path


def _rewrite_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _truncate(path: Path, keep: int | None = None) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 if keep is None else keep])


def _first_plan_entry(config: dict) -> dict:
    plan = config["quantization_config"]["plan"]
    return plan[next(iter(plan))]


# name -> what to break in a copy of the quantized (or full-precision) folder
CORRUPTIONS = {
    "model_index_not_json": lambda d: (d / "model_index.json").write_text('{"unet": '),
    "model_index_a_list": lambda d: (d / "model_index.json").write_text("[1, 2]"),
    "denoiser_config_not_json": lambda d: (d / "unet" / "config.json").write_text("{not json"),
    "denoiser_config_a_list": lambda d: (d / "unet" / "config.json").write_text("[]"),
    "vae_config_not_json": lambda d: (d / "vae" / "config.json").write_text("{"),
    "denoiser_weights_truncated": lambda d: _truncate(d / "unet" / "diffusion_pytorch_model.safetensors"),
    "denoiser_weights_header_cut": lambda d: _truncate(d / "unet" / "diffusion_pytorch_model.safetensors", 5),
    "vae_weights_truncated": lambda d: _truncate(d / "vae" / "diffusion_pytorch_model.safetensors"),
    "text_encoder_truncated": lambda d: _truncate(next((d / "text_encoder").glob("*.safetensors"))),
    "plan_entry_mangled": lambda d: _rewrite_json(
        d / "unet" / "config.json", lambda c: _first_plan_entry(c).clear()
    ),
    "plan_layer_renamed": lambda d: _rewrite_json(
        d / "unet" / "config.json",
        lambda c: c["quantization_config"]["plan"].update({"no.such.layer": c["quantization_config"]["plan"].popitem()[1]}),
    ),
    "shape_mismatch": lambda d: _rewrite_json(
        d / "unet" / "config.json", lambda c: c.update(cross_attention_dim=2 * c["cross_attention_dim"])
    ),
}
EXPECTED_FILE = {
    "model_index_not_json": "model_index.json",
    "model_index_a_list": "model_index.json",
    "denoiser_config_not_json": "unet/config.json",
    "denoiser_config_a_list": "unet/config.json",
    "vae_config_not_json": "vae/config.json",
    "denoiser_weights_truncated": "unet/diffusion_pytorch_model.safetensors",
    "denoiser_weights_header_cut": "unet/diffusion_pytorch_model.safetensors",
    "vae_weights_truncated": "vae",
    "text_encoder_truncated": "text_encoder",
    "plan_entry_mangled": "do not fit together",
    "plan_layer_renamed": "do not fit together",
    "shape_mismatch": "do not fit together",
}


def _broken_copy(source: Path, name: str, tmp_path: Path) -> Path:
    target = tmp_path / f"broken-{name}"
    shutil.copytree(source, target)
    CORRUPTIONS[name](target)
    return target


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # main returns codes, but either is acceptable
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code, out: str, err: str, expected: str) -> None:
    assert code == 2, (code, out, err)
    assert "Traceback" not in err and "Traceback" not in out
    lines = [line for line in err.splitlines() if line.strip() and not LOG_LINE.match(line)]
    assert len(lines) == 1, err
    assert "error" in lines[0]
    assert expected in lines[0], (expected, lines[0])


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    regular = tmp_path / "a-file"
    regular.write_text("not a folder\n")
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    no_bool = tmp_path / "no-bool.json"
    no_bool.write_text(json.dumps({"base": "w8a8-rtn", "keep_defaults": "no"}))
    wrong_type = tmp_path / "wrong-type.yaml"
    wrong_type.write_text("base: w8a8-rtn\ncalib_steps: '20'\n")
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("base: w8a8-rtn\ncolour: blue\n")
    bad_spec = tmp_path / "bad-spec.yaml"
    bad_spec.write_text("weight: {bits: 8, symmetric: 'false'}\n")
    not_mapping = tmp_path / "list.yaml"
    not_mapping.write_text("- w8a8\n")
    return {
        "tmp": str(tmp_path),
        "file": str(regular),
        "empty": str(empty),
        "no_bool": str(no_bool),
        "wrong_type": str(wrong_type),
        "unknown": str(unknown),
        "bad_spec": str(bad_spec),
        "not_mapping": str(not_mapping),
    }


# (argv with {placeholders}, text the error line must contain)
CLI_CASES = [
    # numbers: 0 is an error, not "not given"
    (["quantize", "{model}", "--out", "{tmp}/o", "--steps", "0"], "--steps"),
    (["quantize", "{model}", "--out", "{tmp}/o", "--steps", "-3"], "positive integer"),
    (["quantize", "{model}", "--out", "{tmp}/o", "--steps", "2.5"], "--steps"),
    (["quantize", "{model}", "--out", "{tmp}/o", "--num-prompts", "0"], "--num-prompts"),
    (["generate", "{model}", "--prompt", "x", "--out", "{tmp}/x.png", "--steps", "0"], "--steps"),
    (["generate", "{model}", "--prompt", "x", "--out", "{tmp}/x.png", "--seed", "-1"], "--seed"),
    (["generate", "{model}", "--prompt", "x", "--out", "{tmp}/x.png", "--guidance-scale", "nan"], "--guidance-scale"),
    (["generate", "{model}", "--prompt", "  ", "--out", "{tmp}/x.png"], "--prompt"),
    (["eval", "{model}", "--steps", "0"], "--steps"),
    (["eval", "{model}", "--num-prompts", "0"], "--num-prompts"),
    (["eval", "{model}", "--batch-size", "0"], "--batch-size"),
    (["eval", "{model}", "--seed", "x"], "--seed"),
    (["eval", "{model}", "--text-encoders", "w4a4"], "weight-only"),
    (["quantize", "{model}", "--out", "{tmp}/o", "--dtype", "int3"], "dtype"),
    (["quantize", "{model}", "--out", "{tmp}/o", "--verbose", "--quiet"], "--quiet"),
    # unwritable outputs (tests run as root: a path under a regular file, or /proc)
    (["quantize", "{model}", "--out", "{file}/sub"], "is a file"),
    (["quantize", "{model}", "--out", "/proc/dq-test/out"], "cannot write"),
    (["quantize", "{model}", "--out", "{file}"], "is a file"),
    (["generate", "{model}", "--prompt", "x", "--out", "{file}/x.png"], "is a file"),
    (["eval", "{model}", "--json", "{file}/r.json"], "is a file"),
    # devices
    (["quantize", "{model}", "--out", "{tmp}/o", "--device", "nonsense"], "unknown --device"),
    (["generate", "{model}", "--prompt", "x", "--out", "{tmp}/x.png", "--device", "cuda:7"], "--device"),
    (["eval", "{model}", "--device", "nonsense"], "unknown --device"),
    # models and prompt files
    (["quantize", "{tmp}/missing-model", "--out", "{tmp}/o"], "no such folder"),
    (["quantize", "{file}", "--out", "{tmp}/o"], "is a file"),
    (["generate", "{tmp}", "--prompt", "x", "--out", "{tmp}/x.png"], "model_index.json"),
    (["eval", "{model}", "--reference", "{tmp}/missing-model"], "no such folder"),
    (["quantize", "{model}", "--out", "{tmp}/o", "--calib-prompts", "{tmp}/missing.txt"], "no prompt file"),
    (["quantize", "{model}", "--out", "{tmp}/o", "--calib-prompts", "{empty}"], "no prompts"),
    (["eval", "{model}", "--prompts", "{tmp}/missing.txt"], "no prompt file"),
    # recipes
    (["quantize", "{model}", "--out", "{tmp}/o", "--recipe", "{no_bool}"], "keep_defaults"),
    (["quantize", "{model}", "--out", "{tmp}/o", "--recipe", "{wrong_type}"], "calib_steps"),
    (["quantize", "{model}", "--out", "{tmp}/o", "--recipe", "{unknown}"], "colour"),
    (["quantize", "{model}", "--out", "{tmp}/o", "--recipe", "{bad_spec}"], "weight.symmetric"),
    (["quantize", "{model}", "--out", "{tmp}/o", "--recipe", "{not_mapping}"], "mapping"),
    (["quantize", "{model}", "--out", "{tmp}/o", "--recipe", "{tmp}/missing.yaml"], "cannot read recipe"),
]


@pytest.mark.parametrize(("argv", "expected"), CLI_CASES, ids=[" ".join(a[0:1] + a[2:]) for a, _ in CLI_CASES])
def test_cli_bad_input(argv, expected, sd15_dir, files, capsys):
    if "--device" in argv and "cuda:7" in argv and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    argv = [a.format(model=sd15_dir, **files) for a in argv]
    code, out, err = _run(argv, capsys)
    assert_one_line_error(code, out, err, expected)
    assert not (Path(files["tmp"]) / "o").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_cli_missing_cuda_names_alternatives(sd15_dir, tmp_path, capsys):
    code, out, err = _run(["quantize", str(sd15_dir), "--out", str(tmp_path / "o"), "--device", "cuda"], capsys)
    assert_one_line_error(code, out, err, "no CUDA device")
    assert "cpu" in err


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_cli_damaged_checkpoint(corruption, quantized_dir, tmp_path, capsys):
    broken = _broken_copy(quantized_dir, corruption, tmp_path)
    argv = ["generate", str(broken), "--prompt", "a cat", "--steps", "1", "--out", str(tmp_path / "x.png")]
    code, out, err = _run(argv, capsys)
    assert_one_line_error(code, out, err, EXPECTED_FILE[corruption])
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("corruption", ["model_index_not_json", "vae_config_not_json", "text_encoder_truncated"])
def test_cli_damaged_full_precision_folder(corruption, sd15_dir, tmp_path, capsys):
    broken = _broken_copy(sd15_dir, corruption, tmp_path)
    code, out, err = _run(["quantize", str(broken), "--out", str(tmp_path / "o"), "--steps", "1"], capsys)
    assert_one_line_error(code, out, err, EXPECTED_FILE[corruption])
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_load_damaged_checkpoint_never_loads(corruption, quantized_dir, tmp_path):
    """The Python API gives the same one DQError as the CLI, naming the damaged file."""
    broken = _broken_copy(quantized_dir, corruption, tmp_path)
    for load in (dq.load, dq.open_pipeline):
        with pytest.raises(dq.DQError) as info:
            load(broken)
        assert EXPECTED_FILE[corruption] in str(info.value) and "\n" not in str(info.value)


# (recipe mapping, text the DQError must contain: the field, and what was expected)
RECIPE_CASES = [
    ({"keep_defaults": "no"}, "keep_defaults must be true or false, got 'no'"),
    ({"keep_defaults": "false"}, "keep_defaults must be true or false"),
    ({"keep_defaults": 0}, "keep_defaults must be true or false"),
    ({"calib_steps": 2.0}, "calib_steps must be a positive integer, got 2.0"),
    ({"calib_steps": True}, "calib_steps must be a positive integer, got True"),
    ({"calib_steps": "20"}, "calib_steps must be a positive integer, got '20'"),
    ({"timestep_groups": 0}, "timestep_groups must be a positive integer"),
    ({"calib_seed": -1}, "calib_seed"),
    ({"calib_seed": 1.5}, "calib_seed must be an integer"),
    ({"name": 3}, "name must be a string"),
    ({"calib_prompts": ["a cat"]}, "calib_prompts must be a string"),
    ({"execution": ["real"]}, "execution must be a string"),
    ({"keep": [1]}, "keep must be a list of regular expressions"),
    ({"keep": ["("]}, "not a valid regular expression"),
    ({"keep": {"a": 1}}, "keep must be a list"),
    ({"overrides": {"pattern": "x"}}, "overrides must be a list"),
    ({"overrides": [{"pattern": 3}]}, "override pattern must be a string"),
    ({"overrides": [{"pattern": "x", "keep": "yes"}]}, "keep must be true or false"),
    ({"overrides": [{"pattern": "x", "weight": {"bits": "4"}}]}, "weight.bits must be an integer"),
    ({"weight": 8}, "recipe field weight must be a mapping"),
    ({"weight": {"symmetric": "false"}}, "weight.symmetric must be true or false"),
    ({"activation": {"dynamic": "no", "granularity": "tensor"}}, "activation.dynamic must be true or false"),
    ({"weight": {"percentile": "99"}}, "weight.percentile must be a number"),
    ({"weight": {"bits": 8.0}}, "weight.bits must be an integer"),
    ({"weight": {"colour": 1}}, "unknown quantizer option"),
    ({"smooth": "yes"}, "smooth must be null, true/false or a mapping"),
    ({"smooth": {"grid": 2.5}}, "smooth.grid must be an integer"),
    ({"smooth": {"aggregate": ["rms"]}}, "smooth.aggregate must be a string"),
    ({"gptq": {"act_order": "no"}}, "gptq.act_order must be true or false"),
    ({"lowrank": {"iters": True}}, "lowrank.iters must be an integer"),
    ({"rotate": {"block_size": "16"}}, "rotate.block_size must be an integer or null"),
    ({"attention": {"qkv": {"bits": "8"}}}, "attention.qkv.bits must be an integer"),
    ({"base": ["w8a8"]}, "base must be a string"),
    ({"format_version": "1"}, "format_version must be an integer"),
    ({"colour": "blue"}, "unknown recipe field"),
    ({1: 2}, "field names must be strings"),
]


@pytest.mark.parametrize(("data", "expected"), RECIPE_CASES, ids=[str(d) for d, _ in RECIPE_CASES])
def test_recipe_types(data, expected):
    with pytest.raises(DQError) as info:
        dq.Recipe.from_dict(data)
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


def test_recipe_real_booleans_still_work():
    recipe = dq.Recipe.from_dict({"keep_defaults": False, "gptq": {"act_order": True}, "weight": {"symmetric": False}})
    assert recipe.keep_defaults is False and recipe.gptq.act_order is True and recipe.weight.symmetric is False
    assert dq.Recipe.from_dict({"keep": "proj_out"}).keep == ["proj_out"]  # one pattern as a string


def test_quantize_api_refuses_zero_steps():
    pipe = tiny_pipeline("sd15")
    for steps in (0, -1, 2.0, True):
        with pytest.raises(DQError, match="num_inference_steps"):
            dq.quantize(pipe, "w8a8-rtn", calib_prompts=["a cat"], num_inference_steps=steps)
    assert not dq.engine.is_quantized(pipe.unet)


def test_unmatched_recipe_pattern_is_a_warning(caplog):
    from dq.engine import plan_layers

    model = tiny_pipeline("sd15").unet
    recipe = dq.Recipe.from_dict({"base": "w8a8-rtn", "keep": ["no_such_layer"], "overrides": [{"pattern": "attn2", "keep": True}, {"pattern": "nothing_here", "weight": {"bits": 4}}]})
    with caplog.at_level(logging.WARNING, logger="dq.engine"):
        plan = plan_layers(model, recipe)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert plan
    assert any("'no_such_layer'" in m and "keep" in m for m in warned), warned
    assert any("'nothing_here'" in m and "overrides" in m for m in warned), warned
    assert not any("'attn2'" in m for m in warned)


def test_quiet_third_party_drops_only_known_noise(capsys):
    import diffusers.utils.logging  # noqa: F401  (diffusers' handler writes to stderr)

    seen: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    handler = Collect()
    root = logging.getLogger("diffusers")
    root.addHandler(handler)
    try:
        noisy = logging.getLogger("diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha")
        with quiet_third_party():
            noisy.warning("Setting `clean_caption=True` requires the Beautiful Soup library but it was not found")
            noisy.warning("Setting `clean_caption` to False...")
            logging.getLogger("diffusers.pipelines.pipeline_utils").warning(
                "self.unet=None of type <class 'NoneType'> cannot be saved."
            )
            noisy.warning("something the user should see")
        noisy.warning("Setting `clean_caption` to False...")  # outside: shown again
    finally:
        root.removeHandler(handler)
    assert seen == ["something the user should see", "Setting `clean_caption` to False..."]
    assert not handler.filters


@pytest.fixture(scope="module")
def default_pipeline_runs(tmp_path_factory):
    """The README's quick start on the embedded default pipeline, once in the default mode and
    once with --quiet (stdout and stderr at the file-descriptor level)."""
    return tmp_path_factory.mktemp("default-runs")


def _quantize_default(out: Path, *extra: str) -> int:
    return main(["quantize", "--recipe", "w8a8-rtn", "--num-prompts", "2", "--steps", "2", "--out", str(out), *extra])


def test_default_run_has_no_third_party_noise(default_pipeline_runs, capfd):
    assert _quantize_default(default_pipeline_runs / "default") == 0
    out, err = capfd.readouterr()
    text = out + err
    assert "quantized with recipe 'w8a8-rtn'" in out
    for noise in ("beautifulsoup", "Beautiful Soup", "clean_caption", "cannot be saved", "torchao", "Traceback"):
        assert noise not in text, text
    assert "INFO dq.model: quantized" in err  # dq's own summary lines stay


def test_quiet_prints_only_the_result_line(default_pipeline_runs, capfd):
    assert _quantize_default(default_pipeline_runs / "quiet", "--quiet") == 0
    out, err = capfd.readouterr()
    lines = [line for line in (out + err).splitlines() if line.strip()]
    assert lines == [f"quantized with recipe 'w8a8-rtn' -> {default_pipeline_runs / 'quiet'}"], out + err
