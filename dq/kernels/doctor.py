"""`dq doctor`: this machine's kernel table (each path's time per shape class, and the choice).

Layers of the given widths are built with random weights in each format, run once in
real execution (which measures and caches the choice, `dq.kernels.choice`), and every
allowed path is then timed again beside the float layer they replace, so the table
shows what the choice gained or where no path beats float.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..quant.spec import QuantSpec
from . import choice, dispatch, runners

FORMATS: dict[str, tuple[QuantSpec, QuantSpec | None]] = {
    "w8a8": (QuantSpec(bits=8), QuantSpec(bits=8, granularity="tensor", symmetric=False)),
    "w8a8-dynamic": (QuantSpec(bits=8), QuantSpec(bits=8, granularity="token", symmetric=False, dynamic=True)),
    "w4a8": (QuantSpec(bits=4, granularity="group", group_size=64), QuantSpec(bits=8, granularity="tensor", symmetric=False)),
    "w4a16": (QuantSpec(bits=4, granularity="group", group_size=64), None),
}


def _options(fmt: str) -> dict[str, bool]:
    """The execution options the preset of this name sets (`dq.recipe.preset`): whether its
    weight-only layers may run in bfloat16, and its narrow layers on their unquantized input,
    so that the table shows the paths the preset's layers choose among."""
    from ..recipe import preset

    p = preset(fmt)
    return {"weight_only_bf16": p.weight_only_bf16_activations, "float_activations": p.float_activations_where_faster}


@dataclass
class Row:
    fmt: str
    width: int
    rows: int
    key: str
    float_s: float
    times: dict[str, float]
    dropped: dict[str, str]
    choice: str

    @property
    def speedup(self) -> float:
        """Float layer time over the chosen path's time (above 1: faster than float)."""
        t = self.times.get(self.choice)
        return self.float_s / t if t else float("nan")


def measure_table(
    widths: Sequence[int] = (128, 512, 1152), rows: int = 256, formats: Sequence[str] = tuple(FORMATS),
    dtype: torch.dtype = torch.float32, device: str = "cpu",
) -> list[Row]:
    from ..nn.layers import QuantLinear

    out = []
    for fmt in formats:
        for width in widths:
            weight, act = FORMATS[fmt]
            if weight.granularity == "group" and width % weight.group_size:
                weight = weight.replace(granularity="channel")  # as dq.engine does for such layers
            torch.manual_seed(0)
            layer = torch.nn.Linear(width, width).to(device)
            q = QuantLinear.from_float(layer, weight, act, None if act is None or act.dynamic else [(-4.0, 4.0)])
            q = q.to(device=device, dtype=dtype)
            layer = layer.to(dtype)
            dispatch.set_execution(q, "real", **_options(fmt))
            x = torch.randn(rows, width, device=device, dtype=dtype)
            key = f"{choice.describe(q)}|m{choice.bucket(rows)}|{dtype}|{x.device.type}"
            with torch.no_grad():
                q(x)  # measures (or reads the cache) and keeps the choice
                found = choice.cache().get(key)
                times = _race_paths(q, layer, x, found.dropped)
                float_s = times.pop("float")
            out.append(Row(fmt, width, rows, key, float_s, times, dict(found.dropped), q._dq_paths[choice.bucket(rows)]))
    return out


def _race_paths(q, layer: torch.nn.Module, x: torch.Tensor, dropped: dict[str, str]) -> dict[str, float]:
    """Best time of the float layer ("float") and of each path not dropped, interleaved."""
    fns = {"float": lambda: layer(x)}
    for p in dispatch.candidate_paths(q, x.device, x.dtype):
        if p not in dropped:
            fns[p] = lambda p=p: runners.RUN[p](q, x)
    return choice._race(fns, torch.cuda.synchronize if x.is_cuda else (lambda: None))


@dataclass
class CoreRow:
    """One token count of a measured choice outside the layers (the attention core, the tanh
    GELU): each path's time, the paths dropped, the choice and the path it replaces."""

    tokens: int
    key: str
    times: dict[str, float]
    dropped: dict[str, str]
    choice: str
    baseline: str  # "sdpa" (float32 attention) or "gelu" (torch's kernel)

    @property
    def speedup(self) -> float:
        """The replaced path's time over the chosen path's time."""
        return self.times[self.baseline] / self.times[self.choice]


def _core_row(n: int, key: str, measure, run: dict, baseline: str, device: str) -> CoreRow:
    """Measured (or read from the cache) as a model's first call would, then every path not
    dropped timed again beside the others (`run`: path -> function of no arguments)."""
    with torch.no_grad():
        found = choice.cached(key, measure)
        fns = {p: fn for p, fn in run.items() if p not in found.dropped}
        times = choice._race(fns, torch.cuda.synchronize if device.startswith("cuda") else (lambda: None))
    return CoreRow(n, key, times, dict(found.dropped), found.choice, baseline)


def measure_attention(tokens: Sequence[int] = (256, 1024), batch: int = 2, heads: int = 16, head_dim: int = 72,
                      device: str = "cpu") -> list[CoreRow]:
    """The attention core's paths (`dq.nn.bf16_attention`) at `tokens` query and key tokens
    (self-attention of PixArt-Sigma's shape by default)."""
    from ..nn import bf16_attention as B

    out = []
    for n in tokens:
        torch.manual_seed(0)
        q, k, v = (torch.randn(batch, heads, n, head_dim, device=device) for _ in range(3))
        run = {p: (lambda fn=fn, q=q, k=k, v=v: fn(q, k, v, None)) for p, fn in B.RUN.items()}
        out.append(_core_row(n, B.shape_key(q, k, None), lambda q=q, k=k, v=v: B.measure(q, k, v, None), run, "sdpa", device))
    return out


def measure_gelu(tokens: Sequence[int] = (256, 1024), batch: int = 2, width: int = 4608,
                 device: str = "cpu") -> list[CoreRow]:
    """The feed-forward's tanh GELU (`dq.nn.gelu`) on [batch, tokens, width] (PixArt-Sigma's
    feed-forward width by default)."""
    from ..nn import gelu as G

    out = []
    for n in tokens:
        torch.manual_seed(0)
        x = torch.randn(batch, n, width, device=device) * 2
        run = {p: (lambda fn=fn, x=x: fn(x)) for p, fn in G.RUN.items()}
        out.append(_core_row(n, G.shape_key(x), lambda x=x: G.measure(x), run, "gelu", device))
    return out


def _render_core(rows: Sequence[CoreRow], title: str, paths: tuple[str, str], versus: str) -> str:
    if not rows:
        return ""
    widths = [max(10, len(p)) for p in paths]
    lines = ["", "", title, f"{'tokens':>6} " + " ".join(f"{p:>{w}}" for p, w in zip(paths, widths))
             + f"  {'choice':<13} vs {versus}"]
    for r in rows:
        cells = [f"{r.times[p] * 1e3:>{w - 2}.3f}ms" if p in r.times else f"{'dropped':>{w}}" for p, w in zip(paths, widths)]
        lines.append(f"{r.tokens:>6} " + " ".join(cells) + f"  {r.choice:<13} {r.speedup:.2f}x")
    return "\n".join(lines)


def render_attention(rows: Sequence[CoreRow]) -> str:
    return _render_core(rows, "attention core (batch 2, 16 heads x 72; `attention_bf16_where_faster`):",
                        ("sdpa", "sdpa_bf16"), "float32")


def render_gelu(rows: Sequence[CoreRow], width: int = 4608) -> str:
    return _render_core(rows, f"feed-forward tanh GELU (batch 2, width {width}; `dq.nn.gelu`, in real execution):",
                        ("gelu", "gelu_sigmoid"), "torch")


def render(rows: Sequence[Row]) -> str:
    info = choice.machine()
    lines = [
        f"machine: {info['cpu']} ({info['vendor']} {info['family_model_stepping']}); ISA: {', '.join(info['isa']) or 'none'}; "
        f"{info['threads']} torch thread(s); torch {info['torch']}" + (f"; GPU: {info['cuda']}" if info["cuda"] else ""),
        f"cache: {choice.cache().path}",
        "",
        f"{'format':<13} {'width':>5} {'rows':>5} {'float':>9} " + " ".join(f"{p:>10}" for p in choice.PATHS) + "  choice      vs float",
    ]
    for r in rows:
        cells = []
        for p in choice.PATHS:
            if p in r.times:
                cells.append(f"{r.times[p] * 1e3:>8.3f}ms")
            elif p in r.dropped:
                cells.append(f"{'dropped':>10}")
            else:
                cells.append(f"{'-':>10}")
        lines.append(f"{r.fmt:<13} {r.width:>5} {r.rows:>5} {r.float_s * 1e3:>7.3f}ms " + " ".join(cells)
                     + f"  {r.choice:<11} {r.speedup:.2f}x")
    notes = sorted({f"  {p}: {why}" for r in rows for p, why in r.dropped.items()})
    if notes:
        lines += ["", "dropped paths:"] + notes
    return "\n".join(lines)
