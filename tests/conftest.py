import copy
import os
import tempfile

import pytest
import torch

torch.set_num_threads(1)  # tiny models gain nothing from threads; CI has 2 cores
# Kernel choices are measured into a cache (dq.kernels.choice): keep the tests' out of the
# user's cache folder, and shared by every process the tests start (CLI subprocesses).
os.environ.setdefault("DQ_CACHE_DIR", tempfile.mkdtemp(prefix="dq-test-cache-"))


class DenoiserRecorder:
    """Records the (args, kwargs) of every denoiser call during a pipeline run."""

    def __init__(self, model):
        self.model = model
        self.calls = []

    def __enter__(self):
        def hook(_m, args, kwargs):
            self.calls.append((copy.deepcopy(args), copy.deepcopy(kwargs)))

        self.handle = self.model.register_forward_pre_hook(hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()

    def replay(self):
        outs = []
        with torch.no_grad():
            for args, kwargs in self.calls:
                out = self.model(*args, **{**kwargs, "return_dict": False})
                outs.append(out[0] if isinstance(out, tuple) else out)
        return outs


def sqnr_db(ref: torch.Tensor, test: torch.Tensor) -> float:
    noise = (ref.float() - test.float()).pow(2).mean()
    return float(10 * torch.log10(ref.float().pow(2).mean() / noise.clamp(min=1e-30)))


@pytest.fixture
def recorder():
    return DenoiserRecorder


def favour_path(monkeypatch, path: str) -> dict:
    """Make the kernel chooser (`dq.kernels.choice`) time `path` fastest; its correctness check
    still runs, its screen drops nothing as slow (on a loaded machine a first call can look 100x
    slow). Returns the candidates the race saw."""
    from dq.kernels import choice

    seen: dict = {}

    def fake_race(fns, sync, budget=choice.TIME_BUDGET_S, clock=None):
        seen.update(fns)
        return {p: (1e-4 if p == path else 1e-3) for p in fns}

    monkeypatch.setattr(choice, "_race", fake_race)
    monkeypatch.setattr(choice, "SCREEN_FACTOR", float("inf"))
    return seen


def favour_races(monkeypatch, path: str) -> list:
    """Make every race of the kernel chooser time `path` fastest; returns the set of paths each
    race timed, one per race (a measured choice per shape class: the attention core, the GELU)."""
    from dq.kernels import choice

    seen: list = []

    def fake_race(fns, sync, budget=choice.TIME_BUDGET_S, clock=None):
        seen.append(set(fns))
        return {p: (1e-4 if p == path else 1e-3) for p in fns}

    monkeypatch.setattr(choice, "_race", fake_race)
    return seen
