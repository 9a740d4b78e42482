"""Replace each proven ONNX attention block with one canonical ``ai.rewriter::Attention`` node.

The node (`passes.onnx.attention_node`) is the one `export_onnx` gets from the torch op, so files
and exports share one lowering (`passes.onnx.lower_attention`)::

    Q, K/V sources ─ arrange (B, H, L, D) ─┐
    bias terms ─ Σ factor · term ──────────┼─ ai.rewriter::Attention ─ restore layout/dtype ─ users
    mask ─ (Not) → keep ───────────────────┘

Q, K and V are read from the values they are views of (`operand_layout.arrange`): at most one
Transpose each, which the lowering reads through where its kernel takes that layout directly.
Grouped K/V heads are passed unexpanded. The new nodes go in right before the node that produced
the replaced value; the result takes over that value's name, type, shape and uses (graph outputs
included), and the matched nodes, with whatever only they kept alive (mask construction, scale
arithmetic, a causal buffer), are removed. When the block's only user is a ``Transpose`` (models
move heads behind the sequence before merging them), that transpose's result is replaced instead.
"""

from __future__ import annotations

import dataclasses
import logging

import onnx_ir as ir
import onnx_ir.passes

from passes.core.attention_spec import ChunkSizes
from passes.onnx.attention_node import ATTENTION_OP, REWRITER_DOMAIN, AttentionAttributes
from passes.onnx.dead_nodes import remove_dead_block
from passes.onnx.graph_values import attribute, is_op
from passes.onnx.lower_attention import BlockFacts
from passes.onnx.onnx_match import AnalysisContext, OnnxAttentionMatch
from passes.onnx.operand_layout import arrange, arranged_dims, restore_layout
from rewriter.kernels.onnx_emitter import Emitter
from passes.onnx.shape_facts import ShapeFacts

__all__ = ["CanonicalizeAttention", "PlannedRewrite", "UndoAnnotations", "block_facts_of_match"]

logger = logging.getLogger(__name__)


def _broadcast(dims_list: list[list]) -> list:
    out = []
    for column in zip(*dims_list):
        wide = [d for d in column if d != 1]
        out.append(1 if not wide else (wide[0] if all(d == wide[0] for d in wide) else None))
    return out


def _combined_bias(w: Emitter, ctx: AnalysisContext, match: OnnxAttentionMatch, dtype) -> ir.Value | None:
    """The sum of the match's bias terms (each times its factor), 4-D, in `dtype` when they differ;
    several half-precision terms are summed in fp32 (as the kernels add each to fp32 scores)."""
    terms, dims = [], []
    dtypes = {ctx.facts.dtype(operand.value) for operand, _ in match.biases}
    if len(match.biases) > 1 and dtypes & {ir.DataType.FLOAT16, ir.DataType.BFLOAT16}:
        dtypes, dtype = dtypes | {ir.DataType.FLOAT}, ir.DataType.FLOAT
    for operand, factor in match.biases:
        term = arrange(w, ctx, operand)
        term_dtype = ctx.facts.dtype(operand.value)
        if len(dtypes) > 1 and term_dtype != dtype:
            term, term_dtype = w.op("Cast", term, to=dtype), dtype
        if factor != 1.0:
            term = w.op("Mul", term, w.const(factor, term_dtype.numpy()))
        terms.append(term)
        dims.append(arranged_dims(ctx, operand))
    if not terms:
        return None
    total = terms[0]
    for term in terms[1:]:
        total = w.op("Add", total, term)
    return w.annotate(total, dtype if len(dtypes) > 1 else dtypes.pop(), _broadcast(dims))


def _keep_mask(w: Emitter, ctx: AnalysisContext, match: OnnxAttentionMatch) -> ir.Value | None:
    """The boolean mask as 4-D 'true = keep'."""
    if match.mask is None:
        return None
    mask = arrange(w, ctx, match.mask, ir.DataType.BOOL)
    if not match.mask_keep_when_true:
        mask = w.annotate(w.op("Not", mask), ir.DataType.BOOL, arranged_dims(ctx, match.mask))
    return mask


def _attributes(match: OnnxAttentionMatch, chunks: ChunkSizes | None) -> AttentionAttributes:
    sizes = {"q_chunk": chunks.query, "k_chunk": chunks.key} if chunks else {}
    programs = {role: program.to_json() for role, program in (("bias_program", match.bias_program),
                                                              ("mask_program", match.mask_program),
                                                              ("fill_program", match.fill_program)) if program}
    return AttentionAttributes(scale=float(match.scale), softcap=float(match.softcap), mask_fill=float(match.mask_fill),
                               causal=match.causal, causal_offset=match.causal_offset,
                               zero_masked_rows=match.zero_masked_rows, **sizes, **programs)


def block_facts_of_match(ctx: AnalysisContext, match: OnnxAttentionMatch) -> BlockFacts:
    """What the lowering's target rules read, known before the block is canonicalised."""
    key, value = match.key_source or match.key, match.value_source or match.value
    static = [dim if isinstance(dim, int) else None for dim in (
        arranged_dims(ctx, match.query)[1], arranged_dims(ctx, key)[1], arranged_dims(ctx, value)[3])]
    lengths = arranged_dims(ctx, match.query)[2], arranged_dims(ctx, key)[2]
    return BlockFacts(ctx.facts.dtype(match.query.value), *static,
                      equal_lengths=match.equal_lengths or ShapeFacts.same(*lengths),
                      has_bias=bool(match.biases), has_mask=match.mask is not None,
                      attributes=_attributes(match, None))


def _follow_replacements(match: OnnxAttentionMatch, replaced: dict[ir.Value, ir.Value]) -> None:
    """Point the match's operands past values that earlier rewrites replaced (stacked blocks)."""
    def current(operand):
        if operand is None or operand.value not in replaced:
            return operand
        return dataclasses.replace(operand, value=replaced[operand.value])

    for field in ("query", "key", "value", "key_source", "value_source", "mask"):
        setattr(match, field, current(getattr(match, field)))
    match.biases = [(current(operand), factor) for operand, factor in match.biases]
    match.leaves = [replaced.get(leaf, leaf) for leaf in match.leaves]


def _absorb_output_transpose(match: OnnxAttentionMatch) -> None:
    """Replace the result of the block's only user when that user is a Transpose."""
    users = list(dict.fromkeys(match.output.consumers()))
    if match.out_merged or match.out_merged_batch or match.output.is_graph_output() or len(users) != 1 or not is_op(users[0], "Transpose"):
        return
    if users[0].graph is not match.output.producer().graph:
        return  # a user inside a subgraph: the block would move into it
    perm = attribute(users[0], "perm", list(range(len(match.out_labels)))[::-1])
    if sorted(perm) != list(range(len(match.out_labels))):
        return
    match.out_labels = "".join(match.out_labels[axis] for axis in perm)
    match.output = users[0].outputs[0]
    match.nodes.append(users[0])


def _canonical_node(w: Emitter, ctx: AnalysisContext, match: OnnxAttentionMatch,
                    chunks: ChunkSizes | None) -> ir.Value:
    dtype = ctx.facts.dtype(match.query.value)
    q = arrange(w, ctx, match.query, dtype)
    k = arrange(w, ctx, match.key_source or match.key)
    v = arrange(w, ctx, match.value_source or match.value)
    bias, mask = _combined_bias(w, ctx, match, dtype), _keep_mask(w, ctx, match)
    dims = arranged_dims(ctx, match.query)[:3] + [arranged_dims(ctx, match.value_source or match.value)[3]]
    out = w.op(ATTENTION_OP, q, k, v, bias, mask, *match.leaves, domain=REWRITER_DOMAIN, dtype=dtype, shape=dims,
               **_attributes(match, chunks).as_onnx())
    return restore_layout(w, out, match, dtype, ctx.facts.dtype(match.output))


@dataclasses.dataclass
class PlannedRewrite:
    """One accepted softmax block, the target it is to be lowered to, and what became of it."""

    match: OnnxAttentionMatch
    target: str  # a target of `passes.onnx.lower_attention`
    chunks: ChunkSizes | None = None
    done: bool = False
    failure: str | None = None


class CanonicalizeAttention(onnx_ir.passes.InPlacePass):
    """Replaces each planned match with its canonical node, and records in `targets` the target each
    new node is to be lowered to; a plan whose node could not be built keeps its block and says why."""

    def __init__(self, ctx: AnalysisContext, plans: list[PlannedRewrite]):
        super().__init__()
        self.ctx, self.plans = ctx, plans
        self.targets: dict[ir.Node, str] = {}
        self.writers: list[Emitter] = []  # their annotations of the model's values, undone after lowering

    def call(self, model: ir.Model) -> onnx_ir.passes.PassResult:
        replaced: dict[ir.Value, ir.Value] = {}
        for plan in self.plans:
            match, chunks = plan.match, plan.chunks
            _follow_replacements(match, replaced)
            _absorb_output_transpose(match)
            anchor = match.output.producer()
            w = Emitter(ir.tape.Tape(), f"{match.output.name}/attention", opset=self.ctx.opsets.get("", 1))
            self.writers.append(w)
            try:
                new = _canonical_node(w, self.ctx, match, chunks)
            except Exception as error:  # noqa: BLE001 - nothing was inserted yet; leave this block alone
                logger.exception("canonicalising the block at %s failed", match.output.name)
                plan.failure = f"building the attention node failed: {error!r}"
                continue
            anchor.graph.insert_before(anchor, w.tape.nodes)
            old = match.output
            ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
            name, old.name = old.name, f"{old.name}/replaced"
            new.name, new.type, new.shape = name, old.type, old.shape
            replaced[old] = new
            remove_dead_block(match.nodes)
            self.targets[next(node for node in w.tape.nodes if node.domain == REWRITER_DOMAIN)] = plan.target
            plan.done = True
        return onnx_ir.passes.PassResult(model, bool(self.targets))


class UndoAnnotations(onnx_ir.passes.InPlacePass):
    """After lowering: the model's own values get back the dtype and shape they had before the
    canonicalising passes annotated them for the lowering to read."""

    def __init__(self, *canonical_passes):
        super().__init__()
        self.canonical_passes = canonical_passes

    def call(self, model: ir.Model) -> onnx_ir.passes.PassResult:
        for writer in (w for canonical in self.canonical_passes for w in canonical.writers):
            writer.undo_annotations()
        return onnx_ir.passes.PassResult(model, False)
