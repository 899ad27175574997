"""A solved plan: per-layer report, data for an app, and the PNG plot; see `dq.mixed`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..arch import quantizable_layers
from ..errors import DQError
from .budget import FLOAT, Budget, _size, layer_bytes, weight_count
from .sensitivity import Sensitivity


# -- the report -------------------------------------------------------------------------------
@dataclass
class LayerReport:
    """One layer of a mixed-precision plan, for printing, plotting or an app."""

    name: str
    format: str
    weights: int
    bytes: int
    bits: float  # stored bits per weight of the chosen format (scales included)
    damage: float | None  # relative denoiser-output error of the chosen option (see Sensitivity.method)
    sqnr_db: float | None  # -10 log10(damage)
    damages: dict[str, float | None]  # per candidate format

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class MixedPlan:
    """A solved allocation with its sensitivity (kept on the model as `_dq_mixed`)."""

    allocation: dict[str, str]
    sensitivity: Sensitivity
    budget: Budget
    # with `mixed.select: sampled`: every candidate's sampled score and the one chosen
    # (`dq.mixed.sampled.select_sampled`)
    selection: dict[str, Any] | None = None

    def rows(self) -> list[LayerReport]:
        out = []
        for s in self.sensitivity.layers:
            fmt = self.allocation[s.name]
            option = next(o for o in s.options if o.format == fmt)
            damage = option.damage
            best = {o.format: (None if o.damage is None or math.isinf(o.damage) else o.damage) for o in s.options}
            out.append(LayerReport(
                s.name, fmt, s.weights, option.bytes, 8 * option.bytes / s.weights, damage,
                -10 * math.log10(damage) if damage else None, best,
            ))
        return out

    def average_bits(self) -> float:
        rows = self.rows()
        weights = sum(r.weights for r in rows) + self.sensitivity.fixed_weights
        return 8 * (sum(r.bytes for r in rows) + self.sensitivity.fixed_bytes) / weights

    def total_bytes(self) -> int:
        s = self.sensitivity
        return sum(r.bytes for r in self.rows()) + s.fixed_bytes + s.kept_bytes + s.other_bytes

    def predicted_damage(self) -> float:
        """Single-layer damages: their sum. In context: the base's damage less each layer's
        reduction from it (both assume the layers' effects add up)."""
        base = self.sensitivity.baseline
        if base is None:
            return sum(r.damage or 0.0 for r in self.rows())
        return base - sum(base - (r.damage or 0.0) for r in self.rows())

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for r in self.rows():
            counts[r.format] = counts.get(r.format, 0) + 1
        what = f"{self.budget.value:g} bits" if self.budget.kind == "bits" else _size(self.budget.value)
        rho = self.sensitivity.rank_correlation
        check = f", estimate vs measured Spearman {rho:.2f}" if rho is not None else ""
        measured = self.sensitivity.mode == "measure"
        how = f" ({self.sensitivity.method})" if measured else ""
        of = " of the final latents" if measured and self.sensitivity.method == "trajectory" else ""
        return (
            f"mixed precision under {what}: average {self.average_bits():.3f} weight bits, denoiser "
            f"{_size(self.total_bytes())}; layers {', '.join(f'{k} {v}' for k, v in sorted(counts.items()))}; "
            f"sensitivity {self.sensitivity.mode}d{how}{check}; predicted relative error{of} {self.predicted_damage():.3g}"
            + (f"; chosen among {len(self.selection['candidates'])} candidate plans sampled on "
               f"{self.selection['prompts']} prompts ({self.selection['chosen']})" if self.selection else "")
        )

    def table(self) -> str:
        """A readable per-layer report."""
        formats = [o.format for o in self.sensitivity.layers[0].options]
        # in context, float is measured like any option (the whole model's error with the layer in float)
        shown = [f for f in formats if f != FLOAT or self.sensitivity.baseline is not None]
        head = f"{'layer':48s} {'format':>6s} {'weights':>8s} {'bits':>6s} " + " ".join(f"{'dB ' + f:>9s}" for f in shown)
        lines = [self.summary(), head]
        for r in self.rows():
            dbs = " ".join(
                f"{'-':>9s}" if v is None else f"{(-10 * math.log10(v) if v else float('inf')):9.1f}"
                for f, v in r.damages.items() if f in shown
            )
            lines.append(f"{r.name:48s} {r.format:>6s} {r.weights:8d} {r.bits:6.2f} {dbs}")
        return "\n".join(lines)


def layer_report(model_or_pipe) -> list[dict[str, Any]]:
    """Per layer of a quantized denoiser (or pipeline): name, format, weights, stored bytes, bits per
    weight, and, when its mixed-precision plan was solved in this process, the damage per
    candidate format. For an app to draw; works on any dq model (formats from the layers)."""
    from ..engine import find_denoiser
    from ..nn.layers import QuantModule

    model = model_or_pipe if isinstance(model_or_pipe, nn.Module) else find_denoiser(model_or_pipe)[1]
    plan: MixedPlan | None = getattr(model, "_dq_mixed", None)
    known = {r.name: r for r in plan.rows()} if plan is not None else {}
    float_layers = dict(quantizable_layers(model))
    # the plan's own format names where it has one (a recipe whose 4-bit spec is in groups of 32
    # calls it "int4"; `format_of` alone would say "int4g32")
    allocation = getattr(getattr(model, "_dq_recipe", None), "allocation", None) or {}
    rows = []
    for name, module in model.named_modules():
        if not isinstance(module, QuantModule) and name not in float_layers:
            continue
        fmt = format_of(module)
        if allocation.get(name) == "int4" and fmt == "int4g32":
            fmt = "int4"
        nbytes, weights = layer_bytes(module), weight_count(module)
        r = known.get(name)
        rows.append({
            "name": name, "format": fmt, "weights": weights, "bytes": nbytes, "bits": 8 * nbytes / weights,
            "damage": r.damage if r else None, "sqnr_db": r.sqnr_db if r else None, "damages": r.damages if r else None,
        })
    return rows


def format_of(module: nn.Module) -> str:
    from ..nn.layers import QuantModule

    if not isinstance(module, QuantModule) or module.weight_spec is None:
        return FLOAT
    w = module.weight_spec
    if w.kind == "int" and w.bits == 4 and w.granularity == "group" and w.group_size == 32:
        return "int4g32"
    return f"int{w.bits}" if w.kind == "int" else ("fp8" if w.kind.startswith("fp8") else w.kind)


def plot_allocation(rows: Sequence[dict[str, Any] | LayerReport], path: str | Path) -> Path:
    """PNG: stored bits per layer beside the layer's sensitivity (denoiser SQNR, dB, of each
    candidate format with only that layer quantized)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise DQError("plotting needs matplotlib: pip install 'dq[mixed]'") from exc
    rows = [r.to_dict() if isinstance(r, LayerReport) else r for r in rows]
    names = [r["name"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, max(4, 0.18 * len(rows))), sharey=True)
    y = list(range(len(rows)))
    colors = {"int4": "tab:red", "int4g32": "tab:pink", "int5": "tab:orange", "int6": "tab:green", "int8": "tab:blue", "fp8": "tab:purple", FLOAT: "tab:gray"}
    ax1.barh(y, [r["bits"] for r in rows], color=[colors.get(r["format"], "k") for r in rows])
    ax1.set_yticks(y, names, fontsize=6)
    ax1.invert_yaxis()
    ax1.set_xlabel("stored bits per weight (scales included)")
    ax1.set_title("allocation")
    for fmt in sorted({f for r in rows if r.get("damages") for f in r["damages"] if f != FLOAT}):
        values = [(-10 * math.log10(r["damages"][fmt]) if r.get("damages") and r["damages"].get(fmt) else float("nan")) for r in rows]
        ax2.plot(values, y, "o", ms=3, label=fmt, color=colors.get(fmt))
    ax2.set_xlabel("denoiser SQNR, dB, this layer at this format (in context: the rest at the centre plan)")
    ax2.set_title("sensitivity")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
