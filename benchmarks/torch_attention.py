"""Memory and time of naive attention, its rewritten form, and PyTorch SDPA, on CPU.

For batch 1, 2 heads, head dim 64, fp32 and 2 threads, it measures three attention variants
written naively as eager `nn.Module`s:

    plain          softmax(q·kᵀ·scale) · v
    causal         the same with scores.masked_fill(~tril, -inf), the tril mask built in forward
    softcap+bias   30·tanh(q·kᵀ·scale / 30) + a (1, 1, 1, L) padding-style bias input, which SDPA
                   cannot express

each in inference (no_grad forward) and training (forward + backward of out.sum()), with three
implementations: `naive` (the module as written), `rewritten` (the GraphModule returned by
`rewriter.optimize_module`) and `sdpa` (F.scaled_dot_product_attention; n/a for softcap+bias).

Every measurement runs in a fresh subprocess, which warms its implementation up at n=256, builds
the inputs and module at the target n (the rewrite included), then times one call and records its
extra peak RSS: VmHWM during the call (reset beforehand through /proc/self/clear_refs) minus VmRSS
just before it. A naive child estimated to need more than 20 GiB is skipped. The parent prints a
table, checks the targets (exit status 1 if one fails) and warns when the machine was busy: times
are wall-clock times of a single call, so other load on the 2 cores skews them.

    PYTHONPATH=. python benchmarks/torch_attention.py            # full run: 5-7 minutes
    PYTHONPATH=. python benchmarks/torch_attention.py --quick    # n = 1024, 2048: ~2 minutes,
                                                                 # mostly 36 imports of torch
    PYTHONPATH=. python benchmarks/torch_attention.py --sizes 4096 --variants causal \\
        --impls naive rewritten --json out.json --markdown out.md
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

import rewriter
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
from rewriter.tools.measure import measure_call

BATCH, HEADS, HEAD_DIM = 1, 2, 64
THREADS = 2
SOFTCAP = 30.0
WARMUP_N = 256
VARIANTS = ("plain", "causal", "softcap+bias")
MODES = ("inference", "training")
IMPLS = ("naive", "rewritten", "sdpa")
DEFAULT_SIZES = {"inference": (4096, 16384), "training": (4096, 8192)}
QUICK_SIZES = (1024, 2048)
# A naive child's peak is about this many (B, H, n, n) fp32 score tensors (measured, rounded up);
# children estimated above MAX_CHILD_GIB are skipped.
NAIVE_SCORE_COPIES = {"inference": 3.5, "training": 6}
MAX_CHILD_GIB = 20
CHILD_TIMEOUT_S = 600


# --------------------------------------------------------------------------- the modules


class PlainAttention(nn.Module):
    def forward(self, q, k, v):
        scores = q @ k.transpose(-2, -1) * q.size(-1) ** -0.5
        return scores.softmax(-1) @ v


class CausalAttention(nn.Module):
    def forward(self, q, k, v):
        length = q.size(-2)
        keep = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
        scores = q @ k.transpose(-2, -1) * q.size(-1) ** -0.5
        scores = scores.masked_fill(~keep, float("-inf"))
        return scores.softmax(-1) @ v


class SoftcapBiasAttention(nn.Module):
    def forward(self, q, k, v, bias):
        scores = q @ k.transpose(-2, -1) * q.size(-1) ** -0.5
        scores = SOFTCAP * torch.tanh(scores / SOFTCAP)
        return (scores + bias).softmax(-1) @ v


class SdpaAttention(nn.Module):
    def __init__(self, causal: bool):
        super().__init__()
        self.causal = causal

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)


NAIVE_MODULES = {
    "plain": PlainAttention, "causal": CausalAttention, "softcap+bias": SoftcapBiasAttention,
}


def sdpa_supports(variant: str) -> bool:
    return variant != "softcap+bias"


# --------------------------------------------------------------------------- child: one measurement


def make_inputs(variant: str, n: int, requires_grad: bool) -> tuple[torch.Tensor, ...]:
    torch.manual_seed(0)
    q, k, v = (
        torch.randn(BATCH, HEADS, n, HEAD_DIM).requires_grad_(requires_grad) for _ in range(3)
    )
    if variant != "softcap+bias":
        return q, k, v
    bias = torch.zeros(1, 1, 1, n)
    bias[..., n - n // 8 :] = torch.finfo(bias.dtype).min  # the last eighth of the keys is padding
    return q, k, v, bias


def build_module(variant: str, impl: str, inputs: tuple[torch.Tensor, ...]) -> nn.Module:
    if impl == "sdpa":
        return SdpaAttention(causal=variant == "causal")
    module = NAIVE_MODULES[variant]()
    if impl == "naive":
        return module
    rewritten, report = rewriter.optimize_module(module, inputs, dynamic_shapes=None)  # one length per run
    if not any(match.rewritten for match in report.matches):
        raise RuntimeError(f"optimize_module rewrote nothing: {report.summary()}")
    return rewritten


def prepare_call(variant: str, mode: str, n: int, impl: str) -> Callable[[], None]:
    """Inputs and module at size n, and the call to measure on them."""
    inputs = make_inputs(variant, n, requires_grad=mode == "training")
    module = build_module(variant, impl, inputs)
    if mode == "training":
        return lambda: module(*inputs).sum().backward()

    def infer():
        with torch.no_grad():
            module(*inputs)

    return infer


def measure(variant: str, mode: str, n: int, impl: str) -> dict:
    torch.set_num_threads(THREADS)
    prepare_call(variant, mode, WARMUP_N, impl)()  # loads kernels and starts the thread pool
    measured = measure_call(prepare_call(variant, mode, n, impl))
    return {"extra_peak_mib": measured.extra_peak_mib, "seconds": measured.seconds,
            "cpu_seconds": measured.cpu_seconds}


# --------------------------------------------------------------------------- parent: the sweep


@dataclasses.dataclass
class Row(PointFigures):
    variant: str
    mode: str
    n: int
    impl: str


@dataclasses.dataclass(frozen=True)
class Target:
    variant: str
    mode: str
    n: int
    min_memory_ratio: float
    max_time_ratio: float


TARGETS = (
    Target("plain", "inference", 16384, min_memory_ratio=100, max_time_ratio=0.2),
    Target("causal", "inference", 16384, min_memory_ratio=100, max_time_ratio=0.2),
    Target("plain", "training", 8192, min_memory_ratio=30, max_time_ratio=0.5),
    Target("causal", "training", 8192, min_memory_ratio=30, max_time_ratio=0.5),
    Target("softcap+bias", "inference", 16384, min_memory_ratio=20, max_time_ratio=1.0),
    Target("softcap+bias", "training", 8192, min_memory_ratio=20, max_time_ratio=1.0),
)


def naive_estimate_gib(mode: str, n: int) -> float:
    return NAIVE_SCORE_COPIES[mode] * BATCH * HEADS * n * n * 4 / 2**30


def run_child(variant: str, mode: str, n: int, impl: str) -> Row:
    row = Row(variant, mode, n, impl)
    if impl == "sdpa" and not sdpa_supports(variant):
        row.note = "n/a"
        return row
    if impl == "naive" and naive_estimate_gib(mode, n) > MAX_CHILD_GIB:
        row.note = f"skipped (~{naive_estimate_gib(mode, n):.0f} GiB)"
        return row
    command = [sys.executable, __file__, "--one", variant, mode, str(n), impl]
    fill_from_child(row, command, CHILD_TIMEOUT_S)
    return row


def add_ratios(rows: list[Row]) -> None:
    naive = {(r.variant, r.mode, r.n): r for r in rows if r.impl == "naive" and r.measured}
    for row in rows:
        set_ratios(row, naive.get((row.variant, row.mode, row.n)))


def sweep(variants, modes, sizes, impls) -> list[Row]:
    rows = []
    for variant in variants:
        for mode in modes:
            for n in sizes[mode]:
                for impl in impls:
                    row = run_child(variant, mode, n, impl)
                    print(f"{variant:>12} {mode:>9} n={n:<6} {impl:>9}: {point_line(row)}",
                          file=sys.stderr, flush=True)
                    rows.append(row)
    add_ratios(rows)
    return rows


def check_targets(rows: list[Row]) -> list[tuple[str, str]]:
    """(PASS | FAIL | SKIP, description) per target line."""
    by_key = {(r.variant, r.mode, r.n, r.impl): r for r in rows}
    return [judge(f"{t.mode} n={t.n} {t.variant}: rewritten ≥{t.min_memory_ratio:g}x less memory,"
                  f" ≤{t.max_time_ratio:g}x time", by_key.get((t.variant, t.mode, t.n, "naive")),
                  by_key.get((t.variant, t.mode, t.n, "rewritten")), t.min_memory_ratio, t.max_time_ratio)
            for t in TARGETS]


def markdown_table(rows: list[Row]) -> str:
    lines = [
        "| variant | mode | n | impl | extra peak MiB | time s"
        " | memory ratio (naive/impl) | time ratio (impl/naive) |",
        "|---|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.variant} | {r.mode} | {r.n} | {r.impl} | {memory_cell(r)} | {fmt(r.seconds, '.3f')} "
            f"| {fmt(r.memory_ratio, '.1f')} | {fmt(r.time_ratio, '.3f')} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", help="sequence lengths for both modes")
    quick_sizes = " ".join(map(str, QUICK_SIZES))
    parser.add_argument("--quick", action="store_true", help=f"same as --sizes {quick_sizes}")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    parser.add_argument("--markdown", metavar="PATH", help="write the table and targets as markdown")
    parser.add_argument("--one", nargs=4, metavar=("VARIANT", "MODE", "N", "IMPL"),
                        help=argparse.SUPPRESS)  # a child: measure one point, print JSON
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.one:
        variant, mode, n, impl = args.one
        print(json.dumps(measure(variant, mode, int(n), impl)))
        return 0
    sizes = dict(DEFAULT_SIZES)
    if args.quick or args.sizes:
        sizes = {mode: tuple(args.sizes or QUICK_SIZES) for mode in MODES}
    warn_if_busy("before starting")
    rows = sweep(args.variants, args.modes, sizes, args.impls)
    return write_outputs(markdown_table(rows), check_targets(rows), args.json, args.markdown,
                         {"results": [dataclasses.asdict(r) for r in rows]})

if __name__ == "__main__":
    sys.exit(main())
