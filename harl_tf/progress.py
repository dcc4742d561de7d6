"""Progress bars: a live tqdm bar on a terminal, a periodic plain line in a log file.

On a terminal tqdm redraws one line in place. Written to a file or a pipe the same redraws
become one line per update (a log of every frame), so when ``stream`` is not a terminal
the bar refreshes at most every :data:`LOG_INTERVAL_SECONDS` and each refresh is written
as a whole line::

    for batch in progress(batches, total=n, desc="deep masks", unit="batch"):
        ...

Every progress bar of the project goes through :func:`progress`; Keras' own bar in
``fit`` takes its ``verbose`` from :func:`keras_verbose` (the same rule: a bar on a
terminal, one line per epoch otherwise).
"""
from __future__ import annotations

import sys
from typing import Any, Iterable, Optional, TextIO

from tqdm import tqdm

LOG_INTERVAL_SECONDS = 30.0


class _Lines:
    """A stream wrapper that turns tqdm's carriage-return redraws into whole lines (and
    drops the blank redraws that erase a bar)."""

    def __init__(self, stream: TextIO):
        self._stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").strip()
        if line:
            self._stream.write(line + "\n")

    def flush(self) -> None:
        self._stream.flush()


def is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def keras_verbose(verbose: int, stream: Optional[TextIO] = None) -> int:
    """Keras ``fit`` verbosity: 1 (the live bar) becomes 2 (one line per epoch) when
    ``stream`` (default ``sys.stdout``, where Keras writes) is not a terminal."""
    stream = stream if stream is not None else sys.stdout
    return 2 if verbose == 1 and not is_terminal(stream) else verbose


def progress(iterable: Optional[Iterable] = None, *, total: Optional[float] = None,
             desc: Optional[str] = None, unit: str = "it", disable: bool = False,
             leave: bool = True, stream: Optional[TextIO] = None, **kwargs: Any) -> tqdm:
    """``tqdm(iterable, ...)`` on ``stream`` (default ``sys.stderr``): a bar on a terminal,
    otherwise a line at the start, every :data:`LOG_INTERVAL_SECONDS` and at the end
    (with ``leave``). ``disable=True`` shows nothing; other keywords go to tqdm."""
    stream = stream if stream is not None else sys.stderr
    if is_terminal(stream):
        kwargs.setdefault("dynamic_ncols", True)
    else:
        kwargs.setdefault("mininterval", LOG_INTERVAL_SECONDS)
        kwargs.setdefault("maxinterval", LOG_INTERVAL_SECONDS * 2)
        kwargs.setdefault("ascii", True)
        stream = _Lines(stream)
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable, leave=leave,
                file=stream, **kwargs)
