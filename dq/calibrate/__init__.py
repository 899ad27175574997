"""Timestep-aware calibration: streaming statistics collected by hooks while the
pipeline's own sampler runs."""

from .stats import ActivationStats, StatsStore
from .timesteps import TimestepGroups

__all__ = ["ActivationStats", "StatsStore", "TimestepGroups"]
