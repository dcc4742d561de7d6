"""Child processes: the runner, peak memory of a process tree, the tests' helpers."""
from __future__ import annotations

import importlib.abc
import importlib.util
import os
import shlex
import subprocess
import sys
import threading
import time
from typing import Mapping, Optional, Sequence

from bench.common.results import ROOT


def run(command: Sequence[str], log_path: str, *,
        env: Optional[Mapping[str, str]] = None, append: bool = False) -> float:
    """Runs ``command`` (an argv list) from the repository root, its stdout and stderr in
    ``log_path`` (added to its end with ``append``, as a resumed run does), after echoing it. Returns the wall seconds; a non-zero exit raises
    SystemExit naming the command, with the log's last 3,000 characters."""
    os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
    print(f"$ {shlex.join(command)}", flush=True)
    started = time.time()
    with open(log_path, "a" if append else "w") as log:
        code = subprocess.run(list(command), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                              env=None if env is None else dict(env)).returncode
    if code != 0:
        with open(log_path) as log:
            tail = log.read()[-3000:]
        raise SystemExit(f"failed ({code}): {shlex.join(command)}\n--- {log_path}\n{tail}")
    return time.time() - started


class PeakRss:
    """Peak resident memory of a process and its descendants, sampled every ``interval``
    seconds on a thread (psutil) while the ``with`` block runs.

    ``tree``: the largest sum of RSS over the descendants, plus the process itself unless
    ``include_self=False`` (shared pages count in each process, so an upper bound when
    workers fork); ``largest_child``: the largest RSS of one descendant. Both in bytes.
    A process that exits between listing and reading is skipped for that sample.
    """

    def __init__(self, pid: Optional[int] = None, *, include_self: bool = True,
                 interval: float = 0.05):
        self.pid, self.include_self, self.interval = pid or os.getpid(), include_self, interval
        self.tree = self.largest_child = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> "PeakRss":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()

    def _sample(self) -> None:
        import psutil
        try:
            root = psutil.Process(self.pid)
        except psutil.Error:
            return
        while not self._done.is_set():
            try:
                children = root.children(recursive=True)
                own = root.memory_info().rss if self.include_self else 0
            except psutil.Error:
                children, own = [], 0
            sizes = []
            for child in children:
                try:
                    sizes.append(child.memory_info().rss)
                except psutil.Error:
                    pass
            self.tree = max(self.tree, own + sum(sizes))
            self.largest_child = max(self.largest_child, max(sizes, default=0))
            self._done.wait(self.interval)


class _TestsFinder(importlib.abc.MetaPathFinder):
    """Resolves a top-level name to ``tests/<name>.py`` when nothing else provides it."""

    def find_spec(self, fullname, path=None, target=None):
        file = os.path.join(ROOT, "tests", fullname + ".py")
        if path is None and "." not in fullname and os.path.isfile(file):
            return importlib.util.spec_from_file_location(fullname, file)
        return None


def import_test_helpers() -> None:
    """Lets ``import test_reliability_training`` (and the test modules it imports in turn)
    load ``tests/*.py`` as pytest loads them: by file name, tests/ not being a package.
    For the soak (``bench.fault_injection``), which reuses the tests' helpers and loops."""
    if not any(isinstance(finder, _TestsFinder) for finder in sys.meta_path):
        sys.meta_path.append(_TestsFinder())
