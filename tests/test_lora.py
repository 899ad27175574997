"""LoRA on a dq-quantized pipeline (tiny SD3, random weights): diffusers' load_lora_weights /
set_adapters / disable_lora / unload_lora_weights change the output as on full precision; fuse_lora
is refused; a LoRA naming missing layers is refused by name; static ranges clip under a strong LoRA
(measured); peft adapters on a quantized model train (straight-through gradients)."""

import copy

import pytest
import torch
from diffusers import StableDiffusion3Pipeline
from peft import LoraConfig, get_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer

import dq
from dq.errors import DQError
from dq.nn import QuantModule
from dq.nn.lora import measure_clipping
from dq.testing.tiny import default_call_kwargs, prompt_kwargs, prompts_for, tiny_pipeline

KIND = "sd3"
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.2"]


def latents(pipe) -> torch.Tensor:
    kw = {**default_call_kwargs(KIND), "output_type": "latent"}
    return pipe(**prompt_kwargs(KIND, 1), generator=torch.Generator().manual_seed(0), **kw).images


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def quantize(pipe, recipe="w8a8"):
    kw = default_call_kwargs(KIND)
    kw.pop("num_inference_steps")
    kw.pop("output_type")
    return dq.quantize(pipe, recipe, calib_prompts=prompts_for(KIND, 2), num_inference_steps=2, **kw)


def lora_state_dict(scale: float = 1.0) -> dict[str, torch.Tensor]:
    """A random (non-zero) peft LoRA for the tiny SD3 transformer, `scale` times its B matrices."""
    model = copy.deepcopy(tiny_pipeline(KIND).transformer)
    torch.manual_seed(1)
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS, init_lora_weights=False))
    state = get_peft_model_state_dict(model)
    return {k: v * scale if ".lora_B." in k else v for k, v in state.items()}


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("lora")
    StableDiffusion3Pipeline.save_lora_weights(path, transformer_lora_layers=lora_state_dict())
    return path


@pytest.fixture(scope="module")
def pipes():
    return tiny_pipeline(KIND), quantize(tiny_pipeline(KIND))


def test_lora_changes_the_output_as_on_full_precision(pipes, lora_dir):
    fp, q = pipes
    keys = set(q.transformer.state_dict())
    fp0, q0 = latents(fp), latents(q)
    quant_error = rel(q0, fp0)
    for pipe in (fp, q):
        pipe.load_lora_weights(lora_dir, adapter_name="a")
    wrapped = q.transformer.transformer_blocks[0].attn.to_q
    assert isinstance(wrapped, BaseTunerLayer) and isinstance(wrapped.base_layer, QuantModule)
    assert wrapped.lora_A["a"].weight.dtype == torch.float32  # high precision beside the int8 layer
    fp1, q1 = latents(fp), latents(q)
    assert rel(fp1, fp0) > 10 * quant_error  # the LoRA does something the test can see
    assert rel(q1 - q0, fp1 - fp0) < 0.25  # the same change as on full precision
    assert rel(q1, fp1) < 4 * quant_error  # within (a few times) the quantization error

    for pipe in (fp, q):
        pipe.set_adapters(["a"], [0.5])
    fp_half, q_half = latents(fp), latents(q)
    assert rel(q_half - q0, fp_half - fp0) < 0.25
    assert 0.3 < rel(q_half, q0) / rel(q1, q0) < 0.7  # about half the change

    q.disable_lora()
    assert torch.equal(latents(q), q0)
    q.enable_lora()
    assert torch.equal(latents(q), q_half)

    with pytest.raises(DQError, match=r"fuse_lora .* refused.*requantized.*dequantize"):
        q.fuse_lora()
    assert torch.equal(latents(q), q_half)  # nothing merged, nothing cast

    for pipe in (fp, q):
        pipe.unload_lora_weights()
    assert torch.equal(latents(q), q0)
    assert set(q.transformer.state_dict()) == keys  # no `weight` entry appeared, none went missing
    assert not any(isinstance(m, BaseTunerLayer) for m in q.transformer.modules())


def test_peft_merge_is_refused(pipes):
    """Below diffusers' fuse_lora: peft's own merge writes `base_layer.weight.data`, which a
    quantized layer refuses instead of silently changing a dequantized copy."""
    _, q = pipes
    layer = next(m for m in q.transformer.modules() if isinstance(m, QuantModule))
    weight = layer.weight
    assert weight.shape == (layer.out_features, layer.in_features) and weight.dtype == torch.float32
    with pytest.raises(DQError, match="cannot be written back"):
        weight.data += 1.0
    with pytest.raises(DQError, match="cannot be written back"):
        layer.weight.data = torch.zeros_like(weight)


def test_lora_for_missing_layers_is_refused(pipes):
    _, q = pipes
    state = lora_state_dict()
    bad = {k.replace("transformer_blocks.0.attn.to_q", "transformer_blocks.7.attn.to_q"): v for k, v in state.items()}
    with pytest.raises(DQError, match=r"does not have: transformer_blocks\.7\.attn\.to_q; it was made for another model"):
        q.load_lora_weights({f"transformer.{k}": v for k, v in bad.items()}, adapter_name="bad")
    assert not any(isinstance(m, BaseTunerLayer) for m in q.transformer.modules())


def test_strong_lora_clips_static_ranges(pipes, capsys):
    """Measured, not fixed: the fraction of static-range inputs outside the calibrated range grows
    with a strong LoRA (printed for README/BENCHMARKS)."""
    _, q = pipes
    with measure_clipping(q.transformer) as without:
        latents(q)
    q.load_lora_weights({f"transformer.{k}": v for k, v in lora_state_dict(scale=8.0).items()}, adapter_name="strong")
    try:
        with measure_clipping(q.transformer) as with_lora:
            latents(q)
    finally:
        q.unload_lora_weights()
    assert sum(with_lora.total.values()) == sum(without.total.values()) > 0
    assert with_lora.fraction > without.fraction
    with capsys.disabled():
        print(f"\nclipped static-range inputs: {without.fraction:.5%} without LoRA, {with_lora.fraction:.5%} with a "
              f"strong LoRA (B x 8); worst layers with it: {with_lora.worst(3)}")


def _denoiser_call(pipe) -> tuple[tuple, dict]:
    """The arguments of the pipeline's first denoiser call (tensors detached)."""
    seen = {}

    def grab(module, args, kwargs):
        seen.setdefault("call", (args, kwargs))

    handle = pipe.transformer.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        latents(pipe)
    finally:
        handle.remove()
    return seen["call"]


@pytest.mark.parametrize("recipe", ["w8a8", "w4a16"])
def test_adapters_train_on_a_quantized_model(recipe):
    """peft's add_adapter on a quantized model: a backward pass gives non-zero gradients to every
    adapter, the first block's included (all its paths to the loss go through quantized layers), and
    to nothing else; the gradients point where full precision's do (straight-through backward)."""
    fp, q = tiny_pipeline(KIND), quantize(tiny_pipeline(KIND), recipe)
    args, kwargs = _denoiser_call(q)
    grads = {}
    for name, pipe in (("fp", fp), ("q", q)):
        model = pipe.transformer
        torch.manual_seed(2)
        model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS, init_lora_weights=False))
        model.train()
        out = model(*args, **{**kwargs, "return_dict": False})[0]
        out.float().pow(2).mean().backward()
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        assert trainable and all("lora_" in n for n in trainable)
        grads[name] = {n: p.grad for n, p in trainable.items()}
        model.eval()
    q_grads = grads["q"]
    assert all(g is not None and g.abs().sum() > 0 for g in q_grads.values()), [n for n, g in q_grads.items() if g is None]
    first = [n for n in q_grads if n.startswith("transformer_blocks.0.attn.to_q.lora_A")]
    assert first and q_grads[first[0]].abs().sum() > 0
    q_flat = torch.cat([q_grads[n].flatten() for n in sorted(q_grads)])
    fp_flat = torch.cat([grads["fp"][n].flatten() for n in sorted(q_grads)])
    assert torch.nn.functional.cosine_similarity(q_flat, fp_flat, dim=0) > 0.9
    for module in q.transformer.modules():
        if isinstance(module, QuantModule):
            assert all(b.grad is None for b in module.buffers(recurse=False))


@pytest.mark.parametrize("entry", ["pipeline", "model"])
def test_flux_lora(entry):
    """FluxPipeline.load_lora_weights (diffusers' Flux loader reads each target's `.weight` from the
    state dict, which a dq model does not hold: dq routes that step for its models) and the model's
    own load_lora_adapter: both load, and change the output as on full precision."""
    kind = "flux"
    kw = {**default_call_kwargs(kind), "output_type": "latent"}

    def run(pipe):
        return pipe(**prompt_kwargs(kind, 1), generator=torch.Generator().manual_seed(0), **kw).images

    model = copy.deepcopy(tiny_pipeline(kind).transformer)
    torch.manual_seed(1)
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False))
    state = {f"transformer.{k}": v for k, v in get_peft_model_state_dict(model).items()}
    calib = {k: v for k, v in default_call_kwargs(kind).items() if k not in ("num_inference_steps", "output_type")}
    fp = tiny_pipeline(kind)
    q = dq.quantize(tiny_pipeline(kind), "w8a8", calib_prompts=prompts_for(kind, 2), num_inference_steps=2, **calib)
    fp0, q0 = run(fp), run(q)
    for pipe in (fp, q):
        if entry == "pipeline":
            pipe.load_lora_weights(dict(state), adapter_name="a")
        else:
            pipe.transformer.load_lora_adapter(dict(state), prefix="transformer", adapter_name="a")
    fp1, q1 = run(fp), run(q)
    assert rel(fp1, fp0) > 10 * rel(q0, fp0)
    assert rel(q1 - q0, fp1 - fp0) < 0.25
    if entry == "pipeline":
        q.unload_lora_weights()
        torch.testing.assert_close(run(q), q0, rtol=0, atol=0)


def test_flux_lora_wider_than_a_quantized_layer_is_refused():
    from diffusers import FluxPipeline

    calib = {k: v for k, v in default_call_kwargs("flux").items() if k not in ("num_inference_steps", "output_type")}
    q = dq.quantize(tiny_pipeline("flux"), "w4a16", calib_prompts=prompts_for("flux", 1), num_inference_steps=1, **calib)
    name = next(n for n, m in q.transformer.named_modules() if isinstance(m, QuantModule) and n.endswith("attn.to_q"))
    width = q.transformer.get_submodule(name).in_features
    state = {f"transformer.{name}.lora_A.weight": torch.randn(4, width + 8),
             f"transformer.{name}.lora_B.weight": torch.randn(width, 4)}
    with pytest.raises(DQError, match="widens a layer's input"):
        FluxPipeline._maybe_expand_lora_state_dict(q.transformer, state)
    narrow = {f"transformer.{name}.lora_A.weight": torch.ones(4, width - 8)}
    out = FluxPipeline._maybe_expand_lora_state_dict(q.transformer, narrow)[f"transformer.{name}.lora_A.weight"]
    assert out.shape == (4, width) and out[:, : width - 8].eq(1).all() and out[:, width - 8:].eq(0).all()


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("execution", ["sim", "auto"])
def test_straight_through_input_gradient(kind, execution):
    """A quantized layer's input gradient is the float op's with the dequantized weight, whichever
    kernel ran forward (the integer matmul has no backward of its own)."""
    from dq.kernels import set_execution
    from dq.nn import QuantConv2d, QuantLinear

    torch.manual_seed(0)
    weight_spec = dq.QuantSpec(bits=8, granularity="channel")
    act_spec = dq.QuantSpec(bits=8, granularity="token", symmetric=False, dynamic=True)
    if kind == "linear":
        layer = QuantLinear.from_float(torch.nn.Linear(64, 32), weight_spec, act_spec)
        x = torch.randn(4, 64, requires_grad=True)
        op = lambda t, w: torch.nn.functional.linear(t, w, layer.bias)  # noqa: E731
    else:
        layer = QuantConv2d.from_float(torch.nn.Conv2d(16, 8, 1), weight_spec, act_spec)
        x = torch.randn(2, 16, 5, 5, requires_grad=True)
        op = lambda t, w: torch.nn.functional.conv2d(t, w, layer.bias)  # noqa: E731
    set_execution(torch.nn.Sequential(layer), execution)
    grad = torch.randn_like(layer(x.detach()))
    layer(x).backward(grad)
    ref = x.detach().clone().requires_grad_()
    op(ref, layer.dequantized_weight()).backward(grad)
    torch.testing.assert_close(x.grad, ref.grad)
    with torch.no_grad():  # inference: the quantized op alone, no autograd Function in the way
        torch.testing.assert_close(layer(x), layer.compute(x))


# -- a LoRA merged with the low-rank branch --------------------------------------------------------


def branch_layer_with_loras(smooth: bool, execution: str):
    """A w4a4-format quantized linear layer with a rank-8 branch (and smoothing), in a module that
    peft wraps with two random LoRAs (rank 4 and 2, different alphas)."""
    from peft import inject_adapter_in_model

    from dq.kernels import set_execution
    from dq.nn import QuantLinear
    from dq.nn.transforms import InputTransform, LowRankBranch
    from dq.quant.spec import QuantSpec

    torch.manual_seed(0)
    branch = LowRankBranch(64, 48, 8)
    branch.down.normal_(0, 0.1)
    branch.up.normal_(0, 0.1)
    transform = None
    if smooth:
        transform = InputTransform(64, smooth=True)
        transform.inv_scale.uniform_(0.5, 2.0)
    q = QuantLinear.from_float(
        torch.nn.Linear(64, 48), QuantSpec(bits=4, granularity="group", group_size=32),
        QuantSpec(bits=4, granularity="token", symmetric=False, dynamic=True), branch=branch, input_transform=transform,
    )
    set_execution(q, execution)
    model = torch.nn.Module()
    model.proj = q
    for name, r, alpha in (("a", 4, 8), ("b", 2, 2)):
        inject_adapter_in_model(LoraConfig(r=r, lora_alpha=alpha, target_modules=["proj"], init_lora_weights=False),
                                model, adapter_name=name)
    model.proj.set_adapter(["a", "b"])
    return model


@pytest.mark.parametrize("smooth", [False, True])
@pytest.mark.parametrize("execution", ["sim", "real"])
def test_lora_merged_with_the_branch_computes_the_unmerged_function(smooth, execution):
    from peft.tuners.lora.layer import Linear as LoraLinear

    from dq.nn.lora import BranchMergedLora, merge_with_branches

    model = branch_layer_with_loras(smooth, execution)
    x = torch.randn(3, 7, 64)
    with torch.no_grad():
        unmerged = model.proj(x)  # peft: quantized layer (+ its branch), then each LoRA pair
        base = model.proj.base_layer(x)
        assert merge_with_branches(model) == 1 and isinstance(model.proj, BranchMergedLora)
        calls = []
        model.proj._dq_combined = lambda t, f=model.proj._dq_combined: calls.append(1) or f(t)
        merged = model.proj(x)
        assert calls and rel(merged, unmerged) < 1e-6
        assert rel(unmerged, base) > 1e-2  # the LoRAs matter
        model.proj.scaling["b"] *= 3.0  # set_adapters(weights=...) changes the scaling: read per call
        rescaled = model.proj(x)
        assert rel(rescaled, merged) > 1e-3 and rel(rescaled, LoraLinear.forward(model.proj, x)) < 1e-6
        model.proj.enable_adapters(False)
        torch.testing.assert_close(model.proj(x), base, rtol=0, atol=0)


def test_lora_stays_separate_where_the_merge_would_not_be_exact():
    from dq.nn.lora import merge_with_branches

    model = branch_layer_with_loras(False, "sim")
    model.proj.base_layer.branch = None  # no branch: nothing to merge with
    assert merge_with_branches(model) == 0
    model = branch_layer_with_loras(False, "sim")
    x = torch.randn(4, 64, requires_grad=True)
    merge_with_branches(model)
    y = model.proj(x)  # grad enabled: peft's own path, which trains
    y.sum().backward()
    assert model.proj.lora_A["a"].weight.grad is not None and x.grad is not None


def test_lora_merged_with_the_branch_compiles_in_one_graph():
    import torch._dynamo.testing

    from dq.nn.lora import merge_with_branches

    model = branch_layer_with_loras(True, "real")
    merge_with_branches(model)
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        eager = model.proj(x)
        counter = torch._dynamo.testing.CompileCounterWithBackend("eager")
        compiled = torch.compile(model.proj, fullgraph=True, backend=counter)
        got = compiled(x)
        with torch._dynamo.config.patch(error_on_recompile=True):
            compiled(x + 1)
    assert counter.frame_count == 1
    torch.testing.assert_close(got, eager, rtol=0, atol=1e-5)


def test_load_lora_weights_merges_with_the_branches_of_a_w4a4_model():
    from peft.tuners.lora.layer import Linear as LoraLinear

    from dq.nn.lora import BranchMergedLora, mergeable

    q = quantize(tiny_pipeline(KIND), "w4a4")
    branched = {n for n, m in q.transformer.named_modules() if mergeable(m)}
    assert branched
    before = latents(q)
    q.load_lora_weights({f"transformer.{k}": v for k, v in lora_state_dict().items()}, adapter_name="a")
    wrapped = {n: m for n, m in q.transformer.named_modules() if isinstance(m, LoraLinear)}
    merged = {n for n, m in wrapped.items() if isinstance(m, BranchMergedLora)}
    assert merged and merged == {n for n, m in wrapped.items() if mergeable(m.base_layer)}
    with_lora = latents(q)
    assert rel(with_lora, before) > 1e-3
    q.disable_lora()
    torch.testing.assert_close(latents(q), before, rtol=0, atol=0)
    q.enable_lora()
    torch.testing.assert_close(latents(q), with_lora, rtol=0, atol=0)
    q.unload_lora_weights()
    assert not any(isinstance(m, LoraLinear) for m in q.transformer.modules())
