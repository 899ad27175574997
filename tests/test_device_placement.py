"""No tensor made on the CPU by default meets the model's tensors (what fails on a GPU only).

On a GPU, `torch.tensor(counts)` lands on the CPU beside GPU statistics, and the operation
that takes both raises; on this CPU-only machine it passes. Two such bugs stopped dq's
calibration of FLUX.1 on an H200 (2026-12-04: the per-timestep token counts of the smoothing
aggregate, and the bin edges of the histogram range search). `dq.testing.devices.HostTensorAudit`
marks the tensors that would be on the CPU there and records every call that mixes them with
the model's; these tests run dq's whole route under it.
"""

import pytest
import torch

import dq
from dq.testing.devices import HostTensorAudit
from dq.testing.tiny import default_call_kwargs, prompts_for, tiny_pipeline


def test_the_audit_flags_what_a_gpu_would_refuse_and_nothing_else():
    x = torch.randn(4, 3)
    with HostTensorAudit() as audit:
        fine = [
            x * torch.tensor([1.0, 2.0, 3.0], device=x.device),  # made on the model's device
            x * torch.tensor(2.0),  # a 0-dim CPU tensor joins GPU operations
            x * torch.tensor([1.0, 2.0, 3.0]).to(x.device),  # moved there
            x[torch.tensor([0, 2])],  # a CPU index into a GPU tensor
            torch.arange(3).float() * torch.linspace(0, 1, 3),  # host work stays host work
            x.new_zeros(3) + x[0],
        ]
        assert not audit.mixes and len(fine) == 6
        counts = torch.tensor([3.0, 5.0])
        x[:2].T * counts  # what the smoothing aggregate did
        x.cpu() + x  # .cpu() is the host on every machine
    assert [m.func for m in audit.mixes] == ["TensorBase.mul", "TensorBase.add"]
    assert "test_device_placement.py" in audit.mixes[0].made[0] and "counts = torch.tensor" in audit.mixes[0].made[0]


def _calib(kw):
    """The pipeline call's keywords a calibration takes (it sets its own steps and output)."""
    return {k: v for k, v in kw.items() if k not in ("num_inference_steps", "output_type")}


def _quantize_and_run(kind, recipe, tmp_path=None):
    pipe = tiny_pipeline(kind)
    kw = default_call_kwargs(kind)
    with HostTensorAudit(only="/dq/") as audit:
        dq.quantize(pipe, recipe, calib_prompts=prompts_for(kind, 2), num_inference_steps=3, **_calib(kw))
        pipe(prompt=prompts_for(kind, 1), **{**kw, "num_inference_steps": 2})
        if tmp_path is not None:
            dq.save(pipe, tmp_path / "q")
            loaded = dq.load(tmp_path / "q", device="cpu")  # as a GPU user loads onto the GPU
            loaded(prompt=prompts_for(kind, 1), **{**kw, "num_inference_steps": 2})
    return audit.mixes


@pytest.mark.parametrize("kind, recipe", [
    ("pixart", "w4a4"),  # smoothing search, rotation, low-rank branch, histogram ranges
    ("pixart", {"base": "w4a8", "budget": 6.0}),  # GPTQ and the mixed-precision allocation
    ("sd15", "w8a8"),  # convolutions; saved and loaded
])
def test_quantize_run_save_load_never_mix_devices(kind, recipe, tmp_path):
    mixes = _quantize_and_run(kind, recipe, tmp_path if kind == "sd15" else None)
    assert not mixes, "\n".join(f"{m.func} at {m.where}, CPU tensor made at {m.made}" for m in mixes[:5])


def test_diffusers_backend_loads_never_mix_devices(tmp_path):
    """`from_pretrained` of a dq checkpoint, and quantizing at load, as a GPU user moves the pipeline."""
    from diffusers import DiffusionPipeline, PixArtTransformer2DModel

    pipe = tiny_pipeline("pixart")
    pipe.save_pretrained(tmp_path / "float")
    kw = default_call_kwargs("pixart")
    dq.quantize(pipe, "w8a8", calib_prompts=prompts_for("pixart", 2), num_inference_steps=2, **_calib(kw))
    dq.save(pipe, tmp_path / "q")
    with HostTensorAudit(only="/dq/") as audit:
        loaded = DiffusionPipeline.from_pretrained(tmp_path / "q").to("cpu")
        loaded(prompt=prompts_for("pixart", 1), **{**kw, "num_inference_steps": 2})
        model = PixArtTransformer2DModel.from_pretrained(
            tmp_path / "float", subfolder="transformer", quantization_config=dq.DQConfig(recipe="w4a16"))
        at_load = DiffusionPipeline.from_pretrained(tmp_path / "float", transformer=model).to("cpu")
        at_load(prompt=prompts_for("pixart", 1), **{**kw, "num_inference_steps": 2})
    assert not audit.mixes, "\n".join(f"{m.func} at {m.where}, CPU tensor made at {m.made}" for m in audit.mixes[:5])


def test_lora_and_text_encoders_never_mix_devices():
    """LoRA on a quantized SD3 (load, run, unload) and weight-only text encoders."""
    from test_lora import lora_state_dict

    pipe = tiny_pipeline("sd3")
    kw = default_call_kwargs("sd3")
    lora = {f"transformer.{k}": v for k, v in lora_state_dict().items()}
    with HostTensorAudit(only="/dq/") as audit:
        dq.quantize(pipe, "w8a8", calib_prompts=prompts_for("sd3", 2), num_inference_steps=2, **_calib(kw))
        pipe.load_lora_weights(lora, adapter_name="a")
        pipe(prompt=prompts_for("sd3", 1), **{**kw, "num_inference_steps": 2})
        pipe.unload_lora_weights()
        dq.quantize_text_encoders(pipe, "w8a16")
        pipe(prompt=prompts_for("sd3", 1), **{**kw, "num_inference_steps": 2})
    assert not audit.mixes, "\n".join(f"{m.func} at {m.where}, CPU tensor made at {m.made}" for m in audit.mixes[:5])
