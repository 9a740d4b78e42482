"""Memory and time of attention in ONNX models on ONNX Runtime (CPU): as exported, and rewritten.

Batch 1, 2 heads, head dim 64, fp32, ONNX Runtime's CPU execution provider with 2 intra-op
threads (1 inter-op thread). Three attention variants are tiny `nn.Module`s calling
`F.scaled_dot_product_attention` on inputs q, k, v of shape (1, 2, n, 64):

    plain    SDPA
    causal   SDPA with is_causal=True
    masked   SDPA with attn_mask = a boolean key-padding mask input of shape (1, n), broadcast to
             (1, 1, 1, n) inside forward (the Hugging Face way); it keeps the first 7/8 of the keys

Each is exported once, in this process, with `torch.onnx.export(dynamo=True, opset_version=18)` and
a dynamic sequence dimension, so one file serves every n. That file is `naive` (the exporter writes
SDPA as MatMul / Softmax / MatMul and materialises the n×n scores); then
`rewriter.optimize_onnx(model, target=T)` writes one file per target T in auto, chunked, ort and
onnx-attention. A target that rewrote nothing is shown as "n/a (the report's reason)". Every
rewritten file is checked against `naive` on ORT at n = CHECK_N before anything is measured.

Every measurement runs in a fresh subprocess (which imports onnxruntime and numpy, not torch): it
creates the InferenceSession, runs it once at n = 256 as a warm-up, builds the inputs at n, and then
`rewriter.tools.measure.measure_call` records one `session.run`: its wall time and its extra peak RSS
(VmHWM during the call, reset through /proc/self/clear_refs after malloc_trim, minus VmRSS just
before). Session options other than the thread counts keep ORT's defaults, which is what users get.
In particular the CPU memory arena stays on: it keeps what it allocated across runs, so the
warm-up at n = 256 pre-grows it only a little and the measured call's peak includes the arena
growing to the size that call needs (the first call at a new, larger n costs the same). A child
estimated to need more than 20 GiB is skipped.

The parent prints a table (stdout; progress goes to stderr), PASS/FAIL lines for the targets at
n = 16384 (`auto` ≥ 100x less extra memory than naive and ≤ 0.15x its time; `chunked` ≥ 30x and
≤ 0.5x; for all three variants) and exits with status 1 when one fails. Times are wall-clock times
of a single call, so other load on the 2 cores skews them; the CPU-seconds column barely moves.

    PYTHONPATH=. python benchmarks/onnx_attention.py            # n = 4096, 16384: ~5 minutes
    PYTHONPATH=. python benchmarks/onnx_attention.py --quick    # n = 1024, 2048: ~1 minute
    PYTHONPATH=. python benchmarks/onnx_attention.py --sizes 8192 --variants causal \\
        --impls naive chunked --json out.json --markdown out.md --model-dir /tmp/models
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import io
import json
import logging
import os
import sys
import tempfile
import warnings

import numpy as np

from child_points import (
    PointFigures,
    fill_from_child,
    fmt,
    judge,
    memory_cell,
    point_line,
    set_ratios,
    warn_if_busy,
    write_outputs,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BATCH, HEADS, HEAD_DIM = 1, 2, 64
THREADS = 2
WARMUP_N = 256
CHECK_N = 1100  # the correctness check: more than one 1024-query chunk, not a multiple of it
CHECK_TOLERANCE = 1e-4
KEEP_FRACTION = 7 / 8  # the masked variant keeps the first 7/8 of the keys
VARIANTS = ("plain", "causal", "masked")
TARGET_IMPLS = ("auto", "chunked", "ort", "onnx-attention")
IMPLS = ("naive",) + TARGET_IMPLS
DEFAULT_SIZES = (4096, 16384)
QUICK_SIZES = (1024, 2048)
# A child's extra peak in copies of the (B, H, n, n) fp32 score tensor (measured on ORT 1.32 CPU,
# rounded up); rewrites that do not materialise the scores are not estimated. Children estimated
# above MAX_CHILD_GIB are skipped.
NAIVE_SCORE_COPIES = {"plain": 2.5, "causal": 4.5, "masked": 5.5}
FUSED_SCORE_COPIES = 2.5  # MultiHeadAttention off its flash path, opset-23 Attention
MAX_CHILD_GIB = 20
CHILD_TIMEOUT_S = 600


# --------------------------------------------------------------------------- child: one measurement


def _measure_call():
    """`rewriter.tools.measure.measure_call`, loaded from its file: the `rewriter` package imports torch,
    which a child running only ONNX Runtime does not need."""
    spec = importlib.util.spec_from_file_location("_rewriter_measure", os.path.join(ROOT, "rewriter", "tools", "measure.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses looks its module up while building Measurement
    spec.loader.exec_module(module)
    return module.measure_call


def make_feeds(variant: str, n: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds = {name: rng.standard_normal((BATCH, HEADS, n, HEAD_DIM), dtype=np.float32) for name in "qkv"}
    if variant == "masked":
        mask = np.zeros((BATCH, n), dtype=bool)
        mask[:, : max(1, int(n * KEEP_FRACTION))] = True  # padding at the end
        feeds["mask"] = mask
    return feeds


def make_session(path: str):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def measure(path: str, variant: str, n: int) -> dict:
    measure_call = _measure_call()
    session = make_session(path)
    session.run(None, make_feeds(variant, WARMUP_N))  # loads kernels, starts the thread pool
    feeds = make_feeds(variant, n)
    measured = measure_call(lambda: session.run(None, feeds))
    return {"extra_peak_mib": measured.extra_peak_mib, "seconds": measured.seconds,
            "cpu_seconds": measured.cpu_seconds}


# --------------------------------------------------------------------------- parent: the models


def _attention_modules():
    import torch.nn.functional as F
    from torch import nn

    class Plain(nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v)

    class Causal(nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    class Masked(nn.Module):
        def forward(self, q, k, v, mask):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])

    return {"plain": Plain, "causal": Causal, "masked": Masked}


def export_model(variant: str, path: str) -> None:
    """The variant's module exported by torch's dynamo exporter, sequence length dynamic."""
    import torch

    n = WARMUP_N
    inputs = tuple(torch.randn(BATCH, HEADS, n, HEAD_DIM) for _ in range(3))
    seq = torch.export.Dim("seq", min=2, max=1 << 20)
    dynamic_shapes = {"q": {2: seq}, "k": {2: seq}, "v": {2: seq}}
    names = ["q", "k", "v"]
    if variant == "masked":
        inputs += (torch.ones(BATCH, n, dtype=torch.bool),)
        dynamic_shapes["mask"] = {1: seq}
        names.append("mask")
    module = _attention_modules()[variant]().eval()
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed" lines
    # The exporter reports progress on stdout and warns a lot; stdout carries the table.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, inputs, dynamo=True, opset_version=18, dynamic_shapes=dynamic_shapes,
                                    input_names=names, output_names=["out"], verbose=False)
    program.save(path)


@dataclasses.dataclass
class Model:
    variant: str
    impl: str
    path: str | None  # None: the target rewrote nothing
    became: str = ""  # what the rewrite produced (targets and chunk sizes), or why nothing
    check_error: float | None = None  # max |rewritten - naive| at CHECK_N


def _describe(report) -> str:
    parts = []
    for match in report.matches:
        if match.rewritten:
            chunks = f" {match.chunk_sizes[0]}x{match.chunk_sizes[1]}" if match.chunk_sizes else ""
            parts.append(f"{match.target}{chunks}")
        else:
            parts.append(f"not rewritten: {match.reason}")
    return "; ".join(parts) or "no attention found"


def build_models(variants, impls, directory: str) -> dict[tuple[str, str], Model]:
    """Export each variant once and write one rewritten file per target."""
    import onnx

    from rewriter.onnx_api import optimize_onnx

    logging.getLogger("rewriter").setLevel(logging.WARNING)
    models = {}
    for variant in variants:
        naive_path = os.path.join(directory, f"{variant}-naive.onnx")
        print(f"exporting {variant} ...", file=sys.stderr, flush=True)
        export_model(variant, naive_path)
        models[variant, "naive"] = Model(variant, "naive", naive_path, "as exported")
        for impl in impls:
            if impl == "naive":
                continue
            proto, report = optimize_onnx(naive_path, target=impl)
            if report.rewritten_count == 0:
                reasons = "; ".join(m.reason or "not rewritten" for m in report.matches) or "no attention found"
                models[variant, impl] = Model(variant, impl, None, reasons)
            else:
                path = os.path.join(directory, f"{variant}-{impl}.onnx")
                onnx.save(proto, path)
                models[variant, impl] = Model(variant, impl, path, _describe(report))
    check_models(models)
    for (variant, impl), model in models.items():
        if impl != "naive":
            check = "" if model.check_error is None else f" (max |diff| from naive at n={CHECK_N}: {model.check_error:.2g})"
            print(f"{variant:>6} {impl:>14}: {model.became}{check}", file=sys.stderr, flush=True)
    return models


def check_models(models: dict[tuple[str, str], Model]) -> None:
    """Max abs difference of every rewritten model from its naive model, at CHECK_N."""
    for (variant, impl), model in models.items():
        if impl == "naive" or model.path is None:
            continue
        feeds = make_feeds(variant, CHECK_N)
        reference = make_session(models[variant, "naive"].path).run(None, feeds)[0]
        output = make_session(model.path).run(None, feeds)[0]
        model.check_error = float(np.max(np.abs(output - reference)))


# --------------------------------------------------------------------------- parent: the sweep


@dataclasses.dataclass
class Row(PointFigures):
    variant: str
    impl: str
    n: int
    became: str = ""


@dataclasses.dataclass(frozen=True)
class Target:
    variant: str
    impl: str
    n: int
    min_memory_ratio: float
    max_time_ratio: float


TARGET_N = 16384
TARGETS = tuple(Target(variant, "auto", TARGET_N, 100, 0.15) for variant in VARIANTS) + tuple(
    Target(variant, "chunked", TARGET_N, 30, 0.5) for variant in VARIANTS
)


def estimate_gib(model: Model, n: int) -> float:
    score_gib = BATCH * HEADS * n * n * 4 / 2**30
    if model.impl == "naive":
        return NAIVE_SCORE_COPIES[model.variant] * score_gib
    flash = model.variant == "plain" and "MultiHeadAttention" in model.became
    materialises = ("MultiHeadAttention" in model.became and not flash) or "Attention-23" in model.became
    return FUSED_SCORE_COPIES * score_gib if materialises else 0.0


def run_child(model: Model, n: int) -> Row:
    row = Row(model.variant, model.impl, n, became=model.became)
    if model.path is None:
        row.note = f"n/a ({model.became})"
        return row
    if model.check_error is not None and not model.check_error <= CHECK_TOLERANCE:
        row.note = f"error: output differs from naive by {model.check_error:.3g} at n={CHECK_N}"
        return row
    estimate = estimate_gib(model, n)
    if estimate > MAX_CHILD_GIB:
        row.note = f"skipped (~{estimate:.0f} GiB)"
        return row
    command = [sys.executable, os.path.abspath(__file__), "--one", model.path, model.variant, str(n)]
    fill_from_child(row, command, CHILD_TIMEOUT_S)
    return row


def add_ratios(rows: list[Row]) -> None:
    naive = {(r.variant, r.n): r for r in rows if r.impl == "naive" and r.measured}
    for row in rows:
        set_ratios(row, naive.get((row.variant, row.n)))


def sweep(models: dict[tuple[str, str], Model], variants, sizes, impls) -> list[Row]:
    rows = []
    for variant in variants:
        for n in sizes:
            for impl in impls:
                row = run_child(models[variant, impl], n)
                print(f"{variant:>6} n={n:<6} {impl:>14}: {point_line(row)}", file=sys.stderr, flush=True)
                rows.append(row)
    add_ratios(rows)
    return rows


def check_targets(rows: list[Row]) -> list[tuple[str, str]]:
    """(PASS | FAIL | SKIP, description) per target line."""
    by_key = {(r.variant, r.n, r.impl): r for r in rows}
    verdicts = []
    for t in TARGETS:
        goal = (f"n={t.n} {t.variant}: {t.impl} ≥{t.min_memory_ratio:g}x less memory than naive,"
                f" ≤{t.max_time_ratio:g}x time")
        rewritten = by_key.get((t.variant, t.n, t.impl))
        verdicts.append(judge(goal, by_key.get((t.variant, t.n, "naive")), rewritten, t.min_memory_ratio,
                              t.max_time_ratio, ".3f", f" ({rewritten.became})" if rewritten else ""))
    return verdicts


def markdown_table(rows: list[Row]) -> str:
    lines = [
        "| variant | impl | n | extra peak MiB | time s | CPU s"
        " | memory ratio (naive/impl) | time ratio (impl/naive) | rewritten to |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        became = "" if r.impl == "naive" or r.became in r.note else r.became
        lines.append(
            f"| {r.variant} | {r.impl} | {r.n} | {memory_cell(r)} | {fmt(r.seconds, '.3f')} | {fmt(r.cpu_seconds, '.2f')} "
            f"| {fmt(r.memory_ratio, '.1f')} | {fmt(r.time_ratio, '.3f')} | {became} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", help="sequence lengths (default: %(default)s)")
    quick_sizes = " ".join(map(str, QUICK_SIZES))
    parser.add_argument("--quick", action="store_true", help=f"same as --sizes {quick_sizes}")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS),
                        help="naive is always measured too when a ratio needs it")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    parser.add_argument("--markdown", metavar="PATH", help="write the table and targets as markdown")
    parser.add_argument("--model-dir", metavar="DIR", help="keep the .onnx files here (default: a temp dir)")
    parser.add_argument("--one", nargs=3, metavar=("MODEL", "VARIANT", "N"),
                        help=argparse.SUPPRESS)  # a child: measure one point, print JSON
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.one:
        path, variant, n = args.one
        print(json.dumps(measure(path, variant, int(n))))
        return 0
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    sizes = tuple(args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES))
    impls = ["naive"] + [impl for impl in args.impls if impl != "naive"]
    load_before = warn_if_busy("before starting")
    with contextlib.ExitStack() as stack:
        directory = args.model_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="onnx-attention-"))
        os.makedirs(directory, exist_ok=True)
        models = build_models(args.variants, impls, directory)
        rows = sweep(models, args.variants, sizes, impls)
    load_after = warn_if_busy("at the end")
    import onnxruntime

    config = {"batch": BATCH, "heads": HEADS, "head_dim": HEAD_DIM, "threads": THREADS,
              "onnxruntime": onnxruntime.__version__, "load_average": [load_before, load_after]}
    return write_outputs(markdown_table(rows), check_targets(rows), args.json, args.markdown,
                         {"config": config, "models": [dataclasses.asdict(m) for m in models.values()],
                          "results": [dataclasses.asdict(r) for r in rows]})

if __name__ == "__main__":
    sys.exit(main())
