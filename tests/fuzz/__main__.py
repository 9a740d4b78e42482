"""`python -m tests.fuzz --cases N [--seed S] [--onnx-every K]`: run the differential fuzzer."""

from __future__ import annotations

import argparse
import collections
import logging
import sys
import time

from .campaign import run_campaign

_FAILURES = ("wrong", "crashed")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__)
    parser.add_argument("--cases", type=int, default=200, help="how many programs to generate")
    parser.add_argument("--seed", type=int, default=0, help="hypothesis seed (same seed, same cases)")
    parser.add_argument("--onnx-every", type=int, default=20, help="also compare every K-th case on ORT (0: never)")
    parser.add_argument("--show", choices=["failures", "all"], default="failures", help="which cases to print")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    started = time.monotonic()

    counts = collections.Counter()

    def report(case, outcome):
        if args.show == "all" or outcome.kind in _FAILURES:
            print(f"{outcome.kind}: {outcome.detail}\n    {case}", flush=True)
        done = sum(n for kind, n in counts.items() if not kind.startswith("onnx_"))
        if done % 100 == 0 and outcome is not None:
            print(f"... {done} cases: {dict(counts)}", flush=True)

    try:
        run_campaign(args.cases, args.seed, args.onnx_every, report, counts)
    except KeyboardInterrupt:  # stopped early: report what ran
        print("interrupted", flush=True)
    fx = {kind: counts[kind] for kind in ("rewritten", "left_alone", "wrong", "crashed", "eager_inexact", "invalid")}
    onnx = {kind: counts["onnx_" + kind] for kind in fx}
    print(f"{sum(fx.values())} cases in {time.monotonic() - started:.0f} s (seed {args.seed})")
    print("fx:   " + ", ".join(f"{kind.replace('_', ' ')} {n}" for kind, n in fx.items()))
    print("onnx: " + ", ".join(f"{kind.replace('_', ' ')} {n}" for kind, n in onnx.items()))
    return 1 if any(counts[kind] + counts["onnx_" + kind] for kind in _FAILURES) else 0


if __name__ == "__main__":
    sys.exit(main())
