"""benchmarks/real_models.py runs end to end at its smallest configuration (one family, one mode,
n = 128) and prints what it promises: a table on stdout and every figure in its JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "real_models.py")


def run_script(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, SCRIPT, *argv], capture_output=True, text=True, timeout=timeout, env=env)


def test_smallest_configuration_measures_the_rewritten_model(tmp_path):
    out = tmp_path / "figures.json"
    result = run_script("--families", "bert", "--modes", "rewritten", "--lengths", "128", "--backward-lengths",
                        "--optimize-lengths", "--onnx-lengths", "--memory-limit", "2", "--json", str(out))
    assert result.returncode == 0, result.stderr
    assert "| bert | 128 | rewritten |" in result.stdout
    figures = json.loads(out.read_text())
    assert figures["config"]["families"] == ["bert"] and figures["config"]["memory_limit"] == 2
    (row,) = figures["results"]
    assert (row["section"], row["family"], row["mode"], row["n"], row["note"]) == ("inference", "bert", "rewritten", 128, "")
    assert row["extra_peak_mib"] >= 0 and row["seconds"] > 0 and row["cpu_seconds"] > 0
    assert 0 <= row["optimize_extra_mib"] <= row["extra_peak_mib"] and row["optimize_seconds"] > 0
    assert row["blocks"] == "2 of 2"  # BERT's two self-attention layers


def test_help_names_every_flag():
    result = run_script("--help", timeout=60)
    assert result.returncode == 0, result.stderr
    for flag in ("--families", "--modes", "--lengths", "--backward-lengths", "--optimize-lengths", "--onnx-lengths",
                 "--memory-limit", "--json"):
        assert flag in result.stdout


@pytest.fixture
def real_models(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    import real_models

    return real_models


def test_ratios_against_a_base_that_ran_out_of_memory_are_lower_bounds(real_models):
    row = real_models.Row
    rows = [row(section="inference", family="llama", mode="eager", n=16384, limit_gib=5,
                note="out of memory (> 5 GiB) in the forward"),
            row(section="inference", family="llama", mode="sdpa", n=16384, limit_gib=5, extra_peak_mib=300.0,
                seconds=2.0, cpu_seconds=3.0),
            row(section="inference", family="llama", mode="rewritten", n=16384, limit_gib=5, extra_peak_mib=64.0,
                seconds=1.0, cpu_seconds=1.0)]
    real_models.set_base_ratios(rows)
    assert rows[2].ratios["eager"] == {"memory": 80.0, "time": None, "lower_bound": True}
    assert rows[2].ratios["sdpa"]["memory"] == pytest.approx(300 / 64) and rows[2].ratios["sdpa"]["time"] == 0.5
    assert "| llama | 16384 | rewritten | 64.0 | 1.000 | 1.000 | >80.0 |  | 4.7 | 0.50 |" in \
        real_models.section_table(rows, "inference")
    verdicts = real_models.check_targets(rows)
    assert [verdict for verdict, _ in verdicts] == ["SKIP", "PASS"]  # time not comparable; below sdpa
    assert "not comparable (eager ran out of memory)" in verdicts[0][1]


def test_targets_fail_below_their_ratio_and_check_the_optimise_call_peak(real_models):
    row = real_models.Row
    rows = [row(section="onnx", family="t5", mode="exported", n=8192, extra_peak_mib=2000.0, seconds=4.0, cpu_seconds=4.0),
            row(section="onnx", family="t5", mode="optimized", n=8192, extra_peak_mib=100.0, seconds=1.0, cpu_seconds=1.0),
            row(section="inference", family="t5", mode="rewritten", n=256, extra_peak_mib=5.0, seconds=0.1,
                cpu_seconds=0.1, optimize_extra_mib=3.0),
            row(section="inference", family="t5", mode="rewritten", n=16384, extra_peak_mib=500.0, seconds=9.0,
                cpu_seconds=9.0, optimize_extra_mib=40.0)]
    real_models.set_base_ratios(rows)
    assert real_models.check_targets(rows) == [
        ("FAIL", "onnx n=8192 t5: optimized ≥30x less than exported: got 20.0x less"),
        ("FAIL", "optimise call at n=16384 t5: within 10 MiB of its peak at n=256: got +37.0 MiB")]
