"""Which kernel runs each quantized layer, and the real forward pass.

`choose_kernel` looks at a layer's formats once (when the execution mode is set);
`real_forward` checks what only the call can tell (the device, the number of rows)
and falls back to the simulated path, which computes the same function in float,
with a debug log line, where the kernel cannot take the call.

Kernels:
- "int8": integer activations x integer weights, `torch._int_mm` (CPU and CUDA);
  W8A8, W4A8 (4-bit codes unpacked per call; 5/6-bit likewise), W4A4 (4-bit codes in int8).
- "fp8": float8 x float8, `torch._scaled_mm` (CUDA, compute capability >= 8.9).
- "dequant": weight-only quantization: the stored (packed) weight is dequantized
  per call into the input's dtype and the float op runs; what it saves is memory.
  Where the recipe allows it (`Recipe.weight_only_int8_activations`), such a layer may
  also run as int8 x int8 with dynamic per-token activations (path "int_mm_a8"), or
  (`Recipe.weight_only_bf16_activations`) in bfloat16 from a float32 input (path "bf16").

A low-rank branch (`dq.nn.transforms.LowRankBranch`) is added into the kernel's output
in place (`real_forward(..., branch=)`): one `addmm_`, no second output pass.

This module chooses (per layer and row count, measured: `dq.kernels.choice`) and sets the
execution mode; how each path computes a layer is `dq.kernels.runners`.
"""

from __future__ import annotations

import logging
import math
import weakref
from collections import defaultdict
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DQError
from . import choice, fp8, int8, onednn, runners

if TYPE_CHECKING:
    from ..nn.layers import QuantModule

logger = logging.getLogger(__name__)

EXECUTION_MODES = ("auto", "real", "sim")


# -- choosing -----------------------------------------------------------------------
def choose_kernel(layer: QuantModule) -> tuple[str | None, str]:
    """(kernel, why not) for a layer's formats; kernel None: only the simulated path."""
    w, a, layout = layer.weight_spec, layer.act_spec, layer.weight_layout
    if w is None:
        return None, "activation-only quantization (float weights) has no low-bit kernel"
    if a is None:
        return "dequant", ""
    conv = runners.conv_geometry(layer)
    if conv is not None and layer.conv_groups > 1:
        return None, "grouped convolutions have no low-bit kernel"
    pointwise = conv is None or (conv[0] == (1, 1) and not conv[1])
    if w.kind == "int" and a.kind == "int":
        if not layout.integer_matmul_ready:
            if w.log:
                return None, "log-domain weights have no integer kernel"
            if w.granularity == "group":
                return None, "group-wise weights without two-level scales (over 6 bits, or GPTQ codes) have no integer kernel"
            return None, f"asymmetric {w.bits}-bit weights do not fit int8 once their zero point is folded in"
        if a.dynamic and not pointwise:
            return None, "dynamic activations of a k x k or padded convolution have no integer kernel"
        return "int8", ""
    if w.kind.startswith("fp8") and a.kind.startswith("fp8"):
        if w.granularity == "group":
            return None, "group-wise fp8 weights have no fp8 kernel"
        if w.kind == a.kind == "fp8_e5m2":
            return None, "fp8 matmuls take at most one e5m2 operand"
        if not pointwise:
            return None, "k x k convolutions have no fp8 kernel"
        return "fp8", ""
    return None, f"{w.kind} weights with {a.kind} activations have no kernel"


# -- running ------------------------------------------------------------------------
def real_forward(layer: QuantModule, x: torch.Tensor, branch: nn.Module | None = None,
                 transform: nn.Module | None = None) -> torch.Tensor:
    """The layer's quantized op (`QuantModule.compute`) through the path chosen for it;
    with `branch` (its low-rank branch), that branch added into the output in place; with
    `transform` (its input transform), `x` is the raw input, transformed here (path "float_input"
    folds the transform and the layer's own branch into its weight copy instead)."""
    fast = layer.__dict__.get("_dq_fold_fast")
    if (fast is not None and fast[0] is transform and fast[1] is branch and fast[2] == x.shape and fast[3] == x.dtype
            and not torch.compiler.is_compiling()):
        return F.linear(x, fast[4], fast[5])  # a folded layer's later calls: nothing to look up
    fold = (transform is not None or branch is not None) and _may_fold(layer) and _foldable(layer, transform, branch)
    if fold and _known_path(layer, x) == "float_input":
        return _folded_forward(layer, x, transform, branch)
    raw = x
    if transform is not None:
        x = transform(x)
    if (fold and not torch.compiler.is_compiling() and layer.kernel in ("int8", "dequant")
            and _known_path(layer, raw) is None):
        # the first call for these rows: choose with the transform and branch counted (path
        # "float_input" folds them, the others pay them on top), and if it is chosen, this
        # call already runs folded, as every later one will (the same rounding throughout)
        if layer.__dict__.get("_dq_pending"):
            ready(layer)
        if _path(layer, x, (transform, branch)) == "float_input":
            return _folded_forward(layer, raw, transform, branch)
    y = _real_forward(layer, x)
    if branch is None:
        return y
    add_to = getattr(branch, "add_to", None)
    return add_to(y, x) if add_to is not None else y + branch(x)


def _folded_forward(layer: QuantModule, x: torch.Tensor, transform: nn.Module | None,
                    branch: nn.Module | None) -> torch.Tensor:
    """Path "float_input" on the raw input: one float op with the transform and branch folded in;
    the call is remembered, so the next one like it looks nothing up (`real_forward`)."""
    bias = None if layer.bias is None else layer.bias.to(x.dtype)
    weight = runners.folded_weight(layer, x.dtype)
    y = F.linear(x, weight, bias)
    if not torch.compiler.is_compiling():
        layer.__dict__["_dq_fold_fast"] = (transform, branch, x.shape, x.dtype, weight, bias)
    return y


def _real_forward(layer: QuantModule, x: torch.Tensor) -> torch.Tensor:
    if not torch.compiler.is_compiling() and layer.__dict__.get("_dq_pending"):
        ready(layer)  # the runtime tensors, made on the first eager call (see `_prepare`)
    if layer.kernel == "fp8":
        reason = fp8.device_unsupported(x.device)
        if reason is not None:
            if layer.strict_execution:
                raise DQError(f"fp8 execution: {reason}; {fp8.FP8_ALTERNATIVES}")
            return runners.fallback(layer, x, reason, logging.INFO)
        return runners.fp8_forward(layer, x)
    if layer.kernel is None:
        return layer.simulated(x)
    return runners.RUN[_path(layer, x)](layer, x)


# -- paths (dq.kernels.choice) ---------------------------------------------------------
def _rows(layer: QuantModule, x: torch.Tensor) -> int:
    """Rows of the layer's matmul for input `x` (b * ho * wo for a convolution)."""
    if runners.conv_geometry(layer) is None:
        return x.numel() // layer.weight_layout.cols
    kernel = tuple(layer.weight_shape[2:])
    pads = int8.conv_padding(layer.padding, kernel, layer.dilation)
    ho = int8.conv_output_size(x.shape[2], pads[2] + pads[3], kernel[0], layer.stride[0], layer.dilation[0])
    wo = int8.conv_output_size(x.shape[3], pads[0] + pads[1], kernel[1], layer.stride[1], layer.dilation[1])
    return x.shape[0] * ho * wo


def _probe(layer: QuantModule, x: torch.Tensor) -> torch.Tensor:
    """A few rows of `x` for screening paths cheaply."""
    if runners.conv_geometry(layer) is None:
        rows = x.reshape(-1, x.shape[-1])
        return rows[: choice.SCREEN_ROWS]
    return x[:1, :, :4, :4] if x.shape[2] >= 4 and x.shape[3] >= 4 else x[:1]


def _grow(layer: QuantModule, x: torch.Tensor):
    """`choice.measure`'s `grow`: more of `x` than the screened part, None once it is all of it.
    A linear layer's rows eightfold; a convolution's patch twice as high and wide, then its batch."""
    if runners.conv_geometry(layer) is None:
        rows = x.reshape(-1, x.shape[-1])
        return lambda probe: rows[: 8 * probe.shape[0]] if probe.shape[0] < rows.shape[0] else None

    def larger(probe: torch.Tensor) -> torch.Tensor | None:
        b, h, w = probe.shape[0], probe.shape[2], probe.shape[3]
        if h < x.shape[2] or w < x.shape[3]:
            return x[:b, :, : 2 * h, : 2 * w]
        return x[: 8 * b] if b < x.shape[0] else None

    return larger


def _float_copy_nbytes(layer: QuantModule, dtype: torch.dtype) -> int:
    return math.prod(layer.weight_shape) * dtype.itemsize


def candidate_paths(layer: QuantModule, device: torch.device, dtype: torch.dtype) -> list[str]:
    """The paths (`dq.kernels.choice.PATHS`) this layer's formats allow on `device`."""
    paths = []
    layout, act = layer.weight_layout, layer.act_spec
    if layer.kernel == "int8":
        if (device.type == "cpu" and layer.__dict__.get("_dq_allow_prepack", True) and not layout.packed
                and not act.dynamic and onednn.available()):
            paths.append("onednn")
        paths.append("int_mm")
        if runners.unpacks_per_call(layer) and layer.__dict__.get("_dq_allow_int8_copy", True):
            paths.append("int8_copy")
    if (layer.kernel == "dequant" and layer.__dict__.get("_dq_weight_only_int8") and layout.integer_matmul_ready
            and runners.conv_geometry(layer) is None):
        paths.append("int_mm_a8")
    if layer.kernel == "dequant" and layer.__dict__.get("_dq_weight_only_bf16") and dtype == torch.float32:
        paths.append("bf16")
    if _float_copy_nbytes(layer, dtype) <= layer.__dict__.get("_dq_float_copy_max_bytes", choice.FLOAT_COPY_MAX_BYTES):
        paths.append("float_copy")
        if act is not None and layer.__dict__.get("_dq_float_activations") and layer.kernel in ("int8", "dequant"):
            paths.append("float_input")
        elif act is None and layer.kernel == "dequant" and (layer.input_transform is not None or layer.branch is not None):
            paths.append("float_input")  # weight-only: the same function, transform and branch folded in
    paths.append("dequant")
    return paths


def _references(layer: QuantModule, allowed: list[str]) -> dict[str, object]:
    """Paths that compute another function than the simulated layer, with its simulation."""
    refs: dict[str, object] = {}
    if "int_mm_a8" in allowed:
        refs["int_mm_a8"] = lambda t: runners.simulated_a8(layer, t)
    if "float_input" in allowed:
        refs["float_input"] = lambda t: runners.float_activations(layer, t)
    if "bf16" in allowed:
        refs["bf16"] = lambda t: runners.simulated_bf16(layer, t)
    return refs


def _default_path(layer: QuantModule) -> str:
    return "int_mm" if layer.kernel == "int8" else "dequant"


def _nearest_choice(chosen: dict[int, str], rows: int) -> str:
    """The choice of the row bucket nearest `rows` (log scale): what a compiled graph takes."""
    return chosen[min(chosen, key=lambda b: abs(math.log2(b) - math.log2(rows)))]


def _around_key(transform: nn.Module | None, branch: nn.Module | None) -> str:
    """The cache-key part of a choice measured with a call's input transform and branch around
    the op (the calls path "float_input" folds)."""
    return "|around:" + ("t" if transform is not None else "") + ("b" if branch is not None else "")


def _own_around_key(layer: QuantModule, allowed: list[str]) -> str:
    """`_around_key` of the calls `real_forward` folds for this layer (its own transform and
    branch, where path "float_input" may fold them), else "": the key its choices are cached
    under, so that a layer set up from the cache (`_prepare`) reads the choice measured for the
    calls it will make, never the one of a layer of the same shape without them."""
    transform, branch = layer.input_transform, layer.branch
    if (transform is None and branch is None) or "float_input" not in allowed:
        return ""
    return _around_key(transform, branch) if _may_fold(layer) and _foldable(layer, transform, branch) else ""


def _overhead(layer: QuantModule, x: torch.Tensor, around: tuple) -> tuple[str, object]:
    """(key suffix, function): the work a layer's call does around its op on every path but
    "float_input", which folds it into its weight: the input transform and the low-rank branch's
    two matmuls. Timed with the other paths, so the choice compares whole-layer costs (on a
    128-wide layer smoothing and a rank-32 branch cost more than int8 saves over float)."""
    transform, branch = around
    suffix = _around_key(transform, branch)
    out: list[torch.Tensor] = []

    def run(t: torch.Tensor) -> None:
        if transform is not None:
            transform(t)
        if branch is not None:
            if not out:
                out.append(torch.zeros(*t.shape[:-1], layer.weight_layout.out_features, dtype=t.dtype, device=t.device))
            add_to = getattr(branch, "add_to", None)
            add_to(out[0], t) if add_to is not None else branch(t)
    return suffix, run


def _path(layer: QuantModule, x: torch.Tensor, around: tuple | None = None) -> str:
    """The path for this call: the layer's choice for its row bucket, measured on the
    first eager call (never inside torch.compile, which takes the nearest known choice).
    `around`: (input transform, branch) of a call that path "float_input" could fold."""
    forced = layer.__dict__.get("_dq_forced_path")
    if forced is not None:
        return forced
    chosen: dict[int, str] = layer.__dict__.setdefault("_dq_paths", {})
    rows = choice.bucket(_rows(layer, x))
    path = chosen.get(rows)
    if path is not None:
        return path
    if torch.compiler.is_compiling():
        if not chosen:
            return _default_path(layer)
        path = _nearest_choice(chosen, rows)
        return path if path != "onednn" or "_dq_prepacked" in layer.__dict__ else "int_mm"
    allowed = candidate_paths(layer, x.device, x.dtype)
    suffix, overhead = ("", None) if around is None or "float_input" not in allowed else _overhead(layer, x, around)
    key = f"{choice.describe(layer)}{suffix}|m{rows}|{x.dtype}|{x.device.type}"
    store = choice.cache()
    found = store.get(key)
    picked = None if found is None else found.choice_among(allowed)
    if picked is None:
        found = choice.measure(
            {p: (lambda t, p=p: runners.RUN[p](layer, t)) for p in allowed}, layer.simulated, x, _probe(layer, x),
            references=_references(layer, allowed), overhead=overhead, folded=("float_input",), grow=_grow(layer, x),
        )
        store.put(key, found)
        choice.log_choice(key, found)
        picked = found.choice
    chosen[rows] = picked
    _release_unused(layer)
    return picked


def layer_paths(layer: nn.Module) -> list[str]:
    """The paths (`choice.PATHS`) a quantized layer runs: its forced path, or the choice of each
    row count seen so far (sorted); ["fp8"] or ["sim"] for those kernels, [] before any choice."""
    forced = layer.__dict__.get("_dq_forced_path")
    if forced is not None:
        return [forced]
    kernel = getattr(layer, "kernel", None)
    if kernel is None or kernel == "fp8":
        return [kernel or "sim"]
    return sorted(set(layer.__dict__.get("_dq_paths", {}).values()))


def path_counts(model: nn.Module) -> dict[str, int]:
    """How many quantized layers of `model` run each path (a layer with two row counts on two
    paths counts once for each; one not called yet counts under its kernel's default path)."""
    from ..nn.layers import QuantModule

    counts: dict[str, int] = defaultdict(int)
    for m in model.modules():
        if isinstance(m, QuantModule):
            for p in layer_paths(m) or [_default_path(m)]:
                counts[p] += 1
    return dict(sorted(counts.items()))


def _release_unused(layer: QuantModule) -> None:
    """Drop runtime weight copies that no chosen path of this layer reads."""
    used = set(layer.__dict__.get("_dq_paths", {}).values()) | {layer.__dict__.get("_dq_forced_path")}
    if "onednn" not in used:
        layer.__dict__.pop("_dq_prepacked", None)
    if "float_copy" not in used:
        layer.__dict__.pop("_dq_float_weight", None)
    if "float_input" not in used:
        layer.__dict__.pop("_dq_float_folded", None)
        layer.__dict__.pop("_dq_fold_fast", None)
    if not used & {"int8_copy", "int_mm_a8"}:
        layer.__dict__.pop("_dq_int8_weight", None)
    if "int_mm_a8" not in used:
        layer.__dict__.pop("_dq_int8_wsum", None)


def runtime_nbytes(module: nn.Module) -> int:
    """Bytes of the runtime weight copies (oneDNN layout, float and int8 copies) the chosen paths keep."""
    total = 0
    for m in module.modules():
        packed = m.__dict__.get("_dq_prepacked")
        total += packed.nbytes if packed is not None else 0
        for name in ("_dq_float_weight", "_dq_float_folded", "_dq_int8_weight"):
            copy = m.__dict__.get(name)
            total += copy.numel() * copy.element_size() if copy is not None else 0
    return total


def _known_path(layer: QuantModule, x: torch.Tensor) -> str | None:
    """The path already chosen for this call's rows (None: not measured yet); never measures."""
    forced = layer.__dict__.get("_dq_forced_path")
    if forced is not None:
        return forced
    chosen = layer.__dict__.get("_dq_paths")
    if not chosen or layer.kernel not in ("int8", "dequant"):
        return None
    rows = choice.bucket(_rows(layer, x))
    path = chosen.get(rows)
    if path is None and torch.compiler.is_compiling():
        path = _nearest_choice(chosen, rows)
    return path


def _may_fold(layer: QuantModule) -> bool:
    """Whether path "float_input" may serve this layer: allowed to skip its activation rounding
    (`_dq_float_activations`), or weight-only, where the float op on its raw input IS its function
    (its input transform and low-rank branch folded into one float weight copy, exact up to float
    rounding), so no recipe opt-in is needed."""
    return bool(layer.__dict__.get("_dq_float_activations")) or (layer.act_spec is None and layer.kernel == "dequant")


def _foldable(layer: QuantModule, transform: nn.Module | None, branch: nn.Module | None) -> bool:
    """Whether path "float_input" may run on the raw input with the layer's input transform and
    low-rank branch folded into its weight copy: a linear layer's own modules (a LoRA's
    combined branch is not the layer's), channels last."""
    if runners.conv_geometry(layer) is not None or getattr(layer, "conv_groups", None) is not None:
        return False
    if transform is not None and (transform is not layer.input_transform or transform.channel_dim != -1):
        return False
    return branch is None or branch is layer.branch


# -- setting the mode -----------------------------------------------------------------
RUNTIME_STATE = (
    "_dq_static", "_dq_prepacked", "_dq_float_weight", "_dq_float_folded", "_dq_fold_fast", "_dq_int8_weight", "_dq_int8_wsum", "_dq_paths", "_dq_forced_path", "_dq_fallbacks",
)


def release_runtime(layer: nn.Module) -> None:
    """Forget the runtime copies and path choices (they are remade on the next call); called
    when a layer moves to another device or dtype."""
    for name in RUNTIME_STATE:
        layer.__dict__.pop(name, None)


def _prepare(
    layer: QuantModule, cpu_prepack: bool, path: str | None, float_copy_max_bytes: int,
    int8_copy: bool = True, weight_only_int8: bool = False, known_memo: dict | None = None,
    float_activations: bool = False, weight_only_bf16: bool = False,
) -> None:
    """A layer's path options and the choices this machine's cache already holds for its shape
    class; cheap, no weight is read. The runtime tensors derived from the weights (`ready`) are
    made later: on the layer's first eager call, or for every pending layer when a
    torch.compile trace starts (`_compile_started`), or by `prepare_runtime`.
    known_memo: a dict shared by the layers of one `set_execution` call, so that the cache's
    entries are scanned once per shape class, not once per layer."""
    layer._buffers.pop("wsum", None)
    layer._non_persistent_buffers_set.discard("wsum")
    release_runtime(layer)
    layer.__dict__["_dq_allow_prepack"] = cpu_prepack
    layer.__dict__["_dq_float_copy_max_bytes"] = float_copy_max_bytes
    layer.__dict__["_dq_allow_int8_copy"] = int8_copy
    layer.__dict__["_dq_weight_only_int8"] = weight_only_int8 and layer.kernel == "dequant"
    layer.__dict__["_dq_float_activations"] = float_activations and layer.act_spec is not None
    layer.__dict__["_dq_weight_only_bf16"] = weight_only_bf16 and layer.kernel == "dequant"
    if layer.kernel is None or layer.kernel == "fp8" or layer.qweight.is_meta:
        return
    device = layer.qweight.device
    dtype = layer.bias.dtype if layer.bias is not None else torch.float32
    allowed = candidate_paths(layer, device, dtype)
    if path in allowed:
        layer.__dict__["_dq_forced_path"] = path
    else:
        prefix, suffix = choice.describe(layer) + _own_around_key(layer, allowed) + "|m", f"|{dtype}|{device.type}"
        memo_key = (prefix, suffix, tuple(allowed))
        known = None if known_memo is None else known_memo.get(memo_key)
        if known is None:
            known = {}
            for key, found in choice.cache().entries.items():
                picked = found.choice_among(allowed) if key.startswith(prefix) and key.endswith(suffix) else None
                if picked is not None:
                    known[int(key[len(prefix):-len(suffix)])] = picked
            if known_memo is not None:
                known_memo[memo_key] = known
        layer.__dict__["_dq_paths"] = dict(known)  # each layer its own (choices are added per layer)
    layer.__dict__["_dq_pending"] = True
    _PENDING.add(layer)
    _hook_compile()


def ready(layer: QuantModule) -> None:
    """Make a layer's runtime tensors derived from its weights, once (never saved): the weight
    row sums asymmetric int8 activations need, and the copies the paths planned for it keep
    (oneDNN's prepacked weight, the int8 copy of 4-bit codes). Eager code only: inside a
    torch.compile trace nothing can be stored."""
    if layer.__dict__.pop("_dq_pending", None) is None:
        return
    _PENDING.discard(layer)
    if layer.qweight.is_meta:
        return
    planned = {layer.__dict__.get("_dq_forced_path"), *layer.__dict__.get("_dq_paths", {}).values()}
    weight = None
    if planned & {"int8_copy", "int_mm_a8"}:
        weight = layer.__dict__["_dq_int8_weight"] = runners.integer_weight(layer).contiguous()
    if "int_mm_a8" in planned:
        layer.__dict__["_dq_int8_wsum"] = weight.sum(dim=1, dtype=torch.int32).float()
    if layer.kernel == "int8" and not layer.act_spec.symmetric:
        weight = runners.integer_weight(layer) if weight is None else weight
        layer.register_buffer("wsum", weight.sum(dim=1, dtype=torch.int32).float(), persistent=False)
    if layer.qweight.device.type == "cpu" and "onednn" in planned:
        runners.prepacked(layer)  # a compiled graph cannot make it


def prepare_runtime(model: nn.Module) -> nn.Module:
    """Make the runtime tensors of every quantized layer of `model` now (`ready`) rather than on
    each layer's first call; e.g. before timing a first call, or before tracing with a tool that
    does not go through torch.compile's entry."""
    for m in model.modules():
        if "_dq_pending" in m.__dict__:
            ready(m)
    return model


# Layers set up by `_prepare` whose runtime tensors are not made yet. A torch.compile trace
# cannot make them (a graph stores nothing), so they are made when a compile starts: the
# start callback runs eagerly, before Dynamo reads any layer. Without it (a Dynamo without
# the callback, or one `torch._dynamo.reset()` cleared before the next `set_execution`), a
# pending layer's row sums and int8 copy are computed inside the graph, per call: same
# outputs, slower.
_PENDING: weakref.WeakSet = weakref.WeakSet()


def _compile_started(_args: object = None) -> None:
    for layer in list(_PENDING):
        ready(layer)


def _hook_compile() -> None:
    handler = getattr(getattr(torch._dynamo, "callback", None), "callback_handler", None)
    starts = getattr(handler, "start_callbacks", None)
    if starts is not None and _compile_started not in starts:
        handler.register_start_callback(_compile_started)


def check_execution(layers: dict[str, QuantModule], mode: str) -> dict[str, tuple[str | None, str]]:
    """The kernel of each layer under `mode` (see `set_execution`); raises DQError, changing
    nothing, where the mode cannot be honoured. Call it before swapping layers into a model."""
    if mode not in EXECUTION_MODES:
        raise DQError(f"unknown execution mode {mode!r}; choose one of {list(EXECUTION_MODES)}")
    choices = {name: choose_kernel(m) for name, m in layers.items()}
    if mode == "real":
        missing = {name: why for name, (kernel, why) in choices.items() if kernel is None}
        if missing:
            examples = "; ".join(f"{name}: {why}" for name, why in list(missing.items())[:3])
            raise DQError(
                f"execution 'real': {len(missing)} layer(s) have no low-bit kernel ({examples}); use execution "
                "'auto' to run those simulated, or a recipe whose formats have kernels (w8a8, w4a8, w4a16, fp8)"
            )
        if any(kernel == "fp8" for kernel, _ in choices.values()) and not fp8.any_device():
            raise DQError(f"execution 'real' with fp8 layers needs a CUDA GPU of compute capability >= 8.9, and "
                          f"this machine has none; {fp8.FP8_ALTERNATIVES}")
    return choices


def set_execution(
    model: nn.Module, mode: str, *, cpu_prepack: bool = True, path: str | None = None,
    float_copy_max_bytes: int = choice.FLOAT_COPY_MAX_BYTES, int8_copy: bool = True,
    weight_only_int8: bool | None = None, float_activations: bool | None = None,
    weight_only_bf16: bool | None = None, attention_bf16: bool | None = None, gelu: bool = True,
) -> nn.Module:
    """Run every quantized layer of `model` through low-bit kernels or simulated.

    mode "real": every layer must have a kernel (else DQError, nothing changed);
    "auto": real where a layer has one, simulated otherwise, one log line per reason;
    "sim": fake quantization in float everywhere (research). Shapes a kernel cannot
    take at call time (see `real_forward`) run simulated in every mode.
    Which code path computes each real layer is chosen by measurement on its first call
    (`dq.kernels.choice`): the fastest correct one on this machine.
    cpu_prepack: False removes oneDNN's fused int8 linear (a prepacked weight copy, one
    more byte per weight) from the choice.
    path: force one path (`choice.PATHS`) on every real layer whose formats allow it
    (tests, benchmarks); the others are measured as usual.
    float_copy_max_bytes: the largest dequantized float weight copy a layer may keep for
    the "float_copy" path (small layers, where integer matmuls do not pay).
    int8_copy: False removes "int8_copy" (packed 4/5/6-bit weights kept unpacked as int8 at run
    time: faster, one byte per weight instead of 4/8 to 6/8) from the choice.
    weight_only_int8: let weight-only layers run as int8 x int8 with dynamic per-token int8
    activations (path "int_mm_a8"; it changes the numerics). None: what the model's recipe
    says (`Recipe.weight_only_int8_activations`, off unless set).
    float_activations: let small layers with quantized activations run as the float op on
    their quantized weight and UNQUANTIZED input (path "float_input", a kept float weight copy)
    where that is faster than every integer path (narrow layers on a CPU; it changes the
    numerics, towards full precision). None: what the model's recipe says
    (`Recipe.float_activations_where_faster`: on in w8a8, w8a8-dynamic, w4a8 and w4a4, off unless set).
    weight_only_bf16: let weight-only layers with a float32 input run their op in bfloat16
    (path "bf16": input and product rounded to bfloat16, the weight's exact integers or its
    bfloat16 rounding) where that is faster (CPUs
    with bfloat16 matmul instructions). None: what the model's recipe says
    (`Recipe.weight_only_bf16_activations`; on in the w4a16 preset).
    attention_bf16: let the attention core of `Attention` modules with diffusers' default SDPA processor run on
    bfloat16 Q, K, V where that is measured faster (`dq.nn.bf16_attention`; "real" and "auto"
    only, "sim" puts the plain processors back). None: what the model's recipe says
    (`Recipe.attention_bf16_where_faster`; on in the calibrated W*A* presets).
    gelu: let diffusers' tanh-approximated `GELU` modules (DiT feed-forwards) compute it in the
    form measured faster on this machine, torch's kernel or the same function as x * sigmoid(2u)
    (`dq.nn.gelu`; float32 rounding apart, the same values; "real" and "auto" only).
    Runtime tensors derived from the weights are made on each layer's first call (or when a
    torch.compile trace starts, or by `prepare_runtime`): call it again after changing a
    layer's stored weights in place.
    """
    from ..nn.layers import QuantModule

    if path is not None and path not in choice.PATHS:
        raise DQError(f"unknown kernel path {path!r}; choose one of {list(choice.PATHS)} or None (measure)")
    layers = {name: m for name, m in model.named_modules() if isinstance(m, QuantModule)}
    choices = check_execution(layers, mode)
    recipe = getattr(model, "_dq_recipe", None)  # the options not given come from the model's recipe
    if weight_only_int8 is None:
        weight_only_int8 = bool(getattr(recipe, "weight_only_int8_activations", False))
    if float_activations is None:
        float_activations = bool(getattr(recipe, "float_activations_where_faster", False))
    if weight_only_bf16 is None:
        weight_only_bf16 = bool(getattr(recipe, "weight_only_bf16_activations", False))
    if attention_bf16 is None:
        attention_bf16 = bool(getattr(recipe, "attention_bf16_where_faster", False))
    for flag, value in (("weight_only_int8", weight_only_int8), ("float_activations", float_activations),
                        ("weight_only_bf16", weight_only_bf16), ("attention_bf16", attention_bf16)):
        if not isinstance(value, bool):
            raise DQError(f"set_execution's {flag} must be True, False or None, got {value!r}")
    if not isinstance(gelu, bool):
        raise DQError(f"set_execution's gelu must be True or False, got {gelu!r}")
    why_sim: dict[str, list[str]] = defaultdict(list)
    counts: dict[str, int] = defaultdict(int)
    known_memo: dict = {}
    for name, m in layers.items():
        kernel, why = choices[name]
        object.__setattr__(m, "_dq_name", name or type(m).__name__)
        m.__dict__.pop("_dq_fallbacks", None)
        # plain attributes, set in the instance dict (nn.Module.__setattr__ checks its tensor and
        # module dicts first: three calls per layer at every load)
        if mode == "sim" or kernel is None:
            m.__dict__.update(execution="sim", kernel=None, strict_execution=False)
            if mode != "sim":
                why_sim[why].append(name)
        else:
            m.__dict__.update(execution="real", kernel=kernel, strict_execution=mode == "real")
        _prepare(m, cpu_prepack, path, float_copy_max_bytes, int8_copy, weight_only_int8, known_memo, float_activations,
                 weight_only_bf16)
        counts[m.kernel or "sim"] += 1
    for m in model.modules():  # int8 attention processors (dq.nn.attention) follow the mode too
        # the instance dict, not getattr: a missing attribute raises inside nn.Module.__getattr__ (slow, per module)
        processor = m.__dict__.get("processor", m._modules.get("processor"))
        if getattr(processor, "int8", False):
            processor.execution = "sim" if mode == "sim" else "real"
    from ..nn.bf16_attention import set_attention_bf16

    bf16_cores = set_attention_bf16(model, attention_bf16 and mode != "sim")
    from ..nn.gelu import set_gelu

    gelus = set_gelu(model, gelu and mode != "sim")
    for why, names in why_sim.items():
        logger.info("execution %s: %d layer(s) run simulated: %s (e.g. %s)", mode, len(names), why, names[0])
    if counts.get("fp8") and not fp8.any_device():
        logger.info(
            "execution %s: %d fp8 layer(s) run simulated until they are on a CUDA GPU of compute capability >= 8.9",
            mode, counts["fp8"],
        )
    logger.info("execution %s: %s", mode, ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
                + (f"; attention cores in bfloat16 where faster: {bf16_cores}" if bf16_cores else "")
                + (f"; tanh GELUs in the form measured faster: {gelus}" if gelus else ""))
    return model
