"""What dq prints: the CLI's log levels, and silencing of known-harmless third-party output.

Nothing here changes logging at import. `quiet_third_party()` is a context manager that dq
puts around its own calls into diffusers/transformers/torch (opening, calibrating, saving,
generating): while it is active, the messages listed in `NOISE` are dropped, and nothing
else. `cli_output(level)` is what the `dq` command line runs under: dq's log level and a
handler on the ``dq`` logger, third-party progress bars off unless verbose, restored on exit.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import warnings
from collections.abc import Iterator
from contextvars import ContextVar

QUIET = "quiet"
DEFAULT = "default"
VERBOSE = "verbose"
LEVELS = {QUIET: logging.WARNING, DEFAULT: logging.INFO, VERBOSE: logging.DEBUG}

# (logger name or prefix, message regex): third-party messages that say nothing a dq user can
# act on. Each names where it comes from.
NOISE: tuple[tuple[str, str], ...] = (
    # PixArt/DeepFloyd-style pipelines default to clean_caption=True and, without
    # beautifulsoup4/ftfy installed, warn on every call (`_text_preprocessing`); the caption
    # cleaning is irrelevant to dq's prompts.
    ("diffusers.pipelines", r"Beautiful Soup|beautifulsoup4|ftfy|Setting `clean_caption`"),
    # dq.io.save registers the denoiser as None while diffusers saves the other components,
    # then writes the quantized denoiser itself.
    ("diffusers.pipelines.pipeline_utils", r"=None of type <class 'NoneType'> cannot be saved"),
    # diffusers' torchao backend probes torchao's tensor classes when it is imported.
    ("diffusers.quantizers.torchao", r"Unable to import `torchao` Tensor objects"),
    # importing torchao registers enums with torch's pytree (deprecated, harmless).
    ("torch.utils._pytree", r"is an Enum subclass and is now natively supported"),
)
# (category, message regex) of Python warnings dropped the same way.
NOISE_WARNINGS: tuple[tuple[type[Warning], str], ...] = ()

# Set by `cli_output`: verbose shows third-party output unfiltered; quiet hides dq's progress bars.
_show_noise: ContextVar[bool] = ContextVar("dq_show_noise", default=False)
_show_progress: ContextVar[bool] = ContextVar("dq_show_progress", default=True)


def show_progress() -> bool:
    """Whether dq's own progress bars should be drawn (off under ``dq ... --quiet``)."""
    return _show_progress.get()


class _NoiseFilter(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self.rules = [(prefix, re.compile(rx)) for prefix, rx in NOISE]

    def filter(self, record: logging.LogRecord) -> bool:
        for prefix, rx in self.rules:
            if record.name == prefix or record.name.startswith(prefix + "."):
                if rx.search(record.getMessage()):
                    return False
        return True


def _handlers_for(name: str) -> list[logging.Handler]:
    """The handlers a record of logger `name` passes through (up the hierarchy until a logger
    that does not propagate), plus the last-resort handler."""
    found: list[logging.Handler] = []
    logger: logging.Logger | None = logging.getLogger(name)
    while logger is not None:
        found.extend(logger.handlers)
        if not logger.propagate:
            break
        logger = logger.parent  # type: ignore[assignment]
    if logging.lastResort is not None:
        found.append(logging.lastResort)
    return found


@contextlib.contextmanager
def quiet_third_party() -> Iterator[None]:
    """Drop the known-harmless third-party messages in `NOISE` / `NOISE_WARNINGS` while the
    block runs (a no-op under ``--verbose``). Only those messages: everything else, including
    other warnings of the same libraries, still shows."""
    if _show_noise.get():
        yield
        return
    with contextlib.suppress(ImportError):  # make sure diffusers' own handler exists
        import diffusers.utils.logging  # noqa: F401
    noise = _NoiseFilter()
    handlers = {id(h): h for prefix, _ in NOISE for h in _handlers_for(prefix)}
    for handler in handlers.values():
        handler.addFilter(noise)
    try:
        with warnings.catch_warnings():
            for category, rx in NOISE_WARNINGS:
                warnings.filterwarnings("ignore", message=rx, category=category)
            yield
    finally:
        for handler in handlers.values():
            handler.removeFilter(noise)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time (pytest and callers may swap it)."""

    def __init__(self) -> None:
        super().__init__()

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def _third_party_progress(enabled: bool) -> list[tuple[object, bool]]:
    """Switch diffusers'/transformers'/huggingface_hub's global progress bars; return what to restore."""
    restore = []
    with contextlib.suppress(ImportError):
        from diffusers.utils import logging as dl

        restore.append((dl, dl.is_progress_bar_enabled()))
    with contextlib.suppress(ImportError):
        from transformers.utils import logging as tl

        restore.append((tl, tl.is_progress_bar_enabled()))
    for module, _ in restore:
        module.enable_progress_bar() if enabled else module.disable_progress_bar()
    with contextlib.suppress(ImportError):
        import huggingface_hub.utils as hh

        restore.append((hh, not hh.are_progress_bars_disabled()))
        hh.enable_progress_bars() if enabled else hh.disable_progress_bars()
    return restore


def _restore_progress(restore: list[tuple[object, bool]]) -> None:
    for module, was_enabled in restore:
        if hasattr(module, "enable_progress_bars"):
            module.enable_progress_bars() if was_enabled else module.disable_progress_bars()
        else:
            module.enable_progress_bar() if was_enabled else module.disable_progress_bar()


@contextlib.contextmanager
def cli_output(verbosity: str = DEFAULT) -> Iterator[None]:
    """Run the block with the command line's output settings, restored afterwards.

    quiet: dq logs warnings and errors only, no progress bars (dq's or third-party ones), the
    known noise dropped; default: dq's info lines and its calibration progress bar, no
    third-party progress bars, the known noise dropped; verbose: dq's debug lines and all
    third-party output (their info logs and progress bars, nothing filtered).
    """
    if verbosity not in LEVELS:
        raise ValueError(f"verbosity must be one of {list(LEVELS)}, got {verbosity!r}")
    dq_logger = logging.getLogger("dq")
    old = dq_logger.level, dq_logger.propagate
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    dq_logger.addHandler(handler)
    dq_logger.setLevel(LEVELS[verbosity])
    dq_logger.propagate = False  # one line per message, whatever the root logger has
    third_party = [logging.getLogger(n) for n in ("diffusers", "transformers")]
    old_third = [lg.level for lg in third_party]
    if verbosity == VERBOSE:
        for lg in third_party:
            lg.setLevel(logging.INFO)
    restore = _third_party_progress(verbosity == VERBOSE)
    tokens = (_show_noise.set(verbosity == VERBOSE), _show_progress.set(verbosity != QUIET))
    try:
        with quiet_third_party():
            yield
    finally:
        _show_noise.reset(tokens[0])
        _show_progress.reset(tokens[1])
        _restore_progress(restore)
        for lg, level in zip(third_party, old_third):
            lg.setLevel(level)
        dq_logger.removeHandler(handler)
        dq_logger.setLevel(old[0])
        dq_logger.propagate = old[1]
