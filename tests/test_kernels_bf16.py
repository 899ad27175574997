"""Path "bf16": weight-only layers run their op in bfloat16 from a float32 input (opt-in per
recipe, on in the w4a16 preset), checked against a float32 simulation of its roundings."""

import pytest
import torch
from conftest import favour_path

from dq.kernels import choice, dispatch, runners, set_execution
from dq.nn import QuantConv2d, QuantLinear
from dq.nn.transforms import LowRankBranch
from dq.quant.spec import QuantSpec
from dq.recipe import Recipe, preset

W4G = QuantSpec(bits=4, granularity="group", group_size=32, range="mse")
W8 = QuantSpec(bits=8)
A8 = QuantSpec(bits=8, granularity="tensor", symmetric=False)
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def cache_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("DQ_CACHE_DIR", str(tmp_path))
    return tmp_path


def weight_only(weight=W4G, width=128, out=96, rank=0, bias=True):
    torch.manual_seed(0)
    branch = None
    if rank:
        branch = LowRankBranch(width, out, rank)
        branch.down.normal_(0, 0.1)
        branch.up.normal_(0, 0.1)
    return QuantLinear.from_float(torch.nn.Linear(width, out, bias=bias), weight, None, None, branch=branch)


def rel(a, b):
    return float((a - b).norm() / b.norm())


def test_bf16_is_opt_in_and_on_in_the_w4a16_preset_only():
    q = weight_only()
    set_execution(q, "real")
    assert "bf16" not in dispatch.candidate_paths(q, CPU, torch.float32)
    set_execution(q, "real", path="bf16")  # not allowed: the forced path is ignored
    assert q.__dict__.get("_dq_forced_path") is None
    set_execution(q, "real", weight_only_bf16=True)
    assert "bf16" in dispatch.candidate_paths(q, CPU, torch.float32)
    # only from a float32 input (a bfloat16 or float16 model runs its dtype's float op anyway)
    assert "bf16" not in dispatch.candidate_paths(q, CPU, torch.bfloat16)
    # from the model's recipe when not given
    model = torch.nn.Sequential(weight_only())
    model._dq_recipe = preset("w4a16")
    set_execution(model, "real")
    assert "bf16" in dispatch.candidate_paths(model[0], CPU, torch.float32)
    assert preset("w4a16").weight_only_bf16_activations is True
    # on in every calibrated W*A* preset (their weight-only layers), off in the baselines and w8a16
    assert all(preset(p).weight_only_bf16_activations for p in ("w8a8", "w8a8-dynamic", "w4a8", "w4a4"))
    assert not any(preset(p).weight_only_bf16_activations for p in ("w8a16", "w8a8-rtn", "w4a8-rtn", "w4a4-rtn", "fp8"))
    assert Recipe.from_dict({"base": "w4a16", "weight_only_bf16_activations": False}).weight_only_bf16_activations is False


def test_bf16_never_applies_to_layers_with_quantized_activations():
    q = QuantLinear.from_float(torch.nn.Linear(64, 32), W8, A8, [(-3.0, 3.0)])
    set_execution(q, "real", weight_only_bf16=True)
    assert "bf16" not in dispatch.candidate_paths(q, CPU, torch.float32)


def test_bf16_flag_must_be_a_bool():
    with pytest.raises(Exception, match="weight_only_bf16_activations"):
        Recipe.from_dict({"base": "w4a16", "weight_only_bf16_activations": "yes"})


@pytest.mark.parametrize("weight", [W4G, W8], ids=["w4", "w8"])
@pytest.mark.parametrize("rank", [0, 8])
def test_bf16_matches_its_simulation_and_stays_close_to_float(weight, rank):
    q = weight_only(weight, rank=rank)
    x = torch.randn(2, 50, 128)
    set_execution(q, "sim")
    sim = q(x)
    set_execution(q, "real", path="bf16", weight_only_bf16=True)
    assert q.__dict__["_dq_forced_path"] == "bf16"
    real = q(x)
    assert real.dtype == torch.float32 and real.shape == sim.shape
    expected = runners.simulated_bf16(q, x) + (q.branch(x) if rank else 0)
    assert rel(real, expected) < 1e-4  # the same function as its simulation (summation order only)
    # and the stated cost: bfloat16 roundings of input, weight and product, about 50 dB here
    sqnr = 10 * torch.log10(sim.pow(2).sum() / (real - sim).pow(2).sum())
    assert 40 < float(sqnr) < 70
    assert dispatch.runtime_nbytes(q) == 0  # the weight is dequantized per call: no copy kept


def test_bf16_simulation_rounds_what_it_says():
    q = weight_only(bias=True)
    x = torch.randn(7, 128)
    # 4-bit groups on two-level scales: exact int8 weights (no weight rounding), product rounded
    # to bfloat16, then the channel scale and the bias in float32
    layout = q.weight_layout
    assert layout.integer_matmul_ready
    ints = layout.integer_weight(q.qweight, q.wzero, q.wmult).float()
    assert torch.equal(ints.bfloat16().float(), ints)  # exact in bfloat16
    manual = (x.bfloat16().float() @ ints.t()).bfloat16().float() * layout.channel_scale(q.wscale) + q.bias
    assert torch.allclose(runners.simulated_bf16(q, x), manual, rtol=0, atol=0)
    # the same integers times their scale are the layer's weight
    assert torch.allclose(ints * layout.channel_scale(q.wscale)[:, None], q.dequantized_weight(), rtol=1e-6, atol=0)
    # without a bias
    nb = weight_only(bias=False)
    ints = nb.weight_layout.integer_weight(nb.qweight, nb.wzero, nb.wmult).float()
    assert torch.equal(runners.simulated_bf16(nb, x),
                       (x.bfloat16().float() @ ints.t()).bfloat16().float() * nb.weight_layout.channel_scale(nb.wscale))
    # a layout without exact integer weights (log codes): the dequantized weight rounded to bfloat16
    lg = weight_only(QuantSpec(bits=4, log=True))
    assert not lg.weight_layout.integer_matmul_ready
    w = lg.dequantized_weight(torch.bfloat16).float()
    assert torch.equal(runners.simulated_bf16(lg, x), (x.bfloat16().float() @ w.t()).bfloat16().float() + lg.bias)
    set_execution(lg, "real", path="bf16", weight_only_bf16=True)
    assert rel(lg(x), runners.simulated_bf16(lg, x)) < 1e-4


def test_bf16_on_a_pointwise_convolution_adds_the_bias_per_channel():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(64, 32, 1)
    q = QuantConv2d.from_float(conv, QuantSpec(bits=4, granularity="group", group_size=32), None, None)
    x = torch.randn(2, 64, 5, 5)
    set_execution(q, "real", path="bf16", weight_only_bf16=True)
    real = q(x)
    assert rel(real, runners.simulated_bf16(q, x)) < 1e-4
    set_execution(q, "sim")
    assert rel(real, q(x)) < 1e-2


def test_the_chooser_checks_bf16_against_its_own_reference(monkeypatch):
    q = weight_only()
    set_execution(q, "real", weight_only_bf16=True)
    seen = favour_path(monkeypatch, "bf16")
    q(torch.randn(64, 128))
    # not dropped as "wrong" against the float32 layer, whose function it does not compute
    assert q._dq_paths[64] == "bf16" and "bf16" in seen


def test_a_wrong_bf16_result_is_dropped(monkeypatch):
    q = weight_only()
    set_execution(q, "real", weight_only_bf16=True)
    # the float32 layer's own result is not path bf16's function beyond 1e-3: dropped as wrong
    monkeypatch.setitem(runners.RUN, "bf16", lambda layer_, x: layer_.simulated(x) + 0.05 * x[..., :96])
    q(torch.randn(32, 128))
    found = next(iter(choice.cache().entries.values()))
    assert "wrong result" in found.dropped["bf16"]
    assert q._dq_paths[32] != "bf16"


def test_bf16_under_torch_compile():
    q = weight_only(rank=4)
    set_execution(q, "real", path="bf16", weight_only_bf16=True)
    x = torch.randn(24, 128)
    eager = q(x)
    compiled = torch.compile(q, fullgraph=True)
    assert rel(compiled(x), eager) < 1e-3
