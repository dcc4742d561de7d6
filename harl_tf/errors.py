"""The project's exceptions, and how the binaries report them: one line on stderr.

One error boundary. A fault of the user's input — a flag, a file or folder that is not
there, records, images or masks that do not fit, a run that diverged — raises a
:class:`HarlError` subclass whose message names the flag, file or record, what was
expected and what was found. The binaries (``python -m harl_tf.<binary>``, every tool in
:mod:`harl_tf.cli`) run through :func:`run_binary`, which turns exactly these (and absl's
flag errors and ``app.UsageError``) into ONE line ``<program>: error: <message>`` on
stderr with exit status 2 — no traceback, no help text. Every other exception, a
TensorFlow ``ValueError`` from a shape mismatch included, is a bug and keeps its traceback
(exit status 1).

The tree (each module's own subclasses derive from one of these):

- :class:`HarlError` — the base. It stays a ``ValueError``: every HarlError is a bad value
  the user gave, and callers (and tests) that catch ``ValueError`` around the library keep
  working. The boundary never catches ``ValueError`` itself.
- :class:`ConfigError` — a flag or option value that breaks its rule.
- :class:`MissingPathError` — a file, folder or file pattern the user named does not exist
  (also a ``FileNotFoundError``, so ``except FileNotFoundError`` keeps working).
- :class:`DataError` — records, images or masks whose content does not fit (shapes,
  counts, labels, classes). Its subclasses name the kind: ``schema.SchemaError``,
  ``sources.SourceError``, ``pipeline.CorruptRecordError``, ``subsets.MissingLabelsError``,
  ``subsets.MissingMasksError``, ``background_shift.EmptyMaskError``,
  ``saved_encoder.MaskError``, ``masks.folder.CorruptImageError``.
- :class:`BuildError` (the TFRecord builder), ``beam_build.PipelineError``,
  ``saved_encoder.ExportError``, ``atomic.DestinationExistsError``,
  ``checkpoints.CheckpointWriteError``; the training faults ``hooks.TrainingDiverged``
  (also a ``FloatingPointError``) and ``checkpoints.NonFiniteStateError`` (also a
  ``RuntimeError``).

A library function's check of an argument that only a caller's bug can break (a shape
between two internal arrays, a count the code computed) stays a plain ``ValueError``: it
is not the user's to fix, and its traceback is what finds the bug.

Nothing here imports TensorFlow.
"""
from __future__ import annotations

import sys
from typing import Callable, NoReturn, Sequence

USAGE_EXIT_STATUS = 2


class HarlError(ValueError):
    """Bad input, flag or file: the message names it, says what was expected and found."""


class ConfigError(HarlError):
    """A flag or option value that breaks its rule (range, choices, flags that do not go
    together), found before heavy work; the message names the flag."""


class MissingPathError(HarlError, FileNotFoundError):
    """A file, folder or file pattern the user named does not exist (or matches nothing);
    the message names the flag or path."""


class OutputExistsError(HarlError, FileExistsError):
    """An output path the user named exists and holds something else (not a previous
    output of the same tool), so it is not overwritten; the message names it."""


class DataError(HarlError):
    """Records, images or masks whose content does not fit: shapes, counts, labels or
    classes that differ from what the step needs; the message names the file or record."""


class BuildError(HarlError):
    """The TFRecord build cannot go on (:mod:`harl_tf.data.builder`): names the file(s),
    flag or record, what was expected and what was found."""


def one_line(message: object) -> str:
    """The first non-empty line of ``message`` (absl and TF messages can run on)."""
    for line in str(message).splitlines():
        if line.strip():
            return line.strip()
    return repr(message)


def fail(program: str, message: object) -> NoReturn:
    """Print ``<program>: error: <first line of message>`` to stderr and exit with status 2."""
    print(f"{program}: error: {one_line(message)}", file=sys.stderr)
    sys.exit(USAGE_EXIT_STATUS)


def run_binary(program: str, main: Callable, *, required: Sequence[str] = ()) -> None:
    """``absl.app.run(main)`` with one-line errors for flags, ``app.UsageError`` and
    :class:`HarlError` (exit status 2); any other exception keeps its traceback.

    ``required`` names flags that must be given (``flags.mark_flags_as_required``; marked
    here, when the binary runs, not when its module is imported, so that importing several
    binaries' modules in one process, as the tests do, does not make one's flags required
    for another).
    """
    from absl import app, flags

    flags.mark_flags_as_required(list(required))

    def parse(argv):
        try:
            return flags.FLAGS(argv)
        except flags.Error as err:
            fail(program, err)

    def guarded_main(argv):
        try:
            return main(argv)
        except app.UsageError as err:
            fail(program, err)
        except HarlError as err:
            fail(program, err)

    app.run(guarded_main, flags_parser=parse)
