"""How quantized weights are stored: packed 4-bit codes and two-level group scales.

A layer's float weight [out, ...] is seen as a matrix [out, cols] (cols = in, or
in/groups * kh * kw for a convolution, in `F.unfold` order). Its storage depends on
the weight spec, and `WeightLayout` names each variant:

- codes: int8 [out, ...] (the weight's own shape) for 7-8 bit integers, float8 for
  float kinds (fp4 values are exact in e4m3); integers of at most 4 bits are packed
  two per byte, uint8 [out, ceil(cols / 2)]: code 2i in the low nibble, code 2i + 1
  in the high nibble, each in two's complement, an odd last column padded with 0.
  5- and 6-bit integers are packed in two bit planes per row (`pack_bits`): their low
  four bits as above, then their top 1 or 2 bits, 8 or 4 codes per byte (code i at
  bit (i mod per_byte) * width), uint8 [out, ceil(cols / 2) + ceil(cols * (bits - 4) / 8)]:
  exactly `bits` bits per weight (plus padding of the last byte of each plane).
- scales: one float32 scale per row of `row_view` (per tensor, channel or group), or,
  for group-wise integer weights of up to 6 bits (5 if asymmetric), *two-level*
  scales: a float32 scale per output channel times a small integer multiplier per
  group (uint8 [out, groups]). The group step being an integer multiple of the
  channel step, `(code - zero) * multiplier` is an exact int8 weight on one
  per-channel scale, so group-wise 4-bit weights run through a single int8 matmul
  (the idea of QServe's progressive group quantization). It also stores a byte per
  group instead of four. The multiplier is the better of floor and ceil of the ideal
  ratio, per group (about 0.1 dB of weight SQNR below free float group scales for
  symmetric 4-bit weights).
- zero points (asymmetric): float32 per row, or int8 [out, groups] with two-level scales.

`WeightLayout.default` picks packing and two-level scales wherever the spec allows;
codes computed elsewhere with free float group scales (GPTQ) keep single-level scales
(`WeightLayout.store`), and checkpoints written before this module existed (no layout
tag in their plan) load as unpacked int8 codes with row scales.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import DQError
from . import primitives as P
from .spec import QuantSpec

INT8_MAX = 127
# Two-level scales need room for at least this many group multipliers.
MIN_MULTIPLIER_RANGE = 4


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Pack signed 4-bit codes (int8 in [-8, 7]) two per byte along the last dim.

    Returns uint8 [..., ceil(n / 2)]; an odd last column is padded with a zero code,
    which `unpack_int4(packed, n)` drops again.
    """
    if codes.dtype != torch.int8:
        raise DQError(f"pack_int4 takes int8 codes, got {codes.dtype}")
    if codes.numel() and (int(codes.min()) < -8 or int(codes.max()) > 7):
        raise DQError(
            f"codes in [{int(codes.min())}, {int(codes.max())}] do not fit in 4 bits; "
            "only integer weights of at most 4 bits are packed"
        )
    if codes.shape[-1] % 2:
        codes = torch.nn.functional.pad(codes, (0, 1))
    pairs = codes.reshape(*codes.shape[:-1], -1, 2)
    low = pairs[..., 0] & 0x0F
    high = pairs[..., 1] << 4  # wraps in int8: the bits are what counts
    return (low | high).view(torch.uint8)


def unpack_int4(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of `pack_int4`: int8 codes [..., n] from uint8 [..., ceil(n / 2)]."""
    if packed.dtype != torch.uint8:
        raise DQError(f"unpack_int4 takes uint8 packed codes, got {packed.dtype}")
    if packed.shape[-1] != (n + 1) // 2:
        raise DQError(f"{packed.shape[-1]} packed bytes per row cannot hold {n} codes; expected {(n + 1) // 2}")
    signed = packed.view(torch.int8)
    low = (signed << 4) >> 4  # arithmetic shifts sign-extend each nibble
    high = signed >> 4
    codes = torch.stack((low, high), dim=-1).reshape(*packed.shape[:-1], -1)
    return codes if codes.shape[-1] == n else codes[..., :n]


# Integer widths `pack_bits` stores in bit planes (<= 4 bits: `pack_int4`'s nibbles).
PLANE_BITS = (5, 6)


def packed_bytes(cols: int, bits: int) -> int:
    """Bytes per row of `cols` codes of `bits` bits, packed (`pack_int4` / `pack_bits`)."""
    if bits <= 4:
        return (cols + 1) // 2
    if bits not in PLANE_BITS:
        raise DQError(f"{bits}-bit codes are not packed (packing covers up to 6 bits); they are stored as int8")
    per_byte = 8 // (bits - 4)
    return (cols + 1) // 2 + (cols + per_byte - 1) // per_byte


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack signed `bits`-bit codes (int8, two's complement; bits <= 6) along the last dim:
    uint8 [..., packed_bytes(n, bits)]; `unpack_bits` inverts it."""
    if bits <= 4:
        return pack_int4(codes)
    if codes.dtype != torch.int8:
        raise DQError(f"pack_bits takes int8 codes, got {codes.dtype}")
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    if codes.numel() and (int(codes.min()) < lo or int(codes.max()) > hi):
        raise DQError(f"codes in [{int(codes.min())}, {int(codes.max())}] do not fit in {bits} bits")
    packed_bytes(codes.shape[-1], bits)  # checks `bits`
    width = bits - 4
    per_byte = 8 // width
    unsigned = codes.view(torch.uint8) & ((1 << bits) - 1)
    low = pack_int4((unsigned & 0x0F).view(torch.int8) << 4 >> 4)  # the nibble as a 4-bit code
    top = unsigned >> 4
    n = codes.shape[-1]
    if n % per_byte:
        top = torch.nn.functional.pad(top, (0, per_byte - n % per_byte))
    top = top.reshape(*top.shape[:-1], -1, per_byte).to(torch.int32)
    shifts = torch.arange(per_byte, device=codes.device, dtype=torch.int32) * width
    high = (top << shifts).sum(dim=-1).to(torch.uint8)
    return torch.cat((low, high), dim=-1)


def unpack_bits(packed: torch.Tensor, n: int, bits: int) -> torch.Tensor:
    """Inverse of `pack_bits`: int8 codes [..., n] from uint8 [..., packed_bytes(n, bits)]."""
    if bits <= 4:
        return unpack_int4(packed, n)
    if packed.dtype != torch.uint8:
        raise DQError(f"unpack_bits takes uint8 packed codes, got {packed.dtype}")
    if packed.shape[-1] != packed_bytes(n, bits):
        raise DQError(f"{packed.shape[-1]} packed bytes per row cannot hold {n} {bits}-bit codes; "
                      f"expected {packed_bytes(n, bits)}")
    half = (n + 1) // 2
    width = bits - 4
    per_byte = 8 // width
    low = unpack_int4(packed[..., :half], n).view(torch.uint8) & 0x0F
    high = packed[..., half:].unsqueeze(-1)
    shifts = torch.arange(per_byte, device=packed.device, dtype=torch.uint8) * width
    top = ((high >> shifts) & ((1 << width) - 1)).reshape(*packed.shape[:-1], -1)[..., :n]
    unsigned = low | (top << 4)
    return (unsigned << (8 - bits)).view(torch.int8) >> (8 - bits)  # sign-extend


def new_tensor(shape, fill: int, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> torch.Tensor:
    """``torch.zeros``/``torch.ones`` (`fill` 0 or 1); on the meta device an empty tensor: there
    are no values to fill, and meta fills run through torch's Python meta kernels (slow per call)."""
    if device is not None and torch.device(device).type == "meta":
        return torch.empty(shape, dtype=dtype, device="meta")
    return (torch.ones if fill else torch.zeros)(shape, dtype=dtype, device=device)


@dataclass(frozen=True)
class WeightLayout:
    """Storage of one layer's quantized weight (see the module docstring).

    `default` picks packing and two-level scales wherever the spec allows them;
    `from_tag` rebuilds a layout from the tag a checkpoint's plan stores (no tag: the
    layout of checkpoints written before packing existed, int8 codes and row scales).
    """

    shape: tuple[int, ...]
    spec: QuantSpec
    packed: bool = False
    two_level: bool = False

    def __post_init__(self) -> None:
        if self.packed and not (self.is_int and self.spec.bits <= max(PLANE_BITS)):
            raise DQError(f"only integer weights of at most {max(PLANE_BITS)} bits can be packed, "
                          f"not {self.spec.kind}{self.spec.bits}")
        if self.two_level and not self.two_level_possible(self.spec):
            raise DQError("two-level scales need group-wise uniform integer weights of at most 6 bits (5 if asymmetric)")
        if self.spec.granularity == "group" and self.cols % self.spec.group_size:
            raise DQError(
                f"group size {self.spec.group_size} does not divide the {self.cols} inputs per channel; "
                "choose a group_size that divides it or use granularity 'channel'"
            )

    @staticmethod
    def two_level_possible(spec: QuantSpec) -> bool:
        span = spec.qmax if spec.symmetric else spec.qmax - spec.qmin
        return spec.kind == "int" and not spec.log and spec.granularity == "group" and INT8_MAX // span >= MIN_MULTIPLIER_RANGE

    @classmethod
    def default(cls, shape: tuple[int, ...], spec: QuantSpec) -> WeightLayout:
        packed = spec.kind == "int" and spec.bits <= max(PLANE_BITS)
        return cls(tuple(shape), spec, packed=packed, two_level=cls.two_level_possible(spec))

    @classmethod
    def from_tag(cls, shape: tuple[int, ...], spec: QuantSpec, tag: str | None) -> WeightLayout:
        if tag is None:
            return cls(tuple(shape), spec)
        codes, _, scales = tag.partition("/")
        if codes not in ("packed4", "packed-planes", "plain") or scales not in ("two-level", "row"):
            raise DQError(f"unknown weight storage {tag!r}; this checkpoint needs a newer dq")
        layout = cls(tuple(shape), spec, packed=codes != "plain", two_level=scales == "two-level")
        if codes != "plain" and codes != layout._packed_tag:
            raise DQError(f"weight storage {tag!r} does not match the layer's {spec.bits}-bit weights; "
                          "the checkpoint's plan is inconsistent")
        return layout

    @property
    def _packed_tag(self) -> str:
        return "packed4" if self.spec.bits <= 4 else "packed-planes"

    @property
    def tag(self) -> str:
        """What a checkpoint's plan stores to rebuild this layout."""
        return f"{self._packed_tag if self.packed else 'plain'}/{'two-level' if self.two_level else 'row'}"

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def cols(self) -> int:
        return math.prod(self.shape[1:])

    @property
    def is_int(self) -> bool:
        return self.spec.kind == "int"

    @property
    def code_span(self) -> int:
        """Largest |code - zero| of an integer weight."""
        return self.spec.qmax if self.spec.symmetric else self.spec.qmax - self.spec.qmin

    @property
    def max_multiplier(self) -> int:
        return INT8_MAX // self.code_span

    @property
    def groups(self) -> int:
        return self.cols // self.spec.group_size if self.spec.granularity == "group" else 1

    @property
    def scale_rows(self) -> int:
        """Rows of `row_view`: one single-level scale each."""
        return {"tensor": 1, "channel": self.out_features}.get(self.spec.granularity, self.out_features * self.groups)

    @property
    def integer_matmul_ready(self) -> bool:
        """Whether `integer_weight` gives exact int8 weights on one scale per output channel."""
        if not self.is_int or self.spec.log or self.code_span > INT8_MAX:
            return False
        return self.two_level or self.spec.granularity in ("channel", "tensor")

    def empty(self, device: torch.device | str | None = None) -> dict[str, torch.Tensor | None]:
        """Zero-filled storage buffers: qweight, wscale, wzero, wmult (None where unused), on
        `device` (default: torch's current default device)."""
        spec, n = self.spec, self.out_features
        if self.packed:
            qweight = new_tensor((n, packed_bytes(self.cols, spec.bits)), 0, torch.uint8, device)
        elif self.is_int:
            qweight = new_tensor(self.shape, 0, torch.int8, device)
        else:
            qweight = new_tensor(self.shape, 0, _float8_dtype(spec), device)
        if self.two_level:
            return {
                "qweight": qweight,
                "wscale": new_tensor((n, 1), 1, device=device),
                "wzero": None if spec.symmetric else new_tensor((n, self.groups), 0, torch.int8, device),
                "wmult": new_tensor((n, self.groups), 1, torch.uint8, device),
            }
        rows = self.scale_rows
        return {
            "qweight": qweight,
            "wscale": new_tensor((rows, 1), 1, device=device),
            "wzero": None if spec.symmetric or not self.is_int else new_tensor((rows, 1), 0, device=device),
            "wmult": None,
        }

    # -- encoding -----------------------------------------------------------------
    def encode(self, weight: torch.Tensor) -> dict[str, torch.Tensor | None]:
        """Quantize a float weight into this layout's buffers (see `empty`)."""
        if tuple(weight.shape) != self.shape:
            raise DQError(f"weight of shape {tuple(weight.shape)} does not match the layout's {self.shape}")
        if self.two_level:
            codes, wscale, wzero, wmult = self._encode_two_level(weight.detach().float())
            return {"qweight": self._store_codes(codes), "wscale": wscale, "wzero": wzero, "wmult": wmult}
        if self.spec.log:
            from .logquant import log_quantize_tensor

            return self.store(*log_quantize_tensor(weight, self.spec))
        return self.store(*P.quantize_tensor(weight, self.spec))

    def store(
        self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None
    ) -> dict[str, torch.Tensor | None]:
        """Buffers of single-level (codes, scale, zero) as `primitives.quantize_tensor` returns them."""
        if self.two_level:
            raise DQError("single-level codes need a layout without two-level scales")
        return {"qweight": self._store_codes(codes), "wscale": scale, "wzero": zero, "wmult": None}

    def store_two_level(
        self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, weight: torch.Tensor
    ) -> dict[str, torch.Tensor | None] | None:
        """Buffers of (codes, scale, zero) whose group scales are `two_level_base(weight)` times
        integer multipliers (codes rounded elsewhere, e.g. by GPTQ with `two_level_params`);
        None if the scales are not of that form."""
        n, g = self.out_features, self.groups
        base = self.two_level_base(weight)
        mult = (scale.reshape(n, g) / base).round()
        if not torch.equal(base * mult, scale.reshape(n, g)) or mult.min() < 1 or mult.max() > self.max_multiplier:
            return None
        wzero = None if zero is None else zero.reshape(n, g).round().to(torch.int8)
        return {"qweight": self._store_codes(codes), "wscale": base, "wzero": wzero, "wmult": mult.to(torch.uint8)}

    # -- two-level scales -----------------------------------------------------------
    def two_level_base(self, weight: torch.Tensor) -> torch.Tensor:
        """Per-channel base scale [out, 1]: the largest ideal group scale / max_multiplier."""
        rows = weight.detach().float().reshape(self.out_features * self.groups, self.spec.group_size)
        ideal, _ = P.qparams(*P.select_range(rows, self.spec), self.spec)
        return ideal.reshape(self.out_features, self.groups).amax(dim=1, keepdim=True) / self.max_multiplier

    def two_level_params(
        self, rows: torch.Tensor, base: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(scale, zero, multiplier), each [rows, 1], for groups `rows` [rows, group_size]
        whose channels have base scales `base` [rows, 1]: the multiplier (floor or ceil of
        the ideal one, whichever rounds the group with less squared error) times the base.
        For GPTQ: use it in place of the range search when a group is reached."""
        spec = self.spec
        rows = rows.float()
        lo, hi = P.select_range(rows, spec)
        ratio = P.qparams(lo, hi, spec)[0] / base
        best = None
        for mult in (ratio.floor(), (ratio - 1e-4).ceil()):
            mult = mult.clamp(1, self.max_multiplier)
            scale = base * mult
            zero = None if spec.symmetric else (spec.qmin - lo / scale).round().clamp(spec.qmin, spec.qmax)
            err = (P.dequantize(P.quantize(rows, scale, zero, spec), scale, zero) - rows).pow(2).sum(dim=1, keepdim=True)
            if best is None:
                best = (err, scale, zero, mult)
                continue
            better = err < best[0]
            best = (
                torch.where(better, err, best[0]), torch.where(better, scale, best[1]),
                None if zero is None else torch.where(better, zero, best[2]), torch.where(better, mult, best[3]),
            )
        return best[1], best[2], best[3]

    def _encode_two_level(
        self, weight: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
        spec, n, g = self.spec, self.out_features, self.groups
        rows = weight.reshape(n * g, spec.group_size)
        base = self.two_level_base(weight)
        scale, zero, mult = self.two_level_params(rows, base.repeat_interleave(g, dim=0))
        codes = P.quantize(rows, scale, zero, spec).to(torch.int8).reshape(self.shape)
        wzero = None if zero is None else zero.reshape(n, g).to(torch.int8)
        return codes, base, wzero, mult.reshape(n, g).to(torch.uint8)

    def _store_codes(self, codes: torch.Tensor) -> torch.Tensor:
        if self.packed:
            return pack_bits(codes.reshape(self.out_features, self.cols), self.spec.bits)
        return codes

    # -- decoding -----------------------------------------------------------------
    def codes(self, qweight: torch.Tensor) -> torch.Tensor:
        """Integer codes as int8 [out, cols] (packed codes unpacked)."""
        if self.packed:
            return unpack_bits(qweight, self.cols, self.spec.bits)
        return qweight.reshape(self.out_features, self.cols)

    def integer_weight(
        self, qweight: torch.Tensor, wzero: torch.Tensor | None, wmult: torch.Tensor | None
    ) -> torch.Tensor:
        """Exact int8 weight [out, cols] on the per-channel scale `channel_scale`.

        (code - zero) * multiplier; only valid where `integer_matmul_ready`.
        """
        codes = self.codes(qweight)
        if not self.two_level:
            if wzero is None:
                return codes
            return (codes.to(torch.int16) - wzero.to(torch.int16)).to(torch.int8)
        n, g, size = self.out_features, self.groups, self.spec.group_size
        grouped = codes.reshape(n, g, size)
        if wzero is not None:
            grouped = grouped - wzero.unsqueeze(-1)  # |code - zero| <= code_span fits in int8
        return (grouped * wmult.view(torch.int8).unsqueeze(-1)).reshape(n, self.cols)

    def channel_scale(self, wscale: torch.Tensor) -> torch.Tensor:
        """Scale of `integer_weight` per output channel, float32 [out]."""
        return wscale.reshape(-1).float().expand(self.out_features) if wscale.numel() == 1 else wscale.reshape(-1).float()

    def decode(
        self,
        qweight: torch.Tensor,
        wscale: torch.Tensor,
        wzero: torch.Tensor | None,
        wmult: torch.Tensor | None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """The dequantized float weight, in the layer's weight shape."""
        if self.two_level:
            n, g, size = self.out_features, self.groups, self.spec.group_size
            codes = self.codes(qweight).reshape(n, g, size).float()
            if wzero is not None:
                codes = codes - wzero.unsqueeze(-1).float()
            step = wscale.float() * wmult.float()  # [out, groups]
            return (codes * step.unsqueeze(-1)).reshape(self.shape).to(dtype)
        codes = self.codes(qweight) if self.packed else qweight
        if self.spec.log:
            from .logquant import log_dequantize_tensor

            return log_dequantize_tensor(codes.reshape(self.shape), wscale.float(), self.spec, dtype)
        return P.dequantize_tensor(codes.reshape(self.shape), wscale.float(), None if wzero is None else wzero.float(), self.spec, dtype)


def _float8_dtype(spec: QuantSpec) -> torch.dtype:
    return torch.float8_e5m2 if spec.kind == "fp8_e5m2" else torch.float8_e4m3fn


def weight_nbytes(module: torch.nn.Module) -> int:
    """Bytes of every parameter and persistent buffer of `module` (what a checkpoint holds)."""
    total = sum(p.numel() * p.element_size() for p in module.parameters())
    for name, buf in module.named_buffers():
        owner = module.get_submodule(name.rpartition(".")[0]) if "." in name else module
        if name.rpartition(".")[2] in owner._non_persistent_buffers_set:
            continue
        total += buf.numel() * buf.element_size()
    return total
