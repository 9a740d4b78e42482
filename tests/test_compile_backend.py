"""`torch.compile(model, backend="rewriter")`: found by name, rewrites, matches eager forward and backward."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import rewriter.compile_backend
from model_families import LAYERS, BertModel, GPT2Model, GPT2SdpaModel, LlamaModel, T5EncoderModel
from parity import ATTENTION_OP


def test_backend_is_registered_by_entry_point():
    code = "import torch._dynamo; assert 'rewriter' in torch._dynamo.list_backends(), torch._dynamo.list_backends()"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


@pytest.fixture
def rewritten_graphs(monkeypatch):
    """The ATen graphs the backend produced, recorded as it compiles."""
    graphs = []
    original = rewriter.compile_backend.rewrite_graph_module

    def record(gm, *args, **kwargs):
        report = original(gm, *args, **kwargs)
        graphs.append(gm)
        return report

    monkeypatch.setattr(rewriter.compile_backend, "rewrite_graph_module", record)
    return graphs


def _loss(output):
    return (output * torch.linspace(-1, 1, output.shape[-1])).sum()


@pytest.mark.parametrize("compiler", ["eager", "aot_eager"])
@pytest.mark.parametrize("family", [GPT2Model, LlamaModel])
def test_compiled_forward_and_backward_match_eager(family, compiler, rewritten_graphs):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = family().eval()
    inputs = model.example_inputs(2, 24)
    compiled = torch.compile(model, backend="rewriter", options={"compiler": compiler, "chunk_size": (8, 16)})
    expected, actual = model(*inputs), compiled(*inputs)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-4)
    parameters = list(model.parameters())
    for want, got in zip(torch.autograd.grad(_loss(expected), parameters), torch.autograd.grad(_loss(actual), parameters)):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert sum(node.target is ATTENTION_OP for gm in rewritten_graphs for node in gm.graph.nodes) == 2


@pytest.mark.parametrize("family", [BertModel, GPT2SdpaModel, T5EncoderModel])
def test_other_families_compiled_match_eager(family, rewritten_graphs):
    """The rest of the foundation's families (padding mask, SDPA calls, unscaled relative bias)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = family().eval()
    inputs = model.example_inputs(2, 24)
    compiled = torch.compile(model, backend="rewriter", options={"compiler": "eager", "chunk_size": (8, 16)})
    expected, actual = model(*inputs), compiled(*inputs)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-4)
    parameters = [p for p in model.parameters() if p.requires_grad]
    for want, got in zip(torch.autograd.grad(_loss(expected), parameters, allow_unused=True),
                         torch.autograd.grad(_loss(actual), parameters, allow_unused=True)):
        if want is not None:
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert sum(node.target is ATTENTION_OP for gm in rewritten_graphs for node in gm.graph.nodes) == LAYERS


def test_inductor_compiles_the_rewritten_graph(rewritten_graphs):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = GPT2Model().eval()
    inputs = model.example_inputs(1, 16)
    compiled = torch.compile(model, backend=rewriter.backend)
    torch.testing.assert_close(compiled(*inputs), model(*inputs), atol=1e-5, rtol=1e-4)
    assert rewritten_graphs


def test_graph_breaks_compile_each_piece(rewritten_graphs):
    torch._dynamo.reset()

    def attention_with_break(q, k, v):
        probs = (q @ k.transpose(-1, -2) * 0.25).softmax(-1)
        torch._dynamo.graph_break()
        return probs @ v, (q @ k.transpose(-1, -2)).softmax(-1) @ v

    q, k, v = (torch.randn(1, 2, 8, 4) for _ in range(3))
    compiled = torch.compile(attention_with_break, backend="rewriter", options={"compiler": "eager"})
    for want, got in zip(attention_with_break(q, k, v), compiled(q, k, v)):
        torch.testing.assert_close(got, want)
    assert len(rewritten_graphs) == 2  # one graph per side of the break; only the second holds attention


@pytest.mark.parametrize("dynamic", [None, True])
def test_dynamic_lengths_are_rewritten_once_for_all(dynamic, rewritten_graphs):
    """dynamic=None: the second length recompiles with a symbolic length; dynamic=True: symbolic from the start.

    Either way the symbolic graph holds the op and serves the later lengths without recompiling.
    """
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = GPT2Model().eval()
    compiled = torch.compile(model, backend="rewriter", options={"compiler": "aot_eager"}, dynamic=dynamic)
    parameters = list(model.parameters())
    graphs_after = []
    for length in (12, 20, 27, 9):
        ids = model.example_inputs(1, length)
        expected, actual = model(*ids), compiled(*ids)
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-4)
        for want, got in zip(torch.autograd.grad(_loss(expected), parameters),
                             torch.autograd.grad(_loss(actual), parameters)):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        graphs_after.append(len(rewritten_graphs))
    assert graphs_after[1] == graphs_after[2] == graphs_after[3]  # no compile after the symbolic one
    last = rewritten_graphs[-1]
    assert any(isinstance(node.meta.get("val"), torch.SymInt) for node in last.graph.find_nodes(op="placeholder"))
    assert sum(node.target is ATTENTION_OP for node in last.graph.nodes) == 2


def test_unknown_compiler_is_refused():
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: x + 1, backend="rewriter", options={"compiler": "tvm"})
    with pytest.raises(Exception, match="compiler must be one of"):
        compiled(torch.ones(2))


def test_each_compiled_graph_is_summarised_and_its_report_kept(caplog):
    import logging

    import rewriter

    torch.manual_seed(0)
    model = GPT2Model().eval()
    compiled = torch.compile(model, backend="rewriter", options={"compiler": "eager"})
    rewriter.compile_reports(clear=True)
    with caplog.at_level(logging.INFO, logger="rewriter.compile_backend"):
        compiled(*model.example_inputs(1, 16))
    [report] = rewriter.compile_reports()
    assert report.rewritten_count == 2 and [m.module for m in report.matches] == ["h.0.attn", "h.1.attn"]
    summaries = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert len(summaries) == 1 and "rewrote 2" in summaries[0] and "h.1.attn (node " in summaries[0]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


class _SoftmaxOverQueries(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, q, k, v):
        return self.proj(torch.softmax(q @ k.transpose(-1, -2), dim=-2) @ v)


def test_a_block_left_alone_is_a_warning_once_with_its_reason(caplog):
    import logging

    import rewriter

    module = _SoftmaxOverQueries()
    compiled = torch.compile(module, backend="rewriter", options={"compiler": "eager"}, dynamic=False)
    rewriter.compile_reports(clear=True)
    with caplog.at_level(logging.INFO, logger="rewriter.compile_backend"):
        for length in (6, 9):  # a recompile for the second shape: a second report, no second warning
            compiled(*(torch.randn(1, 2, length, 8) for _ in range(3)))
    assert len(rewriter.compile_reports()) == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "left alone" in warnings[0] and "key axis" in warnings[0], warnings
