"""Fixtures several test modules share."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def one_thread():
    """For tiny tensors a second thread only adds waiting, badly so on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
