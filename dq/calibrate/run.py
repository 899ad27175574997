"""Run a pipeline's own sampler over calibration prompts."""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from ..errors import CalibrationError, DQError
from ..logs import quiet_third_party, show_progress

logger = logging.getLogger(__name__)


def prompt_kwargs(pipe, batch: Sequence[Any]) -> dict[str, Any]:
    """Map a batch of prompts to the pipeline's conditioning argument."""
    params = inspect.signature(pipe.__call__).parameters
    if "prompt" in params:
        return {"prompt": list(batch)}
    if "class_labels" in params:
        labels = []
        for item in batch:
            if isinstance(item, str):
                if item.isdigit():
                    labels.append(int(item))
                elif hasattr(pipe, "get_label_ids"):
                    try:
                        labels.extend(pipe.get_label_ids([item]))
                    except ValueError as exc:
                        raise DQError(f"class-conditional pipeline: {exc}") from exc
                else:
                    raise DQError(f"class-conditional pipeline needs class labels, got {item!r}")
            else:
                labels.append(int(item))
        return {"class_labels": labels}
    raise DQError(f"{type(pipe).__name__} takes neither `prompt` nor `class_labels`; calibrate it by hand")


def _fast_output(pipe) -> dict[str, Any]:
    """Skip the VAE decode where the pipeline allows it: calibration needs the denoiser only."""
    params = inspect.signature(pipe.__call__).parameters
    if "output_type" not in params:
        return {}
    return {"output_type": "latent" if "prompt" in params else "pt"}


def prompt_generators(device, seed: int, indices: Sequence[int]) -> list[torch.Generator]:
    """One generator per prompt, seeded ``seed + i`` by the prompt's index ``i`` in the whole
    prompt list: the batch size and the split across processes never change a prompt's noise."""
    return [torch.Generator(device=device).manual_seed(seed + i) for i in indices]


def run_pipeline(
    pipe,
    prompts: Sequence[Any],
    *,
    num_inference_steps: int,
    batch_size: int,
    seed: int,
    call_kwargs: dict[str, Any] | None = None,
    desc: str = "calibrating",
    on_batch: Callable[[int], None] | None = None,
) -> None:
    """Call `pipe` over `prompts` in batches, prompt ``i`` seeded ``seed + i``, with a progress
    bar over the batches (hidden under ``dq ... --quiet``) and one summary log line at the end.

    Launched as several processes (a `torch.distributed` group, see `dq.calibrate.distributed`),
    each process runs its contiguous share of the prompts, with the same per-prompt seeds."""
    from . import distributed

    if not prompts:
        raise DQError("the calibration prompt list is empty; pass calib_prompts=[...] or a prompt file")
    indices = distributed.shard(len(prompts))
    world = distributed.world_size()
    if world > 1 and distributed.is_main():
        logger.info("%s on %d processes (%d prompts each or fewer)", desc, world, len(indices))
    kwargs = {**_fast_output(pipe), **(call_kwargs or {})}
    old_bar = dict(getattr(pipe, "_progress_bar_config", {}) or {})
    pipe.set_progress_bar_config(disable=True)
    device = getattr(pipe, "_execution_device", None) or torch.device("cpu")
    starts = range(indices.start, indices.stop, batch_size)
    began = time.perf_counter()
    try:
        with torch.inference_mode(), quiet_third_party():
            for start in tqdm(starts, desc=desc, unit="batch", disable=not show_progress()):
                batch_indices = range(start, min(start + batch_size, indices.stop))
                batch = [prompts[i] for i in batch_indices]
                if on_batch is not None:
                    on_batch(len(batch))
                generator = prompt_generators(device, seed, batch_indices)
                pipe(**prompt_kwargs(pipe, batch), num_inference_steps=num_inference_steps, generator=generator, **kwargs)
    except CalibrationError:
        raise
    except DQError:
        raise
    except Exception as exc:
        raise CalibrationError(f"the pipeline failed during calibration: {type(exc).__name__}: {exc}") from exc
    finally:
        pipe.set_progress_bar_config(**old_bar)
    logger.info(
        "%s: %d prompts in %d batches of up to %d, %d steps each, %.1f s%s",
        desc, len(indices), len(starts), batch_size, num_inference_steps, time.perf_counter() - began,
        f" (rank {distributed.rank()} of {world})" if world > 1 else "",
    )
