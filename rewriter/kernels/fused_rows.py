"""Query rows through PyTorch's fused CPU flash kernel, each chunk's mask built for that chunk only.

PyTorch's CPU flash-attention kernel (``aten._scaled_dot_product_flash_attention_for_cpu``) is
several times faster than the blockwise implementation, but it takes one dense additive mask. Every
query row is an independent softmax, so `FusedRows` feeds it a few rows at a time with the additive
mask of those rows only (``rows × keys``, at most `MASK_BYTES`), built from the call's bias and mask
tensors or programs, its causal diagonal, and its fill; keys past the last causally visible one are
not passed at all. Nothing Lq × Lk is held.

A chunk goes to the fused kernel only where that is exact, checked on the chunk's own mask:
every row keeps at least one key (the kernel gives 0, not the op's NaN, for a row with none, and
its backward would divide by a zero sum), a finite fill is at or below `EFFECTIVELY_NEG_INF`
(``s + fill`` is then exactly ``fill``, and with a key kept exp() of it is exactly 0), a bias has
the query's dtype, and every row's largest additive term is at least `_MIN_ROW_BIAS` (below it the
kernel's log-sum-exp keeps log(sum) too coarsely for the backward). Otherwise the caller computes
those rows blockwise. The backward makes the same per-chunk decision, so it reads the statistics
the forward stored.
"""

from __future__ import annotations

import math

import torch

from rewriter.kernels.chunked_attention import EFFECTIVELY_NEG_INF, BlockTerms, ScoreOptions, ScoreTerms

__all__ = ["FusedRows", "MASK_BYTES"]

MASK_BYTES = 32 << 20  # the additive mask of one chunk of rows, at most
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MIN_ROW_BIAS = -64.0


class FusedRows:
    """The fused kernel over chunks of query rows, for one call of `rewriter::attention`.

    q (B, H, Lq, D), k and v (B, Hkv, Lk, D) with H a multiple of Hkv; `forward` and `backward` take
    the rows q0:q1 and return None where those rows must be computed blockwise instead.
    """

    @staticmethod
    def applies(q, k, v, opts: ScoreOptions, bias_grad: bool) -> bool:
        """Whether the kernel computes this call's semantics at all (before looking at any mask)."""
        return (q.device.type == "cpu" and q.dtype in _DTYPES and q.dtype == k.dtype == v.dtype
                and opts.softcap == 0 and not bias_grad and q.size(-1) == v.size(-1)
                and q.size(0) == k.size(0) == v.size(0))

    def __init__(self, q, k, v, terms: ScoreTerms, opts: ScoreOptions):
        groups = q.size(1) // k.size(1)
        self.groups, self.opts = groups, opts
        self.q = q.contiguous()
        self.k = (k.repeat_interleave(groups, dim=1) if groups > 1 else k).contiguous()
        self.v = (v.repeat_interleave(groups, dim=1) if groups > 1 else v).contiguous()
        self.terms = BlockTerms(terms, q, kv_heads=q.size(1))  # one "group" per head: 4-D blocks
        per_row = q.size(0) * q.size(1) * k.size(-2) * q.element_size()
        self.rows = max(1, MASK_BYTES // per_row)
        self.dk = self.dv = None

    def _key_stop(self, q1: int) -> int:
        if not self.opts.causal:
            return self.k.size(-2)
        return max(0, min(self.k.size(-2), q1 + self.opts.causal_offset))

    def _chunks(self, q0: int, q1: int):
        for start in range(q0, q1, self.rows):
            stop = min(start + self.rows, q1)
            yield start, stop, self._key_stop(stop)

    def _additive(self, q0: int, q1: int, k1: int) -> torch.Tensor | None | bool:
        """The rows' additive mask (None: nothing to add), or False where the kernel is not exact."""
        opts, device = self.opts, self.q.device
        keep = _four_d(self.terms.keep_block(q0, q1, 0, k1))
        if opts.causal and k1 > q0 + opts.causal_offset + 1:
            rows = torch.arange(q0, q1, device=device).unsqueeze(1) + opts.causal_offset
            below = torch.arange(k1, device=device).unsqueeze(0) <= rows
            keep = below if keep is None else keep & below
        bias = _four_d(self.terms.bias_block(q0, q1, 0, k1))
        if k1 == 0 or (keep is not None and not bool(keep.any(-1).all())):
            return False
        if keep is None:
            return None if bias is None else _checked_bias(bias, self.q.dtype)
        if opts.mask_fill != -math.inf and opts.mask_fill > EFFECTIVELY_NEG_INF:
            return False
        fill = torch.tensor(opts.mask_fill, dtype=self.q.dtype, device=device)
        if bias is None:
            return torch.where(keep, torch.tensor(0, dtype=self.q.dtype, device=device), fill)
        return _checked_bias(torch.where(keep, bias, fill), self.q.dtype) if bias.dtype == self.q.dtype else False

    def forward(self, q0: int, q1: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(out (B, H, q1 − q0, Dv), log-sum-exp (B, H, q1 − q0)) of rows q0:q1, or None."""
        outs, lses = [], []
        for start, stop, k1 in self._chunks(q0, q1):
            additive = self._additive(start, stop, k1)
            if additive is False:
                return None
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                self.q[..., start:stop, :], self.k[..., :k1, :], self.v[..., :k1, :], 0.0, False,
                attn_mask=additive, scale=self.opts.scale)
            outs.append(out)
            lses.append(lse.float())
        return torch.cat(outs, -2), torch.cat(lses, -1)

    def backward(self, q0: int, q1: int, grad_out, out, lse) -> torch.Tensor | None:
        """dq (B, H, q1 − q0, D) of rows q0:q1, or None; their share of dk and dv goes to `key_grads`."""
        if self.dk is None:
            self.dk = torch.zeros(self.k.shape, dtype=torch.float32, device=self.k.device)
            self.dv = torch.zeros(self.v.shape, dtype=torch.float32, device=self.v.device)
        decisions = [(start, stop, k1, self._additive(start, stop, k1)) for start, stop, k1 in self._chunks(q0, q1)]
        if any(additive is False for *_, additive in decisions):
            return None
        grads = []
        for start, stop, k1, additive in decisions:
            rows = slice(start - q0, stop - q0)
            dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                grad_out[..., rows, :].contiguous(), self.q[..., start:stop, :], self.k[..., :k1, :],
                self.v[..., :k1, :], out[..., rows, :].contiguous(), lse[..., rows].contiguous(), 0.0, False,
                attn_mask=additive, scale=self.opts.scale)
            self.dk[..., :k1, :] += dk
            self.dv[..., :k1, :] += dv
            grads.append(dq)
        return torch.cat(grads, -2)

    def key_grads(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """dk and dv (B, Hkv, Lk, D) summed over the rows `backward` computed, or None if it computed none."""
        if self.dk is None:
            return None
        if self.groups > 1:
            return tuple(g.unflatten(1, (g.size(1) // self.groups, self.groups)).sum(2) for g in (self.dk, self.dv))
        return self.dk, self.dv


def _checked_bias(additive: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | bool:
    """`additive`, contiguous, or False where its dtype or a row's largest term rules the kernel out."""
    if additive.dtype != dtype or not bool((additive.amax(-1) >= _MIN_ROW_BIAS).all()):
        return False
    return additive.contiguous()


def _four_d(block: torch.Tensor | None) -> torch.Tensor | None:
    """A (B, H, 1, rows, cols) block of `block_terms` with one head per group, as (B, H, rows, cols)."""
    return None if block is None else block.squeeze(2)
