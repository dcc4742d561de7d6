"""The project's exception base, and how the binaries report errors: one line on stderr.

Every error the library raises for bad input, a bad flag or a bad file derives from
:class:`HarlError` (itself a ``ValueError``, so older ``except ValueError`` still works):
``schema.SchemaError``, ``sources.SourceError``, :class:`BuildError` (the TFRecord builder),
``saved_encoder.ExportError``, ``atomic.DestinationExistsError``.

Binaries (``harl_tf.pretrain``, ``harl_tf.export``, ``harl_tf.finetune`` and every tool
in :mod:`harl_tf.cli`) run through :func:`run_binary`: a flag that does not parse
(unknown, wrong type, missing flagfile, a required flag not given), an ``app.UsageError``
or a :class:`HarlError` ends the process with ONE line ``<program>: error: <message>`` on
stderr and exit status 2 — no traceback, no help text. Any other exception is a bug and
keeps its traceback. Nothing here imports TensorFlow.
"""
from __future__ import annotations

import sys
from typing import Callable, NoReturn, Sequence

USAGE_EXIT_STATUS = 2


class HarlError(ValueError):
    """Bad input, flag or file: the message names it, says what was expected and found."""


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


def run_binary(program: str, main: Callable, *, errors=(HarlError,),
               required: Sequence[str] = ()) -> None:
    """``absl.app.run(main)`` with one-line errors for flags, usage and ``errors``.

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
        except errors as err:
            fail(program, err)

    app.run(guarded_main, flags_parser=parse)
