"""Whole-model memory and time of Hugging Face `transformers` models: eager vs HF sdpa vs rewritten.

Models come from `transformers` config classes with random weights (benchmarks/hf_families.py:
LLaMA causal + padding, BERT bidirectional + padding, Mistral sliding window + padding, T5 encoder
relative position bias + padding; hidden 64, 4 heads, 2 layers, vocabulary 100, batch 1 by default,
the last row's last n/8 keys padded). Every figure comes from a fresh child process
(benchmarks/real_model_points.py) that builds the model and inputs, warms up at n = 128, and then
measures one call: extra peak RSS above the process's state after building the model and inputs
(MiB), and wall time of the forward (s). Sections:

    inference   no_grad forward at --lengths; modes eager (attn_implementation="eager"), sdpa
                (HF's own "sdpa" implementation) and rewritten (rewriter.optimize_module at the
                same length, then the forward: the optimise call is inside the measured peak,
                and its own peak and time are columns of their own)
    backward    forward + last_hidden_state.sum().backward() at --backward-lengths, same modes
    optimize    the optimise call's own extra peak at --optimize-lengths (from rewritten
                inference points, run there if the inference section did not)
    onnx        each family's eager model exported once by torch.onnx.export(dynamo=True) with a
                dynamic sequence axis, run on ONNX Runtime CPU as exported and after
                rewriter.optimize_onnx (target auto), at --onnx-lengths

Each child may allocate at most --memory-limit GiB beyond its state before the call (RLIMIT_AS);
a call that needs more is reported as "out of memory (> X GiB)", and a ratio against it is a lower
bound (">"). The run ends with PASS/FAIL lines for issue 11's targets whose points it ran (inference
at n = 16384: ≥ 50x less than eager, ≤ 0.5x its time, below sdpa; forward + backward at n = 8192:
≥ 20x; ONNX at n = 8192: ≥ 30x; the optimise call's peak at n = 16384 within 10 MiB of n = 256) and
exits with status 1 when one fails or a point had an error. Ratios: memory = base / mode (x less),
time = mode / base, against eager and sdpa (or the exported file) measured in the same run. Times
are wall-clock of one call: other load on the machine skews them (the CPU-seconds column less so);
memory figures are stable.

    PYTHONPATH=. python benchmarks/real_models.py                          # the full run (long)
    PYTHONPATH=. python benchmarks/real_models.py --lengths 2048 --backward-lengths 1024 \\
        --optimize-lengths 256 2048 --onnx-lengths 2048 --memory-limit 5 --json out.json
    PYTHONPATH=. python benchmarks/real_models.py --families bert --modes rewritten --lengths 128 \\
        --backward-lengths --optimize-lengths --onnx-lengths          # the smoke test's run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile

from child_points import PointFigures, fill_from_child, fmt, memory_cell, point_line, warn_if_busy, write_outputs
from hf_families import FAMILIES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCH_MODES = ("eager", "sdpa", "rewritten")
ONNX_MODES = ("exported", "optimized")
BASES = {"inference": ("eager", "sdpa"), "backward": ("eager", "sdpa"), "onnx": ("exported",)}
# Issue 11's acceptance targets: (length, least memory ratio against the section's first base, most time ratio);
# checked for each family whose points at that length were run, with the base.
TARGETS = {"inference": (16384, 50.0, 0.5), "backward": (8192, 20.0, None), "onnx": (8192, 30.0, None)}
OPTIMIZE_TARGET = (256, 16384, 10.0)  # the optimise call's peak at the longer length within 10 MiB of the shorter's
DEFAULTS = {"lengths": (4096, 16384), "backward_lengths": (8192,), "optimize_lengths": (256, 16384),
            "onnx_lengths": (8192,)}


@dataclasses.dataclass
class Row(PointFigures):
    section: str
    family: str
    mode: str
    n: int
    limit_gib: float = 0.0
    optimize_extra_mib: float | None = None
    optimize_seconds: float | None = None
    blocks: str = ""  # "R of F": attention blocks rewritten of those found (rewritten and optimised points)
    ratios: dict = dataclasses.field(default_factory=dict)  # base mode -> {"memory", "time", "lower_bound"}

    @property
    def out_of_memory(self) -> bool:
        return self.note.startswith("out of memory")


def default_memory_limit_gib() -> float:
    """Three quarters of what /proc/meminfo says is available now, in whole GiB (at least 1)."""
    with open("/proc/meminfo") as meminfo:
        available_kib = next(int(line.split()[1]) for line in meminfo if line.startswith("MemAvailable:"))
    return max(1.0, float(int(0.75 * available_kib / 2**20)))


def child_command(spec: dict) -> list[str]:
    return [sys.executable, os.path.abspath(__file__), "--one", json.dumps(spec)]


def run_point(row: Row, spec: dict, timeout_s: int) -> None:
    result = fill_from_child(row, child_command(spec), timeout_s)
    row.optimize_extra_mib, row.optimize_seconds = result.get("optimize_extra_mib"), result.get("optimize_seconds")
    row.blocks = result.get("blocks", row.blocks)
    print(f"{row.section:>9} {row.family:>7} {row.mode:>9} n={row.n:<6}: {point_line(row)}", file=sys.stderr, flush=True)


def export_family(args, family: str, model_dir: str) -> tuple[dict, str]:
    """(what the export child wrote, "") or ({}, why it failed): as-exported and optimised ONNX files."""
    from rewriter.tools.bench_child import ChildFailed, run_json_child

    lengths = args.onnx_lengths
    spec = {"kind": "export", "family": family, "dir": model_dir, "batch": args.batch, "window": args.window,
            "min_length": min(lengths), "max_length": max(max(lengths), 512)}
    try:
        made = run_json_child(child_command(spec), args.timeout)
    except ChildFailed as error:
        print(f"{'onnx':>9} {family:>7} export failed: {error}", file=sys.stderr, flush=True)
        return {}, f"error: the export failed ({error})"
    print(f"{'onnx':>9} {family:>7} exported; optimize_onnx rewrote {made['blocks']} ({', '.join(made['targets'])}); "
          f"check at n = {made['check_n']}: {made['check']}", file=sys.stderr, flush=True)
    return made, ""


def set_base_ratios(rows: list[Row]) -> None:
    """Each row's ratios against the base modes of its section at the same family and length."""
    by_key = {(r.section, r.family, r.mode, r.n): r for r in rows}
    for row in rows:
        for base_mode in BASES.get(row.section, ()):
            base = by_key.get((row.section, row.family, base_mode, row.n))
            if base is None or base is row or not row.measured:
                continue
            if base.measured:
                memory = base.extra_peak_mib / max(row.extra_peak_mib, 1e-3)
                row.ratios[base_mode] = {"memory": memory, "time": row.seconds / base.seconds, "lower_bound": False}
            elif base.out_of_memory:  # the base needs more than its cap: the ratio is at least cap / this
                memory = base.limit_gib * 1024 / max(row.extra_peak_mib, 1e-3)
                row.ratios[base_mode] = {"memory": memory, "time": None, "lower_bound": True}
        first = row.ratios.get(BASES.get(row.section, ("",))[0], {})
        row.memory_ratio, row.time_ratio = first.get("memory"), first.get("time")


def _ratio_cells(row: Row, base_mode: str) -> list[str]:
    ratio = row.ratios.get(base_mode)
    if not ratio:
        return ["", ""]
    return [f"{'>' if ratio['lower_bound'] else ''}{ratio['memory']:.1f}", fmt(ratio["time"], ".2f")]


def section_table(rows: list[Row], section: str) -> str:
    bases = BASES[section]
    header = ["family", "n", "mode", "extra peak MiB", "time s", "CPU s"]
    for base in bases:
        header += [f"x less than {base}", f"time / {base}"]
    header += ["optimise peak MiB", "optimise s", "blocks rewritten"] if section != "onnx" else ["blocks rewritten"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in (r for r in rows if r.section == section):
        cells = [r.family, str(r.n), r.mode, memory_cell(r), fmt(r.seconds, ".3f"), fmt(r.cpu_seconds, ".3f")]
        for base in bases:
            cells += _ratio_cells(r, base)
        if section != "onnx":
            cells += [fmt(r.optimize_extra_mib, ".1f"), fmt(r.optimize_seconds, ".2f")]
        lines.append("| " + " | ".join(cells + [r.blocks]) + " |")
    return "\n".join(lines)


def optimize_table(rows: list[Row], families, lengths) -> str:
    """The optimise call's own extra peak per family and length, and its change from the shortest length."""
    lines = ["| family | n | optimise peak MiB | optimise s | change from the shortest length MiB |",
             "|---|---|---|---|---|"]
    for family in families:
        found = [next((r for r in rows if r.family == family and r.n == n and r.mode == "rewritten"
                       and r.section == "inference"), None) for n in sorted(lengths)]
        first = found[0].optimize_extra_mib if found and found[0] else None
        for n, r in zip(sorted(lengths), found):
            peak = r.optimize_extra_mib if r else None
            change = None if peak is None or first is None else round(peak - first, 1) + 0.0  # no "-0.0"
            why = "" if peak is not None or r is None else r.note
            lines.append(f"| {family} | {n} | {fmt(peak, '.1f') or why} | {fmt(r and r.optimize_seconds, '.2f')} "
                         f"| {fmt(change, '+.1f')} |")
    return "\n".join(lines)


def _verdict(goal: str, row: Row, base_mode: str, min_memory: float, max_time: float | None) -> tuple[str, str]:
    ratio = row.ratios.get(base_mode)
    if not ratio:
        return "FAIL", f"{goal} ({row.note or f'{base_mode} not measured'})"
    got = f"got {'>' if ratio['lower_bound'] else ''}{ratio['memory']:.1f}x less"
    if ratio["memory"] < min_memory:
        return "FAIL", f"{goal}: {got}"
    if max_time is None:
        return "PASS", f"{goal}: {got}"
    if ratio["time"] is None:
        return "SKIP", f"{goal}: {got}; the time is not comparable ({base_mode} ran out of memory)"
    return ("PASS" if ratio["time"] <= max_time else "FAIL"), f"{goal}: {got}, {ratio['time']:.2f}x the time"


def check_targets(rows: list[Row]) -> list[tuple[str, str]]:
    """(PASS | FAIL | SKIP, description) for each target whose points were run (TARGETS, OPTIMIZE_TARGET)."""
    by_key = {(r.section, r.family, r.mode, r.n): r for r in rows}
    verdicts = []
    for (section, family, mode, n), row in by_key.items():
        target = TARGETS.get(section)
        if target is None or n != target[0] or mode not in ("rewritten", "optimized"):
            continue
        base_mode, (_, min_memory, max_time) = BASES[section][0], target
        if (section, family, base_mode, n) not in by_key:
            continue
        goal = f"{section} n={n} {family}: {mode} ≥{min_memory:g}x less than {base_mode}"
        verdicts.append(_verdict(goal + (f", ≤{max_time:g}x its time" if max_time else ""), row, base_mode,
                                 min_memory, max_time))
        sdpa = by_key.get((section, family, "sdpa", n))
        if section == "inference" and sdpa is not None and sdpa.measured:
            verdicts.append(_verdict(f"{section} n={n} {family}: {mode} below HF sdpa", row, "sdpa", 1.0, None))
    short, long, tolerance = OPTIMIZE_TARGET
    for (section, family, mode, n), row in by_key.items():
        first = by_key.get(("inference", family, "rewritten", short))
        if (section, mode, n) != ("inference", "rewritten", long) or first is None:
            continue
        goal = f"optimise call at n={long} {family}: within {tolerance:g} MiB of its peak at n={short}"
        if row.optimize_extra_mib is None or first.optimize_extra_mib is None:
            verdicts.append(("FAIL", f"{goal} ({row.note or first.note})"))
            continue
        change = round(row.optimize_extra_mib - first.optimize_extra_mib, 1) + 0.0
        verdicts.append(("PASS" if abs(change) <= tolerance else "FAIL", f"{goal}: got {change:+.1f} MiB"))
    return verdicts


def torch_rows(args, section: str, lengths, existing: list[Row]) -> list[Row]:
    rows = []
    for family in args.families:
        for n in lengths:
            for mode in (m for m in TORCH_MODES if m in args.modes):
                if section == "optimize":
                    if mode != "rewritten" or any((r.section, r.family, r.mode, r.n) == ("inference", family, mode, n)
                                                   for r in existing):
                        continue
                row = Row(section="inference" if section == "optimize" else section, family=family, mode=mode, n=n,
                          limit_gib=args.memory_limit)
                run_point(row, {"kind": "torch", "family": family, "mode": mode, "n": n, "batch": args.batch,
                                "backward": section == "backward", "threads": args.threads, "window": args.window,
                                "max_length": max(n, 512), "limit_gib": args.memory_limit}, args.timeout)
                rows.append(row)
    return rows


def onnx_rows(args, model_dir: str) -> list[Row]:
    rows = []
    for family in args.families:
        made, why = export_family(args, family, model_dir)
        for mode in (m for m in ONNX_MODES if m in args.modes):
            for n in args.onnx_lengths:
                row = Row(section="onnx", family=family, mode=mode, n=n, limit_gib=args.memory_limit)
                row.blocks = made.get("blocks", "") if mode == "optimized" else ""
                if why:
                    row.note = why
                elif mode == "optimized" and not made["ok"]:
                    row.note = f"error: the optimised file differs from the export ({made['check']})"
                else:
                    run_point(row, {"kind": "onnx", "path": made[mode], "family": family, "n": n, "batch": args.batch,
                                    "threads": args.threads, "limit_gib": args.memory_limit}, args.timeout)
                rows.append(row)
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Pass a length flag with no value to skip its section.")
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    parser.add_argument("--modes", nargs="+", choices=TORCH_MODES + ONNX_MODES, default=list(TORCH_MODES + ONNX_MODES),
                        help="torch modes (eager sdpa rewritten) and ONNX modes (exported optimized) to run")
    for name, lengths in DEFAULTS.items():
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, type=int, nargs="*", default=list(lengths), metavar="N",
                            help=f"sequence lengths (default: {' '.join(map(str, lengths))})")
    parser.add_argument("--batch", type=int, default=1, help="batch rows; the last one is padded (default 1)")
    parser.add_argument("--window", type=int, default=1024,
                        help="Mistral's sliding window; at lengths ≤ it, n // 2 is used (default 1024)")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads per child (default 2)")
    parser.add_argument("--memory-limit", type=float, metavar="GIB",
                        help="extra memory each child may allocate (default: 3/4 of MemAvailable now)")
    parser.add_argument("--timeout", type=int, default=1800, metavar="S", help="seconds per child (default 1800)")
    parser.add_argument("--model-dir", help="keep the ONNX files here (default: a temporary folder)")
    parser.add_argument("--json", metavar="PATH", help="write every figure as JSON")
    parser.add_argument("--one", metavar="SPEC", help=argparse.SUPPRESS)  # a child: see real_model_points.py
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.one:
        from real_model_points import run_child

        return run_child(args.one)
    if any(n < 2 for name in DEFAULTS for n in getattr(args, name)) or args.batch < 1:
        print("real_models.py: lengths must be at least 2 and --batch at least 1", file=sys.stderr)
        return 2
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))  # children import rewriter
    args.memory_limit = args.memory_limit or default_memory_limit_gib()
    load = warn_if_busy("before starting")
    print(f"each child may allocate {args.memory_limit:g} GiB beyond its state before the measured call",
          file=sys.stderr)
    rows = torch_rows(args, "inference", args.lengths, [])
    rows += torch_rows(args, "backward", args.backward_lengths, [])
    rows += torch_rows(args, "optimize", args.optimize_lengths, rows)
    if args.onnx_lengths and set(ONNX_MODES) & set(args.modes):
        with tempfile.TemporaryDirectory() as scratch:
            if args.model_dir:
                os.makedirs(args.model_dir, exist_ok=True)
            rows += onnx_rows(args, args.model_dir or scratch)
    set_base_ratios(rows)
    tables = [f"## {section}\n\n{section_table(rows, section)}" for section in ("inference", "backward", "onnx")
              if any(r.section == section for r in rows)]
    if args.optimize_lengths and "rewritten" in args.modes:
        tables.append(f"## optimise call\n\n{optimize_table(rows, args.families, args.optimize_lengths)}")
    config = {name: getattr(args, name) for name in ("families", "modes", "batch", "window", "threads", "memory_limit",
                                                      *DEFAULTS)}
    status = write_outputs("\n\n".join(tables), check_targets(rows), args.json, None,
                           {"config": config, "load_average": load, "results": [dataclasses.asdict(r) for r in rows]})
    return 1 if status or any(r.note.startswith("error") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
