"""Real low-bit execution of dq's quantized layers (int8 / fp8 matmuls, packed 4-bit weights).

`set_execution(model, mode)` picks, per layer, the kernel its formats allow
(`dispatch.choose_kernel`); `QuantModule.compute` then runs `dispatch.real_forward`, through
the path measured fastest for it (`choice`; what each path does: `runners`; which paths a
model runs: `path_counts`).
The storage formats these kernels read are in `dq.quant.packing`.
"""

from __future__ import annotations

from .dispatch import (
    EXECUTION_MODES,
    check_execution,
    choose_kernel,
    layer_paths,
    path_counts,
    real_forward,
    set_execution,
)

__all__ = [
    "EXECUTION_MODES", "check_execution", "choose_kernel", "layer_paths", "path_counts", "real_forward", "set_execution",
]
