import pytest
import torch

from dq.errors import DQError
from dq.quant import primitives as P
from dq.quant.spec import QuantSpec


def sqnr(x, y):
    return float(10 * torch.log10(x.pow(2).mean() / (x - y).pow(2).mean()))


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("symmetric", [True, False])
def test_integer_codes_in_range_and_error_shrinks_with_bits(bits, symmetric):
    torch.manual_seed(0)
    x = torch.randn(16, 64) + (0 if symmetric else 1.5)
    spec = QuantSpec(bits=bits, symmetric=symmetric)
    codes, scale, zero = P.quantize_tensor(x, spec)
    assert codes.dtype == torch.int8
    assert int(codes.min()) >= spec.qmin and int(codes.max()) <= spec.qmax
    assert len(torch.unique(codes)) <= 2**bits
    y = P.dequantize_tensor(codes, scale, zero, spec)
    # uniform quantization: max error is half a step inside the range (minmax never clips)
    step = scale.expand(-1, 64)
    assert torch.all((x - y).abs() <= step / 2 + 1e-5)
    if bits < 8:
        finer = P.fake_quantize(x, QuantSpec(bits=bits + 1, symmetric=symmetric))
        assert sqnr(x, finer) > sqnr(x, y)


def test_asymmetric_beats_symmetric_on_one_sided_data():
    x = torch.rand(8, 256) * 3
    sym = P.fake_quantize(x, QuantSpec(bits=4))
    asym = P.fake_quantize(x, QuantSpec(bits=4, symmetric=False))
    assert sqnr(x, asym) > sqnr(x, sym) + 3


@pytest.mark.parametrize(
    ("granularity", "n_scales"), [("tensor", 1), ("channel", 8), ("group", 8 * 4), ("token", 8)]
)
def test_granularity_scale_count(granularity, n_scales):
    x = torch.randn(8, 128)
    rows = P.row_view(x, granularity, group_size=32)
    assert rows.shape[0] == n_scales
    spec = QuantSpec(bits=4, granularity=granularity, group_size=32)
    if granularity != "token":
        _, scale, _ = P.quantize_tensor(x, spec)
        assert scale.numel() == n_scales


def test_finer_granularity_is_more_accurate_on_uneven_rows():
    torch.manual_seed(0)
    x = torch.randn(32, 128) * torch.logspace(-2, 1, 32).unsqueeze(1)
    errs = [sqnr(x, P.fake_quantize(x, QuantSpec(bits=4, granularity=g, group_size=32))) for g in ("tensor", "channel", "group")]
    assert errs[0] < errs[1] < errs[2]


def test_per_token_handles_channel_dim():
    x = torch.randn(2, 16, 4, 4)
    y = P.fake_quantize(x, QuantSpec(bits=8, granularity="token"), channel_dim=1)
    assert y.shape == x.shape and sqnr(x, y) > 35


def test_mse_and_percentile_clip_heavy_tails_better_than_minmax():
    torch.manual_seed(0)
    x = torch.randn(4, 4096)
    x[:, :4] *= 40  # a few huge outliers
    base = sqnr(x, P.fake_quantize(x, QuantSpec(bits=4)))
    mse = sqnr(x, P.fake_quantize(x, QuantSpec(bits=4, range="mse")))
    assert mse > base + 1
    lo, hi = P.select_range(x, QuantSpec(bits=4, range="percentile", percentile=99.0))
    assert torch.all(hi < x.abs().amax(dim=1, keepdim=True))


@pytest.mark.parametrize("kind", ["fp8_e4m3", "fp8_e5m2", "fp4_e2m1"])
def test_float_formats(kind):
    torch.manual_seed(0)
    x = torch.randn(16, 64)
    spec = QuantSpec(kind=kind, granularity="channel")
    codes, scale, _ = P.quantize_tensor(x, spec)
    assert codes.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
    y = P.dequantize_tensor(codes, scale, None, spec)
    assert {"fp8_e4m3": 28, "fp8_e5m2": 22, "fp4_e2m1": 12}[kind] < sqnr(x, y)
    if kind == "fp4_e2m1":
        grid = {0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0}
        assert set(codes.float().abs().unique().tolist()) <= grid


def test_fp4_rounds_to_nearest_grid_value():
    v = torch.tensor([0.2, 0.3, 1.2, 1.3, 2.4, 2.6, 5.1, 7.0, -3.4])
    assert P.fp_quantize(v, "fp4_e2m1").tolist() == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 6.0, 6.0, -3.0]


def test_histogram_ranges():
    torch.manual_seed(0)
    x = torch.randn(100_000)
    x[:10] = 30.0
    hist = torch.histc(x, bins=1024, min=-32, max=32)
    lo, hi = P.range_from_histogram(hist, 32.0, QuantSpec(bits=8, granularity="tensor"))
    assert hi >= 30.0 and lo == -hi
    _, hi_p = P.range_from_histogram(hist, 32.0, QuantSpec(bits=8, granularity="tensor", range="percentile", percentile=99.9))
    assert 2.5 < hi_p < 5
    _, hi_mse = P.range_from_histogram(hist, 32.0, QuantSpec(bits=4, granularity="tensor", range="mse"))
    assert hi_mse < hi
    lo_a, hi_a = P.range_from_histogram(torch.histc(x.clamp(min=0), bins=1024, min=-32, max=32), 32.0, QuantSpec(symmetric=False))
    assert lo_a == 0.0 and hi_a > 29


@pytest.mark.parametrize(
    "kwargs",
    [dict(bits=1), dict(bits=9), dict(bits=4.5), dict(kind="int3"), dict(granularity="row"), dict(range="max"),
     dict(kind="fp8_e4m3", symmetric=False), dict(granularity="group", group_size=1), dict(percentile=20)],
)
def test_invalid_specs_raise_clear_errors(kwargs):
    with pytest.raises(DQError):
        QuantSpec(**kwargs)


def test_group_size_must_divide():
    with pytest.raises(DQError, match="group size"):
        P.row_view(torch.randn(4, 100), "group", 64)


def test_spec_round_trip():
    spec = QuantSpec(bits=4, symmetric=False, granularity="group", group_size=32, range="mse")
    assert QuantSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(DQError, match="unknown quantizer option"):
        QuantSpec.from_dict({"bitz": 4})


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [4, 8])
def test_fake_quantize_rows_in_place_equals_quantize_then_dequantize(bits, symmetric):
    """`fake_quantize_rows`' in-place path gives exactly `dequantize(quantize(...))`, clipped
    values and rounding ties included; with autograd it takes the out-of-place path."""
    spec = QuantSpec(bits=bits, granularity="token", symmetric=symmetric, dynamic=True)
    torch.manual_seed(0)
    rows = torch.randn(64, 96) * 3
    lo, hi = P.select_range(rows, spec)
    lo, hi = lo * 0.7, hi * 0.7  # a clipping range: some values fall outside
    scale, zero = P.qparams(lo, hi, spec)
    rows[:, :8] = (torch.arange(8) - 3.5) * scale  # on rounding ties
    want = P.dequantize(P.quantize(rows, scale, zero, spec), scale, zero)
    assert torch.equal(P.fake_quantize_rows(rows, lo, hi, spec), want)
    leaf = rows.clone().requires_grad_()
    assert torch.equal(P.fake_quantize_rows(leaf, lo, hi, spec).detach(), want)
