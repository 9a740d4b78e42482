"""Memory and time of causal Performer attention: naive cumsum, hand-chunked, our op; performer-pytorch itself.

Batch 1, 2 heads, head dim 64, M = 256 random features, fp32, 2 threads. Each implementation is
the whole attention block, feature map included (performer-pytorch `softmax_kernel`, D^-¼ input
scaling, ε = 1e-4, detached stabiliser):

    naive     φ(Q), φ(K), then `causal_linear_attention_noncuda`:
              einsum('...nd,...ne->...nde', φk, v).cumsum(-3), materialising L × M × Dv
    chunked   what users hand-write: chunks of CHUNK positions, cumsum inside a chunk plus the
              carried running sums (chunk × M × Dv at a time in the forward; autograd still keeps
              every chunk's prefix sums for the backward)
    op        torch.ops.rewriter.linear_attention (slices of SLICE positions, state carried,
              reverse-walk backward with states recomputed at slice boundaries)

in inference (no_grad forward) and training (forward + backward of out.sum()); mode "package" runs
performer-pytorch's own causal `PerformerLM` (its CPU path as shipped) against its rewrite by
`optimize_module`, both modes, at the sizes (and 65536 when no --sizes are given; `performer_package.py`), and gives each point
a second memory figure from another fresh process: torch's own allocator peak above what was
allocated before the call (`rewriter.tools.allocator_peak`: on CPU the peak of the running sum of
the allocations and frees `torch.profiler(profile_memory=True)` records, on CUDA
`torch.cuda.max_memory_allocated()` minus the allocation before), which leaves out heap the C
library keeps after frees; `--device cuda` runs the package mode on the GPU (same code, model and
tokens moved there; its extra peak RSS is then host memory only); mode "ort" runs the
naive block exported to ONNX, our op's ONNX form and ORT's LinearAttention on ONNX Runtime (see
`performer_onnx.py`; forward only, ratios against the ONNX naive block). Every measurement
runs in a fresh process (`rewriter.tools.measure.measure_in_fresh_process`), which warms up at L = 256,
builds the inputs and then records one call's wall time and extra peak RSS (VmHWM during the call,
reset via /proc/self/clear_refs after malloc_trim, minus VmRSS before). Points estimated above
MAX_GIB are skipped with the estimate printed. The last lines check that the op's inference memory
beyond its O(L) output stays flat up to L = 65536 (see `flat_lines`). Exit status 1 when a target
fails. Times are wall-clock times of single calls: other load on the 2 cores skews them.

    PYTHONPATH=. python benchmarks/performer_attention.py            # full run: 5-10 minutes,
                                                                     # mostly the naive L = 16384 points
    PYTHONPATH=. python benchmarks/performer_attention.py --quick    # L = 1024, 2048; flat line to 8192
    PYTHONPATH=. python benchmarks/performer_attention.py --modes ort --sizes 4096 16384   # ORT rows only
    PYTHONPATH=. python benchmarks/performer_attention.py --modes package inference      # the package, and the op's flat line
    PYTHONPATH=. python benchmarks/performer_attention.py --modes package --package-modes training --sizes 16384
                                                   # the 50x target's points, both memory figures
    PYTHONPATH=. python benchmarks/performer_attention.py --modes package --device cuda  # the package on a GPU
    PYTHONPATH=. python benchmarks/performer_attention.py --modes package --package-kernel no_projection --sizes 16384
    PYTHONPATH=. python benchmarks/performer_attention.py --modes package --package-modes training --sizes 16384 \
        --package-head-dim 128 --package-features 621          # D = 128 with the package's default M = D·ln D
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
import tempfile

import torch

import performer_onnx
import performer_package
from rewriter.kernels import linear_attention_op  # noqa: F401  (registers the op)
from rewriter.tools.allocator_peak import allocator_peak_bytes
from rewriter.tools.measure import measure_in_fresh_process

BATCH, HEADS, HEAD_DIM, FEATURES = 1, 2, 64, 256
THREADS, EPSILON, CHUNK, SLICE, WARMUP_L = 2, 1e-4, 1024, 256, 256
IMPLS, MODES = {"inference": ("naive", "chunked", "op"), "training": ("naive", "chunked", "op"),
                "ort": performer_onnx.ORT_IMPLS}, ("inference", "training", "ort", "package")
PACKAGE_MAX_GIB = {"cpu": 5, "cuda": 60}  # a process on the shared 24 GiB machine stays under 5 GiB
PACKAGE_TARGET = 50  # training, at L = 16384: package / rewritten extra memory, and no slower
SIZES, FLAT_SIZES = (4096, 16384), (4096, 16384, 65536)
QUICK_SIZES, QUICK_FLAT_SIZES = (1024, 2048), (1024, 2048, 8192)
# Peak of the naive block in copies of the (B, H, L, M, Dv) fp32 context (measured at L = 1024
# and 2048, rounded up); the chunked block's training peak is about the same.
CONTEXT_COPIES = {"inference": 2.1, "training": 4.2, "ort": 3.2}  # ort: the naive ONNX block on ORT 1.32
MAX_GIB = 18
TARGETS = {"inference": 50, "training": 20}  # minimum memory ratio naive / op at the largest L


def softmax_kernel(data, projection, is_query):
    """performer-pytorch `softmax_kernel` (normalize_data=True, eps=1e-4, detached stabiliser).

    Its "...id,...jd->...ij" einsum is spelled for (B, H, L, D) data: ORT 1.32 rejects the ONNX
    Einsum of a 4-D by a 2-D operand under one "..." that the exporter writes for it."""
    normalizer = data.size(-1) ** -0.25
    data_dash = torch.einsum("bhid,jd->bhij", normalizer * data, projection)
    diag = ((data**2).sum(-1) / 2.0 * normalizer**2).unsqueeze(-1)
    stab = data_dash.amax(-1, keepdim=True) if is_query else data_dash.amax((-1, -2), keepdim=True)
    return projection.size(0) ** -0.5 * (torch.exp(data_dash - diag - stab.detach()) + EPSILON)


def naive_causal(q, k, v, projection):
    q, k = softmax_kernel(q, projection, True), softmax_kernel(k, projection, False)
    d_inv = 1.0 / torch.einsum("...nd,...nd->...n", q, k.cumsum(dim=-2))
    context = torch.einsum("...nd,...ne->...nde", k, v).cumsum(dim=-3)
    return torch.einsum("...nde,...nd,...n->...ne", context, q, d_inv)


def chunked_causal(q, k, v, projection):
    q, k = softmax_kernel(q, projection, True), softmax_kernel(k, projection, False)
    context_carry = q.new_zeros(q.shape[:2] + (q.size(-1), v.size(-1)))
    key_carry = q.new_zeros(q.shape[:2] + (q.size(-1),))
    outs = []
    for qc, kc, vc in zip(q.split(CHUNK, -2), k.split(CHUNK, -2), v.split(CHUNK, -2)):
        keys = kc.cumsum(-2) + key_carry.unsqueeze(-2)
        context = torch.einsum("...nd,...ne->...nde", kc, vc).cumsum(-3) + context_carry.unsqueeze(-3)
        outs.append(torch.einsum("...nde,...nd,...n->...ne", context, qc, 1.0 / (qc * keys).sum(-1)))
        context_carry, key_carry = context[..., -1, :, :], keys[..., -1, :]
    return torch.cat(outs, -2)


def op_causal(q, k, v, projection):
    return torch.ops.rewriter.linear_attention(
        q, k, v, projection, "favor_softmax", True, HEAD_DIM**-0.25, EPSILON, 0.0, False, SLICE
    )[0]


FUNCTIONS = {"naive": naive_causal, "chunked": chunked_causal, "op": op_causal}


def prepare_call(impl: str, mode: str, length: int):
    """Module-level (importable by the spawned child): inputs at `length` and the call to measure."""
    torch.set_num_threads(THREADS)
    generator = torch.Generator().manual_seed(0)
    projection = torch.randn(FEATURES, HEAD_DIM, generator=generator)
    fn, training = FUNCTIONS[impl], mode == "training"

    def make_call(n):
        q, k, v = (torch.randn(BATCH, HEADS, n, HEAD_DIM, generator=generator).requires_grad_(training)
                   for _ in range(3))
        if training:
            return lambda: fn(q, k, v, projection).sum().backward()

        def infer():
            with torch.no_grad():
                fn(q, k, v, projection)
        return infer

    make_call(WARMUP_L)()  # loads kernels, starts the thread pool
    return make_call(length)


def estimate_gib(impl: str, mode: str, length: int) -> float:
    if impl != "naive" and impl != "chunked":
        return 0.0
    return CONTEXT_COPIES[mode] * BATCH * HEADS * length * FEATURES * HEAD_DIM * 4 / 2**30


def run_point(impl: str, mode: str, length: int, onnx_models: dict | None = None) -> dict:
    """One measurement; ORT points (mode "ort") take the model `onnx_models[impl]` = (path, why not)."""
    row = {"impl": impl, "mode": mode, "L": length, "mib": None, "alloc_mib": None, "s": None, "note": ""}
    estimate = estimate_gib(impl, mode, length)
    path, problem = onnx_models[impl] if mode == "ort" else (None, "")
    if problem:
        row["note"] = problem
    elif estimate > MAX_GIB:
        row["note"] = f"skipped: needs ~{estimate:.0f} GiB > {MAX_GIB} GiB"
    else:
        if mode == "ort":
            row["mib"], row["s"] = performer_onnx.measure_ort(path, length, THREADS, WARMUP_L)
        else:
            result = measure_in_fresh_process(prepare_call, impl, mode, length)
            row["mib"], row["s"] = result.extra_peak_mib, result.seconds
    result_text = row["note"] or f"{row['mib']:.1f} MiB, {row['s']:.3f} s"
    print(f"{mode:>9} L={length:<6} {impl:>7}: {result_text}", file=sys.stderr, flush=True)
    return row


def run_package_point(impl: str, mode: str, length: int, device: str = "cpu",
                      config: performer_package.PackageModel = performer_package.PackageModel(),
                      max_gib: float | None = None) -> dict:
    """performer-pytorch's PerformerLM ("package") or its rewrite ("rewritten") of `config` on `device`:
    extra peak RSS and time in one fresh process, the allocator's peak (`allocator_peak_bytes`) in
    another. Skipped when the package's estimate exceeds `max_gib` (default PACKAGE_MAX_GIB[device])."""
    row = {"impl": impl, "mode": f"package {mode}", "L": length, "mib": None, "alloc_mib": None, "s": None,
           "note": ""}
    estimate, max_gib = performer_package.estimate_gib(impl, mode, length, config), max_gib or PACKAGE_MAX_GIB[device]
    if estimate > max_gib:
        row["note"] = f"skipped: needs ~{estimate:.0f} GiB > {max_gib:g} GiB"
    else:
        args = (performer_package.prepare_call, impl, mode, length, THREADS, WARMUP_L, device, config)
        try:
            result = measure_in_fresh_process(*args)
            row["mib"], row["s"] = result.extra_peak_mib, result.seconds
            row["alloc_mib"] = measure_in_fresh_process(
                *args, measure=functools.partial(allocator_peak_bytes, device=device)) / 2**20
        except ChildProcessError as error:
            row["note"] = f"failed: {error}"
    text = row["note"] or f"{row['mib']:.1f} MiB RSS, {row['alloc_mib']:.1f} MiB allocator, {row['s']:.3f} s"
    print(f"package {mode:>9} L={length:<6} {impl:>9} ({device}; {config.describe()}): {text}", file=sys.stderr,
          flush=True)
    return row


PACKAGE_FIGURES = {"mib": "extra peak RSS", "alloc_mib": "allocator peak"}


def package_verdict(rows: list[dict], length: int = 16384, model: str = "") -> list[str]:
    """One target line per memory figure (extra peak RSS, allocator peak), each with the time ratio;
    `model` describes the package model measured."""
    by_key = {(r["impl"], r["mode"], r["L"]): r for r in rows}
    package, ours = by_key.get(("package", "package training", length)), by_key.get(("rewritten", "package training", length))
    lines = []
    for key, figure in PACKAGE_FIGURES.items():
        goal = (f"package training L={length} ({model}): rewritten ≥{PACKAGE_TARGET}x less {figure}"
                f" than performer-pytorch, ≤1x its time")
        if package is None or ours is None or package[key] is None or ours[key] is None:
            lines.append(f"FAIL  {goal} (not measured)")
            continue
        memory_ratio, time_ratio = package[key] / max(ours[key], 1e-3), ours["s"] / package["s"]
        ok = memory_ratio >= PACKAGE_TARGET and time_ratio <= 1.0
        lines.append(f"{'PASS' if ok else 'FAIL'}  {goal}: {memory_ratio:.0f}x less, {time_ratio:.2f}x time")
    return lines


def _ratio(base: dict | None, row: dict, key: str) -> str:
    if base is None or base[key] is None or row[key] is None:
        return ""
    return f"{base[key] / max(row[key], 1e-3):.1f}"


def table(rows: list[dict]) -> str:
    """Markdown table; ratios against the row of impl "naive" (or "package") at the same mode and L.
    The allocator columns are filled for the package mode only."""
    naive = {(r["mode"], r["L"]): r for r in rows if r["impl"] in ("naive", "package") and r["mib"] is not None}
    lines = ["| mode | L | impl | extra peak RSS MiB | allocator peak MiB | time s | RSS naive/impl"
             " | allocator naive/impl | time impl/naive |",  # naive: or package
             "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        base = naive.get((r["mode"], r["L"]))
        memory = r["note"] or f"{r['mib']:.1f}"
        allocator = "" if r["alloc_mib"] is None else f"{r['alloc_mib']:.1f}"
        time_s = "" if r["s"] is None else f"{r['s']:.3f}"
        time_ratio = "" if base is None or r["s"] is None else f"{r['s'] / base['s']:.3f}"
        lines.append(f"| {r['mode']} | {r['L']} | {r['impl']} | {memory} | {allocator} | {time_s}"
                     f" | {_ratio(base, r, 'mib')} | {_ratio(base, r, 'alloc_mib')} | {time_ratio} |")
    return "\n".join(lines)


def verdicts(rows: list[dict], length: int) -> list[str]:
    by_key = {(r["impl"], r["mode"], r["L"]): r for r in rows}
    lines = []
    for mode, min_ratio in TARGETS.items():
        if not any(r["mode"] == mode for r in rows):
            continue
        naive, op = by_key.get(("naive", mode, length)), by_key.get(("op", mode, length))
        goal = f"{mode} L={length}: op ≥{min_ratio}x less extra memory than naive cumsum, ≤1x its time"
        if naive is None or op is None or naive["mib"] is None or op["mib"] is None:
            lines.append(f"FAIL  {goal} (not measured)")
            continue
        memory_ratio, time_ratio = naive["mib"] / max(op["mib"], 1e-3), op["s"] / naive["s"]
        ok = memory_ratio >= min_ratio and time_ratio <= 1.0
        lines.append(f"{'PASS' if ok else 'FAIL'}  {goal}: {memory_ratio:.0f}x less, {time_ratio:.2f}x time")
    return lines


@contextlib.contextmanager
def _fixed_mmap_threshold():
    """Children started inside use glibc's mmap threshold fixed at 128 KiB (MALLOC_MMAP_THRESHOLD_):
    every freed per-slice buffer goes back to the OS at once, so the peak shows the live working set
    rather than where glibc's adaptive threshold happened to leave freed blocks (±1.5 MiB a run)."""
    previous = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)
    try:
        yield
    finally:
        if previous is None:
            del os.environ["MALLOC_MMAP_THRESHOLD_"]
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = previous


def _beyond_output(sizes, repeats: int) -> list[float]:
    """Least op inference extra peak of `repeats` fresh processes, less its (B, H, L, Dv) fp32 output."""
    least = [min(run_point("op", "inference", n)["mib"] for _ in range(repeats)) for n in sizes]
    return [mib - BATCH * HEADS * n * HEAD_DIM * 4 / 2**20 for mib, n in zip(least, sizes)]


NOISE_MIB = 0.5  # measured process-to-process offset of one point (±0.3 MiB), rounded up


def flat_lines(sizes, repeats: int = 3) -> list[str]:
    """Op inference memory over L beyond the output it has to return.

    The verdict uses the fixed mmap threshold and the least of `repeats` processes; the working set
    is ~3 MiB and a fresh process adds an offset of up to ±0.3 MiB that does not depend on L
    (repeating the call inside one process moves it by < 0.1 MiB), so a spread within NOISE_MIB also
    counts as flat. The default-allocator line (one process per point) is for information.
    """
    default = _beyond_output(sizes, 1)
    with _fixed_mmap_threshold():
        fixed = _beyond_output(sizes, repeats)
    spread_mib = max(fixed) - min(fixed)
    spread = spread_mib / max(min(fixed), 1e-3)
    ok = spread <= 0.10 or spread_mib <= NOISE_MIB

    def points(values):
        return ", ".join(f"L={n}: {mib:.2f} MiB" for n, mib in zip(sizes, values))

    return [
        f"{'PASS' if ok else 'FAIL'}  op inference memory beyond its output flat in L (within 10% or"
        f" {NOISE_MIB} MiB; fixed mmap threshold, least of {repeats}): {points(fixed)};"
        f" spread {spread:.0%} = {spread_mib:.2f} MiB",
        f"info  the same with glibc's default allocator, one process each: {points(default)}",
    ]


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--sizes", type=_positive, nargs="+",
                        help="sequence lengths (default: 4096 16384; the package mode adds 65536 unless --sizes or"
                             " --quick)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                        help="inference and training: the FAVOR+ block alone (naive cumsum, hand-chunked, our op);"
                             " ort: its ONNX forms on ONNX Runtime; package: performer-pytorch's PerformerLM and its"
                             " rewrite (default: all). The op's flat-memory check runs with inference (or package"
                             " inference), on CPU")
    parser.add_argument("--package-modes", nargs="+", choices=("inference", "training"),
                        default=["inference", "training"], help="what the package mode runs (default: both)")
    parser.add_argument("--package-kernel", choices=performer_package.KERNELS, default="favor",
                        help="the package model's feature map: FAVOR+ (default), or no_projection (M = D)")
    parser.add_argument("--package-head-dim", type=_positive, default=64, metavar="D",
                        help="the package model's head dim (default: 64)")
    parser.add_argument("--package-features", type=_positive, default=256, metavar="M",
                        help="the package model's FAVOR+ feature count (default: 256; the package's own default"
                             " would be D·ln D)")
    parser.add_argument("--package-max-gib", type=float, metavar="GIB",
                        help="skip package points estimated above this (default: 5 on CPU, 60 on CUDA)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where the package mode runs (default: cpu); cuda needs --modes package")
    args = parser.parse_args(argv)
    if args.device == "cuda":
        if args.modes != ["package"]:
            parser.error("--device cuda runs the package mode only: pass --modes package")
        if not torch.cuda.is_available():
            parser.error(f"--device cuda: no CUDA device available (torch {torch.__version__},"
                         f" built with CUDA {torch.version.cuda})")
    sizes, flat_sizes = (QUICK_SIZES, QUICK_FLAT_SIZES) if args.quick else (SIZES, FLAT_SIZES)
    sizes = tuple(args.sizes or sizes)
    if os.getloadavg()[0] > 0.5:
        print(f"warning: load average {os.getloadavg()[0]:.1f}; times will be skewed", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="performer-onnx-") as directory:
        onnx_models = None
        if "ort" in args.modes:
            onnx_models = performer_onnx.build_models(directory, naive_causal, (BATCH, HEADS, HEAD_DIM, FEATURES),
                                                      epsilon=EPSILON, slice_size=SLICE, threads=THREADS)
        rows = [run_point(impl, mode, n, onnx_models) for mode in args.modes if mode != "package"
                for n in sizes for impl in IMPLS[mode]]
    lines = verdicts(rows, sizes[-1])
    if "package" in args.modes:
        package_sizes = sizes if args.quick or args.sizes else tuple(dict.fromkeys(sizes + (65536,)))
        config = performer_package.PackageModel(args.package_kernel, args.package_head_dim, args.package_features)
        rows += [run_package_point(impl, mode, n, args.device, config, args.package_max_gib)
                 for mode in args.package_modes
                 for n in package_sizes for impl in performer_package.IMPLS]
        if "training" in args.package_modes and config.kernel == "favor":  # the target is the FAVOR+ model's
            lines += package_verdict(rows, 16384 if 16384 in package_sizes else package_sizes[-1], config.describe())
    inference = "inference" in args.modes or ("package" in args.modes and "inference" in args.package_modes)
    if args.device == "cpu" and inference:
        lines += flat_lines(flat_sizes)
    print(table(rows) + "\n\n" + "\n".join(lines))
    return 1 if any(line.startswith("FAIL") for line in lines) else 0


if __name__ == "__main__":
    sys.exit(main())
