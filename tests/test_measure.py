"""`rewriter.tools.measure`: a fresh process per measurement, and a clear error when it dies."""

from __future__ import annotations

import os
import signal

import pytest

from rewriter.tools.measure import measure_in_fresh_process


def allocate_call(megabytes: int):
    def call():
        block = bytearray(megabytes * 2**20)
        block[::4096] = b"x" * len(block[::4096])  # touch every page
        return len(block)

    return call


def killed_before_reporting():
    os.kill(os.getpid(), signal.SIGKILL)


def test_extra_peak_counts_what_the_call_allocates():
    measured = measure_in_fresh_process(allocate_call, 64)
    assert 60 <= measured.extra_peak_mib <= 80
    assert measured.seconds > 0


def test_a_killed_child_raises_instead_of_hanging():
    with pytest.raises(ChildProcessError, match="exit code -9"):
        measure_in_fresh_process(killed_before_reporting)
