"""Find attention in PyTorch and ONNX models and rewrite it into exact, memory-efficient forms."""

from rewriter.bench import BenchResult, bench_module, bench_onnx
from rewriter.compile_backend import backend
from rewriter.export import export_onnx
from rewriter.onnx_api import detect_onnx, optimize_onnx
from rewriter.report import MatchReport, Report
from rewriter.torch_api import detect_module, optimize_module

__all__ = ["BenchResult", "MatchReport", "Report", "backend", "bench_module", "bench_onnx", "detect_module",
           "detect_onnx", "export_onnx", "optimize_module", "optimize_onnx"]
