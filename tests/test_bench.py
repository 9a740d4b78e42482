"""`rewriter bench` and `bench_onnx` / `bench_module`: table, JSON, PNG, skipped and failed points, errors."""

from __future__ import annotations

import json
import math
import os
import sys

import matplotlib.image
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from onnx_builders import attention_model

from rewriter.tools.bench import BenchInputError, _sweep, bench_module, bench_onnx, bind_dims
from rewriter.tools.bench_child import ChildFailed, run_json_child
from rewriter.tools.bench_result import BenchResult, BenchRow
from rewriter.cli import main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class NaiveAttention(torch.nn.Module):
    """softmax(q·kᵀ/√d)·v written out: the rewriter replaces it."""

    def forward(self, q, k, v):
        return (q @ k.transpose(-1, -2) / math.sqrt(q.size(-1))).softmax(-1) @ v


def tiny_attention(seq_len: int):
    """A bench factory: (module, example_inputs) at `seq_len`."""
    return NaiveAttention(), tuple(torch.randn(1, 2, seq_len, 16) for _ in range(3))


@pytest.fixture(scope="module")
def attention_path(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("models") / "attention.onnx")
    onnx.save(attention_model(heads=2, head_dim=64), path)
    return path


def _assert_png(path: str) -> None:
    with open(path, "rb") as png:
        assert png.read(8) == PNG_SIGNATURE
    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100


def test_cli_bench_prints_table_and_writes_json_and_png(attention_path, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    assert main(["bench", attention_path, "--lengths", "512,256", "--out-dir", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "naive peak" in stdout and "rewritten peak" in stdout and "x lower" in stdout
    assert f"wrote {out / 'bench.json'} and {out / 'bench.png'}" in stdout
    result = json.loads((out / "bench.json").read_text())
    assert result["config"]["lengths"] == [256, 512]
    assert result["config"]["dims"]["512"] == {"batch": 1, "q_len": 512}
    assert result["report"]["rewritten"] == 1
    rows = {(row["length"], row["impl"]): row for row in result["rows"]}
    assert set(rows) == {(n, impl) for n in (256, 512) for impl in ("naive", "rewritten")}
    for row in rows.values():
        assert row["status"] == "ok" and row["seconds"] > 0 and row["cpu_seconds"] >= 0 and row["extra_peak_mib"] >= 0
    assert rows[512, "naive"]["extra_peak_mib"] > 0  # the 2 MiB score matrix at least
    assert rows[512, "naive"]["estimated_peak_mib"] >= 2
    assert [r["length"] for r in result["ratios"]] == [256, 512] and result["ratios"][1]["memory_x_lower"] > 0
    _assert_png(str(out / "bench.png"))


def test_cli_bench_json_is_stdout_and_file(attention_path, tmp_path, capsys):
    assert main(["bench", attention_path, "--lengths", "128", "--out-dir", str(tmp_path), "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out) == json.loads((tmp_path / "bench.json").read_text())
    assert "naive peak" in captured.err and "[2/2] n=128 rewritten" in captured.err  # not a terminal: lines


def test_bench_onnx_skips_naive_points_over_the_memory_limit(attention_path):
    result = bench_onnx(attention_path, [256], memory_limit=1)
    naive, rewritten = result.row(256, "naive"), result.row(256, "rewritten")
    assert naive.status == "skipped" and naive.seconds is None and naive.estimated_peak_mib > 0
    assert rewritten.status == "ok" and rewritten.seconds > 0
    assert result.ratios(256) == (None, None)
    assert "skipped (est." in result.table()


def test_bench_module_eager_vs_rewritten(tmp_path):
    result = bench_module(tiny_attention, [128])
    assert result.config["model"] == f"{__name__}:tiny_attention"
    assert result.report.rewritten_count == 1
    assert [(r.impl, r.status) for r in result.rows] == [("naive", "ok"), ("rewritten", "ok")]
    assert all(r.seconds > 0 for r in result.rows)
    result.plot(str(tmp_path / "module.png"))
    _assert_png(str(tmp_path / "module.png"))


def test_a_dead_child_is_a_failed_point_and_the_sweep_goes_on(attention_path):
    with pytest.raises(ChildFailed, match="killed by SIGKILL"):
        run_json_child([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"], 60)
    with pytest.raises(ChildFailed, match="printed no measurement"):
        run_json_child([sys.executable, "-c", "print('done')"], 60)
    with pytest.raises(ChildFailed, match="timed out after 0.5 s"):
        run_json_child([sys.executable, "-c", "import time; time.sleep(30)"], 0.5)
    dims = {"batch": 1, "q_len": 64}
    spec = {"kind": "onnx", "threads": 1, "dims": dims, "warmup_dims": dims}
    points = [(BenchRow(64, "naive", "pending"), {**spec, "path": attention_path + ".missing"}),
              (BenchRow(64, "rewritten", "pending"), {**spec, "path": attention_path})]
    seen = []
    rows = _sweep(points, 60, lambda done, total, row: seen.append((done, total, row.status)))
    assert rows[0].status == "failed" and rows[0].note and rows[1].status == "ok"
    assert seen == [(0, 2, "running"), (1, 2, "failed"), (1, 2, "running"), (2, 2, "ok")]
    assert "failed points:" in BenchResult(rows, {}).table()


def test_bind_dims_tells_batch_from_sequence():
    inputs = [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s0"]),
              helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch_size", "kv_len", "heads_x"]),
              helper.make_tensor_value_info("pos", TensorProto.INT64, ["s0"])]
    model = helper.make_model(helper.make_graph([], "g", inputs, []))
    assert bind_dims(model, 300) == {"b": 1, "s0": 300, "batch_size": 1, "kv_len": 300, "heads_x": 300}
    assert bind_dims(model, 300, {"heads_x": 4, "b": 2})["heads_x"] == 4
    with pytest.raises(BenchInputError, match="no symbolic input dim"):
        bind_dims(model, 300, {"seq": 4})


def test_bench_onnx_refuses_a_model_with_nothing_rewritten(tmp_path):
    path = str(tmp_path / "near_miss.onnx")
    onnx.save(attention_model(scale="vector", q_len=7), path)  # a per-key scale: not attention's
    with pytest.raises(BenchInputError, match="nothing to compare"):
        bench_onnx(path, [7])


@pytest.mark.parametrize("argv, message", [
    (["bench", "missing.onnx"], "missing.onnx: no such file"),
    (["bench", "missing"], "give MODEL.onnx or MODULE:CALLABLE"),
    (["bench", "{model}", "--lengths", "1024,abc"], "--lengths takes positive integers"),
    (["bench", "{model}", "--lengths", "0"], "--lengths takes positive integers"),
    (["bench", "{model}", "--dim", "q_len"], "--dim takes NAME=SIZE"),
    (["bench", "{model}", "--training"], "--training applies to PyTorch models"),
    (["bench", "no_such_module_xyz:factory"], "cannot import no_such_module_xyz"),
    (["bench", "{model}", "--out-dir", "{out}/missing"], "directory does not exist"),
    (["bench", "{out}"], "is a directory"),
])
def test_cli_bench_bad_input_exits_2_and_writes_nothing(attention_path, tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    out.mkdir()
    argv = ["bench", *[arg.format(model=attention_path, out=out) for arg in argv[1:]]]
    if "--out-dir" not in argv:
        argv += ["--out-dir", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert os.listdir(out) == []


def test_cli_bench_help(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["bench", "--help"])
    out = capsys.readouterr().out
    assert exited.value.code == 0 and "MODEL.onnx|MODULE:CALLABLE" in out and "--lengths" in out


def test_cli_bench_writes_json_and_png_whole_or_not_at_all(attention_path, tmp_path, monkeypatch, capsys):
    """A plot that fails leaves neither file (nor a temporary) in --out-dir, and an older bench.json as it was."""
    import rewriter.tools.bench
    from rewriter.tools.bench_result import BenchResult

    def failing_plot(self, path):
        with open(path, "wb") as partial:
            partial.write(PNG_SIGNATURE)
        raise RuntimeError("plot failed")

    monkeypatch.setattr(rewriter.tools.bench, "bench_onnx", lambda *args, **kwargs: BenchResult([], {}))
    monkeypatch.setattr(BenchResult, "plot", failing_plot)
    (tmp_path / "bench.json").write_text("{}\n")
    assert main(["bench", attention_path, "--lengths", "256", "--out-dir", str(tmp_path)]) == 1
    assert "plot failed" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["bench.json"] and (tmp_path / "bench.json").read_text() == "{}\n"
