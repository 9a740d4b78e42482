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


def test_dynamo_paths_of_a_compiled_function_read_as_the_users_names():
    assert _plain_path("L['s'].a") == "s.a" and _plain_path("G['model'].d['x']") == "model.d.x"
    assert _plain_path("L['s'].layers[0]") == "s.layers.0" and _plain_path("L['self']") == ""


class _Attention(torch.nn.Module):
    def forward(self, q):
        return torch.softmax(q @ q.transpose(-1, -2) * 0.3, dim=-1) @ q


class _Stack(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = _Attention()
        self.layers = torch.nn.ModuleList([_Attention()])


def test_compile_backend_names_a_functions_module_argument_by_its_name():
    def step(s, q):
        return s.layers[0](s.a(q))

    rewriter.compile_reports(clear=True)
    torch.compile(step, backend="rewriter", options={"compiler": "eager"})(_Stack(), torch.randn(1, 2, 16, 8))
    [report] = rewriter.compile_reports(clear=True)
    assert [m.module for m in report.matches] == ["s.a", "s.layers.0"], report.summary()
    assert "s.a (node " in report.summary()
