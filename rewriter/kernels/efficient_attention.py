"""SDPA's memory-efficient CUDA kernel for whole calls of `rewriter::attention` without bias or mask.

``aten._scaled_dot_product_efficient_attention`` (xFormers' CUTLASS kernel, Rabe & Staats /
FlashAttention-style tiling) computes softmax(q kᵀ · scale [+ top-left causal mask]) v without the
score matrix and returns each query row's log-sum-exp; its backward,
``aten._scaled_dot_product_efficient_attention_backward``, recomputes the probabilities from that
log-sum-exp, as the op's own backward does. Both run with dropout 0, so the philox seed and offset
they take are never read. Used only where its semantics are the op's (`takes` checks the tensors;
`rewriter.kernels.attention_op.uses_fused_kernel` the call), fp32 included: on sm80+ the kernel's fp32
products use CUTLASS's 3×TF32 (OpMultiplyAddFastF32), close to fp32 accuracy, not plain TF32.

Layouts, from ATen's ``attention.cu`` / ``attention_backward.cu``: the kernel works in (B, L, H, D);
its forward returns the output as a (B, H, L, D) view of a (B, L, H, D) buffer and the log-sum-exp
(B, H, Lq) padded to a multiple of 32 rows on some versions (sliced here). Its backward reads the
output with the row stride H · Dv, so the output it is given must have that layout again (`backward`
re-lays it out), and reads the log-sum-exp through its own strides.
"""

from __future__ import annotations

import logging

import torch

__all__ = ["backward", "forward", "takes"]

logger = logging.getLogger(__name__)

_MAX_HEAD_DIM = 128
_LSE_ROWS = 32  # the row padding of the kernel's log-sum-exp (kAlignLSE)
_MAX_BATCH = 65535  # one CUDA grid dimension; ATen's backward splits larger batches, its forward may not


def takes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the CUDA kernel takes these tensors: q (B, H, Lq, D), k (B, H', Lk, D), v (B, H', Lk, D)
    of one floating dtype on a CUDA (not ROCm) device, 0 < D ≤ 128 aligned as SDPA's own checks ask
    (a multiple of 8 for fp16/bf16, 4 for fp32), non-empty lengths, a batch of at most 65535, bf16
    only on sm80+. The call's semantics (no bias, mask or soft-cap) are the caller's to check."""
    if q.device.type != "cuda" or torch.version.hip is not None:
        return False
    head_dim = q.size(-1)
    alignment = 4 if q.dtype == torch.float32 else 8
    if not (0 < head_dim <= _MAX_HEAD_DIM and head_dim % alignment == 0 and v.size(-1) == head_dim):
        return False
    if q.size(-2) == 0 or k.size(-2) == 0 or q.numel() == 0 or q.size(0) > _MAX_BATCH:
        return False
    return q.dtype != torch.bfloat16 or torch.cuda.get_device_capability(q.device) >= (8, 0)


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B, H, Lq, D) contiguous, log-sum-exp (B, H, Lq) fp32) of contiguous q, k, v with equal
    heads; `causal` is top-left aligned (key ≤ query)."""
    out, lse, _seed, _offset = torch.ops.aten._scaled_dot_product_efficient_attention(
        q, k, v, None, True, 0.0, causal, scale=scale)
    # Contiguous, as the op's fake kernel promises (compilers plan later reads on those strides).
    return out.contiguous(), lse[..., :q.size(-2)].float()


def backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
             lse: torch.Tensor, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv), each shaped as its input, from `forward`'s out and log-sum-exp (B, H, Lq)."""
    rows = q.size(-2)
    lse = torch.nn.functional.pad(lse.float(), (0, -rows % _LSE_ROWS)).contiguous()
    out = out.transpose(1, 2).contiguous().transpose(1, 2)  # the (B, L, H, D) buffer the kernel reads
    unused = torch.zeros((), dtype=torch.int64, device=q.device)  # philox seed/offset: no dropout
    dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
        grad_out.contiguous(), q, k, v, None, out, lse, unused, unused, 0.0, [True, True, True, False], causal,
        scale=scale)
    return dq, dk, dv
