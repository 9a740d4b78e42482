"""Extra peak memory and time on CUDA: naive attention, SDPA and `rewriter::attention`; HF models; Performer.

All points run in this one process; before each, `torch.cuda.empty_cache()` and
`torch.cuda.reset_peak_memory_stats()`. Extra peak = `torch.cuda.max_memory_allocated()` during the
calls minus `torch.cuda.memory_allocated()` just before them (inputs and weights excluded); time =
median of `--repeats` calls timed by CUDA events, after one warm-up call. Sections (each in its own
try/except: an error is printed and the run goes on):

- attention: one layer, B=1, H=8, D=64, fp16 and fp32; "causal" (scores.masked_fill(~tril, −∞)) and
  "causal+padding" (the last n/8 keys padded: a mask program, so the op's blockwise path); n = 4096,
  16384, 65536; forward (no_grad) and forward+backward. `naive` is the module as written (skipped
  where its estimate passes 100 GiB), `sdpa` F.scaled_dot_product_attention with whichever backend
  PyTorch picks (is_causal, or the combined (n, n) bool mask the model would build), `rewritten`
  `rewriter.optimize_module` of the naive module at that length.
- hf: Hugging Face LLaMA (causal + padding) and T5 encoder from configs (benchmarks/hf_families.py:
  hidden 64, 4 heads, 2 layers, fp32), n = 16384, forward: `eager`, `sdpa`, and `rewritten` (of eager).
- performer: performer-pytorch's causal PerformerLM of benchmarks/performer_package.py (package as
  installed vs rewritten), forward+backward at L = 16384.

Ratios per point: memory naive/op and sdpa/op, time op/sdpa (`op` = rewritten). Points not started
within `--max-seconds` of the start are listed as skipped.

    PYTHONPATH=. python benchmarks/cuda_attention.py --json out.json        # ~3-6 minutes on an H200
    PYTHONPATH=. python benchmarks/cuda_attention.py --quick                 # small n, < 1 minute
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
import traceback
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

HEADS, HEAD_DIM = 8, 64
NAIVE_LIMIT_GIB = 100.0
SIZES, QUICK_SIZES = (4096, 16384, 65536), (1024, 2048)
MODEL_LENGTH, QUICK_MODEL_LENGTH = 16384, 2048
DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


@dataclasses.dataclass
class Point:
    section: str
    case: str
    dtype: str
    n: int
    mode: str  # forward, forward+backward
    impl: str  # naive/eager, sdpa, rewritten, package
    extra_peak_mib: float | None = None
    ms: float | None = None
    note: str = ""  # why nothing was measured: skipped, error


class CausalAttention(nn.Module):
    """softmax(q kᵀ / √d, causal) v as a model writes it; `padding` (1, n) bool keeps keys."""

    def forward(self, q, k, v, padding=None):
        length = q.size(-2)
        keep = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
        if padding is not None:
            keep = keep & padding[:, None, None, :]
        scores = (q @ k.transpose(-2, -1)) * q.size(-1) ** -0.5
        return scores.masked_fill(~keep, float("-inf")).softmax(-1) @ v


class SdpaAttention(nn.Module):
    def forward(self, q, k, v, padding=None):
        if padding is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        length = q.size(-2)
        keep = torch.ones(length, length, dtype=torch.bool, device=q.device).tril() & padding[:, None, None, :]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)


def measure(call: Callable[[], object], repeats: int) -> tuple[float, float]:
    """(extra peak MiB over the warm-up and timed calls, median ms of the timed calls)."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    call()  # warm-up: kernels load, autotuning, the allocator's first blocks
    times = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop))
    return (torch.cuda.max_memory_allocated() - before) / 2**20, statistics.median(times)


def _caller(module, inputs, backward: bool) -> Callable[[], None]:
    leaves = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]

    def call():
        for leaf in leaves:
            leaf.grad = None
        if backward:
            module(*inputs).float().sum().backward()
        else:
            with torch.no_grad():
                module(*inputs)
    return call


def _naive_estimate_gib(n: int, dtype: torch.dtype, backward: bool) -> float:
    """Scores, masked scores and probabilities (H·n² each), twice that with a backward, plus the n² masks."""
    copies = 6 if backward else 3
    return (HEADS * n * n * torch.finfo(dtype).bits // 8 * copies + 2 * n * n) / 2**30


def _layer_inputs(n: int, dtype: torch.dtype, padded: bool, backward: bool):
    generator = torch.Generator(device="cuda").manual_seed(n)
    q, k, v = (torch.randn(1, HEADS, n, HEAD_DIM, device="cuda", dtype=dtype, generator=generator).requires_grad_(backward)
               for _ in range(3))
    if not padded:
        return (q, k, v)
    padding = torch.ones(1, n, dtype=torch.bool, device="cuda")
    padding[:, n - n // 8:] = False
    return (q, k, v, padding)


def _rewritten(module: nn.Module, inputs, kwargs=None, blocks: int = 1) -> nn.Module:
    import rewriter

    gm, report = rewriter.optimize_module(module, tuple(inputs), example_kwargs=kwargs, dynamic_shapes=None)
    if report.rewritten_count != blocks:
        raise RuntimeError(f"expected {blocks} blocks rewritten: {report.summary()}")
    return gm


def attention_points(sizes, run) -> None:
    for dtype_name in ("fp16", "fp32"):
        dtype = DTYPES[dtype_name]
        for case in ("causal", "causal+padding"):
            for n in sizes:
                for backward in (False, True):
                    mode = "forward+backward" if backward else "forward"
                    for impl in ("naive", "sdpa", "rewritten"):
                        point = Point("attention", case, dtype_name, n, mode, impl)
                        if impl == "naive" and _naive_estimate_gib(n, dtype, backward) > NAIVE_LIMIT_GIB:
                            point.note = f"skipped (estimate {_naive_estimate_gib(n, dtype, backward):.0f} GiB)"
                            run(point, None)
                            continue

                        def prepare(n=n, dtype=dtype, case=case, backward=backward, impl=impl):
                            inputs = _layer_inputs(n, dtype, case != "causal", backward)
                            module = {"naive": CausalAttention, "sdpa": SdpaAttention}.get(impl, CausalAttention)()
                            if impl == "rewritten":
                                module = _rewritten(module, inputs)
                            return _caller(module, inputs, backward)
                        run(point, prepare)


def hf_points(length: int, run) -> None:
    import transformers  # noqa: F401  (ImportError: the section is skipped)

    from benchmarks.hf_families import NoSuchImplementation, build_model, padding_mask, token_ids

    ids = torch.from_numpy(token_ids(1, length)).cuda()
    mask = torch.from_numpy(padding_mask(1, length)).cuda()
    for family in ("llama", "t5"):
        for impl in ("eager", "sdpa", "rewritten"):
            point = Point("hf", family, "fp32", length, "forward", impl)

            def prepare(family=family, impl=impl):
                try:
                    model = build_model(family, "eager" if impl == "rewritten" else impl, length, length).cuda()
                except NoSuchImplementation as error:
                    raise _NotApplicable(str(error)) from None
                if impl == "rewritten":
                    gm = _rewritten(model, (ids,), {"attention_mask": mask}, blocks=2)
                    return _caller(lambda ids: gm(ids, attention_mask=mask)[0], (ids,), False)
                return _caller(lambda ids: model(input_ids=ids, attention_mask=mask)[0], (ids,), False)
            run(point, prepare)


def performer_points(length: int, run) -> None:
    import performer_pytorch  # noqa: F401  (ImportError: the section is skipped)

    from benchmarks.performer_package import _model

    for impl in ("package", "rewritten"):
        point = Point("performer", "causal PerformerLM", "fp32", length, "forward+backward", impl)

        def prepare(impl=impl):
            model, tokens = _model(length, rewritten=False)
            model, tokens = model.cuda(), tokens.cuda()
            if impl == "rewritten":
                model = _rewritten(model, (tokens,))
            return _caller(model, (tokens,), True)
        run(point, prepare)


class _NotApplicable(Exception):
    """The point does not exist in this environment (e.g. a model without an SDPA implementation)."""


def add_ratios(points: list[Point]) -> list[dict]:
    """Each point as a dict, with memory naive/op and sdpa/op and time op/sdpa on the rewritten rows."""
    rows = [dataclasses.asdict(point) for point in points]
    by_key = {(p.section, p.case, p.dtype, p.n, p.mode, p.impl): p for p in points}
    for row, point in zip(rows, points):
        if point.impl != "rewritten" or point.ms is None:
            continue
        key = (point.section, point.case, point.dtype, point.n, point.mode)
        naive = by_key.get(key + ("naive",)) or by_key.get(key + ("eager",)) or by_key.get(key + ("package",))
        sdpa = by_key.get(key + ("sdpa",))
        if naive is not None and naive.ms is not None:
            row["memory_naive_over_op"] = naive.extra_peak_mib / max(point.extra_peak_mib, 1e-3)
        if sdpa is not None and sdpa.ms is not None:
            row["memory_sdpa_over_op"] = sdpa.extra_peak_mib / max(point.extra_peak_mib, 1e-3)
            row["time_op_over_sdpa"] = point.ms / sdpa.ms
    return rows


def markdown(rows: list[dict]) -> str:
    def cell(value, spec):
        return "" if value is None else format(value, spec)

    lines = ["| section | case | dtype | n | mode | impl | extra peak MiB | ms | mem naive/op | mem sdpa/op | time op/sdpa |",
             "|---|---|---|---:|---|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        memory = row["note"] or cell(row["extra_peak_mib"], ".1f")
        lines.append(f"| {row['section']} | {row['case']} | {row['dtype']} | {row['n']} | {row['mode']} | {row['impl']} "
                     f"| {memory} | {cell(row['ms'], '.2f')} | {cell(row.get('memory_naive_over_op'), '.1f')} "
                     f"| {cell(row.get('memory_sdpa_over_op'), '.1f')} | {cell(row.get('time_op_over_sdpa'), '.2f')} |")
    return "\n".join(lines)


def write_json(path: str, points: list[Point]) -> None:
    with open(path, "w") as file:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "points": add_ratios(points)},
                  file, indent=1)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the points (with ratios) to this JSON file")
    parser.add_argument("--quick", action="store_true", help=f"n = {QUICK_SIZES}, models at {QUICK_MODEL_LENGTH}")
    parser.add_argument("--max-seconds", type=float, default=330.0,
                        help="start no point after this many seconds (default 330)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per point after the warm-up (default 3)")
    parser.add_argument("--sections", nargs="+", default=["hf", "performer", "attention"],
                        choices=["attention", "hf", "performer"], help="which, in this order (default: the short ones first)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print(f"cuda_attention: no CUDA device (torch {torch.__version__}, built for CUDA {torch.version.cuda}); "
              "this benchmark needs a GPU", file=sys.stderr)
        return 2
    started = time.monotonic()
    points: list[Point] = []

    def run(point: Point, prepare) -> None:
        points.append(point)
        if prepare is not None and time.monotonic() - started > args.max_seconds:
            point.note = f"skipped (past --max-seconds {args.max_seconds:.0f})"
        elif prepare is not None:
            try:
                point.extra_peak_mib, point.ms = measure(prepare(), args.repeats)
            except _NotApplicable as error:
                point.note = f"n/a: {error}"
            except torch.cuda.OutOfMemoryError:
                point.note = "out of memory"
            except Exception as error:  # noqa: BLE001  (one point's failure must not stop the others)
                point.note = f"error: {type(error).__name__}: {str(error).splitlines()[0][:120] if str(error) else ''}"
                traceback.print_exc(file=sys.stderr)
            torch.cuda.empty_cache()
        if args.json:  # after every point, so that a run stopped from outside leaves what it measured
            write_json(args.json, points)
        figures = point.note or f"{point.extra_peak_mib:.1f} MiB, {point.ms:.2f} ms"
        print(f"{point.section} {point.case} {point.dtype} n={point.n} {point.mode} {point.impl}: {figures}",
              file=sys.stderr, flush=True)

    sizes = QUICK_SIZES if args.quick else SIZES
    model_length = QUICK_MODEL_LENGTH if args.quick else MODEL_LENGTH
    sections = {"attention": lambda: attention_points(sizes, run), "hf": lambda: hf_points(model_length, run),
                "performer": lambda: performer_points(model_length, run)}
    for name in args.sections:
        try:
            sections[name]()
        except ImportError as error:
            print(f"section {name} skipped: {error}", file=sys.stderr)
        except Exception:  # noqa: BLE001  (a section's failure must not stop the others)
            print(f"section {name} failed:", file=sys.stderr)
            traceback.print_exc(file=sys.stderr)
    if args.json:
        write_json(args.json, points)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {time.monotonic() - started:.0f} s\n")
    print(markdown(add_ratios(points)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
