"""fast-transformers' linear attention forms, each as that package writes it, found and rewritten exactly.

`LinearAttention` and `CausalLinearAttention` below are the forward passes of
`fast_transformers/attention/linear_attention.py` and `causal_linear_attention.py` (idiap/fast-transformers)
with their mask objects as plain tensors (`attn_mask` all ones, the key-length mask optional: a near-miss), on
(N, L, H, D) tensors, feature map `elu(x) + 1` (theirs) or ReLU, ε = 1e-6 added to φ(q)·Σφ(k). The
causal product there is a C++/CUDA extension (`causal_dot_product`); `causal_dot_product` here is its
pure-PyTorch equivalent, the prefix sum of φ(k) ⊗ v. `PrefixSumCausal` writes that product directly in
(N, L, H, D) without permutes. The package itself is not installed. Through `optimize_module` (outputs and
gradients, fp32) and `export_onnx` (on ONNX Runtime); `optimize_onnx` of their ONNX exports is tested in
`test_fast_transformers_onnx.py`.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import rewriter
from rewriter.torch_api import optimize_module
from tests.parity import assert_module_parity

pytestmark = pytest.mark.usefixtures("one_thread")

OP = torch.ops.rewriter.linear_attention.default


def elu_feature_map(x):
    return torch.nn.functional.elu(x) + 1


def relu_feature_map(x):
    return torch.relu(x)


FEATURE_MAPS = {"elu": elu_feature_map, "relu": relu_feature_map}


class LinearAttention(nn.Module):
    def __init__(self, feature_map=None, eps=1e-6, key_axis=1):
        super().__init__()
        self.feature_map = feature_map or elu_feature_map
        self.eps = eps
        self.key_axis = key_axis  # 1 as written; anything else is a near-miss

    def forward(self, queries, keys, values, key_lengths=None):
        Q = self.feature_map(queries)
        K = self.feature_map(keys)
        if key_lengths is not None:  # theirs: K * key_lengths.float_matrix[:, :, None, None]
            K = K * key_lengths[:, :, None, None]
        KV = torch.einsum("nshd,nshm->nhmd", K, values)
        Z = 1 / (torch.einsum("nlhd,nhd->nlh", Q, K.sum(dim=self.key_axis)) + self.eps)
        V = torch.einsum("nlhd,nhmd,nlh->nlhm", Q, KV, Z)
        return V


def causal_dot_product(Q, K, V):
    """(N, H, L, D), (N, H, L, D), (N, H, L, M) → Σ_{j≤i} (Q_i·K_j) V_j: fast-transformers' kernel, as a prefix sum."""
    return torch.einsum("nhld,nhldm->nhlm", Q, torch.einsum("nhld,nhlm->nhldm", K, V).cumsum(2))


def causal_linear(Q, K, V):
    Q = Q.permute(0, 2, 1, 3).contiguous()
    K = K.permute(0, 2, 1, 3).contiguous()
    V = V.permute(0, 2, 1, 3).contiguous()
    V_new = causal_dot_product(Q, K, V)
    return V_new.permute(0, 2, 1, 3).contiguous()


class CausalLinearAttention(nn.Module):
    def __init__(self, feature_map=None, eps=1e-6, key_axis=1):
        super().__init__()
        self.feature_map = feature_map or elu_feature_map
        self.eps = eps
        self.key_axis = key_axis

    def forward(self, queries, keys, values, key_lengths=None):
        Q = self.feature_map(queries)
        K = self.feature_map(keys)
        if key_lengths is not None:  # theirs: K * key_lengths.float_matrix[:, :, None, None]
            K = K * key_lengths[:, :, None, None]
        Z = 1 / (torch.einsum("nlhi,nlhi->nlh", Q, K.cumsum(self.key_axis)) + self.eps)
        V = causal_linear(Q, K, values)
        return V * Z[:, :, :, None]


class PrefixSumCausal(nn.Module):
    """The causal product written directly in (N, L, H, D), no permutes: einsum(φQ, cumsum(φK ⊗ V)) times Z.

    `normaliser_operand`: Z as the output product's third operand instead of a broadcast multiply;
    `context_first`: the context as the product's first operand, Z multiplied on the left;
    `context_axis`: the axis the context is prefix-summed over (1 as written; 2, the heads, a near-miss);
    `swapped`: every einsum's operands in the other order (v before φ(k), the keys' prefix sum before φ(q),
    the context before φ(q));
    `divide`: the output written `num / (φ(q)·Σφ(k) + ε)[..., None]` instead of times 1/(·); ε None: none added.
    """

    def __init__(self, feature_map=None, eps=1e-6, normaliser_operand=False, context_axis=1, context_first=False,
                 swapped=False, divide=False):
        super().__init__()
        self.feature_map = feature_map or elu_feature_map
        self.eps, self.normaliser_operand, self.context_axis = eps, normaliser_operand, context_axis
        self.context_first, self.swapped, self.divide = context_first, swapped, divide

    def denominator(self, Q, K, values):
        """φ(q)·Σ_{j≤l}φ(k_j) (+ ε), (N, L, H)."""
        if self.swapped:
            den = torch.einsum("nlhd,nlhd->nlh", K.cumsum(1), Q)
        else:
            den = torch.einsum("nlhi,nlhi->nlh", Q, K.cumsum(1))
        return den if self.eps is None else den + self.eps

    def forward(self, queries, keys, values):
        Q, K = self.feature_map(queries), self.feature_map(keys)
        if self.swapped:
            context = torch.einsum("nlhm,nlhd->nlhdm", values, K).cumsum(self.context_axis)
        else:
            context = torch.einsum("nlhd,nlhm->nlhdm", K, values).cumsum(self.context_axis)
        den = self.denominator(Q, K, values)
        if self.divide:
            return self.numerator(Q, context) / den[..., None]
        Z = 1 / den
        if self.normaliser_operand:
            return torch.einsum("nlhd,nlhdm,nlh->nlhm", Q, context, Z)
        if self.context_first:
            return Z.unsqueeze(-1) * torch.einsum("nlhdm,nlhd->nlhm", context, Q)
        return self.numerator(Q, context) * Z[:, :, :, None]

    def numerator(self, Q, context):
        if self.swapped:
            return torch.einsum("nlhdm,nlhd->nlhm", context, Q)
        return torch.einsum("nlhd,nlhdm->nlhm", Q, context)


class AllPrefixSumsNormaliser(PrefixSumCausal):
    """Z sums φ(q_l)·Σ_{j≤m}φ(k_j) over every m (`nlhi,nmhi->nlh`): each axis named, but not causal attention."""

    def forward(self, queries, keys, values):
        Q, K = self.feature_map(queries), self.feature_map(keys)
        context = torch.einsum("nlhd,nlhm->nlhdm", K, values).cumsum(1)
        Z = 1 / (torch.einsum("nlhi,nmhi->nlh", Q, K.cumsum(1)) + self.eps)
        return torch.einsum("nlhd,nlhdm->nlhm", Q, context) * Z[:, :, :, None]


class EpsilonAfterTheView(PrefixSumCausal):
    """num / ((φ(q)·Σφ(k))[..., None] + ε): ε added to the broadcast denominator."""

    def forward(self, queries, keys, values):
        Q, K = self.feature_map(queries), self.feature_map(keys)
        context = torch.einsum("nlhd,nlhm->nlhdm", K, values).cumsum(self.context_axis)
        den = torch.einsum("nlhi,nlhi->nlh", Q, K.cumsum(1))
        return self.numerator(Q, context) / (den[..., None] + self.eps)


FORMS = {
    "bidirectional": LinearAttention,
    "causal": CausalLinearAttention,
    "prefix_sum": PrefixSumCausal,
    "prefix_sum_operand": lambda feature_map: PrefixSumCausal(feature_map, normaliser_operand=True),
    "prefix_sum_context_first": lambda feature_map: PrefixSumCausal(feature_map, context_first=True),
    "prefix_sum_swapped": lambda feature_map: PrefixSumCausal(feature_map, swapped=True),
    "prefix_sum_quotient": lambda feature_map: PrefixSumCausal(feature_map, divide=True),
    "prefix_sum_quotient_swapped": lambda feature_map: PrefixSumCausal(feature_map, divide=True, swapped=True),
    "prefix_sum_quotient_late_epsilon": EpsilonAfterTheView,
}


class QuotientOverAllKeys(PrefixSumCausal):
    """num / (φ(q)·Σ_j φ(k_j) + ε): the causal numerator over a normaliser of every key, not of the prefix."""

    def denominator(self, Q, K, values):
        return torch.einsum("nlhd,nhd->nlh", Q, K.sum(dim=1)) + self.eps


class QuotientOfTheKeys(PrefixSumCausal):
    """num / (φ(k)·Σ_{j≤l}φ(k_j) + ε): the roles of φ(q)·Σφ(k), but not the numerator's queries."""

    def denominator(self, Q, K, values):
        return torch.einsum("nlhd,nlhd->nlh", K.cumsum(1), K) + self.eps


class ValueNormaliser(PrefixSumCausal):
    """Operands swapped, Z from v's prefix sum (v as wide as φ(k)): not the context's φ(k)."""

    def denominator(self, Q, K, values):
        return torch.einsum("nlhd,nlhd->nlh", values.cumsum(1), Q) + self.eps


class AttentionLayer(nn.Module):
    """fast-transformers' `AttentionLayer`: projections, (N, L, H, D) views, inner attention, output projection."""

    def __init__(self, attention, d_model=32, n_heads=4):
        super().__init__()
        self.inner_attention = attention
        self.query_projection = nn.Linear(d_model, d_model)
        self.key_projection = nn.Linear(d_model, d_model)
        self.value_projection = nn.Linear(d_model, d_model)
        self.out_projection = nn.Linear(d_model, d_model)
        self.n_heads = n_heads

    def forward(self, x):
        N, L, _ = x.shape
        H = self.n_heads
        queries = self.query_projection(x).view(N, L, H, -1)
        keys = self.key_projection(x).view(N, L, H, -1)
        values = self.value_projection(x).view(N, L, H, -1)
        # Theirs is `.view(N, L, -1)`: on torch 2.13 LinearAttention's einsum returns a non-contiguous
        # (N, L, H, M) tensor that `.view` refuses even in eager, so the layer is written with reshape.
        new_values = self.inner_attention(queries, keys, values).reshape(N, L, -1)
        return self.out_projection(new_values)


class QueryFeaturesReturned(LinearAttention):
    """φ(q) of the block also leaves it."""

    def forward(self, queries, keys, values):
        Q, K = self.feature_map(queries), self.feature_map(keys)
        KV = torch.einsum("nshd,nshm->nhmd", K, values)
        Z = 1 / (torch.einsum("nlhd,nhd->nlh", Q, K.sum(dim=1)) + self.eps)
        return torch.einsum("nlhd,nhmd,nlh->nlhm", Q, KV, Z), Q.sum()


def _nlhd(length, batch=2, heads=3, dim=8, value_dim=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(batch, length, heads, dim, generator=generator) for _ in range(2))
    return q, k, torch.randn(batch, length, heads, value_dim, generator=generator)


def _op_calls(gm):
    return [node for node in gm.graph.nodes if node.target is OP]


def _rewrite(model, inputs):
    gm, report = optimize_module(model, inputs, dynamic_shapes=None)
    performer = [m for m in report.matches if m.kind == "performer"]
    return gm, report, performer


@pytest.mark.parametrize("feature_map", sorted(FEATURE_MAPS))
@pytest.mark.parametrize("form", sorted(FORMS))
@pytest.mark.parametrize("length", [1, 37, 300])
def test_written_form_parity(feature_map, form, length):
    """Each written form (the package's two, and the causal product as einsum·cumsum, Z multiplied or an operand)."""
    model = FORMS[form](FEATURE_MAPS[feature_map]).eval()
    inputs = _nlhd(length, value_dim=5)
    gm, report, found = _rewrite(model, inputs)
    assert len(found) == 1 and found[0].rewritten, report.summary()
    [call] = _op_calls(gm)
    assert call.args[4] == ("elu_plus_one" if feature_map == "elu" else "relu")
    # ε after φ(q)·Σφ(k): normalizer_epsilon, not key_sum_epsilon
    assert call.args[5] is (form != "bidirectional") and call.args[8] == 1e-6 and call.args[11] == 0.0
    assert found[0].spec.q_layout == "BLHD" and found[0].spec.out_layout == "BLHD"
    ops = {str(node.target) for node in gm.graph.nodes if node.op == "call_function"}
    assert not any("einsum" in op or "cumsum" in op for op in ops), ops
    assert_module_parity(model, gm, inputs, atol=1e-4, grad_atol=1e-3)


@pytest.mark.parametrize("causal", [False, True])
def test_attention_layer_parity(causal):
    torch.manual_seed(0)
    model = AttentionLayer(CausalLinearAttention() if causal else LinearAttention()).eval()
    x = torch.randn(2, 53, 32)
    gm, report, found = _rewrite(model, (x,))
    assert len(found) == 1 and found[0].rewritten, report.summary()
    assert assert_module_parity(model, gm, (x,), atol=1e-4, grad_atol=1e-3) == 8  # every weight and bias


@pytest.mark.parametrize("causal", [False, True])
def test_epsilon_is_exact(causal):
    """A large ε shows that it is added after φ(q)·Σφ(k), not to the key sum."""
    model = (CausalLinearAttention if causal else LinearAttention)(eps=0.5).eval()
    inputs = _nlhd(19)
    gm, _, found = _rewrite(model, inputs)
    assert found[0].rewritten and _op_calls(gm)[0].args[8] == 0.5
    assert_module_parity(model, gm, inputs, atol=1e-5, grad_atol=1e-4)


@pytest.mark.parametrize("causal", [False, True])
def test_key_sum_over_heads_is_left_alone(causal):
    model = (CausalLinearAttention if causal else LinearAttention)(key_axis=2).eval()
    inputs = _nlhd(3, heads=3)  # as many positions as heads, so that the wrong sum still fits "nhd"
    gm, report, found = _rewrite(model, inputs)
    assert len(found) == 1 and not found[0].rewritten, report.summary()
    assert "keys" in found[0].reason
    assert not _op_calls(gm)


@pytest.mark.parametrize("causal", [False, True])
def test_key_length_mask_is_left_alone(causal):
    """A key-length mask (an input: data per key) weights φ(k); the op has no such weights."""
    model = (CausalLinearAttention if causal else LinearAttention)().eval()
    q, k, v = _nlhd(13)
    lengths = torch.ones(2, 13)
    gm, report, found = _rewrite(model, (q, k, v, lengths))
    assert found and not any(match.rewritten for match in found), report.summary()
    assert not _op_calls(gm)


def test_query_features_used_elsewhere_are_left_alone():
    model = QueryFeaturesReturned().eval()
    inputs = _nlhd(9)
    gm, report, found = _rewrite(model, inputs)
    assert len(found) == 1 and not found[0].rewritten and "also used" in found[0].reason, report.summary()
    assert not _op_calls(gm)


def test_normaliser_of_other_features_is_left_alone():
    """Z built from φ(q) of other queries than the numerator's: a different computation."""

    class OtherQueries(CausalLinearAttention):
        def forward(self, queries, keys, values):
            Q, K = self.feature_map(queries), self.feature_map(keys)
            Z = 1 / (torch.einsum("nlhi,nlhi->nlh", self.feature_map(values), K.cumsum(1)) + self.eps)
            return causal_linear(Q, K, values) * Z[:, :, :, None]

    gm, report, found = _rewrite(OtherQueries().eval(), _nlhd(9))
    assert found and not any(match.rewritten for match in found), report.summary()
    assert not _op_calls(gm)


@pytest.mark.parametrize("causal", [False, True])
def test_normaliser_of_the_keys_is_left_alone(causal):
    """Z = 1/(φ(k)·Σφ(k) + ε): same roles as φ(q)·Σφ(k), but not the output product's queries."""

    class KeyNormaliser(nn.Module):
        def forward(self, queries, keys, values):
            Q, K = elu_feature_map(queries), elu_feature_map(keys)
            if causal:
                Z = 1 / (torch.einsum("nlhi,nlhi->nlh", K, K.cumsum(1)) + 1e-6)
                return causal_linear(Q, K, values) * Z[:, :, :, None]
            KV = torch.einsum("nshd,nshm->nhmd", K, values)
            Z = 1 / (torch.einsum("nlhd,nhd->nlh", K, K.sum(dim=1)) + 1e-6)
            return torch.einsum("nlhd,nhmd,nlh->nlhm", Q, KV, Z)

    gm, report, found = _rewrite(KeyNormaliser().eval(), _nlhd(9))
    assert found and not any(match.rewritten for match in found), report.summary()
    assert any("φ(q)" in (match.reason or "") for match in found), report.summary()
    assert not _op_calls(gm)


@pytest.mark.parametrize("causal", [False, True])
def test_export_onnx(tmp_path, causal):
    """`export_onnx` writes the rewritten layer (the op's sliced ONNX form); on ONNX Runtime equal to eager."""
    import onnxruntime as ort

    torch.manual_seed(2)
    model = AttentionLayer(CausalLinearAttention() if causal else LinearAttention()).eval()
    x = torch.randn(1, 70, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = rewriter.export_onnx(model, (x,), str(tmp_path / "layer.onnx"), dynamic_shapes=None)
    found = [m for m in report.matches if m.kind == "performer"]
    assert len(found) == 1 and found[0].rewritten, report.summary()
    session = ort.InferenceSession(str(tmp_path / "layer.onnx"), providers=["CPUExecutionProvider"])
    [got] = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    np.testing.assert_allclose(got, model(x).detach().numpy(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("normaliser_operand", [False, True])
def test_prefix_sum_over_heads_is_left_alone(normaliser_operand):
    """The context prefix-summed over the heads, the normaliser over the sequence: not one attention."""
    model = PrefixSumCausal(normaliser_operand=normaliser_operand, context_axis=2).eval()
    gm, report, found = _rewrite(model, _nlhd(9))
    assert len(found) == 1 and not found[0].rewritten, report.summary()
    assert "keys" in found[0].reason and "φ(q)'s features" not in found[0].reason, found[0].reason
    assert not _op_calls(gm)


def test_quotient_without_epsilon():
    """num / (φ(q)·Σφ(k))[..., None], no ε: normalizer_epsilon 0, the op's quotient as written."""
    model = PrefixSumCausal(divide=True, eps=None).eval()
    inputs = _nlhd(29)
    gm, report, found = _rewrite(model, inputs)
    assert len(found) == 1 and found[0].rewritten, report.summary()
    assert _op_calls(gm)[0].args[8] == 0.0
    assert_module_parity(model, gm, inputs, atol=1e-4, grad_atol=1e-3)


class ScaledEpsilon(PrefixSumCausal):
    """φ(q)·Σφ(k) + alpha·ε written `torch.add(·, ε, alpha=3)`: ε is not the constant as written."""

    def denominator(self, Q, K, values):
        return torch.add(torch.einsum("nlhi,nlhi->nlh", Q, K.cumsum(1)), 0.5, alpha=3.0)


@pytest.mark.parametrize("divide", [False, True])
def test_epsilon_scaled_by_alpha_is_left_alone(divide):
    gm, report, found = _rewrite(ScaledEpsilon(divide=divide).eval(), _nlhd(9))
    assert len(found) == 1 and not found[0].rewritten and "alpha=3.0" in found[0].reason, report.summary()
    assert not _op_calls(gm)


QUOTIENT_NEAR_MISSES = {
    "quotient over every key": (lambda: QuotientOverAllKeys(divide=True), "prefix-summed"),
    "product over every key": (QuotientOverAllKeys, "prefix-summed"),
    "quotient of the keys": (lambda: QuotientOfTheKeys(divide=True), "φ(q)"),
    "normaliser of the values": (lambda: ValueNormaliser(swapped=True), "not the context's φ(k)"),
}


@pytest.mark.parametrize("case", sorted(QUOTIENT_NEAR_MISSES))
def test_quotient_and_swapped_near_misses(case):
    factory, reason = QUOTIENT_NEAR_MISSES[case]
    gm, report, found = _rewrite(factory().eval(), _nlhd(9))
    assert len(found) == 1 and not found[0].rewritten and reason in found[0].reason, report.summary()
    assert not _op_calls(gm)


def test_normaliser_over_every_prefix_sum_is_left_alone():
    gm, report, found = _rewrite(AllPrefixSumsNormaliser().eval(), _nlhd(9))
    assert len(found) == 1 and not found[0].rewritten and "two labels" in found[0].reason, report.summary()
    assert not _op_calls(gm)
