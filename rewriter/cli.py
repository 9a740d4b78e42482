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

__all__ = ["main"]


class UsageError(Exception):
    """Bad input from the user: reported as one line, exit code 2."""


def _print_json(payload: dict) -> None:
    json.dump(payload, sys.stdout, indent=2)
    sys.stdout.write("\n")


def _demo(args) -> int:
    from rewriter.demo import run_demo

    if args.seq_len < 1:
        raise UsageError(f"--seq-len must be positive, got {args.seq_len}")
    log = (lambda line: print(line, file=sys.stderr)) if args.json else print
    result = run_demo(args.seq_len, args.threads, log=log)
    if args.json:
        _print_json(result.to_dict())
        return 0
    print(f"\nforward at sequence length {result.seq_len}, {args.threads} threads (fresh process each):")
    print(f"  {'':10} {'extra peak memory':>18} {'time':>9}")
    for name, measured in (("eager", result.eager), ("rewritten", result.rewritten)):
        print(f"  {name:10} {measured.extra_peak_mib:>14.1f} MiB {measured.seconds:>8.3f}s")
    ratio = result.eager.extra_peak_bytes / max(result.rewritten.extra_peak_bytes, 1)
    print(f"  memory {ratio:.1f}x lower, time {result.rewritten.seconds / result.eager.seconds:.2f}x of eager")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rewriter", description="Find attention in PyTorch and ONNX models and rewrite it into "
                                     "exact, memory-efficient equivalents.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what each pass does (stderr)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser(
        "demo", help="rewrite a built-in small transformer, verify it and measure memory and time",
        description="Builds a small GPT-style model, rewrites its attention, checks the outputs against "
                    "eager and measures forward memory and time of both in fresh processes.")
    demo.add_argument("--seq-len", type=int, default=4096, help="sequence length (default 4096)")
    demo.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    demo.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    demo.set_defaults(run=_demo)
    return parser


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
    except KeyboardInterrupt:
        print("rewriter: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # an internal error: one line, plus the traceback with -v
        if args.verbose:
            traceback.print_exc()
        print(f"rewriter: internal error: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
