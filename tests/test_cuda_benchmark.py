"""benchmarks/cuda_attention.py on a machine without CUDA: its help, its one-line refusal, and the
ratios and table it derives from measured points (the measurements themselves need a GPU)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from benchmarks.cuda_attention import Point, add_ratios, markdown

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "cuda_attention.py")


def run_script(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, SCRIPT, *argv], capture_output=True, text=True, timeout=120, env=env)


def test_help_names_every_flag():
    result = run_script("--help")
    assert result.returncode == 0, result.stderr
    for flag in ("--json", "--quick", "--max-seconds", "--repeats", "--sections"):
        assert flag in result.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_without_cuda_it_refuses_in_one_line(tmp_path):
    result = run_script("--quick", "--json", str(tmp_path / "out.json"))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "needs a GPU" in result.stderr, result.stderr
    assert not (tmp_path / "out.json").exists()


def test_ratios_compare_the_rewritten_row_with_its_baselines():
    key = ("attention", "causal", "fp16", 4096, "forward")
    points = [Point(*key, "naive", 400.0, 2.0), Point(*key, "sdpa", 12.0, 0.5), Point(*key, "rewritten", 8.0, 1.0),
              Point("attention", "causal", "fp16", 65536, "forward", "naive", note="skipped (estimate 192 GiB)")]
    rows = add_ratios(points)
    assert rows[2]["memory_naive_over_op"] == 50.0 and rows[2]["memory_sdpa_over_op"] == 1.5
    assert rows[2]["time_op_over_sdpa"] == 2.0
    assert "memory_naive_over_op" not in rows[0] and "memory_naive_over_op" not in rows[3]
    table = markdown(rows).splitlines()
    assert len(table) == 2 + len(points)
    assert table[4].endswith("| rewritten | 8.0 | 1.00 | 50.0 | 1.5 | 2.00 |"), table[4]
    assert "skipped (estimate 192 GiB)" in table[5]
