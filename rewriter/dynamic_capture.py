"""Capture a module with its batch and sequence axes dynamic, and explain a call the graph cannot take.

`optimize_module` promises a module that takes the lengths the original took, so by default
(`dynamic_shapes="auto"`) every axis of every tensor input is captured as `torch.export.Dim.AUTO`,
except the last axis of a floating-point input (its feature axis, which weights fix) and axes of
size 1 in the example (torch.export specialises sizes 0 and 1). AUTO lets torch.export keep an axis
dynamic where the model's code allows and fix it where the code depends on its size. Where dynamic
capture fails, or fixes every axis, the example's shapes are kept and one WARNING says why; a float input whose
last axis looks like a length (a float padding mask) gets one WARNING that its length stays static.

A call whose shapes the captured graph cannot take fails torch.export's guard with a bare
``AssertionError: Guard failed: idx.size()[1] <= 256``; `explain_guard_failures` turns it into an
`InputShapeError` that says which input, its shape, and what the graph requires.
"""

from __future__ import annotations

import inspect
import logging

import torch
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode
from torch.utils import _pytree as pytree

__all__ = ["AUTO", "CaptureError", "InputShapeError", "auto_dynamic_shapes", "cache_off_kwargs",
           "dynamic_input_axes", "explain_guard_failures", "export_program", "export_static", "pass_cache_off"]

logger = logging.getLogger(__name__)

AUTO = "auto"


class InputShapeError(ValueError):
    """The optimised module was called with shapes its captured graph cannot take."""


class CaptureError(ValueError):
    """torch.export cannot capture the module: its Python code branches on a tensor's value."""


def _export(module: torch.nn.Module, args: tuple, kwargs: dict | None, **options):
    """torch.export.export (non-strict); a branch on a tensor's value raises `CaptureError` in one line.

    Raises:
        CaptureError: torch.export could not guard on a data-dependent value (e.g. performer-pytorch's
            projection-redraw counter, a buffer its forward compares in training mode).
    """
    try:
        return torch.export.export(module, args, kwargs, strict=False, **options)
    except GuardOnDataDependentSymNode as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        hint = ("state kept in a buffer and checked in training mode is a common cause: try module.eval(), or "
                "fix that state first") if module.training else "write that branch with torch.where or torch.cond"
        raise CaptureError(f"torch.export cannot capture {type(module).__name__}: its forward branches on a "
                           f"tensor's value ({reason}); {hint}") from error


def _tensor_spec(value):
    if not isinstance(value, torch.Tensor):
        return None
    feature_axis = value.dim() - 1 if value.is_floating_point() else None
    axes = {axis: torch.export.Dim.AUTO for axis, size in enumerate(value.shape)
            if size > 1 and axis != feature_axis}
    return axes or None


def _grouped_by_parameter(module: torch.nn.Module, specs: list) -> list:
    """The positional inputs' specs as `forward`'s parameters take them: those a ``*args`` parameter
    collects become one tuple (torch.export matches `dynamic_shapes` to parameters, and sees such a
    forward's inputs as ``(x, (a, b))``; performer-pytorch's `SelfAttention.forward(self, *args, …)`)."""
    try:
        parameters = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):  # a forward without a Python signature
        return specs
    for position, parameter in enumerate(parameters):
        if parameter.kind is parameter.VAR_POSITIONAL:
            return specs[:position] + [tuple(specs[position:])]
        if parameter.kind not in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD):
            break
    return specs


def auto_dynamic_shapes(module: torch.nn.Module, args: tuple, kwargs: dict | None):
    """`dynamic_shapes` for torch.export marking the axes described above `Dim.AUTO`; None if none are."""
    specs = _grouped_by_parameter(module, [pytree.tree_map(_tensor_spec, arg) for arg in args])
    if kwargs:
        names = list(inspect.signature(module.forward).bind(*args, **kwargs).arguments)
        by_name = dict(zip(names, specs))
        by_name.update({name: pytree.tree_map(_tensor_spec, value) for name, value in kwargs.items()})
        specs = by_name
    leaves = pytree.tree_leaves(specs, is_leaf=lambda x: isinstance(x, dict) and x and
                                all(isinstance(key, int) for key in x))
    return specs if any(isinstance(leaf, dict) for leaf in leaves) else None


def _named_inputs(module: torch.nn.Module, args: tuple, kwargs: dict | None) -> dict[str, torch.Tensor]:
    """The tensor inputs by `forward`'s parameter names (positions where it has no signature)."""
    try:
        bound = inspect.signature(module.forward).bind(*args, **(kwargs or {})).arguments
    except (TypeError, ValueError):
        bound = {**{str(position): arg for position, arg in enumerate(args)}, **(kwargs or {})}
    named = {}
    for name, value in bound.items():
        leaves = [leaf for leaf in pytree.tree_leaves(value) if isinstance(leaf, torch.Tensor)]
        named.update({name if len(leaves) == 1 else f"{name}[{i}]": leaf for i, leaf in enumerate(leaves)})
    return named


def _warn_static_last_axes(name: str, module: torch.nn.Module, args: tuple, kwargs: dict | None) -> bool:
    """One WARNING per floating-point input whose last axis, kept static as a feature axis, looks like a
    sequence axis: its size is that of another input's non-last axis and of no other input's last axis
    (a float padding mask (B, L) beside q (B, H, L, D); q, k and v share their feature size). Returns
    whether it warned."""
    tensors, warned = _named_inputs(module, args, kwargs), False
    for input_name, tensor in tensors.items():
        if not tensor.is_floating_point() or tensor.dim() == 0 or tensor.size(-1) < 2:
            continue
        others = [other for other_name, other in tensors.items() if other_name != input_name and other.dim()]
        size = tensor.size(-1)
        if any(other.size(-1) == size for other in others):
            continue
        if any(size in other.shape[:-1] for other in others):
            logger.warning("optimize_module(%s): the last axis of floating-point input '%s' (size %d) is captured "
                           "static, as a feature axis, though another input has an axis of that size; if it is a "
                           "sequence axis, pass dynamic_shapes= marking it (e.g. Dim.AUTO)", name, input_name, size)
            warned = True
    return warned


def cache_off_kwargs(module: torch.nn.Module, args: tuple, kwargs: dict | None) -> dict | None:
    """`kwargs` with ``use_cache=False`` added, or None to leave them as they are.

    Added for a `transformers` model that would return its key/value cache: `module.config.use_cache`
    is true (the default of most configs), the model is a decoder, `forward` takes `use_cache`, and the
    caller passed none. A `DynamicCache` output cannot be captured (torch.export has no pytree for it),
    and without the cache the other outputs are the same. A config that says ``is_decoder=False`` and
    is not encoder-decoder (BERT-style encoders: their `forward` takes `use_cache` but sets it False
    unless the config is a decoder's) returns no cache, so nothing is added.
    """
    config = getattr(module, "config", None)
    if not getattr(config, "use_cache", False) or (kwargs and "use_cache" in kwargs):
        return None
    if not (getattr(config, "is_decoder", True) or getattr(config, "is_encoder_decoder", False)):
        return None
    try:
        names = list(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):  # a forward without a Python signature
        return None
    if "use_cache" not in names or names.index("use_cache") < len(args):
        return None
    return {**(kwargs or {}), "use_cache": False}


def pass_cache_off(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Make `gm`, captured with ``use_cache=False`` added by `cache_off_kwargs`, take calls without it
    (as the original module did); returns `gm`."""

    def add_cache_off(module, args, kwargs):
        return None if "use_cache" in kwargs else (args, {**kwargs, "use_cache": False})

    gm.register_forward_pre_hook(add_cache_off, with_kwargs=True, prepend=True)
    return gm


def _user_input_tensors(program: torch.export.ExportedProgram) -> list[torch.Tensor]:
    """The program's user inputs as captured (fake tensors; symbolic sizes where they stayed dynamic)."""
    placeholders = {node.name: node for node in program.graph.find_nodes(op="placeholder")}
    # a non-tensor input (use_cache=False, say) is a constant, not a placeholder
    values = [placeholders[name].meta.get("val") for name in program.graph_signature.user_inputs
              if name in placeholders]
    return [value for value in values if isinstance(value, torch.Tensor)]


def dynamic_input_axes(program: torch.export.ExportedProgram) -> int:
    """How many axes of the program's user inputs stayed symbolic (a specialised SymInt is a number)."""
    return sum(isinstance(size, torch.SymInt) and not size.node.expr.is_number
               for value in _user_input_tensors(program) for size in value.shape)


def export_static(module: torch.nn.Module, args: tuple, kwargs: dict | None):
    """torch.export of `module` at the example's shapes, on copies of the example tensors: torch.export
    (2.13) keeps an earlier dynamic attempt's symbolic sizes for the tensors it saw, and exporting the
    same tensors again can fail the same way."""
    args, kwargs = pytree.tree_map_only(torch.Tensor, torch.clone, (args, kwargs or {}))
    return _export(module, args, kwargs)


def export_program(module: torch.nn.Module, args: tuple, kwargs: dict | None, dynamic_shapes):
    """torch.export (non-strict) of `module`; `dynamic_shapes="auto"` as in the module docstring."""
    if not (isinstance(dynamic_shapes, str) and dynamic_shapes == AUTO):
        return _export(module, args, kwargs, dynamic_shapes=dynamic_shapes)
    shapes = auto_dynamic_shapes(module, args, kwargs)
    name = type(module).__name__
    static_last_axis = _warn_static_last_axes(name, module, args, kwargs)
    if shapes is None:
        logger.warning("optimize_module(%s): the result takes only the example's shapes: no input axis could be "
                       "dynamic (every non-feature axis has size 1 in the example)", name)
        return _export(module, args, kwargs)
    try:
        program = torch.export.export(module, args, kwargs, dynamic_shapes=shapes, strict=False)
    except Exception as error:  # noqa: BLE001 - any failure of the dynamic capture falls back to static
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        logger.warning("optimize_module(%s): the result takes only the example's shapes: capturing with dynamic "
                       "batch and sequence axes failed (%s: %s); pass dynamic_shapes= to choose the axes",
                       name, type(error).__name__, reason)
        return export_static(module, args, kwargs)
    kept = dynamic_input_axes(program)
    if not kept:
        logger.warning("optimize_module(%s): the result takes only the example's shapes: torch.export fixed every "
                       "input axis (the model's code depends on those sizes)", name)
        # Captured again at those shapes: the specialised capture can keep shape queries of intermediates
        # that a static capture folds to numbers (and that would keep a block from being rewritten).
        return export_static(module, args, kwargs)
    asked = sum(leaf is torch.export.Dim.AUTO for leaf in pytree.tree_leaves(shapes))
    if kept < asked and not static_last_axis:  # that WARNING already says why axes were fixed
        logger.warning("optimize_module(%s): torch.export fixed %d of the %d input axes asked to stay dynamic (the "
                       "model's code depends on those sizes): the result takes inputs of shapes %s only",
                       name, asked - kept, asked, _input_shapes(program))
    return program


def _input_shapes(program: torch.export.ExportedProgram) -> str:
    """The user inputs' shapes as captured, symbolic sizes by name: ``(s77, 256, 32)``."""
    return ", ".join("(" + ", ".join(str(size) for size in value.shape) + ")" for value in _user_input_tensors(program))


def explain_guard_failures(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Make a call that fails `gm`'s shape guards raise `InputShapeError` in words (returns `gm`)."""
    guards = getattr(gm, "_guards_fn", None)
    if guards is None:
        return gm

    def check(module, args, kwargs):
        tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if torch.compiler.is_compiling() or any(isinstance(t, torch._subclasses.FakeTensor) for t in tensors):
            return  # traced again (torch.compile, export): the guards in the graph do their own work
        try:
            guards(*pytree.tree_leaves((args, kwargs)))
        except AssertionError as error:
            shapes = ", ".join(str(tuple(t.shape)) for t in tensors)
            requirement = str(error).removeprefix("Guard failed: ")
            raise InputShapeError(f"the optimised module cannot take inputs of shapes {shapes}: its graph requires "
                                  f"{requirement} (recorded when capturing: the model's code or the example fixed it; optimise with an example "
                                  "of this shape, or pass dynamic_shapes=)") from None

    gm.register_forward_pre_hook(check, with_kwargs=True)
    return gm
