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
