"""Exceptions of the evaluation suite; each message says what was wrong and how to fix it."""

from __future__ import annotations

from dq.errors import DQError


class EvalError(DQError):
    """Bad input to an evaluation: an unknown metric, an empty prompt list, mismatched images."""


class MissingWeightsError(EvalError):
    """A metric's network is unavailable: its weights are neither cached, downloadable, nor given
    as a local file (or the package that loads them is not installed)."""
