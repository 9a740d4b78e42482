"""Files and exports share one lowering: the same block, reached through `optimize_onnx` on a plain
export and through `export_onnx`, becomes structurally the same subgraph for every target."""

from __future__ import annotations

import collections

import onnx
import pytest
import torch
from torch import nn

import rewriter

SEQ, HEADS, HEAD_DIM = 12, 2, 8


class CausalAttention(nn.Module):
    """Hand-written causal attention on (B, H, L, D) inputs, mask sliced from a tril buffer."""

    def __init__(self):
        super().__init__()
        self.register_buffer("tril", torch.tril(torch.ones(SEQ, SEQ, dtype=torch.bool)))

    def forward(self, q, k, v):
        scores = (q @ k.transpose(-2, -1)) * HEAD_DIM**-0.5
        length = q.shape[-2]
        scores = scores.masked_fill(~self.tril[:length, :length], float("-inf"))
        return scores.softmax(dim=-1) @ v


class PlainAttention(nn.Module):
    def forward(self, q, k, v):
        return ((q @ k.transpose(-2, -1)) / HEAD_DIM**0.5).softmax(dim=-1) @ v


def _op_types(model: onnx.ModelProto) -> collections.Counter:
    """Op types of every node, subgraphs included, Constants left out (exporters fold differently)."""
    counts = collections.Counter()

    def visit(graph):
        for node in graph.node:
            if node.op_type != "Constant":
                counts[(node.domain or "", node.op_type)] += 1
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.GRAPH:
                    visit(attribute.g)

    visit(model.graph)
    return counts


@pytest.mark.parametrize("module", [CausalAttention, PlainAttention])
@pytest.mark.parametrize("target", ["chunked", "ort", "onnx-attention"])
def test_file_and_export_lower_a_block_to_the_same_subgraph(module, target, tmp_path):
    torch.manual_seed(0)
    model = module().eval()
    inputs = tuple(torch.randn(1, HEADS, SEQ, HEAD_DIM) for _ in range(3))
    opset = 23 if target == "onnx-attention" else 18
    exported = tmp_path / "exported.onnx"
    # At the plain export's fixed shapes (a tril-buffer mask is proven causal only there, see README)
    report = rewriter.export_onnx(model, inputs, str(exported), target=target, opset=opset, chunk_size=(4, 8),
                                  dynamic_shapes=None)
    assert [match.rewritten for match in report.matches] == [True]

    plain = tmp_path / "plain.onnx"
    torch.onnx.export(model, inputs, str(plain), dynamo=True, opset_version=opset, external_data=False)
    optimized, file_report = rewriter.optimize_onnx(str(plain), target=target, chunk_size=(4, 8))
    assert [match.rewritten for match in file_report.matches] == [True]
    assert file_report.matches[0].target == report.matches[0].target
    assert file_report.matches[0].causal == report.matches[0].causal == (module is CausalAttention)

    from_export, from_file = _op_types(onnx.load(str(exported))), _op_types(optimized)
    assert from_export == from_file, (from_export - from_file, from_file - from_export)
