"""Raise a model's default-domain opset, converting only the nodes whose operator changed.

The chunked subgraph needs opset 18 (``ReduceMax``/``Pad`` with axes inputs) and the
``Attention`` target needs 23, while the TorchScript exporter writes opset 17 and older tools
less. ONNX's version converter rewrites the nodes whose operator changed between the two
versions (e.g. ``ReduceMean`` axes moving from attribute to input); the shape annotations it
adds on the way are dropped again, so the graph keeps its own value_info, names and metadata.
"""

from __future__ import annotations

import logging

import onnx
import onnx.version_converter
import onnx_ir as ir
import onnx_ir.passes

__all__ = ["RaiseOpsetPass", "raise_opset"]

logger = logging.getLogger(__name__)


def _strip_added_value_info(graph: onnx.GraphProto, original: onnx.GraphProto) -> None:
    kept = {info.name for info in original.value_info}
    infos = [info for info in graph.value_info if info.name in kept]
    del graph.value_info[:]
    graph.value_info.extend(infos)


def raise_opset(model: ir.Model, target: int) -> ir.Model:
    """`model` at default-domain opset `target` or newer: `model` itself when already there, else
    `RaiseOpsetPass`'s new model. Raises onnx_ir.passes.PassError when the converter cannot."""
    if model.opset_imports.get("", 1) >= target:
        return model
    return RaiseOpsetPass(target)(model).model


class RaiseOpsetPass(onnx_ir.passes.FunctionalPass):
    """Returns a new model at default-domain opset `target` (use `raise_opset` for a model that may be there)."""

    def __init__(self, target: int):
        super().__init__()
        self.target = target

    def call(self, model: ir.Model) -> onnx_ir.passes.PassResult:
        current = model.opset_imports.get("", 1)
        proto = ir.serde.serialize_model(model)
        try:
            converted = onnx.version_converter.convert_version(proto, self.target)
        except Exception as error:  # noqa: BLE001 - the converter raises plain RuntimeErrors
            raise onnx_ir.passes.PassError(f"cannot raise opset {current} to {self.target}: {error}") from error
        _strip_added_value_info(converted.graph, proto.graph)
        required = onnx.helper.find_min_ir_version_for(list(converted.opset_import), ignore_unknown=True)
        converted.ir_version = max(proto.ir_version, required)
        logger.info("raised the default opset from %d to %d", current, self.target)
        return onnx_ir.passes.PassResult(ir.serde.deserialize_model(converted), True)
