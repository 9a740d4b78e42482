"""How long the CLI takes to start: `rewriter --help` and `rewriter inspect model.onnx` against the
floor of any ONNX tool, `python -c "import onnx"`, and against `python -c "import onnx_ir"`, the floor
of `inspect` (its detection runs on onnx-ir, whose `_core` imports sympy at its top).

Each command runs in a fresh process `--repeats` times (default 5; the commands take turns, so that a
change in the machine's load reaches all of them alike) after one untimed warm-up run each, which
fills the OS file cache and, as an installed package has it, the bytecode cache (the children run
without PYTHONDONTWRITEBYTECODE). The table gives the median and the fastest wall-clock time, the
median CPU time of the child (user + system), and the medians minus the `import onnx` medians
("beyond Python + onnx"); on a loaded machine the CPU figures are the steadier ones. The model
inspected is a small attention model built with `tests/onnx_builders.attention_model` (2 heads, head
dim 8, symbolic sequence length), written to a temporary directory. Each row also says whether the
command imported torch (read from `sys.modules` in a run of the same command in-process), since
importing torch is what made every command take seconds before.

    PYTHONPATH=. python benchmarks/cli_startup.py               # ~30 s
    PYTHONPATH=. python benchmarks/cli_startup.py --repeats 11 --json out.json

Wall times move with other load on the machine; the difference to `import onnx` is the figure
that matters.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import onnx

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from onnx_builders import attention_model  # noqa: E402

_TORCH_PROBE = """
import sys
from rewriter.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
sys.stdout = sys.__stdout__
print("TORCH", "torch" in sys.modules)
"""


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _time(commands: dict[str, list[str]], repeats: int) -> dict[str, tuple[list[float], list[float]]]:
    """Wall-clock and CPU seconds of `repeats` runs of each command, after a warm-up run of each; the
    commands take turns, so that a change in the machine's load reaches all of them alike."""
    env = {name: value for name, value in os.environ.items() if name != "PYTHONDONTWRITEBYTECODE"}
    for argv in commands.values():
        subprocess.run(argv, capture_output=True, check=True, env=env)  # warm-up
    times = {name: ([], []) for name in commands}
    for _ in range(repeats):
        for name, argv in commands.items():
            start, cpu_start = time.perf_counter(), _children_cpu()
            subprocess.run(argv, capture_output=True, check=True, env=env)
            times[name][0].append(time.perf_counter() - start)
            times[name][1].append(_children_cpu() - cpu_start)
    return times


def _imports_torch(cli_args: list[str]) -> bool:
    result = subprocess.run([sys.executable, "-c", _TORCH_PROBE, *cli_args], capture_output=True, text=True,
                            check=True)
    return result.stdout.strip().splitlines()[-1] == "TORCH True"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per command (default 5)")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        model = os.path.join(directory, "attention.onnx")
        onnx.save(attention_model(heads=2, head_dim=8), model)
        commands = {
            'python -c "import onnx"': ([sys.executable, "-c", "import onnx"], None),
            # the floor of `inspect`: detection runs on onnx-ir, whose core imports sympy
            'python -c "import onnx_ir"': ([sys.executable, "-c", "import onnx_ir"], None),
            "rewriter --help": ([sys.executable, "-m", "rewriter", "--help"], ["--help"]),
            "rewriter inspect model.onnx": ([sys.executable, "-m", "rewriter", "inspect", model], ["inspect", model]),
        }
        rows = {}
        times = _time({name: argv for name, (argv, _) in commands.items()}, args.repeats)
        for name, (argv, cli_args) in commands.items():
            walls, cpus = times[name]
            rows[name] = {"median_s": statistics.median(walls), "min_s": min(walls),
                          "cpu_median_s": statistics.median(cpus),
                          "imports_torch": None if cli_args is None else _imports_torch(cli_args)}
    floor = rows['python -c "import onnx"']
    print(f"{'command':30} {'median':>8} {'fastest':>8} {'beyond onnx':>12} {'cpu':>8} {'cpu beyond':>11}"
          "  imports torch")
    for name, row in rows.items():
        row["beyond_onnx_s"] = row["median_s"] - floor["median_s"]
        row["cpu_beyond_onnx_s"] = row["cpu_median_s"] - floor["cpu_median_s"]
        torch_text = "" if row["imports_torch"] is None else ("yes" if row["imports_torch"] else "no")
        print(f"{name:30} {row['median_s']:>7.3f}s {row['min_s']:>7.3f}s {row['beyond_onnx_s']:>+11.3f}s "
              f"{row['cpu_median_s']:>7.3f}s {row['cpu_beyond_onnx_s']:>+10.3f}s  {torch_text}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"repeats": args.repeats, "rows": rows}, out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
