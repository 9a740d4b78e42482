"""What `rewriter bench` measured: rows per (sequence length, implementation), table, JSON, plot.

A row's status is "ok" (measured), "skipped" (the naive point's memory estimate was over the
limit; `estimated_peak_mib` says by how much) or "failed" (the child died, timed out or raised;
`note` says which). Ratios compare naive and rewritten at the same length when both were measured:
memory "x lower" is naive / rewritten extra peak, time "x" is rewritten / naive seconds.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

from rewriter.tools.memory_estimate import format_bytes

__all__ = ["BenchResult", "BenchRow", "IMPLEMENTATIONS"]

logger = logging.getLogger(__name__)

IMPLEMENTATIONS = ("naive", "rewritten")
# RSS moves in 4 KiB pages: an extra peak below this floor is drawn at it (log axes cannot show 0)
# and divides the naive figure as if it were the floor, making the memory ratio a lower bound.
FLOOR_MIB = 0.01


@dataclasses.dataclass
class BenchRow:
    length: int
    impl: str  # "naive" | "rewritten"
    status: str  # "ok" | "skipped" | "failed"
    extra_peak_mib: float | None = None
    seconds: float | None = None
    cpu_seconds: float | None = None  # over all threads: barely moved by other load, unlike seconds
    estimated_peak_mib: float | None = None  # static estimate of peak activations (ONNX only)
    note: str = ""

    def describe(self) -> str:
        """One short line: the figures, or why there are none."""
        if self.status == "ok":
            return f"{self.extra_peak_mib:.1f} MiB extra, {self.seconds:.3f} s"
        if self.status == "skipped":
            return f"skipped (estimate {_mib(self.estimated_peak_mib)})"
        return f"failed ({self.note})"


@dataclasses.dataclass
class BenchResult:
    """A sweep of naive vs rewritten; `config` holds what was run (model, target, threads, dims)."""

    rows: list[BenchRow]
    config: dict
    report: object | None = None  # the rewrite's rewriter.Report

    @property
    def lengths(self) -> list[int]:
        return sorted({row.length for row in self.rows})

    def row(self, length: int, impl: str) -> BenchRow | None:
        return next((r for r in self.rows if r.length == length and r.impl == impl), None)

    def ratios(self, length: int) -> tuple[float | None, float | None]:
        """(memory x lower, time x) at `length`; None where a side was not measured (or both used no memory)."""
        naive, rewritten = self.row(length, "naive"), self.row(length, "rewritten")
        if not (naive and rewritten and naive.status == rewritten.status == "ok"):
            return None, None
        time_ratio = rewritten.seconds / max(naive.seconds, 1e-9)
        if naive.extra_peak_mib < FLOOR_MIB:  # nothing measurable to divide
            return None, time_ratio
        return naive.extra_peak_mib / max(rewritten.extra_peak_mib, FLOOR_MIB), time_ratio

    def memory_ratio_is_lower_bound(self, length: int) -> bool:
        rewritten = self.row(length, "rewritten")
        return bool(rewritten and rewritten.status == "ok" and rewritten.extra_peak_mib < FLOOR_MIB)

    def table(self) -> str:
        """Fixed-width text: one line per length, naive and rewritten side by side, with ratios."""
        header = ("length", "naive peak", "rewritten peak", "memory", "naive time", "rewritten time", "time")
        lines = [header]
        for length in self.lengths:
            cells = [str(length)]
            for kind in ("memory", "time"):
                for impl in IMPLEMENTATIONS:
                    cells.append(_cell(self.row(length, impl), kind))
            memory_ratio, time_ratio = self.ratios(length)
            cells.insert(3, self._memory_ratio_text(length, memory_ratio))
            cells.append("" if time_ratio is None else f"{time_ratio:.2f}x")
            lines.append(tuple(cells))
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        text = ["  ".join(cell.rjust(width) for cell, width in zip(line, widths)) for line in lines]
        notes = [f"  {r.length} {r.impl}: {r.note}" for r in self.rows if r.status == "failed"]
        return "\n".join(text + (["failed points:"] + notes if notes else []))

    def _memory_ratio_text(self, length: int, ratio: float | None) -> str:
        if ratio is None:
            return ""
        if ratio < 1:
            return f"{1 / ratio:.1f}x higher"
        return f"{'>' if self.memory_ratio_is_lower_bound(length) else ''}{ratio:.1f}x lower"

    def to_dict(self) -> dict:
        ratios = {length: self.ratios(length) for length in self.lengths}
        return {
            "config": self.config,
            "rows": [dataclasses.asdict(row) for row in self.rows],
            "ratios": [{"length": length, "memory_x_lower": memory, "time_x": time,
                        "memory_ratio_is_lower_bound": self.memory_ratio_is_lower_bound(length)}
                       for length, (memory, time) in ratios.items()],
            "report": self.report.to_dict() if self.report is not None else None,
        }

    def write_json(self, path: str) -> None:
        with open(path, "w") as out:
            json.dump(self.to_dict(), out, indent=2)
            out.write("\n")

    def plot(self, path: str) -> None:
        """PNG: extra peak memory and time vs sequence length, log-log, naive vs rewritten."""
        from matplotlib.figure import Figure  # no pyplot: no global backend or figure state
        from matplotlib.ticker import FuncFormatter, LogFormatter, NullFormatter

        class PlainLogFormatter(LogFormatter):  # labels the minor ticks LogFormatter picks, as 0.3 not 3e-01
            def __call__(self, value, pos=None):
                return f"{value:g}" if super().__call__(value, pos) else ""

        figure = Figure(figsize=(10, 4), layout="constrained")
        memory_axes, time_axes = figure.subplots(1, 2)
        for impl, style in zip(IMPLEMENTATIONS, ("o-", "s-")):
            measured = [r for r in self.rows if r.impl == impl and r.status == "ok"]
            lengths = [r.length for r in measured]
            memory_axes.plot(lengths, [max(r.extra_peak_mib, FLOOR_MIB) for r in measured], style, label=impl)
            time_axes.plot(lengths, [r.seconds for r in measured], style, label=impl)
        for axes, label in ((memory_axes, "extra peak memory (MiB)"), (time_axes, "time (s)")):
            axes.set_xscale("log", base=2)
            axes.set_yscale("log")
            axes.set_xticks(self.lengths, [str(length) for length in self.lengths])
            axes.xaxis.set_minor_formatter(NullFormatter())
            axes.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
            axes.yaxis.set_minor_formatter(PlainLogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
            axes.set_xlabel("sequence length")
            axes.set_ylabel(label)
            axes.grid(True, which="both", alpha=0.3)
            axes.legend()
        title = self.config.get("model", "")
        figure.suptitle(f"{os.path.basename(str(title))}: naive vs rewritten ({self.config.get('threads')} threads)")
        figure.savefig(path, format="png", dpi=100)


def _cell(row: BenchRow | None, kind: str) -> str:
    if row is None:
        return ""
    if row.status == "skipped":
        return f"skipped (est. {_mib(row.estimated_peak_mib)})" if kind == "memory" else "skipped"
    if row.status == "failed":
        return "failed"
    return f"{row.extra_peak_mib:.1f} MiB" if kind == "memory" else f"{row.seconds:.3f} s"


def _mib(value: float | None) -> str:
    return "?" if value is None else format_bytes(round(value * 2**20))
