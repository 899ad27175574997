"""dq as a diffusers quantization backend: `DQConfig` and `DQQuantizer`.

Importing dq registers the backend under ``quant_method: "dq"`` in diffusers'
``AUTO_QUANTIZER_MAPPING`` / ``AUTO_QUANTIZATION_CONFIG_MAPPING``, so that after
``import dq``:

- ``DiffusionPipeline.from_pretrained(dq_folder)`` and ``ModelClass.from_pretrained(dq_folder,
  subfolder="transformer")`` rebuild a denoiser saved by ``dq.save`` (or by
  ``pipe.save_pretrained`` after ``dq.quantize``) without calibrating: empty quantized shells
  from the saved plan, then diffusers loads the state dict (codes included), then the router,
  execution mode and dtype guard are installed as ``dq.load`` does (``dq.io.install_runtime``);
- ``from_pretrained(float_folder, quantization_config=dq.DQConfig(recipe="w4a16"))`` (or a
  ``PipelineQuantizationConfig(quant_mapping={"transformer": dq.DQConfig(...)})``) quantizes at
  load, for recipes that need no calibration statistics (weight-only, or dynamic activations
  without smoothing/GPTQ); the others are refused with the way to do it (``dq.quantize``);
- ``pipe.save_pretrained(folder)`` after ``dq.quantize``/``dq.load`` writes such a folder: both
  attach a `DQConfig` to the denoiser (``config.quantization_config`` and ``hf_quantizer``), as
  diffusers does after a quantized ``from_pretrained``.

A dq-quantized denoiser behaves as diffusers' own quantized models do (`install_model_methods`):
``num_parameters()`` counts the quantized weights as the parameters they stand for,
``get_memory_footprint()`` also counts the kernels' runtime weight copies, ``dequantize()``
gives back plain layers (`dq.dequantize`), ``fuse_lora`` is refused (the LoRA would have to be
requantized) and a LoRA naming layers the model does not have is refused by name.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import re
import types
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .logs import quiet_third_party

with quiet_third_party():  # diffusers' quantizers import torchao, which logs known noise (dq.logs.NOISE)
    from diffusers.quantizers import auto as _auto
    from diffusers.quantizers.base import DiffusersQuantizer
    from diffusers.quantizers.quantization_config import QuantizationConfigMixin

from .errors import DQError
from .nn.dtype_guard import guard_pipelines
from .nn.layers import _STORAGE_BUFFERS, QuantModule
from .nn.lora import has_static_ranges, lora_target_names, merge_with_branches
from .nn.router import ROUTER_NAME, TimestepRouter
from .recipe import FORMAT_VERSION, Recipe, check_format_version, recipes

logger = logging.getLogger(__name__)

QUANT_METHOD = "dq"
_CALIBRATE_WAY = (
    "write its calibration statistics first (`dq calibrate MODEL --recipe R --stats-out stats.safetensors`, or "
    "cal.save_stats(...) after dq.prepare) and pass DQConfig(recipe=R, stats=\"stats.safetensors\"); or quantize "
    "with dq.quantize(pipe, recipe) and save (dq.save(pipe, DIR) or pipe.save_pretrained(DIR)), then "
    "from_pretrained the saved folder (after `import dq`)"
)


class DQMethod(str, Enum):
    """`quant_method` of a `DQConfig`: a str equal to "dq" with ``.value == "dq"`` (diffusers reads
    ``config.quant_method.value``). The member is named like its value so that it also hashes
    like the string "dq" (diffusers looks it up in its quantizer mappings)."""

    dq = QUANT_METHOD


def _recipe_dict(recipe: Any) -> dict[str, Any]:
    if isinstance(recipe, str) and not Path(recipe).suffix and recipe not in recipes():
        raise DQError(
            f"DQConfig: unknown recipe {recipe!r}; pass a preset name from dq.recipes() ({', '.join(recipes())}), "
            "a recipe mapping, a dq.Recipe or a .yaml/.json recipe file"
        )
    try:
        return Recipe.from_any(recipe).to_dict()
    except DQError as exc:
        raise DQError(f"DQConfig: recipe: {exc}") from exc


class DQConfig(QuantizationConfigMixin):
    """Quantization config of the dq backend for diffusers' ``from_pretrained``.

    recipe: a preset name (``dq.recipes()``), a mapping, a ``dq.Recipe`` or a .yaml/.json file;
        stored as its dict. At load (``quantization_config=DQConfig(...)``) only recipes that
        need no calibration are accepted (e.g. "w4a16").
    modules_to_not_convert: layer names or regexes to keep in full precision, added to the
        recipe's ``keep``.
    stats: a calibration statistics file (``dq calibrate ... --stats-out FILE`` or
        ``Calibration.save_stats``) for recipes with static activation ranges, smoothing or
        GPTQ: they are quantized at load from it, exactly as ``dq.quantize`` would from the same
        statistics. Not needed (and not stored) once the model is quantized.

    A saved dq folder's ``quantization_config`` has the same shape plus what the quantization
    made: ``format_version``, ``plan`` (the quantizer of each layer), ``timestep_groups`` and
    ``source`` (provenance); diffusers builds this config from it with ``DQConfig(**config)``.
    Unknown keys (from a later dq) are kept and written back.
    """

    def __init__(
        self,
        recipe: str | dict[str, Any] | Recipe | None = None,
        modules_to_not_convert: list[str] | None = None,
        *,
        quant_method: str = QUANT_METHOD,
        format_version: int = FORMAT_VERSION,
        plan: dict[str, dict[str, Any]] | None = None,
        timestep_groups: int | None = None,
        source: dict[str, Any] | None = None,
        stats: str | Path | None = None,
        **kwargs: Any,
    ) -> None:
        if quant_method != QUANT_METHOD:
            raise DQError(f"DQConfig: quant_method must be {QUANT_METHOD!r}, got {quant_method!r}")
        self.quant_method = DQMethod.dq
        check_format_version(format_version, "DQConfig (the model's config.json)")
        self.format_version = format_version
        if plan is not None and not isinstance(plan, dict):
            raise DQError(f"DQConfig: quantization_config.plan must be a mapping of layer names, got {type(plan).__name__}")
        if modules_to_not_convert is None:
            modules_to_not_convert = []
        if isinstance(modules_to_not_convert, str) or not all(isinstance(m, str) for m in modules_to_not_convert):
            raise DQError(
                f"DQConfig: modules_to_not_convert must be a list of layer names or regexes, got {modules_to_not_convert!r}"
            )
        for pattern in modules_to_not_convert:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise DQError(f"DQConfig: modules_to_not_convert entry {pattern!r} is not a valid regex ({exc})") from exc
        self.modules_to_not_convert = list(modules_to_not_convert)
        if recipe is None and plan is None:
            raise DQError('DQConfig needs a recipe: DQConfig(recipe="w4a16") (a preset name from dq.recipes(), a mapping or a dq.Recipe)')
        if recipe is not None:
            recipe = _recipe_dict(recipe)
            keep = list(recipe.get("keep") or [])
            added = [m for m in self.modules_to_not_convert if m not in keep]
            if added:
                recipe["keep"] = keep + added
        self.recipe = recipe
        self.plan = plan
        self.timestep_groups = timestep_groups
        self.source = source
        if stats is not None and not isinstance(stats, (str, Path)):
            raise DQError(f"DQConfig: stats must be the path of a dq statistics file, got {type(stats).__name__}")
        if stats is not None and plan is None:
            self.stats = str(stats)
        for key, value in kwargs.items():
            if key.startswith("_") or hasattr(type(self), key):
                raise DQError(f"DQConfig: quantization_config key {key!r} is not a config field; remove it from config.json")
            logger.debug("DQConfig: keeping unknown quantization_config key %r", key)
            setattr(self, key, value)

    @property
    def pre_quantized(self) -> bool:
        """Whether this config describes a quantized checkpoint (it has a plan)."""
        return self.plan is not None

    def recipe_object(self) -> Recipe | None:
        return Recipe.from_dict(self.recipe) if self.recipe is not None else None

    @classmethod
    def from_model(cls, model: nn.Module) -> DQConfig:
        """The config of a dq-quantized denoiser, as `dq.save` writes it."""
        from .io import quantization_config

        return cls(**quantization_config(model))

    def to_dict(self) -> dict[str, Any]:
        fields = {k: v for k, v in self.__dict__.items() if not k.startswith("_") and k != "quant_method"}
        try:  # a JSON round trip copies a large plan several times faster than deepcopy (read at each load)
            out = json.loads(json.dumps(fields))
        except (TypeError, ValueError):  # a value JSON cannot hold (set by hand): copied as is
            out = copy.deepcopy(fields)
        out["quant_method"] = QUANT_METHOD  # a plain string in JSON
        if not out.get("modules_to_not_convert"):
            out.pop("modules_to_not_convert", None)  # as dq.save writes it
        return out

    def to_diff_dict(self) -> dict[str, Any]:
        """`to_dict` without the keys left at their defaults (what diffusers' repr shows)."""
        defaults = {"modules_to_not_convert": [], "format_version": FORMAT_VERSION, "plan": None,
                    "timestep_groups": None, "source": None, "stats": None}
        return {k: v for k, v in self.to_dict().items() if k not in defaults or v != defaults[k]}

    def __repr__(self) -> str:
        """Short: diffusers formats the model config (this included) on every config update, even
        with debug logging off, and the full JSON of a large model's plan costs a load ~0.1 s each."""
        recipe = self.recipe.get("name", "custom") if isinstance(self.recipe, dict) else self.recipe
        planned = f", {len(self.plan)} quantized layers" if self.plan is not None else ""
        return f"DQConfig(recipe={recipe!r}{planned}; to_json_string() for all)"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DQConfig) and self.to_dict() == other.to_dict()

    __hash__ = None  # mutable, compared by value


class DQQuantizer(DiffusersQuantizer):
    """diffusers' hook into ``from_pretrained`` for ``quant_method: "dq"`` (see the module doc)."""

    requires_calibration = False
    required_packages = None
    use_keep_in_fp32_modules = True  # as dq.load: float16 spares the class's `_keep_in_fp32_modules`

    def __init__(self, quantization_config: DQConfig, **kwargs: Any) -> None:
        if not isinstance(quantization_config, DQConfig):
            quantization_config = DQConfig.from_dict(dict(quantization_config))
        super().__init__(quantization_config, **kwargs)
        self.torch_dtype: torch.dtype | None = None
        config = quantization_config
        if self.pre_quantized and config.plan is None:
            raise DQError(
                "the model's config.json has a dq quantization_config without a plan; the folder is not a complete "
                "dq checkpoint: save it again with dq.save or pipe.save_pretrained after dq.quantize"
            )
        if not self.pre_quantized:
            if config.plan is not None:
                raise DQError(
                    "this DQConfig describes a quantized checkpoint (it has a plan) but the folder holds a "
                    "full-precision model; pass DQConfig(recipe=...) to quantize at load, or load the dq folder itself"
                )
            stats = getattr(config, "stats", None)
            if stats is None:
                check_calibration_free(config.recipe_object())
            elif not Path(stats).is_file():
                raise DQError(
                    f"DQConfig: stats file {stats} does not exist; write it with "
                    f"`dq calibrate MODEL --recipe R --stats-out {stats}`"
                )

    def update_torch_dtype(self, torch_dtype: torch.dtype | None) -> torch.dtype | None:
        """What diffusers records as ``config._pre_quantization_dtype``. Without ``torch_dtype``: a dq
        folder's source dtype (the float model it was quantized from; its tensors keep their
        checkpoint dtypes all the same, `check_if_quantized_param`), or float32 for a
        full-precision folder (what diffusers loads it in)."""
        self.torch_dtype = torch_dtype
        if torch_dtype is not None:
            return torch_dtype
        if self.pre_quantized:
            recorded = (self.quantization_config.source or {}).get("weights_dtype")
            dtype = getattr(torch, recorded, None) if isinstance(recorded, str) else None
            return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None
        return torch.float32

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        # diffusers passes the class's `_keep_in_fp32_modules`: never quantized (as its backends do)
        self.keep_in_fp32_modules = [m for m in kwargs.get("keep_in_fp32_modules") or [] if m]
        if self.pre_quantized:
            from .io import install_shells

            self._dq_qc = self._read_only_config()  # read again after the weights
            shells = install_shells(model, self._dq_qc, f"{type(model).__name__} config.json")
            # name -> module for the per-tensor hooks (O(1) each, instead of a `get_submodule` walk)
            self._dq_modules = dict(model.named_modules())
            # the modules whose tensors `maybe_update_state_dict` sets in bulk: the shells, their
            # side modules (input transform, branch) and the router, each with its shell (or None)
            owned: dict[str, tuple[nn.Module, QuantModule | None]] = {}
            for name, shell in shells.items():
                for sub, module in shell.named_modules(prefix=name):
                    owned[sub] = (module, shell)
            router = model._modules.get(ROUTER_NAME)
            if isinstance(router, TimestepRouter):
                owned[ROUTER_NAME] = (router, None)
            self._dq_owned = owned
        return model

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        """Records the device map diffusers settles on (its last call passes it, right before the
        weights are read): `maybe_update_state_dict` places tensors itself only for one device."""
        if "device_map" in kwargs:
            self._dq_device_map = kwargs["device_map"]

    def _bulk_device(self) -> str | torch.device | None:
        """Where all the loaded tensors go, when that is one device (diffusers puts them on "cpu"
        without a device map); None when a device map spreads or offloads them."""
        device_map = self.__dict__.get("_dq_device_map")
        if device_map is None:
            return "cpu"
        if isinstance(device_map, dict) and set(device_map) == {""}:
            device = device_map[""]
            return None if device in ("disk", "meta") else device
        return None

    def maybe_update_state_dict(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """Set the tensors of the quantized layers (and their side modules, and the router) from a
        loaded checkpoint shard in one pass, and give diffusers back the rest of the state dict.

        diffusers' per-tensor loop (`load_model_dict_into_meta`) pays for every tensor: a cast of
        each float tensor to ``torch_dtype`` (also of the storage it then hands to
        `create_quantized_param`, which keeps the checkpoint's), an attribute walk, accelerate's
        `set_module_tensor_to_device`; a dq checkpoint holds about three times as many tensors
        as the float model. Done here, each costs a dict lookup and an assignment, with the
        same result: the storage buffers and the router keep their checkpoint dtypes (every
        tensor does without ``torch_dtype``), the other float tensors are cast to ``torch_dtype``
        (float32 in the class's `_keep_in_fp32_modules`, float8 kept), as diffusers would.
        A tensor whose shape does not match its shell is left to diffusers (its error message),
        as is everything when the weights are spread over several devices (a device map)."""
        owned = self.__dict__.get("_dq_owned")
        if not self.pre_quantized or owned is None or not isinstance(state_dict, dict):
            return state_dict  # not between dq's hooks of a pre-quantized load (e.g. a single-file load)
        device = self._bulk_device()
        if device is None:
            return state_dict
        dtype, keep = self.torch_dtype, getattr(self, "keep_in_fp32_modules", None) or []
        fp8 = getattr(torch, "float8_e4m3fn", None)
        rest = {}
        for name, value in state_dict.items():
            module_name, _, leaf = name.rpartition(".")
            found = owned.get(module_name)
            if found is None or not isinstance(value, torch.Tensor):
                rest[name] = value
                continue
            module, shell = found
            is_param = leaf in module._parameters
            old = module._parameters[leaf] if is_param else module._buffers.get(leaf)
            if old is None or (not is_param and leaf in module._non_persistent_buffers_set) or old.shape != value.shape:
                rest[name] = value  # not a tensor of the model's state dict, or a mismatch: diffusers decides
                continue
            if dtype is not None and value.is_floating_point() and value.dtype != fp8 and not (
                shell is None or (module is shell and leaf in _STORAGE_BUFFERS)
            ):
                target = torch.float32 if keep and any(k in name.split(".") for k in keep) else dtype
                if value.dtype != target:
                    value = value.to(target)
            if value.device != torch.device(device):
                value = value.to(device)
            if not value.is_contiguous():  # as diffusers does for a contiguous shell tensor (all of them)
                value = value.contiguous()
            if is_param:
                module._parameters[leaf] = nn.Parameter(value, requires_grad=old.requires_grad)
            else:
                module._buffers[leaf] = value
        return rest

    def _read_only_config(self) -> dict[str, Any]:
        """The quantization config as `install_shells` / `install_runtime` read it, without
        `to_dict`'s copy of the plan (a JSON round trip, ~6 ms for 282 layers: diffusers already
        deep-copied the model config once and serializes it once more for its telemetry). The
        plan is only read; the recipe and source, which the loaded model keeps, are copied."""
        fields = {k: v for k, v in self.quantization_config.__dict__.items() if not k.startswith("_")}
        for key in ("recipe", "source"):
            fields[key] = copy.deepcopy(fields.get(key))
        fields["quant_method"] = QUANT_METHOD
        return fields

    def _module(self, model: nn.Module, module_name: str) -> nn.Module | None:
        modules = self.__dict__.get("_dq_modules")
        if modules is None:  # hooks called outside a load (no shells installed by this quantizer)
            try:
                return model.get_submodule(module_name)
            except AttributeError:
                return None
        return modules.get(module_name)

    def check_if_quantized_param(
        self, model: nn.Module, param_value: torch.Tensor, param_name: str, state_dict: dict[str, Any], **kwargs: Any
    ) -> bool:
        """The quantized storage and the router's boundaries keep their checkpoint dtypes (diffusers
        would cast every float tensor to ``torch_dtype``): `create_quantized_param` sets them.
        Without ``torch_dtype`` every tensor keeps its checkpoint dtype, as in `dq.load` (diffusers
        would make the float ones float32)."""
        if not self.pre_quantized:
            return False
        if self.torch_dtype is None:
            return True
        module_name, _, leaf = param_name.rpartition(".")
        module = self._module(model, module_name)
        return (isinstance(module, QuantModule) and leaf in _STORAGE_BUFFERS) or isinstance(module, TimestepRouter)

    def create_quantized_param(
        self, model: nn.Module, param_value: torch.Tensor, param_name: str, target_device: Any,
        state_dict: dict[str, Any], unexpected_keys: list[str] | None = None, **kwargs: Any,
    ) -> None:
        module_name, _, leaf = param_name.rpartition(".")
        module = self._module(model, module_name)
        if module is None:
            module = model.get_submodule(module_name)  # raises AttributeError naming the module
        value = state_dict[param_name]  # not param_value: that one may be cast to torch_dtype
        is_param = leaf in module._parameters
        old = module._parameters[leaf] if is_param else module._buffers.get(leaf)
        if old is not None and tuple(old.shape) != tuple(value.shape):
            raise DQError(
                f"{param_name}: the checkpoint holds shape {tuple(value.shape)} where the saved plan makes "
                f"{tuple(old.shape)}; the weights and config.json do not belong together: save the pipeline again"
            )
        value = value.to(target_device)
        if is_param:
            module._parameters[leaf] = nn.Parameter(value, requires_grad=old.requires_grad if old is not None else False)
        else:
            module._buffers[leaf] = value

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        from .io import install_runtime

        self.__dict__.pop("_dq_modules", None)  # the per-tensor hooks are done
        self.__dict__.pop("_dq_owned", None)
        qc = self.__dict__.pop("_dq_qc", None)  # the config as the shells were built from it
        if self.pre_quantized:
            leftover = [  # one walk over the modules (named_parameters + named_buffers take two)
                f"{prefix}.{n}" if prefix else n
                for prefix, module in model.named_modules()
                for tensors in (module._parameters, module._buffers)
                for n, t in tensors.items()
                if t is not None and t.is_meta
            ]
            if leftover:
                raise DQError(
                    f"{type(model).__name__}: tensors of the quantized layers are missing from the checkpoint: "
                    f"{leftover[:5]}; the weights file does not match its config.json plan: save the pipeline again"
                )
            qc = qc or self.quantization_config.to_dict()
            install_runtime(model, qc, torch_dtype=self.torch_dtype, eval_mode=False)  # diffusers calls eval() next
        else:
            quantize_loaded(model, self.quantization_config, keep_modules=getattr(self, "keep_in_fp32_modules", []))
            # from here on the model is a quantized checkpoint: save_pretrained writes its plan
            self.quantization_config = DQConfig.from_model(model)
            self.pre_quantized = True
            model.register_to_config(quantization_config=self.quantization_config)
        self.modules_to_not_convert = unquantized_layers(model)
        install_model_methods(model)
        return model

    def _dequantize(self, model: nn.Module) -> nn.Module:
        """``model.dequantize()`` (diffusers' ``DiffusersQuantizer.dequantize`` then drops
        ``hf_quantizer`` and sets ``is_quantized = False``)."""
        from .dequant import dequantize_model

        return dequantize_model(model)

    @property
    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        """Adapters (peft LoRA) train on a dq model: quantized layers pass gradients straight
        through their dequantized weights to what comes before them; their own weights are frozen."""
        return True

    @property
    def is_compileable(self) -> bool:
        return True


def check_calibration_free(recipe: Recipe | None) -> None:
    """Refuse (DQError) a recipe that needs calibration statistics for quantization at load."""
    if recipe is None:
        raise DQError('DQConfig needs a recipe to quantize at load: DQConfig(recipe="w4a16")')
    needs = []
    specs = [("activation", recipe.activation)] + [(f"override {o.pattern!r} activation", o.activation) for o in recipe.overrides]
    needs += [f"static {what} ranges" for what, spec in specs if spec is not None and not spec.dynamic]
    needs += [name for name in ("smooth", "gptq") if getattr(recipe, name) is not None]
    if needs:
        raise DQError(
            f"recipe {recipe.name!r} needs calibration ({', '.join(needs)}), which from_pretrained cannot run; "
            f"{_CALIBRATE_WAY}. Quantization at load takes calibration-free recipes only (weight-only such as "
            "'w4a16', or dynamic activations without smooth/gptq)"
        )


def _component_pattern(name: str) -> str:
    """A regex matching module names that have `name` as one of their dotted parts."""
    return rf"(^|\.){re.escape(name)}(\.|$)"


def quantize_loaded(model: nn.Module, config: DQConfig, keep_modules: list[str] | None = None) -> nn.Module:
    """Quantize a freshly loaded full-precision denoiser: calibration-free recipes directly, the
    others from the statistics file named by ``config.stats`` (`dq.model.Calibration.replay`).
    `keep_modules`: names (dotted parts, as diffusers' `_keep_in_fp32_modules`) never quantized."""
    from .model import Calibration, apply_calibration

    recipe = config.recipe_object()
    stats = getattr(config, "stats", None)
    if stats is None:
        check_calibration_free(recipe)
    if keep_modules:
        recipe = dataclasses.replace(recipe, keep=[*recipe.keep, *(_component_pattern(m) for m in keep_modules)])
    cal = Calibration(model, recipe, keep_rules="the recipe's keep/overrides and modules_to_not_convert")
    if not cal.ready:
        if stats is None:
            raise DQError(f"recipe {recipe.name!r} needs calibration statistics for some layers; {_CALIBRATE_WAY}")
        cal.replay(stats)
    apply_calibration(cal)
    logger.info("quantized %d layers of %s at load with recipe %s", len(cal.plan), type(model).__name__, recipe.name)
    return model.eval()


def attach_quantizer(model: nn.Module) -> None:
    """Record a dq-quantized denoiser's `DQConfig` as diffusers does after a quantized
    ``from_pretrained`` (``config.quantization_config``, ``hf_quantizer``), so that
    ``save_pretrained`` writes a folder that ``from_pretrained`` (after ``import dq``) reloads."""
    if not hasattr(model, "register_to_config"):
        return  # not a diffusers model: nothing reads a config
    config = DQConfig.from_model(model)
    pre_dtype = getattr(torch, (config.source or {}).get("weights_dtype") or "", None)
    model.register_to_config(quantization_config=config)
    if isinstance(pre_dtype, torch.dtype):
        model.register_to_config(_pre_quantization_dtype=pre_dtype)  # as diffusers' from_pretrained does
    model.hf_quantizer = DQQuantizer(config, pre_quantized=True, modules_to_not_convert=unquantized_layers(model))
    install_model_methods(model)


def unquantized_layers(model: nn.Module) -> list[str]:
    """Names of the Linear/Conv2d layers a quantized model keeps in full precision (what diffusers'
    backends list as ``hf_quantizer.modules_to_not_convert``)."""
    return [name for name, m in model.named_modules() if type(m) in (nn.Linear, nn.Conv2d)]


# -- what diffusers' own quantized models do, on a dq model -------------------------------------
# Bound to the instance (as dq.nn.dtype_guard does), calling the class's method for the rest.


def _num_parameters(self: nn.Module, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
    """The full-precision model's count: each quantized weight (int8 codes, 4-bit codes packed two
    per byte, fp8) counts as the float weight it stands for, as diffusers counts its 4-bit backend's
    packed weights; scales, side branches and transforms are not parameters of the model."""
    count = type(self).num_parameters(self, only_trainable=only_trainable, exclude_embeddings=exclude_embeddings)
    if not only_trainable:  # quantized weights are frozen
        count += sum(
            math.prod(m.weight_shape) for m in self.modules() if isinstance(m, QuantModule) and m.weight_spec is not None
        )
    return count


def _get_memory_footprint(self: nn.Module, return_buffers: bool = True) -> int:
    """diffusers' count (parameters, and buffers: the quantized storage is buffers) plus the weight
    copies the kernels keep at run time (oneDNN's prepacked int8 layout, small layers' float copies)."""
    from .kernels.dispatch import runtime_nbytes

    return type(self).get_memory_footprint(self, return_buffers=return_buffers) + runtime_nbytes(self)


def _fuse_lora(self: nn.Module, *args: Any, **kwargs: Any) -> None:
    raise DQError(
        f"fuse_lora on a dq-quantized {type(self).__name__} is refused: the LoRA delta would have to be added to "
        "low-bit weights and requantized (or silently cast). The LoRA already runs unfused in high precision "
        "beside each quantized layer (pipe.set_adapters / disable_lora work); to fuse, dequantize first "
        "(model.dequantize() / dq.dequantize(pipe)) or fuse into the full-precision model, then quantize"
    )


def _load_lora_adapter(self: nn.Module, pretrained_model_name_or_path_or_dict: Any, prefix: str | None = "transformer",
                       *args: Any, **kwargs: Any):
    """diffusers' ``load_lora_adapter``, after checking (for a state dict, as the pipelines' loaders
    pass it) that every layer the LoRA targets exists in this quantized model: diffusers would only
    log the others at debug level and load the rest."""
    if isinstance(pretrained_model_name_or_path_or_dict, dict):
        modules = dict(self.named_modules())
        targets = lora_target_names(pretrained_model_name_or_path_or_dict, prefix)
        missing = sorted(n for n in targets if n not in modules)
        if missing:
            shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
            example = next((n for n, m in modules.items() if isinstance(m, QuantModule)), "")
            raise DQError(
                f"the LoRA targets layers that {type(self).__name__} does not have: {shown}; it was made for another "
                f"model (layer names here look like {example!r}): load a LoRA trained for this model"
            )
        if targets and has_static_ranges(self):
            logger.warning(
                "%s: its static activation ranges were calibrated without this LoRA, which may push inputs of the "
                "layers after it out of range (they clip; dq.nn.lora.measure_clipping counts it). For a LoRA you "
                "keep, fuse it into the full-precision pipeline and quantize after (calibrating with it); to switch "
                "LoRAs, prefer a dynamic-activation recipe (w8a8-dynamic, w4a16)", type(self).__name__,
            )
    out = type(self).load_lora_adapter(self, pretrained_model_name_or_path_or_dict, prefix, *args, **kwargs)
    merge_with_branches(self)  # LoRAs beside a low-rank branch run with it, one matmul pair
    return out


_MODEL_METHODS = {
    "num_parameters": _num_parameters,
    "get_memory_footprint": _get_memory_footprint,
    "fuse_lora": _fuse_lora,
    "load_lora_adapter": _load_lora_adapter,
}


def install_model_methods(model: nn.Module) -> None:
    """Bind `_MODEL_METHODS` to a dq-quantized diffusers model (where its class has them)."""
    for name, fn in _MODEL_METHODS.items():
        if hasattr(type(model), name):
            object.__setattr__(model, name, types.MethodType(fn, model))


def _expand_lora_state_dict(cls: type, transformer: nn.Module, lora_state_dict: dict[str, torch.Tensor]) -> dict:
    """`FluxLoraLoaderMixin._maybe_expand_lora_state_dict` for a dq-quantized transformer.

    diffusers' version (run by ``FluxPipeline.load_lora_weights``, not by the model's own
    ``load_lora_adapter``) reads each target's input width from ``transformer.state_dict()[name +
    ".weight"]``, which a dq model does not hold (its layers store ``qweight``): a KeyError. This
    one reads the width from the layer (`in_features`) and does the same thing: a LoRA narrower than
    its layer (a Flux Control LoRA loaded after one that widened the input) gets zero columns; a
    wider one is refused."""
    prefix, suffix = f"{cls.transformer_name}.", ".lora_A.weight"
    modules = dict(transformer.named_modules())
    for key in list(lora_state_dict):
        if not (key.startswith(prefix) and key.endswith(suffix)):
            continue
        name = key[len(prefix):-len(suffix)]
        module = modules.get(name)
        if module is None:  # diffusers ignores it here; the model's load_lora_adapter names it (DQError)
            continue
        module = getattr(module, "base_layer", module)  # already wrapped by peft (a second adapter)
        width, lora_a = getattr(module, "in_features", None), lora_state_dict[key]
        if width is None or width == lora_a.shape[1]:
            continue
        if width < lora_a.shape[1]:
            raise DQError(
                f"the LoRA's {name}.lora_A.weight takes {lora_a.shape[1]} input features and the quantized layer "
                f"{name} has {width}: a LoRA that widens a layer's input (a Flux Control LoRA) needs that layer in "
                "full precision; keep it out of quantization (DQConfig(modules_to_not_convert=[...]) or the recipe's "
                "keep) and quantize again"
            )
        expanded = lora_a.new_zeros(lora_a.shape[0], width)
        expanded[:, : lora_a.shape[1]] = lora_a
        lora_state_dict[key] = expanded
    return lora_state_dict


def _patch_flux_lora_loader() -> None:
    """Route `_maybe_expand_lora_state_dict` of diffusers' Flux LoRA loader to
    `_expand_lora_state_dict` for dq-quantized transformers (others keep diffusers' own)."""
    try:
        from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin
    except ImportError:  # a diffusers without it: nothing to patch
        return
    original = FluxLoraLoaderMixin.__dict__.get("_maybe_expand_lora_state_dict")
    if not isinstance(original, classmethod) or getattr(original.__func__, "_dq_patched", False):
        return

    def expand(cls, transformer, lora_state_dict):
        if any(isinstance(m, QuantModule) for m in transformer.modules()):
            return _expand_lora_state_dict(cls, transformer, lora_state_dict)
        return original.__func__(cls, transformer, lora_state_dict)

    expand._dq_patched = True
    expand.__doc__ = _expand_lora_state_dict.__doc__
    FluxLoraLoaderMixin._maybe_expand_lora_state_dict = classmethod(expand)


def register() -> None:
    """Register the dq backend with diffusers, and with transformers for the text encoders
    (`dq.text_backend`), so that ``PipelineQuantizationConfig(quant_backend="dq", ...)`` works
    (done when dq is imported)."""
    _auto.AUTO_QUANTIZER_MAPPING[QUANT_METHOD] = DQQuantizer
    _auto.AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD] = DQConfig
    _patch_flux_lora_loader()
    guard_pipelines()  # pipe.to(dtype) refused before any component is cast, however the pipeline was loaded
    from . import text_backend  # noqa: F401  (registers the text encoders' side with transformers)


register()
