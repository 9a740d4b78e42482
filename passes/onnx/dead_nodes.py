"""Remove a replaced block and every producer that only it kept alive."""

from __future__ import annotations

import onnx_ir as ir

__all__ = ["remove_dead_block"]


def _is_dead(node: ir.Node) -> bool:
    return not any(output.uses() or output.is_graph_output() for output in node.outputs)


def remove_dead_block(nodes: list[ir.Node]) -> None:
    """Remove `nodes` and then every producer that only they kept alive (initializers included).

    This is what drops the n×n mask construction or causal buffer a rewritten block no longer reads.
    """
    work, initializers = list(nodes), []
    while work:
        node = work.pop()
        if node.graph is None or not _is_dead(node):
            continue
        inputs = [value for value in node.inputs if value is not None]
        node.graph.remove(node, safe=True)
        for value in inputs:
            if value.producer() is not None:
                work.append(value.producer())
            elif value.is_initializer():
                initializers.append(value)
    for value in initializers:
        graph = value.graph
        if graph is not None and not value.uses() and not value.is_graph_output() and not value.is_graph_input():
            graph.initializers.pop(value.name, None)
