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
"""

from __future__ import annotations

import copy
import logging
import re
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
from .nn.layers import _STORAGE_BUFFERS, QuantModule
from .nn.router import TimestepRouter
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
        out = copy.deepcopy({k: v for k, v in self.__dict__.items() if not k.startswith("_")})
        out["quant_method"] = QUANT_METHOD  # a plain string in JSON
        if not out.get("modules_to_not_convert"):
            out.pop("modules_to_not_convert", None)  # as dq.save writes it
        return out

    def to_diff_dict(self) -> dict[str, Any]:
        """`to_dict` without the keys left at their defaults (what diffusers' repr shows)."""
        defaults = {"modules_to_not_convert": [], "format_version": FORMAT_VERSION, "plan": None,
                    "timestep_groups": None, "source": None, "stats": None}
        return {k: v for k, v in self.to_dict().items() if k not in defaults or v != defaults[k]}

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
        self.torch_dtype = torch_dtype
        return torch_dtype

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        if self.pre_quantized:
            from .io import install_shells

            install_shells(model, self.quantization_config.to_dict(), f"{type(model).__name__} config.json")
        return model

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
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            return False
        return (isinstance(module, QuantModule) and leaf in _STORAGE_BUFFERS) or isinstance(module, TimestepRouter)

    def create_quantized_param(
        self, model: nn.Module, param_value: torch.Tensor, param_name: str, target_device: Any,
        state_dict: dict[str, Any], unexpected_keys: list[str] | None = None, **kwargs: Any,
    ) -> None:
        module_name, _, leaf = param_name.rpartition(".")
        module = model.get_submodule(module_name)
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

        if self.pre_quantized:
            leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
            if leftover:
                raise DQError(
                    f"{type(model).__name__}: tensors of the quantized layers are missing from the checkpoint: "
                    f"{leftover[:5]}; the weights file does not match its config.json plan: save the pipeline again"
                )
            install_runtime(model, self.quantization_config.to_dict(), torch_dtype=self.torch_dtype)
            return model
        quantize_loaded(model, self.quantization_config)
        # from here on the model is a quantized checkpoint: save_pretrained writes its plan
        self.quantization_config = DQConfig.from_model(model)
        self.pre_quantized = True
        model.register_to_config(quantization_config=self.quantization_config)
        return model

    @property
    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


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


def quantize_loaded(model: nn.Module, config: DQConfig) -> nn.Module:
    """Quantize a freshly loaded full-precision denoiser: calibration-free recipes directly, the
    others from the statistics file named by ``config.stats`` (`dq.model.Calibration.replay`)."""
    from .model import Calibration, apply_calibration

    recipe = config.recipe_object()
    stats = getattr(config, "stats", None)
    if stats is None:
        check_calibration_free(recipe)
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
    model.register_to_config(quantization_config=config)
    model.hf_quantizer = DQQuantizer(config, pre_quantized=True)


def register() -> None:
    """Register the dq backend with diffusers (done when dq is imported)."""
    _auto.AUTO_QUANTIZER_MAPPING[QUANT_METHOD] = DQQuantizer
    _auto.AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD] = DQConfig


register()
