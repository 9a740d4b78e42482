"""A block's mask and bias operands as score programs, and the proofs made on those programs.

`recover_programs` translates every bias and mask operand of an accepted block
(`score_program_recovery`); when all of them translate and one would be n×n, the block's score
terms are sorted on the programs (`ProgramTerms.bias_offset` / `mask_offset`, for
`mask_semantics.sort_score_terms`, with `score_programs.causal_split` / `fill_mask`: symbolic, no
tensor is evaluated) and `ProgramTerms.apply` moves what is left into the match as programs::

    bias terms Σ factor · bias_i       → bias_program
    mask (kept where true, fill −∞)    → causal flag (key ≤ query + o, when a conjunct says so) + mask_program
    biases after a finite-fill mask    → fill_program (each masked entry's value, `core.fill_programs`)

Otherwise the operands stay dense tensors, as before (still exact).
"""

from __future__ import annotations

import dataclasses
import logging
import math

from passes.core.attention_labels import ScoreAxes
from passes.core.mask_semantics import fill_is_neg_inf
from passes.core.fill_programs import fill_program_step, term_step
from passes.core.program_terms import sum_steps
from passes.core.score_algebra import ConstantBias, MaskStep
from passes.core.score_programs import ProgramBuilder, ProgramError, causal_split, fill_mask
from passes.core.attention_labels import MERGED
from passes.onnx.axis_labels import Operand
from passes.onnx.batch_views import packed_labels
from passes.onnx.onnx_match import AnalysisContext, OnnxAttentionMatch, Rejected
from passes.onnx.score_program_recovery import ProgramTranslator
from passes.onnx.shape_facts import ShapeFacts
from rewriter.kernels.score_program import Program

__all__ = ["ProgramTerms", "recover_programs"]

logger = logging.getLogger(__name__)


def _axis_names(scores: ScoreAxes) -> dict[str, str | None]:
    """Score label → program axis; None for a batch label that may pack batch and heads."""
    batch = dict(zip(scores.batch, ("batch", "head"))) if len(scores.batch) == 2 else {
        label: None for label in scores.batch}
    return {**batch, scores.query: "query", scores.key: "key"}


@dataclasses.dataclass
class ProgramTerms:
    """The programs of one block's operands: one builder, one output step per operand."""

    builder: ProgramBuilder
    outputs: dict[Operand, int]
    scores: ScoreAxes
    facts: ShapeFacts | None = None  # the leaves' shapes

    def _program(self, operand: Operand, keep_when_true: bool = True) -> Program:
        step = self.outputs[operand]
        if not keep_when_true:
            step = self.builder.add("logical_not", (step,), dtype="bool")
        return self.builder.program(step)

    def bias_offset(self, operand: Operand, factor: float, only_masking: bool) -> int | None:
        """o when the bias is exactly ``where(key ≤ query + o, 0, f)`` with a fill the causal flag may take."""
        found = fill_mask(self._program(operand)) if factor > 0 else None
        if found is None:
            return None
        offset, rest = causal_split(found[0])
        return offset if rest is None and offset is not None and fill_is_neg_inf(
            found[1] * factor, offset, only_masking) else None

    def mask_offset(self, operand: Operand, step: MaskStep, only_masking: bool) -> int | None:
        """o when the mask keeps exactly ``key ≤ query + o``."""
        offset, rest = causal_split(self._program(operand, step.keep_when_true))
        return offset if rest is None and offset is not None and fill_is_neg_inf(
            step.fill, offset, only_masking) else None

    def _as_operand(self, program: Program | None, dtypes: tuple[str, ...]) -> Operand | None:
        """The leaf `program` reads as it is, aligned with the scores and of their sizes (a tensor
        every target takes directly, costing nothing more), or None (a larger buffer read at the
        positions, such as GPT-2's (1, 1, 1024, 1024) causal ``bias``, stays a program)."""
        load = program.steps[-1] if program is not None else None
        canonical = self.scores.canonical
        if load is None or load.op != "load" or load.dtype not in dtypes or len(load.args) > len(canonical):
            return None
        axes = canonical[len(canonical) - len(load.args):]
        names = _axis_names(self.scores)
        dims = self.facts.dims(self.builder.leaves[load.attr]) if self.facts is not None else None
        if dims is None or len(dims) != len(load.args):
            return None
        for label, arg, dim in zip(axes, load.args, dims):
            read = program.steps[arg] if arg >= 0 else None
            if read is not None and (read.op != "index" or read.attr != names.get(label)):
                return None
            if read is not None and not ShapeFacts.same(dim, self.scores.dims[self.scores.labels.index(label)]):
                return None
        return Operand(self.builder.leaves[load.attr], axes, canonical)

    def apply(self, match: OnnxAttentionMatch) -> None:
        """Move the match's remaining bias terms and mask into programs over pruned, renumbered
        leaves; a program that only reads a leaf as it is gives that leaf back as the operand."""
        builder, bias, mask = self.builder, None, None
        if match.biases:
            bias = sum_steps(builder, [(self.outputs[operand], factor) for operand, factor in match.biases])
        if match.mask is not None:
            mask = self._program(match.mask, match.mask_keep_when_true)
            if match.mask_fill == -math.inf:
                offset, rest = causal_split(mask)
                if offset is not None and (not match.causal or match.causal_offset == offset):
                    # where(causal ∧ rest, s, −∞) is the causal flag applied after where(rest, s, −∞)
                    match.causal, match.causal_offset, mask = True, offset, rest
        bias = builder.program(bias) if bias is not None else None
        dense_bias = self._as_operand(bias, ("float32", "float16", "bfloat16", "float64"))
        dense_mask = self._as_operand(mask, ("bool",))
        fill = None
        if match.fill_step is not None:  # the masked entries' values: `passes.core.fill_programs`
            fill = builder.program(fill_program_step(builder, match.fill_step, self.outputs.__getitem__))
        programs = [None if dense_bias else bias, None if dense_mask else mask, fill]
        used = sorted({step.attr for program in programs if program for step in program.steps if step.op == "load"})
        renumber = {old: new for new, old in enumerate(used)}
        match.bias_program, match.mask_program, match.fill_program = (
            None if program is None else Program(tuple(
                dataclasses.replace(step, attr=renumber[step.attr]) if step.op == "load" else step
                for step in program.steps)) for program in programs)
        match.leaves = [builder.leaves[old] for old in used]
        match.biases = [(dense_bias, 1.0)] if dense_bias is not None else []
        match.mask, match.mask_keep_when_true = dense_mask, True


def _spans_both(ctx: AnalysisContext, operand: Operand, scores: ScoreAxes) -> bool:
    dims = ctx.operand_dims(operand) or ()
    wide = {label for label, dim in zip(operand.labels, dims) if dim != 1}
    return {scores.query, scores.key} <= wide


def _merged_position(builder: ProgramBuilder, operand: Operand) -> int:
    """``batch · H + head``: the position of a packed (batch·heads) axis (BLOOM's ALiBi on (B·H, 1, Lk))."""
    heads = operand.merged[1]
    if not isinstance(heads, int):
        raise ProgramError(f"'{operand.value.name}' packs batch with a dynamic number of heads")
    batch = builder.add("mul", (builder.index("batch"), builder.const(heads, "int64")), None, "int64")
    return builder.add("add", (batch, builder.index("head")), None, "int64")


def recover_programs(ctx: AnalysisContext, match: OnnxAttentionMatch, scores: ScoreAxes,
                     biases: list[tuple[Operand, float]], masks: list[MaskStep],
                     required: bool = False) -> ProgramTerms | None:
    """The programs of every bias and mask operand (aligned with `scores`), and of the operands of
    the masks' fill terms, or None when one does not translate, none of them would be n×n or a leaf
    is read along both sequence axes (nothing to gain: the tensor exists anyway). Several biases are
    translated whatever they read: the kernels add a program's addends in turn, as the model does,
    where their dense sum would round ``s + (B₁ + B₂)`` differently (one that does not translate
    leaves them a dense sum).

    With `required` (a constant bias or a per-entry fill, which exist only as programs), raises
    Rejected instead of returning None where an operand does not translate, and always translates.
    """
    operands = [operand for operand, _ in biases] + [step.condition for step in masks] + [
        term[1] for step in masks for term in step.fill_terms if term[0] == "bias"]
    tensors = [operand for operand in operands if not isinstance(operand, ConstantBias)]
    several = len(biases) > 1  # added to the scores in turn only as a program's addends: always translated
    if not (required or several) and not any(_spans_both(ctx, operand, scores) for operand in tensors):
        return None
    builder = ProgramBuilder()
    translator = ProgramTranslator(ctx.facts, builder, match.graph)
    names, outputs = _axis_names(scores), {}

    def translate(operand: Operand) -> int:
        if operand.split_heads:
            raise ProgramError(f"'{operand.value.name}' packs heads with another axis")
        dims, labels = ctx.facts.dims(operand.value), packed_labels(operand)
        if dims is None or len(dims) != len(labels):
            raise ProgramError(f"the shape of '{operand.value.name}' is unknown")
        positions = []
        for label, dim in zip(labels, dims):
            if dim == 1:
                positions.append(-1)
            elif label == MERGED:
                positions.append(_merged_position(builder, operand))
            elif names.get(label) is None:
                raise ProgramError(f"'{operand.value.name}' varies along an axis packing batch and heads")
            else:
                positions.append(builder.index(names[label]))
        return translator.translate(operand.value, positions)

    try:
        for operand in operands:
            if operand not in outputs:
                outputs[operand] = term_step(builder, operand, translate)
        for step in builder.steps:
            if step.op == "load" and translator.spans_both(list(step.args)) and not (required or several):
                raise ProgramError(f"'{builder.leaves[step.attr].name}' is read along both sequence axes")
    except ProgramError as error:
        if required:
            raise Rejected(f"a constant added before a finite-fill mask, or a bias added after one, is not a "
                           f"score program ({error}): the kernels cannot compute it per block") from error
        logger.debug("score operands of %s stay tensors: %s", match.spec.nodes[-1:] or "a block", error)
        return None
    return ProgramTerms(builder, outputs, scores, ctx.facts)
