"""`torch.compile(model, backend="rewriter")`: rewrite attention in each captured graph, then compile.

Dynamo hands over a torch-level graph; it is traced to ATen (pre-dispatch, the level
`torch.export` produces), its attention replaced by `rewriter::attention`, and the result given
to a real compiler:

    torch.compile(model, backend="rewriter", options={"compiler": "inductor",   # or eager, aot_eager
                                                      "memory_budget": "64MiB", "chunk_size": (512, 2048)})

Other options go to Inductor as config patches. The op carries its own backward, so training works.
Graphs whose sizes Dynamo made dynamic are compiled without rewriting (not supported yet).
"""

from __future__ import annotations

import logging

import torch
from torch.fx.experimental.proxy_tensor import make_fx

from rewriter.torch_api import rewrite_graph_module

__all__ = ["backend"]

logger = logging.getLogger(__name__)

_COMPILERS = ("inductor", "aot_eager", "eager")


def _aten_graph(gm: torch.fx.GraphModule, example_inputs) -> torch.fx.GraphModule:
    """`gm` traced to pre-dispatch ATen on fresh fake tensors.

    Traced outside Dynamo's tracing context, so that guards this tracing makes do not land in
    Dynamo's shape environment.
    """
    with torch._guards.tracing(None):
        return make_fx(gm, pre_dispatch=True, tracing_mode="fake")(*example_inputs)


def backend(gm: torch.fx.GraphModule, example_inputs, *, options: dict | None = None, mode: str | None = None):
    """A torch.compile backend (also registered under the name "rewriter")."""
    options = dict(options or {})
    compiler = options.pop("compiler", "inductor")
    if compiler not in _COMPILERS:
        raise ValueError(f"compiler must be one of {', '.join(_COMPILERS)}, got {compiler!r}")
    memory_budget, chunk_size = options.pop("memory_budget", None), options.pop("chunk_size", None)
    if any(isinstance(x, torch.SymInt) for x in example_inputs):
        # Graphs with dynamic sizes are compiled as they are: not rewritten yet.
        logger.warning("rewriter backend: a graph with dynamic shapes is compiled without rewriting")
        aten_gm = gm
    else:
        aten_gm = _aten_graph(gm, example_inputs)
        report = rewrite_graph_module(aten_gm, memory_budget, chunk_size, source="torch.compile graph")
        logger.info("torch.compile graph: %s", report.summary())
    if compiler == "eager":
        return aten_gm
    if compiler == "aot_eager":
        return torch._dynamo.backends.debugging.aot_eager(aten_gm, example_inputs)
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    config_patches = {**list_mode_options(mode), **options} if mode else options
    return compile_fx(aten_gm, example_inputs, config_patches=config_patches or None)
