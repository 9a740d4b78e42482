"""`rewriter::linear_attention`: exact Performer / linear attention that never holds φ(Q), φ(K) whole.

    out, state, key_max = torch.ops.rewriter.linear_attention(
        q, k, v, projection, feature_map, causal, data_scale, epsilon, normalizer_epsilon,
        stabilizer_grad, slice_size, key_sum_epsilon=0.0)

Semantics are those of `rewriter.kernels.linear_attention` (feature maps `favor_softmax`, `relu`,
`elu_plus_one`, and `identity` for features the model computed itself; φ is computed inside the op
from q, k and the (M, D) projection, so gradients reach all four). `state` (B, Hkv, M, Dv + 1) is
Σφ(k)vᵀ with Σφ(k) as its last column, over all keys;
`key_sum_epsilon` is added to every (prefix-)summed feature of the normaliser (the state's last
column starts at it). `key_max` (B, Hkv) is the FAVOR+ key stabiliser (zeros for the other maps). Both are auxiliary
outputs without gradients. The backward is its own custom op, so compilers treat both directions as
opaque and nothing of size L × M is saved between them: only q, k, v, the projection, the state
and the stabiliser (the backward recomputes the output slice by slice rather than keeping it).

Mapping performer-pytorch: `softmax_kernel(normalize_data=True, eps=1e-4)` → feature_map
"favor_softmax", data_scale D^-¼, epsilon 1e-4, stabilizer_grad False for the current `.detach()`ed
stabiliser (True for versions that let the gradient through `amax`); `generalized_kernel` with ReLU →
"relu", epsilon 1e-3; `no_projection` → "identity" on the model's own softmax(q) and exp(k) (causal)
or softmax over the keys (bidirectional); `linear_attention` → causal False, normalizer_epsilon 0,
key_sum_epsilon 0;
`causal_linear_attention_noncuda` / `causal_linear_attention` (`k_cumsum + eps`) → causal True,
key_sum_epsilon 1e-6.
"""

from __future__ import annotations

import torch

from rewriter.kernels.linear_attention import (
    FeatureMap,
    LinearOptions,
    linear_attention_backward as _backward_math,
    linear_attention_forward as _forward_math,
)

__all__ = ["linear_attention", "linear_attention_backward"]


def _options(feature_map, causal, data_scale, epsilon, normalizer_epsilon, stabilizer_grad, slice_size,
             key_sum_epsilon=0.0):
    if slice_size < 1:
        raise ValueError(f"rewriter::linear_attention: slice_size must be positive, got {slice_size}")
    fmap = FeatureMap(feature_map, data_scale, epsilon, stabilizer_grad)
    return LinearOptions(fmap, causal, normalizer_epsilon, slice_size, key_sum_epsilon)


def _check(q, k, v, projection, feature_map: str, causal: bool) -> None:
    name = "rewriter::linear_attention"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"{name} takes 4-D q, k, v; got {q.dim()}, {k.dim()}, {v.dim()}")
    if k.shape[:3] != v.shape[:3] or q.size(-1) != k.size(-1) or q.size(0) != k.size(0) or q.size(1) % k.size(1):
        raise ValueError(f"{name}: incompatible q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if causal and q.size(2) != k.size(2):
        raise ValueError(f"{name}: causal needs as many queries as keys, got {q.size(2)} and {k.size(2)}")
    if projection is not None and (projection.dim() != 2 or projection.size(1) != q.size(-1)):
        raise ValueError(f"{name}: projection must be (M, {q.size(-1)}), got {tuple(projection.shape)}")
    if feature_map == "favor_softmax" and projection is None:
        raise ValueError(f"{name}: feature map 'favor_softmax' needs a projection")
    FeatureMap(feature_map)  # validates the kind


def _aux_shapes(q, k, v, projection):
    features = q.size(-1) if projection is None else projection.size(0)
    dtype = torch.promote_types(q.dtype, torch.float32)
    return k.shape[:2] + (features, v.size(-1) + 1), k.shape[:2], dtype


@torch.library.custom_op("rewriter::linear_attention", mutates_args=())
def linear_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, projection: torch.Tensor | None,
    feature_map: str, causal: bool, data_scale: float, epsilon: float, normalizer_epsilon: float,
    stabilizer_grad: bool, slice_size: int, key_sum_epsilon: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check(q, k, v, projection, feature_map, causal)
    opts = _options(feature_map, causal, data_scale, epsilon, normalizer_epsilon, stabilizer_grad, slice_size,
                    key_sum_epsilon)
    return _forward_math(q, k, v, projection, opts)


@linear_attention.register_fake
def _(q, k, v, projection, feature_map, causal, data_scale, epsilon, normalizer_epsilon, stabilizer_grad, slice_size,
      key_sum_epsilon=0.0):
    _check(q, k, v, projection, feature_map, causal)
    state_shape, key_max_shape, dtype = _aux_shapes(q, k, v, projection)
    out = q.new_empty(q.shape[:-1] + (v.size(-1),))
    return out, q.new_empty(state_shape, dtype=dtype), q.new_empty(key_max_shape, dtype=dtype)


@torch.library.custom_op("rewriter::linear_attention_backward", mutates_args=())
def linear_attention_backward(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, projection: torch.Tensor | None,
    state: torch.Tensor, key_max: torch.Tensor,
    feature_map: str, causal: bool, data_scale: float, epsilon: float, normalizer_epsilon: float,
    stabilizer_grad: bool, slice_size: int, projection_grad: bool, key_sum_epsilon: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dprojection); dprojection is an empty tensor when `projection_grad` is false."""
    opts = _options(feature_map, causal, data_scale, epsilon, normalizer_epsilon, stabilizer_grad, slice_size,
                    key_sum_epsilon)
    dq, dk, dv, dprojection = _backward_math(grad_out, q, k, v, projection, state, key_max, opts, projection_grad)
    return dq, dk, dv, q.new_empty(0) if dprojection is None else dprojection


@linear_attention_backward.register_fake
def _(grad_out, q, k, v, projection, state, key_max, feature_map, causal, data_scale, epsilon,
      normalizer_epsilon, stabilizer_grad, slice_size, projection_grad, key_sum_epsilon=0.0):
    # The gradients come back contiguous whatever the strides of the inputs.
    dprojection = q.new_empty(projection.shape, dtype=projection.dtype) if projection_grad and projection is not None \
        else q.new_empty(0)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dprojection


_SCALAR_ARGS = ("feature_map", "causal", "data_scale", "epsilon", "normalizer_epsilon", "stabilizer_grad", "slice_size",
                "key_sum_epsilon")


def _setup_context(ctx, inputs, output):
    q, k, v, projection, *scalars = inputs
    _out, state, key_max = output
    ctx.scalars = scalars[:-1]
    ctx.key_sum_epsilon = scalars[-1]
    ctx.projection_grad = projection is not None and ctx.needs_input_grad[3]
    ctx.mark_non_differentiable(state, key_max)
    ctx.save_for_backward(q, k, v, projection, state, key_max)


def _backward(ctx, grad_out, _grad_state, _grad_key_max):
    q, k, v, projection, state, key_max = ctx.saved_tensors
    dq, dk, dv, dprojection = torch.ops.rewriter.linear_attention_backward(
        grad_out, q, k, v, projection, state, key_max, *ctx.scalars, ctx.projection_grad, ctx.key_sum_epsilon
    )
    return (dq, dk, dv, dprojection if ctx.projection_grad else None) + (None,) * len(_SCALAR_ARGS)


linear_attention.register_autograd(_backward, setup_context=_setup_context)
