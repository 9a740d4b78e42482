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


@pytest.fixture
def refuse_dynamic_shapes(monkeypatch):
    """`refuse_dynamic_shapes(owner, "export", message)`: `owner.export` raises RuntimeError(message)
    when given dynamic_shapes, and works as before without them."""

    def refuse(owner, name: str, message: str) -> None:
        original = getattr(owner, name)

        def static_only(*args, dynamic_shapes=None, **kwargs):
            if dynamic_shapes is not None:
                raise RuntimeError(message)
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, static_only)

    return refuse
