"""Issue 10 item 6: views that only split or merge batch and head axes inside an attention block.

BLOOM (built from `transformers` with random weights) and hand-written neighbours: views on the
scores, on the probabilities, around a mask or bias, in both directions; views that move a score
to another row or head are left alone.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rewriter
from parity import assert_parity, op_count

B, H, L, D = 2, 4, 13, 8


def _inputs(*extra):
    torch.manual_seed(0)
    return [torch.randn(B * H, L, D) for _ in range(3)] + list(extra)


class MergedProducts(nn.Module):
    """bmm on (B·H) batches; the scores are viewed as (B, H, L, L) for the mask and softmax."""

    def __init__(self, where: str):
        super().__init__()
        self.where = where
        self.slopes = nn.Parameter(torch.rand(B * H, 1, L))

    def forward(self, q, k, v, keep):
        scores = torch.baddbmm(self.slopes, q, k.transpose(1, 2), beta=1.0, alpha=D**-0.5)
        if self.where == "probabilities":  # only the probabilities are viewed
            probs = F.softmax(scores, -1).view(B, H, L, L)
            return probs @ v.view(B, H, L, D)
        scores = scores.view(B, H, L, L).masked_fill(~keep, torch.finfo(torch.float32).min)
        probs = F.softmax(scores, dim=-1, dtype=torch.float32)
        if self.where == "split_output":
            return probs @ v.view(B, H, L, D)
        return torch.bmm(probs.view(B * H, L, L), v)


@pytest.mark.parametrize("where", ["merged_output", "split_output", "probabilities"])
def test_merged_batch_views_are_part_of_the_block(where):
    keep = torch.rand(B, 1, L, L) > 0.3
    keep[..., 0] = True
    assert_parity(MergedProducts(where), _inputs(keep), rewrites=1, chunk_size=(4, 5), grad_atol=1e-3)


class SplitProducts(nn.Module):
    """4-D products; the scores are merged to (B·H, L, L) around a bias add and viewed back."""

    def forward(self, q, k, v, bias):
        scores = (q @ k.transpose(-1, -2) * 0.3).reshape(B * H, L, L) + bias
        return F.softmax(scores.view(B, H, L, L), -1) @ v


@pytest.mark.parametrize("bias_shape", [(B * H, L, L), (B * H, 1, L), (1, L, L), (L,)])
def test_split_products_merged_around_a_bias(bias_shape):
    torch.manual_seed(1)
    qkv = [torch.randn(B, H, L, D) for _ in range(3)]
    assert_parity(SplitProducts(), qkv + [torch.randn(*bias_shape)], rewrites=1, chunk_size=(5, 4), grad_atol=1e-3)


class Regrouped(nn.Module):
    """A view with the right element count that regroups batch and heads: not a batch split."""

    def forward(self, q, k, v):
        scores = (q @ k.transpose(-1, -2)).view(H, B, L, L)  # (B, H) read as (H, B)
        return torch.softmax(scores, -1).reshape(B, H, L, L) @ v


class RowMoving(nn.Module):
    """A view that folds the query axis into the head axis (and one that unfolds it)."""

    def forward(self, q, k, v):
        scores = (q @ k.transpose(-1, -2)).view(B, H * L, L) * 0.5
        return torch.softmax(scores.view(B, H, L, L), -1) @ v


@pytest.mark.parametrize("module, reason", [(Regrouped(), "batch"), (RowMoving(), "reshape")])
def test_views_that_move_scores_are_left_alone(module, reason):
    torch.manual_seed(2)
    inputs = tuple(torch.randn(B, H, L, D) for _ in range(3))
    gm, report = rewriter.optimize_module(module, inputs, dynamic_shapes=None)  # the reason at these shapes
    assert op_count(gm) == 0 and reason in report.matches[0].reason, report.matches[0].reason
    torch.testing.assert_close(gm(*inputs), module(*inputs))


def _bloom():
    transformers = pytest.importorskip("transformers")
    config = transformers.BloomConfig(hidden_size=64, n_head=4, n_layer=2, vocab_size=64,
                                      attn_implementation="eager")
    torch.manual_seed(0)
    return transformers.BloomModel(config).eval()


class BloomHidden(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, embeds, mask):
        return self.model(inputs_embeds=embeds, attention_mask=mask, use_cache=False).last_hidden_state


@pytest.mark.parametrize("padded", [False, True])
def test_bloom_attention_is_rewritten_exactly(padded):
    model = _bloom()
    mask = torch.ones(2, 9, dtype=torch.long)
    if padded:
        mask[1, :3] = 0
    embeds = model.word_embeddings(torch.randint(0, 64, (2, 9))).detach()
    assert_parity(BloomHidden(model), [embeds, mask], rewrites=2, chunk_size=(4, 4), atol=1e-4, grad_atol=1e-3)


def test_views_of_dynamic_sizes_that_regroup_more_than_batch_and_heads_say_so():
    """Found by the fuzzer (seed 404): the refusal's message sorted sympy sizes, which raised TypeError."""
    import sympy

    from passes.fx.batch_views import BatchViewError, batch_split
    b, n = sympy.symbols("b n", positive=True, integer=True)
    with pytest.raises(BatchViewError, match="reshape more than the batch and head axes"):
        batch_split([(4 * b, n, n), (b, 2, n, n), (b * n, 3, n, n)])
