"""Differential fuzzer: random attention programs, eager vs rewritten (`python -m tests.fuzz`)."""
