"""Reports name each block by the module it comes from, in both IRs, with the node name kept."""

from __future__ import annotations

import torch

import rewriter
from model_families import GPT2Model, LlamaModel
from onnx_builders import attention_model
from rewriter.module_paths import _plain_path


def test_fx_reports_name_hf_layers():
    torch.manual_seed(0)
    model = LlamaModel().eval()
    _, report = rewriter.optimize_module(model, model.example_inputs(1, 16))
    assert [m.module for m in report.matches] == ["layers.0.self_attn", "layers.1.self_attn"]
    assert all(m.node and m.to_dict()["node"] == m.node for m in report.matches)
    assert "layers.1.self_attn (node " in report.summary()


def test_onnx_reports_name_the_exported_layers(tmp_path):
    torch.manual_seed(0)
    model = GPT2Model().eval()
    path = str(tmp_path / "gpt2.onnx")
    torch.onnx.export(model, model.example_inputs(1, 16), path, dynamo=True, opset_version=18, verbose=False)
    for report in (rewriter.detect_onnx(path), rewriter.optimize_onnx(path)[1]):
        assert [m.to_dict()["module"] for m in report.matches] == ["h.0.attn", "h.1.attn"], report.summary()
        assert all(m.node.startswith("node_") for m in report.matches)


def test_a_model_without_scopes_keeps_the_node_name():
    [match] = rewriter.detect_onnx(attention_model()).matches
    assert match.module is None and match.where == match.node


def test_dynamo_paths_read_as_module_paths():
    assert _plain_path("L['self'].h[0].attn") == "h.0.attn" and _plain_path("transformer.h.0.attn") == "transformer.h.0.attn"
