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

What each compiled graph got is logged once at INFO (logger ``rewriter.compile_backend``: enable it
with ``logging.basicConfig(level=logging.INFO)`` or ``logging.getLogger("rewriter").setLevel(logging.INFO)``
plus a handler), and kept: ``rewriter.compile_reports()`` returns the reports of the last compiled
graphs, oldest first. A block found but left alone is logged at WARNING (seen without any logging
set-up) once per process for each module and reason.
"""

from __future__ import annotations

import collections
import logging

import torch
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

from rewriter.report import Report
from rewriter.torch_api import rewrite_graph_module

__all__ = ["backend", "compile_reports"]

logger = logging.getLogger(__name__)

_COMPILERS = ("inductor", "aot_eager", "eager")
_KEPT_REPORTS = 64
_reports: collections.deque[Report] = collections.deque(maxlen=_KEPT_REPORTS)
_warned: set[tuple[str, str]] = set()


def compile_reports(clear: bool = False) -> list[Report]:
    """The reports of the graphs `backend` compiled most recently (up to 64), oldest first.

    Each is a `rewriter.Report` (`.summary()`, `.to_dict()`); a graph Dynamo recompiles (a new
    shape, a graph break) adds one. `clear=True` empties the record after reading it.
    """
    reports = list(_reports)
    if clear:
        _reports.clear()
    return reports


def _tell(report: Report) -> None:
    """One INFO summary per graph; a WARNING, once per module and reason, for each block left alone."""
    _reports.append(report)
    logger.info("torch.compile graph: %s", report.summary())
    for match in report.matches:
        key = (match.module if match.module is not None else match.where, match.reason or "")
        if match.rewritten or key in _warned:
            continue
        _warned.add(key)
        logger.warning("torch.compile: attention block %s (%s) left alone: %s", match.where, match.kind,
                       match.reason or "not rewritten")


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
    # Run through an Interpreter with node meta preserved, as AOTAutograd does, so that each ATen
    # node keeps its Dynamo node's nn_module_stack (reports name blocks by module path).
    with fake_mode, torch.fx.traceback.preserve_node_meta():
        return make_fx(torch.fx.Interpreter(gm).run, pre_dispatch=True)(*inputs)


def backend(gm: torch.fx.GraphModule, example_inputs, *, options: dict | None = None, mode: str | None = None):
    """A torch.compile backend (also registered under the name "rewriter")."""
    options = dict(options or {})
    compiler = options.pop("compiler", "inductor")
    if compiler not in _COMPILERS:
        raise ValueError(f"compiler must be one of {', '.join(_COMPILERS)}, got {compiler!r}")
    memory_budget, chunk_size = options.pop("memory_budget", None), options.pop("chunk_size", None)
    aten_gm = _aten_graph(gm, example_inputs)
    _tell(rewrite_graph_module(aten_gm, memory_budget, chunk_size, source="torch.compile graph"))
    if compiler == "eager":
        return aten_gm
    if compiler == "aot_eager":
        return torch._dynamo.backends.debugging.aot_eager(aten_gm, example_inputs)
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    config_patches = {**list_mode_options(mode), **options} if mode else options
    return compile_fx(aten_gm, example_inputs, config_patches=config_patches or None)
