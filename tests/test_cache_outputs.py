"""`optimize_module` on a `transformers` decoder whose config asks for a key/value cache (the default):
captured with use_cache=False, the result takes calls without it and equals the eager model's
outputs; modules that merely take a `use_cache` argument are left as they are."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import nn

import rewriter
from rewriter import optimize_module
from rewriter.dynamic_capture import InputShapeError, cache_off_kwargs

transformers = pytest.importorskip("transformers")


def _llama():
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, vocab_size=100)
    assert config.use_cache  # the default this test is about
    torch.manual_seed(0)
    return transformers.LlamaModel(config).eval()


def _ids(batch: int, seq: int) -> torch.Tensor:
    return torch.randint(0, 100, (batch, seq), generator=torch.Generator().manual_seed(batch * 100 + seq))


def test_llama_with_the_config_default_use_cache_is_optimised(caplog):
    model = _llama()
    with caplog.at_level(logging.WARNING, logger="rewriter"):
        gm, report = optimize_module(model, (_ids(2, 32),))
    assert report.rewritten_count == 2
    assert [r.getMessage() for r in caplog.records if "use_cache=False" in r.getMessage()] != []
    for batch, seq in ((2, 32), (3, 48)):
        ids = _ids(batch, seq)
        out = gm(ids)
        with torch.no_grad():
            expected = model(ids, use_cache=False).last_hidden_state
        assert out.past_key_values is None
        torch.testing.assert_close(out.last_hidden_state, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(InputShapeError, match="use_cache == False"):
        gm(_ids(2, 32), use_cache=True)


def test_explicit_use_cache_false_is_kept_without_a_warning(caplog):
    model = _llama()
    with caplog.at_level(logging.WARNING, logger="rewriter"):
        gm, report = optimize_module(model, (_ids(2, 32),), example_kwargs={"use_cache": False})
    assert report.rewritten_count == 2
    assert not [r for r in caplog.records if "use_cache" in r.getMessage()]
    out = gm(_ids(3, 40), use_cache=False)
    with torch.no_grad():
        expected = model(_ids(3, 40), use_cache=False).last_hidden_state
    torch.testing.assert_close(out.last_hidden_state, expected, rtol=1e-5, atol=1e-5)


class _TakesUseCache(nn.Module):
    def forward(self, x, use_cache=True):
        return x * 2 if use_cache else x


class _Config:
    use_cache = True


def test_an_encoder_is_optimised_without_use_cache_or_a_warning(caplog):
    """BERT's config asks for a cache, but an encoder never returns one: nothing to turn off or warn about."""
    config = transformers.BertConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=2,
                                     intermediate_size=128, vocab_size=100)
    assert config.use_cache and not config.is_decoder
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    with caplog.at_level(logging.WARNING):
        gm, report = optimize_module(model, (_ids(2, 32), torch.ones(2, 32, dtype=torch.long)))
    assert report.rewritten_count == 2
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    ids, mask = _ids(3, 40), torch.ones(3, 40, dtype=torch.long)
    with torch.no_grad():
        expected = model(ids, mask).last_hidden_state
        np.testing.assert_allclose(gm(ids, mask).last_hidden_state.numpy(), expected.numpy(), rtol=1e-4, atol=1e-5)


def test_only_a_config_asking_for_a_cache_adds_use_cache():
    module, x = _TakesUseCache(), torch.ones(2, 3)
    assert cache_off_kwargs(module, (x,), None) is None  # no config: its own default stays
    module.config = _Config()
    assert cache_off_kwargs(module, (x,), {"other": 1}) == {"other": 1, "use_cache": False}
    assert cache_off_kwargs(module, (x, True), None) is None  # passed positionally
    assert cache_off_kwargs(module, (x,), {"use_cache": True}) is None  # passed by name
    module.config.is_decoder = False  # an encoder's config
    assert cache_off_kwargs(module, (x,), None) is None
    module.config.is_encoder_decoder = True  # whose decoder returns a cache
    assert cache_off_kwargs(module, (x,), None) == {"use_cache": False}
    module.config.use_cache = False
    assert cache_off_kwargs(module, (x,), None) is None


def test_llama_exports_to_onnx_with_dynamic_batch_and_length(tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    model, path = _llama(), tmp_path / "llama.onnx"
    report = rewriter.export_onnx(model, (_ids(2, 32),), str(path))  # verified against eager without its cache
    assert report.rewritten_count == 2 and "at lengths 1," in report.verification
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ids = _ids(3, 40)
    with torch.no_grad():
        expected = model(ids, use_cache=False).last_hidden_state.numpy()
    got = session.run(None, {session.get_inputs()[0].name: ids.numpy()})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
