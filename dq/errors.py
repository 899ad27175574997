"""Exceptions raised by dq. Every message says what was wrong and how to fix it."""


class DQError(ValueError):
    """Bad input to dq: an unknown recipe, an invalid option, an unusable model or file."""


class CalibrationError(RuntimeError):
    """Calibration could not finish (non-finite activations, a failing pipeline call)."""


def one_line(exc: BaseException, limit: int | None = None) -> str:
    """An exception's message on one line (third-party messages: cut at `limit` characters)."""
    text = " ".join(str(exc).split())
    return text if limit is None or len(text) <= limit else text[:limit] + " ..."
