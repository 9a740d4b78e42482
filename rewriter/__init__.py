"""Find attention in PyTorch and ONNX models and rewrite it into exact, memory-efficient forms.

The public names are imported on first use (PEP 562), so ``import rewriter`` loads neither torch
nor ONNX Runtime and every submodule can be imported on its own.
"""

from __future__ import annotations

import importlib

_PUBLIC = {
    "BenchResult": "rewriter.tools.bench",
    "bench_module": "rewriter.tools.bench",
    "bench_onnx": "rewriter.tools.bench",
    "backend": "rewriter.compile_backend",
    "compile_reports": "rewriter.compile_backend",
    "export_onnx": "rewriter.export",
    "detect_onnx": "rewriter.onnx_api",
    "optimize_onnx": "rewriter.onnx_api",
    "MatchReport": "rewriter.report",
    "Report": "rewriter.report",
    "detect_module": "rewriter.torch_api",
    "optimize_module": "rewriter.torch_api",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'rewriter' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
