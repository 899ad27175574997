"""The cheap paths a checkpoint load takes (issue 13's load-time target): shells built on the meta
device without filling anything, the float parts cast only where a tensor has another dtype, and
the kernel cache scanned once per shape class. Each must give what the slow path gave."""

import copy

import pytest
import torch
from torch import nn

from dq.io import cast_float_parts
from dq.kernels import set_execution
from dq.nn import QuantLinear
from dq.nn.layers import shell_from_plan
from dq.nn.router import TimestepRouter
from dq.nn.transforms import InputTransform, LowRankBranch
from dq.quant.spec import QuantSpec

W4G = QuantSpec(bits=4, granularity="group", group_size=32)
A8 = QuantSpec(bits=8, granularity="tensor", symmetric=False)


@pytest.fixture(autouse=True)
def cache_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("DQ_CACHE_DIR", str(tmp_path))


def quantized(seed=0, width=128, out=96, side=True):
    torch.manual_seed(seed)
    q = QuantLinear.from_float(nn.Linear(width, out), W4G, A8, [(-3.0, 3.0)])
    if side:
        q.input_transform = InputTransform(width, smooth=True)
        q.branch = LowRankBranch(width, out, rank=8)
    return q


def tensors(module):
    return {n: (tuple(t.shape), t.dtype, t.device.type) for n, t in module.state_dict(keep_vars=True).items()}


def test_meta_shells_have_the_real_shells_tensors_and_allocate_nothing():
    entry = quantized().plan_entry()
    specs = {}
    meta = shell_from_plan(entry, (96, 128), True, specs, "meta")
    real = shell_from_plan(entry, (96, 128), True)
    assert {n: s[:2] for n, s in tensors(meta).items()} == {n: s[:2] for n, s in tensors(real).items()}
    assert {s[2] for s in tensors(meta).values()} == {"meta"}
    assert {s[2] for s in tensors(real).values()} == {"cpu"}
    assert set(tensors(meta)) >= {"qweight", "wscale", "ascale", "azero", "input_transform.inv_scale", "branch.down"}
    # the real path still fills (a fresh layer's scales are ones, its codes zeros)
    assert torch.equal(real.input_transform.inv_scale, torch.ones(128)) and not real.qweight.any()
    # a second layer of the same plan reuses the parsed specs, and they equal a fresh parse
    again = shell_from_plan(entry, (96, 128), False, specs, "meta")
    parsed = [k for k in specs if isinstance(k, str)]  # (the memo also keeps one prototype shell per shape)
    assert len(parsed) == 1 and again.weight_spec is meta.weight_spec
    assert meta.weight_spec == real.weight_spec and meta.act_spec == real.act_spec
    assert again.bias is None



def _layout(module):
    """Everything about a module tree but its tensors' identity: classes, attributes, tensors' shapes."""
    out = {}
    for name, m in module.named_modules():
        attrs = {k: v for k, v in m.__dict__.items() if k not in ("_parameters", "_buffers", "_modules")}
        out[name] = (type(m), {k: (type(v), v if not isinstance(v, dict) else dict(v)) for k, v in attrs.items()})
    return out, tensors(module)


@pytest.mark.parametrize("side", [True, False])
def test_copied_meta_shells_equal_built_ones_and_share_no_container(side):
    entry = quantized(side=side).plan_entry()
    specs = {}
    first = shell_from_plan(entry, (96, 128), True, specs, "meta")
    second = shell_from_plan(entry, (96, 128), True, specs, "meta")
    built = shell_from_plan(entry, (96, 128), True, None, "meta")  # no memo: built from the entry
    assert _layout(first) == _layout(second) == _layout(built)
    assert [type(v) for v in specs.values()].count(QuantLinear) == 1  # one prototype, kept aside
    for (name, a), (_, b) in zip(first.named_modules(), second.named_modules()):
        for key in ("_parameters", "_buffers", "_modules", "_forward_hooks", "_forward_pre_hooks", "_non_persistent_buffers_set"):
            assert a.__dict__[key] is not b.__dict__[key], (name, key)
        assert not {id(t) for t in a._buffers.values() if t is not None} & {id(t) for t in b._buffers.values() if t is not None}
    assert first.bias is not second.bias and isinstance(second.bias, nn.Parameter) and not second.bias.requires_grad
    # filling one leaves the other (and the prototype) empty
    first.qweight = torch.zeros_like(first.qweight, device="cpu")
    first.register_forward_hook(lambda *a: None)
    assert second.qweight.is_meta and not second._forward_hooks
    if side:
        first.input_transform.inv_scale = torch.ones(128)
        assert second.input_transform.inv_scale.is_meta
    again = shell_from_plan(entry, (96, 128), True, specs, "meta")
    assert _layout(again) == _layout(built)
    # another shape or bias is another prototype
    other = shell_from_plan(entry, (64, 128), False, specs, "meta")
    assert other.weight_shape == (64, 128) and other.bias is None and other.qweight.shape[0] == 64

class Holder(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = quantized()
        self.plain = nn.Linear(8, 8)
        self.router = TimestepRouter(torch.tensor([500.0]))
        self.register_buffer("table", torch.randn(4), persistent=False)
        self.register_buffer("steps", torch.arange(3), persistent=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_casting_only_what_differs_gives_what_casting_everything_gives(dtype):
    model = Holder()
    model.plain.bias.data = model.plain.bias.data.to(dtype)  # some parts already in dtype (as after a load)
    reference = copy.deepcopy(model)
    nn.Module.to(reference, dtype)
    cast_float_parts(model, dtype)
    got = {n: t.dtype for n, t in [*model.named_parameters(), *model.named_buffers()]}
    want = {n: t.dtype for n, t in [*reference.named_parameters(), *reference.named_buffers()]}
    assert got == want
    assert got["table"] == dtype and got["q.input_transform.inv_scale"] == dtype
    assert got["router.boundaries"] == torch.float32 and got["q.wscale"] == torch.float32  # kept
    assert got["steps"] == torch.int64 and got["q.qweight"] == torch.uint8
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        torch.testing.assert_close(t, dict([*reference.named_parameters(), *reference.named_buffers()])[name], rtol=0, atol=0)


def test_layers_of_one_shape_class_keep_their_own_path_choices():
    model = nn.Sequential(quantized(0, side=False), quantized(1, side=False))
    set_execution(model, "real")
    a, b = model[0], model[1]
    assert a._dq_paths == b._dq_paths == {}
    a._dq_paths[8] = "int8_copy"  # a measurement on one layer (dispatch records them per layer)
    assert 8 not in b._dq_paths
