"""`torch.compile(model, backend="rewriter")`: rewrite attention in each captured graph, then compile.

Dynamo hands over a torch-level graph; it is traced to ATen (pre-dispatch, the level
`torch.export` produces), its attention replaced by `rewriter::attention`, and the result given
to a real compiler:

    torch.compile(model, backend="rewriter", options={"compiler": "inductor",   # or eager, aot_eager
                                                      "memory_budget": "64MiB", "chunk_size": (512, 2048)})

Other options go to Inductor as config patches. The op carries its own backward, so training works.
Graphs whose sizes Dynamo made dynamic are traced with Dynamo's own symbolic sizes, so the rewritten
graph serves every length the guards admit. With `dynamic=True`, Dynamo also turns Python floats
(a `self.scaling` attribute, say) into graph inputs; a block whose scale is such an input is left
alone, with that reason in the log (`torch._dynamo.config.specialize_float = True` keeps them constant).
"""

from __future__ import annotations

import logging

import torch
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

from rewriter.torch_api import rewrite_graph_module

__all__ = ["backend"]

logger = logging.getLogger(__name__)

_COMPILERS = ("inductor", "aot_eager", "eager")


def _fake_inputs(example_inputs) -> tuple[FakeTensorMode, list]:
    """Dynamo's fake mode, and the example inputs as its fake tensors (symbolic sizes kept).

    Dynamo hands real tensors to the backend; the fake tensors it traced with are recovered from
    its tracing context, as AOTAutograd does, so sizes Dynamo made dynamic stay symbols of its
    shape environment (and guards this tracing adds go where Dynamo will check them).
    """
    fake_mode = detect_fake_mode(example_inputs) or FakeTensorMode()  # none: called outside torch.compile
    context = torch._guards.TracingContext.try_get()

    def fake(value):
        if not isinstance(value, torch.Tensor) or (isinstance(value, FakeTensor) and value.fake_mode is fake_mode):
            return value
        symbolic = context.tensor_to_context.get(value) if context is not None else None
        return fake_mode.from_tensor(value, symbolic_context=symbolic,
                                     source=symbolic.tensor_source if symbolic is not None else None)

    return fake_mode, [fake(value) for value in example_inputs]


def _aten_graph(gm: torch.fx.GraphModule, example_inputs) -> torch.fx.GraphModule:
    """`gm` traced to pre-dispatch ATen (the level `torch.export` produces) on Dynamo's fake inputs."""
    fake_mode, inputs = _fake_inputs(example_inputs)
    with fake_mode:
        return make_fx(gm, pre_dispatch=True)(*inputs)


def backend(gm: torch.fx.GraphModule, example_inputs, *, options: dict | None = None, mode: str | None = None):
    """A torch.compile backend (also registered under the name "rewriter")."""
    options = dict(options or {})
    compiler = options.pop("compiler", "inductor")
    if compiler not in _COMPILERS:
        raise ValueError(f"compiler must be one of {', '.join(_COMPILERS)}, got {compiler!r}")
    memory_budget, chunk_size = options.pop("memory_budget", None), options.pop("chunk_size", None)
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
