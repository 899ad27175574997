"""Real execution of single layers: agreement with the simulated path, fallbacks, errors."""

import logging

import pytest
import torch

from dq.errors import DQError
from dq.kernels import choose_kernel, dispatch, fp8, int8, set_execution
from dq.nn import QuantConv2d, QuantLinear, TimestepRouter
from dq.quant.spec import QuantSpec

W8 = QuantSpec(bits=8)
W4G = QuantSpec(bits=4, granularity="group", group_size=32, range="mse")
A8 = QuantSpec(bits=8, granularity="tensor", symmetric=False)
A8S = QuantSpec(bits=8, granularity="tensor")
TOKEN8 = QuantSpec(bits=8, granularity="token")
TOKEN4 = QuantSpec(bits=4, granularity="token", symmetric=False)
RANGES = [(-3.0, 2.5), (-1.0, 1.2)]  # two timestep groups

FORMATS = {
    "w8a8-asym": (W8, A8),
    "w8a8-sym": (W8, A8S),
    "w4a8-asym": (W4G, A8),
    "w4a8-asym-weights": (W4G.replace(symmetric=False), A8S),
    "w4a8-channel-asym-weights": (QuantSpec(bits=4, granularity="channel", symmetric=False), A8),
    "w8a8-dynamic": (W8, TOKEN8),
    "w4a4-dynamic": (W4G, TOKEN4),
    "w8a8-dynamic-tensor": (W8, QuantSpec(bits=8, granularity="tensor", dynamic=True, symmetric=False)),
    "w4a16": (W4G, None),
    "w8a16": (W8, None),
}


def quantized(layer, weight, act, router=None):
    ranges = RANGES if act is not None and not act.dynamic else None
    cls = QuantConv2d if isinstance(layer, torch.nn.Conv2d) else QuantLinear
    return cls.from_float(layer, weight, act, ranges, router)


def real_and_sim(q, x, **kw):
    set_execution(q, "sim")
    sim = q(x)
    set_execution(q, "real", **kw)
    return q(x), sim


def close(real, sim):
    # same codes, float accumulation order differs; allow an odd rounding tie in the input codes
    return torch.allclose(real, sim, rtol=1e-4, atol=1e-4 * float(sim.abs().max()))


@pytest.mark.parametrize("name", FORMATS)
def test_linear_real_matches_sim(name):
    torch.manual_seed(0)
    weight, act = FORMATS[name]
    router = TimestepRouter(torch.tensor([500.0]))
    q = quantized(torch.nn.Linear(128, 96), weight, act, router)
    x = torch.randn(3, 7, 128)
    set_execution(q, "real")
    paths = dispatch.candidate_paths(q, x.device, x.dtype)
    assert ("int_mm" in paths) == (act is not None) and "dequant" in paths
    for path in paths:
        for group in (0, 1):
            router.index.fill_(group)
            real, sim = real_and_sim(q, x, path=path)
            assert q.kernel == ("dequant" if act is None else "int8")
            assert close(real, sim), f"{name} {path} group {group}: {(real - sim).abs().max()}"


@pytest.mark.parametrize("prepack", [True, False])
def test_cpu_prepacked_and_int_mm_paths_agree(prepack):
    torch.manual_seed(0)
    q = quantized(torch.nn.Linear(64, 48), W8, A8)
    x = torch.randn(5, 64)
    real, sim = real_and_sim(q, x, cpu_prepack=prepack, path="onednn")
    assert (getattr(q, "_dq_prepacked", None) is not None) == prepack
    assert close(real, sim)


CONVS = {
    "1x1": dict(kernel_size=1),
    "1x1-stride2": dict(kernel_size=1, stride=2),
    "3x3-pad": dict(kernel_size=3, padding=1),
    "3x3-stride2": dict(kernel_size=3, padding=1, stride=2),
    "3x3-dilated-same": dict(kernel_size=3, padding="same", dilation=2),
    "3x2-rect": dict(kernel_size=(3, 2), padding=(2, 0)),
    "4x4-same": dict(kernel_size=4, padding="same"),
}


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("geometry", CONVS)
@pytest.mark.parametrize("fmt", ["w8a8-asym", "w4a8-asym", "w8a8-dynamic", "w4a16"])
def test_conv_real_matches_sim(geometry, fmt):
    torch.manual_seed(0)
    weight, act = FORMATS[fmt]
    q = quantized(torch.nn.Conv2d(32, 24, **CONVS[geometry]), weight, act)
    x = torch.randn(2, 32, 11, 9)
    real, sim = real_and_sim(q, x, path="int_mm") if choose_kernel(q)[0] else (None, None)
    if real is None:  # dynamic activations of k x k convs: no kernel
        assert act.dynamic and geometry not in ("1x1", "1x1-stride2")
        return
    assert real.shape == sim.shape
    assert close(real, sim), f"{geometry} {fmt}: {(real - sim).abs().max()}"


def test_grouped_conv_and_formats_without_kernels_run_simulated_in_auto_and_refuse_real(caplog):
    grouped = quantized(torch.nn.Conv2d(8, 8, 3, groups=2), W8, A8)
    fp4 = QuantLinear.from_float(torch.nn.Linear(32, 16), QuantSpec(kind="fp4_e2m1"), QuantSpec(kind="fp8_e4m3"), RANGES)
    act_only = QuantLinear.from_float(torch.nn.Linear(32, 16), None, A8, RANGES)
    model = torch.nn.ModuleDict({"grouped": grouped, "fp4": fp4, "act_only": act_only})
    with pytest.raises(DQError, match="no low-bit kernel.*auto"):
        set_execution(model, "real")
    assert all(m.execution == "sim" for m in model.values()), "a refused mode must change nothing"
    with caplog.at_level(logging.INFO, logger="dq.kernels"):
        set_execution(model, "auto")
    assert all(m.execution == "sim" for m in model.values())
    assert sum("run simulated" in r.message for r in caplog.records) == 3  # one line per reason


def test_shapes_a_kernel_cannot_take_fall_back_with_one_debug_line(monkeypatch, caplog):
    torch.manual_seed(0)
    q = quantized(torch.nn.Linear(40, 24), W8, A8)
    set_execution(q, "real", path="int_mm")
    monkeypatch.setattr(int8, "int_mm_unsupported", lambda m, k, n, device: f"{m} rows (test)")
    with caplog.at_level(logging.DEBUG, logger="dq.kernels"):
        out = [q(torch.randn(3, 40)) for _ in range(3)]
    assert sum("rows (test)" in r.message for r in caplog.records) == 1
    x = torch.randn(3, 40)
    fallback = q(x)
    set_execution(q, "sim")
    assert all(o.shape == (3, 24) for o in out) and torch.equal(fallback, q(x))


def test_cuda_int_mm_rules():
    cuda = torch.device("cuda")
    assert int8.int_mm_unsupported(16, 64, 64, cuda) is not None
    assert int8.int_mm_unsupported(17, 60, 64, cuda) is not None
    assert int8.int_mm_unsupported(17, 64, 36, cuda) is not None
    assert int8.int_mm_unsupported(17, 64, 64, cuda) is None
    assert int8.int_mm_unsupported(1, 3, 5, torch.device("cpu")) is None


def test_tiny_batches_and_odd_widths_on_cpu_stay_exact():
    torch.manual_seed(0)
    q = quantized(torch.nn.Linear(37, 13), W8, A8)
    for rows in (1, 2, 17):
        real, sim = real_and_sim(q, torch.randn(rows, 37))
        assert close(real, sim)


FP8 = (QuantSpec(kind="fp8_e4m3"), QuantSpec(kind="fp8_e4m3", granularity="tensor"))


def test_fp8_real_without_a_capable_device_names_the_alternatives(monkeypatch):
    monkeypatch.setattr(fp8, "any_device", lambda: False)
    q = quantized(torch.nn.Linear(64, 32), *FP8)
    assert choose_kernel(q) == ("fp8", "")
    with pytest.raises(DQError, match=r"compute capability >= 8\.9.*sim.*int8"):
        set_execution(q, "real")
    set_execution(q, "auto")  # CPU fallback rule: fp8 layers run simulated, same numbers as sim
    x = torch.randn(4, 64)
    auto = q(x)
    set_execution(q, "sim")
    assert torch.equal(auto, q(x))


def test_fp8_strict_real_on_a_cpu_tensor_raises(monkeypatch):
    monkeypatch.setattr(fp8, "any_device", lambda: True)  # e.g. quantized on CPU for a GPU
    q = quantized(torch.nn.Linear(64, 32), *FP8)
    set_execution(q, "real")
    with pytest.raises(DQError, match="cpu has no fp8 matmul.*execution: sim"):
        q(torch.randn(4, 64))


def test_unknown_mode_is_refused():
    with pytest.raises(DQError, match="unknown execution mode"):
        set_execution(torch.nn.Linear(2, 2), "fast")


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("name", ["w8a8-asym", "w4a8-asym", "w8a8-dynamic", "w4a16"])
def test_cuda_int8_real_matches_sim(name):
    torch.manual_seed(0)
    weight, act = FORMATS[name]
    q = quantized(torch.nn.Linear(256, 128), weight, act).cuda()
    real, sim = real_and_sim(q, torch.randn(64, 256, device="cuda"))
    assert close(real, sim)
    small, small_sim = real_and_sim(q, torch.randn(4, 256, device="cuda"))  # M <= 16: fallback
    assert torch.allclose(small, small_sim)


@cuda
@pytest.mark.skipif(torch.cuda.is_available() and fp8.device_unsupported(torch.device("cuda")) is not None,
                    reason="needs compute capability >= 8.9")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_fp8_real_matches_sim(dtype):
    torch.manual_seed(0)
    q = quantized(torch.nn.Linear(256, 128), *FP8).cuda()
    x = torch.randn(64, 256, device="cuda", dtype=dtype)
    q.bias.data = q.bias.data.to(dtype)
    real, sim = real_and_sim(q, x)
    assert q.kernel == "fp8" and real.dtype == dtype
    assert torch.allclose(real.float(), sim.float(), rtol=2e-2, atol=2e-2 * float(sim.abs().max()))


def test_dispatch_exports():
    assert dispatch.EXECUTION_MODES == ("auto", "real", "sim")


def test_real_layers_deepcopy_and_pickle():
    import copy
    import io

    torch.manual_seed(0)
    q = quantized(torch.nn.Linear(64, 32), W8, A8)
    set_execution(q, "real", path="onednn")
    x = torch.randn(4, 64)
    q(x)
    clone = copy.deepcopy(q)
    assert clone._dq_prepacked is not q._dq_prepacked and torch.equal(clone(x), q(x))
    buffer = io.BytesIO()
    torch.save(q, buffer)
    buffer.seek(0)
    assert torch.equal(torch.load(buffer, weights_only=False)(x), q(x))


@pytest.mark.parametrize("name", ["w8a8-asym", "w4a8-asym", "w8a8-dynamic", "w4a16"])
def test_bfloat16_models_keep_their_dtype_and_match_sim(name):
    torch.manual_seed(0)
    weight, act = FORMATS[name]
    q = quantized(torch.nn.Linear(64, 32), weight, act).to(torch.bfloat16)
    assert q.wscale.dtype == torch.float32  # storage keeps its dtypes through .to(dtype)
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    real, sim = real_and_sim(q, x)
    assert real.dtype == sim.dtype == torch.bfloat16
    assert torch.allclose(real.float(), sim.float(), rtol=2e-2, atol=2e-2 * float(sim.abs().max()))


def test_static_int8_codes_fast_and_portable_paths_equal_the_reference(monkeypatch):
    """`int8.quantize_static`'s fast path (torch's per-tensor int8 quantizer) and its portable
    passes give exactly `primitives.quantize`'s codes (and `fake_quantize_static` its values): values placed on rounding ties, clipped
    values, a channels-last input; the symmetric range (-127) never takes the fast path."""
    from dq.quant import primitives as P

    asym = QuantSpec(bits=8, granularity="tensor", symmetric=False)
    sym = QuantSpec(bits=8, granularity="tensor", symmetric=True)
    torch.manual_seed(0)
    scale, zero = torch.tensor([0.037]), torch.tensor([-5.0])
    ties = (torch.arange(-300, 300, dtype=torch.float32) + 0.5) * scale  # includes out-of-range values
    rows = torch.cat([ties.reshape(-1, 60), torch.randn(40, 60) * 3])
    conv_input = (torch.randn(2, 16, 5, 5) * 3).contiguous(memory_format=torch.channels_last)
    for x in (rows, conv_input):
        for spec, z in ((asym, zero), (sym, None)):
            ref = P.quantize(x, scale, z, spec).to(torch.int8)
            monkeypatch.setattr(int8, "_QPT", None)
            fast = int8.quantize_static(x, scale, z, spec)
            assert int8._QPT is not False
            assert torch.equal(fast, ref)
            faked = int8.fake_quantize_static(x, scale, z, spec)  # the simulated layers' fast path
            if spec.symmetric:
                assert faked is None
            else:
                assert torch.equal(faked, P.dequantize(ref.float(), scale, z))
            monkeypatch.setattr(int8, "_QPT", False)  # torch without the quantizer: portable passes
            assert torch.equal(int8.quantize_static(x, scale, z, spec), ref)
    assert int8._fast_codes(rows, scale, None, sym) is None
    assert int8._fast_codes(rows.bfloat16(), scale, zero, asym) is None


@pytest.mark.parametrize("path", ["int_mm", "int8_copy"])
def test_static_eager_path_follows_the_group_and_in_place_changes(path):
    """The CPU eager static path keeps each timestep group's (scale, zero, column scale,
    shift) precomputed (`runners.static_table`): every group must give the simulated
    result, and ranges or a bias changed in place afterwards (set_act_ranges,
    load_state_dict) must be picked up, not served stale."""
    from dq.nn.transforms import InputTransform

    torch.manual_seed(0)
    weight = W8 if path == "int_mm" else W4G
    router = TimestepRouter(torch.tensor([500.0]), groups=2)
    smooth = InputTransform(64, smooth=True)
    smooth.inv_scale.uniform_(0.5, 2.0)
    q = QuantLinear.from_float(torch.nn.Linear(64, 48), weight, A8, RANGES, router, input_transform=smooth)
    x = torch.randn(2, 40, 64)

    def check():
        for t in (900.0, 100.0):
            router.set_timestep(torch.tensor([t]))
            set_execution(q, "sim")
            sim = q(x)
            set_execution(q, "real", path=path)
            real = q(x)
            assert "_dq_static" in q.__dict__  # the eager static path ran
            assert close(real, sim), (path, t)
        return real

    with torch.no_grad():
        before = check()
        q.set_act_ranges([(-0.5, 0.7), (-2.0, 4.0)])
        q.bias.add_(1.0)
        after = check()
        assert not torch.allclose(before, after)
        state = {k: v.clone() for k, v in q.state_dict().items()}
        q.set_act_ranges(RANGES)
        set_execution(q, "real", path=path)
        q(x)
        q.load_state_dict(state)  # copies in place into the same buffers
        real = q(x)  # real again without set_execution: the table must notice
        set_execution(q, "sim")
        assert close(real, q(x))
