"""Where results go and how they are written: ``bench/results/<name>.json``, tables."""
from __future__ import annotations

import os
import shlex
import statistics
import sys
from typing import Iterable, List, Sequence

from harl_tf.atomic import write_json_atomic

from bench.common.machine import load_average

# The repository root: benchmarks run from it (python -m bench.<name>), and so do their
# subprocesses.
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RESULTS_DIR = os.path.join(ROOT, "bench", "results")


def command_line() -> str:
    """This process's command as typed from the repository root (``python -m bench.x ...``
    for a module)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    head = ["python", "-m", spec.name] if spec is not None else ["python", sys.argv[0]]
    return shlex.join(head + sys.argv[1:])


def write_result(name: str, payload: dict) -> str:
    """``bench/results/<name>.json`` (atomic); adds the end load average and the command."""
    payload.setdefault("benchmark", name)
    payload.setdefault("command", command_line())
    machine = payload.get("machine")
    if isinstance(machine, dict):
        machine["load_average_at_end"] = load_average()
    path = write_json_atomic(os.path.join(RESULTS_DIR, f"{name}.json"), payload)
    print(f"wrote {path}", flush=True)
    return path


def background_fields(mode: str, result: dict) -> dict:
    """``{mode}_mixed_rand_top1`` and ``{mode}_background_gap`` from a ``harl_tf.finetune``
    results.json scored with ``--eval_background=both``; empty when it was not."""
    background = result.get("background")
    if not background:
        return {}
    return {f"{mode}_mixed_rand_top1": background["mixed_rand"]["top1"],
            f"{mode}_background_gap": background["gap_top1"]}


def chosen_configs(requested: Sequence[str], known: Sequence[str]) -> List[str]:
    """The configurations a sweep runs: ``requested`` (a ``--configs`` list), or all of
    ``known`` when it is empty. Raises absl's UsageError naming any unknown one."""
    names = list(requested) or list(known)
    unknown = [name for name in names if name not in known]
    if unknown:
        from absl import app
        raise app.UsageError(f"--configs: unknown {unknown}; choose from {list(known)}")
    return names


def summarise(values: Iterable) -> dict:
    """Mean, sample sd (None for one value), count and the values themselves of the
    values that are not None; None when none is left (a method no seed ran)."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"mean": statistics.fmean(values),
            "sd": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values), "values": values}


def format_summary(stat) -> str:
    """``mean ± sd (n)`` of a :func:`summarise` result (``–`` for None)."""
    if stat is None:
        return "–"
    if stat["sd"] is None:
        return f"{stat['mean']:.3f}"
    return f"{stat['mean']:.3f} ± {stat['sd']:.3f} ({stat['n']})"


def median(values: Iterable[float]) -> float:
    values = [float(v) for v in values]
    return statistics.median(values) if values else float("nan")


def table(rows: Sequence[Sequence], headers: Sequence[str]) -> str:
    """A Markdown table (also readable in a terminal)."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)
