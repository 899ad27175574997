"""Weight storage: packed 4-bit codes, two-level group scales, byte counts."""

import math

import pytest
import torch

from dq.errors import DQError
from dq.nn import QuantLinear
from dq.quant import primitives as P
from dq.quant.packing import (
    WeightLayout,
    pack_bits,
    pack_int4,
    packed_bytes,
    unpack_bits,
    unpack_int4,
    weight_nbytes,
)
from dq.quant.spec import QuantSpec

W4G = QuantSpec(bits=4, granularity="group", group_size=64, range="mse")


@pytest.mark.parametrize("shape", [(6, 8), (5, 7), (3, 1), (2, 3, 5)])
def test_pack_unpack_round_trip_including_odd_sizes(shape):
    codes = torch.randint(-8, 8, shape, dtype=torch.int8)
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8
    assert packed.shape == (*shape[:-1], math.ceil(shape[-1] / 2))
    assert torch.equal(unpack_int4(packed, shape[-1]), codes)


def test_pack_layout_is_two_nibbles_per_byte_low_first():
    packed = pack_int4(torch.tensor([[1, -2, 7]], dtype=torch.int8))
    assert packed.tolist() == [[0xE1, 0x07]]  # -2 = 0xE (two's complement), odd tail padded with 0


def test_pack_and_unpack_refuse_bad_input():
    with pytest.raises(DQError, match="4 bits"):
        pack_int4(torch.tensor([8], dtype=torch.int8))
    with pytest.raises(DQError, match="int8"):
        pack_int4(torch.tensor([1], dtype=torch.int32))
    with pytest.raises(DQError, match="cannot hold"):
        unpack_int4(torch.zeros(2, 3, dtype=torch.uint8), 8)


@pytest.mark.parametrize("bits", [5, 6])
@pytest.mark.parametrize("shape", [(6, 8), (5, 7), (3, 1), (2, 3, 9), (4, 17)])
def test_bit_plane_pack_round_trip_including_odd_sizes(bits, shape):
    torch.manual_seed(bits)
    codes = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), shape, dtype=torch.int8)
    codes.view(-1)[0] = -(1 << (bits - 1))  # the extremes survive the sign extension
    codes.view(-1)[-1] = (1 << (bits - 1)) - 1
    packed = pack_bits(codes, bits)
    n = shape[-1]
    per_byte = 8 // (bits - 4)
    assert packed.dtype == torch.uint8
    assert packed.shape == (*shape[:-1], math.ceil(n / 2) + math.ceil(n / per_byte)) == (*shape[:-1], packed_bytes(n, bits))
    assert torch.equal(unpack_bits(packed, n, bits), codes)


def test_bit_plane_layout_low_nibbles_then_top_bits():
    # 6 bits: 5 = 0b000101, -3 = 0b111101, 31 = 0b011111, -32 = 0b100000
    packed = pack_bits(torch.tensor([[5, -3, 31, -32]], dtype=torch.int8), 6)
    assert packed.tolist() == [[0xD5, 0x0F, 0b10_01_11_00]]  # nibbles 5, D, F, 0; tops 0, 3, 1, 2


def test_bit_plane_pack_refuses_bad_input():
    with pytest.raises(DQError, match="6 bits"):
        pack_bits(torch.tensor([32], dtype=torch.int8), 6)
    with pytest.raises(DQError, match="5 bits"):
        pack_bits(torch.tensor([-17], dtype=torch.int8), 5)
    with pytest.raises(DQError, match="not packed"):
        pack_bits(torch.tensor([1], dtype=torch.int8), 7)
    with pytest.raises(DQError, match="cannot hold"):
        unpack_bits(torch.zeros(2, 3, dtype=torch.uint8), 8, 6)


@pytest.mark.parametrize("bits", [5, 6])
def test_5_and_6_bit_weights_are_stored_in_exactly_their_bits(bits):
    torch.manual_seed(0)
    layer = torch.nn.Linear(1152, 1152)
    spec = QuantSpec(bits=bits, granularity="channel", range="mse")
    q = QuantLinear.from_float(layer, spec, None)
    assert q.weight_layout.packed and q.weight_layout.tag == "packed-planes/row"
    # codes: `bits` bits each; a float32 scale per channel; the bias
    assert weight_nbytes(q) == 1152 * 1152 * bits // 8 + 1152 * 4 + 1152 * 4
    plain = QuantLinear.from_float(layer, spec, None)
    plain.set_weight_layout(WeightLayout(plain.weight_shape, spec))
    buf = plain.weight_layout.store(*P.quantize_tensor(layer.weight.detach(), spec))
    plain.qweight.copy_(buf["qweight"])
    plain.wscale.copy_(buf["wscale"])
    assert torch.equal(q.dequantized_weight(), plain.dequantized_weight())


def test_two_level_scales_are_exact_int8_on_a_channel_scale():
    torch.manual_seed(0)
    w = torch.randn(48, 256) * torch.linspace(0.1, 3, 256)
    for spec in (W4G, W4G.replace(symmetric=False, group_size=32), QuantSpec(bits=3, granularity="group", group_size=64)):
        layout = WeightLayout.default(tuple(w.shape), spec)
        assert layout.two_level and layout.packed
        buf = layout.encode(w)
        assert 1 <= int(buf["wmult"].min()) and int(buf["wmult"].max()) <= layout.max_multiplier
        integer = layout.integer_weight(buf["qweight"], buf["wzero"], buf["wmult"])
        assert integer.dtype == torch.int8 and int(integer.abs().max()) <= 127
        decoded = layout.decode(buf["qweight"], buf["wscale"], buf["wzero"], buf["wmult"])
        assert torch.allclose(integer.float() * layout.channel_scale(buf["wscale"])[:, None], decoded, rtol=1e-6, atol=0)


def test_two_level_costs_little_weight_sqnr_against_free_group_scales():
    torch.manual_seed(0)
    w = torch.randn(256, 512)

    def sqnr(ref, x):
        return 10 * math.log10(float(ref.pow(2).mean() / (ref - x).pow(2).mean()))

    free = P.dequantize_tensor(*P.quantize_tensor(w, W4G), W4G)
    layout = WeightLayout.default(tuple(w.shape), W4G)
    two = layout.decode(*layout.encode(w).values())
    assert sqnr(w, free) - sqnr(w, two) < 0.3


def test_layout_tags_round_trip_and_legacy_checkpoints_keep_int8_codes():
    for spec in (W4G, QuantSpec(bits=8), QuantSpec(kind="fp8_e4m3"), QuantSpec(bits=4, granularity="channel"),
                 QuantSpec(bits=5, granularity="channel"), QuantSpec(bits=6, granularity="group", group_size=32)):
        layout = WeightLayout.default((32, 64), spec)
        assert WeightLayout.from_tag((32, 64), spec, layout.tag) == layout
    # 5-6 bit weights saved before bit planes existed: int8 codes
    six = QuantSpec(bits=6, granularity="channel")
    old = WeightLayout.from_tag((32, 64), six, "plain/row")
    assert not old.packed and old.empty()["qweight"].dtype == torch.int8
    with pytest.raises(DQError, match="does not match"):
        WeightLayout.from_tag((32, 64), six, "packed4/row")
    with pytest.raises(DQError, match="does not match"):
        WeightLayout.from_tag((32, 64), W4G, "packed-planes/two-level")
    legacy = WeightLayout.from_tag((32, 64), W4G, None)
    assert not legacy.packed and not legacy.two_level
    assert legacy.empty()["qweight"].dtype == torch.int8
    with pytest.raises(DQError, match="newer dq"):
        WeightLayout.from_tag((32, 64), W4G, "int2-magic/rows")


def test_module_bytes_show_the_4bit_saving():
    torch.manual_seed(0)
    layer = torch.nn.Linear(1152, 1152)
    fp32 = weight_nbytes(layer)
    w8 = weight_nbytes(QuantLinear.from_float(layer, QuantSpec(bits=8), None))
    w4 = QuantLinear.from_float(layer, W4G, None)
    assert w4.qweight.dtype == torch.uint8 and w4.qweight.shape == (1152, 576)
    # codes 0.5 byte, group multiplier 1/64 byte, a float32 scale per channel, the bias
    assert weight_nbytes(w4) == 1152 * 576 + 1152 * 18 + 1152 * 4 + 1152 * 4
    assert weight_nbytes(w4) < 0.14 * fp32 and weight_nbytes(w4) < 0.55 * w8


def test_dtype_casts_keep_the_storage_format():
    layer = QuantLinear.from_float(torch.nn.Linear(64, 32), QuantSpec(kind="fp8_e4m3"), None)
    scale = layer.wscale.clone()
    layer.to(torch.bfloat16)
    assert layer.qweight.dtype == torch.float8_e4m3fn
    assert layer.wscale.dtype == torch.float32 and torch.equal(layer.wscale, scale)
    assert layer.bias.dtype == torch.bfloat16


def test_gptq_style_single_level_codes_keep_float_group_scales():
    torch.manual_seed(0)
    layer = torch.nn.Linear(128, 16)
    codes, scale, zero = P.quantize_tensor(layer.weight, W4G)
    q = QuantLinear.from_float(layer, W4G, None, weight_codes=(codes, scale, zero))
    assert q.weight_layout.packed and not q.weight_layout.two_level
    assert torch.equal(q.dequantized_weight(), P.dequantize_tensor(codes, scale, zero, W4G))


def test_codes_rounded_elsewhere_on_two_level_scales_keep_the_integer_kernel():
    """The contract for GPTQ: base from the weight, per-group scales from `two_level_params`."""
    from dq.kernels import choose_kernel

    torch.manual_seed(0)
    layer = torch.nn.Linear(128, 16)
    w = layer.weight.detach()
    layout = WeightLayout.default(tuple(w.shape), W4G)
    base = layout.two_level_base(w)
    scales, codes = [], []
    for g in range(2):  # group by group, as GPTQ visits them (here on slightly updated weights)
        rows = w[:, 64 * g : 64 * (g + 1)] * 1.01
        scale, zero, _ = layout.two_level_params(rows, base)
        scales.append(scale)
        codes.append(P.quantize(rows, scale, zero, W4G))
    codes = torch.cat(codes, dim=1).to(torch.int8)
    scale_rows = torch.cat(scales, dim=1).reshape(-1, 1)
    a8 = QuantSpec(bits=8, granularity="tensor")
    q = QuantLinear.from_float(layer, W4G, a8, [(-1.0, 1.0)], weight_codes=(codes, scale_rows, None))
    assert q.weight_layout.two_level and choose_kernel(q) == ("int8", "")
    assert torch.allclose(q.dequantized_weight(), P.dequantize_tensor(codes, scale_rows, None, W4G), rtol=1e-6, atol=0)
