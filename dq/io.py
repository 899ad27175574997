"""Saving and loading quantized pipelines.

Layout: a diffusers pipeline folder. The quantized denoiser's subfolder holds the
diffusers `config.json` with an added `quantization_config` ({"quant_method": "dq",
"format_version", "recipe", "plan"}: the per-layer quantizer specs) and its state
dict, quantized codes included, in `diffusion_pytorch_model.safetensors`. That is
the shape diffusers' own quantization backends use: dq registers itself as one
(`dq.backend`), so plain `from_pretrained` reads it too, through the same
`install_shells` / `install_runtime` as `load_denoiser`. Everything is written to a
temporary folder beside the target and moved into place at the end.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .engine import DENOISER_NAMES, find_denoiser, is_quantized
from .errors import DQError, one_line
from .kernels import set_execution
from .nn.attention import quantize_attention
from .nn.dtype_guard import install_dtype_guard
from .nn.layers import _STORAGE_BUFFERS, QuantModule, shell_from_plan
from .nn.router import TimestepRouter, attach_router
from .paths import default_model_dir
from .provenance import EMBEDDED_DEFAULT, SOURCE_NAME_ATTR
from .recipe import FORMAT_VERSION, Recipe, check_format_version
from .state import mark_quantized, state

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
QUANT_METHOD = "dq"


def quantization_config(model: nn.Module) -> dict[str, Any]:
    st = state(model)
    if st is None:
        raise DQError(f"{type(model).__name__} is not quantized by dq; nothing to describe")
    return {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "recipe": st.recipe.to_dict() if st.recipe else None,
        "timestep_groups": st.timestep_groups,
        "source": st.source,  # the full-precision model it was made from (dq.provenance)
        "plan": st.plan,
    }


def save_denoiser(model: nn.Module, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_config(folder)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"] = quantization_config(model)
    _write_json(config_path, config)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, folder / WEIGHTS_NAME, metadata={"format": "pt", "dq_format_version": str(FORMAT_VERSION)})


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True))


# -- transactional saves ----------------------------------------------------------------------
# A save writes `.NAME.tmp-PID-XXXX` beside the target; replacing a folder first moves it to
# `.NAME.old-PID-XXXX`. The PID tells a live save's folders from a killed one's: the next
# save cleans up the dead ones, and any dq.load/dq.save/open_pipeline of a target that is
# missing while a dead save's `old` copy is there moves it back (one log line).
_SCRATCH = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-[^./]+$")
_LEGACY_OLD = re.compile(r"^\.(?P<name>.+)\.old\.[^./]+$")  # dq < 0.2: `.NAME.old.XXXX/x`
_ACTIVE: set[Path] = set()  # this process's live scratch folders
PIPELINE_EXTRAS = ("README.md", ".gitattributes")


def _scratch(out_dir: Path, kind: str, *, create: bool) -> Path:
    path = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.{kind}-{os.getpid()}-", dir=out_dir.parent))
    if not create:
        path.rmdir()  # a fresh name to rename the old folder to
    _ACTIVE.add(path)
    return path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def _dead_scratch(out_dir: Path) -> list[tuple[Path, str]]:
    """(folder, "tmp"/"old") of the saves to `out_dir` that are no longer running."""
    found = []
    if not out_dir.parent.is_dir():
        return found
    for path in out_dir.parent.iterdir():
        match = _SCRATCH.match(path.name)
        if match and match["name"] == out_dir.name and path.is_dir():
            pid = int(match["pid"])
            live = path in _ACTIVE if pid == os.getpid() else _pid_alive(pid)
            if not live:
                found.append((path, match["kind"]))
        legacy = _LEGACY_OLD.match(path.name)
        if legacy and legacy["name"] == out_dir.name and (path / "x").is_dir():
            found.append((path / "x", "old"))
    return found


def recover(out_dir: str | Path) -> bool:
    """Put back the folder an interrupted save to `out_dir` had moved aside (the target is
    missing and a dead save's old copy is beside it). True if it did."""
    out_dir = Path(out_dir)
    if out_dir.exists() or out_dir.is_symlink():
        return False
    olds = [p for p, kind in _dead_scratch(out_dir) if kind == "old"]
    if not olds:
        return False
    stranded = max(olds, key=lambda p: p.stat().st_mtime)
    os.replace(stranded, out_dir)
    if stranded.name == "x":  # legacy layout: remove the emptied wrapper
        shutil.rmtree(stranded.parent, ignore_errors=True)
    logger.warning("restored %s from %s, left there by an interrupted dq save", out_dir, stranded.name)
    return True


def _clean_dead_scratch(out_dir: Path) -> None:
    for path, _kind in _dead_scratch(out_dir):
        target = path.parent if path.name == "x" else path
        logger.info("removing %s, left by an interrupted dq save", target)
        shutil.rmtree(target, ignore_errors=True)


def _check_replaceable(out_dir: Path) -> None:
    """Refuse to replace a folder that holds anything but a pipeline folder's files."""
    names = {p.name for p in out_dir.iterdir()}
    allowed = set(PIPELINE_EXTRAS)
    index_path = out_dir / "model_index.json"
    if index_path.is_file():
        allowed.add(index_path.name)
        try:
            index = json.loads(index_path.read_text())
        except (OSError, ValueError):
            index = {}
        allowed.update(k for k in index if not k.startswith("_") and (out_dir / k).is_dir())
    unexpected = sorted(names - allowed)
    if unexpected:
        shown = ", ".join(unexpected[:10]) + (f" and {len(unexpected) - 10} more" if len(unexpected) > 10 else "")
        raise DQError(
            f"{out_dir} holds files that are not part of a pipeline folder ({shown}); overwrite=True "
            "(--overwrite) only replaces a pipeline folder: move those files away or choose another folder"
        )


def save(pipe, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Write a quantized pipeline to `out_dir` (a diffusers folder; safetensors only).

    Transactional: everything is written to a temporary folder beside the target and moved
    into place at the end; whatever fails (or wherever the process is killed), `out_dir` holds
    the old or the new complete folder, or one that the next dq call on it restores.
    overwrite=True replaces an existing pipeline folder only (never other files).
    """
    out_dir = Path(out_dir)
    name, model = find_denoiser(pipe)
    if not is_quantized(model):
        raise DQError("the pipeline is not quantized; call dq.quantize(pipe, recipe) first")
    from .text_encoders import check_savable

    check_savable(pipe)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    recover(out_dir)
    _clean_dead_scratch(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise DQError(f"{out_dir} exists and is not a folder; choose another folder")
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise DQError(f"{out_dir} exists and is not empty; choose another folder or pass overwrite=True (--overwrite)")
        _check_replaceable(out_dir)
    tmp = _scratch(out_dir, "tmp", create=True)
    old: Path | None = None
    try:
        pipe.register_modules(**{name: None})
        try:
            pipe.save_pretrained(tmp, safe_serialization=True)
        finally:
            pipe.register_modules(**{name: model})
        index_path = tmp / "model_index.json"
        index = json.loads(index_path.read_text())
        index[name] = [type(model).__module__.split(".")[0], type(model).__name__]
        _write_json(index_path, index)
        save_denoiser(model, tmp / name)
        if out_dir.exists():
            old = _scratch(out_dir, "old", create=False)
            os.replace(out_dir, old)
            try:
                os.replace(tmp, out_dir)
            except BaseException:
                _put_back(old, out_dir)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        _ACTIVE.discard(tmp)
        if old is not None:
            _ACTIVE.discard(old)
    logger.info("saved quantized pipeline to %s", out_dir)
    return out_dir


def _put_back(old: Path, out_dir: Path) -> None:
    try:
        os.replace(old, out_dir)
    except OSError as exc:
        logger.error(
            "could not move %s back to %s (%s); the next dq.load/dq.save of %s restores it", old, out_dir, exc, out_dir
        )


def _dq_component(path: Path) -> tuple[str, dict[str, Any]] | None:
    index_path = path / "model_index.json"
    if not index_path.exists():
        return None
    for name in json.loads(index_path.read_text()):
        config_path = path / name / "config.json"
        if config_path.is_file():
            config = json.loads(config_path.read_text())
            if config.get("quantization_config", {}).get("quant_method") == QUANT_METHOD:
                return name, config
    return None


def is_dq_folder(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and _dq_component(path) is not None


def check_quantization_config(qc: Any, where: str) -> None:
    """Refuse a dq `quantization_config` this dq cannot rebuild (`where`: the file it is read from)."""
    if not isinstance(qc, dict):
        raise DQError(f"{where}: quantization_config must be a mapping, got {type(qc).__name__}; the file is damaged")
    check_format_version(qc.get("format_version", 0), where)
    if not isinstance(qc.get("plan"), dict):
        raise DQError(
            f"{where}: quantization_config.plan is missing or not a mapping of layer names; the folder is not a "
            "complete dq checkpoint: save it again with dq.save or pipe.save_pretrained after dq.quantize"
        )


def install_shells(model: nn.Module, qc: dict[str, Any], where: str) -> dict[str, QuantModule]:
    """Swap the layers named in a dq `quantization_config` plan for empty quantized shells (on the
    meta device; the state dict fills them) and attach the timestep router they read."""
    from .engine import swap_modules

    check_quantization_config(qc, where)
    names = dict(model.named_modules())
    missing = [name for name in qc["plan"] if not isinstance(names.get(name), (nn.Linear, nn.Conv2d))]
    if missing:
        raise DQError(
            f"{where}: quantization_config.plan names layers that {type(model).__name__} does not have as "
            f"Linear/Conv2d: {missing[:5]}; the plan and the model config do not fit together (the folder "
            "was edited or mixed with another model's config): save the quantized pipeline again"
        )
    replacements = {}
    specs: dict[str, tuple] = {}  # each distinct weight/activation spec parsed once, not per layer
    for name, entry in qc["plan"].items():
        layer = names[name]
        # on the meta device, nothing allocated: the state dict fills the shells
        replacements[name] = shell_from_plan(entry, tuple(layer.weight.shape), layer.bias is not None, specs, "meta")
    swap_modules(model, replacements)
    router = TimestepRouter(groups=int(qc.get("timestep_groups") or 1))
    attach_router(model, router)
    for module in replacements.values():
        module.bind_router(router)
    return replacements


def install_runtime(
    model: nn.Module, qc: dict[str, Any], execution: str | None = None, torch_dtype: torch.dtype | None = None,
    *, eval_mode: bool = True,
) -> nn.Module:
    """What a loaded quantized denoiser needs beside its tensors: provenance, the recipe's
    attention quantization, the execution mode and the dtype guard. Shared by `dq.load` and
    diffusers' `from_pretrained` (`dq.backend.DQQuantizer`). ``torch_dtype``: the dtype of the
    float parts (`cast_float_parts`; non-persistent float buffers included). ``eval_mode``:
    False leaves ``model.eval()`` to the caller (diffusers' ``from_pretrained`` calls it right
    after the quantizer's hook; a walk over every module)."""
    if torch_dtype is not None:
        cast_float_parts(model, torch_dtype)
    recipe = Recipe.from_dict(qc["recipe"]) if qc.get("recipe") else None
    mark_quantized(model, recipe, qc.get("source"))
    if recipe is not None and recipe.attention is not None:
        # attention processors hold no tensors: the recipe alone reinstalls them
        quantize_attention(model, recipe.attention)
    # The execution mode is not stored in the tensors: restore the recipe's (or the caller's).
    if execution is None:
        execution = recipe.execution if recipe is not None else "auto"
    set_execution(model, execution)
    install_dtype_guard(model, torch_dtype)  # later casts are refused: the dtype is chosen here
    return model.eval() if eval_mode else model


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The state dict in `folder`: one safetensors file, or the shards of a sharded
    ``save_pretrained(max_shard_size=...)`` (listed by its index file)."""
    weights = folder / WEIGHTS_NAME
    if weights.is_file():
        return load_file(weights)
    index_path = folder / (WEIGHTS_NAME + ".index.json")
    if not index_path.is_file():
        raise DQError(f"{weights} is missing (and no {index_path.name}); the folder is not a complete dq checkpoint")
    try:
        files = sorted(set(json.loads(index_path.read_text())["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DQError(f"{index_path} is not a valid shard index ({exc}); save the pipeline again") from exc
    state: dict[str, torch.Tensor] = {}
    for name in files:
        if not isinstance(name, str) or Path(name).name != name or not (folder / name).is_file():
            raise DQError(f"{index_path} lists shard {name!r}, which is not a file of {folder}; save the pipeline again")
        state.update(load_file(folder / name))
    return state


def load_denoiser(
    folder: Path, config: dict[str, Any], execution: str | None = None, torch_dtype: torch.dtype | None = None
) -> nn.Module:
    """The quantized denoiser of a dq folder; ``torch_dtype``: the dtype of its float parts (bias,
    kept layers, transforms, branches; the quantized storage keeps its own dtypes)."""
    import diffusers
    from accelerate import init_empty_weights

    from .backend import attach_quantizer

    qc = config["quantization_config"]
    check_quantization_config(qc, str(folder / "config.json"))
    cls = getattr(diffusers, config["_class_name"], None)
    if cls is None:
        raise DQError(f"diffusers has no model class {config['_class_name']!r}; upgrade diffusers")
    plain = {k: v for k, v in config.items() if k != "quantization_config"}
    with init_empty_weights(include_buffers=False):
        model = cls.from_config(plain)
    install_shells(model, qc, str(folder / "config.json"))
    missing, unexpected = model.load_state_dict(read_weights(folder), strict=False, assign=True)
    if missing or unexpected:
        raise DQError(
            f"the weights in {folder} do not match its config.json plan: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}; save the pipeline again"
        )
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise DQError(f"{folder}: tensors not restored from the checkpoint: {leftover[:5]}")
    install_runtime(model, qc, execution, torch_dtype)
    attach_quantizer(model)  # `save_pretrained` writes the quantization_config (dq.backend)
    return model


def cast_float_parts(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast a freshly loaded quantized denoiser's float parts to ``dtype``, as diffusers'
    ``from_pretrained(torch_dtype=...)`` does: QuantModule keeps its storage buffers' dtypes,
    the router its float32 boundaries, and float16 spares the class's `_keep_in_fp32_modules`."""
    def convert(t: torch.Tensor) -> torch.Tensor:  # what nn.Module.to(dtype) does to each tensor
        return t.to(dtype) if t.is_floating_point() or t.is_complex() else t

    # nn.Module.to(model, dtype), applied only to the modules holding a float tensor of another
    # dtype (diffusers' from_pretrained already loaded most of them in `dtype`): the same result
    # without walking every tensor of every module through `_apply`. QuantModule's storage
    # buffers and the router keep their dtypes through their own `_apply` (never counted here).
    for module in model.modules():
        if not module._parameters and not module._buffers:
            continue  # most modules hold no tensor of their own (containers, activations, norms without affine)
        if isinstance(module, TimestepRouter):
            tensors = [t for n, t in module._buffers.items() if n != "boundaries"]
        elif isinstance(module, QuantModule):
            tensors = [t for n, t in module._buffers.items() if n not in _STORAGE_BUFFERS]
        else:
            tensors = list(module._buffers.values())
        tensors += module._parameters.values()
        if any(t is not None and t.dtype != dtype and (t.is_floating_point() or t.is_complex()) for t in tensors):
            module._apply(convert, recurse=False)
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    if dtype == torch.float16 and keep:
        for name, module in model.named_modules():
            if any(k in name.split(".") for k in keep):
                nn.Module.to(module, torch.float32)


# What a damaged pipeline folder raises while it is read (bad JSON, a truncated safetensors file,
# a plan that does not fit the weights); `checkpoint_errors` turns them into one DQError.
_LOAD_ERRORS = (json.JSONDecodeError, UnicodeDecodeError, OSError, KeyError, AttributeError, TypeError, RuntimeError)


def _damaged_file(folder: Path) -> tuple[Path, str] | None:
    """The first JSON or safetensors file of a pipeline folder that does not parse, and why."""
    from safetensors import safe_open

    for path in [folder / "model_index.json", *sorted(folder.glob("*/*.json"))]:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            return path, f"not valid JSON ({exc})"
        if not isinstance(data, dict) and path.name in ("model_index.json", "config.json"):
            return path, f"holds a JSON {type(data).__name__}, not an object"
    for path in sorted(folder.glob("*/*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as f:
                f.keys()
        except Exception as exc:  # noqa: BLE001 - any failure to read the header means damage
            return path, f"not a readable safetensors file ({exc})"
    return None


@contextlib.contextmanager
def checkpoint_errors(model: str | Path | None) -> Iterator[None]:
    """Re-raise what a damaged pipeline folder makes loading raise as one DQError naming the
    damaged file (or saying that its files do not fit together)."""
    from safetensors import SafetensorError

    try:
        yield
    except (*_LOAD_ERRORS, SafetensorError) as exc:
        folder = Path(model).expanduser() if model is not None else Path(default_model_dir())
        if not folder.is_dir():  # a hub id: nothing local to point at
            raise DQError(f"cannot load pipeline {str(model)!r}: {one_line(exc, 300)}") from exc
        damaged = _damaged_file(folder)
        if damaged is not None:
            raise DQError(
                f"cannot load pipeline {str(folder)!r}: {damaged[0]} is damaged: {one_line(Exception(damaged[1]), 300)}; "
                "re-save or re-download the pipeline"
            ) from exc
        raise DQError(
            f"cannot load pipeline {str(folder)!r}: its files do not fit together "
            f"({type(exc).__name__}: {one_line(exc, 300)}); the quantization plan in the denoiser's config.json "
            "and its weights must come from the same `dq quantize` run: re-save it"
        ) from exc


def load(
    path: str | Path,
    *,
    torch_dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    execution: str | None = None,
    text_encoders: str | None = None,
):
    """Load a pipeline saved by `dq.save` / `dq quantize --out`; a damaged folder is a DQError
    naming the damaged file.

    text_encoders: a weight-only recipe ("w8a16", "w4a16") to quantize the text encoders with
    after loading (`dq.text_encoders`; they are never saved quantized).

    torch_dtype: the dtype of every float part, the quantized denoiser's included (its bias,
    kept layers, transforms, branches; codes and scales keep their storage dtypes). Choose it
    here: a quantized denoiser refuses later dtype casts (`model.half()`, `pipe.to(dtype)`).

    execution: "real", "auto" or "sim" (see `dq.kernels.set_execution`); default: the
    saved recipe's.
    """
    with checkpoint_errors(path):
        pipe = _load(Path(path), torch_dtype=torch_dtype, device=device, execution=execution)
    if text_encoders is not None:
        from .text_encoders import quantize_text_encoders

        quantize_text_encoders(pipe, text_encoders)
    return pipe


def _load(path: Path, *, torch_dtype, device, execution):
    from diffusers import DiffusionPipeline

    recover(path)
    if torch_dtype is not None and not (isinstance(torch_dtype, torch.dtype) and torch_dtype.is_floating_point):
        raise DQError(f"torch_dtype must be a floating-point torch dtype (torch.float16, torch.bfloat16...), got {torch_dtype!r}")
    found = _dq_component(path) if path.is_dir() else None
    if found is None:
        raise DQError(f"{path} is not a dq-quantized pipeline folder (no component with quant_method 'dq')")
    name, config = found
    model = load_denoiser(path / name, config, execution, torch_dtype)
    kwargs = {name: model}
    if torch_dtype is not None:
        kwargs["torch_dtype"] = torch_dtype
    pipe = DiffusionPipeline.from_pretrained(path, **kwargs)
    if device is not None:
        pipe.to(device)
    return pipe


def open_pipeline(model: str | Path | None = None, *, torch_dtype: torch.dtype | None = None, device=None):
    """A pipeline from a hub id, a local diffusers folder, a dq folder, or None (the embedded
    default); a damaged folder is a DQError naming the damaged file."""
    with checkpoint_errors(model):
        return _open_pipeline(model, torch_dtype=torch_dtype, device=device)


def _open_pipeline(model: str | Path | None, *, torch_dtype, device):
    from diffusers import DiffusionPipeline

    source_name = EMBEDDED_DEFAULT if model is None else str(model)
    if model is not None and Path(model).exists():
        source_name = str(Path(model).resolve())
    if model is None:
        model = default_model_dir()
        if not (Path(model) / "model_index.json").exists():
            raise DQError(
                f"the embedded default pipeline is missing at {model}; retrain it with "
                "`python -m dq_pipelines.default.train` (see pipelines/default/README.md)"
            )
    if isinstance(model, (str, Path)) and not Path(model).exists() and Path(model).parent.is_dir():
        recover(model)  # a dq folder whose save was interrupted
    if is_dq_folder(model):
        return load(model, torch_dtype=torch_dtype, device=device)
    kwargs = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
    try:
        pipe = DiffusionPipeline.from_pretrained(str(model), **kwargs)
    except (OSError, ValueError) as exc:
        raise DQError(f"cannot load pipeline {str(model)!r}: {exc}") from exc
    for component in pipe.components.values():
        if isinstance(component, nn.Module):
            component.eval()
    denoiser = next((getattr(pipe, n, None) for n in DENOISER_NAMES if isinstance(getattr(pipe, n, None), nn.Module)), None)
    if denoiser is not None:
        setattr(denoiser, SOURCE_NAME_ATTR, source_name)  # recorded by dq.quantize (dq.provenance)
    if device is not None:
        pipe.to(device)
    return pipe
