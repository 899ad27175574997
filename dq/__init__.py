"""dq: timestep-aware post-training quantization for diffusers pipelines.

    import dq
    pipe = dq.quantize(pipe, "w8a8")      # calibrate with the pipeline's own sampler
    dq.save(pipe, "out/w8a8")             # diffusers folder, safetensors
    pipe = dq.load("out/w8a8")

Model-level API, for a bare denoiser and any loop you own:

    cal = dq.prepare(model, "w8a8")
    for _ in cal.passes():                # one or two passes, per the recipe
        my_sampler(model)                 # your own inputs
    dq.convert(model)
    dq.state(model)                       # recipe, source, router, per-layer plan

Importing dq also registers it as a diffusers quantization backend (`dq.DQConfig`,
`dq.backend`): `DiffusionPipeline.from_pretrained("out/w8a8")` then works too.
"""

from __future__ import annotations

import logging

from .backend import DQConfig
from .dequant import dequantize
from .engine import quantize
from .errors import CalibrationError, DQError
from .io import load, open_pipeline, save
from .model import Calibration, calibrate, convert, prepare
from .quant.spec import QuantSpec
from .recipe import LayerOverride, Recipe, recipes
from .state import QuantState, state
from .text_encoders import quantize_text_encoders

__version__ = "0.1.0"
__all__ = [
    "Calibration",
    "CalibrationError",
    "DQConfig",
    "DQError",
    "LayerOverride",
    "QuantSpec",
    "QuantState",
    "Recipe",
    "calibrate",
    "convert",
    "dequantize",
    "load",
    "open_pipeline",
    "prepare",
    "quantize",
    "quantize_text_encoders",
    "recipes",
    "save",
    "state",
]

logging.getLogger(__name__).addHandler(logging.NullHandler())
