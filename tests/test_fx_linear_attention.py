"""Performer / linear attention in exported FX graphs: detection, near-misses, rewrite parity (fwd + bwd)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch
from torch import nn

from passes.fx.detect_linear_attention import detect_linear_attention
from rewriter.torch_api import capture, optimize_module
from tests.parity import assert_module_parity as _assert_parity
from tests.performer_models import FastAttention, FeaturesReused, PerformerEncoder, PerformerLM, SwappedBatchAxes

TARGET = "rewriter::linear_attention"


pytestmark = pytest.mark.usefixtures("one_thread")


def _qkv(length, batch=2, heads=2, dim=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, heads, length, dim, generator=generator) for _ in range(3))


def _ops(gm) -> list[str]:
    return [str(node.target) for node in gm.graph.nodes if node.op == "call_function"]


def _rewritten(report):
    return [m for m in report.matches if m.kind == "performer" and m.rewritten]


# --------------------------------------------------------------------------- FastAttention parity


@pytest.mark.parametrize("features", ["favor", "relu", "relu_no_projection"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("length", [1, 37, 300])
def test_fast_attention_parity(features, causal, length):
    model = FastAttention(8, nb_features=12, causal=causal, generalized_attention=features != "favor",
                          near_miss="no_projection" if features == "relu_no_projection" else None).eval()
    inputs = _qkv(length)
    gm, report = optimize_module(model, inputs)
    [match] = _rewritten(report)
    assert match.spec.causal == causal and match.target == TARGET
    assert match.spec.feature_map == ("favor_softmax" if features == "favor" else "relu")
    assert _ops(gm).count("rewriter.linear_attention.default") == 1
    assert not any("einsum" in op or "cumsum" in op or "exp" in op for op in _ops(gm))
    _assert_parity(model, gm, inputs)


@pytest.mark.parametrize("features", ["favor", "relu"])
@pytest.mark.parametrize("length", [1, 29])
def test_matmul_form_of_bidirectional_attention(features, length):
    model = FastAttention(8, nb_features=12, generalized_attention=features == "relu", variant="matmul",
                          learned_projection=True).eval()
    inputs = _qkv(length)
    gm, report = optimize_module(model, inputs)
    [match] = _rewritten(report)
    assert not match.spec.causal
    assert not any("matmul" in op for op in _ops(gm))
    assert _assert_parity(model, gm, inputs) == 1


@pytest.mark.parametrize("features", ["favor", "relu"])
def test_gradient_reaches_a_learned_projection(features):
    model = FastAttention(8, nb_features=12, generalized_attention=features == "relu", learned_projection=True,
                          causal=True).eval()
    inputs = _qkv(19)
    gm, report = optimize_module(model, inputs)
    assert len(_rewritten(report)) == 1
    assert _assert_parity(model, gm, inputs) == 1


def test_elu_plus_one_features():
    inputs = _qkv(21)
    gm, report = optimize_module(_EluPlusOne().eval(), inputs)
    assert len(_rewritten(report)) == 1, [m.reason for m in report.matches]
    match = _rewritten(report)[0]
    assert match.spec.feature_map == "elu_plus_one"
    _assert_parity(_EluPlusOne().eval(), gm, inputs)


class _EluPlusOne(nn.Module):
    """Katharopoulos et al.: φ(x) = elu(x) + 1, no projection, bidirectional."""

    def forward(self, q, k, v):
        from tests.performer_models import linear_attention
        q, k = (torch.nn.functional.elu(t) + 1 for t in (q, k))
        return linear_attention(q, k, v)


# --------------------------------------------------------------------------- whole models


def test_bidirectional_encoder_parity_forward_and_parameter_grads():
    model = PerformerEncoder(dim=32, depth=2, heads=2).eval()
    x = torch.randn(2, 45, 32, generator=torch.Generator().manual_seed(1))
    gm, report = optimize_module(model, (x,))
    assert len(_rewritten(report)) == 2
    assert all(not m.spec.causal for m in _rewritten(report))
    assert _assert_parity(model, gm, (x,)) > 0


def test_causal_lm_parity_forward_and_parameter_grads():
    model = PerformerLM(vocab=50, dim=32, depth=2, heads=2, max_len=128).eval()
    tokens = torch.randint(0, 50, (2, 33), generator=torch.Generator().manual_seed(2))
    gm, report = optimize_module(model, (tokens,))
    assert len(_rewritten(report)) == 2
    assert all(m.spec.causal for m in _rewritten(report))
    assert _assert_parity(model, gm, (tokens,)) > 0


# --------------------------------------------------------------------------- near-misses


@pytest.mark.parametrize("near_miss,reason", [
    ("global_stabiliser", "stabiliser reduces axes [0, 1, 2, 3]"),
    ("normaliser_axis", "key sum"),
])
def test_near_misses_are_left_alone_with_a_reason(near_miss, reason):
    model = FastAttention(8, nb_features=12, near_miss=near_miss).eval()
    inputs = _qkv(10)
    gm, report = optimize_module(model, inputs)
    performer = [m for m in report.matches if m.kind == "performer"]
    assert performer and not any(m.rewritten for m in performer)
    assert any(reason in (m.reason or "") for m in performer), [m.reason for m in performer]
    assert "rewriter.linear_attention.default" not in _ops(gm)
    _assert_parity(model, gm, inputs)


@pytest.mark.parametrize("causal", [False, True])
def test_projection_passed_as_input_is_an_operand(causal):
    """Ω as a graph input (as torch.compile lifts the module's buffer) is the op's operand; its gradient flows."""
    model = FastAttention(8, nb_features=12, causal=causal, chunk_size=3).eval()
    inputs = _qkv(10) + (torch.randn(12, 8),)
    gm, report = optimize_module(model, inputs, dynamic_shapes=None)  # a dynamic M is refused earlier
    [match] = _rewritten(report)
    [call] = [node for node in gm.graph.nodes if node.target is torch.ops.rewriter.linear_attention.default]
    assert call.args[3].op == "placeholder"
    _assert_parity(model, gm, inputs)


class _TwoProjections(nn.Module):
    """q and k projected by different inputs: not one feature map."""

    def forward(self, q, k, v, omega_q, omega_k):
        from tests.performer_models import linear_attention, softmax_kernel

        return linear_attention(softmax_kernel(q, projection_matrix=omega_q, is_query=True),
                                softmax_kernel(k, projection_matrix=omega_k, is_query=False), v)


def test_projections_of_q_and_k_from_different_inputs_are_left_alone():
    inputs = _qkv(10) + (torch.randn(12, 8), torch.randn(12, 8))
    gm = capture(_TwoProjections(), inputs, dynamic_shapes=None)
    [match] = detect_linear_attention(gm)
    assert not match.spec.accepted and "different feature maps" in match.spec.reason


# --------------------------------------------------------------------------- chunked causal form


@pytest.mark.parametrize("features", ["favor", "relu"])
@pytest.mark.parametrize("chunks,length", [(3, 10), (4, 37), (1, 9)])
def test_chunked_carry_causal_is_one_block(features, chunks, length):
    model = FastAttention(8, nb_features=12, causal=True, chunk_size=chunks, chunk_eps=0.0,
                          generalized_attention=features == "relu", learned_projection=True).eval()
    inputs = _qkv(length)
    gm, report = optimize_module(model, inputs)
    performer = [m for m in report.matches if m.kind == "performer"]
    assert len(performer) == 1 and performer[0].rewritten and performer[0].spec.causal
    assert _ops(gm).count("rewriter.linear_attention.default") == 1
    assert not any(op in ("aten.cumsum.default", "aten.cat.default", "aten.chunk.default") for op in _ops(gm))
    assert _assert_parity(model, gm, inputs) == 1


@pytest.mark.parametrize("eps", [1e-6, 0.25])
def test_chunked_with_epsilon_inside_the_prefix_sum(eps):
    """φ(q)·(Σφ(k) + ε) = φ(q)·Σφ(k) + ε·Σφ(q): the op's key_sum_epsilon, forward and backward."""
    model = FastAttention(8, nb_features=12, causal=True, chunk_size=3, chunk_eps=eps, learned_projection=True).eval()
    inputs = _qkv(10)
    gm, report = optimize_module(model, inputs)
    [match] = [m for m in report.matches if m.kind == "performer"]
    assert match.rewritten, match.reason
    [call] = [node for node in gm.graph.nodes if node.target is torch.ops.rewriter.linear_attention.default]
    assert call.args[-1] == eps
    assert _assert_parity(model, gm, inputs) == 1


def test_an_intermediate_used_elsewhere_blocks_the_rewrite():
    model = FeaturesReused().eval()
    inputs = _qkv(10)
    gm, report = optimize_module(model, inputs)
    [match] = [m for m in report.matches if m.kind == "performer"]
    assert not match.rewritten and "also used by" in match.reason
    torch.testing.assert_close(gm(*inputs), model(*inputs))


# --------------------------------------------------------------------------- property


@settings(max_examples=12, deadline=None)
@given(
    length=st.integers(1, 40), heads=st.integers(1, 3), dim=st.sampled_from([4, 8]),
    features=st.integers(2, 16), kind=st.sampled_from(["favor", "relu"]), causal=st.booleans(),
    chunks=st.sampled_from([None, 2, 5]),
)
def test_random_shapes_and_variants(length, heads, dim, features, kind, causal, chunks):
    model = FastAttention(dim, nb_features=features, causal=causal, generalized_attention=kind == "relu",
                          chunk_size=chunks if causal else None, chunk_eps=0.0, learned_projection=True).eval()
    inputs = _qkv(length, heads=heads, dim=dim, seed=length)
    gm, report = optimize_module(model, inputs)
    assert len(_rewritten(report)) == 1, [m.reason for m in report.matches]
    _assert_parity(model, gm, inputs)


def test_swapped_batch_axes_are_left_alone():
    inputs = _qkv(6, batch=2, heads=2)
    gm, report = optimize_module(SwappedBatchAxes().eval(), inputs)
    [match] = [m for m in report.matches if m.kind == "performer"]
    assert not match.rewritten and "key axis" in match.reason
