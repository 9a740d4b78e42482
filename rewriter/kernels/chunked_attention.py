"""Exact softmax attention in query × key blocks, forward and FlashAttention-2-style backward.

Scores are formed per block in fp32, in the order the `rewriter::attention` op defines:

    S = scale · Q·Kᵀ
    S = softcap · tanh(S / softcap)              (when softcap > 0)
    S = S + bias                                 (when a bias is given; a program's addends one
                                                  after another, in the model's order)
    S = where(mask, S, mask_fill)                (when a boolean keep-mask is given; with a fill
                                                  program, its value per entry instead of mask_fill)
    S = where(key ≤ query + causal_offset, S, −∞) (when causal)
    out = softmax(S) · V

The mask and the causal flag act as ``masked_fill`` does, gradients included: the entries they hide
pass no gradient on, also in a row whose every key is hidden (whose probabilities are NaN).

The forward keeps a running max, sum and weighted sum per query row (Rabe & Staats) and returns
the output with the row statistics (max, sum); the backward recomputes each block's probabilities
as exp(S − max) / sum, so nothing of size Lq × Lk is ever held. (Max and sum are kept apart
rather than as one log-sum-exp: at scores near a finite fill such as −1e9, max + log(sum) rounds
the log away.) Blocks wholly above a causal diagonal are skipped.

Layouts: q (B, H, Lq, D); k (B|1, Hkv, Lk, D); v (B|1, Hkv, Lk, Dv) with H a multiple of Hkv
(query head h reads key/value head h // (H / Hkv)); bias and mask broadcast to (B, H, Lq, Lk).
Gradients of operands that broadcast (K/V of batch 1, a bias of size 1 on any axis) are summed
over the broadcast axes, so each has its operand's own shape.

The bias and the mask may instead be score programs (`rewriter.kernels.score_program`) over the
tensors in `leaves`, evaluated block by block, so no Lq × Lk tensor exists; gradients reach the
leaves that require them (a T5 bucket table) through each block's evaluation. A fill program gives
the masked entries' values (a model's ``where(keep, s, F) + B`` is ``where(keep, s + B, F + B)``);
its leaves get the gradients of the masked entries, the bias's those of the kept ones.

A block whose every key is hidden by the mask is skipped, forward and backward, where that is exact:
the fill is −∞, or every row of the block already has a score more than `_UNDERFLOW` above the fill
(above each entry's fill, with a fill program; exp of the fill's difference is then exactly 0 in fp32).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from rewriter.kernels.key_range import UNDERFLOW as _UNDERFLOW
from rewriter.kernels.score_program import Program
from rewriter.kernels.score_program_torch import addend_values, evaluate, evaluate_addends, leaf_gradients, trace

__all__ = ["BlockTerms", "ScoreOptions", "ScoreTerms", "chunked_attention_forward",
           "chunked_attention_backward"]


@dataclasses.dataclass(frozen=True)
class ScoreOptions:
    scale: float
    softcap: float = 0.0
    mask_fill: float = -math.inf
    causal: bool = False
    causal_offset: int = 0
    q_chunk: int = 1024
    k_chunk: int = 4096
    zero_masked_rows: bool = False  # rows whose every key is masked give 0 (SDPA, _safe_softmax), not NaN


@dataclasses.dataclass
class ScoreTerms:
    """The bias and mask of one call: tensors sliced per block, or programs evaluated per block.

    `bias` and `mask` (True = keep) broadcast to (B, H, Lq, Lk); a program replaces the tensor of
    the same name. `leaves` are the programs' operands.
    """

    bias: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    bias_program: Program | None = None
    mask_program: Program | None = None
    leaves: tuple[torch.Tensor, ...] = ()
    fill_program: Program | None = None  # the masked entries' values (None: the constant mask_fill)


class BlockTerms:
    """A call's `ScoreTerms` in the grouped (B, Hkv, G, rows, cols) layout, one block at a time.

    Nothing the size of the whole bias or mask is made: dense tensors are sliced, programs evaluated.
    """

    def __init__(self, terms: ScoreTerms, q: torch.Tensor, kv_heads: int):
        self.terms, self.kv_heads = terms, kv_heads
        self.batch, self.heads, self.device = q.size(0), q.size(1), q.device
        self.bias = None if terms.bias is None else _grouped(terms.bias, kv_heads)
        self.keep = None if terms.mask is None else _grouped(terms.mask, kv_heads)

    def _sizes(self, q0, q1, k0, k1):
        return self.batch, self.heads, (q0, q1), (k0, k1), self.device

    def bias_block(self, q0, q1, k0, k1, reverse_rows: bool = False) -> torch.Tensor | None:
        """The bias of rows q0:q1 and keys k0:k1 (rows last first with `reverse_rows`), or None."""
        if self.terms.bias_program is not None:
            values = evaluate(self.terms.bias_program, list(self.terms.leaves), *self._sizes(q0, q1, k0, k1),
                              reverse_rows)
            return _grouped(values, self.kv_heads)
        return _block(self.bias, q0, q1, k0, k1, reverse_rows)

    def bias_blocks(self, q0, q1, k0, k1, reverse_rows: bool = False) -> list[torch.Tensor]:
        """The bias's addends of rows q0:q1 and keys k0:k1, grouped, in the order the model adds them to
        the scores (`score_program.addend_steps`; one for a dense bias); [] without a bias."""
        if self.terms.bias_program is not None:
            return [_grouped(values, self.kv_heads) for values in evaluate_addends(
                self.terms.bias_program, list(self.terms.leaves), *self._sizes(q0, q1, k0, k1), reverse_rows)]
        block = _block(self.bias, q0, q1, k0, k1, reverse_rows)
        return [] if block is None else [block]

    def traced_block(self, program: Program, q0, q1, k0, k1) -> tuple[torch.Tensor, list]:
        """A program's block, grouped, and every step's value for `leaf_gradients`."""
        values = trace(program, list(self.terms.leaves), *self._sizes(q0, q1, k0, k1))
        return _grouped(values[-1], self.kv_heads), values

    def traced_addends(self, program: Program, traced: list) -> list[torch.Tensor]:
        """A traced program's addends (`bias_blocks`' values), grouped."""
        return [_grouped(values, self.kv_heads) for values in addend_values(program, traced, self.device)]

    def fill_block(self, q0, q1, k0, k1, reverse_rows: bool = False) -> torch.Tensor | None:
        """The fill program's block of rows q0:q1 and keys k0:k1 (rows last first with `reverse_rows`),
        grouped (None without one: the fill is the constant mask_fill)."""
        if self.terms.fill_program is None:
            return None
        values = evaluate(self.terms.fill_program, list(self.terms.leaves), *self._sizes(q0, q1, k0, k1),
                          reverse_rows)
        return _grouped(values, self.kv_heads)

    def keep_block(self, q0, q1, k0, k1, reverse_rows: bool = False) -> torch.Tensor | None:
        """The keep-mask of rows q0:q1 and keys k0:k1 (rows last first with `reverse_rows`), or None."""
        if self.terms.mask_program is not None:
            keep = evaluate(self.terms.mask_program, list(self.terms.leaves), *self._sizes(q0, q1, k0, k1),
                            reverse_rows)
            return _grouped(keep, self.kv_heads)
        return _block(self.keep, q0, q1, k0, k1, reverse_rows)

    def hidden_block(self, q0, q1, k0, k1) -> torch.Tensor | None:
        keep = self.keep_block(q0, q1, k0, k1)
        return None if keep is None else keep.logical_not()


def _skippable(hidden_b: torch.Tensor | None, row_max: torch.Tensor, opts: ScoreOptions, final: bool,
               fill_b: torch.Tensor | None = None) -> bool:
    """Whether a block whose hidden keys are `hidden_b` adds exactly nothing to rows with maxima `row_max`
    (running maxima in the forward, `final` ones in the backward); `fill_b` holds a fill program's values.

    A row with no key at all is NaN without `zero_masked_rows`, and so are the gradients its blocks
    pass on: the backward computes its blocks (the forward's output is NaN there either way).
    """
    if hidden_b is None or not bool(hidden_b.all()):
        return False
    if fill_b is not None:  # NaN (a row of −∞ minus a −∞ fill) is not above: such blocks are computed
        return bool((row_max.unsqueeze(-1) - fill_b > _UNDERFLOW).all())
    if opts.mask_fill == -math.inf:
        return opts.zero_masked_rows or not final or not bool(torch.isneginf(row_max).any())
    return bool((row_max - opts.mask_fill > _UNDERFLOW).all())


def _denominator(row_sum: torch.Tensor, opts: ScoreOptions) -> torch.Tensor:
    """The softmax denominator. A row keeping any key has a sum ≥ 1 (its max contributes exp(0));
    one whose every key is masked has 0, and gives 0/0 = NaN as a hand-written softmax does, or with
    `zero_masked_rows` 0/1 = 0 (its accumulator and probabilities are 0). NaN sums stay NaN."""
    return row_sum.clamp_min(1.0) if opts.zero_masked_rows else row_sum


def _grouped(t: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(b, h, x, y) → (b, kv_heads, h // kv_heads or 1, x, y), keeping broadcast axes of size 1."""
    while t.dim() < 4:
        t = t.unsqueeze(0)
    if t.size(1) == 1:
        return t.unsqueeze(2)
    return t.unflatten(1, (kv_heads, t.size(1) // kv_heads))


def _block(t: torch.Tensor | None, q0: int, q1: int, k0: int, k1: int,
           reverse_rows: bool = False) -> torch.Tensor | None:
    """Rows q0:q1 (last first with `reverse_rows`) and columns k0:k1 of a broadcastable (.., Lq|1, Lk|1) tensor."""
    if t is None:
        return None
    rows = slice(q0, q1) if t.size(-2) > 1 else slice(None)
    cols = slice(k0, k1) if t.size(-1) > 1 else slice(None)
    block = t[..., rows, cols]
    return block.flip(-2) if reverse_rows and t.size(-2) > 1 else block


def _key_stop(opts: ScoreOptions, q1: int, key_len: int) -> int:
    """One past the last key any of the rows before q1 may see."""
    if not opts.causal:
        return key_len
    return max(0, min(key_len, q1 + opts.causal_offset))


def _block_scores(qb, kb, bias_b: list, hidden_b, opts: ScoreOptions, q0: int, k0: int, keep_tanh: bool = False,
                  fill_b=None):
    """(final scores of one block, with soft-capping and `keep_tanh` the tanh values too (else None),
    where the causal flag hides a key (None: nowhere)).

    `qb` arrives already multiplied by `_query_factor(opts)`; `bias_b` holds the bias's addends, added
    one after another as the model rounds them; `hidden_b` is True where the mask hides a key, `fill_b`
    (when given) what those entries become. Works in place: a block costs one fp32 buffer (two when
    the tanh is kept; one more for a fill program's values).
    """
    scores = torch.matmul(qb, kb.transpose(-1, -2))
    capped = None
    if opts.softcap > 0:
        scores.tanh_()
        capped = scores.clone() if keep_tanh else None
        scores.mul_(opts.softcap)
    for addend in bias_b:
        scores.add_(addend)
    if hidden_b is not None and fill_b is not None:
        scores = torch.where(hidden_b, fill_b.float(), scores)
    elif hidden_b is not None:
        scores.masked_fill_(hidden_b, opts.mask_fill)
    causal_b = _causal_hidden(opts, q0, qb.size(-2), k0, kb.size(-2), qb.device)
    if causal_b is not None:
        scores.masked_fill_(causal_b, -math.inf)
    return scores, capped, causal_b


def _causal_hidden(opts: ScoreOptions, q0: int, rows: int, k0: int, cols: int, device) -> torch.Tensor | None:
    """(rows, cols) True where the causal flag hides key k0 + j from query q0 + i; None where it hides none."""
    if not opts.causal or k0 + cols - 1 <= q0 + opts.causal_offset:
        return None
    query = torch.arange(q0, q0 + rows, device=device).unsqueeze(1) + opts.causal_offset
    return torch.arange(k0, k0 + cols, device=device).unsqueeze(0) > query


def _query_factor(opts: ScoreOptions) -> float:
    """What Q is multiplied by before Q·Kᵀ: the scale, divided by the cap when soft-capping."""
    return opts.scale / opts.softcap if opts.softcap > 0 else opts.scale


def _prepare(q, k, v, terms: ScoreTerms):
    """Grouped fp32 views of q, k, v, and the block terms."""
    kv_heads = k.size(1)
    return _grouped(q, kv_heads).float(), k.unsqueeze(2).float(), v.unsqueeze(2).float(), BlockTerms(
        terms, q, kv_heads)


def chunked_attention_forward(q, k, v, terms: ScoreTerms, opts: ScoreOptions, fused=None):
    """Returns (out in q's dtype with shape (B, H, Lq, Dv), fp32 row statistics (B, H, Lq, 2)).

    The statistics hold each row's score max and sum of exp(score − max); a row whose every key
    is at −∞ has max −∞ and sum 0. `fused` (a `rewriter.kernels.fused_rows.FusedRows`) computes
    the chunks of rows it can exactly; their statistics are (log-sum-exp, 1).
    """
    qg, kg, vg, block_terms = _prepare(q, k, v, terms)
    query_len, key_len = q.size(-2), k.size(-2)
    out = torch.empty(qg.shape[:-1] + (v.size(-1),), dtype=q.dtype, device=q.device)
    stats = torch.empty(qg.shape[:-1] + (2,), dtype=torch.float32, device=q.device)
    for q0 in range(0, query_len, opts.q_chunk):
        q1 = min(q0 + opts.q_chunk, query_len)
        rows = fused.forward(q0, q1) if fused is not None else None
        if rows is not None:
            out[..., q0:q1, :] = rows[0].unflatten(1, qg.shape[1:3])
            stats[..., q0:q1, 0] = rows[1].unflatten(1, qg.shape[1:3])
            stats[..., q0:q1, 1] = 1.0
            continue
        qb = qg[..., q0:q1, :] * _query_factor(opts)
        row_max = torch.full(qb.shape[:-1], -math.inf, device=q.device)
        row_sum = torch.zeros_like(row_max)
        acc = torch.zeros(qb.shape[:-1] + (v.size(-1),), device=q.device)
        for k0 in range(0, _key_stop(opts, q1, key_len), opts.k_chunk):
            k1 = min(k0 + opts.k_chunk, key_len)
            hidden_b = block_terms.hidden_block(q0, q1, k0, k1)
            fill_b = None if hidden_b is None else block_terms.fill_block(q0, q1, k0, k1)
            if _skippable(hidden_b, row_max, opts, False, fill_b):
                continue
            scores, _, _ = _block_scores(
                qb, kg[..., k0:k1, :], block_terms.bias_blocks(q0, q1, k0, k1), hidden_b, opts, q0, k0, fill_b=fill_b)
            new_max = torch.maximum(row_max, scores.amax(-1))
            reference = _finite_reference(new_max)
            probs = scores.sub_(reference.unsqueeze(-1)).exp_()
            rescale = torch.exp(row_max - reference)
            row_sum = row_sum * rescale + probs.sum(-1)
            acc = acc * rescale.unsqueeze(-1) + torch.matmul(probs, vg[..., k0:k1, :])
            row_max = new_max
            del scores, probs  # free this block before the next one is allocated
        out[..., q0:q1, :] = acc / _denominator(row_sum, opts).unsqueeze(-1)
        stats[..., q0:q1, 0] = row_max
        stats[..., q0:q1, 1] = row_sum
    return out.flatten(1, 2), stats.flatten(1, 2)


def _finite_reference(row_max: torch.Tensor) -> torch.Tensor:
    """The row max, with 0 for rows whose keys are all −∞ so that exp() gives 0, not NaN."""
    return torch.where(torch.isneginf(row_max), 0.0, row_max)


def _reduce_to(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum a gradient block over the axes its (broadcast) operand has size 1 in."""
    axes = [axis for axis in range(grad.dim()) if shape[axis] == 1 and grad.size(axis) != 1]
    return grad.sum(axes, keepdim=True) if axes else grad


def chunked_attention_backward(grad_out, q, k, v, terms: ScoreTerms, out, stats, opts: ScoreOptions,
                               bias_grad: bool, leaf_grads: list[bool] | None = None, fused=None):
    """Gradients (dq, dk, dv, dbias or None, dleaves) recomputed block by block from the row statistics.

    With `bias_grad`, dbias is the dense bias's gradient; a bias program's leaves get gradients where
    `leaf_grads` asks (None for the others). `fused` is the forward's, making the same choices.
    """
    qg, kg, vg, block_terms = _prepare(q, k, v, terms)
    kv_heads = k.size(1)
    grad_g = _grouped(grad_out, kv_heads).float()
    stats_g = stats.unflatten(1, (kv_heads, q.size(1) // kv_heads))
    row_reference = _finite_reference(stats_g[..., 0]).unsqueeze(-1)
    row_sum = _denominator(stats_g[..., 1], opts).unsqueeze(-1)
    delta = (grad_g * _grouped(out, kv_heads).float()).sum(-1)
    query_len, key_len = q.size(-2), k.size(-2)
    dq = torch.zeros_like(qg)
    dk = torch.zeros_like(kg.squeeze(2))
    dv = torch.zeros_like(vg.squeeze(2))
    dbias, wanted_leaves = None, leaf_grads
    leaf_grads = None
    bias = terms.bias
    if bias_grad and bias is not None:
        bias4 = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))
        dbias = torch.zeros(bias4.shape, dtype=torch.float32, device=q.device)
    if (terms.bias_program is not None or terms.fill_program is not None) and any(wanted_leaves or ()):
        leaf_grads = _LeafGradients(terms, wanted_leaves)
    for q0 in range(0, query_len, opts.q_chunk):
        q1 = min(q0 + opts.q_chunk, query_len)
        rows = None if fused is None else fused.backward(
            q0, q1, grad_out[..., q0:q1, :], out[..., q0:q1, :], stats[..., q0:q1, 0])
        if rows is not None:
            dq[..., q0:q1, :] = rows.unflatten(1, qg.shape[1:3])
            continue
        qb, dob = qg[..., q0:q1, :], grad_g[..., q0:q1, :]
        qb_scaled = qb * _query_factor(opts)
        for k0 in range(0, _key_stop(opts, q1, key_len), opts.k_chunk):
            k1 = min(k0 + opts.k_chunk, key_len)
            kb, vb = kg[..., k0:k1, :], vg[..., k0:k1, :]
            hidden_b = block_terms.hidden_block(q0, q1, k0, k1)
            fill_b, fill_traced = None, None
            if hidden_b is not None and terms.fill_program is not None:
                fill_b, fill_traced = (block_terms.traced_block(terms.fill_program, q0, q1, k0, k1)
                                       if leaf_grads is not None else (block_terms.fill_block(q0, q1, k0, k1), None))
            if _skippable(hidden_b, stats_g[..., q0:q1, 0], opts, True, fill_b):
                continue
            if leaf_grads is not None and terms.bias_program is not None:
                _, traced = block_terms.traced_block(terms.bias_program, q0, q1, k0, k1)
                bias_b = block_terms.traced_addends(terms.bias_program, traced)
            else:
                bias_b, traced = block_terms.bias_blocks(q0, q1, k0, k1), None
            scores, capped, causal_b = _block_scores(qb_scaled, kb, bias_b, hidden_b, opts, q0, k0, True, fill_b)
            probs = scores.sub_(row_reference[..., q0:q1, :]).exp_().div_(row_sum[..., q0:q1, :])
            dv[..., k0:k1, :] += _reduce_to(torch.matmul(probs.transpose(-1, -2), dob).sum(2), dv.shape)
            grad_probs = torch.matmul(dob, vb.transpose(-1, -2)).sub_(delta[..., q0:q1].unsqueeze(-1))
            grad_scores = probs.mul_(grad_probs)
            if causal_b is not None:  # causally hidden entries pass nothing on (NaN only in a row with no key)
                grad_scores.masked_fill_(causal_b, 0.0)
            if fill_traced is not None:  # the masked entries' gradients reach the fill program's leaves
                leaf_grads.accumulate(terms.fill_program, fill_traced, torch.where(hidden_b, grad_scores, 0.0))
            if hidden_b is not None:  # masked entries pass no gradient on to the scores and the bias
                grad_scores.masked_fill_(hidden_b, 0.0)
            if dbias is not None:
                _accumulate_bias_grad(dbias, grad_scores, q0, q1, k0, k1)
            if traced is not None:
                leaf_grads.accumulate(terms.bias_program, traced, grad_scores)
            if capped is not None:  # d(c·tanh(x/c))/dx = 1 − tanh²
                grad_scores.mul_(capped.square_().neg_().add_(1))
            dq[..., q0:q1, :] += torch.matmul(grad_scores, kb).mul_(opts.scale)
            dk[..., k0:k1, :] += _reduce_to(torch.matmul(grad_scores.transpose(-1, -2), qb).sum(2), dk.shape).mul_(
                opts.scale)
            del scores, capped, causal_b, probs, grad_probs, grad_scores, bias_b, traced, fill_b, fill_traced  # free this block before the next
    key_grads = None if fused is None else fused.key_grads()
    if key_grads is not None:
        dk += key_grads[0]
        dv += key_grads[1]
    if not opts.zero_masked_rows:
        _poison_values(dv, stats_g[..., 1])
    dbias = None if dbias is None else dbias.reshape(bias.shape).to(bias.dtype)
    dleaves = leaf_grads.results() if leaf_grads is not None else [None] * len(terms.leaves)
    return dq.flatten(1, 2).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dbias, dleaves


def _poison_values(dv: torch.Tensor, row_sum: torch.Tensor) -> None:
    """NaN in dv (B|1, Hkv, Lk, Dv) for every key of a K/V head one of whose query rows keeps no key.

    Such a row's probabilities are NaN on every key, so the model's backward of ``probs @ v`` gives
    NaN to every key's dv (0 · NaN), also to keys that no row sees, whose blocks are skipped here.
    `row_sum` is (B, Hkv, G, Lq); a row with no key sums to 0."""
    poisoned = (row_sum == 0).any(-1).any(-1)  # (B, Hkv)
    if dv.size(0) == 1:
        poisoned = poisoned.any(0, keepdim=True)
    if bool(poisoned.any()):
        dv.masked_fill_(poisoned[:, :, None, None], math.nan)


class _LeafGradients:
    """Gradients of the bias and fill programs' floating-point leaves that require one, summed over the blocks."""

    def __init__(self, terms: ScoreTerms, wanted: list[bool]):
        self.leaves, self.wanted = list(terms.leaves), list(wanted)
        self.sums: list[torch.Tensor | None] = [None] * len(self.leaves)

    def accumulate(self, program: Program, traced: list, grad_values: torch.Tensor) -> None:
        """Add the block's share; `grad_values` is the grouped (B, Hkv, G, rows, cols) gradient of `program`'s values."""
        grad = grad_values.flatten(1, 2)
        for position, grad_leaf in enumerate(leaf_gradients(program, traced, self.leaves, self.wanted, grad)):
            if grad_leaf is not None:
                self.sums[position] = grad_leaf if self.sums[position] is None else self.sums[position] + grad_leaf

    def results(self) -> list[torch.Tensor | None]:
        return [None if total is None else total.to(leaf.dtype) for total, leaf in zip(self.sums, self.leaves)]


def _accumulate_bias_grad(dbias, grad_scores, q0, q1, k0, k1):
    block = grad_scores.flatten(1, 2)
    target = _block(dbias, q0, q1, k0, k1)
    target += _reduce_to(block, target.shape)
