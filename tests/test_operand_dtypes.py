"""A mask whose dtype at call time differs from the example's: one line naming the input and both
dtypes (`rewriter.operand_dtypes`), instead of PyTorch's bare error from inside the graph or a bool
mask silently added as 0/1; calls in the example's dtype still match the original."""

from __future__ import annotations

import pytest
import torch

from rewriter import optimize_module
from rewriter.operand_dtypes import OperandDtypeError


class _PaddingMask(torch.nn.Module):
    """A (B, L) key-padding mask: recovered as a score program whose leaf is the mask."""

    def forward(self, q, k, v, mask):
        scores = (q @ k.transpose(-1, -2) / 4.0).masked_fill(~mask[:, None, None, :].bool(), float("-inf"))
        return torch.softmax(scores, -1) @ v


class _DenseMask(torch.nn.Module):
    """SDPA with an (L, L) mask input: a dense operand, bool (keep) or float (added)."""

    def forward(self, q, k, v, mask):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _qkv(length: int):
    generator = torch.Generator().manual_seed(length)
    return tuple(torch.randn(1, 2, length, 8, generator=generator) for _ in range(3))


def _keys_kept(length: int, dtype: torch.dtype, square: bool) -> torch.Tensor:
    keep = torch.arange(length) < length - 3
    keep = keep.expand(length, length)[None, None] if square else keep[None]
    return keep.to(dtype) if dtype != torch.float32 else torch.where(keep, 0.0, float("-inf"))


@pytest.mark.parametrize("module, square, optimised_as, called_as", [
    (_PaddingMask, False, torch.bool, torch.int64),
    (_PaddingMask, False, torch.int64, torch.bool),
    (_DenseMask, True, torch.bool, torch.float32),
    (_DenseMask, True, torch.float32, torch.bool),
])
def test_another_mask_dtype_is_refused_in_words(module, square, optimised_as, called_as):
    model = module()
    gm, report = optimize_module(model, (*_qkv(16), _keys_kept(16, optimised_as, square)))
    assert report.rewritten_count == 1, report.summary()
    q, k, v = _qkv(16)
    with torch.no_grad():  # the example's dtype: as the original
        same = _keys_kept(16, optimised_as, square)
        torch.testing.assert_close(gm(q, k, v, same), model(q, k, v, same), equal_nan=True)
    with pytest.raises(OperandDtypeError) as error:
        gm(q, k, v, _keys_kept(16, called_as, square))
    message = str(error.value)
    assert "'mask'" in message and str(optimised_as) in message and str(called_as) in message
    assert "\n" not in message

