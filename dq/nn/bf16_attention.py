"""The attention core in bfloat16 where that is faster: chosen by measurement, like the layers' paths.

On CPUs with bfloat16 matrix instructions (AMX on Intel Xeon since Sapphire Rapids, AVX-512
BF16 on AMD Zen 4) torch's fused CPU attention runs about twice as fast on bfloat16 inputs
as on float32 ones; on a PixArt-Sigma-shaped slice the attention core is about a third of a
W8A8 denoiser step once the linear layers run in int8. `BF16AttnProcessor` replaces an
`Attention` module's plain SDPA processor (`AttnProcessor2_0`, diffusers' default) and computes
softmax(Q K^T / sqrt(d) + mask) V with torch's SDPA on Q, K, V rounded to bfloat16 (float32
accumulation and softmax inside the kernel, the output rounded to bfloat16 and returned in
float32): path "sdpa_bf16". Path "sdpa" is the float32 call the replaced processor makes.

On the first eager call per shape class (head size, key tokens and query rows bucketed to a
power of two, mask kind, dtype, device) both are run on the real input; "sdpa_bf16" must be
within `TOLERANCE` (relative) of the float32 result (a correct kernel is within about 0.5%:
bfloat16 keeps 8 significant bits), then both are timed, interleaved, and the faster is kept
for that class, in the kernel choice cache of this machine (`dq.kernels.choice`; a tie within
3% goes to "sdpa"; the choice is logged by `dq.kernels.choice`). Inside torch.compile nothing
is measured: the choice cached when the processor was installed or measured since is used, or
"sdpa". Inputs that are not float32 (a bfloat16 or float16 model) run SDPA in their own dtype.

It changes the numerics (about 49 dB SQNR on the attention output, against the 30-40 dB of an
int8 activation), so it is installed only where the recipe allows it
(`Recipe.attention_bf16_where_faster`, on in the calibrated W*A* presets, as their weight-only
layers' bfloat16 path is) or `set_execution(..., attention_bf16=True)`, and only in real
execution; the recipe's own `attention` option (quantized or int8 attention) wins where set.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import choice
from .attention import CoreAttnProcessor, _attention_modules, sdpa

TOLERANCE = 2e-2


def _bf16_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(torch.bfloat16)
    out = F.scaled_dot_product_attention(q.to(torch.bfloat16), k.to(torch.bfloat16), v.to(torch.bfloat16),
                                         attn_mask=mask, dropout_p=0.0, is_causal=False)
    return out.to(q.dtype)


RUN = {"sdpa": sdpa, "sdpa_bf16": _bf16_sdpa}


def shape_key(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None) -> str:
    """The attention core's shape class: what makes two calls time alike."""
    rows = q.shape[0] * q.shape[1] * q.shape[2]
    kind = "none" if mask is None else ("bool" if mask.dtype == torch.bool else "float")
    return (f"attention|sdpa|d{q.shape[-1]}|kv{choice.bucket(k.shape[-2])}|mask:{kind}"
            f"|m{choice.bucket(rows)}|{q.dtype}|{q.device.type}")


def measure(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> choice.Measurement:
    """Check "sdpa_bf16" against float32 SDPA on this input, then time both (interleaved)."""
    sync = torch.cuda.synchronize if q.is_cuda else (lambda: None)
    dropped: dict[str, str] = {}
    with torch.no_grad():
        ref = RUN["sdpa"](q, k, v, mask)
        try:
            error = choice._rel_error(RUN["sdpa_bf16"](q, k, v, mask), ref)
            if not error <= TOLERANCE:
                dropped["sdpa_bf16"] = f"wrong result (relative error {error:.1e} against float32 attention)"
        except Exception as exc:  # a kernel that raises here is dropped, not fatal
            dropped["sdpa_bf16"] = f"raised {type(exc).__name__}: {exc}"[:200]
        fns = {p: (lambda fn=fn: fn(q, k, v, mask)) for p, fn in RUN.items() if p not in dropped}
        times = choice._race(fns, sync, clock=choice.clock_for(q))
    return choice.Measurement(choice.decide(times, dropped), times, dropped)


class BF16AttnProcessor(CoreAttnProcessor):
    """A plain attention processor whose core runs in bfloat16 where measured faster (see the module)."""

    def __init__(self, original: Any = None, known: dict[str, str] | None = None):
        super().__init__()
        self.original = original
        # shape class -> path: the choices this machine's cache held at install, and those measured since
        self.paths: dict[str, str] = dict(known or {})

    def path_for(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> str:
        if q.dtype != torch.float32:
            return "sdpa"
        key = shape_key(q, k, mask)
        path = self.paths.get(key)
        if path is not None:
            return path
        if torch.compiler.is_compiling():
            return "sdpa"  # nothing is measured (or read from disk) inside a graph
        found = choice.cached(key, lambda: measure(q, k, v, mask))
        path = self.paths[key] = found.choice if found.choice in RUN else "sdpa"
        return path

    def core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return RUN[self.path_for(q, k, v, mask)](q, k, v, mask)


def set_attention_bf16(model: nn.Module, on: bool) -> int:
    """Install `BF16AttnProcessor` on the `Attention` modules of `model` that run diffusers'
    plain SDPA processor (on), or put their original processors back (off); returns how many
    now run it. Processors of other kinds (the recipe's quantized attention, the legacy
    `AttnProcessor`, whose float32 core is not SDPA's, SD3's joint attention, Flux, a user's
    own) are left alone."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    installed = 0
    known = None
    for _, module in _attention_modules(model):
        processor = module.processor
        if isinstance(processor, BF16AttnProcessor):
            if on:
                installed += 1
            else:
                module.set_processor(processor.original)
        elif on and isinstance(module, Attention) and type(processor) is AttnProcessor2_0:
            if known is None:  # the cache's attention choices, read once per model
                known = choice.cached_choices("attention|", RUN)
            module.set_processor(BF16AttnProcessor(original=processor, known=known))
            installed += 1
    return installed
