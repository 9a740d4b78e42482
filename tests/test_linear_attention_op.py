"""`rewriter::linear_attention` against performer-pytorch-style naive linear attention; opcheck."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import rewriter.kernels.linear_attention_op  # noqa: F401  (registers the op)
from rewriter.kernels.linear_attention import (
    FeatureMap,
    LinearOptions,
    linear_attention_backward,
    linear_attention_forward,
)

FEATURE_EPSILON = {"favor_softmax": 1e-4, "relu": 1e-3, "elu_plus_one": 0.0, "identity": 0.0}


pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- naive reference


def softmax_kernel(data, projection, is_query, eps, normalizer, detach):
    """performer-pytorch `softmax_kernel`; `detach` as in its current version."""
    ratio = projection.shape[0] ** -0.5
    data_dash = torch.einsum("...id,...jd->...ij", normalizer * data, projection)
    diag = ((data**2).sum(-1) / 2.0 * normalizer**2).unsqueeze(-1)
    stab = data_dash.amax(-1, keepdim=True) if is_query else data_dash.amax((-1, -2), keepdim=True)
    return ratio * (torch.exp(data_dash - diag - (stab.detach() if detach else stab)) + eps)


def generalized_kernel(data, projection, kernel_fn, eps, normalizer):
    """performer-pytorch `generalized_kernel`."""
    if projection is None:
        return kernel_fn(normalizer * data) + eps
    return kernel_fn(torch.einsum("...id,...jd->...ij", normalizer * data, projection)) + eps


def linear_attention(q, k, v):
    d_inv = 1.0 / torch.einsum("...nd,...d->...n", q, k.sum(dim=-2))
    context = torch.einsum("...nd,...ne->...de", k, v)
    return torch.einsum("...de,...nd,...n->...ne", context, q, d_inv)


def causal_linear_attention_noncuda(q, k, v):
    d_inv = 1.0 / torch.einsum("...nd,...nd->...n", q, k.cumsum(dim=-2))
    context = torch.einsum("...nd,...ne->...nde", k, v).cumsum(dim=-3)
    return torch.einsum("...nde,...nd,...n->...ne", context, q, d_inv)


def naive(q, k, v, projection, kind, causal, scale, eps, stabilizer_grad=False):
    def features(x, is_query):
        if kind == "favor_softmax":
            return softmax_kernel(x, projection, is_query, eps, scale, not stabilizer_grad)
        fn = {"relu": F.relu, "elu_plus_one": lambda t: F.elu(t) + 1, "identity": lambda t: t}[kind]
        return generalized_kernel(x, projection, fn, eps, scale)

    groups = q.size(1) // k.size(1)
    phi_q, phi_k = features(q, True), features(k, False).repeat_interleave(groups, 1)
    attend = causal_linear_attention_noncuda if causal else linear_attention
    return attend(phi_q, phi_k, v.repeat_interleave(groups, 1))


def run_op(q, k, v, projection, kind, causal, scale, eps, slice_size, stabilizer_grad=False, normalizer_eps=0.0):
    return torch.ops.rewriter.linear_attention(
        q, k, v, projection, kind, causal, scale, eps, normalizer_eps, stabilizer_grad, slice_size
    )[0]


def make_inputs(batch, kv_heads, groups, q_len, k_len, head_dim, features, v_dim, projection, seed,
                dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, kv_heads * groups, q_len, head_dim, generator=generator, dtype=dtype)
    k = torch.randn(batch, kv_heads, k_len, head_dim, generator=generator, dtype=dtype)
    v = torch.randn(batch, kv_heads, k_len, v_dim, generator=generator, dtype=dtype)
    proj = torch.randn(features, head_dim, generator=generator, dtype=dtype) if projection else None
    return [t.requires_grad_() if t is not None else None for t in (q, k, v, proj)]


def assert_parity(expected, actual, leaves, fwd_atol, bwd_atol, rtol):
    torch.testing.assert_close(actual, expected, atol=fwd_atol, rtol=rtol)
    grad = torch.randn_like(expected)
    want = torch.autograd.grad(expected, leaves, grad)
    got = torch.autograd.grad(actual, leaves, grad)
    for name, w, g in zip("q k v projection".split(), want, got):
        torch.testing.assert_close(g, w, atol=bwd_atol, rtol=rtol, msg=lambda m: f"d{name}: {m}")


# --------------------------------------------------------------------------- parity


@pytest.mark.parametrize("kind,with_projection", [
    ("favor_softmax", True), ("relu", True), ("relu", False), ("elu_plus_one", False), ("elu_plus_one", True),
    ("identity", False),
])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("length,slice_size,groups", [(24, 8, 1), (37, 10, 2), (1, 4, 2), (9, 64, 1)])
def test_matches_performer_pytorch_fp32(kind, with_projection, causal, length, slice_size, groups):
    q, k, v, proj = make_inputs(2, 2, groups, length, length, 8, 16, 6, with_projection, seed=length)
    if kind == "identity":  # features the model computed itself, positive as no_projection's softmax and exp
        with torch.no_grad():
            q.exp_(), k.exp_()
    leaves = [t for t in (q, k, v, proj) if t is not None]
    scale, eps = 8**-0.25, FEATURE_EPSILON[kind]
    expected = naive(q, k, v, proj, kind, causal, scale, eps)
    actual = run_op(q, k, v, proj, kind, causal, scale, eps, slice_size)
    assert_parity(expected, actual, leaves, fwd_atol=1e-5, bwd_atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("stabilizer_grad", [False, True])
def test_favor_stabiliser_gradient_detached_or_through_amax(causal, stabilizer_grad):
    q, k, v, proj = make_inputs(2, 1, 2, 21, 21, 8, 12, 5, True, seed=7, dtype=torch.float64)
    args = (q, k, v, proj, "favor_softmax", causal, 8**-0.25, 1e-2)
    expected = naive(*args, stabilizer_grad=stabilizer_grad)
    actual = run_op(*args, slice_size=6, stabilizer_grad=stabilizer_grad)
    other = naive(*args, stabilizer_grad=not stabilizer_grad)  # the test can tell the two apart
    grad = torch.ones_like(other)
    other_dk = torch.autograd.grad(other, k, grad)[0]
    assert not torch.allclose(other_dk, torch.autograd.grad(expected, k, grad, retain_graph=True)[0])
    assert_parity(expected, actual, [q, k, v, proj], 1e-12, 1e-10, 1e-9)


def test_stabiliser_ties_share_the_gradient_like_amax():
    q, k, v, proj = (t.detach() for t in make_inputs(1, 2, 1, 12, 12, 4, 6, 3, True, seed=3, dtype=torch.float64))
    proj[1] = proj[0] = 3 * proj[0]  # features 0 and 1 are equal: a row whose max is there ties
    k[:, :, 5] = k[:, :, 2] = 3 * k[:, :, 2]  # and the key maximum sits on two positions
    leaves = [t.requires_grad_() for t in (q, k, v, proj)]
    args = (q, k, v, proj, "favor_softmax", True, 4**-0.25, 1e-2)
    key_dash, query_dash = (torch.einsum("...id,jd->...ij", x * 4**-0.25, proj) for x in (k, q))
    assert ((key_dash == key_dash.amax((-1, -2), keepdim=True)).sum((-1, -2)) >= 2).all()  # every head ties
    assert ((query_dash == query_dash.amax(-1, keepdim=True)).sum(-1) == 2).any()
    expected = naive(*args, stabilizer_grad=True)
    assert_parity(expected, run_op(*args, slice_size=4, stabilizer_grad=True), leaves, 1e-12, 1e-10, 1e-9)


def test_cross_attention_lengths_and_normalizer_epsilon():
    """Bidirectional with Lq ≠ Lk; ε in the denominator as fast-transformers' LinearAttention has it."""
    q, k, v, _ = make_inputs(1, 2, 3, 13, 29, 8, 8, 4, False, seed=11)
    phi_q, phi_k = F.elu(q) + 1, (F.elu(k) + 1).repeat_interleave(3, 1)
    expected = (phi_q @ (phi_k.transpose(-1, -2) @ v.repeat_interleave(3, 1))) / (
        phi_q @ phi_k.sum(-2).unsqueeze(-1) + 1e-6)
    actual = run_op(q, k, v, None, "elu_plus_one", False, 1.0, 0.0, 7, normalizer_eps=1e-6)
    assert_parity(expected, actual, [q, k, v], 1e-5, 1e-4, 1e-4)


@settings(max_examples=25, deadline=None)
@given(
    st.integers(1, 2), st.integers(1, 2), st.sampled_from([1, 2, 3]), st.integers(1, 33), st.integers(1, 8),
    st.integers(1, 10), st.integers(1, 6), st.sampled_from(["favor_softmax", "relu", "elu_plus_one"]),
    st.booleans(), st.booleans(), st.booleans(), st.integers(1, 40), st.integers(0, 2**16),
)
def test_random_shapes_and_variants_float64(batch, kv_heads, groups, length, head_dim, features, v_dim, kind,
                                            with_projection, causal, stabilizer_grad, slice_size, seed):
    with_projection = with_projection or kind == "favor_softmax"
    q, k, v, proj = make_inputs(batch, kv_heads, groups, length, length, head_dim, features, v_dim,
                                with_projection, seed, dtype=torch.float64)
    leaves = [t for t in (q, k, v, proj) if t is not None]
    args = (q, k, v, proj, kind, causal, head_dim**-0.25, FEATURE_EPSILON[kind] + 1e-3)
    expected = naive(*args, stabilizer_grad=stabilizer_grad)
    actual = run_op(*args, slice_size=slice_size, stabilizer_grad=stabilizer_grad)
    assert_parity(expected, actual, leaves, 1e-10, 1e-9, 1e-8)


def test_bfloat16_inputs_compute_in_fp32():
    q, k, v, proj = (t.detach() for t in make_inputs(1, 2, 1, 40, 40, 16, 32, 16, True, seed=5))
    expected = naive(q, k, v, proj, "favor_softmax", True, 16**-0.25, 1e-4)
    actual = run_op(q.bfloat16(), k.bfloat16(), v.bfloat16(), proj.bfloat16(), "favor_softmax", True,
                    16**-0.25, 1e-4, 16)
    assert actual.dtype == torch.bfloat16
    torch.testing.assert_close(actual.float(), expected, atol=5e-2, rtol=5e-2)


# --------------------------------------------------------------------------- state recovery


def test_checkpointed_states_beat_subtraction_in_fp32():
    """The causal backward's slice-start states: stored at boundaries vs subtracted from the end."""
    q, k, v, proj = (t.detach() for t in make_inputs(1, 1, 1, 512, 512, 16, 32, 8, True, seed=1,
                                                     dtype=torch.float64))
    grad = torch.randn(1, 1, 512, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    opts = LinearOptions(FeatureMap("favor_softmax", 16**-0.25, 1e-4), causal=True, slice_size=16)
    _, state, key_max = linear_attention_forward(q, k, v, proj, opts)
    reference = linear_attention_backward(grad, q, k, v, proj, state, key_max, opts, True)[0]
    fp32 = [t.float() for t in (q, k, v, proj)]
    _, state, key_max = linear_attention_forward(*fp32, opts)
    errors = {}
    for mode in ("checkpoint", "subtract"):
        dq = linear_attention_backward(grad.float(), *fp32, state, key_max, opts, True, mode)[0]
        errors[mode] = ((dq.double() - reference).abs().max() / reference.abs().max()).item()
    assert errors["checkpoint"] < 1e-5
    assert errors["checkpoint"] * 5 < errors["subtract"], errors


@pytest.mark.parametrize("length", [4, 8, 12, 36, 40, 68])
def test_segment_checkpoints_give_every_running_state_last_first(length):
    """The causal backward's slice-start states (√n checkpoints, segments recomputed) are exactly the
    states of one running sum over the slices, each slice once, last slice first."""
    from rewriter.kernels.linear_attention import _checkpointed_starts, _contribution, _initial_state, _Layout, _slices
    q, k, v, proj = (t.detach() for t in make_inputs(1, 2, 1, length, length, 8, 16, 4, True, seed=3))
    opts = LinearOptions(FeatureMap("favor_softmax", 8**-0.25, 1e-4), causal=True, slice_size=4, key_sum_epsilon=1e-6)
    _, state, key_max = linear_attention_forward(q, k, v, proj, opts)
    lay, slices = _Layout(q, k, v, proj), _slices(length, opts.slice_size)
    expected, running = [], _initial_state(state.shape, state.dtype, state.device, opts)
    for bounds in slices:
        expected.append(running)
        running = running + _contribution(lay, key_max, opts, *bounds)
    got = list(_checkpointed_starts(lay, state, key_max, opts, slices))
    assert [index for index, _ in got] == list(reversed(range(len(slices))))
    for index, start in got:
        assert torch.equal(start, expected[index]), index


# --------------------------------------------------------------------------- op contract


@pytest.mark.parametrize("kind,causal,with_projection,stabilizer_grad", [
    ("favor_softmax", False, True, False), ("favor_softmax", True, True, True), ("relu", True, False, False),
])
def test_opcheck(kind, causal, with_projection, stabilizer_grad):
    q, k, v, proj = make_inputs(1, 2, 2, 9, 9, 4, 6, 3, with_projection, seed=4)
    args = (q, k, v, proj, kind, causal, 0.7, 1e-3, 0.0, stabilizer_grad, 4)
    torch.library.opcheck(torch.ops.rewriter.linear_attention.default, args)


def test_compiled_with_non_contiguous_inputs_matches_eager():
    """(B, L, H, D) activations transposed to (B, H, L, D): the gradients' fake strides must hold."""
    generator = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, 11, heads, 4, generator=generator).transpose(1, 2).requires_grad_()
               for heads in (4, 2, 2))
    proj = torch.randn(4, 6, generator=generator).t().requires_grad_()

    def attend(q, k, v, proj):
        return torch.ops.rewriter.linear_attention(q, k, v, proj, "favor_softmax", True, 0.7, 1e-4, 0.0, False, 4)[0]

    expected = attend(q, k, v, proj)
    want = torch.autograd.grad(expected.sum(), (q, k, v, proj))
    actual = torch.compile(attend, fullgraph=True)(q, k, v, proj)
    got = torch.autograd.grad(actual.sum(), (q, k, v, proj))
    torch.testing.assert_close(actual, expected)
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w)


def test_auxiliary_outputs_have_no_gradient():
    q, k, v, proj = make_inputs(1, 1, 1, 5, 5, 4, 6, 3, True, seed=0)
    out, state, key_max = torch.ops.rewriter.linear_attention(
        q, k, v, proj, "favor_softmax", False, 0.7, 1e-4, 0.0, False, 2)
    assert out.requires_grad and not state.requires_grad and not key_max.requires_grad
    assert state.shape == (1, 1, 6, 4) and key_max.shape == (1, 1)
    phi_k = softmax_kernel(k.detach(), proj.detach(), False, 1e-4, 0.7, True)
    torch.testing.assert_close(state[..., -1], phi_k.sum(-2))


@pytest.mark.parametrize("change,message", [
    ({"kind": "softmax"}, "not one of"),
    ({"proj": None}, "needs a projection"),
    ({"q_len": 6, "causal": True}, "as many queries as keys"),
    ({"proj_dim": 5}, "projection must be"),
    ({"slice_size": 0}, "slice_size"),
])
def test_bad_arguments_are_rejected_with_a_reason(change, message):
    settings_ = {"kind": "favor_softmax", "q_len": 5, "causal": False, "proj_dim": 4, "slice_size": 2}
    settings_.update(change)
    q, k, v, proj = make_inputs(1, 1, 1, settings_["q_len"], 5, 4, 6, 3, False, seed=0)
    proj = change.get("proj", torch.randn(6, settings_["proj_dim"]))
    with pytest.raises(ValueError, match=message):
        run_op(q, k, v, proj, settings_["kind"], settings_["causal"], 1.0, 0.0, settings_["slice_size"])
