"""Two CPU processes (gloo) calibrating together: the merge is exact, the result equals one
process's on the same prompts, disagreeing processes stop before calibrating, and a dead or
hung process fails the run quickly with a message naming the ranks.

The processes are started as `accelerate launch` starts them (RANK, WORLD_SIZE, MASTER_*),
running tests/_dist_worker.py; one test goes through `accelerate launch -m dq quantize`.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("_dist_worker.py")


def _worker_module():
    spec = importlib.util.spec_from_file_location("_dist_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(rank: int, port: int, timeout: float) -> dict[str, str]:
    return {
        **os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "DQ_DIST_TIMEOUT": str(timeout),
        "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }


def _launch(out: Path, scenarios: list[str], timeout: float, wait_for: tuple[int, ...] = (0, 1)) -> dict[int, subprocess.Popen]:
    port = _free_port()
    procs = {
        r: subprocess.Popen([sys.executable, str(WORKER), str(out), *scenarios], env=_env(r, port, timeout),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in (0, 1)
    }
    try:
        for r in wait_for:
            procs[r].wait(timeout=240)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return procs


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> Path:
    """One launch of two processes running the merge, quantize, disagree and die scenarios."""
    out = tmp_path_factory.mktemp("dist")
    procs = _launch(out, ["reduce", "quantize", "budget", "eval", "disagree", "die"], timeout=30)
    logs = {r: p.stdout.read() for r, p in procs.items()}
    assert procs[0].returncode == 0, logs[0][-3000:]
    assert procs[1].returncode == 17, logs[1][-3000:]  # rank 1 dies on purpose at the end
    return out


def test_all_reduce_is_the_exact_merge(two_processes):
    """Processes that saw different timesteps, ranges (x8), layers and second moments end up
    with the merge_ of all their stores: counts, absmax, min, max and histograms exactly."""
    from dq.calibrate.stats import StatsStore

    worker = _worker_module()
    expected = worker.random_store(0).merge_(worker.random_store(1))
    assert len(expected.timesteps()) == 3 and "only0" in expected.layers() and "only1" in expected.layers()
    for rank in (0, 1):
        got = StatsStore.from_state_dict(torch.load(two_processes / f"rank{rank}-reduce.pt"))
        assert got.entries.keys() == expected.entries.keys()
        for key, want in expected.entries.items():
            have = got.entries[key]
            assert have.count == want.count and have.hist_exp == want.hist_exp, key
            for name in ("absmax", "min", "max", "hist"):
                assert torch.equal(getattr(have, name), getattr(want, name)), (key, name)
            torch.testing.assert_close(have.sumsq, want.sumsq, rtol=1e-6, atol=0)
        assert got.moments.keys() == expected.moments.keys()
        for layer, want in expected.moments.items():
            assert got.moments[layer].count == want.count
            torch.testing.assert_close(got.moments[layer].sum, want.sum, rtol=1e-6, atol=1e-6)
        # one moment per distinct input: kept shared where every rank agrees, split where not
        assert got.shared == expected.shared == {"share.b": "share.a", "one.b": "one.a"}
        assert got.moment_names() == expected.moment_names()
        for layer in expected.moment_names():
            assert got.moment(layer).count == expected.moment(layer).count, layer
            torch.testing.assert_close(got.moment(layer).sum, expected.moment(layer).sum, rtol=1e-6, atol=1e-6)
    # the histogram ranges really differed between the processes (rank 1's are 8x wider)
    one, two = _worker_module().random_store(0), _worker_module().random_store(1)
    assert one.entries[("blk.a", 500.0, "uncond")].hist_exp < two.entries[("blk.a", 500.0, "uncond")].hist_exp


def test_two_processes_quantize_like_one(two_processes):
    """dq.quantize on 2 processes (5 prompts: 3 + 2) gives the model one process gives on the
    same prompts, up to float summation order; both processes hold the same model."""
    worker = _worker_module()
    single = two_processes / "single"
    single.mkdir()
    worker.scenario_quantize(single, 0)
    want = torch.load(single / "rank0-quantize.pt")
    got = [torch.load(two_processes / f"rank{r}-quantize.pt") for r in (0, 1)]
    assert want["state"].keys() == got[0]["state"].keys()
    for name, tensor in want["state"].items():
        assert torch.equal(got[0]["state"][name], got[1]["state"][name]), name
        torch.testing.assert_close(got[0]["state"][name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    for mine, theirs in zip(got[0]["images"], want["images"]):
        assert (mine.float() - theirs.float()).abs().max() <= 2  # 8-bit pixel levels


def test_two_processes_under_a_moments_budget(two_processes):
    """Under DQ_MOMENTS_BUDGET the two processes run more passes (each merged) and end with the
    model of the unbounded two-process run, bit for bit, both the same."""
    got = [torch.load(two_processes / f"rank{r}-budget.pt") for r in (0, 1)]
    for rank in (0, 1):
        want, have = got[rank]["none"], got[rank]["largest"]
        assert have["calls"] > want["calls"]
        assert [k for k in want["state"] if not torch.equal(want["state"][k], have["state"][k])] == []
    assert all(torch.equal(got[0]["largest"]["state"][k], t) for k, t in got[1]["largest"]["state"].items())


def test_two_processes_split_the_preparation(two_processes):
    """Each process prepares (smoothing search, GPTQ) a share of the layers, disjoint and
    together all of them, and receives the others': both hold the model each would make
    preparing every layer itself, bit for bit."""
    got = [torch.load(two_processes / f"rank{r}-budget.pt") for r in (0, 1)]
    everything = got[0]["unsplit"]["prepared"]
    assert sorted(everything) == sorted(got[1]["unsplit"]["prepared"]) and len(everything) > 4
    for run in ("none", "largest"):
        shares = [set(got[r][run]["prepared"]) for r in (0, 1)]
        assert not shares[0] & shares[1] and shares[0] | shares[1] == set(everything), run
        assert all(shares), run  # balanced by cost, not count (see test_shares_are_balanced_by_cost)
    for rank in (0, 1):
        want, have = got[rank]["unsplit"]["state"], got[rank]["none"]["state"]
        assert [k for k in want if not torch.equal(want[k], have[k])] == []


def test_two_processes_evaluate_like_one(two_processes):
    """dq.eval.evaluate on 2 processes: the same per-image scores in the same order, the same
    means, and the FID of all images (torchmetrics reduced the feature statistics)."""
    want = _worker_module().eval_result()
    for rank in (0, 1):
        got = torch.load(two_processes / f"rank{rank}-eval.pt")
        assert got["num_images"] == want["num_images"] == 5
        assert got["metrics"].keys() == want["metrics"].keys() == {"psnr", "ssim", "clip", "fid"}
        for name, values in want["per_image"].items():
            # the batches differ (3 + 2 images against 4 + 1), which moves a pixel by a level at most
            torch.testing.assert_close(torch.tensor(got["per_image"][name]), torch.tensor(values), rtol=1e-3, atol=1e-3)
        for name, value in want["metrics"].items():
            assert got["metrics"][name] == pytest.approx(value, rel=1e-3, abs=1e-3), name
        assert got["settings"]["processes"] == 2


def test_disagreeing_processes_stop_before_calibrating(two_processes):
    for rank in (0, 1):
        recipe, weights = (two_processes / f"rank{rank}-disagree.txt").read_text().splitlines()
        assert "disagree on the recipe" in recipe and "rank(s) 1" in recipe
        assert "disagree on the model weights" in weights


def test_a_dead_process_fails_the_others(two_processes):
    message = (two_processes / "rank0-die.txt").read_text()
    assert message.startswith("rank 0 of 2: lost the other process(es) (rank 1)"), message


def test_a_hung_process_fails_after_the_timeout(tmp_path):
    began = time.monotonic()
    procs = _launch(tmp_path, ["hang"], timeout=3, wait_for=(0,))
    assert procs[0].returncode == 0, procs[0].stdout.read()[-3000:]
    waited, message = (tmp_path / "rank0-hang.txt").read_text().split("\n", 1)
    assert "lost the other process(es) (rank 1)" in message and "timeout 3 s" in message, message
    assert float(waited) < 60 and time.monotonic() - began < 200


def test_accelerate_launch_dq_quantize(tmp_path):
    """The documented command: `accelerate launch --multi_gpu --num_processes 2 -m dq quantize`
    (CPU: gloo); one process writes, the log says how many took part."""
    pytest.importorskip("accelerate")
    out = tmp_path / "q"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()),
           "-m", "dq", "quantize", "--out", str(out), "--num-prompts", "2", "--steps", "2", "--recipe", "w8a8-rtn"]
    env = {**_env(0, 0, 60), "PYTHONPATH": str(ROOT)}
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name)
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "calibrating on 2 processes" in run.stderr
    assert run.stdout.count("quantized with recipe") == 1  # the main process alone reports and writes
    assert (out / "model_index.json").is_file()


def test_shares_are_balanced_by_cost():
    from dq.model import assign_shares

    costs = {"big": 100.0, "a": 30.0, "b": 30.0, "c": 20.0, "d": 10.0, "e": 10.0}
    shares = assign_shares(costs, 2)
    loads = [sum(costs[n] for n in share) for share in shares]
    assert shares[0] == ["big"] and sorted(shares[1]) == ["a", "b", "c", "d", "e"] and loads == [100.0, 100.0]
    assert assign_shares(costs, 2) == shares  # the same on every process
    assert sorted(n for share in assign_shares(costs, 3) for n in share) == sorted(costs)
