"""One process of the two-process (gloo, CPU) tests in test_distributed.py.

Started with RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT set, as `accelerate launch` does;
joins through `dq.calibrate.distributed.setup` (accelerate's PartialState) and writes what
it computed to OUT/rank{r}-{scenario}.pt for the test to check.

    python tests/_dist_worker.py OUT SCENARIO [SCENARIO ...]
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

import torch

torch.set_num_threads(1)


def random_store(rank: int, seed: int = 0):
    """A store as rank `rank` would collect it: different timesteps, ranges (x 8**rank)
    and layers per rank, histograms and a second moment on one layer only on rank 0."""
    from dq.calibrate.stats import ActivationStats, SecondMoment, StatsStore

    gen = torch.Generator().manual_seed(seed + rank)
    store = StatsStore()
    steps = [(999.0, "cond"), (500.0, "uncond")] if rank == 0 else [(500.0, "uncond"), (1.0, "cond")]
    layers = ["blk.a", "blk.b"] + (["only0"] if rank == 0 else ["only1"])
    for layer in layers:
        for t, b in steps:
            for _ in range(2):
                rows = torch.randn(37, 8, generator=gen) * (8.0**rank) * (1 + t / 1000)
                store.add((layer, t, b), ActivationStats.from_rows(rows, 64))
        if rank == 0 or layer != "only1":
            store.add_moment(layer, SecondMoment.from_rows(torch.randn(50, 8, generator=gen)))
    # moments shared by layers that read one input: on both ranks (stays shared), on rank 0
    # only (rank 1 saw two inputs: must be split before the sum), on rank 1 only (rank 0 has
    # neither layer: stays shared)
    store.add_moment("share.a", SecondMoment.from_rows(torch.randn(30, 8, generator=gen)))
    store.shared["share.b"] = "share.a"
    store.add_moment("split.a", SecondMoment.from_rows(torch.randn(30, 8, generator=gen)))
    if rank == 0:
        store.shared["split.b"] = "split.a"
    else:
        store.add_moment("split.b", SecondMoment.from_rows(torch.randn(30, 8, generator=gen) * 3))
        store.add_moment("one.a", SecondMoment.from_rows(torch.randn(30, 8, generator=gen)))
        store.shared["one.b"] = "one.a"
    return store


def scenario_reduce(out: Path, rank: int) -> None:
    from dq.calibrate import distributed

    # second moments of 8 x 8 floats (256 bytes): at most two per flat buffer, so the merge
    # runs several packed collectives and some single ones (the scenario "quantize" one buffer)
    distributed.MOMENT_BUFFER_BYTES = 600
    store = random_store(rank).all_reduce_()
    torch.save(store.state_dict(), out / f"rank{rank}-reduce.pt")


def scenario_quantize(out: Path, rank: int) -> None:
    import dq
    from dq.engine import find_denoiser
    from dq.eval.evaluate import generate_images
    from dq.testing.tiny import default_call_kwargs, prompts_for, tiny_pipeline

    pipe = tiny_pipeline("pixart", seed=0)
    kwargs = {k: v for k, v in default_call_kwargs("pixart").items() if k not in ("num_inference_steps", "output_type")}
    prompts = prompts_for("pixart", 5)
    recipe = dq.Recipe.from_any("w8a8")
    dq.quantize(pipe, recipe, calib_prompts=prompts, num_inference_steps=3, **kwargs)
    _, model = find_denoiser(pipe)
    state = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
    images = generate_images(pipe, prompts[:2], num_inference_steps=3, progress=False, **kwargs)
    torch.save({"state": state, "images": [torch.tensor(list(im.getdata())) for im in images]},
               out / f"rank{rank}-quantize.pt")


def scenario_budget(out: Path, rank: int) -> None:
    """w4a4 (smoothing search + GPTQ) on both ranks: the layers' preparation split between them
    or not, without a moments budget or under the smallest one (one layer's moment per pass)."""
    import dq
    import dq.model
    from dq.testing.tiny import default_call_kwargs, prompts_for, tiny_pipeline

    kwargs = {k: v for k, v in default_call_kwargs("pixart").items() if k not in ("num_inference_steps", "output_type")}
    result = {}
    prepare_layer = dq.model.prepare_layer
    prepared: list[str] = []

    def counting(work, store, groups):
        if dq.model.prepare_cost(work) > 0:
            prepared.append(work.name)
        return prepare_layer(work, store, groups)

    dq.model.prepare_layer = counting
    # without a budget (each process prepares its share of the layers), under the smallest one,
    # and with every process preparing every layer (DQ_SPLIT_PREPARE=0)
    for run, budget, split in (("none", "", "1"), ("largest", "largest", "1"), ("unsplit", "", "0")):
        os.environ["DQ_MOMENTS_BUDGET"], os.environ["DQ_SPLIT_PREPARE"] = budget, split
        pipe = tiny_pipeline("pixart", seed=0)
        calls = []
        prepared.clear()
        pipe.transformer.register_forward_pre_hook(lambda *_, calls=calls: calls.append(1))
        dq.quantize(pipe, "w4a4", calib_prompts=prompts_for("pixart", 3), num_inference_steps=2, **kwargs)
        result[run] = {"state": dict(pipe.transformer.state_dict()), "calls": len(calls), "prepared": list(prepared)}
    dq.model.prepare_layer = prepare_layer
    os.environ.pop("DQ_MOMENTS_BUDGET")
    os.environ.pop("DQ_SPLIT_PREPARE")
    torch.save(result, out / f"rank{rank}-budget.pt")


def eval_result() -> dict:
    """dq.eval.evaluate of a tiny PixArt against another (as its reference): per-image PSNR,
    SSIM, CLIP score and a CLIP-feature FID (torchmetrics states)."""
    from dq.eval.evaluate import evaluate
    from dq.testing.tiny import default_call_kwargs, prompts_for, tiny_pipeline

    kwargs = {k: v for k, v in default_call_kwargs("pixart").items() if k not in ("num_inference_steps", "output_type")}
    result = evaluate(tiny_pipeline("pixart", seed=0), prompts_for("pixart", 5), reference=tiny_pipeline("pixart", seed=1),
                      metrics="psnr,ssim,clip,fid", fid_features="clip", num_inference_steps=2, call_kwargs=kwargs)
    return result.to_dict(per_image=True)


def scenario_eval(out: Path, rank: int) -> None:
    torch.save(eval_result(), out / f"rank{rank}-eval.pt")


def scenario_disagree(out: Path, rank: int) -> None:
    """Rank 1 uses another recipe, then (second try) another model's weights."""
    import dq
    from dq.errors import DQError
    from dq.testing.tiny import default_call_kwargs, prompts_for, tiny_pipeline

    kwargs = {k: v for k, v in default_call_kwargs("pixart").items() if k not in ("num_inference_steps", "output_type")}
    messages = []
    for recipe, seed in ((("w8a8" if rank == 0 else "w4a8"), 0), ("w8a8", rank)):
        pipe = tiny_pipeline("pixart", seed=seed)
        try:
            dq.quantize(pipe, recipe, calib_prompts=prompts_for("pixart", 2), num_inference_steps=2, **kwargs)
            messages.append("no error")
        except DQError as exc:
            messages.append(str(exc))
    (out / f"rank{rank}-disagree.txt").write_text("\n".join(messages))


def scenario_die(out: Path, rank: int) -> None:
    """Rank 1 dies before the merge; rank 0 must fail with a DQError, not hang."""
    from dq.errors import DQError

    if rank == 1:
        os._exit(17)
    try:
        random_store(rank).all_reduce_()
        (out / f"rank{rank}-die.txt").write_text("no error")
    except DQError as exc:
        (out / f"rank{rank}-die.txt").write_text(str(exc))


def scenario_hang(out: Path, rank: int) -> None:
    """Rank 1 hangs (alive, silent); rank 0 must give up after the process-group timeout."""
    import time

    from dq.errors import DQError

    if rank == 1:
        time.sleep(600)  # the test kills it
    began = time.monotonic()
    try:
        random_store(rank).all_reduce_()
        message = "no error"
    except DQError as exc:
        message = str(exc)
    (out / f"rank{rank}-hang.txt").write_text(f"{time.monotonic() - began:.1f}\n{message}")


SCENARIOS = {"eval": scenario_eval, "hang": scenario_hang, "reduce": scenario_reduce, "quantize": scenario_quantize, "budget": scenario_budget, "disagree": scenario_disagree, "die": scenario_die}


def main() -> int:
    out, names = Path(sys.argv[1]), sys.argv[2:]
    from dq.calibrate import distributed

    rank, world = distributed.setup(cpu=True)
    assert world == int(os.environ["WORLD_SIZE"]), (world, os.environ["WORLD_SIZE"])
    for name in names:
        try:
            SCENARIOS[name](out, rank)
        except Exception:
            (out / f"rank{rank}-{name}.err").write_text(traceback.format_exc())
            raise
    return 0


if __name__ == "__main__":
    from dq.calibrate import distributed

    sys.exit(distributed.leave(main()))  # after a failed collective: no teardown that may abort
