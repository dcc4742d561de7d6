"""Atomic writes: a file or directory appears under its final name complete, or not at all.

Everything is written under a hidden temporary name in the same directory
(``.<name>.<random>.tmp``), flushed to disk, then renamed onto the final name with
``os.replace`` (atomic on POSIX within one file system). A failure deletes the temporary;
a crash (power loss, ``kill -9``) can leave one behind, but never a partial file under the
final name, and an existing file keeps its old content until the rename.

    write_bytes_atomic(path, png_bytes)
    write_json_atomic(path, {"step": 12})
    with atomic_path(path) as tmp:        # any writer that takes a path
        np.savez(tmp, **arrays)
    with atomic_directory(export_dir, overwrite=True) as tmp:
        tf.saved_model.save(root, tmp)

Files get the permissions a plain ``open`` would give (``mkstemp`` makes them private).
Nothing here imports TensorFlow.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Any, Iterator

from harl_tf.errors import HarlError

TEMPORARY_SUFFIX = ".tmp"


class DestinationExistsError(HarlError):
    """The target of :func:`atomic_directory` exists and ``overwrite`` is off."""


def _default_mode(directory: bool) -> int:
    """Permissions a plain ``mkdir`` / ``open`` would give under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def _fsync(path: str) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def commit(temporary: str, path: str) -> None:
    """Flushes the finished file ``temporary`` to disk and renames it onto ``path``
    (for writers that own their temporary file, like the TFRecord shard writer)."""
    _fsync(temporary)
    os.replace(temporary, path)


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yields a temporary path next to ``path`` to write one file to; on success the file
    is flushed, given the usual permissions and renamed onto ``path``; on any exception it
    is deleted and ``path`` is left as it was."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.",
                                         suffix=TEMPORARY_SUFFIX, dir=directory)
    os.close(handle)
    try:
        yield temporary
        os.chmod(temporary, _default_mode(directory=False))
        commit(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise


def write_bytes_atomic(path: str, data: bytes) -> None:
    """Writes ``data`` to ``path`` atomically."""
    with atomic_path(path) as temporary, open(temporary, "wb") as handle:
        handle.write(data)


def jsonable(value: Any) -> Any:
    """``json.dump``'s ``default``: numpy (and TF) scalars and arrays become numbers and
    lists; anything else its ``str()`` (these files are records, not a round-trip format)."""
    if hasattr(value, "numpy"):  # an eager tensor
        value = value.numpy()
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return value.tolist()
    return str(value)


def write_json_atomic(path: str, payload: Any) -> str:
    """Writes ``payload`` as JSON (indent 2, sorted keys, final newline) to ``path``
    atomically; returns ``path``."""
    text = json.dumps(payload, indent=2, sort_keys=True, default=jsonable) + "\n"
    write_bytes_atomic(path, text.encode("utf-8"))
    return path


@contextlib.contextmanager
def atomic_directory(target: str, *, overwrite: bool = False) -> Iterator[str]:
    """Yields a temporary directory next to ``target``; renames it onto ``target`` on
    success and deletes it on failure.

    An existing ``target`` is a :class:`DestinationExistsError` unless ``overwrite``; it is
    then replaced only after the new directory is complete (renamed aside, the new one
    renamed in, the old one deleted).
    """
    target = os.path.abspath(target)
    if os.path.exists(target) and not overwrite:
        raise DestinationExistsError(f"{target} already exists; choose another path or "
                                     "overwrite it.")
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    name = os.path.basename(target)
    temporary = tempfile.mkdtemp(prefix=f".{name}.", suffix=TEMPORARY_SUFFIX, dir=parent)
    try:
        yield temporary
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    os.chmod(temporary, _default_mode(directory=True))
    old = None
    if os.path.exists(target):
        if not overwrite:  # appeared while we were writing
            shutil.rmtree(temporary, ignore_errors=True)
            raise DestinationExistsError(f"{target} appeared while it was being written; "
                                         "not replacing it.")
        old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
        os.rmdir(old)
        os.rename(target, old)
    os.rename(temporary, target)
    if old:
        shutil.rmtree(old, ignore_errors=True)
