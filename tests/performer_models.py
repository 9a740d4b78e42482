"""Small Performer models written the way performer-pytorch writes them (for the FX linear-attention tests).

`FastAttention` holds its random projection as a buffer (redraw only in training); the feature maps
and the bidirectional / causal / chunked-causal attention functions are performer-pytorch's, with
variants that the detector must leave alone (`near_miss`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["FastAttention", "FeaturesReused", "SwappedBatchAxes", "PerformerLM", "PerformerEncoder", "gaussian_orthogonal_random_matrix"]


def gaussian_orthogonal_random_matrix(rows: int, columns: int, generator=None) -> torch.Tensor:
    blocks = []
    for _ in range(math.ceil(rows / columns)):
        q, _ = torch.linalg.qr(torch.randn(columns, columns, generator=generator))
        blocks.append(q.t())
    matrix = torch.cat(blocks)[:rows]
    return torch.randn(rows, columns, generator=generator).norm(dim=1).diag() @ matrix


def softmax_kernel(data, *, projection_matrix, is_query, normalize_data=True, eps=1e-4, near_miss=None):
    data_normalizer = (data.shape[-1] ** -0.25) if normalize_data else 1.0
    ratio = projection_matrix.shape[0] ** -0.5
    data_dash = torch.einsum("...id,...jd->...ij", (data_normalizer * data), projection_matrix)
    diag_data = data**2
    diag_data = torch.sum(diag_data, dim=-1)
    diag_data = (diag_data / 2.0) * (data_normalizer**2)
    diag_data = diag_data.unsqueeze(dim=-1)
    if is_query:
        stab = torch.amax(data_dash, dim=-1, keepdim=True)
    elif near_miss == "global_stabiliser":
        stab = torch.amax(data_dash)  # over batch and heads too: not per-(batch, head)
    else:
        stab = torch.amax(data_dash, dim=(-1, -2), keepdim=True)
    return ratio * (torch.exp(data_dash - diag_data - stab.detach()) + eps)


def generalized_kernel(data, *, projection_matrix, kernel_fn=nn.ReLU(), kernel_epsilon=0.001, normalize_data=True):
    data_normalizer = (data.shape[-1] ** -0.25) if normalize_data else 1.0
    if projection_matrix is None:
        return kernel_fn(data_normalizer * data) + kernel_epsilon
    data_dash = torch.einsum("...id,...jd->...ij", (data_normalizer * data), projection_matrix)
    return kernel_fn(data_dash) + kernel_epsilon


def linear_attention(q, k, v, near_miss=None):
    k_cumsum = k.sum(dim=-2)
    if near_miss == "normaliser_axis":
        k_cumsum = k.sum(dim=-1, keepdim=True).expand_as(k)[..., 0, :]  # sums features, not keys
    D_inv = 1.0 / torch.einsum("...nd,...d->...n", q, k_cumsum.type_as(q))
    context = torch.einsum("...nd,...ne->...de", k, v)
    return torch.einsum("...de,...nd,...n->...ne", context, q, D_inv)


def linear_attention_matmul(q, k, v):
    k_cumsum = k.sum(dim=-2, keepdim=True)
    D_inv = 1.0 / (q @ k_cumsum.transpose(-1, -2))
    context = k.transpose(-1, -2) @ v
    return (q @ context) * D_inv


def causal_linear_attention_noncuda(q, k, v, chunk_size=None, eps=1e-6):
    if chunk_size is None:
        k_cumsum = k.cumsum(dim=-2)
        D_inv = 1.0 / torch.einsum("...nd,...nd->...n", q, k_cumsum.type_as(q))
        context = torch.einsum("...nd,...ne->...nde", k, v)
        context = context.cumsum(dim=-3)
        return torch.einsum("...nde,...nd,...n->...ne", context, q, D_inv)
    # performer-pytorch's chunked form: each chunk continues the previous chunk's prefix sums.
    last_k_cumsum = 0
    last_context_cumsum = 0
    outs = []
    for q_, k_, v_ in zip(*map(lambda t: t.chunk(chunk_size, dim=-2), (q, k, v))):
        k_cumsum = last_k_cumsum + k_.cumsum(dim=-2)
        D_inv = 1.0 / torch.einsum("...nd,...nd->...n", q_, k_cumsum.type_as(q_) + eps)
        context = torch.einsum("...nd,...ne->...nde", k_, v_)
        context_cumsum = last_context_cumsum + context.cumsum(dim=-3)
        out = torch.einsum("...nde,...nd,...n->...ne", context_cumsum, q_, D_inv)
        last_k_cumsum = k_cumsum[:, :, -1:]
        last_context_cumsum = context_cumsum[:, :, -1:]
        outs.append(out)
    return torch.cat(outs, dim=-2)


class FastAttention(nn.Module):
    """performer-pytorch FastAttention on (batch, heads, length, dim_head) q, k, v."""

    def __init__(self, dim_heads, nb_features=None, causal=False, generalized_attention=False,
                 kernel_fn=nn.ReLU(), no_projection=False, chunk_size=None, near_miss=None, variant=None, seed=0,
                 learned_projection=False, chunk_eps=1e-6):
        super().__init__()
        nb_features = nb_features or int(dim_heads * math.log(dim_heads))
        self.dim_heads, self.nb_features = dim_heads, nb_features
        self.causal, self.chunk_size, self.chunk_eps, self.near_miss = causal, chunk_size, chunk_eps, near_miss
        self.variant = variant
        self.generalized_attention, self.kernel_fn, self.no_projection = generalized_attention, kernel_fn, no_projection
        self.generator = torch.Generator().manual_seed(seed)
        projection = gaussian_orthogonal_random_matrix(nb_features, dim_heads, self.generator)
        if learned_projection:
            self.projection_matrix = nn.Parameter(projection)
        else:
            self.register_buffer("projection_matrix", projection)

    @torch.no_grad()
    def redraw_projection_matrix(self):
        self.projection_matrix.copy_(gaussian_orthogonal_random_matrix(self.nb_features, self.dim_heads, self.generator))

    def forward(self, q, k, v, projection=None):
        projection = self.projection_matrix if projection is None else projection
        if self.no_projection:
            q, k = q.softmax(dim=-1), k.softmax(dim=-2)
        elif self.generalized_attention:
            proj = None if self.near_miss == "no_projection" else projection
            q = generalized_kernel(q, projection_matrix=proj, kernel_fn=self.kernel_fn)
            k = generalized_kernel(k, projection_matrix=proj, kernel_fn=self.kernel_fn)
        else:
            q = softmax_kernel(q, projection_matrix=projection, is_query=True)
            k = softmax_kernel(k, projection_matrix=projection, is_query=False, near_miss=self.near_miss)
        if self.causal:
            return causal_linear_attention_noncuda(q, k, v, self.chunk_size, self.chunk_eps)
        if self.variant == "matmul":
            return linear_attention_matmul(q, k, v)
        return linear_attention(q, k, v, self.near_miss)


class FeaturesReused(nn.Module):
    """Near-miss: φ(k) is also returned, so replacing the block would drop a value the model still needs."""

    def __init__(self):
        super().__init__()
        self.attn = FastAttention(8, nb_features=12)

    def forward(self, q, k, v):
        proj = self.attn.projection_matrix
        phi_q = softmax_kernel(q, projection_matrix=proj, is_query=True)
        phi_k = softmax_kernel(k, projection_matrix=proj, is_query=False)
        return linear_attention(phi_q, phi_k, v), phi_k.sum()


class SwappedBatchAxes(nn.Module):
    """Near-miss: the context pairs φ(k) of head h, batch b with v of batch h, head b: not attention per head."""

    def forward(self, q, k, v):
        q, k = (torch.relu(t) + 1e-3 for t in (q, k))
        d_inv = 1.0 / torch.einsum("...nd,...d->...n", q, k.sum(dim=-2))
        context = torch.einsum("hbnd,bhne->bhde", k, v)
        return torch.einsum("...de,...nd,...n->...ne", context, q, d_inv)


class _Block(nn.Module):
    def __init__(self, dim, heads, **attention):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.to_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim)
        self.attn = FastAttention(dim // heads, **attention)
        self.ff = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.to_qkv(self.norm(x)).chunk(3, dim=-1)
        q, k, v = (t.reshape(b, n, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        out = self.attn(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + self.to_out(out)
        return x + self.ff(x)


class PerformerEncoder(nn.Module):
    """Bidirectional Performer encoder over (batch, length, dim) inputs."""

    def __init__(self, dim=32, depth=2, heads=2, feature_redraw_interval=1000, **attention):
        super().__init__()
        self.layers = nn.ModuleList(_Block(dim, heads, seed=i, **attention) for i in range(depth))
        self.feature_redraw_interval = feature_redraw_interval
        self.register_buffer("calls_since_last_redraw", torch.tensor(0), persistent=False)

    def _redraw_projections(self):
        """performer-pytorch's ProjectionUpdater: new random features every N calls, in training only."""
        if not self.training:
            return
        if int(self.calls_since_last_redraw) >= self.feature_redraw_interval:
            for module in self.modules():
                if isinstance(module, FastAttention):
                    module.redraw_projection_matrix()
            self.calls_since_last_redraw.zero_()
            return
        self.calls_since_last_redraw += 1

    def forward(self, x):
        self._redraw_projections()
        for layer in self.layers:
            x = layer(x)
        return x


class PerformerLM(nn.Module):
    """A small causal Performer language model."""

    def __init__(self, vocab=50, dim=32, depth=2, heads=2, max_len=128, **attention):
        super().__init__()
        self.embed, self.pos = nn.Embedding(vocab, dim), nn.Embedding(max_len, dim)
        self.encoder = PerformerEncoder(dim, depth, heads, causal=True, **attention)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens):
        x = self.embed(tokens) + self.pos(torch.arange(tokens.shape[1], device=tokens.device))
        return self.head(self.encoder(x))
