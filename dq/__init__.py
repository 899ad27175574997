"""dq: timestep-aware post-training quantization for diffusers pipelines.

    import dq
    pipe = dq.quantize(pipe, "w8a8")      # calibrate with the pipeline's own sampler
    dq.save(pipe, "out/w8a8")             # diffusers folder, safetensors
    pipe = dq.load("out/w8a8")

Importing dq also registers it as a diffusers quantization backend (`dq.DQConfig`,
`dq.backend`): `DiffusionPipeline.from_pretrained("out/w8a8")` then works too.
"""

from __future__ import annotations

import logging

from .backend import DQConfig, dequantize
from .engine import quantize
from .errors import CalibrationError, DQError
from .io import load, open_pipeline, save
from .quant.spec import QuantSpec
from .recipe import LayerOverride, Recipe, recipes

__version__ = "0.1.0"
__all__ = [
    "CalibrationError",
    "DQConfig",
    "DQError",
    "LayerOverride",
    "QuantSpec",
    "Recipe",
    "dequantize",
    "load",
    "open_pipeline",
    "quantize",
    "recipes",
    "save",
]

logging.getLogger(__name__).addHandler(logging.NullHandler())
