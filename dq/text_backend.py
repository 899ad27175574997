"""dq as a transformers quantization backend, for the text encoders of a pipeline.

diffusers' pipeline-level ``PipelineQuantizationConfig(quant_backend="dq", quant_kwargs={...},
components_to_quantize=[...])`` looks the backend up in diffusers' registry for the denoiser and
in transformers' for the text encoders (CLIP, T5), and requires both to exist with the same
config signature. `DQTextConfig` is `dq.DQConfig` as a transformers config; `DQTextQuantizer`
quantizes a text encoder weight-only once its float weights are loaded
(`dq.text_encoders.quantize_encoder`: the same layers as ``dq.quantize_text_encoders``), so a
weight-only recipe ("w8a16", "w4a16") quantizes every listed component at load.

Like ``dq.quantize_text_encoders``, the result is not saved quantized (``is_serializable`` is
False, and saving is refused with the reason); a checkpoint whose text encoder names
``quant_method: "dq"`` is refused at load.
"""

from __future__ import annotations

from typing import Any

from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .backend import QUANT_METHOD, DQConfig
from .errors import DQError
from .text_encoders import check_weight_only, dequantize_encoder, quantize_encoder


class DQTextConfig(DQConfig, QuantizationConfigMixin):
    """`dq.DQConfig` for transformers models (the same fields: diffusers checks the signatures match)."""


class DQTextQuantizer(HfQuantizer):
    requires_calibration = False

    def __init__(self, quantization_config: DQTextConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        if self.pre_quantized:
            raise DQError(
                "this text encoder's config names quant_method 'dq', but dq never saves text encoders quantized "
                "(its quantization_config was written by hand or by another tool): load the float text encoder and "
                "quantize it at load (quantization_config=dq.DQConfig(recipe='w8a16')) or with dq.quantize_text_encoders"
            )
        recipe = quantization_config.recipe_object()
        if recipe is None:
            raise DQError("DQConfig for a text encoder needs a weight-only recipe: dq.DQConfig(recipe='w8a16') (or 'w4a16')")
        try:
            check_weight_only(recipe)
        except DQError as exc:
            raise DQError(
                f"{exc}. A text encoder runs once per prompt: give it a weight-only config of its own, "
                "PipelineQuantizationConfig(quant_mapping={'transformer': dq.DQConfig(...), 'text_encoder': "
                "dq.DQConfig(recipe='w8a16')})"
            ) from None
        self.recipe = recipe

    def _process_model_before_weight_loading(self, model, **kwargs: Any):
        return model  # nothing before: the float weights load as they are (abstract in transformers 4.x)

    def _process_model_after_weight_loading(self, model, **kwargs: Any):
        quantize_encoder(model, self.recipe, type(model).__name__)
        return model

    def _dequantize(self, model, dtype=None):
        """``model.dequantize()``: plain Linear layers again (transformers then drops the config)."""
        return dequantize_encoder(model, dtype)

    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        return False

    @property
    def is_trainable(self) -> bool:
        return False


def register() -> None:
    """Register the dq backend with transformers (done when dq is imported)."""
    AUTO_QUANTIZATION_CONFIG_MAPPING.setdefault(QUANT_METHOD, DQTextConfig)
    AUTO_QUANTIZER_MAPPING.setdefault(QUANT_METHOD, DQTextQuantizer)


register()
