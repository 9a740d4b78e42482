"""`rewriter.tools.measure`: a fresh process per measurement, and a clear error when it dies."""

from __future__ import annotations

import os
import signal

import pytest

from rewriter.tools.measure import is_out_of_memory, measure_in_fresh_process


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


def capped_allocation(limit_mib: int, megabytes: int):
    from rewriter.tools.measure import limit_extra_memory

    limit_extra_memory(limit_mib * 2**20)
    return allocate_call(megabytes)


def test_an_allocation_over_the_cap_fails_and_is_recognised_as_out_of_memory():
    with pytest.raises(MemoryError) as raised:
        measure_in_fresh_process(capped_allocation, 64, 512)
    assert is_out_of_memory(raised.value)
    assert 60 <= measure_in_fresh_process(capped_allocation, 256, 64).extra_peak_mib <= 80  # under the cap


def test_torch_and_onnxruntime_allocation_errors_are_out_of_memory_and_others_are_not():
    torch_error = RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                               "memory: you tried to allocate 2147483648 bytes. Error code 12 (Cannot allocate memory)")
    assert is_out_of_memory(torch_error)
    assert is_out_of_memory(RuntimeError("Non-zero status code returned while running MatMul node. bad allocation"))
    assert not is_out_of_memory(RuntimeError("The size of tensor a (4) must match the size of tensor b (5)"))
    try:  # raised while handling an allocation failure (torch.export wraps errors this way)
        try:
            raise torch_error
        except RuntimeError as cause:
            raise RuntimeError("while capturing the module") from cause
    except RuntimeError as wrapped:
        assert is_out_of_memory(wrapped)
