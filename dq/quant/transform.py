"""Channel transforms of a layer's input, as pure tensor functions.

An input transform T acts on the input-channel axis: first a per-channel scale
(smoothing: divide by s), then an optional Hadamard rotation R. The layer's
output is unchanged when the weight takes the inverse transform:

    x' = (x / s) R,    W' = (W * s) R,    x' W'^T = x W^T   (R orthogonal).

Conv2d weights are handled through their matrix view W2 [out, C*k] (k = kh*kw,
columns ordered channel-major, as `F.unfold` orders its rows): a channel transform
acts as T (x) I_k on that view, so the same functions serve linear and conv layers,
their weights, and their input second moments H = sum x x^T (H' = T^T H T).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .hadamard import rotate, rotated_diagonal, unrotate


@dataclass
class ChannelTransform:
    """x -> (x * inv_scale) R along the channel axis; None parts are identity."""

    scale: torch.Tensor | None = None  # s [C]: the input is divided by it, the weight multiplied
    signs: torch.Tensor | None = None  # rotation signs [C]
    block: int = 0  # Hadamard block size (0: no rotation)

    @property
    def is_identity(self) -> bool:
        return self.scale is None and self.signs is None

    def apply(self, x: torch.Tensor, dim: int = -1, *, to_weight: bool = False) -> torch.Tensor:
        """Transform `x` along channel axis `dim` (the input side, or the weight side)."""
        if self.scale is not None:
            shape = [1] * x.dim()
            shape[dim] = -1
            s = self.scale.to(device=x.device, dtype=x.dtype).reshape(shape)
            x = x * s if to_weight else x / s
        if self.signs is not None:
            x = rotate(x, self.signs.to(x.device), self.block, dim=dim)
        return x

    def apply_flat(self, x2: torch.Tensor, kernel: int = 1, *, to_weight: bool = False) -> torch.Tensor:
        """Transform the last dim of a matrix view [..., C*kernel] (channel-major columns)."""
        lead, width = x2.shape[:-1], x2.shape[-1]
        x3 = x2.reshape(*lead, width // kernel, kernel)
        return self.apply(x3, dim=-2, to_weight=to_weight).reshape(*lead, width)

    def weight(self, w2: torch.Tensor, kernel: int = 1) -> torch.Tensor:
        """W' = (W * s) R on a weight's matrix view [out, C*kernel]."""
        return self.apply_flat(w2, kernel, to_weight=True)

    def scaled_moment(self, h: torch.Tensor, kernel: int = 1) -> torch.Tensor:
        """D^-1 H D^-1: the second moment after smoothing only (before the rotation)."""
        inv = self.inverse_scale_columns(kernel, h)
        return h if inv is None else h * inv[:, None] * inv[None, :]

    def inverse_scale_columns(self, kernel: int, like: torch.Tensor) -> torch.Tensor | None:
        """1 / s repeated over each channel's kernel taps [C*k] (None without smoothing)."""
        if self.scale is None:
            return None
        return (1.0 / self.scale.to(like)).repeat_interleave(kernel)

    def moment_diagonal(self, h: torch.Tensor, kernel: int = 1) -> torch.Tensor:
        """diag(T^T H T) without forming it (O(n b log b) for the rotation)."""
        inv = self.inverse_scale_columns(kernel, h)
        if self.signs is None:
            diag = h.diagonal()
            return diag * inv**2 if inv is not None else diag.clone()
        n = h.shape[0]
        taps = h.reshape(n // kernel, kernel, n // kernel, kernel)
        inv_c = None if inv is None else inv.reshape(-1, kernel)
        diag = torch.empty(n // kernel, kernel, dtype=h.dtype, device=h.device)
        for t in range(kernel):
            block = taps[:, t, :, t]
            if inv_c is not None:
                block = block * inv_c[:, t, None] * inv_c[None, :, t]
            diag[:, t] = rotated_diagonal(block, self.signs.to(h.device), self.block)
        return diag.reshape(n)

    def unrotate_flat(self, w2: torch.Tensor, kernel: int = 1) -> torch.Tensor:
        """W R^T on a matrix view: back from the rotated basis to the smoothed one."""
        if self.signs is None:
            return w2
        lead, width = w2.shape[:-1], w2.shape[-1]
        w3 = w2.reshape(*lead, width // kernel, kernel)
        return unrotate(w3, self.signs.to(w2.device), self.block, dim=-2).reshape(*lead, width)

    def moment(self, h: torch.Tensor, kernel: int = 1) -> torch.Tensor:
        """H' = T^T H T for the inputs' second moment H [C*k, C*k]."""
        if self.is_identity:
            return h
        ht = self.apply_flat(h, kernel)  # H T (rows of H transform like inputs)
        return self.apply_flat(ht.transpose(0, 1).contiguous(), kernel).transpose(0, 1)
