"""Find attention in PyTorch and ONNX models and rewrite it into exact, memory-efficient forms."""

from rewriter.report import MatchReport, Report
from rewriter.torch_api import detect_module, optimize_module

__all__ = ["MatchReport", "Report", "detect_module", "optimize_module"]
