"""Random attention programs for the differential fuzzer: one `Case` describes one program.

A case fixes the product spelling (`@`, bmm, baddbmm, einsum, SDPA), where the scale sits (on the
scores, on Q, split over Q and K, a learned or input tensor, a per-head vector), masks (boolean or
additive key padding, causal with an offset, bands, rows with every key masked), biases (per head,
relative, ALiBi-like, GPT-2's ``(1 − m)·finfo.min`` key padding from an integer input), the order of
mask and bias (GPT-2 masks first), a constant added before the mask, soft-capping, casts (bf16/fp16 scores with an fp32 softmax), layouts,
grouped K/V heads (interleaved or tiled), batch broadcast of K/V, batch/head views around the
softmax, cross-attention and odd lengths. `AttentionProgram(case)` is the module; `case_inputs`
its inputs. `cases()` is the hypothesis strategy.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

__all__ = ["Case", "AttentionProgram", "case_inputs", "cases"]

logger = logging.getLogger(__name__)

LENGTHS = (1, 2, 3, 5, 7, 8, 13, 17)


@dataclasses.dataclass(frozen=True)
class Case:
    product: str = "matmul"  # matmul | bmm | baddbmm | einsum | sdpa
    batch: int = 2
    heads: int = 2
    kv_heads: int = 2
    kv_order: str = "interleave"  # interleave | expand | tile | broadcast (how K/V heads reach Q's)
    kv_batch: int = 2  # 1: K and V broadcast over the batch
    query_len: int = 5
    key_len: int = 5
    head_dim: int = 8
    value_dim: int = 8
    seq_first: bool = False  # inputs (B, L, H, D), transposed in the program
    scale: str = "scores_div"  # scores_mul | scores_div | query | split | none | parameter | input | per_head
    bias: str = "none"  # none | per_head | relative | alibi | padding ((1 − m)·finfo.min, m a (B, Lk) input)
    mask: str = "none"  # none | padding | causal | band | all_masked_row | padding_causal (left padding, then a
    #                     causal masked_fill(−∞): the first rows of a padded batch row lose every key)
    mask_form: str = "masked_fill"  # masked_fill | where | additive
    fill: float = float("-inf")
    causal_offset: int = 0
    mask_then_bias: bool = False
    shift: float = 0.0  # a constant added to the scores just before the mask
    softcap: bool = False
    dtype: str = "float32"  # float32 | bfloat16 | float16 (scores in it, softmax in fp32)
    batch_view: bool = False  # bmm on (B·H) viewed as (B, H) around the mask and softmax
    chunks: tuple[int, int] = (4, 4)
    seed: int = 0


def _keep_mask(case: Case, generator: torch.Generator) -> torch.Tensor | None:
    """(B|1, 1, Lq|1, Lk) boolean keep-mask, or None."""
    lq, lk = case.query_len, case.key_len
    rows, cols = torch.arange(lq)[:, None], torch.arange(lk)[None, :]
    if case.mask == "padding":
        lengths = torch.randint(1, lk + 1, (case.batch,), generator=generator)
        return (torch.arange(lk)[None, :] < lengths[:, None])[:, None, None, :]
    if case.mask == "causal":
        return (cols <= rows + case.causal_offset)[None, None]
    if case.mask == "band":
        return ((rows - cols).abs() <= 1 + case.causal_offset % 3)[None, None]
    if case.mask == "padding_causal":
        lengths = torch.randint(1, lk + 1, (case.batch,), generator=generator)
        return (torch.arange(lk)[None, :] >= lk - lengths[:, None])[:, None, None, :]
    if case.mask == "all_masked_row":
        keep = torch.rand(case.batch, 1, lq, lk, generator=generator) > 0.3
        keep[..., lq // 2, :] = False
        return keep
    return None


class AttentionProgram(nn.Module):
    """The program a `Case` describes: forward(q, k, v, [keep-mask], [0-d scale]) → attention output."""

    def __init__(self, case: Case):
        super().__init__()
        self.case = case
        generator = torch.Generator().manual_seed(case.seed)
        h, lq, lk = case.heads, case.query_len, case.key_len
        self.tau = nn.Parameter(torch.tensor(0.2 + torch.rand((), generator=generator).item()))
        self.head_scale = nn.Parameter(torch.rand(1, h, 1, 1, generator=generator) * 0.5)
        self.relative = nn.Parameter(torch.randn(1, h, lq, lk, generator=generator))
        self.per_head = nn.Parameter(torch.randn(1, h, 1, 1, generator=generator))
        slopes = torch.tensor([2.0 ** -(i + 1) for i in range(h)]).view(1, h, 1, 1)
        self.register_buffer("alibi", slopes * (torch.arange(lk)[None, :] - torch.arange(lq)[:, None]))

    def _scaled(self, q, k):
        c = self.case
        factor = c.head_dim ** -0.5
        if c.scale == "query":
            q = q * factor
        elif c.scale == "split":
            q, k = q * factor ** 0.5, k * factor ** 0.5
        return q, k

    def _score_scale(self, scores, extra_scale):
        c = self.case
        factor = c.head_dim ** -0.5
        return {
            "scores_mul": lambda s: s * factor, "scores_div": lambda s: s / c.head_dim ** 0.5,
            "parameter": lambda s: s * self.tau, "input": lambda s: s * extra_scale,
            "per_head": lambda s: s * self.head_scale,
        }.get(c.scale, lambda s: s)(scores)

    def _bias(self, padding=None, dtype=torch.float32):
        if self.case.bias == "padding":  # GPT-2 (transformers 4.x): (1 − m)[:, None, None, :] · finfo.min
            # the case's finite fill (finfo.min or −1e4), the same in its fp32 reference
            # (`check._farther_from_fp32_than_eager`); −1e4 where the fill is −∞ ((1 − m)·−∞ is NaN)
            fill = self.case.fill if math.isfinite(self.case.fill) else -1e4
            return (1.0 - padding[:, None, None, :].to(dtype)) * fill
        return {"per_head": self.per_head, "relative": self.relative, "alibi": self.alibi}.get(self.case.bias)

    def _apply_mask(self, scores, keep):
        c = self.case
        if keep is None:
            return scores
        if c.mask_form == "where":
            return torch.where(keep, scores, c.fill)
        if c.mask_form == "additive":
            return scores + torch.zeros(keep.shape, dtype=scores.dtype).masked_fill(~keep, c.fill)
        return scores.masked_fill(~keep, c.fill)

    def _expand_kv(self, k, v):
        c = self.case
        groups = c.heads // c.kv_heads
        if groups == 1 or c.kv_order == "broadcast":
            return k, v
        if c.kv_order == "tile":
            return k.repeat(1, groups, 1, 1), v.repeat(1, groups, 1, 1)
        if c.kv_order == "expand":
            def repeat_kv(x):
                b, kv, s, d = x.shape
                return x[:, :, None].expand(b, kv, groups, s, d).reshape(b, kv * groups, s, d)
            return repeat_kv(k), repeat_kv(v)
        return k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)

    def forward(self, q, k, v, *extras):
        c = self.case
        keep = extras[0] if c.mask != "none" else None
        padding = extras[int(keep is not None)] if c.bias == "padding" else None
        extra_scale = extras[-1] if c.scale == "input" else None
        dtype = getattr(torch, c.dtype)
        if c.seq_first:
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        if c.product == "sdpa":
            return self._sdpa(q, k, v, keep, extra_scale)
        k, v = self._expand_kv(k, v)
        q, k = self._scaled(q, k)
        b, h, lq, lk = c.batch, c.heads, c.query_len, c.key_len
        merged = c.product in ("bmm", "baddbmm")
        if merged:
            k, v = k.expand(b, h, lk, -1), v.expand(b, h, lk, -1)
            q3, k3, v3 = q.reshape(b * h, lq, -1), k.reshape(b * h, lk, -1), v.reshape(b * h, lk, -1)
            if c.product == "baddbmm":
                added = torch.zeros(b * h, 1, lk, dtype=dtype) if self._bias(padding, dtype) is None else \
                    self._bias(padding, dtype).expand(b, h, lq, lk).reshape(b * h, lq, lk).to(dtype)
                scores = torch.baddbmm(added, q3, k3.transpose(1, 2), beta=1.0, alpha=1.0)
            else:
                scores = torch.bmm(q3, k3.transpose(1, 2))
            scores = scores.view(b, h, lq, lk) if c.batch_view else scores
        elif c.product == "einsum":
            scores = torch.einsum("bhqd,bhkd->bhqk", q, k.expand(-1, h, -1, -1) if k.size(1) == 1 else k)
        else:
            scores = q @ k.transpose(-1, -2)
        scores = self._score_scale(scores if scores.dim() == 4 else scores.view(b, h, lq, lk), extra_scale) \
            if c.scale in ("parameter", "input", "per_head") else self._score_scale(scores, extra_scale)
        if c.softcap:
            scores = torch.tanh(scores / 5.0) * 5.0
        keep4 = None if keep is None else keep
        if scores.dim() == 3 and keep4 is not None:
            keep4 = keep4.expand(b, h, lq, lk).reshape(b * h, lq, lk)
        bias = None if c.product == "baddbmm" else self._bias(padding, scores.dtype)
        if bias is not None and scores.dim() == 3:
            bias = bias.expand(b, h, lq, lk).reshape(b * h, lq, lk)
        if c.mask_then_bias:
            scores = self._apply_mask(scores + c.shift if c.shift else scores, keep4)
            scores = scores if bias is None else scores + bias.to(scores.dtype)
        else:
            scores = scores if bias is None else scores + bias.to(scores.dtype)
            scores = self._apply_mask(scores + c.shift if c.shift else scores, keep4)
        if c.mask == "padding_causal":
            scores = scores.masked_fill(torch.ones(lq, lk, dtype=torch.bool).triu(1 + c.causal_offset), float("-inf"))
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(dtype)
        if merged:
            out = torch.bmm(probs.reshape(b * h, lq, lk), v3).view(b, h, lq, -1)
        elif c.product == "einsum":
            out = torch.einsum("bhqk,bhkd->bhqd", probs, v.expand(-1, h, -1, -1) if v.size(1) == 1 else v)
        else:
            out = probs @ v
        out = out.float()
        return out.transpose(1, 2) if c.seq_first else out

    def _sdpa(self, q, k, v, keep, extra_scale):
        c = self.case
        mask = keep
        if keep is not None and c.mask_form == "additive":
            mask = torch.zeros(keep.shape, dtype=q.dtype).masked_fill(~keep, c.fill)
        scale = {"scores_mul": c.head_dim ** -0.5, "none": 1.0}.get(c.scale)
        gqa = c.kv_heads not in (1, c.heads)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa).float()
        return out.transpose(1, 2) if c.seq_first else out


def case_inputs(case: Case) -> list:
    generator = torch.Generator().manual_seed(case.seed + 1)
    b, h, lq, lk = case.batch, case.heads, case.query_len, case.key_len

    def tensor(*shape):
        x = torch.randn(*shape, generator=generator)
        return x.transpose(1, 2).contiguous() if case.seq_first else x

    inputs = [tensor(b, h, lq, case.head_dim), tensor(case.kv_batch, case.kv_heads, lk, case.head_dim),
              tensor(case.kv_batch, case.kv_heads, lk, case.value_dim)]
    keep = _keep_mask(case, generator)
    if keep is not None:
        inputs.append(keep)
    if case.bias == "padding":  # 0/1 per key, left or right padded, batch row 0 fully padded at times
        lengths = torch.randint(0, case.key_len + 1, (case.batch,), generator=generator)
        positions = torch.arange(case.key_len)[None, :]
        left = bool(torch.randint(0, 2, (), generator=generator))
        kept = positions >= case.key_len - lengths[:, None] if left else positions < lengths[:, None]
        inputs.append(kept.long())
    if case.scale == "input":
        inputs.append(torch.tensor(0.3))
    return inputs


@st.composite
def cases(draw) -> Case:
    """A hypothesis strategy over `Case`s that eager PyTorch can run."""
    product = draw(st.sampled_from(["matmul", "matmul", "bmm", "baddbmm", "einsum", "sdpa"]))
    heads = draw(st.sampled_from([1, 2, 4]))
    kv_heads = draw(st.sampled_from(sorted({1, heads, max(1, heads // 2)})))
    kv_order = draw(st.sampled_from(["interleave", "expand", "tile", "broadcast"] if kv_heads == 1 else
                                    ["interleave", "expand", "tile"]))
    if product == "sdpa":
        kv_order = "sdpa"
    query_len = draw(st.sampled_from(LENGTHS))
    key_len = draw(st.sampled_from(LENGTHS)) if draw(st.booleans()) else query_len
    mask = draw(st.sampled_from(["none", "padding", "causal", "band", "all_masked_row"] +
                                ([] if product == "sdpa" else ["padding_causal"])))
    scale_choices = ["scores_mul", "none"] if product == "sdpa" else [
        "scores_mul", "scores_div", "query", "split", "none", "parameter", "input", "per_head"]
    dtype = draw(st.sampled_from(["float32", "float32", "float32", "bfloat16", "float16"]))
    fills = [float("-inf"), torch.finfo(getattr(torch, dtype)).min, -1e4]
    batch = draw(st.sampled_from([1, 2, 3]))
    return Case(
        product=product, batch=batch, heads=heads, kv_heads=kv_heads,
        kv_order=kv_order, kv_batch=1 if draw(st.booleans()) else batch,
        query_len=query_len, key_len=key_len, head_dim=draw(st.sampled_from([4, 8])),
        value_dim=draw(st.sampled_from([4, 8, 6])), seq_first=draw(st.booleans()),
        scale=draw(st.sampled_from(scale_choices)),
        bias="none" if product == "sdpa" else draw(st.sampled_from(["none", "per_head", "relative", "alibi", "padding"])),
        mask=mask, mask_form=draw(st.sampled_from(["masked_fill", "where", "additive"])),
        fill=draw(st.sampled_from(fills)), causal_offset=draw(st.integers(-1, 2)),
        mask_then_bias=draw(st.booleans()), shift=0.0 if product == "sdpa" else draw(st.sampled_from([0.0, 0.0, 3.0, -2.5])),
        softcap=product != "sdpa" and draw(st.booleans()),
        dtype=dtype, batch_view=product in ("bmm", "baddbmm") and draw(st.booleans()),
        chunks=(draw(st.sampled_from([1, 2, 3, 4, 16])), draw(st.sampled_from([1, 2, 3, 5, 16]))),
        seed=draw(st.integers(0, 2**16)),
    )
