"""Naive vs rewritten over a sweep of sequence lengths, each point measured in a fresh process.

`bench_onnx` rewrites an ONNX model once (in memory), saves both forms to a temporary directory and
runs each at every length on ONNX Runtime's CPU provider. A point's child creates the session,
runs it once at a short length (`WARMUP_LENGTH`: loads kernels and starts the thread pool without
pre-growing ORT's memory arena to the measured size), builds the inputs at the length, then records
one run: its wall time and extra peak RSS (`rewriter.tools.measure.measure_call`). Inputs come from the
graph inputs (`rewriter.verify.random_inputs`): integer ids small non-negative values, masks all
true / ones, floats standard normal. Symbolic input dims are bound by `bind_dims`.

`bench_module` does the same for a PyTorch model made by `factory(seq_len) -> (module, inputs)`:
eager vs `rewriter.optimize_module`, forward under no_grad (or, with `training=True`, forward and
backward of the sum of the float outputs). The child runs the call once on the same inputs as a
warm-up (the rewritten module is specialised to their shapes), then measures the second run.

Naive ONNX points whose static peak-activation estimate exceeds `memory_limit` (default a quarter
of the physical memory) are skipped; a child that dies (e.g. killed for memory) or times out is
recorded as failed and the sweep goes on.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping

import onnx

from rewriter.tools.bench_child import ChildFailed, run_point
from rewriter.tools.bench_result import IMPLEMENTATIONS, BenchResult, BenchRow
from rewriter.tools.memory_estimate import estimate_peak_activation_bytes, sequence_dims

__all__ = ["BenchInputError", "BenchResult", "bench_module", "bench_onnx", "bind_dims", "default_memory_limit",
           "terminal_progress"]

logger = logging.getLogger(__name__)

WARMUP_LENGTH = 128
# The static estimate counts live tensors only; ORT's naive GPT-2 measured ~1.7x it at n = 8192, so
# a quarter of the memory as the default limit leaves room for that and for the rest of the machine.
DEFAULT_MEMORY_FRACTION = 0.25
DEFAULT_TIMEOUT_S = 1800

# progress(points done, points in all, the row): called with row.status "running" before a point
# and with its final status after it.
Progress = Callable[[int, int, BenchRow], None]


class BenchInputError(ValueError):
    """Input the user can fix (lengths, threads, dims, a model with nothing to rewrite): one line."""


def terminal_progress(stream=None) -> Progress:
    """A progress bar redrawn in place when `stream` (default stderr) is a terminal; else one line per point."""
    stream = stream or sys.stderr
    redraw = stream.isatty()

    def show(done: int, total: int, row: BenchRow) -> None:
        state = "measuring ..." if row.status == "running" else row.describe()
        if redraw:
            bar = "#" * round(20 * done / total)
            stream.write(f"\r\033[K[{bar:.<20}] {done}/{total}  n={row.length} {row.impl}: {state}")
            if done == total:
                stream.write("\n")
        elif row.status != "running":
            stream.write(f"[{done}/{total}] n={row.length} {row.impl}: {state}\n")
        stream.flush()

    return show


def default_memory_limit() -> int:
    """A quarter of the physical memory, in bytes."""
    return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * DEFAULT_MEMORY_FRACTION)


def bind_dims(model: onnx.ModelProto, length: int, overrides: Mapping[str, int] | None = None) -> dict[str, int]:
    """A size for every symbolic input dim of `model` at sequence length `length`.

    In order: a size from `overrides` (by dim name); `length` for a name that looks like a sequence
    (contains "seq", "len" or "tokens"); 1 for a batch: a name containing "batch", or a dim seen
    only as axis 0 of inputs of rank >= 2; `length` for any other dim.
    """
    overrides = dict(overrides or {})
    initializers = {init.name for init in model.graph.initializer}
    positions: dict[str, list[tuple[int, int]]] = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        dims = value.type.tensor_type.shape.dim
        for axis, dim in enumerate(dims):
            if dim.dim_param:
                positions.setdefault(dim.dim_param, []).append((axis, len(dims)))
    unknown = sorted(set(overrides) - set(positions))
    if unknown:
        raise BenchInputError(f"--dim {unknown[0]}: the model has no symbolic input dim of that name "
                         f"(it has: {', '.join(sorted(positions)) or 'none'})")
    sequence = set(sequence_dims(model, length))
    bound = {}
    for name, where in positions.items():
        if name in overrides:
            bound[name] = overrides[name]
        elif name in sequence:
            bound[name] = length
        elif "batch" in name.lower() or all(axis == 0 and rank >= 2 for axis, rank in where):
            bound[name] = 1
        else:
            bound[name] = length
    return bound


def bench_onnx(model_or_path, lengths: Iterable[int], *, target: str = "auto", threads: int = 2,
               dims: Mapping[str, int] | None = None, memory_limit: int | None = None,
               timeout_s: float = DEFAULT_TIMEOUT_S, progress: Progress | None = None) -> BenchResult:
    """Bench an ONNX model (path or ModelProto) against its rewrite for `target` at each length."""
    from passes.onnx.einsum_ellipsis import spelt_out
    from rewriter.onnx_api import optimize_onnx
    from rewriter.onnx_io import load_model, save_model

    lengths = _checked_lengths(lengths, threads)
    is_path = isinstance(model_or_path, (str, os.PathLike))
    model = load_model(os.fspath(model_or_path)) if is_path else model_or_path
    name = os.fspath(model_or_path) if is_path else (model.graph.name or "model")
    bind_dims(model, lengths[0], dims)  # a bad --dim fails before any work
    optimized, report = optimize_onnx(model, target=target)
    _require_rewrite(name, report)
    model = spelt_out(model)  # as ONNX Runtime can run it: exported Performer einsums need explicit labels
    limit = memory_limit or default_memory_limit()
    config = {"model": name, "kind": "onnx", "target": target, "threads": threads, "lengths": lengths,
              "dims": {length: bind_dims(model, length, dims) for length in lengths},
              "warmup_length": WARMUP_LENGTH, "memory_limit_bytes": limit}
    with tempfile.TemporaryDirectory(prefix="rewriter-bench-") as directory:
        paths = {impl: os.path.join(directory, f"{impl}.onnx") for impl in IMPLEMENTATIONS}
        save_model(model, paths["naive"])
        save_model(optimized, paths["rewritten"])
        points = []
        for length in lengths:
            bound = config["dims"][length]
            warmup = bind_dims(model, min(length, WARMUP_LENGTH), dims)
            for impl in IMPLEMENTATIONS:
                row = BenchRow(length, impl, "pending")
                spec = {"kind": "onnx", "threads": threads, "path": paths[impl], "dims": bound, "warmup_dims": warmup}
                if impl == "naive":
                    row.estimated_peak_mib = estimate_peak_activation_bytes(model, bound).peak_bytes / 2**20
                    if row.estimated_peak_mib * 2**20 > limit:
                        row.status, spec = "skipped", None
                points.append((row, spec))
        rows = _sweep(points, timeout_s, progress)
    config["load_average"] = os.getloadavg()[0]
    return BenchResult(rows, config, report)


def bench_module(factory: str | Callable, lengths: Iterable[int], *, threads: int = 2, training: bool = False,
                 timeout_s: float = DEFAULT_TIMEOUT_S, progress: Progress | None = None) -> BenchResult:
    """Bench eager vs `optimize_module` for `factory(seq_len) -> (module, example_inputs)`.

    `factory` is a "module:callable" string (`rewriter.tools.model_source`) or an importable module-level
    callable: each point's child imports it. No memory estimate exists for PyTorch models, so no point is skipped.
    """
    import rewriter
    from rewriter.tools.model_source import call_factory

    lengths = _checked_lengths(lengths, threads)
    spec_name = factory if isinstance(factory, str) else _importable_name(factory)
    module, inputs = call_factory(spec_name, lengths[0])  # ModelSourceError for a bad spec
    # the report, and a failure before any child; at fixed shapes, as each child captures its length
    _, report = rewriter.optimize_module(module.eval(), inputs, dynamic_shapes=None)
    _require_rewrite(spec_name, report)
    config = {"model": spec_name, "kind": "torch", "target": "torch", "threads": threads, "lengths": lengths,
              "training": training, "warmup": "one run on the same inputs"}
    points = [(BenchRow(length, impl, "pending"),
               {"kind": "torch", "threads": threads, "factory": spec_name, "length": length,
                "rewritten": impl == "rewritten", "training": training, "sys_path": sys.path})
              for length in lengths for impl in IMPLEMENTATIONS]
    rows = _sweep(points, timeout_s, progress)
    config["load_average"] = os.getloadavg()[0]
    return BenchResult(rows, config, report)


def _sweep(points: list[tuple[BenchRow, dict | None]], timeout_s: float, progress: Progress | None) -> list[BenchRow]:
    """Measure every point with a spec in its own child; a point without one was skipped."""
    for done, (row, spec) in enumerate(points):
        if spec is not None:
            row.status = "running"
            if progress:
                progress(done, len(points), row)
            try:
                measured = run_point(spec, timeout_s)
            except ChildFailed as error:
                row.status, row.note = "failed", str(error)
                logger.info("length %d %s failed: %s", row.length, row.impl, error)  # the table lists it too
            else:
                row.status = "ok"
                row.extra_peak_mib, row.seconds, row.cpu_seconds = (
                    measured["extra_peak_mib"], measured["seconds"], measured["cpu_seconds"])
        if progress:
            progress(done + 1, len(points), row)
    return [row for row, _ in points]


def _checked_lengths(lengths: Iterable[int], threads: int) -> list[int]:
    if not isinstance(threads, int) or threads < 1:
        raise BenchInputError(f"threads must be a positive integer, got {threads!r}")
    lengths = sorted(set(lengths))
    if not lengths or any(not isinstance(n, int) or n < 1 for n in lengths):
        raise BenchInputError(f"sequence lengths must be positive integers, got {lengths}")
    return lengths


def _importable_name(factory: Callable) -> str:
    module, qualname = getattr(factory, "__module__", None), getattr(factory, "__qualname__", "")
    if not module or module == "__main__" or "<" in qualname:
        raise BenchInputError(f"{qualname or factory!r}: the factory must be a module-level function of an importable "
                         "module (each child process imports it)")
    return f"{module}:{qualname}"


def _require_rewrite(name: str, report) -> None:
    if report.rewritten_count == 0:
        reasons = "; ".join(m.reason or "not rewritten" for m in report.matches) or "no attention found"
        raise BenchInputError(f"{name}: nothing to compare, no attention block was rewritten ({reasons})")
