"""Replace each accepted Performer match with one `rewriter::linear_attention` call.

The whole block goes, feature maps included: φ is recomputed inside the op from q, k and the
projection, so gradients still reach the projection and nothing of size L × M is kept::

    q ─┐
    k ─┼─ rewriter::linear_attention(q, k, v, Ω, feature_map, causal, c, ε, 0, stabilizer_grad, slice, ε_Σk)[0] ─ users
    v ─┘

A one-input `cat` right after the block (a copy) is dropped as well. Blocks written in another
layout (fast-transformers' (N, L, H, D)) get q, k, v permuted to (B, H, L, D) before the op and its
output permuted back and made contiguous (as the block's own output was); their ε after φ(q)·Σφ(k)
is the op's `normalizer_epsilon`.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable

import onnx_ir.passes
import torch
from torch.fx import GraphModule

import rewriter.kernels.linear_attention_op  # noqa: F401  (registers torch.ops.rewriter.linear_attention)
from passes.core.attention_spec import AttentionSpec
from passes.fx import aten_vocabulary as ops
from passes.fx.detect_linear_attention import FxLinearAttentionMatch
from passes.core.planner import default_slice_size

__all__ = ["RewriteLinearAttention"]

logger = logging.getLogger(__name__)
aten = torch.ops.aten

def _drop_copying_cats(graph, out) -> None:
    """A one-input `cat` of the op's output (performer-pytorch's `SelfAttention` so joins its global
    heads to absent local heads) is a copy of it: its users read the output itself, which nothing
    else reads, so the forward holds one (B, H, L, Dv) tensor fewer."""
    for user in list(out.users):
        if ops.is_call(user, {torch.ops.aten.cat.default}) and len(user.args[0]) == 1 and len(out.users) == 1:
            user.replace_all_uses_with(out)
            graph.erase_node(user)


def _to_heads_first(graph, match: FxLinearAttentionMatch):
    """q, k, v as the op takes them: permuted to (B, H, L, D) where the block is written otherwise."""
    sources = (match.query.source, match.key.source, match.value)
    if match.permutations is None:
        return sources
    return tuple(graph.call_function(aten.permute.default, (x, list(perm)))
                 for x, perm in zip(sources, match.permutations[:3]))


class RewriteLinearAttention(onnx_ir.passes.InPlacePass):
    """Rewrites the accepted matches of `detect_linear_attention` in place; `plan(spec)` gives the slice."""

    def __init__(self, matches: list[FxLinearAttentionMatch], plan: Callable[[AttentionSpec], int] = default_slice_size):
        super().__init__()
        self.matches = [match for match in matches if match.spec.accepted]
        self.plan = plan

    def call(self, model: GraphModule) -> onnx_ir.passes.PassResult:
        graph = model.graph
        for match in self.matches:
            fmap = match.query
            with graph.inserting_before(match.output):
                q, k, v = _to_heads_first(graph, match)
                call = graph.call_function(
                    torch.ops.rewriter.linear_attention.default,
                    (q, k, v, fmap.projection, fmap.kind, match.causal, fmap.data_scale, fmap.epsilon,
                     match.normalizer_epsilon, fmap.stabilizer_grad, self.plan(match.spec), match.key_sum_epsilon),
                )
                out = graph.call_function(operator.getitem, (call, 0))
                if match.permutations is not None:
                    out = graph.call_function(aten.permute.default, (out, list(match.permutations[3])))
                    out = graph.call_function(aten.clone.default, (out,), {"memory_format": torch.contiguous_format})
            match.output.replace_all_uses_with(out)
            _drop_copying_cats(graph, out)
            # Erase explicitly, users first: dead-code elimination keeps ops it deems impure.
            order = {node: index for index, node in enumerate(graph.nodes)}
            for node in sorted(set(match.replaced), key=lambda n: -order[n]):
                for observer in [user for user in node.users if ops.is_call(user, ops.OBSERVERS)]:
                    graph.erase_node(observer)
                if not node.users:
                    graph.erase_node(node)
            logger.info("rewrote linear attention at %s", match.output.name)
        if self.matches:
            graph.eliminate_dead_code()
            graph.lint()
            model.recompile()
        return onnx_ir.passes.PassResult(model, bool(self.matches))

