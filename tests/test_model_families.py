"""Whole-model rewrites of BERT, GPT-2 (eager and SDPA), LLaMA and T5 look-alikes.

Each family's small model (`tests/model_families.py`) is exported at its example shapes (the default
dynamic capture is tests/test_dynamic_lengths.py's), optimised, and compared with
eager PyTorch: every attention block must become one `rewriter::attention` call, and outputs and
gradients must match.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import pytest
import torch

import rewriter
import rewriter.kernels.attention_op  # noqa: F401  (registers torch.ops.rewriter.attention)
from model_families import (
    HIDDEN,
    LAYERS,
    BertAttention,
    BertModel,
    GPT2Attention,
    GPT2Model,
    GPT2SdpaAttention,
    GPT2SdpaModel,
    LlamaAttention,
    LlamaModel,
    LlamaRotaryEmbedding,
    T5Attention,
    T5EncoderModel,
    additive_padding_mask,
    llama_causal_mask,
    padding_mask,
)
from parity import assert_gradients_close

BATCH, SEQ = 2, 24
ATTENTION_OP = torch.ops.rewriter.attention.default

FAMILIES: dict[str, Callable[[], torch.nn.Module]] = {
    "bert": BertModel,
    "gpt2": GPT2Model,
    "gpt2-sdpa": GPT2SdpaModel,
    "llama": LlamaModel,  # 4 query heads, 2 KV heads
    # The same with one KV head per query head, to tell grouped-query problems from the rest.
    "llama-mha": functools.partial(LlamaModel, kv_heads=4),
    "t5": T5EncoderModel,
}


def _build(name: str, dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    return FAMILIES[name]().eval().to(dtype)


@functools.lru_cache(maxsize=None)
def _optimized(name: str):
    """(model, example inputs, GraphModule, report) for `name` in fp32, exported once per session."""
    model = _build(name)
    inputs = model.example_inputs(BATCH, SEQ)
    gm, report = rewriter.optimize_module(model, inputs, dynamic_shapes=None)
    return model, inputs, gm, report


def _attention_ops(gm: torch.fx.GraphModule) -> int:
    return sum(node.target is ATTENTION_OP for node in gm.graph.nodes)


def _assert_rewritten(gm, report, blocks: int) -> None:
    summary = report.summary()
    assert len(report.matches) == blocks, summary
    assert all(match.rewritten for match in report.matches), summary
    assert _attention_ops(gm) == blocks, summary


def _loss(output: torch.Tensor) -> torch.Tensor:
    weights = torch.randn(output.shape, generator=torch.Generator().manual_seed(1), dtype=output.dtype)
    return (output * weights).sum()


def _matching_parameters(model: torch.nn.Module, gm: torch.fx.GraphModule):
    """Pairs (name, model parameter, GraphModule parameter), matched by name up to '.' vs '_'."""
    by_key = {name.replace(".", "_"): (name, parameter) for name, parameter in model.named_parameters()}
    pairs = []
    for gm_name, gm_parameter in gm.named_parameters():
        name, parameter = by_key.pop(gm_name.replace(".", "_"))
        pairs.append((name, parameter, gm_parameter))
    assert not by_key, f"parameters missing from the GraphModule: {sorted(by_key)}"
    return pairs


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_attention_block_is_rewritten(name):
    _, _, gm, report = _optimized(name)
    _assert_rewritten(gm, report, LAYERS)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_forward_matches_eager(name):
    model, inputs, gm, report = _optimized(name)
    _assert_rewritten(gm, report, LAYERS)
    with torch.no_grad():
        torch.testing.assert_close(gm(*inputs), model(*inputs), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_parameter_gradients_match_eager(name):
    model, inputs, gm, report = _optimized(name)
    _assert_rewritten(gm, report, LAYERS)
    pairs = _matching_parameters(model, gm)
    # autograd.grad, not backward(): the GraphModule may share its parameters with the model.
    expected = torch.autograd.grad(_loss(model(*inputs)), [parameter for _, parameter, _ in pairs])
    actual = torch.autograd.grad(_loss(gm(*inputs)), [parameter for _, _, parameter in pairs])
    for (parameter_name, _, _), want, got in zip(pairs, expected, actual):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=lambda m, n=parameter_name: f"{n}: {m}")


def _attention_block(name: str):
    """One attention module and float inputs (hidden states plus its mask, bias or rotary tables)."""
    torch.manual_seed(0)
    hidden = torch.randn(BATCH, SEQ, HIDDEN)
    if name == "bert":
        return BertAttention().eval(), (hidden, additive_padding_mask(padding_mask(BATCH, SEQ), torch.float32))
    if name in ("gpt2", "gpt2-sdpa"):
        return (GPT2Attention if name == "gpt2" else GPT2SdpaAttention)().eval(), (hidden,)
    if name in ("llama", "llama-mha"):
        attention = LlamaAttention(kv_heads=2 if name == "llama" else 4).eval()
        cos, sin = LlamaRotaryEmbedding(attention.head_dim)(hidden, torch.arange(SEQ)[None])
        return attention, (hidden, cos, sin, llama_causal_mask(SEQ, torch.float32))
    attention = T5Attention(has_relative_attention_bias=True).eval()
    mask = additive_padding_mask(padding_mask(BATCH, SEQ), torch.float32)
    position_bias = attention.compute_bias(SEQ, SEQ).detach() + mask
    return _FirstOutput(attention), (hidden, mask, position_bias)


class _FirstOutput(torch.nn.Module):
    """T5Attention returns (output, position_bias); keep the output."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, *args):
        return self.inner(*args)[0]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_attention_block_input_gradients_match_eager(name):
    """Gradients reach the hidden states and every float side input (mask, bias, cos/sin)."""
    module, inputs = _attention_block(name)
    gm, report = rewriter.optimize_module(module, inputs, dynamic_shapes=None)
    _assert_rewritten(gm, report, 1)
    eager_inputs = [x.clone().requires_grad_() for x in inputs]
    graph_inputs = [x.clone().requires_grad_() for x in inputs]
    expected_out, actual_out = module(*eager_inputs), gm(*graph_inputs)
    torch.testing.assert_close(actual_out, expected_out, atol=1e-5, rtol=1e-4)
    expected = torch.autograd.grad(_loss(expected_out), eager_inputs, allow_unused=True)
    assert_gradients_close(torch.autograd.grad(_loss(actual_out), graph_inputs, allow_unused=True), expected)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_bf16_forward_matches_eager(name):
    model = _build(name, torch.bfloat16)
    inputs = model.example_inputs(BATCH, SEQ)
    gm, report = rewriter.optimize_module(model, inputs, dynamic_shapes=None)
    _assert_rewritten(gm, report, LAYERS)
    with torch.no_grad():
        torch.testing.assert_close(gm(*inputs), model(*inputs), atol=3e-2, rtol=2e-2)


def test_bert_report_says_masked():
    _, _, _, report = _optimized("bert")
    assert [m.masked for m in report.matches] == [True] * LAYERS, report.summary()
    assert [m.causal for m in report.matches] == [False] * LAYERS, report.summary()


@pytest.mark.parametrize("name", ["gpt2", "gpt2-sdpa"])
def test_gpt2_report_says_causal(name):
    _, _, _, report = _optimized(name)
    assert [m.causal for m in report.matches] == [True] * LAYERS, report.summary()
    assert [m.masked for m in report.matches] == [False] * LAYERS, report.summary()


def test_llama_mha_report_says_causal():
    _, _, _, report = _optimized("llama-mha")
    assert [(m.causal, m.spec.num_heads, m.spec.num_kv_heads) for m in report.matches] == [(True, 4, 4)] * LAYERS


def test_llama_attention_reads_key_value_heads_before_repeat_kv():
    """The op gets K and V with 2 heads, not the 4-head copies repeat_kv makes."""
    _, _, gm, _ = _optimized("llama")
    calls = [node for node in gm.graph.nodes if node.target is ATTENTION_OP]
    assert calls
    for call in calls:
        query, key, value = (arg.meta["val"].shape for arg in call.args[:3])
        assert (query[1], key[1], value[1]) == (4, 2, 2)


def test_llama_report_says_grouped_query_causal():
    _, _, _, report = _optimized("llama")
    traits = [(m.causal, m.spec.num_heads, m.spec.num_kv_heads) for m in report.matches]
    assert traits == [(True, 4, 2)] * LAYERS, report.summary()


def test_t5_report_says_additive_mask():
    _, _, _, report = _optimized("t5")
    assert [m.spec.mask_kind for m in report.matches] == ["additive"] * LAYERS, report.summary()
    assert not any(m.causal for m in report.matches), report.summary()
