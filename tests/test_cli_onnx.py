"""`rewriter inspect` / `rewriter optimize` on files: results, JSON, and every bad input a user meets."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import onnx.numpy_helper
import pytest
import torch

from model_families import GPT2Model
from rewriter.cli import main


def rewriter_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rewriter", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def gpt2_onnx(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("models") / "gpt2.onnx")
    torch.manual_seed(0)
    model = GPT2Model().eval()
    seq = torch.export.Dim("seq", min=2, max=4096)
    torch.onnx.export(model, model.example_inputs(1, 16), path, dynamo=True, dynamic_shapes=({1: seq},),
                      opset_version=18, verbose=False)
    return path


def _digest(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


def test_optimize_verifies_writes_and_leaves_the_input_alone(gpt2_onnx, tmp_path):
    before = _digest(gpt2_onnx)
    output = str(tmp_path / "out.onnx")
    result = rewriter_cli("optimize", gpt2_onnx, "-o", output, "--verify", "--json", "--target", "chunked")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)  # stdout is exactly the report
    assert report["found"] == report["rewritten"] == 2 and report["verify"]["ok"]
    onnx.checker.check_model(output, full_check=True)
    assert _digest(gpt2_onnx) == before
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".rewriter-")]


def test_inspect_lists_blocks(gpt2_onnx):
    result = rewriter_cli("inspect", gpt2_onnx)
    assert result.returncode == 0 and "found 2 attention blocks" in result.stdout
    report = json.loads(rewriter_cli("inspect", gpt2_onnx, "--json", "--seq-len", "4096").stdout)
    assert report["found"] == 2 and report["memory_estimate"]["dims"] == {"seq": 4096}
    assert report["memory_estimate"]["after_bytes"] * 8 < report["memory_estimate"]["before_bytes"]


def _bad(tmp_path, name: str, content: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(content)
    return str(path)


def _no_attention_model(tmp_path) -> str:
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 3])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "relu", [x], [y])
    path = str(tmp_path / "relu.onnx")
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)]), path)
    return path


def _future_opset_model(tmp_path) -> str:
    path = _no_attention_model(tmp_path)
    model = onnx.load(path)
    model.opset_import[0].version = 99
    onnx.save(model, path)
    return path


def _without_its_data(tmp_path) -> str:
    """A model saved with external data, copied without its `.onnx.data` (as users copy only the .onnx)."""
    path = _no_attention_model(tmp_path)
    model = onnx.load(path)
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.ones((64, 64), np.float32), "w"))
    saved = tmp_path / "weights" / "model.onnx"
    saved.parent.mkdir()
    onnx.save(model, str(saved), save_as_external_data=True, location="model.onnx.data", size_threshold=0)
    (tmp_path / "copied").mkdir()
    copy = tmp_path / "copied" / "model.onnx"
    copy.write_bytes(saved.read_bytes())
    return str(copy)


@pytest.mark.parametrize("case", ["truncated", "not onnx", "missing file", "future opset", "missing directory",
                                  "output is input", "bad chunk size", "bad budget", "missing external data",
                                  "directory as model", "unknown option", "checker rejects", "directory as output",
                                  "output under a file", "zero seq len", "device as model"])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, gpt2_onnx, tmp_path):
    output = str(tmp_path / "out.onnx")
    model = gpt2_onnx
    extra = []
    if case == "truncated":
        model = _bad(tmp_path, "cut.onnx", _digest(gpt2_onnx)[:5000])
    elif case == "not onnx":
        model = _bad(tmp_path, "notes.onnx", b"these are not the weights you are looking for\n")
    elif case == "missing file":
        model = str(tmp_path / "absent.onnx")
    elif case == "future opset":
        model = _future_opset_model(tmp_path)
    elif case == "missing directory":
        output = str(tmp_path / "no" / "such" / "dir" / "out.onnx")
    elif case == "output is input":
        output = gpt2_onnx
    elif case == "bad chunk size":
        extra = ["--chunk-size", "12,x"]
    elif case == "bad budget":
        extra = ["--memory-budget", "lots"]
    elif case == "missing external data":
        model = _without_its_data(tmp_path)
    elif case == "directory as model":
        model = str(tmp_path)
    elif case == "device as model":
        model = os.devnull
    elif case == "unknown option":
        extra = ["--chunk-sise", "64"]
    elif case == "directory as output":
        output = str(tmp_path)
    elif case == "output under a file":
        output = os.path.join(gpt2_onnx, "out.onnx")
    elif case == "zero seq len":
        extra = ["--seq-len", "0"]
    elif case == "checker rejects":  # a node reads a value nothing produces
        model = _no_attention_model(tmp_path)
        broken = onnx.load(model)
        broken.graph.node[0].input[0] = "nowhere"
        onnx.save(broken, model)
    before = _digest(gpt2_onnx)
    result = rewriter_cli("optimize", model, "-o", output, *extra)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr, result.stderr
    assert not os.path.isfile(output) or output == gpt2_onnx
    assert _digest(gpt2_onnx) == before
    expected = {"missing external data": os.path.join("copied", "model.onnx.data"),
                "directory as model": "is a directory", "unknown option": "unrecognized arguments: --chunk-sise",
                "checker rejects": "invalid ONNX model", "directory as output": "is a directory",
                "output under a file": "is not a directory", "zero seq len": "expected a positive integer",
                "device as model": "not a regular file"}
    assert expected.get(case, "") in result.stderr and "internal error" not in result.stderr, result.stderr


def test_help_gives_the_defaults_of_block_options():
    result = rewriter_cli("optimize", "--help")
    text = " ".join(result.stdout.split())
    assert result.returncode == 0 and "default 32MiB" in text and "up to 1024,4096" in text


def test_model_without_attention_is_fine(tmp_path):
    path = _no_attention_model(tmp_path)
    result = rewriter_cli("optimize", path, "-o", str(tmp_path / "out.onnx"))
    assert result.returncode == 0 and "found 0 attention blocks" in result.stdout


def test_missing_onnxruntime_says_how_to_install_it(gpt2_onnx, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now fails as if absent
    output = tmp_path / "out.onnx"
    assert main(["optimize", gpt2_onnx, "-o", str(output), "--verify"]) == 2
    stderr = capsys.readouterr().err.strip()
    assert stderr.count("\n") == 0 and "needs onnxruntime" in stderr and "[cpu]" in stderr
    assert not output.exists()


def _drop_accumulator_rescale(monkeypatch):
    """Break the chunked lowering between key blocks only: the carried accumulator is no longer
    rescaled by exp(m_old − m_new), which is exact while there is one key block and wrong after."""
    from rewriter.kernels import onnx_chunked_attention

    key_body = onnx_chunked_attention._Builder._key_body

    def broken(self, *args):
        graph = key_body(self, *args)
        add = graph.outputs[3].producer()  # acc_new = acc·rescale + P·V
        assert add.op_type == "Add" and add.inputs[0].producer().op_type == "Mul"
        add.replace_input_with(0, graph.inputs[4])  # acc_new = acc + P·V
        return graph

    monkeypatch.setattr(onnx_chunked_attention._Builder, "_key_body", broken)


def test_verify_catches_a_lowering_wrong_only_across_blocks(gpt2_onnx, tmp_path, monkeypatch, capsys):
    from rewriter.onnx_api import optimize_onnx
    from rewriter.verify import verify_onnx

    _drop_accumulator_rescale(monkeypatch)
    broken, _ = optimize_onnx(gpt2_onnx, target="chunked")
    original = onnx.load(gpt2_onnx)
    assert verify_onnx(original, broken, default_dim=64).ok  # one block (1024 × 4096): a check at 64 misses it
    output = tmp_path / "out.onnx"
    assert main(["optimize", gpt2_onnx, "-o", str(output), "--target", "chunked", "--verify"]) == 1
    stderr = capsys.readouterr().err
    assert "verification failed" in stderr and "blocks differs at length" in stderr, stderr
    assert not output.exists()


def test_verify_says_which_lengths_it_used(gpt2_onnx, tmp_path):
    result = rewriter_cli("optimize", gpt2_onnx, "-o", str(tmp_path / "out.onnx"), "--verify", "--json",
                          "--target", "chunked", "--chunk-size", "8,16")
    verify = json.loads(result.stdout)["verify"]
    assert verify["ok"] and verify["lengths"] == [1, 25, 38]  # over one and over two 16-key blocks, partial
    assert "verified the written model at lengths 1, 25, 38" in result.stderr + result.stdout
