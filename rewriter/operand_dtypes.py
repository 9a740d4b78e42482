"""A call whose mask or bias input has another dtype than the example's: one line that says so.

`optimize_module` captures the model at the example's dtypes, and the rewritten blocks take their
masks, biases and score-program leaves in those dtypes. Called with, say, an int64 padding mask where
the example's was bool (or a float mask where it was bool), the optimised module would otherwise
fail inside the graph with PyTorch's bare "Tensor dtype mismatch! Expected: Bool, Got: long int" or
"where expected condition to be a boolean tensor", and a bool mask where a float one was captured
would be added as 0/1 instead of hiding keys. The original module may accept such a call (a
``.bool()`` in its code, SDPA's bool-or-float `attn_mask`), but what it computes then is not what
was captured, so the call is refused before the graph runs, naming the input and both dtypes.
"""

from __future__ import annotations

import logging

import torch
import torch.utils._pytree as pytree
from torch.fx import GraphModule, Node

__all__ = ["OperandDtypeError", "check_operand_dtypes"]

logger = logging.getLogger(__name__)

_SCORE_ARGS = (3, 4, 5)  # rewriter::attention's bias, mask and program leaves


class OperandDtypeError(TypeError):
    """An input feeding an attention block's mask or bias has another dtype than when it was optimised."""


def _placeholders_reaching(roots: list[Node]) -> set[Node]:
    seen, stack, found = set(), list(roots), set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op == "placeholder":
            found.add(node)
        stack.extend(node.all_input_nodes)
    return found


def check_operand_dtypes(gm: GraphModule) -> GraphModule:
    """Make a call of `gm` whose mask/bias inputs differ in dtype from the capture's raise
    `OperandDtypeError` (returns `gm`).

    The inputs checked are the graph's tensor placeholders from which a rewritten block's bias, mask
    or program leaves are computed; they are matched to the call's tensors in flattening order
    (``pytree.tree_leaves((args, kwargs))``, the order the captured graph takes them in).
    """
    placeholders = [node for node in gm.graph.find_nodes(op="placeholder")
                    if isinstance(node.meta.get("val"), torch.Tensor)]
    roots = [arg for node in gm.graph.find_nodes(op="call_function", target=torch.ops.rewriter.attention.default)
             for index in _SCORE_ARGS for arg in pytree.tree_leaves(node.args[index]) if isinstance(arg, Node)]
    reaching = _placeholders_reaching(roots)
    expected = {position: (node.name, node.meta["val"].dtype) for position, node in enumerate(placeholders)
                if node in reaching}
    if not expected:
        return gm

    def check(module, args, kwargs):
        tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if len(tensors) != len(placeholders) or torch.compiler.is_compiling():
            return  # not the captured signature (or traced again): the graph's own checks apply
        for position, (name, dtype) in expected.items():
            given = tensors[position].dtype
            if given != dtype:
                raise OperandDtypeError(
                    f"input {name!r} feeds an attention mask or bias and was {dtype} in the example the module "
                    f"was optimised with, but is {given} now: pass a {dtype} {name}, or optimise with a {given} example")

    gm.register_forward_pre_hook(check, with_kwargs=True)
    return gm
