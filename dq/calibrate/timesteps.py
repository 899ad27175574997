"""Groups of denoising steps, defined by timestep *values* (never by call count).

Calibrating with N steps and sampling with M steps, or with another scheduler,
works because inference looks up the group whose value interval holds the current
timestep. Groups split the calibrated timesteps into contiguous runs of about equal
size; boundaries are midpoints between neighbouring runs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class TimestepGroups:
    def __init__(self, boundaries: Sequence[float], members: Sequence[Sequence[float]]):
        self.boundaries = list(boundaries)  # ascending, len = groups - 1
        self.members = [list(m) for m in members]

    @classmethod
    def from_timesteps(cls, timesteps: Sequence[float], groups: int) -> TimestepGroups:
        values = sorted(set(float(t) for t in timesteps))
        if not values:
            return cls([], [[]])
        groups = max(1, min(groups, len(values)))
        chunks = [c.tolist() for c in torch.tensor(values, dtype=torch.float64).tensor_split(groups)]
        boundaries = [(a[-1] + b[0]) / 2 for a, b in zip(chunks[:-1], chunks[1:])]
        return cls(boundaries, chunks)

    def __len__(self) -> int:
        return len(self.members)

    def index(self, t: float) -> int:
        return sum(t > b for b in self.boundaries)

    def tensor(self) -> torch.Tensor:
        return torch.tensor(self.boundaries, dtype=torch.float32)
