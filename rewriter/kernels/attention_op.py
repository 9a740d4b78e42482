"""`rewriter::attention`: exact softmax attention that never holds the Lq × Lk score matrix.

    out, row_stats = torch.ops.rewriter.attention(q, k, v, bias, mask, leaves, scale, softcap, mask_fill,
                                                  causal, causal_offset, q_chunk, k_chunk, zero_masked_rows,
                                                  bias_program, mask_program, fill_program)

Semantics are those of `chunked_attention` (scale → soft-cap → +bias → keep-mask → causal); a
non-empty `bias_program` / `mask_program` (JSON, `rewriter.kernels.score_program`) over the tensors
in `leaves` takes the place of the `bias` / `mask` tensor, evaluated block by block; a non-empty
`fill_program` gives the value of each masked entry in place of `mask_fill` (it needs a mask). A row
whose every key is masked gives NaN as a hand-written softmax does, or 0 with `zero_masked_rows`
(default False) as SDPA and `aten._safe_softmax` do, gradients included.
Where PyTorch's fused CPU flash kernel computes exactly the same thing, forward and backward call
it, for the whole call or chunk by chunk of query rows with each chunk's mask built for it alone
(`rewriter.kernels.fused_rows`); on CUDA, a whole call without bias or mask goes to SDPA's
memory-efficient kernel (`rewriter.kernels.efficient_attention`); otherwise both run the blockwise
implementation. `row_stats` (B, H, Lq, 2) holds each query
row's score max and sum of exp(score − max), what the backward needs; a fused kernel's
log-sum-exp is stored as (lse, 1). The backward is its own custom op, so that
compilers treat both directions as opaque and nothing n × n is saved between them.
"""

from __future__ import annotations

import math

import torch

from rewriter.kernels.chunked_attention import (
    ScoreOptions,
    ScoreTerms,
    chunked_attention_backward,
    chunked_attention_forward,
)
from rewriter.kernels import efficient_attention
from rewriter.kernels.fused_rows import FusedRows
from rewriter.kernels.score_program import parse

__all__ = ["attention", "uses_fused_kernel"]

def _options(scale, softcap, mask_fill, causal, causal_offset, q_chunk, k_chunk, zero_masked_rows) -> ScoreOptions:
    # The fill as fp32 holds it: a fill scaled past fp32's range (finfo.min / 0.5) is −∞, as in the model.
    mask_fill = float(torch.tensor(mask_fill, dtype=torch.float32))
    return ScoreOptions(scale, softcap, mask_fill, causal, causal_offset, q_chunk, k_chunk, zero_masked_rows)


def uses_fused_kernel(q, k, v, terms: ScoreTerms, opts: ScoreOptions, bias_grad: bool = False) -> bool:
    """Whether one call of PyTorch's fused kernel for the device (CPU flash, CUDA memory-efficient)
    computes this whole call: no bias or mask, and causality (if any) top-left aligned, as its
    ``is_causal`` is. On CPU, calls with a bias or mask use it chunk by chunk where exact
    (`rewriter.kernels.fused_rows`)."""
    no_terms = (terms.bias is None and terms.mask is None and terms.bias_program is None and terms.mask_program is None
                and terms.fill_program is None)
    device_ok = q.device.type == "cpu" or efficient_attention.takes(q, k, v)
    return (device_ok and FusedRows.same_semantics(q, k, v, opts, bias_grad) and no_terms
            and (not opts.causal or opts.causal_offset == 0))


def _fused_inputs(q, k, v):
    """Contiguous q, k, v with K/V expanded to the query heads (the ATen kernel reads its inputs as
    contiguous: it gives wrong results on other strides)."""
    groups = q.size(1) // k.size(1)
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return q.contiguous(), k.contiguous(), v.contiguous()


def _fused_rows(q, k, v, terms: ScoreTerms, opts: ScoreOptions, bias_grad: bool = False) -> FusedRows | None:
    return FusedRows(q, k, v, terms, opts) if FusedRows.applies(q, k, v, opts, bias_grad) else None


def _terms(bias, mask, leaves, bias_program: str, mask_program: str, fill_program: str) -> ScoreTerms:
    """The call's bias, mask and fill; raises ValueError when a program and a tensor give the same
    term, or a fill program comes without a mask."""
    if (bias_program and bias is not None) or (mask_program and mask is not None):
        raise ValueError("rewriter::attention takes a bias (mask) tensor or a bias (mask) program, not both")
    if fill_program and mask is None and not mask_program:
        raise ValueError("rewriter::attention: a fill program needs a mask")
    return ScoreTerms(bias, mask, parse(bias_program) if bias_program else None,
                      parse(mask_program) if mask_program else None, tuple(leaves),
                      parse(fill_program) if fill_program else None)


def _check_shapes(q, k, v) -> None:
    """q (B, H, Lq, D), k (1|B, Hkv, Lk, D), v (1|B, Hkv, Lk, Dv) with H a multiple of Hkv."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"rewriter::attention takes 4-D q, k, v; got {q.dim()}, {k.dim()}, {v.dim()}")
    batch_ok = k.size(0) in (1, q.size(0)) and v.size(0) in (1, q.size(0))
    if not batch_ok or k.shape[1:3] != v.shape[1:3] or q.size(-1) != k.size(-1) or q.size(1) % k.size(1):
        raise ValueError(f"rewriter::attention: incompatible q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")


@torch.library.custom_op("rewriter::attention", mutates_args=())
def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    bias: torch.Tensor | None, mask: torch.Tensor | None, leaves: list[torch.Tensor],
    scale: float, softcap: float, mask_fill: float, causal: bool, causal_offset: int,
    q_chunk: int, k_chunk: int, zero_masked_rows: bool, bias_program: str, mask_program: str, fill_program: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_shapes(q, k, v)
    opts = _options(scale, softcap, mask_fill, causal, causal_offset, q_chunk, k_chunk, zero_masked_rows)
    terms = _terms(bias, mask, leaves, bias_program, mask_program, fill_program)
    if uses_fused_kernel(q, k, v, terms, opts):
        if q.device.type == "cuda":
            out, lse = efficient_attention.forward(*_fused_inputs(q, k, v), causal, scale)
        else:
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                *_fused_inputs(q, k, v), 0.0, causal, scale=scale)
        return out, torch.stack([lse.float(), torch.ones_like(lse, dtype=torch.float32)], dim=-1)
    return chunked_attention_forward(q, k, v, terms, opts, _fused_rows(q, k, v, terms, opts))


@attention.register_fake
def _(q, k, v, bias, mask, leaves, scale, softcap, mask_fill, causal, causal_offset, q_chunk, k_chunk,
      zero_masked_rows, bias_program, mask_program, fill_program):
    _check_shapes(q, k, v)
    out = q.new_empty(q.shape[:-1] + (v.size(-1),))
    return out, q.new_empty(q.shape[:-1] + (2,), dtype=torch.float32)


@torch.library.custom_op("rewriter::attention_backward", mutates_args=())
def attention_backward(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    bias: torch.Tensor | None, mask: torch.Tensor | None, leaves: list[torch.Tensor],
    out: torch.Tensor, row_stats: torch.Tensor,
    scale: float, softcap: float, mask_fill: float, causal: bool, causal_offset: int,
    q_chunk: int, k_chunk: int, zero_masked_rows: bool, bias_program: str, mask_program: str, fill_program: str,
    bias_grad: bool, leaf_grads: list[bool],
) -> list[torch.Tensor]:
    """[dq, dk, dv, dbias, *dleaves]; dbias, and the gradient of a leaf `leaf_grads` does not ask for, are
    empty tensors. Leaf gradients come from the bias and fill programs (floating-point leaves only)."""
    opts = _options(scale, softcap, mask_fill, causal, causal_offset, q_chunk, k_chunk, zero_masked_rows)
    terms = _terms(bias, mask, leaves, bias_program, mask_program, fill_program)
    no_bias_grad = q.new_empty(0)
    no_leaf_grads = [q.new_empty(0) for _ in leaves]
    if uses_fused_kernel(q, k, v, terms, opts, bias_grad):
        groups = q.size(1) // k.size(1)
        if q.device.type == "cuda":
            dq, dk, dv = efficient_attention.backward(grad_out, *_fused_inputs(q, k, v), out, row_stats[..., 0],
                                                      causal, scale)
        else:
            dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                grad_out.contiguous(), *_fused_inputs(q, k, v), out, row_stats[..., 0], 0.0, causal, scale=scale)
        if groups > 1:
            dk, dv = (g.unflatten(1, (k.size(1), groups)).sum(2) for g in (dk, dv))
        return [dq.contiguous(), dk.contiguous(), dv.contiguous(), no_bias_grad, *no_leaf_grads]
    dq, dk, dv, dbias, dleaves = chunked_attention_backward(
        grad_out, q, k, v, terms, out, row_stats, opts, bias_grad, leaf_grads, _fused_rows(q, k, v, terms, opts, bias_grad))
    # Contiguous, as the fake kernel promises (compilers plan later views on these strides).
    dbias = no_bias_grad if dbias is None else dbias.contiguous()
    dleaves = [empty if grad is None else grad.contiguous() for grad, empty in zip(dleaves, no_leaf_grads)]
    return [dq.contiguous(), dk.contiguous(), dv.contiguous(), dbias, *dleaves]


@attention_backward.register_fake
def _(grad_out, q, k, v, bias, mask, leaves, out, row_stats, scale, softcap, mask_fill, causal, causal_offset,
      q_chunk, k_chunk, zero_masked_rows, bias_program, mask_program, fill_program, bias_grad, leaf_grads):
    dbias = bias.new_empty(bias.shape) if bias_grad and bias is not None else q.new_empty(0)
    dleaves = [leaf.new_empty(leaf.shape) if flag else q.new_empty(0) for leaf, flag in zip(leaves, leaf_grads)]
    return [q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dbias, *dleaves]


_SCALAR_ARGS = ("scale", "softcap", "mask_fill", "causal", "causal_offset", "q_chunk", "k_chunk", "zero_masked_rows",
                "bias_program", "mask_program", "fill_program")


def _setup_context(ctx, inputs, output):
    q, k, v, bias, mask, leaves, *scalars = inputs
    out, row_stats = output
    ctx.scalars = scalars
    programs = any(scalars[_SCALAR_ARGS.index(name)] for name in ("bias_program", "fill_program"))
    needs = ctx.needs_input_grad[5:5 + len(leaves)]  # flattened: one flag per leaf
    ctx.leaf_grads = [programs and bool(wanted) and leaf.is_floating_point() for leaf, wanted in zip(leaves, needs)]
    ctx.bias_grad = (bias is not None and ctx.needs_input_grad[3]) or any(ctx.leaf_grads)
    ctx.save_for_backward(q, k, v, bias, mask, out, row_stats, *leaves)


def _backward(ctx, grad_out, _grad_row_stats):
    q, k, v, bias, mask, out, row_stats, *leaves = ctx.saved_tensors
    dq, dk, dv, dbias, *dleaves = torch.ops.rewriter.attention_backward(
        grad_out, q, k, v, bias, mask, leaves, out, row_stats, *ctx.scalars, ctx.bias_grad, ctx.leaf_grads
    )
    leaf_grads = [grad if flag else None for grad, flag in zip(dleaves, ctx.leaf_grads)]
    return (dq, dk, dv, dbias if ctx.bias_grad and bias is not None else None, None, leaf_grads) + (
        None,) * len(_SCALAR_ARGS)


attention.register_autograd(_backward, setup_context=_setup_context)
