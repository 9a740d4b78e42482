"""Hugging Face `transformers` models for benchmarks/real_models.py: tiny configs, random weights.

Every model is built from its `*Config` class (no download, no pretrained weights): hidden 64, 4
attention heads, 2 layers, vocabulary 100, dropout 0, fp32, in eval mode. The families and the
mask or bias structure each one's attention sees:

    llama     LlamaModel, causal + key padding (HF's combined 4-D mask), 2 KV heads, use_cache=False
    bert      BertModel, bidirectional + key padding
    mistral   MistralModel, causal sliding window + key padding, 2 KV heads, use_cache=False
    t5        T5EncoderModel, bidirectional relative position bias (T5 buckets) + key padding

Inputs (numpy, so that an ONNX Runtime child need not import torch): `token_ids(batch, n)` and
`padding_mask(batch, n)`, int64 (batch, n); the mask is all ones except that the last batch row has
its last n // 8 positions padded (zeros), so with batch 1 the only row has padded keys.
"""

from __future__ import annotations

import logging

import numpy as np

__all__ = ["FAMILIES", "PADDED_FRACTION", "NoSuchImplementation", "build_model", "padding_mask", "sliding_window_for", "token_ids"]

logger = logging.getLogger(__name__)

FAMILIES = ("llama", "bert", "mistral", "t5")
HIDDEN, HEADS, KV_HEADS, LAYERS, VOCAB, INTERMEDIATE = 64, 4, 2, 2, 100, 128
PADDED_FRACTION = 1 / 8


class NoSuchImplementation(ValueError):
    """The family has no implementation of the requested `attn_implementation` in this `transformers`."""


def token_ids(batch: int, n: int) -> np.ndarray:
    return np.random.default_rng(n).integers(0, VOCAB, (batch, n), dtype=np.int64)


def padding_mask(batch: int, n: int) -> np.ndarray:
    """(batch, n) int64 attention_mask: ones, the last row's last `n * PADDED_FRACTION` (≥ 1) zero."""
    mask = np.ones((batch, n), dtype=np.int64)
    mask[-1, n - max(1, int(n * PADDED_FRACTION)):] = 0
    return mask


def sliding_window_for(n: int, window: int) -> int:
    """The Mistral window used at length n: `window`, or n // 2 when `window` would not be smaller than n."""
    return min(window, max(1, n // 2))


def _config(family: str, attn_implementation: str, max_length: int, sliding_window: int):
    import transformers

    if family == "llama":
        return transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
            num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=max_length,
            use_cache=False, attn_implementation=attn_implementation)
    if family == "bert":
        return transformers.BertConfig(
            vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
            num_attention_heads=HEADS, max_position_embeddings=max_length, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0, attn_implementation=attn_implementation)
    if family == "mistral":
        return transformers.MistralConfig(
            vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
            num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=max_length,
            sliding_window=sliding_window, use_cache=False, attn_implementation=attn_implementation)
    if family == "t5":
        return transformers.T5Config(
            vocab_size=VOCAB, d_model=HIDDEN, d_kv=HIDDEN // HEADS, d_ff=INTERMEDIATE, num_layers=LAYERS,
            num_heads=HEADS, dropout_rate=0.0, use_cache=False, attn_implementation=attn_implementation)
    raise ValueError(f"unknown family {family!r}; expected one of {', '.join(FAMILIES)}")


def build_model(family: str, attn_implementation: str, max_length: int, sliding_window: int, seed: int = 0):
    """The family's model (eval mode, random weights from `seed`) with HF's `attn_implementation`.

    `max_length` sizes learned position tables (BERT); `sliding_window` is Mistral's window (see
    `sliding_window_for`). Raises `NoSuchImplementation` when the family has no such implementation.
    """
    import torch
    import transformers

    model_class = {"llama": transformers.LlamaModel, "bert": transformers.BertModel,
                   "mistral": transformers.MistralModel, "t5": transformers.T5EncoderModel}[family]
    config = _config(family, attn_implementation, max_length, sliding_window)
    torch.manual_seed(seed)
    try:
        model = model_class(config)
    except (ValueError, ImportError) as error:  # transformers refuses an implementation a model lacks
        raise NoSuchImplementation(f"{model_class.__name__} has no {attn_implementation!r} attention ({error})") from None
    logger.debug("built %s (%s)", model_class.__name__, attn_implementation)
    return model.eval()
