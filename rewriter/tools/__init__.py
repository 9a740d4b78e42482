"""Measurement and demonstration on top of the public API: rewriter bench, the demo, fresh-process memory and time, the ONNX memory estimate."""
