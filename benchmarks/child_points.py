"""What the benchmark scripts share: one measurement run in a child process, and its ratios.

A script's row is a dataclass deriving from `PointFigures`, adding the fields that name its point.
"""

from __future__ import annotations

import dataclasses

__all__ = ["PointFigures", "fill_from_child", "fmt", "set_ratios"]


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


def fill_from_child(row, command: list[str], timeout_s: int) -> None:
    """Run `command` (which prints one JSON measurement last) and put its result, or why not, in `row`."""
    # Imported here: the children, which import this module too, need not import rewriter (and torch).
    from rewriter.bench_child import ChildFailed, run_json_child

    try:
        result = run_json_child(command, timeout_s)
    except ChildFailed as error:
        row.note = f"error: {error}"
        return
    row.extra_peak_mib, row.seconds, row.cpu_seconds = result["extra_peak_mib"], result["seconds"], result["cpu_seconds"]


def set_ratios(row, base) -> None:
    """Memory ratio base/row and time ratio row/base, when both were measured."""
    if base is None or row.seconds is None or base.seconds is None:
        return
    row.memory_ratio = base.extra_peak_mib / max(row.extra_peak_mib, 1e-3)
    row.time_ratio = row.seconds / base.seconds


def fmt(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)
