"""Small random-weight transformers written the way each family's eager PyTorch code is written.

Each model follows the attention code of its Hugging Face family (from memory, no `transformers`
import): the same reshapes, scaling, mask construction and casts, so that the exported graphs look
like the real ones. Sizes are tiny (hidden 64, two layers) so a test exports one in about a second.
Every model class has `example_inputs(batch, seq)`; the attention modules are importable on their
own for tests that feed float hidden states.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "HEADS", "HIDDEN", "LAYERS",
    "BertAttention", "BertModel", "GPT2Attention", "GPT2Model", "GPT2SdpaAttention", "GPT2SdpaModel",
    "LlamaAttention", "LlamaModel", "LlamaRotaryEmbedding", "T5Attention", "T5EncoderModel",
    "additive_padding_mask", "llama_causal_mask", "padding_mask",
]

HIDDEN, HEADS, LAYERS, VOCAB, MAX_POSITIONS = 64, 4, 2, 97, 64


def padding_mask(batch: int, seq: int, padded: int = 5) -> torch.Tensor:
    """An int attention_mask of ones, with the last `padded` positions of the last row zeroed."""
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[-1, seq - padded:] = 0
    return mask


def additive_padding_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """HF `get_extended_attention_mask`: (batch, 1, 1, keys), 0 where kept, finfo.min where padded."""
    extended = attention_mask[:, None, None, :].to(dtype)
    return (1.0 - extended) * torch.finfo(dtype).min


def _token_ids(batch: int, seq: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(batch * 1000 + seq))


# ---------------------------------------------------------------------------------------------
# BERT: post-LayerNorm encoder, additive padding mask, scores divided by sqrt(head_dim).


class BertAttention(nn.Module):
    """BertSelfAttention + BertSelfOutput."""

    def __init__(self, hidden=HIDDEN, heads=HEADS, dropout=0.1):
        super().__init__()
        self.num_attention_heads = heads
        self.attention_head_size = hidden // heads
        self.all_head_size = hidden
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.dropout = nn.Dropout(dropout)
        self.dense = nn.Linear(hidden, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=1e-12)
        self.output_dropout = nn.Dropout(dropout)

    def transpose_for_scores(self, x):
        new_x_shape = x.size()[:-1] + (self.num_attention_heads, self.attention_head_size)
        x = x.view(new_x_shape)
        return x.permute(0, 2, 1, 3)

    def forward(self, hidden_states, attention_mask=None):
        query_layer = self.transpose_for_scores(self.query(hidden_states))
        key_layer = self.transpose_for_scores(self.key(hidden_states))
        value_layer = self.transpose_for_scores(self.value(hidden_states))
        attention_scores = torch.matmul(query_layer, key_layer.transpose(-1, -2))
        attention_scores = attention_scores / math.sqrt(self.attention_head_size)
        if attention_mask is not None:
            attention_scores = attention_scores + attention_mask
        attention_probs = nn.functional.softmax(attention_scores, dim=-1)
        attention_probs = self.dropout(attention_probs)
        context_layer = torch.matmul(attention_probs, value_layer)
        context_layer = context_layer.permute(0, 2, 1, 3).contiguous()
        new_context_layer_shape = context_layer.size()[:-2] + (self.all_head_size,)
        context_layer = context_layer.view(new_context_layer_shape)
        output = self.output_dropout(self.dense(context_layer))
        return self.LayerNorm(output + hidden_states)


class BertLayer(nn.Module):
    def __init__(self, hidden=HIDDEN, heads=HEADS, intermediate=4 * HIDDEN):
        super().__init__()
        self.attention = BertAttention(hidden, heads)
        self.intermediate = nn.Linear(hidden, intermediate)
        self.output = nn.Linear(intermediate, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=1e-12)
        self.dropout = nn.Dropout(0.1)

    def forward(self, hidden_states, attention_mask):
        attention_output = self.attention(hidden_states, attention_mask)
        intermediate = F.gelu(self.intermediate(attention_output))
        return self.LayerNorm(self.dropout(self.output(intermediate)) + attention_output)


class BertModel(nn.Module):
    def __init__(self, hidden=HIDDEN, heads=HEADS, layers=LAYERS, vocab=VOCAB, max_positions=MAX_POSITIONS):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, hidden)
        self.position_embeddings = nn.Embedding(max_positions, hidden)
        self.token_type_embeddings = nn.Embedding(2, hidden)
        self.register_buffer("position_ids", torch.arange(max_positions).expand((1, -1)), persistent=False)
        self.register_buffer("token_type_ids", torch.zeros(1, max_positions, dtype=torch.long), persistent=False)
        self.embeddings_LayerNorm = nn.LayerNorm(hidden, eps=1e-12)
        self.embeddings_dropout = nn.Dropout(0.1)
        self.layer = nn.ModuleList(BertLayer(hidden, heads) for _ in range(layers))

    def forward(self, input_ids, attention_mask):
        seq_length = input_ids.shape[1]
        position_ids = self.position_ids[:, :seq_length]
        token_type_ids = self.token_type_ids[:, :seq_length].expand(input_ids.shape[0], seq_length)
        embeddings = (self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
                      + self.position_embeddings(position_ids))
        hidden_states = self.embeddings_dropout(self.embeddings_LayerNorm(embeddings))
        extended_attention_mask = additive_padding_mask(attention_mask, hidden_states.dtype)
        for layer_module in self.layer:
            hidden_states = layer_module(hidden_states, extended_attention_mask)
        return hidden_states

    @staticmethod
    def example_inputs(batch: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
        return _token_ids(batch, seq), padding_mask(batch, seq)


# ---------------------------------------------------------------------------------------------
# GPT-2: pre-LayerNorm decoder, Conv1D projections, causal `bias` buffer applied with torch.where.


class Conv1D(nn.Module):
    """GPT-2's transposed Linear: weight is (in, out), applied with addmm on a 2-D view."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.empty(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return x.view(size_out)


class GPT2Attention(nn.Module):
    def __init__(self, hidden=HIDDEN, heads=HEADS, max_positions=MAX_POSITIONS, dropout=0.1):
        super().__init__()
        self.register_buffer(
            "bias",
            torch.tril(torch.ones((max_positions, max_positions), dtype=torch.bool)).view(
                1, 1, max_positions, max_positions),
            persistent=False,
        )
        self.embed_dim = hidden
        self.num_heads = heads
        self.head_dim = hidden // heads
        self.split_size = hidden
        self.c_attn = Conv1D(3 * hidden, hidden)
        self.c_proj = Conv1D(hidden, hidden)
        self.attn_dropout = nn.Dropout(dropout)
        self.resid_dropout = nn.Dropout(dropout)

    def _attn(self, query, key, value):
        attn_weights = torch.matmul(query, key.transpose(-1, -2))
        attn_weights = attn_weights / (value.size(-1) ** 0.5)
        query_length, key_length = query.size(-2), key.size(-2)
        causal_mask = self.bias[:, :, key_length - query_length: key_length, :key_length]
        mask_value = torch.finfo(attn_weights.dtype).min
        # A tensor, not a Python float: the real code does this to keep dtype and device.
        mask_value = torch.full([], mask_value, dtype=attn_weights.dtype, device=attn_weights.device)
        attn_weights = torch.where(causal_mask, attn_weights.to(attn_weights.dtype), mask_value)
        attn_weights = nn.functional.softmax(attn_weights, dim=-1)
        attn_weights = attn_weights.type(value.dtype)
        attn_weights = self.attn_dropout(attn_weights)
        return torch.matmul(attn_weights, value)

    def _split_heads(self, tensor):
        new_shape = tensor.size()[:-1] + (self.num_heads, self.head_dim)
        return tensor.view(new_shape).permute(0, 2, 1, 3)

    def _merge_heads(self, tensor):
        tensor = tensor.permute(0, 2, 1, 3).contiguous()
        new_shape = tensor.size()[:-2] + (self.num_heads * self.head_dim,)
        return tensor.view(new_shape)

    def forward(self, hidden_states):
        query, key, value = self.c_attn(hidden_states).split(self.split_size, dim=2)
        query, key, value = self._split_heads(query), self._split_heads(key), self._split_heads(value)
        attn_output = self._merge_heads(self._attn(query, key, value))
        return self.resid_dropout(self.c_proj(attn_output))


class GPT2SdpaAttention(GPT2Attention):
    """GPT-2 with the SDPA attention path (no padding mask, so `is_causal=True`)."""

    def _attn(self, query, key, value):
        is_causal = query.shape[-2] > 1
        return F.scaled_dot_product_attention(
            query, key, value, attn_mask=None, dropout_p=self.attn_dropout.p if self.training else 0.0,
            is_causal=is_causal)


def gelu_new(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class GPT2MLP(nn.Module):
    def __init__(self, hidden=HIDDEN):
        super().__init__()
        self.c_fc = Conv1D(4 * hidden, hidden)
        self.c_proj = Conv1D(hidden, 4 * hidden)
        self.dropout = nn.Dropout(0.1)

    def forward(self, hidden_states):
        return self.dropout(self.c_proj(gelu_new(self.c_fc(hidden_states))))


class GPT2Block(nn.Module):
    def __init__(self, attention_class, hidden=HIDDEN, heads=HEADS, max_positions=MAX_POSITIONS):
        super().__init__()
        self.ln_1 = nn.LayerNorm(hidden, eps=1e-5)
        self.attn = attention_class(hidden, heads, max_positions)
        self.ln_2 = nn.LayerNorm(hidden, eps=1e-5)
        self.mlp = GPT2MLP(hidden)

    def forward(self, hidden_states):
        hidden_states = hidden_states + self.attn(self.ln_1(hidden_states))
        return hidden_states + self.mlp(self.ln_2(hidden_states))


class GPT2Model(nn.Module):
    attention_class = GPT2Attention

    def __init__(self, hidden=HIDDEN, heads=HEADS, layers=LAYERS, vocab=VOCAB, max_positions=MAX_POSITIONS):
        super().__init__()
        self.wte = nn.Embedding(vocab, hidden)
        self.wpe = nn.Embedding(max_positions, hidden)
        self.drop = nn.Dropout(0.1)
        self.h = nn.ModuleList(GPT2Block(self.attention_class, hidden, heads, max_positions) for _ in range(layers))
        self.ln_f = nn.LayerNorm(hidden, eps=1e-5)

    def forward(self, input_ids):
        position_ids = torch.arange(input_ids.shape[-1], dtype=torch.long, device=input_ids.device).unsqueeze(0)
        hidden_states = self.drop(self.wte(input_ids) + self.wpe(position_ids))
        for block in self.h:
            hidden_states = block(hidden_states)
        return self.ln_f(hidden_states)

    @staticmethod
    def example_inputs(batch: int, seq: int) -> tuple[torch.Tensor]:
        return (_token_ids(batch, seq),)


class GPT2SdpaModel(GPT2Model):
    attention_class = GPT2SdpaAttention


# ---------------------------------------------------------------------------------------------
# LLaMA: RMSNorm, rotary embeddings, grouped-query attention via repeat_kv, additive causal mask.


class LlamaRMSNorm(nn.Module):
    def __init__(self, hidden, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class LlamaRotaryEmbedding(nn.Module):
    def __init__(self, head_dim, base=10000.0):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.attention_scaling = 1.0

    @torch.no_grad()
    def forward(self, x, position_ids):
        inv_freq_expanded = self.inv_freq[None, :, None].float().expand(position_ids.shape[0], -1, 1)
        position_ids_expanded = position_ids[:, None, :].float()
        freqs = (inv_freq_expanded.float() @ position_ids_expanded.float()).transpose(1, 2)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


def rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


def repeat_kv(hidden_states, n_rep):
    batch, num_key_value_heads, slen, head_dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    hidden_states = hidden_states[:, :, None, :, :].expand(batch, num_key_value_heads, n_rep, slen, head_dim)
    return hidden_states.reshape(batch, num_key_value_heads * n_rep, slen, head_dim)


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0):
    key_states = repeat_kv(key, module.num_key_value_groups)
    value_states = repeat_kv(value, module.num_key_value_groups)
    attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling
    if attention_mask is not None:
        causal_mask = attention_mask[:, :, :, : key_states.shape[-2]]
        attn_weights = attn_weights + causal_mask
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value_states)
    return attn_output.transpose(1, 2).contiguous()


class LlamaAttention(nn.Module):
    def __init__(self, hidden=HIDDEN, heads=HEADS, kv_heads=2):
        super().__init__()
        self.head_dim = hidden // heads
        self.num_key_value_groups = heads // kv_heads
        self.scaling = self.head_dim ** -0.5
        self.attention_dropout = 0.0
        self.q_proj = nn.Linear(hidden, heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(heads * self.head_dim, hidden, bias=False)

    def forward(self, hidden_states, cos, sin, attention_mask):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query_states = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)
        attn_output = eager_attention_forward(
            self, query_states, key_states, value_states, attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout, scaling=self.scaling)
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output)


class LlamaMLP(nn.Module):
    def __init__(self, hidden=HIDDEN, intermediate=172):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, hidden=HIDDEN, heads=HEADS, kv_heads=2):
        super().__init__()
        self.self_attn = LlamaAttention(hidden, heads, kv_heads)
        self.mlp = LlamaMLP(hidden)
        self.input_layernorm = LlamaRMSNorm(hidden)
        self.post_attention_layernorm = LlamaRMSNorm(hidden)

    def forward(self, hidden_states, cos, sin, attention_mask):
        hidden_states = hidden_states + self.self_attn(self.input_layernorm(hidden_states), cos, sin, attention_mask)
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


def llama_causal_mask(seq: int, dtype: torch.dtype) -> torch.Tensor:
    """(1, 1, seq, seq): 0 on and below the diagonal, finfo.min above it."""
    return torch.full((seq, seq), torch.finfo(dtype).min, dtype=dtype).triu(1)[None, None, :, :]


class LlamaModel(nn.Module):
    def __init__(self, hidden=HIDDEN, heads=HEADS, kv_heads=2, layers=LAYERS, vocab=VOCAB):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(LlamaDecoderLayer(hidden, heads, kv_heads) for _ in range(layers))
        self.norm = LlamaRMSNorm(hidden)
        self.rotary_emb = LlamaRotaryEmbedding(hidden // heads)

    def forward(self, input_ids):
        inputs_embeds = self.embed_tokens(input_ids)
        seq = input_ids.shape[1]
        position_ids = torch.arange(seq, device=input_ids.device).unsqueeze(0)
        causal_mask = llama_causal_mask(seq, inputs_embeds.dtype)
        cos, sin = self.rotary_emb(inputs_embeds, position_ids)
        hidden_states = inputs_embeds
        for decoder_layer in self.layers:
            hidden_states = decoder_layer(hidden_states, cos, sin, causal_mask)
        return self.norm(hidden_states)

    @staticmethod
    def example_inputs(batch: int, seq: int) -> tuple[torch.Tensor]:
        return (_token_ids(batch, seq),)


# ---------------------------------------------------------------------------------------------
# T5 encoder: unscaled scores, bucketed relative position bias shared by all layers, padding
# mask folded into that bias.


class T5LayerNorm(nn.Module):
    """RMS norm without mean subtraction or bias, computed in fp32."""

    def __init__(self, hidden, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        variance = hidden_states.to(torch.float32).pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            hidden_states = hidden_states.to(self.weight.dtype)
        return self.weight * hidden_states


class T5Attention(nn.Module):
    def __init__(self, hidden=HIDDEN, heads=HEADS, has_relative_attention_bias=False,
                 num_buckets=32, max_distance=128, dropout=0.1):
        super().__init__()
        self.n_heads = heads
        self.key_value_proj_dim = hidden // heads
        self.inner_dim = heads * self.key_value_proj_dim
        self.relative_attention_num_buckets = num_buckets
        self.relative_attention_max_distance = max_distance
        self.has_relative_attention_bias = has_relative_attention_bias
        self.dropout = dropout
        self.q = nn.Linear(hidden, self.inner_dim, bias=False)
        self.k = nn.Linear(hidden, self.inner_dim, bias=False)
        self.v = nn.Linear(hidden, self.inner_dim, bias=False)
        self.o = nn.Linear(self.inner_dim, hidden, bias=False)
        if has_relative_attention_bias:
            self.relative_attention_bias = nn.Embedding(num_buckets, heads)

    @staticmethod
    def _relative_position_bucket(relative_position, num_buckets=32, max_distance=128):
        """Bidirectional buckets: exact for small distances, logarithmic up to `max_distance`."""
        num_buckets //= 2
        relative_buckets = (relative_position > 0).to(torch.long) * num_buckets
        relative_position = torch.abs(relative_position)
        max_exact = num_buckets // 2
        is_small = relative_position < max_exact
        relative_position_if_large = max_exact + (
            torch.log(relative_position.float() / max_exact)
            / math.log(max_distance / max_exact)
            * (num_buckets - max_exact)
        ).to(torch.long)
        relative_position_if_large = torch.min(
            relative_position_if_large, torch.full_like(relative_position_if_large, num_buckets - 1))
        return relative_buckets + torch.where(is_small, relative_position, relative_position_if_large)

    def compute_bias(self, query_length, key_length, device=None):
        context_position = torch.arange(query_length, dtype=torch.long, device=device)[:, None]
        memory_position = torch.arange(key_length, dtype=torch.long, device=device)[None, :]
        relative_position = memory_position - context_position
        relative_position_bucket = self._relative_position_bucket(
            relative_position, num_buckets=self.relative_attention_num_buckets,
            max_distance=self.relative_attention_max_distance)
        values = self.relative_attention_bias(relative_position_bucket)  # (query, key, heads)
        return values.permute([2, 0, 1]).unsqueeze(0)  # (1, heads, query, key)

    def forward(self, hidden_states, mask=None, position_bias=None):
        batch_size, seq_length = hidden_states.shape[:2]
        query_states = self.q(hidden_states).view(batch_size, -1, self.n_heads, self.key_value_proj_dim).transpose(1, 2)
        key_states = self.k(hidden_states).view(batch_size, -1, self.n_heads, self.key_value_proj_dim).transpose(1, 2)
        value_states = self.v(hidden_states).view(batch_size, -1, self.n_heads, self.key_value_proj_dim).transpose(1, 2)
        scores = torch.matmul(query_states, key_states.transpose(3, 2))
        if position_bias is None:
            position_bias = self.compute_bias(seq_length, seq_length, device=scores.device)
            if mask is not None:
                causal_mask = mask[:, :, :, : key_states.shape[-2]]
                position_bias = position_bias + causal_mask
        position_bias_masked = position_bias
        scores += position_bias_masked
        attn_weights = nn.functional.softmax(scores.float(), dim=-1).type_as(scores)
        attn_weights = nn.functional.dropout(attn_weights, p=self.dropout, training=self.training)
        attn_output = torch.matmul(attn_weights, value_states)
        attn_output = attn_output.transpose(1, 2).contiguous()
        attn_output = attn_output.view(batch_size, -1, self.inner_dim)
        return self.o(attn_output), position_bias


class T5Block(nn.Module):
    def __init__(self, hidden=HIDDEN, heads=HEADS, has_relative_attention_bias=False, d_ff=128):
        super().__init__()
        self.SelfAttention = T5Attention(hidden, heads, has_relative_attention_bias)
        self.attention_layer_norm = T5LayerNorm(hidden)
        self.wi = nn.Linear(hidden, d_ff, bias=False)
        self.wo = nn.Linear(d_ff, hidden, bias=False)
        self.ff_layer_norm = T5LayerNorm(hidden)
        self.dropout = nn.Dropout(0.1)

    def forward(self, hidden_states, mask, position_bias=None):
        attention_output, position_bias = self.SelfAttention(
            self.attention_layer_norm(hidden_states), mask=mask, position_bias=position_bias)
        hidden_states = hidden_states + self.dropout(attention_output)
        forwarded = self.wo(self.dropout(F.relu(self.wi(self.ff_layer_norm(hidden_states)))))
        return hidden_states + self.dropout(forwarded), position_bias


class T5EncoderModel(nn.Module):
    def __init__(self, hidden=HIDDEN, heads=HEADS, layers=LAYERS, vocab=VOCAB):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, hidden)
        self.block = nn.ModuleList(T5Block(hidden, heads, has_relative_attention_bias=i == 0) for i in range(layers))
        self.final_layer_norm = T5LayerNorm(hidden)
        self.dropout = nn.Dropout(0.1)

    def forward(self, input_ids, attention_mask):
        hidden_states = self.dropout(self.embed_tokens(input_ids))
        extended_attention_mask = additive_padding_mask(attention_mask, hidden_states.dtype)
        position_bias = None
        for layer_module in self.block:
            hidden_states, position_bias = layer_module(hidden_states, extended_attention_mask, position_bias)
        return self.dropout(self.final_layer_norm(hidden_states))

    @staticmethod
    def example_inputs(batch: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
        return _token_ids(batch, seq), padding_mask(batch, seq)
