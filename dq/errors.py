"""Exceptions raised by dq. Every message says what was wrong and how to fix it."""


class DQError(ValueError):
    """Bad input to dq: an unknown recipe, an invalid option, an unusable model or file."""


class CalibrationError(RuntimeError):
    """Calibration could not finish (non-finite activations, a failing pipeline call)."""
