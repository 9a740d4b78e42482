"""Activation memory and time of a causal LM training step: torch.compile default vs backend="rewriter".

The model is `rewriter.tools.demo.TinyDecoder` (GPT-style: 2 pre-norm blocks, hidden 64, 4 heads, causal
attention written naively with a tril mask built in forward, vocabulary 256), batch 1, fp32, 2
threads, in training mode. One step is forward, next-token cross-entropy, backward and an AdamW
step (`zero_grad(set_to_none=True)` after it), with three implementations:

    eager      the module as written (for reference)
    inductor   torch.compile(model): the default backend
    rewriter   torch.compile(model, backend="rewriter"): attention rewritten to rewriter::attention,
               the rest compiled by Inductor

Every point runs in a fresh subprocess: it builds the model, optimizer and tokens at length n,
compiles and runs one warm-up step (so compilation, the optimizer's state and the autograd
buffers exist before measuring), then `rewriter.tools.measure.measure_call` records one more step: its
wall time and its extra peak RSS (VmHWM during the step, reset through /proc/self/clear_refs after
malloc_trim, minus VmRSS just before), which is the step's activation memory (plus gradients,
whose buffers are freed and reallocated each step). Ratios are against `inductor` at the same n.
A point estimated above MAX_CHILD_GIB is skipped. Times are wall-clock times of a single step:
other load on the 2 cores skews them; the CPU-seconds column moves less.

    PYTHONPATH=. python benchmarks/compile_training.py              # n = 4096, 8192: 9 minutes on a busy
                                                                    # 2-core machine, mostly compiling
    PYTHONPATH=. python benchmarks/compile_training.py --sizes 2048 --impls inductor rewriter \\
        --json out.json --markdown out.md
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import torch
import torch.nn.functional as F

from child_points import (
    PointFigures,
    fill_from_child,
    fmt,
    memory_cell,
    point_line,
    set_ratios,
    warn_if_busy,
    write_outputs,
)
from rewriter.tools.demo import TinyDecoder
from rewriter.tools.measure import measure_call

THREADS = 2
IMPLS = ("eager", "inductor", "rewriter")
BASELINE = "inductor"
DEFAULT_SIZES = (4096, 8192)
HEADS = 4
# A naive step's extra peak is about this many (1, HEADS, n, n) fp32 score tensors (measured at
# n = 2048 with eager, rounded up); points estimated above MAX_CHILD_GIB are skipped.
NAIVE_SCORE_COPIES = 5
MAX_CHILD_GIB = 16
CHILD_TIMEOUT_S = 1200


# --------------------------------------------------------------------------- child: one measurement


def training_step(impl: str, n: int):
    """The model compiled for `impl` at length n, and its training step (forward, backward, AdamW)."""
    torch.manual_seed(0)
    model = TinyDecoder().train()
    tokens = torch.randint(0, 256, (1, n))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    forward = {"eager": lambda: model, "inductor": lambda: torch.compile(model),
               "rewriter": lambda: torch.compile(model, backend="rewriter")}[impl]()

    def step() -> float:
        logits = forward(tokens)
        loss = F.cross_entropy(logits[0, :-1], tokens[0, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def measure(impl: str, n: int) -> dict:
    torch.set_num_threads(THREADS)
    step = training_step(impl, n)
    step()  # compiles, and creates the optimizer's state
    measured = measure_call(step)
    return {"extra_peak_mib": measured.extra_peak_mib, "seconds": measured.seconds,
            "cpu_seconds": measured.cpu_seconds}


# --------------------------------------------------------------------------- parent: the sweep


@dataclasses.dataclass
class Row(PointFigures):
    n: int
    impl: str


def naive_estimate_gib(n: int) -> float:
    return NAIVE_SCORE_COPIES * HEADS * n * n * 4 / 2**30


def run_child(impl: str, n: int) -> Row:
    row = Row(n, impl)
    if impl != "rewriter" and naive_estimate_gib(n) > MAX_CHILD_GIB:
        row.note = f"skipped (~{naive_estimate_gib(n):.0f} GiB)"
        return row
    fill_from_child(row, [sys.executable, __file__, "--one", impl, str(n)], CHILD_TIMEOUT_S)
    return row


def sweep(sizes, impls) -> list[Row]:
    rows = []
    for n in sizes:
        for impl in impls:
            row = run_child(impl, n)
            print(f"n={n:<6} {impl:>9}: {point_line(row)}", file=sys.stderr, flush=True)
            rows.append(row)
    baselines = {row.n: row for row in rows if row.impl == BASELINE and row.measured}
    for row in rows:
        set_ratios(row, baselines.get(row.n))
    return rows


def markdown_table(rows: list[Row]) -> str:
    lines = ["| n | implementation | extra peak MiB | step time s | CPU s"
             f" | memory ratio ({BASELINE}/impl) | time ratio (impl/{BASELINE}) |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.n} | {r.impl} | {memory_cell(r)} | {fmt(r.seconds, '.3f')} | {fmt(r.cpu_seconds, '.3f')} "
                     f"| {fmt(r.memory_ratio, '.1f')} | {fmt(r.time_ratio, '.2f')} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES), help="sequence lengths")
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    parser.add_argument("--markdown", metavar="PATH", help="write the table as markdown")
    parser.add_argument("--one", nargs=2, metavar=("IMPL", "N"), help=argparse.SUPPRESS)  # a child
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.one:
        impl, n = args.one
        print(json.dumps(measure(impl, int(n))))
        return 0
    if any(n < 2 for n in args.sizes):
        print("compile_training.py: --sizes must be at least 2", file=sys.stderr)
        return 2
    load = warn_if_busy("before starting")
    rows = sweep(args.sizes, args.impls)
    write_outputs(markdown_table(rows), [], args.json, args.markdown,
                  {"results": [dataclasses.asdict(r) for r in rows], "load_average": load})
    return 1 if any(r.note.startswith("error") for r in rows) else 0

if __name__ == "__main__":
    sys.exit(main())
