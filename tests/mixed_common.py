"""What the mixed-precision tests share (tests/test_mixed.py, tests/test_mixed_sensitivity.py):
the tiny PixArt pipeline's call, budget recipes and quantization at the tests' size."""

import dq
from dq.kernels import set_execution
from dq.recipe import Recipe
from dq.testing.tiny import default_call_kwargs, prompts_for

KIND = "pixart"
STEPS = 3


def call_kwargs():
    return {k: v for k, v in default_call_kwargs(KIND).items() if k not in ("num_inference_steps", "output_type")}


def budget_recipe(mixed=None, **extra):
    # int4 and int8 only unless `mixed` says otherwise: these tests are about the allocation's
    # mechanics (two format builds, not the default four)
    cfg = {"num_prompts": 2, "steps": STEPS, "sensitivity": "measure", "weights": ["int4", "int8"], **(mixed or {})}
    return Recipe.from_dict({"base": "w4a8", "calib_num_prompts": 2, "calib_batch_size": 2, "mixed": cfg, **extra})


def quantize(pipe, recipe):
    return dq.quantize(pipe, recipe, calib_prompts=prompts_for(KIND, 2), num_inference_steps=STEPS, **call_kwargs())


def real_and_simulated(model, rec):
    """The recorded calls replayed on real kernels, then simulated (execution back to auto)."""
    set_execution(model, "real")
    real = rec.replay()
    set_execution(model, "sim")
    sim = rec.replay()
    set_execution(model, "auto")
    return real, sim
