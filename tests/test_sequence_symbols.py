"""The memory estimate binds `--seq-len` to the dims detection proves are attention lengths, whatever
their names, and says which dims it bound."""

from __future__ import annotations

import json

import onnx
import onnx_ir as ir

from onnx_builders import attention_model
from passes.onnx.onnx_match import AnalysisContext
from rewriter.cli import main
from rewriter.onnx_api import detect_onnx, optimize_onnx
from passes.onnx.detect_softmax_attention import detect_softmax_attention
from passes.onnx.sequence_symbols import sequence_symbols


def _symbols(model: onnx.ModelProto) -> list[str]:
    ctx = AnalysisContext(ir.serde.deserialize_model(model))
    return sequence_symbols(ctx, detect_softmax_attention(ctx))


def test_query_and_key_lengths_are_found_by_role_not_name():
    assert _symbols(attention_model(q_len="s0")) == ["s0"]
    assert _symbols(attention_model(q_len="s0", k_len="s1", kt="permute")) == ["s0", "s1"]
    # batch is symbolic too but is no length; a static length binds nothing
    assert _symbols(attention_model(q_len=16)) == []


def test_reports_carry_the_symbols():
    model = attention_model(q_len="s0", k_len="s1")
    assert detect_onnx(model).sequence_dims == ["s0", "s1"]
    _, report = optimize_onnx(model, target="chunked")
    assert report.sequence_dims == ["s0", "s1"] and report.to_dict()["sequence_dims"] == ["s0", "s1"]


def test_inspect_binds_the_attention_lengths_and_says_so(tmp_path, capsys):
    path = str(tmp_path / "m.onnx")
    onnx.save(attention_model(q_len="s0"), path)  # an exporter's name: no "seq", "len" or "tokens" in it
    assert main(["inspect", path, "--seq-len", "1024", "--json"]) == 0
    memory = json.loads(capsys.readouterr().out)["memory_estimate"]
    assert memory["dims"] == {"s0": 1024} and memory["attention_dims"] == ["s0"] and memory["other_dims"] == ["batch"]
    # two heads of 1024 × 1024 fp32 scores: the naive graph holds at least one such matrix
    assert memory["before_bytes"] >= 2 * 1024 * 1024 * 4 > memory["after_bytes"]
    assert main(["inspect", path, "--seq-len", "1024"]) == 0
    assert "at s0=1024 (attention query/key length), batch=1:" in capsys.readouterr().out
