"""Sensitivity measured on the sampling trajectory (`mixed.measure: trajectory`, the default).

Why not the denoiser output on recorded calls: on the embedded pipeline, a plan whose
teacher-forced denoiser error (each recorded call replayed from the float model's inputs) was
35 % below uniform int6's gave images 1.3 dB worse than uniform int6 (BENCHMARKS, "Mixed
precision"). The recorded calls see each step's error once, on the float trajectory. The images
see every step's error carried through the sampler, and with classifier-free guidance the
difference between the conditional and unconditional rows amplified by the guidance scale. An
error that repeats at every step adds up coherently: the cross-attention keys and values and the
caption projection see the same text embedding at every step. Against the feed-forward layers,
the cross-attention keys measured a median 50 times (up to 137 times) more damaging on the final
latents than on the recorded calls, its queries and values 18 and 12 times, the caption
projection 10-14 times, and the timestep embedding 10-30 times less (int4, embedded pipeline).

So here each layer's damage is measured closed loop: the pipeline's final latents, sampled with
the calibration steps and the pipeline's own guidance on `mixed.trajectory_prompts` calibration
prompts, with only that layer in the lowest format (the largest error, so the best signal
against the sampler's own rounding), relative squared error against the float model's latents
of the same seeds. The other formats of the layer are scaled from it by the ratio of the
layer's own output errors on the recorded calls, sum ||Q_f(x) - W x||^2 / sum ||Q_low(x) - W x||^2
(`layer_output_errors`): how far an error travels depends on where the layer sits, which the
closed loop measures once, and how large it is depends on the format, which the layer's own
output measures cheaply. Cost: one sampling run per layer in scope (the layer-output pass is one
pass over the recorded calls), against the in-context method's replay per (layer, format).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .replay import _call

logger = logging.getLogger(__name__)


def layer_output_errors(model: nn.Module, names: Sequence[str], built_all: dict[str, dict[str, nn.Module]],
                        calls: Sequence[tuple[tuple, dict]]) -> dict[str, dict[str, float]]:
    """{layer: {format: sum over the recorded calls of ||built layer(x) - float layer(x)||^2}},
    each layer fed the inputs the float model gives it. The built layers must be routed (their
    router attached to `model`)."""
    errors = {n: {f: 0.0 for f in built_all} for n in names}
    handles = []

    def hook(name):
        def compare(_m, args, out):
            for fmt, built in built_all.items():
                y = built[name](*args)
                errors[name][fmt] += float((y.double() - out.double()).pow(2).sum())
        return compare

    try:
        for name in names:
            handles.append(model.get_submodule(name).register_forward_hook(hook(name)))
        with torch.no_grad():
            for args, kwargs in calls:
                _call(model, args, kwargs)
    finally:
        for h in handles:
            h.remove()
    return errors


def closed_loop_errors(pipe, model: nn.Module, layers: dict[str, nn.Module], prompts: Sequence[Any], steps: int,
                       seed: int, call_kwargs: dict[str, Any]) -> dict[str, float]:
    """{layer: relative squared error of the pipeline's final latents with only that layer
    swapped for `layers[layer]`}, against the float model's, prompt i seeded `seed` + i."""
    from ..engine import swap_modules
    from ..logs import quiet_third_party
    from .sampled import _final_latents

    out = {}
    with quiet_third_party():  # one pipeline call per layer: its harmless per-call warnings dropped
        reference = _final_latents(pipe, prompts, seed, steps, call_kwargs)
        energy = float(reference.double().pow(2).sum())
        for name, layer in layers.items():
            original = model.get_submodule(name)
            swap_modules(model, {name: layer})
            try:
                latents = _final_latents(pipe, prompts, seed, steps, call_kwargs)
            finally:
                swap_modules(model, {name: original})
            out[name] = float((latents.double() - reference.double()).pow(2).sum()) / max(energy, 1e-30)
    return out


def scale_by_format(closed: dict[str, float], outputs: dict[str, dict[str, float]], low: str) -> dict[str, dict[str, float]]:
    """{layer: {format: damage}}: the closed-loop damage of the lowest format, scaled for each
    other format by the layer's own output-error ratio (a layer whose lowest format is exact on
    the recorded calls has no ratio: every format gets the closed-loop value)."""
    table = {}
    for name, damage in closed.items():
        base = outputs[name][low]
        table[name] = {f: (damage * e / base if base > 0 else damage) for f, e in outputs[name].items()}
    return table


def measure_trajectory(pipe, model: nn.Module, sens, names: Sequence[str], built_all: dict[str, dict[str, nn.Module]],
                       router, calls, low: str, prompts: Sequence[Any], steps: int, seed: int,
                       call_kwargs: dict[str, Any]) -> None:
    """Set `measured` of every quantized option of `names` (see the module docstring). The built
    layers are bound to `router` (every format's has the same boundaries) for the measurement and
    rebound to their own after."""
    from ..nn.layers import QuantModule
    from .sensitivity import _Routed

    own = [(m, getattr(m, "_router", None)) for built in built_all.values() for m in built.values()
           if isinstance(m, QuantModule)]
    for layer, _ in own:
        layer.bind_router(router)
    try:
        with _Routed(model, router):
            outputs = layer_output_errors(model, names, built_all, calls.calls)
            closed = closed_loop_errors(pipe, model, {n: built_all[low][n] for n in names}, prompts, steps, seed, call_kwargs)
    finally:
        for layer, r in own:
            layer.bind_router(r)
    for name, damages in scale_by_format(closed, outputs, low).items():
        for option in sens[name].options:
            if option.format in damages:
                option.measured = damages[option.format]
    logger.info("mixed precision: %d layers measured on %d sampled trajectories of %d steps", len(names), len(prompts), steps)
