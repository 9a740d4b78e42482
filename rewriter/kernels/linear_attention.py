"""Exact linear (Performer / FAVOR+) attention in slices of the sequence, forward and backward.

Per batch · head, with a feature map φ applied row-wise to queries and keys:

    bidirectional  out_i = φ(q_i)ᵀ·Σ_j φ(k_j)v_jᵀ / (φ(q_i)ᵀ·(Σ_j φ(k_j) + key_sum_epsilon) + normalizer_epsilon)
    causal         the same with the sums over j ≤ i

`key_sum_epsilon` is the ε that performer-pytorch's causal paths add to every prefix-summed
feature (`k_cumsum + eps`): φ(q)·(Σφ(k) + ε) = φ(q)·Σφ(k) + ε·Σφ(q). It enters as the starting
value of the state's normaliser column, so forward and backward stay exact with no extra term.

Feature maps (x scaled by `data_scale` c first; Ω the (M, D) projection):

    favor_softmax  M^-½·(exp(c·x·Ωᵀ − ‖x‖²·c²/2 − stab) + ε), stab = the row max of c·x·Ωᵀ for
                   queries and its max over all positions and features of a (batch, kv head) for
                   keys (performer-pytorch `softmax_kernel`); `stabilizer_grad` says whether
                   gradients flow through the max (as `torch.amax` does) or not (the `.detach()`
                   of current performer-pytorch)
    relu           relu(c·x·Ωᵀ) + ε, or relu(c·x) + ε without Ω (performer-pytorch `generalized_kernel`)
    elu_plus_one   elu(c·x·Ωᵀ) + 1 + ε, or elu(c·x) + 1 + ε (Katharopoulos et al.)
    identity       c·x·Ωᵀ + ε, or c·x + ε: q and k are already features the model computed itself
                   (performer-pytorch `no_projection`: softmax over the head dim for q, exp or
                   softmax over the keys for k; each is L × D, no larger than q and k)

φ(Q), φ(K) are formed one slice of `slice_size` positions at a time; what crosses slices is the
state (Σφ(k)vᵀ | Σφ(k)) of shape (M, Dv + 1): v gets a column of ones so that numerator and
denominator come out of one product. Causal slices add their own keys through a masked
(slice × slice) product, so nothing of size L × M × Dv is ever formed (SLiM, Likhosherstov et al.).

The causal backward walks the slices in reverse, carrying the gradient of the state. It needs the
state at the start of each slice; by default (`state_recovery="checkpoint"`) one forward pass over
the keys keeps it at every s-th slice boundary (s ≈ √(L / slice_size)), and the states inside a
segment of s slices are recomputed from its first when the reverse walk reaches it: about
2·√(L / slice_size)·M·(Dv + 1) floats per kv head (at L = 16384, slice 256: 16 states instead of
64), for one more pass over the keys. The states are the same numbers as those of one running sum
(same additions in the same order), and the forward never holds them (so inference memory stays
flat in L). Nor does the backward need the output: it recomputes each slice's numerator and
normaliser (exactly as the forward did) instead of saving the (B, H, L, Dv) output. The alternative, subtracting each
slice's contribution from the final state (`"subtract"`, O(M·Dv) memory), cancels catastrophically
for early slices: the final state is ~L/l times larger than the state at position l. Measured in
fp32 against float64 (FAVOR+, D = Dv = 64, M = 256, slice 64, one head; max error relative to the
largest gradient entry), checkpoint vs subtract:

    L = 1024   dq 2.7e-6 vs 5.4e-5   dv 6.0e-7 vs 6.9e-6   dprojection 8.1e-7 vs 1.0e-5
    L = 4096   dq 1.5e-6 vs 3.4e-4   dv 1.7e-7 vs 1.2e-5   dprojection 1.6e-6 vs 1.5e-4
    L = 16384  dq 2.2e-6 vs 2.6e-3   dv 2.6e-7 vs 2.5e-4   dprojection 3.2e-6 vs 8.2e-4

(dk is the same for both: it needs only the carried gradient.) The checkpoint pass costs one more
φ(K) and φ(K)ᵀV per slice; `tests/test_linear_attention_op.py` repeats a small version of this
comparison.

Layouts: q (B, H, Lq, D); k (B, Hkv, Lk, D); v (B, Hkv, Lk, Dv) with H a multiple of Hkv (query
head h reads kv head h // (H / Hkv)); causal needs Lq = Lk. Arithmetic is in fp32 (or float64).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from rewriter.kernels import FEATURE_MAPS

__all__ = ["FEATURE_MAPS", "FeatureMap", "LinearOptions", "linear_attention_forward", "linear_attention_backward"]


@dataclasses.dataclass(frozen=True)
class FeatureMap:
    kind: str
    data_scale: float = 1.0
    epsilon: float = 0.0
    stabilizer_grad: bool = False

    def __post_init__(self):
        if self.kind not in FEATURE_MAPS:
            raise ValueError(f"feature map {self.kind!r} is not one of {', '.join(FEATURE_MAPS)}")


@dataclasses.dataclass(frozen=True)
class LinearOptions:
    feature_map: FeatureMap
    causal: bool = False
    normalizer_epsilon: float = 0.0
    slice_size: int = 128
    key_sum_epsilon: float = 0.0


def _initial_state(shape, dtype, device, opts: LinearOptions) -> torch.Tensor:
    """The state before any key: zeros, with `key_sum_epsilon` in the normaliser column."""
    state = torch.zeros(shape, dtype=dtype, device=device)
    state[..., -1] = opts.key_sum_epsilon
    return state


# --------------------------------------------------------------------------- feature maps


def _features(x, projection, fmap: FeatureMap, key_max=None, for_backward=False):
    """φ(x) of one slice (rows of x), and with `for_backward` what `_features_vjp` needs.

    `key_max` (.., 1, 1) is the FAVOR+ key stabiliser; without it x are queries (row max).
    The pre-activation is overwritten in place unless the backward needs it (the ReLU and ELU
    masks, the FAVOR+ stabiliser's argmax when its gradient flows): one slice × M buffer less.
    """
    a = x * fmap.data_scale
    if projection is not None:
        a = torch.matmul(a, projection.transpose(0, 1))
    keep_pre = for_backward and (fmap.kind in ("relu", "elu_plus_one") or fmap.stabilizer_grad)
    pre = a.clone() if keep_pre else a
    if fmap.kind == "favor_softmax":
        diag = (x * x).sum(-1, keepdim=True) / 2.0 * fmap.data_scale**2
        stab = a.amax(-1, keepdim=True) if key_max is None else key_max
        e = pre.sub_(diag).sub_(stab).exp_()
        phi = (e + fmap.epsilon if for_backward else e.add_(fmap.epsilon)).mul_(e.size(-1) ** -0.5)
        return phi, (a if keep_pre else None, e, stab)
    if fmap.kind == "relu":
        return torch.relu_(pre).add_(fmap.epsilon), (a,)
    if fmap.kind == "identity":
        return pre.add_(fmap.epsilon), ()
    return F.elu(pre, inplace=True).add_(1.0).add_(fmap.epsilon), (a,)


def _features_vjp(grad_phi, x, projection, fmap: FeatureMap, saved, is_query: bool, want_projection: bool):
    """(grad of x, grad of the projection or None, grad of the key stabiliser per row or None).

    `grad_phi` is a temporary of the caller's and is overwritten (the FAVOR+ and ReLU maps scale it
    in place, in the order the out-of-place products would).
    """
    c, grad_x, grad_key_max = fmap.data_scale, None, None
    if fmap.kind == "favor_softmax":
        a, e, stab = saved
        grad_a = grad_phi.mul_(e).mul_(e.size(-1) ** -0.5)
        grad_diag = -grad_a.sum(-1, keepdim=True)  # also the gradient of the stabiliser
        if fmap.stabilizer_grad and is_query:
            ties = (a == stab).to(a.dtype)  # amax shares its gradient evenly among ties
            grad_a = grad_a + ties * (grad_diag / ties.sum(-1, keepdim=True))
        elif fmap.stabilizer_grad:
            grad_key_max = grad_diag.squeeze(-1)
        grad_x = grad_diag * (c * c) * x
    elif fmap.kind == "relu":
        grad_a = grad_phi.mul_(saved[0] > 0)
    elif fmap.kind == "identity":
        grad_a = grad_phi
    else:
        grad_a = torch.where(saved[0] > 0, grad_phi, grad_phi * torch.exp(saved[0]))
    grad_in = c * (grad_a if projection is None else torch.matmul(grad_a, projection))
    grad_x = grad_in if grad_x is None else grad_x + grad_in
    grad_projection = None
    if want_projection and projection is not None:
        grad_projection = c * torch.matmul(grad_a.flatten(0, -2).transpose(0, 1), x.flatten(0, -2))
    return grad_x, grad_projection, grad_key_max


def _key_max(k, projection, fmap: FeatureMap, slice_size: int, dtype) -> torch.Tensor:
    """FAVOR+ key stabiliser (B, Hkv): max of c·k·Ωᵀ over positions and features; zeros otherwise."""
    result = torch.zeros(k.shape[:2], dtype=dtype, device=k.device)
    if fmap.kind != "favor_softmax":
        return result
    result.fill_(-torch.inf)
    for l0, l1 in _slices(k.size(2), slice_size):
        a = torch.matmul(k[:, :, l0:l1].to(dtype) * fmap.data_scale, projection.transpose(0, 1))
        result = torch.maximum(result, a.amax((-1, -2)))
    return result


# --------------------------------------------------------------------------- slices and layout


def _slices(length: int, size: int) -> list[tuple[int, int]]:
    return [(start, min(start + size, length)) for start in range(0, length, size)]


class _Layout:
    """Grouped views: query slices as (B, Hkv, G·n, ·) rows against (B, Hkv, ·, ·) kv state."""

    def __init__(self, q, k, v, projection):
        self.dtype = torch.promote_types(q.dtype, torch.float32)
        self.kv_heads, self.groups = k.size(1), q.size(1) // k.size(1)
        self.q, self.k, self.v = q, k, v
        self.qg = q.unflatten(1, (self.kv_heads, self.groups))
        self.projection = None if projection is None else projection.to(self.dtype)
        self.features = k.size(-1) if projection is None else projection.size(0)
        self._drop: dict[int, torch.Tensor] = {}

    def query(self, t, l0, l1):
        """Rows l0:l1 of a (B, H, L, ·) tensor in grouped form (B, Hkv, G·n, ·), compute dtype."""
        t = t.unflatten(1, (self.kv_heads, self.groups))[:, :, :, l0:l1]
        return t.to(self.dtype).flatten(2, 3)

    def keys(self, l0, l1):
        """k rows l0:l1 and v rows with a column of ones appended."""
        k, v = self.k[:, :, l0:l1].to(self.dtype), self.v[:, :, l0:l1].to(self.dtype)
        return k, torch.cat([v, torch.ones_like(v[..., :1])], -1)

    def ungroup(self, rows, n):
        """(B, Hkv, G·n, ·) → (B, Hkv, G, n, ·)."""
        return rows.unflatten(2, (self.groups, n))

    def causal_drop(self, n):
        """Which (query row, key) pairs of a diagonal slice are dropped: key > query, per group."""
        if n not in self._drop:
            upper = torch.ones(n, n, dtype=torch.bool, device=self.k.device).triu(1)
            self._drop[n] = upper.repeat(self.groups, 1)
        return self._drop[n]


def _output_grad(grad_out, num, normalizer_epsilon):
    """Gradient of the augmented numerator (num | den) from that of out = num / (den + ε)."""
    den = num[..., -1:] + normalizer_epsilon
    grad_num = grad_out / den
    return torch.cat([grad_num, -(grad_num * (num[..., :-1] / den)).sum(-1, keepdim=True)], -1)


# --------------------------------------------------------------------------- forward


def linear_attention_forward(q, k, v, projection, opts: LinearOptions):
    """(out (B, H, Lq, Dv) in q's dtype, final state (B, Hkv, M, Dv + 1), key stabiliser (B, Hkv)).

    The state's last column is Σφ(k) + key_sum_epsilon.
    """
    lay, fmap = _Layout(q, k, v, projection), opts.feature_map
    key_max = _key_max(k, lay.projection, fmap, opts.slice_size, lay.dtype)
    key_max_b = key_max[..., None, None]
    state = _initial_state(k.shape[:2] + (lay.features, v.size(-1) + 1), lay.dtype, q.device, opts)
    out = torch.empty(lay.qg.shape[:-1] + (v.size(-1),), dtype=q.dtype, device=q.device)
    if not opts.causal:
        for l0, l1 in _slices(k.size(2), opts.slice_size):
            kb, vb = lay.keys(l0, l1)
            phi_k, _ = _features(kb, lay.projection, fmap, key_max_b)
            state += torch.matmul(phi_k.transpose(-1, -2), vb)
    for l0, l1 in _slices(q.size(2), opts.slice_size):
        phi_q, _ = _features(lay.query(q, l0, l1), lay.projection, fmap)
        num = torch.matmul(phi_q, state)
        if opts.causal:
            kb, vb = lay.keys(l0, l1)
            phi_k, _ = _features(kb, lay.projection, fmap, key_max_b)
            scores = torch.matmul(phi_q, phi_k.transpose(-1, -2)).masked_fill_(lay.causal_drop(l1 - l0), 0.0)
            num += torch.matmul(scores, vb)
            state += torch.matmul(phi_k.transpose(-1, -2), vb)
        rows = num[..., :-1] / (num[..., -1:] + opts.normalizer_epsilon)
        out[:, :, :, l0:l1] = lay.ungroup(rows, l1 - l0)
    return out.flatten(1, 2), state, key_max


# --------------------------------------------------------------------------- backward


class _Grads:
    """Gradient buffers, and the FAVOR+ key-stabiliser gradient routed to its argmax at the end."""

    def __init__(self, lay: _Layout, q, k, v, want_projection: bool):
        self.lay, self.want_projection = lay, want_projection
        # Not zeroed: every slice writes its rows (the key stabiliser's gradient is added after).
        self.dq = torch.empty(lay.qg.shape, dtype=lay.dtype, device=q.device)
        self.dk = torch.empty(k.shape, dtype=lay.dtype, device=q.device)
        self.dv = torch.empty(v.shape, dtype=lay.dtype, device=q.device)
        self.dprojection = None
        if want_projection and lay.projection is not None:
            self.dprojection = torch.zeros(lay.projection.shape, dtype=lay.dtype, device=q.device)
        self.dkey_max = torch.zeros(k.shape[:2], dtype=lay.dtype, device=q.device)
        self.argmax: list[torch.Tensor] = []  # (b, h, position, feature) of key-stabiliser ties

    def _add_projection(self, grad):
        if grad is not None:
            self.dprojection += grad

    def query(self, grad_phi, qb, saved, fmap, l0, l1):
        grad_x, grad_p, _ = _features_vjp(grad_phi, qb, self.lay.projection, fmap, saved, True, self.want_projection)
        self.dq[:, :, :, l0:l1] = self.lay.ungroup(grad_x, l1 - l0)
        self._add_projection(grad_p)

    def key(self, grad_phi, kb, saved, fmap, key_max, l0, l1):
        grad_x, grad_p, grad_key_max = _features_vjp(
            grad_phi, kb, self.lay.projection, fmap, saved, False, self.want_projection
        )
        self.dk[:, :, l0:l1] = grad_x
        self._add_projection(grad_p)
        if grad_key_max is not None:
            self.dkey_max += grad_key_max.sum(-1)
            position = (saved[0] == key_max[..., None, None]).nonzero()
            self.argmax.append(position + torch.tensor([0, 0, l0, 0], device=position.device))

    def finish(self, fmap: FeatureMap, q, k, v, projection):
        if self.argmax:
            self._route_key_max(fmap)
        dprojection = None if self.dprojection is None else self.dprojection.to(projection.dtype)
        return self.dq.flatten(1, 2).to(q.dtype), self.dk.to(k.dtype), self.dv.to(v.dtype), dprojection

    def _route_key_max(self, fmap: FeatureMap):
        """stab = c·k[j*]·Ω[m*] at its argmax (j*, m*); ties share the gradient like amax."""
        b, h, j, m = torch.cat(self.argmax).unbind(1)
        count = torch.zeros_like(self.dkey_max).index_put_((b, h), torch.ones_like(b, dtype=self.dkey_max.dtype),
                                                            accumulate=True)
        if bool((count == 0).any()):
            raise RuntimeError("rewriter::linear_attention: key stabiliser position not found in the backward")
        weight = (fmap.data_scale * self.dkey_max[b, h] / count[b, h]).unsqueeze(-1)
        self.dk.index_put_((b, h, j), weight * self.lay.projection[m], accumulate=True)
        if self.dprojection is not None:
            self.dprojection.index_put_((m,), weight * self.lay.k[b, h, j].to(self.lay.dtype), accumulate=True)


def linear_attention_backward(grad_out, q, k, v, projection, state, key_max, opts: LinearOptions,
                              want_projection: bool, state_recovery: str = "checkpoint"):
    """(dq, dk, dv, dprojection or None), recomputing φ slice by slice; see the module docstring."""
    lay = _Layout(q, k, v, projection)
    grads = _Grads(lay, q, k, v, want_projection)
    key_max = key_max.to(lay.dtype)
    if opts.causal:
        _causal_backward(lay, grads, grad_out, state.to(lay.dtype), key_max, opts, state_recovery)
    else:
        _bidirectional_backward(lay, grads, grad_out, state.to(lay.dtype), key_max, opts)
    return grads.finish(opts.feature_map, q, k, v, projection)


def _bidirectional_backward(lay, grads, grad_out, state, key_max, opts: LinearOptions):
    fmap, grad_state = opts.feature_map, torch.zeros_like(state)
    for l0, l1 in _slices(lay.qg.size(3), opts.slice_size):
        qb = lay.query(lay.q, l0, l1)
        phi_q, saved = _features(qb, lay.projection, fmap, for_backward=True)
        grad_num = _output_grad(lay.query(grad_out, l0, l1), torch.matmul(phi_q, state), opts.normalizer_epsilon)
        grad_state += torch.matmul(phi_q.transpose(-1, -2), grad_num)
        grads.query(torch.matmul(grad_num, state.transpose(-1, -2)), qb, saved, fmap, l0, l1)
    for l0, l1 in _slices(lay.k.size(2), opts.slice_size):
        kb, vb = lay.keys(l0, l1)
        phi_k, saved = _features(kb, lay.projection, fmap, key_max[..., None, None], True)
        grads.dv[:, :, l0:l1] = torch.matmul(phi_k, grad_state[..., :-1])
        grads.key(torch.matmul(vb, grad_state.transpose(-1, -2)), kb, saved, fmap, key_max, l0, l1)


def _contribution(lay, key_max, opts: LinearOptions, l0, l1):
    """φ(k)ᵀ·(v | 1) of keys l0:l1: what slice l0:l1 adds to the state."""
    kb, vb = lay.keys(l0, l1)
    phi_k, _ = _features(kb, lay.projection, opts.feature_map, key_max[..., None, None])
    return torch.matmul(phi_k.transpose(-1, -2), vb)


def _checkpointed_starts(lay, state, key_max, opts: LinearOptions, slices):
    """(index, state before slice `index`), last slice first, from segment checkpoints.

    One pass over the keys keeps the running state at every `stride`-th slice (and all states of
    the last segment); each earlier segment's states are recomputed from its checkpoint when the
    walk reaches it. Every state is the same running sum, added in the same order.
    """
    count = len(slices)
    stride = math.isqrt(max(count - 1, 0)) + 1
    last_first = (count - 1) // stride * stride
    segments, running = [], _initial_state(state.shape, state.dtype, state.device, opts)
    for index in range(count):
        if index % stride == 0:
            segments.append([running])
        elif index >= last_first:
            segments[-1].append(running)
        if index + 1 < count:
            running = running + _contribution(lay, key_max, opts, *slices[index])
    while segments:
        states, first = segments.pop(), len(segments) * stride
        while len(states) < min(stride, count - first):
            states.append(states[-1] + _contribution(lay, key_max, opts, *slices[first + len(states) - 1]))
        while states:
            yield first + len(states) - 1, states.pop()


def _subtracted_starts(lay, state, key_max, opts: LinearOptions, slices):
    """(index, state before slice `index`), last slice first, subtracting from the final state."""
    running = state
    for index in reversed(range(len(slices))):
        running = running - _contribution(lay, key_max, opts, *slices[index])
        yield index, running


_STATE_RECOVERY = {"checkpoint": _checkpointed_starts, "subtract": _subtracted_starts}


def _causal_backward(lay, grads, grad_out, state, key_max, opts: LinearOptions, state_recovery: str):
    if state_recovery not in _STATE_RECOVERY:
        raise ValueError(f"state_recovery {state_recovery!r} is not 'checkpoint' or 'subtract'")
    fmap, slices = opts.feature_map, _slices(lay.k.size(2), opts.slice_size)
    grad_state = torch.zeros_like(state)
    for index, start in _STATE_RECOVERY[state_recovery](lay, state, key_max, opts, slices):
        l0, l1 = slices[index]
        qb, (kb, vb) = lay.query(lay.q, l0, l1), lay.keys(l0, l1)
        phi_q, saved_q = _features(qb, lay.projection, fmap, for_backward=True)
        phi_k, saved_k = _features(kb, lay.projection, fmap, key_max[..., None, None], True)
        drop = lay.causal_drop(l1 - l0)
        scores = torch.matmul(phi_q, phi_k.transpose(-1, -2)).masked_fill_(drop, 0.0)
        num = torch.matmul(phi_q, start)
        num += torch.matmul(scores, vb)  # as in the forward, so the recomputed output is the forward's
        grad_num = _output_grad(lay.query(grad_out, l0, l1), num, opts.normalizer_epsilon)
        del num
        # Sums of two products accumulate in place (the same additions, one slice buffer fewer), and
        # each slice temporary is dropped once read, so that a slice holds few buffers at a time.
        grad_scores = torch.matmul(grad_num, vb.transpose(-1, -2)).masked_fill_(drop, 0.0)
        grad_v = torch.matmul(scores.transpose(-1, -2), grad_num)
        grad_v += torch.matmul(phi_k, grad_state)
        grads.dv[:, :, l0:l1] = grad_v[..., :-1]
        del grad_v, scores
        grad_phi_q = torch.matmul(grad_num, start.transpose(-1, -2))
        grad_phi_q += torch.matmul(grad_scores, phi_k)
        del phi_k
        grads.query(grad_phi_q, qb, saved_q, fmap, l0, l1)
        del grad_phi_q, saved_q
        grad_phi_k = torch.matmul(grad_scores.transpose(-1, -2), phi_q)
        grad_phi_k += torch.matmul(vb, grad_state.transpose(-1, -2))
        del grad_scores
        grad_state += torch.matmul(phi_q.transpose(-1, -2), grad_num)
        del phi_q
        grads.key(grad_phi_k, kb, saved_k, fmap, key_max, l0, l1)
