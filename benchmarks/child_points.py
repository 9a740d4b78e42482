"""What the benchmark scripts share: one measurement run in a child process, and its ratios.

A script's row is a dataclass deriving from `PointFigures`, adding the fields that name its point.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

__all__ = ["PointFigures", "fill_from_child", "fmt", "judge", "memory_cell", "point_line", "set_ratios",
           "warn_if_busy", "write_outputs"]


@dataclasses.dataclass(kw_only=True)
class PointFigures:
    """What one child measured (or why not), and its ratios against the row it is compared with."""

    extra_peak_mib: float | None = None
    seconds: float | None = None
    cpu_seconds: float | None = None  # over all threads; unlike `seconds`, barely moved by other load
    memory_ratio: float | None = None  # base / this
    time_ratio: float | None = None  # this / base
    note: str = ""  # why there is no measurement: n/a, skipped, error

    @property
    def measured(self) -> bool:
        return self.seconds is not None


def fill_from_child(row, command: list[str], timeout_s: int) -> dict:
    """Run `command` (which prints one JSON measurement last) and put its result, or why not, in `row`.

    A child that measured nothing may say why in a "note" key (e.g. "out of memory (> 4 GiB)").
    Returns the child's JSON object (empty when it failed), for any further keys it printed.
    """
    # Imported here: the children, which import this module too, need not import rewriter (and torch).
    from rewriter.tools.bench_child import ChildFailed, run_json_child

    try:
        result = run_json_child(command, timeout_s)
    except ChildFailed as error:
        row.note = f"error: {error}"
        return {}
    if result.get("note"):
        row.note = result["note"]
        return result
    row.extra_peak_mib, row.seconds, row.cpu_seconds = result["extra_peak_mib"], result["seconds"], result["cpu_seconds"]
    return result


def set_ratios(row, base) -> None:
    """Memory ratio base/row and time ratio row/base, when both were measured."""
    if base is None or row.seconds is None or base.seconds is None:
        return
    row.memory_ratio = base.extra_peak_mib / max(row.extra_peak_mib, 1e-3)
    row.time_ratio = row.seconds / base.seconds


def fmt(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def memory_cell(row: PointFigures) -> str:
    """A table's memory cell: the extra peak, or why there is none."""
    return fmt(row.extra_peak_mib, ".1f") if row.measured else row.note


def point_line(row: PointFigures) -> str:
    """What one point measured, or why not, for the progress log."""
    if not row.measured:
        return row.note
    return f"{row.extra_peak_mib:.1f} MiB extra, {row.seconds:.3f} s ({row.cpu_seconds:.3f} s CPU)"


def warn_if_busy(when: str) -> float:
    """The 1-minute load average, with a warning on stderr when other work will skew the times."""
    load = os.getloadavg()[0]
    if load > 0.5:
        print(f"warning: load average {load:.1f} {when}; other processes will skew the times", file=sys.stderr)
    return load


def judge(goal: str, naive: PointFigures | None, rewritten: PointFigures | None, min_memory_ratio: float,
          max_time_ratio: float, time_format: str = ".2f", detail: str = "") -> tuple[str, str]:
    """(PASS | FAIL | SKIP, description) of one target line: `rewritten` against `naive`."""
    if naive is None or rewritten is None:
        return "SKIP", f"{goal} (not run)"
    if rewritten.memory_ratio is None:
        return "FAIL", f"{goal} ({naive.note or rewritten.note})"
    ok = rewritten.memory_ratio >= min_memory_ratio and rewritten.time_ratio <= max_time_ratio
    got = f"got {rewritten.memory_ratio:.0f}x less memory, {format(rewritten.time_ratio, time_format)}x time{detail}"
    return "PASS" if ok else "FAIL", f"{goal}: {got}"


def write_outputs(table: str, verdicts: list[tuple[str, str]], json_path: str | None, markdown_path: str | None,
                  payload: dict) -> int:
    """Print the table and target lines, write them as JSON (`payload` plus the targets) and markdown
    where asked; exit status 1 when a target failed."""
    targets = "\n".join(f"{verdict}  {text}" for verdict, text in verdicts)
    print(f"{table}\n\n{targets}" if verdicts else table)
    if json_path:
        with open(json_path, "w") as out:
            json.dump({**payload, "targets": [{"verdict": v, "target": text} for v, text in verdicts]}, out, indent=2)
    if markdown_path:
        with open(markdown_path, "w") as out:
            out.write(f"{table}\n\n```\n{targets}\n```\n" if verdicts else f"{table}\n")
    return 1 if any(verdict == "FAIL" for verdict, _ in verdicts) else 0
