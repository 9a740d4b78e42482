"""What a block's mask and bias became, in the report's words: score programs or dense tensors.

A mask or bias that the front end recovered as a score program is generated per block from its O(n)
leaves (no n×n tensor exists); one that stays a tensor operand is passed as the model builds it.
`operand_fields` gives the `AttentionSpec` fields that say which, for both IRs:

- ``mask_source`` / ``bias_source``: ``"program"``, ``"tensor"`` or None (no such operand);
- ``dense_operands``: the names of the tensor operands, ``program_leaves`` those the programs read;
- ``causal_in_program``: a program keeps only keys ``key ≤ query + o`` (a causal part), but the block's
  causal flag does not carry it, e.g. a causal ∧ padding bias ``where(keep, 0, fill)`` with a finite
  fill (-10000), or one that stays a bias for its NaN pattern: the program computes the causal part
  per block (where the kernels prove keys hidden from the program itself, they still pass them by).
"""

from __future__ import annotations

import logging

from rewriter.kernels.program_proofs import filled_keep, key_bounds
from rewriter.kernels.score_program import Program

__all__ = ["operand_fields", "describe_operands"]

logger = logging.getLogger(__name__)


def _has_causal_bound(mask_program: Program | None, bias_program: Program | None) -> bool:
    keeps = [mask_program, filled_keep(bias_program) if bias_program is not None else None]
    return any(keep is not None and key_bounds(keep)[0] is not None for keep in keeps)


def operand_fields(*, mask_program: Program | None, bias_program: Program | None, dense_mask: str | None,
                   dense_biases: list[str], leaves: list[str], causal: bool) -> dict:
    """`AttentionSpec` fields for a block whose mask/bias are the given programs and dense operands
    (names); `causal` is the block's causal flag."""
    def source(program, dense) -> str | None:
        return "program" if program is not None else "tensor" if dense else None

    return {
        "mask_source": source(mask_program, dense_mask is not None),
        "bias_source": source(bias_program, bool(dense_biases)),
        "dense_operands": tuple(([dense_mask] if dense_mask is not None else []) + list(dense_biases)),
        "program_leaves": tuple(leaves) if mask_program is not None or bias_program is not None else (),
        "causal_in_program": not causal and _has_causal_bound(mask_program, bias_program),
    }


def describe_operands(spec) -> list[str]:
    """Report phrases for `spec`'s mask and bias: ``mask: score program over attention_mask (generated
    per block, no n×n tensor)``, ``bias: tensor operand node_add_3``."""
    dense = list(spec.dense_operands)
    phrases = []
    for name, source in (("mask", spec.mask_source), ("bias", spec.bias_source)):
        if source == "program":
            over = f" over {', '.join(spec.program_leaves)}" if spec.program_leaves else ""
            phrases.append(f"{name}: score program{over} (generated per block, no n×n tensor)")
        elif source == "tensor":
            names, dense = (dense[:1], dense[1:]) if name == "mask" else (dense, [])
            phrases.append(f"{name}: tensor operand {', '.join(names)} (as the model builds it)")
    if spec.causal_in_program:
        phrases.append("causal part held by the program and evaluated per block (the causal flag is off)")
    return phrases
