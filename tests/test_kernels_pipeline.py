"""Real execution on tiny pipelines: agreement with sim, checkpoints, torch.compile."""

import pytest
import torch
from conftest import DenoiserRecorder, sqnr_db
from safetensors import safe_open

import dq
from dq.engine import find_denoiser, swap_modules
from dq.kernels import choose_kernel, dispatch, runners, set_execution
from dq.nn import QuantLinear, QuantModule, TimestepRouter
from dq.nn.router import attach_router
from dq.quant.spec import QuantSpec
from dq.testing.tiny import default_call_kwargs, prompts_for, tiny_pipeline


def calib_kwargs(kind):
    kw = default_call_kwargs(kind)
    kw.pop("num_inference_steps")
    kw.pop("output_type")
    return kw


def quantized_pipe(kind, recipe):
    pipe = tiny_pipeline(kind)
    dq.quantize(pipe, recipe, calib_prompts=prompts_for(kind, 2), num_inference_steps=3, **calib_kwargs(kind))
    return pipe


def run(pipe, kind, steps=3):
    kw = {**default_call_kwargs(kind), "num_inference_steps": steps}
    return pipe(prompt=prompts_for(kind, 2), generator=torch.Generator().manual_seed(1), **kw)


@pytest.mark.parametrize("kind", ["pixart", "sd15"])
@pytest.mark.parametrize("recipe", ["w8a8", "w4a8", "w4a8-rtn", "w4a16"])
def test_real_matches_sim_on_tiny_pipelines(kind, recipe):
    pipe = tiny_pipeline(kind)
    _, model = find_denoiser(pipe)
    with DenoiserRecorder(model) as rec:
        run(pipe, kind)
    fp = rec.replay()
    # the presets let narrow layers skip their activation rounding where faster (path
    # "float_input", on every tiny layer here); this test is about the kernels computing the
    # simulated function, so it is off
    dq.quantize(pipe, {"base": recipe, "float_activations_where_faster": False}, calib_prompts=prompts_for(kind, 2),
                num_inference_steps=3, **calib_kwargs(kind))
    layers = [m for m in model.modules() if isinstance(m, QuantModule)]
    # execution 'auto' (the presets'): real wherever the layer's formats have a kernel
    assert all(m.execution == ("real" if choose_kernel(m)[0] else "sim") for m in layers)
    expected = "dequant" if recipe == "w4a16" else "int8"
    # GPTQ (w4a8) rounds on two-level group scales: its layers take the integer kernel too
    assert any(m.kernel == expected for m in layers)
    if recipe.startswith("w4a8"):
        assert all(m.weight_layout.two_level and m.kernel == "int8" for m in layers if m.weight_spec.bits == 4 and m.act_spec is not None)
    if kind == "sd15":
        assert any(isinstance(m, dq.nn.QuantConv2d) and m.kernel == expected for m in layers)
    inputs = {}

    def keep_first(name):
        def hook(_module, args):
            inputs.setdefault(name, args[0].detach().clone())

        return hook

    hooks = [m.register_forward_pre_hook(keep_first(n)) for n, m in model.named_modules() if isinstance(m, QuantModule)]
    real = rec.replay()
    for h in hooks:
        h.remove()
    # Layer by layer, on the inputs the pipeline gives it, real computes what sim computes: the
    # same integer codes (one rounding order, `primitives.quantize`), float summation order only.
    with torch.no_grad():
        for name, x in inputs.items():
            layer = model.get_submodule(name)
            got = layer(x)
            if dispatch._known_path(layer, x) == "bf16":
                # w4a16's 16-bit activations (bfloat16, where the CPU's bfloat16 matmul is faster):
                # by design not the float32 function; it computes its own simulation
                assert sqnr_db(runners.simulated_bf16(layer, x), got) > 70, f"{kind} {recipe}: {name} (bf16)"
                continue
            set_execution(layer, "sim")
            assert sqnr_db(layer(x), got) > 80, f"{kind} {recipe}: {name}"
            set_execution(layer, "auto")
    set_execution(model, "sim")
    sim = rec.replay()
    real_vs_sim = min(sqnr_db(s, r) for s, r in zip(sim, real))
    real_err = min(sqnr_db(f, r) for f, r in zip(fp, real))
    sim_err = min(sqnr_db(f, s) for f, s in zip(fp, sim))
    # End to end, in a deep net with static ranges, an ulp of summation order that moves a value
    # across a rounding tie flips a code, and flips cascade (sd15 w8a8: 33-36 dB real vs sim,
    # depending on the machine's kernels); so the bound is: real is as accurate as sim, and
    # closer to sim than either is to full precision.
    assert real_err > sim_err - 1.0, f"{kind} {recipe}: real {real_err:.1f} dB vs sim {sim_err:.1f} dB from FP"
    assert real_vs_sim > sim_err, f"{kind} {recipe}: real vs sim {real_vs_sim:.1f} dB (sim vs FP {sim_err:.1f})"


@pytest.mark.parametrize("kind", ["pixart", "sd15"])
def test_dynamic_per_token_w8a8_real_matches_sim_layer_by_layer(kind):
    """w8a8-dynamic: every layer's real output equals its simulated one on the inputs the
    pipeline gives it (float rounding only). End to end the two drift apart more than with
    static ranges, since a per-token scale moves with every upstream difference, so the
    pipeline-level check is only that real is as accurate as sim against full precision."""
    pipe = tiny_pipeline(kind)
    _, model = find_denoiser(pipe)
    with DenoiserRecorder(model) as rec:
        run(pipe, kind)
    fp = rec.replay()
    # the preset lets narrow layers skip their activation rounding where faster (path
    # "float_input"); this test is about the integer kernels computing the simulated function
    recipe = {"base": "w8a8-dynamic", "float_activations_where_faster": False}
    dq.quantize(pipe, recipe, calib_prompts=prompts_for(kind, 2), num_inference_steps=3, **calib_kwargs(kind))
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantModule)}
    assert any(m.kernel == "int8" for m in layers.values())
    inputs = {}

    def keep_first(name):
        def hook(_module, args):
            inputs.setdefault(name, args[0].detach().clone())  # returns None: the input is unchanged

        return hook

    hooks = [m.register_forward_pre_hook(keep_first(n)) for n, m in layers.items()]
    real = rec.replay()
    for h in hooks:
        h.remove()
    with torch.no_grad():
        for name, x in inputs.items():
            layer = layers[name]
            got = layer(x)
            set_execution(layer, "sim")
            assert sqnr_db(layer(x), got) > 60, name
            set_execution(layer, "auto")
    set_execution(model, "sim")
    sim = rec.replay()
    assert min(sqnr_db(f, r) for f, r in zip(fp, real)) > min(sqnr_db(f, s) for f, s in zip(fp, sim)) - 1.0


@pytest.mark.parametrize("recipe", ["w4a8-rtn", "w4a8"])
def test_packed_checkpoint_round_trip_is_identical_and_stores_packed_bytes(tmp_path, recipe):
    pipe = quantized_pipe("pixart", recipe)
    expected = run(pipe, "pixart").images
    out = dq.save(pipe, tmp_path / "q")
    weights = out / "transformer" / "diffusion_pytorch_model.safetensors"
    with safe_open(weights, "pt") as f:
        qweight = f.get_tensor("transformer_blocks.0.attn1.to_q.qweight")
        wmult = f.get_tensor("transformer_blocks.0.attn1.to_q.wmult")
    assert qweight.dtype == torch.uint8 and qweight.shape == (64, 32)  # 64 x 64 weights, two per byte
    # two-level scales (GPTQ-rounded ones too): a byte per group of 64
    assert wmult.dtype == torch.uint8 and wmult.shape == (64, 1)
    loaded = dq.load(out)
    layers = [m for m in loaded.transformer.modules() if isinstance(m, QuantModule)]
    assert layers and all(m.execution == ("real" if choose_kernel(m)[0] else "sim") for m in layers), \
        "load restores the execution mode"
    assert torch.equal(torch.as_tensor(run(loaded, "pixart").images), torch.as_tensor(expected))
    sim = dq.load(out, execution="sim")
    assert all(m.execution == "sim" for m in sim.transformer.modules() if isinstance(m, QuantModule))


class TinyDenoiser(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(64, 128)
        self.down = torch.nn.Linear(128, 64)
        self.conv = torch.nn.Conv2d(4, 8, 3, padding=1)

    def forward(self, x, image, timestep):
        return self.down(torch.nn.functional.gelu(self.up(x))), self.conv(image)


def quantized_tiny_denoiser():
    torch.manual_seed(0)
    model = TinyDenoiser().eval()
    router = TimestepRouter(torch.tensor([250.0, 500.0, 750.0]))
    a8 = QuantSpec(bits=8, granularity="tensor", symmetric=False)
    ranges = [(-4.0 + g, 3.0 - 0.5 * g) for g in range(4)]  # a different range per group
    new = {
        "up": QuantLinear.from_float(model.up, QuantSpec(bits=8), a8, ranges, router),
        "down": QuantLinear.from_float(model.down, QuantSpec(bits=4, granularity="group", group_size=64), a8, ranges, router),
        "conv": dq.nn.QuantConv2d.from_float(model.conv, QuantSpec(bits=8), a8, ranges, router),
    }
    attach_router(model, router)
    swap_modules(model, new)
    set_execution(model, "real")
    return model


def test_compiled_real_model_matches_eager_and_does_not_recompile_per_timestep_group():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    model = quantized_tiny_denoiser()
    x, image = torch.randn(2, 10, 64), torch.randn(2, 4, 8, 8)
    with torch.no_grad():  # the first eager call measures each layer's kernel path (dq.kernels.choice)
        model(x, image, torch.tensor([999.0, 999.0]))
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, backend=counter)
    frames = None
    with torch.no_grad():
        for t in (999.0, 600.0, 300.0, 10.0, 999.0):
            timestep = torch.tensor([t, t])
            got = compiled(x, image, timestep)
            group = int(model.dq_router.index)
            want = model(x, image, timestep)
            for g, w in zip(got, want):
                assert torch.allclose(g, w, rtol=1e-3, atol=1e-3 * float(w.abs().max())), f"t={t}"
            frames = frames if frames is not None else counter.frame_count
            assert counter.frame_count == frames, f"recompiled at timestep {t} (group {group})"
    assert group == 3


def test_real_execution_refused_before_the_pipeline_changes():
    import dq
    from dq.errors import DQError
    from dq.nn import QuantModule
    from dq.testing.tiny import tiny_pipeline

    pipe = tiny_pipeline("pixart")
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    with pytest.raises(DQError, match="execution 'real'"):
        dq.quantize(pipe, {"base": "w4a4-rtn", "activation": {"bits": 4, "granularity": "token", "kind": "fp4_e2m1"}, "weight": {"kind": "fp4_e2m1", "granularity": "channel"}, "execution": "real"})
    assert not any(isinstance(m, QuantModule) for m in pipe.transformer.modules())
    assert not hasattr(pipe.transformer, "dq_router")
    after = pipe.transformer.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
