"""The project's exception base, and how the binaries report errors: one line on stderr.

Every error the library raises for bad input, a bad flag or a bad file derives from
:class:`HarlError` (itself a ``ValueError``, so older ``except ValueError`` still works):
``schema.SchemaError``, ``sources.SourceError``, ``builder.BuildError``,
``export_lib.ExportError``.

Binaries (``harl_tf.export``, ``harl_tf.finetune``, ``tools.build_tfrecords``) run through
:func:`run_binary`: a flag that does not parse (unknown, wrong type, missing flagfile), an
``app.UsageError`` or a :class:`HarlError` ends the process with ONE line
``<program>: error: <message>`` on stderr and exit status 2 — no traceback, no help text.
``harl_tf.pretrain`` does the same with its own parser. Nothing here imports TensorFlow.
"""
from __future__ import annotations

import sys
from typing import Callable, NoReturn

USAGE_EXIT_STATUS = 2


class HarlError(ValueError):
    """Bad input, flag or file: the message names it, says what was expected and found."""


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


def run_binary(program: str, main: Callable, *, errors=(HarlError,)) -> None:
    """``absl.app.run(main)`` with one-line errors for flags, usage and ``errors``."""
    from absl import app, flags

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
        except errors as err:
            fail(program, err)

    app.run(guarded_main, flags_parser=parse)
