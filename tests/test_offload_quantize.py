"""dq.quantize on a pipeline whose denoiser is offloaded: model CPU offload and group offloading
(block and leaf level) give the model and images of the plain pipeline, group offloading is laid
again over the quantized layers; sequential offload (weights on the meta device) is refused
before anything changes."""

from __future__ import annotations

import pytest
import torch

import dq
from dq.errors import DQError
from dq.nn.layers import QuantModule
from dq.testing.tiny import default_call_kwargs, prompts_for, tiny_pipeline

KIND, RECIPE = "flux", "w4a8"  # smoothing search + GPTQ: reads the weights and second moments
CPU = torch.device("cpu")


def _kwargs():
    return {k: v for k, v in default_call_kwargs(KIND).items() if k not in ("num_inference_steps", "output_type")}


def _quantize_and_sample(how: str):
    pipe = tiny_pipeline(KIND)
    if how == "model":
        pipe.enable_model_cpu_offload(device="cpu")
    elif how in ("leaf", "block"):
        pipe.transformer.enable_group_offload(onload_device=CPU, offload_device=CPU, offload_type=f"{how}_level",
                                              num_blocks_per_group=1)
    dq.quantize(pipe, RECIPE, calib_prompts=prompts_for(KIND, 2), num_inference_steps=2, **_kwargs())
    images = pipe(prompts_for(KIND, 1), num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                  output_type="pt", **_kwargs()).images
    return pipe, images


def _group_hooked(module) -> bool:
    registry = getattr(module, "_diffusers_hook", None)
    return registry is not None and registry.get_hook("group_offloading") is not None


@pytest.fixture(scope="module")
def plain():
    pipe, images = _quantize_and_sample("none")
    return {k: v.clone() for k, v in pipe.transformer.state_dict().items()}, images


@pytest.mark.parametrize("how", ["model", "block", "leaf"])
def test_offloaded_denoiser_quantizes_like_the_plain_one(plain, how):
    state, images = plain
    pipe, got = _quantize_and_sample(how)
    quant = [m for m in pipe.transformer.modules() if isinstance(m, QuantModule)]
    assert quant
    mine = pipe.transformer.state_dict()
    assert [k for k in state if not torch.equal(state[k], mine[k])] == []
    assert torch.equal(got, images)
    if how == "leaf":  # each quantized layer is offloaded like the float one it replaced
        assert all(_group_hooked(m) for m in quant)


def test_sequential_offload_is_refused_before_anything_changes():
    pipe = tiny_pipeline(KIND)
    pipe.enable_sequential_cpu_offload(device="cpu")
    before = {n: type(m) for n, m in pipe.transformer.named_modules()}
    with pytest.raises(DQError, match="meta device.*enable_sequential_cpu_offload"):
        dq.quantize(pipe, RECIPE, calib_prompts=prompts_for(KIND, 2), num_inference_steps=2, **_kwargs())
    assert {n: type(m) for n, m in pipe.transformer.named_modules()} == before
    assert not hasattr(pipe.transformer, "_dq_calibration")
    with pytest.raises(DQError, match="meta device"):
        dq.prepare(pipe.transformer, RECIPE)
