"""The tiny test pipelines build offline, fast, and reproducibly from a seed."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

from dq.errors import DQError
from dq.testing import KINDS, default_call_kwargs, prompt_kwargs, prompts_for, tiny_pipeline

BATCH = 2


@pytest.fixture(autouse=True, scope="module")
def _single_thread() -> Iterator[None]:
    # Tiny tensors gain nothing from intra-op threads, and on a busy CPU OpenMP's spinning
    # threads make every op tens of times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _generate(pipe, kind: str, seed: int = 0) -> np.ndarray:
    generator = torch.Generator().manual_seed(seed)
    return pipe(
        **prompt_kwargs(kind, BATCH), **default_call_kwargs(kind), generator=generator
    ).images


def _state(pipe) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{key}": tensor
        for name, component in pipe.components.items()
        if isinstance(component, torch.nn.Module)
        for key, tensor in component.state_dict().items()
    }


@pytest.mark.parametrize("kind", KINDS)
def test_generation_is_deterministic(kind: str) -> None:
    pipe = tiny_pipeline(kind, seed=0)
    assert all(
        not module.training
        for module in pipe.components.values()
        if isinstance(module, torch.nn.Module)
    )
    first, second = _generate(pipe, kind), _generate(pipe, kind)
    assert first.shape == (BATCH, 32, 32, 3)
    assert np.isfinite(first).all()
    np.testing.assert_array_equal(first, second)
    assert not np.array_equal(first, _generate(pipe, kind, seed=1))


@pytest.mark.parametrize("kind", KINDS)
def test_build_is_deterministic(kind: str) -> None:
    first, second = _state(tiny_pipeline(kind, seed=3)), _state(tiny_pipeline(kind, seed=3))
    assert first.keys() == second.keys()
    for key, tensor in first.items():
        assert torch.equal(tensor, second[key]), key
    other = _state(tiny_pipeline(kind, seed=4))
    assert any(not torch.equal(tensor, other[key]) for key, tensor in first.items())


def test_builds_in_requested_dtype() -> None:
    pipe = tiny_pipeline("dit", dtype=torch.bfloat16)
    assert pipe.transformer.dtype == torch.bfloat16
    assert np.isfinite(_generate(pipe, "dit")).all()


def test_conditioning_inputs() -> None:
    assert prompt_kwargs("dit", 3) == {"class_labels": prompts_for("dit", 3)}
    assert all(isinstance(label, int) and 0 <= label < 1000 for label in prompts_for("dit", 20))
    assert prompt_kwargs("sd15", 3) == {"prompt": prompts_for("sd15", 3)}
    assert all(isinstance(prompt, str) for prompt in prompts_for("flux", 20))


def test_unknown_kind() -> None:
    with pytest.raises(DQError, match="unknown tiny pipeline kind"):
        tiny_pipeline("sd2")
