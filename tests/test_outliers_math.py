"""Outlier handling, pure math: Hadamard rotations, channel transforms, smoothing and its
error model, the low-rank split, GPTQ and the log2 quantizers (no pipelines)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dq.errors import DQError
from dq.nn.layers import QuantConv2d, QuantLinear
from dq.nn.transforms import InputTransform, LowRankBranch, conv_config
from dq.quant import primitives as P
from dq.quant.gptq import gptq_quantize
from dq.quant.hadamard import (
    block_size_for,
    fwht,
    hadamard_matrix,
    random_signs,
    rotate,
    rotation_matrix,
    unrotate,
)
from dq.quant.logquant import (
    fake_log_quantize,
    log2_quantize_probs,
    log_quantize_tensor,
    uniform_quantize_probs,
)
from dq.quant.lowrank import lowrank_split, svd_factors
from dq.quant.smooth import (
    InputStats,
    aggregate_ranges,
    alpha_grid,
    output_error,
    search_alpha,
    smoothing_scales,
    weight_ranges,
)
from dq.quant.spec import QuantSpec
from dq.quant.transform import ChannelTransform


def sqnr(ref, test):
    return float(10 * torch.log10(ref.pow(2).mean() / (ref - test).pow(2).mean()))


# ----------------------------------------------------------------------------- Hadamard


@pytest.mark.parametrize("n", [1, 2, 16, 256, 1024])
def test_hadamard_matrix_is_orthogonal_up_to_scale(n):
    h = hadamard_matrix(n, dtype=torch.float64)
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))


@pytest.mark.parametrize("n", [3, 12, 24, 1152])
def test_hadamard_size_that_cannot_be_built_is_a_clear_error(n):
    with pytest.raises(DQError, match="power of two"):
        hadamard_matrix(n)
    with pytest.raises(DQError, match="power of two"):
        fwht(torch.randn(2, n), n)


@pytest.mark.parametrize(("width", "block"), [(64, 64), (1152, 128), (192, 64), (4096, 4096)])
def test_fast_transform_matches_block_diagonal_matrix(width, block):
    x = torch.randn(3, width, dtype=torch.float64)
    h = hadamard_matrix(block, dtype=torch.float64)
    dense = torch.block_diag(*[h] * (width // block))
    assert torch.allclose(fwht(x, block), x @ dense, atol=1e-9)


def test_block_size_choice_and_errors():
    assert block_size_for(1152) == 128
    assert block_size_for(320) == 64
    assert block_size_for(64, 16) == 16
    with pytest.raises(DQError, match="does not divide"):
        block_size_for(96, 64)
    with pytest.raises(DQError, match="power of two"):
        block_size_for(96, 12)


def test_randomized_rotation_is_orthogonal_and_inverted_by_unrotate():
    signs = random_signs(192, seed=3)
    r = rotation_matrix(signs, 64)
    assert torch.allclose(r @ r.T, torch.eye(192, dtype=torch.float64), atol=1e-12)
    x = torch.randn(5, 192, dtype=torch.float64)
    assert torch.allclose(unrotate(rotate(x, signs, 64), signs, 64), x, atol=1e-12)
    assert torch.equal(random_signs(8, 1), random_signs(8, 1))


def test_linear_layer_is_exactly_invariant_under_rotation_and_smoothing():
    torch.manual_seed(0)
    x, w = torch.randn(32, 128, dtype=torch.float64), torch.randn(16, 128, dtype=torch.float64)
    t = ChannelTransform(torch.rand(128, dtype=torch.float64) + 0.1, random_signs(128, 0), 32)
    assert torch.allclose(t.apply(x) @ t.weight(w).T, x @ w.T, atol=1e-10)


def test_conv_layer_is_exactly_invariant_through_the_matrix_view():
    torch.manual_seed(0)
    conv = nn.Conv2d(64, 8, 3, padding=1).double()
    x = torch.randn(2, 64, 6, 6, dtype=torch.float64)
    t = ChannelTransform(torch.rand(64, dtype=torch.float64) + 0.1, random_signs(64, 1), 64)
    w2 = t.weight(conv.weight.reshape(8, -1), kernel=9).reshape(conv.weight.shape)
    got = F.conv2d(t.apply(x, dim=1), w2, conv.bias, padding=1)
    assert torch.allclose(got, conv(x), atol=1e-10)


def test_second_moment_transforms_like_its_inputs():
    torch.manual_seed(0)
    rows = torch.randn(200, 16 * 4, dtype=torch.float64)
    t = ChannelTransform(torch.rand(16, dtype=torch.float64) + 0.5, random_signs(16, 2), 8)
    moved = t.apply_flat(rows, kernel=4)
    assert torch.allclose(t.moment(rows.T @ rows, kernel=4), moved.T @ moved, atol=1e-9)
    assert torch.allclose(t.moment_diagonal(rows.T @ rows, kernel=4), (moved**2).sum(0), atol=1e-9)


def test_input_transform_module_matches_the_pure_transform():
    t = ChannelTransform(torch.rand(64) + 0.5, random_signs(64, 0), 32)
    module = InputTransform.from_transform(t, 64, -1)
    x = torch.randn(4, 10, 64)
    assert torch.allclose(module(x), t.apply(x), atol=1e-5)
    again = InputTransform.from_config(module.config())
    again.load_state_dict(module.state_dict())
    assert torch.equal(again(x), module(x))


# ----------------------------------------------------------------------------- planted outliers


D_IN, D_OUT, N_TOKENS = 256, 256, 4096
W4 = QuantSpec(bits=4, granularity="group", group_size=64)
A4_STATIC = QuantSpec(bits=4, granularity="tensor")
A4_TOKEN = QuantSpec(bits=4, granularity="token", symmetric=False)


@pytest.fixture(scope="module")
def planted():
    """A linear layer whose input has 4 channels 40x larger than the rest (the diffusion /
    LLM outlier pattern), and its exact output."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N_TOKENS, D_IN, generator=gen)
    x[:, [3, 50, 100, 200]] *= 40
    layer = nn.Linear(D_IN, D_OUT)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(D_OUT, D_IN, generator=gen) / 16)
        layer.bias.zero_()
        ref = layer(x)
    stats = InputStats(
        h=(x.T @ x).double(), count=N_TOKENS, lo=x.amin(0)[None], hi=x.amax(0)[None],
        mean_sq=x.pow(2).mean(0)[None], group_counts=torch.tensor([N_TOKENS]),
    )
    return layer, x, ref, stats


def quantized_sqnr(layer, x, ref, act, transform=None, rank=None):
    """Output SQNR of `layer` quantized to W4 / `act` with an optional transform and branch."""
    t = transform or ChannelTransform()
    weight = t.weight(layer.weight.detach())
    branch = None
    if rank:
        up, down, weight = lowrank_split(weight, rank, lambda w: P.fake_quantize(w, W4), iters=2)
        branch = LowRankBranch(D_IN, D_OUT, rank)
        branch.down.copy_(down)
        branch.up.copy_(up)
    ranges = None
    if not act.dynamic:
        lo, hi = P.select_range(t.apply(x).reshape(1, -1), act)
        ranges = [(float(lo), float(hi))]
    module = None if t.is_identity else InputTransform.from_transform(t, D_IN, -1)
    q = QuantLinear.from_float(layer, W4, act, ranges, weight=weight, input_transform=module, branch=branch)
    with torch.no_grad():
        return sqnr(ref, q(x))


def searched_scales(layer, x, stats, act):
    ranges = aggregate_ranges(x.abs().amax(0)[None])
    w_range = weight_ranges(layer.weight.detach())
    quant = lambda w: P.fake_quantize(w, W4)  # noqa: E731

    def error_of(alpha):
        s = None if alpha is None else smoothing_scales(ranges, w_range, alpha)
        return output_error(layer.weight.detach(), stats, ChannelTransform(s), quant, act)

    alpha, errors = search_alpha(alpha_grid(10), error_of, refine=False)
    return alpha, errors, (None if alpha is None else smoothing_scales(ranges, w_range, alpha))


@pytest.mark.parametrize("act", [A4_STATIC, A4_TOKEN], ids=["static", "per-token"])
def test_smoothing_raises_output_sqnr_on_planted_outliers(planted, act):
    layer, x, ref, stats = planted
    base = quantized_sqnr(layer, x, ref, act)
    alpha, _, scales = searched_scales(layer, x, stats, act)
    smoothed = quantized_sqnr(layer, x, ref, act, ChannelTransform(scales))
    assert alpha is not None and smoothed > base + 1.5, (alpha, base, smoothed)


@pytest.mark.parametrize("act", [A4_STATIC, A4_TOKEN], ids=["static", "per-token"])
def test_rotation_raises_output_sqnr_on_planted_outliers(planted, act):
    layer, x, ref, _ = planted
    base = quantized_sqnr(layer, x, ref, act)
    rotated = quantized_sqnr(layer, x, ref, act, ChannelTransform(None, random_signs(D_IN, 0), D_IN))
    assert rotated > base + 1.5, (base, rotated)


@pytest.mark.parametrize("act", [A4_STATIC, A4_TOKEN], ids=["static", "per-token"])
def test_lowrank_branch_raises_output_sqnr_on_planted_outliers(planted, act):
    layer, x, ref, stats = planted
    _, _, scales = searched_scales(layer, x, stats, act)
    smoothed = quantized_sqnr(layer, x, ref, act, ChannelTransform(scales))
    with_branch = quantized_sqnr(layer, x, ref, act, ChannelTransform(scales), rank=32)
    assert quantized_sqnr(layer, x, ref, act, rank=32) > quantized_sqnr(layer, x, ref, act) + 1.0
    assert with_branch > smoothed + 1.5, (smoothed, with_branch)


def test_alpha_search_picks_the_alpha_that_is_best_on_the_data(planted):
    """The analytic estimate (from H and channel ranges, no activations kept) ranks the
    candidates like the true output error does."""
    layer, x, ref, stats = planted
    for act in (A4_STATIC, A4_TOKEN, QuantSpec(bits=8, granularity="tensor")):
        alpha, errors, _ = searched_scales(layer, x, stats, act)
        w_range = weight_ranges(layer.weight.detach())
        truth = {
            a: quantized_sqnr(layer, x, ref, act, ChannelTransform(smoothing_scales(x.abs().amax(0), w_range, a)))
            for a in alpha_grid(10)
        }
        assert truth[alpha] > max(truth.values()) - 0.5, (act, alpha, truth)
        estimated_db = 10 * math.log10(float(ref.pow(2).sum()) / min(errors.values()))
        assert abs(estimated_db - truth[alpha]) < 1.5


def test_smoothing_scales_and_timestep_aggregation():
    act, weight = torch.tensor([8.0, 1.0, 0.0]), torch.tensor([1.0, 4.0, 2.0])
    s = smoothing_scales(act, weight, 0.5)
    assert s[2] == 1.0  # a dead channel is left alone
    ratio = (act[:2] / s[:2]) / (weight[:2] * s[:2])
    assert torch.allclose(ratio[0], ratio[1])  # alpha 0.5 balances the ranges of every channel
    with pytest.raises(DQError, match="alpha"):
        smoothing_scales(act, weight, 1.5)
    per_step = torch.tensor([[1.0, 4.0], [3.0, 2.0]])
    assert torch.equal(aggregate_ranges(per_step, method="max"), torch.tensor([3.0, 4.0]))
    assert torch.equal(aggregate_ranges(per_step, method="mean"), torch.tensor([2.0, 3.0]))
    # steps weigh by their peak range (4 and 3)
    assert torch.allclose(aggregate_ranges(per_step, method="salience"), torch.tensor([13 / 7, 22 / 7]))
    rms = aggregate_ranges(per_step, per_step**2, torch.tensor([1, 3]), "rms")
    assert torch.allclose(rms, torch.tensor([(1 + 27) / 4, (16 + 12) / 4]).sqrt())
    with pytest.raises(DQError, match="aggregation"):
        aggregate_ranges(per_step, method="median")


# ----------------------------------------------------------------------------- low rank


def test_lowrank_split_is_exact_and_refits_improve_the_residual_error():
    torch.manual_seed(0)
    w = torch.randn(128, 96)
    w[:, :3] *= 20  # column outliers (what smoothing leaves in the weight)
    quant = lambda r: P.fake_quantize(r, W4.replace(group_size=32))  # noqa: E731
    up, down, residual = lowrank_split(w, 16, quant, iters=0)
    assert up.shape == (128, 16) and down.shape == (16, 96)
    assert torch.allclose(up @ down + residual, w, atol=1e-4)
    plain = (residual - quant(residual)).norm()
    up, down, residual = lowrank_split(w, 16, quant, iters=4)
    assert (residual - quant(residual)).norm() <= plain
    assert (w - up @ down - quant(residual)).norm() < (w - quant(w)).norm() / 2


@pytest.mark.parametrize("scipy_present", [True, False])
@pytest.mark.parametrize("shape", [(96, 40), (40, 96), (64, 64)])
def test_svd_factors_give_the_truncated_svd(shape, scipy_present, monkeypatch):
    """The Gram-matrix factors equal a full SVD's best rank-r approximation, tall or wide,
    with or without scipy's subset eigensolver, and stay finite past the matrix's rank."""
    import builtins
    if not scipy_present:
        real_import = builtins.__import__

        def no_scipy(name, *args, **kwargs):
            if name.startswith("scipy"):
                raise ImportError(name)
            return real_import(name, *args, **kwargs)
        monkeypatch.setattr(builtins, "__import__", no_scipy)
    torch.manual_seed(0)
    w = torch.randn(*shape)
    w[:, :2] *= 15
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    for rank in (1, 8):
        up, down = svd_factors(w, rank)
        assert up.shape == (shape[0], rank) and down.shape == (rank, shape[1])
        best = (u[:, :rank] * s[:rank]) @ vh[:rank]
        assert torch.allclose((up @ down).double(), best, atol=1e-4, rtol=0)
    low = torch.randn(shape[0], 3) @ torch.randn(3, shape[1])  # rank 3 < 8
    up, down = svd_factors(low, 8)
    assert torch.isfinite(up).all() and torch.isfinite(down).all()
    assert torch.allclose(up @ down, low, atol=1e-3)


def test_rank_larger_than_the_layer_allows_is_a_clear_error():
    with pytest.raises(DQError, match="larger than the layer allows"):
        lowrank_split(torch.randn(16, 64), 32, lambda r: r)


def test_conv_lowrank_branch_equals_its_matrix_product():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, 3, stride=2, padding=1)
    branch = LowRankBranch(8 * 9, 12, 4, conv_config(conv))
    branch.down.normal_()
    branch.up.normal_()
    x = torch.randn(2, 8, 7, 7)
    weight = (branch.up @ branch.down).reshape(12, 8, 3, 3)
    assert torch.allclose(branch(x), F.conv2d(x, weight, stride=2, padding=1), atol=1e-4)


# ----------------------------------------------------------------------------- GPTQ


def correlated_inputs(n=2048, d=256, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=gen) * 0.3 + torch.eye(d)
    x = torch.randn(n, d, generator=gen) @ mix
    x[:, :4] *= 8
    return x


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(bits=4, granularity="group", group_size=64),
        QuantSpec(bits=4, granularity="group", group_size=64, symmetric=False, range="mse"),
        QuantSpec(bits=4, granularity="channel"),
        QuantSpec(bits=3, granularity="tensor"),
        QuantSpec(bits=8, granularity="channel"),
    ],
    ids=["g64", "g64-asym-mse", "channel", "tensor-3bit", "int8"],
)
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_round_to_nearest_on_layer_output_error(spec, act_order):
    x = correlated_inputs()
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(1))
    codes, scale, zero = gptq_quantize(w, x.T @ x, spec, act_order=act_order)
    assert codes.dtype == torch.int8
    assert int(codes.min()) >= spec.qmin and int(codes.max()) <= spec.qmax
    gptq = P.dequantize_tensor(codes, scale, zero, spec)
    rtn = P.fake_quantize(w, spec)

    def err(q):
        return float((x @ (w - q).T).pow(2).sum())

    assert err(gptq) < 0.7 * err(rtn), (err(gptq), err(rtn))


def test_gptq_codes_store_in_a_quantized_layer():
    x = correlated_inputs(d=128)
    layer = nn.Linear(128, 32)
    codes, scale, zero = gptq_quantize(layer.weight.detach(), x.T @ x, W4)
    q = QuantLinear.from_float(layer, W4, None, weight_codes=(codes, scale, zero))
    assert torch.allclose(q.dequantized_weight(), P.dequantize_tensor(codes, scale, zero, W4), atol=1e-6)


@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_on_two_level_scales_keeps_the_integer_kernel_and_its_gain(symmetric):
    """GPTQ with the layout's two-level group scales: the codes store as two-level (so the
    layer runs on the int8 kernel) and still beat round-to-nearest on the output error."""
    from dq.kernels import choose_kernel
    from dq.quant.packing import WeightLayout

    spec = QuantSpec(bits=4, granularity="group", group_size=64, symmetric=symmetric)
    x = correlated_inputs()
    layer = nn.Linear(256, 64)
    w = layer.weight.detach()
    layout = WeightLayout.default(tuple(w.shape), spec)
    assert layout.two_level
    base = layout.two_level_base(w)
    codes, scale, zero = gptq_quantize(
        w, x.T @ x, spec, group_params=lambda rows: layout.two_level_params(rows, base)[:2]
    )
    act = QuantSpec(bits=8, granularity="token", dynamic=True)
    q = QuantLinear.from_float(layer, spec, act, weight_codes=(codes, scale, zero))
    assert q.weight_layout.two_level and choose_kernel(q)[0] == "int8"
    assert torch.allclose(q.dequantized_weight(), P.dequantize_tensor(codes, scale, zero, spec), atol=1e-6)

    def err(weight):
        return float((x @ (w - weight).T).pow(2).sum())

    assert err(q.dequantized_weight()) < 0.7 * err(P.fake_quantize(w, spec))
    with pytest.raises(DQError, match="group"):
        gptq_quantize(w, x.T @ x, QuantSpec(bits=4, granularity="channel"), group_params=lambda rows: (None, None))


def test_gptq_handles_dead_inputs_and_checks_shapes():
    x = correlated_inputs(d=64)
    x[:, 5] = 0
    codes, _, _ = gptq_quantize(torch.randn(8, 64), x.T @ x, W4)
    assert codes.shape == (8, 64)
    with pytest.raises(DQError, match="inputs"):
        gptq_quantize(torch.randn(8, 64), torch.eye(32), W4)


# ----------------------------------------------------------------------------- log quantizers


def test_log2_quantizer_beats_uniform_on_softmax_probabilities_at_4_bits():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 256, 32, generator=gen) for _ in range(3))
    probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(32), dim=-1)
    ref = probs @ v
    log2 = sqnr(ref, log2_quantize_probs(probs, 4) @ v)
    uniform = sqnr(ref, uniform_quantize_probs(probs, 4) @ v)
    assert log2 > uniform + 6, (log2, uniform)
    levels = torch.unique(log2_quantize_probs(probs, 4))
    assert len(levels) <= 16 and float(levels.max()) <= 1.0
    assert torch.all((levels == 0) | (torch.log2(levels) == torch.log2(levels).round()))


def test_log2_rounds_to_the_nearest_level_in_the_linear_domain():
    p = torch.tensor([1.0, 0.76, 0.74, 0.5, 0.37, 1e-6])
    assert log2_quantize_probs(p, 4).tolist() == [1.0, 1.0, 0.5, 0.5, 0.25, 0.0]


def test_log_weight_quantizer_beats_uniform_on_long_tailed_weights():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=gen) ** 3  # heavy tails
    spec = QuantSpec(bits=4, granularity="channel", log=True)
    codes, _, _ = log_quantize_tensor(w, spec)
    assert codes.dtype == torch.int8 and int(codes.abs().max()) <= spec.qmax
    assert sqnr(w, fake_log_quantize(w, spec)) > sqnr(w, P.fake_quantize(w, spec.replace(log=False))) + 1


def test_conv_input_transform_shell_round_trip():
    conv = nn.Conv2d(64, 16, 3, padding=1)
    t = ChannelTransform(torch.rand(64) + 0.5, random_signs(64, 0), 64)
    q = QuantConv2d.from_float(
        conv, W4, None, weight=t.weight(conv.weight.detach().reshape(16, -1), 9),
        input_transform=InputTransform.from_transform(t, 64, 1),
    )
    x = torch.randn(1, 64, 5, 5)
    with torch.no_grad():
        assert sqnr(conv(x), q(x)) > 15


def test_alpha_search_refines_between_grid_points_and_can_decline_smoothing():
    alpha, errors = search_alpha(alpha_grid(4), lambda a: 10.0 if a is None else (a - 0.4) ** 2)
    assert alpha == pytest.approx(0.375) and "0.375" in errors and len(errors) == 1 + 5 + 2
    alpha, _ = search_alpha(alpha_grid(4), lambda a: 0.0 if a is None else 1.0)
    assert alpha is None  # no candidate beats leaving the layer alone
