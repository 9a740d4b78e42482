"""Query rows through PyTorch's fused CPU flash kernel, each chunk's mask built for that chunk only.

PyTorch's CPU flash-attention kernel (``aten._scaled_dot_product_flash_attention_for_cpu``) is
several times faster than the blockwise implementation, but it takes one dense additive mask. Every
query row is an independent softmax, so `FusedRows` feeds it a few rows at a time. The keys of a
chunk are split by what the mask proves (`rewriter.kernels.program_proofs.key_bounds`, the causal
flag, or a bias ``where(keep, x, finfo.min)`` through `filled_bias_bounds`): keys past the last causally visible one, or before a sliding window, are not passed at
all; the keys every row of the chunk sees on the causal/window side get a mask from the other
conjuncts alone (for a padding mask, one row broadcast over the chunk); only the diagonal bands
(at most rows × rows keys) get the full mask. The parts' results are merged by their log-sum-exp
(as in split-KV flash decoding); the backward runs each part against the merged output and
log-sum-exp. Nothing Lq × Lk is held, and no mask wider than `MASK_BYTES` is built. A bias
``x + where(keep[key], 0, f)`` (T5's buckets plus padding) passes x alone on each run of kept keys
(`rewriter.kernels.key_run_bias`). Where a program reads positions through ``key − query`` (T5,
ALiBi), a chunk's rows are taken last first: its values are then a strided view of the differences,
which the kernel reads as they are (it needs only the keys adjacent), so the view is not copied.

A chunk goes to the fused kernel only where that is exact, checked on the chunk's own mask:
every row keeps at least one key (the kernel gives 0, not the op's NaN, for a row with none, and
its backward would divide by a zero sum; skipped keys are then exactly 0 too), a finite fill (each
masked entry's value, with a fill program, whose calls pass every key) is at
or below `EFFECTIVELY_NEG_INF` (``s + fill`` is then exactly ``fill``, and exp() of it is exactly 0),
a bias has the query's dtype, its addends' order cannot change a probability (`_order_free`), and every row's largest additive term is at least `_MIN_ROW_BIAS`
(below it the kernel's log-sum-exp keeps log(sum) too coarsely for the backward). Otherwise the
caller computes those rows blockwise. The backward makes the same per-chunk decision, so it reads
the statistics the forward stored.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from rewriter.kernels.chunked_attention import BlockTerms, ScoreOptions, ScoreTerms
from rewriter.kernels.key_run_bias import KeyRunBias, kernel_layout, row_max
from rewriter.kernels.program_proofs import EFFECTIVELY_NEG_INF, filled_bias_bounds, key_bounds, relative_steps

__all__ = ["FusedRows", "MASK_BYTES"]

MASK_BYTES = 32 << 20  # the additive mask of one chunk of rows, at most
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MIN_ROW_BIAS = -64.0
_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_FLASH_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


@dataclasses.dataclass
class _Part:
    """Keys k0:k1 of a chunk of rows, with their additive mask (None: nothing to add) and which rows
    keep a key there (None: all)."""

    k0: int
    k1: int
    additive: torch.Tensor | None
    kept: torch.Tensor | None


class FusedRows:
    """The fused kernel over chunks of query rows, for one call of `rewriter::attention`.

    q (B, H, Lq, D), k and v (B, Hkv, Lk, D) with H a multiple of Hkv; `forward` and `backward` take
    the rows q0:q1 and return None where those rows must be computed blockwise instead.
    """

    @staticmethod
    def applies(q, k, v, opts: ScoreOptions, bias_grad: bool) -> bool:
        """Whether the kernel computes this call's semantics at all (before looking at any mask)."""
        return q.device.type == "cpu" and FusedRows.same_semantics(q, k, v, opts, bias_grad)

    @staticmethod
    def same_semantics(q, k, v, opts: ScoreOptions, bias_grad: bool) -> bool:
        """Whether SDPA's fused kernels (CPU flash, CUDA memory-efficient) compute this call's semantics
        on any device: one float dtype, no soft-cap, no bias gradient, equal head dims of q and v, and
        K/V with q's batch (the kernels do not broadcast it)."""
        return (q.dtype in _DTYPES and q.dtype == k.dtype == v.dtype
                and opts.softcap == 0 and not bias_grad and q.size(-1) == v.size(-1)
                and q.size(0) == k.size(0) == v.size(0))

    def __init__(self, q, k, v, terms: ScoreTerms, opts: ScoreOptions):
        groups = q.size(1) // k.size(1)
        self.groups, self.opts = groups, opts
        self.q = q.contiguous()
        self.k = (k.repeat_interleave(groups, dim=1) if groups > 1 else k).contiguous()
        self.v = (v.repeat_interleave(groups, dim=1) if groups > 1 else v).contiguous()
        upper, lower, inner = None, None, terms
        if terms.fill_program is not None:
            pass  # keys outside a bound would hold the fill program's values: every key is passed
        elif terms.mask_program is not None:
            upper, lower, rest = key_bounds(terms.mask_program)
            inner = dataclasses.replace(terms, mask_program=rest)
        elif terms.bias_program is not None and terms.mask is None:  # HF eager: where(keep, 0, finfo.min)
            found = filled_bias_bounds(terms.bias_program)
            if found is not None:
                upper, lower, rest = found
                inner = dataclasses.replace(terms, bias_program=rest)
        if opts.causal:
            upper = opts.causal_offset if upper is None else min(upper, opts.causal_offset)
        self.upper, self.lower = upper, lower
        self.terms = BlockTerms(terms, q, kv_heads=q.size(1))  # one "group" per head: 4-D blocks
        self.inner_terms = BlockTerms(inner, q, kv_heads=q.size(1))
        # T5's bias plus padding, x + where(keep[key], 0, f): x alone on runs of kept keys, where no bound split it
        self.key_runs = KeyRunBias.applies(terms, q, k.size(-2)) if inner is terms else None
        per_row = q.size(0) * q.size(1) * k.size(-2) * q.element_size()
        self.rows = max(1, MASK_BYTES // per_row)
        self.reverse = _reads_differences(terms)
        self.dk = self.dv = None

    def _oriented(self, rows: torch.Tensor, axis: int = -2) -> torch.Tensor:
        """Rows of a chunk in the order its masks are built (last first where `reverse`), and back."""
        return rows.flip(axis) if self.reverse else rows

    def _chunks(self, q0: int, q1: int):
        for start in range(q0, q1, self.rows):
            yield start, min(start + self.rows, q1)

    def _key_ranges(self, q0: int, q1: int) -> list[tuple[int, int, bool]]:
        """(k0, k1, inner) ranges covering every key a row of q0:q1 may keep; `inner` ranges are
        inside the causal and window bounds for every row."""
        keys = self.k.size(-2)
        stop = keys if self.upper is None else min(max(q1 + self.upper, 0), keys)
        start = 0 if self.lower is None else min(max(q0 + self.lower, 0), stop)
        inner_start = start if self.lower is None else min(max(q1 - 1 + self.lower, start), stop)
        inner_stop = stop if self.upper is None else min(max(q0 + self.upper + 1, inner_start), stop)
        ranges = [(start, inner_start, False), (inner_start, inner_stop, True), (inner_stop, stop, False)]
        return [(k0, k1, inner) for k0, k1, inner in ranges if k1 > k0]

    def _part(self, q0: int, q1: int, k0: int, k1: int, inner: bool) -> _Part | None:
        """The part's mask, or None where the kernel is not exact for it."""
        opts, device, dtype = self.opts, self.q.device, self.q.dtype
        terms = self.inner_terms if inner else self.terms
        keep = _four_d(terms.keep_block(q0, q1, k0, k1, self.reverse))
        if not inner and opts.causal:
            rows = self._oriented(torch.arange(q0, q1, device=device), 0).unsqueeze(1) + opts.causal_offset
            below = torch.arange(k0, k1, device=device).unsqueeze(0) <= rows
            keep = below if keep is None else keep & below
        bias = _four_d(terms.bias_block(q0, q1, k0, k1, self.reverse))
        if bias is not None and (bias.dtype != dtype or not _order_free(terms, q0, q1, k0, k1, self.reverse, keep)):
            return None
        if keep is None:
            return _Part(k0, k1, None if bias is None else kernel_layout(bias), None)
        if terms.terms.fill_program is not None:  # each masked entry's own fill, all ≤ −1e30 or blockwise
            fill = _four_d(terms.fill_block(q0, q1, k0, k1, self.reverse)).float()
            if not bool((torch.where(keep, -math.inf, fill) <= EFFECTIVELY_NEG_INF).all()):
                return None
            fill = fill.to(dtype)
        elif opts.mask_fill != -math.inf and opts.mask_fill > EFFECTIVELY_NEG_INF:
            return None
        else:
            fill = torch.tensor(opts.mask_fill, dtype=dtype, device=device)
        additive = torch.where(keep, torch.tensor(0, dtype=dtype, device=device) if bias is None else bias, fill)
        return _Part(k0, k1, kernel_layout(additive), keep.any(-1))

    def _parts(self, q0: int, q1: int) -> list[_Part] | None:
        """The chunk's parts, or None where the fused kernel is not exact for these rows."""
        parts = []
        for k0, k1, inner in self._key_ranges(q0, q1):
            found = None
            if inner and self.key_runs is not None:
                found = self.key_runs.parts(q0, q1, k0, k1, self.reverse)
                found = None if found is None else [_Part(start, stop, mask, None) for start, stop, mask in found]
            if found is None:
                part = self._part(q0, q1, k0, k1, inner)
                if part is None:
                    return None
                found = [part]
            parts.extend(found)
        if not parts or not bool(_any_row(parts).all()):
            return None
        if self.terms.bias is not None or self.terms.terms.bias_program is not None:
            largest = None
            for part in parts:
                if part.additive is None:  # nothing is added on these keys: every row's largest term there is 0
                    most = torch.zeros((), device=self.q.device)
                else:
                    most = row_max(part.additive)
                    # A row at −∞ on all of this part's keys weighs 0 in the merge (the kernel reports lse 0 there).
                    part.kept = most > -math.inf if part.kept is None else part.kept & (most > -math.inf)
                largest = most if largest is None else torch.maximum(largest, most)
            if not bool((largest >= _MIN_ROW_BIAS).all()):
                return None
        return parts

    def forward(self, q0: int, q1: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(out (B, H, q1 − q0, Dv), log-sum-exp (B, H, q1 − q0)) of rows q0:q1, or None."""
        outs, lses = [], []
        for start, stop in self._chunks(q0, q1):
            parts = self._parts(start, stop)
            if parts is None:
                return None
            q_rows = self._oriented(self.q[..., start:stop, :])
            results = [_FLASH(q_rows, self.k[..., part.k0:part.k1, :], self.v[..., part.k0:part.k1, :], 0.0, False,
                              attn_mask=part.additive, scale=self.opts.scale) for part in parts]
            out, lse = _merge(parts, results)
            outs.append(self._oriented(out))
            lses.append(self._oriented(lse, -1))
        return torch.cat(outs, -2), torch.cat(lses, -1)

    def backward(self, q0: int, q1: int, grad_out, out, lse) -> torch.Tensor | None:
        """dq (B, H, q1 − q0, D) of rows q0:q1, or None; their share of dk and dv goes to `key_grads`."""
        chunks = [(start, stop, self._parts(start, stop)) for start, stop in self._chunks(q0, q1)]
        if any(parts is None for *_, parts in chunks):
            return None
        if self.dk is None:
            self.dk = torch.zeros(self.k.shape, dtype=torch.float32, device=self.k.device)
            self.dv = torch.zeros(self.v.shape, dtype=torch.float32, device=self.v.device)
        grads = []
        for start, stop, parts in chunks:
            rows = slice(start - q0, stop - q0)
            grad_rows = self._oriented(grad_out[..., rows, :]).contiguous()
            out_rows = self._oriented(out[..., rows, :]).contiguous()
            lse_rows = self._oriented(lse[..., rows], -1).contiguous()
            q_rows = self._oriented(self.q[..., start:stop, :])
            dq_rows = None
            for part in parts:
                dq, dk, dv = _FLASH_BACKWARD(
                    grad_rows, q_rows, self.k[..., part.k0:part.k1, :],
                    self.v[..., part.k0:part.k1, :], out_rows, lse_rows, 0.0, False, attn_mask=part.additive,
                    scale=self.opts.scale)
                self.dk[..., part.k0:part.k1, :] += dk
                self.dv[..., part.k0:part.k1, :] += dv
                dq_rows = dq if dq_rows is None else dq_rows + dq
            grads.append(self._oriented(dq_rows))
        return torch.cat(grads, -2)

    def key_grads(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """dk and dv (B, Hkv, Lk, D) summed over the rows `backward` computed, or None if it computed none."""
        if self.dk is None:
            return None
        if self.groups > 1:
            return tuple(g.unflatten(1, (g.size(1) // self.groups, self.groups)).sum(2) for g in (self.dk, self.dv))
        return self.dk, self.dv


def _any_row(parts: list[_Part]) -> torch.Tensor:
    """Whether each row keeps a key in some part."""
    if any(part.kept is None for part in parts):
        return torch.ones((), dtype=torch.bool)
    kept = parts[0].kept
    for part in parts[1:]:
        kept = kept | part.kept
    return kept


def _merge(parts: list[_Part], results) -> tuple[torch.Tensor, torch.Tensor]:
    """One softmax over all parts from each part's (out, lse): weights exp(lse_p − max), rows a part
    hides completely weighing 0 (the kernel reports lse 0 and out 0 for them)."""
    lses = []
    for part, (_, lse) in zip(parts, results):
        lse = lse.float()
        if part.kept is not None:
            lse = torch.where(part.kept, lse, -math.inf)
        lses.append(lse)
    if len(parts) == 1:
        return results[0][0], lses[0]
    top = torch.stack(lses).amax(0)
    weights = [torch.exp(lse - top) for lse in lses]
    total = sum(weights)
    out = sum(w.unsqueeze(-1) * o.float() for w, (o, _) in zip(weights, results)) / total.unsqueeze(-1)
    return out.to(results[0][0].dtype), top + torch.log(total)


def _order_free(terms: BlockTerms, q0: int, q1: int, k0: int, k1: int, reverse: bool,
                keep: torch.Tensor | None) -> bool:
    """Whether the kernel, which adds the bias's addends to the scores as one sum, gives every kept entry
    of the block the probability that adding them in turn (the model's rounding) gives: at each entry
    at most one addend is nonzero (s + b + 0 is s + b), or none is positive and one is at or below
    `EFFECTIVELY_NEG_INF` (both orders give a score whose exp() is exactly 0 in a row that keeps a key,
    which `FusedRows._parts` checks on the row's largest bias). A bias of one addend always is."""
    program = terms.terms.bias_program
    if program is None or len(program.addends) == 1:
        return True
    addends = [_four_d(block) for block in terms.bias_blocks(q0, q1, k0, k1, reverse)]
    nonzero = sum((addend != 0).to(torch.int8) for addend in addends)  # NaN counts as nonzero
    lowest, highest = addends[0], addends[0]
    for addend in addends[1:]:
        lowest, highest = torch.minimum(lowest, addend), torch.maximum(highest, addend)
    free = (nonzero <= 1) | ((highest <= 0) & (lowest <= EFFECTIVELY_NEG_INF))
    return bool((free if keep is None else free | ~keep).all())


def _reads_differences(terms: ScoreTerms) -> bool:
    """Whether a program of the call has steps that read positions only through ``key − query`` (T5's
    buckets, ALiBi): their blocks are strided views, with no copy, when a chunk's rows are taken last first."""
    return any(program is not None and bool(relative_steps(program)[1])
               for program in (terms.bias_program, terms.mask_program))


def _four_d(block: torch.Tensor | None) -> torch.Tensor | None:
    """A (B, H, 1, rows, cols) block of `BlockTerms` with one head per group, as (B, H, rows, cols)."""
    return None if block is None else block.squeeze(2)
