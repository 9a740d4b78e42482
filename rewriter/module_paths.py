"""Name each reported attention block by the module it comes from (``transformer.h.1.attn``).

Detection names a block by its graph nodes (``matmul_2``, ``node_matmul_2``), which a user cannot
map back to layers. Both IRs record where each node came from:

- FX (torch.export, and Dynamo graphs): ``node.meta["nn_module_stack"]``, an ordered mapping whose
  values are ``(path, module type)`` from the root down; the last entry is the innermost module.
- ONNX from torch's dynamo exporter: the node's ``metadata_props`` entry
  ``pkg.torch.onnx.name_scopes``, a Python list literal ``['', 'h.0', 'h.0.attn', 'matmul']`` from
  the root to the op itself (the last entry names the op, not a module).

A block's module is the innermost module of most of its nodes (a mask built by the parent module
and added inside the block does not move the block up a level).
Models from other exporters carry no scopes: their blocks keep only the node name.
"""

from __future__ import annotations

import ast
import logging
import re

import onnx

from rewriter.report import Report

__all__ = ["annotate_modules", "fx_node_scopes", "onnx_node_scopes"]

logger = logging.getLogger(__name__)

_NAME_SCOPES = "pkg.torch.onnx.name_scopes"
_DYNAMO_ROOT = re.compile(r"^L\['self'\]\.?|^L__self__\.?")
_DYNAMO_NAME = re.compile(r"^[LG]\['([^'\]]+)'\]")  # a local or global the compiled function reads: L['s'], G['model']
_INDEX = re.compile(r"\['?([^'\]]+)'?\]")  # [0] of a ModuleList, ['key'] of a ModuleDict


def _plain_path(path: str) -> str:
    """Dynamo spells paths as Python, from the compiled module (``L['self'].h[0].attn``) or from the
    local or global the compiled function reads (``L['s'].a``, ``G['model'].d['x']``); torch.export
    as ``h.0.attn``. All become the user's path: ``h.0.attn``, ``s.a``, ``model.d.x``."""
    return _INDEX.sub(r".\1", _DYNAMO_NAME.sub(r"\1", _DYNAMO_ROOT.sub("", path))).strip(".")


def fx_node_scopes(graph_module) -> dict[str, str]:
    """{node name: innermost module path} for the nodes of an FX graph that record one."""
    scopes = {}
    for node in graph_module.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if stack:
            path = list(stack.values())[-1][0]
            scopes[node.name] = _plain_path(str(path))
    return scopes


def onnx_node_scopes(model: onnx.ModelProto) -> dict[str, str]:
    """{node name: innermost module path} for the main-graph nodes of `model` that record one."""
    scopes = {}
    for node in model.graph.node:
        recorded = next((prop.value for prop in node.metadata_props if prop.key == _NAME_SCOPES), None)
        if recorded is None:
            continue
        try:
            names = ast.literal_eval(recorded)
        except (ValueError, SyntaxError):
            logger.debug("node %s: unreadable %s %r", node.name, _NAME_SCOPES, recorded)
            continue
        if isinstance(names, list) and len(names) >= 2:
            scopes[node.name] = str(names[-2])
    return scopes


def _most_common(paths: list[str]) -> str:
    return max(dict.fromkeys(paths), key=paths.count)  # the first-seen wins a tie


def annotate_modules(report: Report, scopes: dict[str, str]) -> Report:
    """Set each match's `module` from the scopes of its nodes; returns `report`."""
    for match in report.matches:
        paths = [scopes[name] for name in match.spec.nodes if name in scopes]
        if paths:
            match.module = _most_common(paths)
    return report
