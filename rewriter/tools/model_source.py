"""Where the CLI's PyTorch models come from: `MODULE:CALLABLE` or a saved `torch.export` program.

    made = call_factory("mypackage.models:make_model", 1024)   # CALLABLE(seq_len) -> (model, example_inputs)
    model, inputs, dynamic = load_exported_program("model.pt2")  # torch.export.save(...) output

Bad specs raise `ModelSourceError` with a one-line message the CLI prints as it is.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable

__all__ = ["ModelSourceError", "call_factory", "load_exported_program", "resolve_factory"]


class ModelSourceError(ValueError):
    """The model spec cannot be imported, called or loaded; the message says why."""


def resolve_factory(factory: str | Callable) -> Callable:
    """The callable `factory` names ("module:callable", dotted attributes allowed), or `factory`."""
    if callable(factory):
        return factory
    module_name, _, attribute = str(factory).partition(":")
    if not module_name or not attribute:
        raise ModelSourceError(f"{factory}: expected MODULE:CALLABLE, e.g. mypackage.models:make_model")
    try:
        found = importlib.import_module(module_name)
        for part in attribute.split("."):
            found = getattr(found, part)
    except ImportError as error:
        raise ModelSourceError(f"{factory}: cannot import {module_name} ({error})") from None
    except AttributeError:
        raise ModelSourceError(f"{factory}: {module_name} has no attribute {attribute}") from None
    if not callable(found):
        raise ModelSourceError(f"{factory}: {attribute} is not callable")
    return found


def call_factory(factory: str | Callable, seq_len: int) -> tuple[torch.nn.Module, tuple]:
    """`factory(seq_len)`, checked to be (model, example_inputs); the inputs always a tuple."""
    import torch  # here, not at the top: the CLI's ONNX commands import this module for its error

    made = resolve_factory(factory)(seq_len)
    if not (isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], torch.nn.Module)):
        raise ModelSourceError(f"{factory}: must return (model, example_inputs), got {type(made).__name__}")
    model, example_inputs = made
    return model, example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)


def load_exported_program(path: str) -> tuple[torch.nn.Module, tuple, tuple]:
    """The module, example inputs and dynamic shapes of a program saved by `torch.export.save`.

    The axes that are symbolic in the saved program stay dynamic (`Dim.AUTO`) when it is exported again.
    """
    import torch

    if not os.path.isfile(path):
        raise ModelSourceError(f"{path}: no such file")
    try:
        program = torch.export.load(path)
    except Exception as error:  # torch raises several kinds for a file that is not a program
        raise ModelSourceError(f"{path}: not a saved torch.export program ({type(error).__name__}: {error})") from None
    if not program.example_inputs:
        raise ModelSourceError(f"{path}: saved without example inputs (save it with torch 2.5 or newer)")
    args, kwargs = program.example_inputs
    if kwargs:
        raise ModelSourceError(f"{path}: keyword inputs ({', '.join(kwargs)}) are not supported; export positionally")
    placeholders = {node.name: node for node in program.graph.find_nodes(op="placeholder")}
    dynamic = []
    for name in program.graph_signature.user_inputs:
        value = placeholders[name].meta.get("val")
        sizes = value.shape if isinstance(value, torch.Tensor) else ()
        axes = {axis: torch.export.Dim.AUTO for axis, size in enumerate(sizes) if isinstance(size, torch.SymInt)}
        dynamic.append(axes or None)
    return program.module(), tuple(args), tuple(dynamic)
