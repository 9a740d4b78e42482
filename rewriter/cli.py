"""The `rewriter` command line (also `python -m rewriter`).

Exit codes: 0 success; 2 bad input or usage (one clear line on stderr, nothing written);
1 internal error.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback

from passes.core.planner import DEFAULT_BLOCK_BUDGET, DEFAULT_KEY_CHUNK, DEFAULT_QUERY_CHUNK, TARGETS

__all__ = ["main"]


class UsageError(Exception):
    """Bad input from the user: reported as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage mistake reported as one line (like every other bad input) instead of
    the usage block followed by the error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class VerificationError(Exception):
    """--verify found the rewritten model different: nothing is written, exit code 1."""


def _log(args):
    """Where the human-readable lines go: stderr when stdout carries the JSON."""
    return (lambda line: print(line, file=sys.stderr)) if args.json else print


def _finish(args, lines: list[str], payload: dict) -> int:
    """Log `lines`, print `payload` as JSON when --json asked for it; exit status 0."""
    log = _log(args)
    for line in lines:
        log(line)
    if args.json:
        _print_json(payload)
    return 0


def _print_json(payload: dict) -> None:
    json.dump(payload, sys.stdout, indent=2)
    sys.stdout.write("\n")


def _demo(args) -> int:
    from rewriter.tools.demo import run_demo

    if args.threads < 1:
        raise UsageError(f"--threads must be positive, got {args.threads}")
    log = _log(args)
    result = run_demo(args.seq_len, args.threads, log=log)
    if args.json:
        _print_json(result.to_dict())
        return 0
    print(f"\nforward pass at sequence length {result.seq_len}, batch 1, {result.threads} threads, "
          "one call in a fresh process each:")
    print(f"  {'':26} {'extra peak memory':>17} {'time':>9}")
    pairs = (("PyTorch", "eager", result.eager, "rewritten", result.rewritten),
             ("ONNX Runtime", "as exported", result.onnx.exported, "optimized", result.onnx.optimized))
    for runtime, before_name, before, after_name, after in pairs:
        memory_ratio = before.extra_peak_bytes / max(after.extra_peak_bytes, 1)
        print(f"  {runtime:13}{before_name:13} {before.extra_peak_mib:>13.1f} MiB {before.seconds:>8.3f}s")
        print(f"  {'':13}{after_name:13} {after.extra_peak_mib:>13.1f} MiB {after.seconds:>8.3f}s"
              f"   {memory_ratio:.1f}x less memory, {after.seconds / before.seconds:.2f}x the time")
    return 0


def _load(path: str):
    from rewriter.onnx_io import ModelFileError, load_model

    try:
        return load_model(path)
    except ModelFileError as error:
        raise UsageError(str(error)) from None


def _chunk_size(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    parts = text.split(",")
    if len(parts) not in (1, 2) or not all(part.strip().isdigit() and int(part) > 0 for part in parts):
        raise UsageError(f"--chunk-size takes Q or Q,K (positive integers), got {text!r}")
    return int(parts[0]), int(parts[-1])


def _positive_int(text: str) -> int:
    """argparse type: a positive integer."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _memory_budget(text: str | None) -> int | None:
    from passes.core.planner import parse_size

    if text is None:
        return None
    try:
        return parse_size(text)
    except ValueError as error:
        raise UsageError(f"--memory-budget: {error}") from None


def _runnable(original):
    """`original` as ONNX Runtime and shape inference can read it: exported Performer einsums spelt out."""
    from passes.onnx.einsum_ellipsis import spelt_out

    return spelt_out(original)


def _compare_memory(original, optimized, seq_len: int, attention_symbols=()):
    """Peak-activation estimates of `original` (as `_runnable` gives it) and `optimized` at `seq_len`:
    the attention blocks' query/key lengths and dims named like a length take `seq_len`, other dims 1."""
    from rewriter.tools.memory_estimate import estimate_peak_activation_bytes, sequence_dims, symbolic_input_dims
    from rewriter.report import MemoryComparison

    dims = sequence_dims(original, seq_len, attention_symbols)
    before = estimate_peak_activation_bytes(original, dims)
    after = estimate_peak_activation_bytes(optimized, dims)
    others = tuple(name for name in symbolic_input_dims(original) if name not in dims)
    return MemoryComparison(dims, before.peak_bytes, after.peak_bytes, tuple(attention_symbols), others)


def _inspect(args) -> int:
    from rewriter.onnx_api import optimize_onnx

    model = _load(args.model)
    optimized, report = optimize_onnx(model, target=args.target, provider=args.provider)
    report.as_dry_run()  # nothing is written: each block is what `optimize` would make of it
    report.memory = _compare_memory(_runnable(model), optimized, args.seq_len, report.sequence_dims)
    if args.json:
        _print_json(report.to_dict())
    else:
        print(report.summary())
    return 0


def _optimize(args) -> int:
    from passes.onnx.lower_rewriter_ops import fallback_warnings_once

    with fallback_warnings_once():  # --verify lowers a copy again: each fallback is told once
        return _optimize_and_verify(args)


def _optimize_and_verify(args) -> int:
    from rewriter.onnx_api import optimize_onnx
    from rewriter.onnx_io import ModelFileError, check_output_path, save_model
    from rewriter.verify_blocks import verify_rewrite

    try:
        check_output_path(args.output, (args.model,))
    except ModelFileError as error:
        raise UsageError(str(error)) from None
    chunk_size, memory_budget = _chunk_size(args.chunk_size), _memory_budget(args.memory_budget)
    original = _load(args.model)
    log = _log(args)
    optimized, report = optimize_onnx(original, target=args.target, provider=args.provider,
                                      chunk_size=chunk_size, memory_budget=memory_budget)
    runnable = _runnable(original)
    report.memory = _compare_memory(runnable, optimized, args.seq_len, report.sequence_dims)
    log(report.summary())
    payload = report.to_dict()
    if args.verify:
        check = verify_rewrite(runnable, optimized, report, lambda chunks: optimize_onnx(
            original, target=args.target, provider=args.provider, chunk_size=chunks)[0])
        payload["verify"] = {"ok": check.ok, "max_abs_difference": check.max_abs_difference,
                             "lengths": list(check.lengths), "message": check.text,
                             "original_error": check.original_error}
        log(check.text)
        if check.original_error is not None:
            raise VerificationError("cannot verify: the original does not run on ONNX Runtime (above); nothing "
                                    "written (without --verify the rewritten model is written unchecked)")
        if not check.ok:
            raise VerificationError(f"rewritten model differs from the original: {check.text}; nothing written")
    try:
        save_model(optimized, args.output)
    except ModelFileError as error:
        raise UsageError(str(error)) from None
    return _finish(args, [f"wrote {args.output}"], payload)


def _export(args) -> int:
    """`rewriter export MODULE:CALLABLE | PROGRAM.pt2`: CALLABLE(seq_len) returns (model, example_inputs)."""
    import torch

    from rewriter.export import ExportVerificationError, export_onnx
    from rewriter.tools.model_source import ModelSourceError, call_factory, load_exported_program
    from rewriter.onnx_io import ModelFileError

    try:
        if args.spec.endswith(".pt2"):
            model, example_inputs, dynamic = load_exported_program(args.spec)
        else:
            sys.path.insert(0, "")  # MODULE may live in the working directory, as with `python -m`
            model, example_inputs = call_factory(args.spec, args.seq_len)
            model.eval()
            # axis 1 of every input of rank ≥ 2 is the sequence: one shared dim
            dynamic = tuple({1: torch.export.Dim.AUTO} if isinstance(x, torch.Tensor) and x.dim() >= 2 else None
                            for x in example_inputs)
    except ModelSourceError as error:
        raise UsageError(str(error)) from None
    if args.static:
        dynamic = None
    try:
        report = export_onnx(model, example_inputs, args.output, target=args.target, dynamic_shapes=dynamic,
                             opset=args.opset, verify=not args.no_verify)
    except ModelFileError as error:
        raise UsageError(str(error)) from None
    except ExportVerificationError as error:
        raise VerificationError(str(error)) from None
    return _finish(args, [report.summary(), f"wrote {args.output}"], report.to_dict())


def _bench(args) -> int:
    """`rewriter bench MODEL.onnx|MODULE:CALLABLE`: naive vs rewritten over --lengths, a child per point."""
    import os

    from rewriter.tools.bench import BenchInputError, bench_module, bench_onnx, terminal_progress
    from rewriter.tools.model_source import ModelSourceError
    from rewriter.onnx_io import ModelFileError, atomic_path

    lengths = _lengths(args.lengths)
    if args.threads < 1:
        raise UsageError(f"--threads must be at least 1 (got {args.threads})")
    if not os.path.isdir(args.out_dir):  # as `optimize -o`: a missing directory is refused, not made
        problem = "is not a directory" if os.path.exists(args.out_dir) else "directory does not exist"
        raise UsageError(f"--out-dir {args.out_dir}: {problem}")
    if os.path.isdir(args.model):
        raise UsageError(f"{args.model}: is a directory, not an ONNX file or MODULE:CALLABLE")
    is_onnx = args.model.endswith(".onnx") or os.path.isfile(args.model)
    if not is_onnx and ":" not in args.model:
        raise UsageError(f"{args.model}: no such file (give MODEL.onnx or MODULE:CALLABLE)")
    if not is_onnx and (args.dim or args.memory_limit):
        raise UsageError("--dim and --memory-limit apply to ONNX models only")
    if is_onnx and args.training:
        raise UsageError("--training applies to PyTorch models (MODULE:CALLABLE) only")
    progress = terminal_progress(sys.stderr)
    try:
        if is_onnx:
            result = bench_onnx(args.model, lengths, target=args.target, threads=args.threads, dims=_dims(args.dim),
                                memory_limit=_memory_limit(args.memory_limit), timeout_s=args.timeout,
                                progress=progress)
        else:
            sys.path.insert(0, "")  # MODULE may live in the working directory, as with `python -m`
            result = bench_module(args.model, lengths, threads=args.threads, training=args.training,
                                  timeout_s=args.timeout, progress=progress)
    except (BenchInputError, ModelFileError, ModelSourceError) as error:
        raise UsageError(str(error)) from None
    json_path, png_path = os.path.join(args.out_dir, "bench.json"), os.path.join(args.out_dir, "bench.png")
    with atomic_path(json_path) as json_tmp, atomic_path(png_path) as png_tmp:
        result.write_json(json_tmp)
        result.plot(png_tmp)
    return _finish(args, [result.table(), f"wrote {json_path} and {png_path}"], result.to_dict())


def _lengths(text: str) -> list[int]:
    parts = text.split(",")
    if not all(part.strip().isdigit() and int(part) > 0 for part in parts):
        raise UsageError(f"--lengths takes positive integers separated by commas, e.g. 1024,2048, got {text!r}")
    return [int(part) for part in parts]


def _memory_limit(text: str | None) -> int | None:
    from passes.core.planner import parse_size

    try:
        return None if text is None else parse_size(text)
    except ValueError as error:
        raise UsageError(f"--memory-limit: {error}") from None


def _dims(pairs: list[str] | None) -> dict[str, int]:
    dims = {}
    for pair in pairs or ():
        name, _, value = pair.partition("=")
        if not name or not value.strip().isdigit() or int(value) < 1:
            raise UsageError(f"--dim takes NAME=SIZE with a positive SIZE, got {pair!r}")
        dims[name] = int(value)
    return dims


def _add_target_options(command: argparse.ArgumentParser) -> None:
    command.add_argument("--target", choices=list(TARGETS), default="auto",
                         help="auto (default): per block the fastest memory-efficient form for --provider; "
                              "chunked: standard ONNX ops; ort: com.microsoft.MultiHeadAttention; "
                              "onnx-attention: opset-23 Attention")
    command.add_argument("--provider", choices=["cpu", "cuda"], default="cpu",
                         help="execution provider the model will run on (guides --target auto)")
    command.add_argument("--seq-len", type=_positive_int, default=4096, metavar="N",
                         help="sequence length at which to estimate peak activation memory: it binds every "
                              "symbolic dim that is an attention block's query/key length, and dims named like a "
                              "length; other symbolic dims are 1 (default 4096)")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="rewriter", description="Find attention in PyTorch and ONNX models and rewrite it into "
                                     "exact, memory-efficient equivalents.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what each pass does (stderr)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser(
        "demo", help="rewrite a built-in small transformer, verify it and measure memory and time",
        description="Builds a small GPT-style model and rewrites its attention in PyTorch; exports it to ONNX "
                    "and optimizes the file. Checks each rewrite against its original and measures the "
                    "forward memory and time of all four models in fresh processes. No downloads.")
    demo.add_argument("--seq-len", type=_positive_int, default=4096, help="sequence length (default %(default)s)")
    demo.add_argument("--threads", type=int, default=2,
                      help="threads of PyTorch and ONNX Runtime (default %(default)s)")
    demo.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    demo.set_defaults(run=_demo)

    inspect = commands.add_parser(
        "inspect", help="list the attention blocks of an ONNX model, and why any would be left alone",
        description="Detects every attention candidate in MODEL and reports what each would become.")
    inspect.add_argument("model", metavar="MODEL.onnx")
    _add_target_options(inspect)
    inspect.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    inspect.set_defaults(run=_inspect)

    optimize = commands.add_parser(
        "optimize", help="rewrite the attention of an ONNX model into memory-efficient forms",
        description="Rewrites every proven attention block of IN and writes OUT (IN is never modified; "
                    "OUT is written whole or not at all).")
    optimize.add_argument("model", metavar="IN.onnx")
    optimize.add_argument("-o", "--output", required=True, metavar="OUT.onnx")
    _add_target_options(optimize)
    optimize.add_argument("--chunk-size", metavar="Q[,K]",
                          help="queries (and keys) per block of the chunked form (default: the largest blocks up "
                               f"to {DEFAULT_QUERY_CHUNK},{DEFAULT_KEY_CHUNK} that fit --memory-budget)")
    optimize.add_argument("--memory-budget", metavar="SIZE",
                          help="working memory per block, e.g. 64MiB "
                               f"(default {DEFAULT_BLOCK_BUDGET // 2**20}MiB; ignored with --chunk-size)")
    optimize.add_argument("--verify", action="store_true",
                          help="run original and rewritten on ONNX Runtime with random inputs at length 1 and at "
                               "lengths spanning several blocks (with small blocks forced for the check where the "
                               "model's are large); fail if they differ")
    optimize.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    optimize.set_defaults(run=_optimize)

    export = commands.add_parser(
        "export", help="export a PyTorch model to ONNX with memory-efficient attention",
        description="Imports MODULE and calls CALLABLE(seq_len) to get (model, example_inputs), or loads a "
                    "program saved by torch.export.save (PROGRAM.pt2, with its example inputs); rewrites its "
                    "attention, exports it with a dynamic sequence axis (axis 1 of every input of rank >= 2; "
                    "for a .pt2, the axes that are dynamic in the program), checks ONNX Runtime against eager "
                    "and writes OUT (whole or not at all).")
    export.add_argument("spec", metavar="MODULE:CALLABLE|PROGRAM.pt2")
    export.add_argument("-o", "--output", required=True, metavar="OUT.onnx")
    export.add_argument("--seq-len", type=_positive_int, default=128, metavar="N",
                        help="example sequence length for CALLABLE (default 128)")
    export.add_argument("--target", choices=list(TARGETS), default="auto",
                        help="form of the attention in OUT (default auto)")
    export.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    export.add_argument("--static", action="store_true", help="export fixed input shapes")
    export.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime vs eager check")
    export.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    export.set_defaults(run=_export)

    bench = commands.add_parser(
        "bench", help="measure naive vs rewritten memory and time over a sweep of sequence lengths",
        description="Rewrites MODEL.onnx (or the PyTorch model that MODULE:CALLABLE(seq_len) returns as "
                    "(model, example_inputs)), then measures one inference of the original and of the rewrite "
                    "at each length, each in a fresh process (ONNX: ONNX Runtime CPU; PyTorch: eager vs "
                    "optimize_module). Prints a table and writes DIR/bench.json and DIR/bench.png. Symbolic "
                    "ONNX input dims: names with seq/len/tokens and other non-batch dims take the length, "
                    "'batch' names and dims seen only at axis 0 take 1; --dim overrides either.")
    bench.add_argument("model", metavar="MODEL.onnx|MODULE:CALLABLE")
    bench.add_argument("--lengths", default="1024,2048,4096", metavar="N,N,...",
                       help="sequence lengths (default 1024,2048,4096)")
    bench.add_argument("--target", choices=list(TARGETS), default="auto",
                       help="form of the rewritten ONNX attention (default auto)")
    bench.add_argument("--threads", type=int, default=2, help="intra-op threads per measurement (default 2)")
    bench.add_argument("--dim", action="append", metavar="NAME=SIZE",
                       help="fix a symbolic ONNX input dim, e.g. --dim batch=2 (repeatable)")
    bench.add_argument("--memory-limit", metavar="SIZE",
                       help="skip naive ONNX points whose peak-activation estimate exceeds SIZE "
                            "(default a quarter of the physical memory)")
    bench.add_argument("--training", action="store_true",
                       help="PyTorch: measure forward and backward instead of a no_grad forward")
    bench.add_argument("--timeout", type=float, default=1800, metavar="S",
                       help="seconds before a measurement is given up as failed (default 1800)")
    bench.add_argument("--out-dir", default=".", metavar="DIR", help="existing directory where bench.json and bench.png go (default .)")
    bench.add_argument("--json", action="store_true", help="print the result JSON on stdout (table on stderr)")
    bench.set_defaults(run=_bench)
    return parser


# Packages some commands need that the base install leaves out, and how to get them.
_OPTIONAL_PACKAGES = {"onnxruntime": "pip install 'attention-rewriter[cpu]' (or [gpu])"}


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except UsageError as error:
        print(f"rewriter: error: {error}", file=sys.stderr)
        return 2
    except VerificationError as error:
        print(f"rewriter: verification failed: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("rewriter: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # an internal error: one line, plus the traceback with -v
        if isinstance(error, ModuleNotFoundError) and error.name in _OPTIONAL_PACKAGES:
            print(f"rewriter: error: {args.command} needs {error.name}, which is not installed: "
                  f"{_OPTIONAL_PACKAGES[error.name]}", file=sys.stderr)
            return 2
        if args.verbose:
            traceback.print_exc()
        print(f"rewriter: internal error: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
