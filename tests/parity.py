"""Shared checks: run a module eagerly and after `optimize_module`, compare outputs and gradients."""

from __future__ import annotations

import math

import torch

import rewriter
import rewriter.kernels.attention_op  # noqa: F401  (registers torch.ops.rewriter.attention; `import rewriter` is lazy)

ATTENTION_OP = torch.ops.rewriter.attention.default


def naive_attention(q, k, v, bias, mask, opts):
    """softmax(scale · q kᵀ [soft-capped] + bias, masked, causal) v in fp32, on the inputs' device; `opts` a
    `ScoreOptions`; K/V heads repeated to the query heads."""
    groups = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = q.float() @ k.float().transpose(-1, -2) * opts.scale
    if opts.softcap:
        scores = torch.tanh(scores / opts.softcap) * opts.softcap
    if bias is not None:
        scores = scores + bias
    if mask is not None:
        scores = scores.masked_fill(~mask, opts.mask_fill)
    if opts.causal:
        keep = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).tril(opts.causal_offset)
        scores = scores.masked_fill(~keep, -math.inf)
    return (torch.softmax(scores, -1) @ v.float()).to(q.dtype)


def run_op(q, k, v, bias, mask, opts, leaves=(), bias_program="", mask_program="", fill_program=""):
    """`rewriter::attention`'s output for `opts` (a `ScoreOptions`) and the programs' JSON over `leaves`."""
    out, _ = torch.ops.rewriter.attention(
        q, k, v, bias, mask, list(leaves), opts.scale, opts.softcap, opts.mask_fill, opts.causal, opts.causal_offset,
        opts.q_chunk, opts.k_chunk, opts.zero_masked_rows, bias_program, mask_program, fill_program,
    )
    return out


def op_count(gm: torch.fx.GraphModule) -> int:
    return sum(node.target is ATTENTION_OP for node in gm.graph.nodes)


def _is_float(x) -> bool:
    return isinstance(x, torch.Tensor) and x.is_floating_point()


def _outputs(result) -> list[torch.Tensor]:
    return list(result) if isinstance(result, (tuple, list)) else [result]


def assert_gradients_close(actual, expected, atol=1e-4, rtol=1e-4) -> None:
    """Gradient by gradient; where eager has none, the rewrite has none or zeros."""
    for index, (want, got) in enumerate(zip(expected, actual)):
        if want is None:
            assert got is None or not got.any(), f"input {index}: gradient where eager has none"
        else:
            torch.testing.assert_close(got, want, atol=atol, rtol=rtol, msg=lambda m, i=index: f"input {i}: {m}")


def assert_parity(module, inputs, *, rewrites: int, atol=1e-5, rtol=1e-4, grad_atol=1e-4, grads=True, **options):
    """Rewrite `module`, check `rewrites` blocks were replaced, and outputs and the gradients of
    the inputs and of every parameter (by name) agree.

    Captured at the example's shapes unless `dynamic_shapes` says otherwise: these checks are about
    the rewrite at the shapes given (tests/test_dynamic_lengths.py covers optimize_module's default).
    """
    options.setdefault("dynamic_shapes", None)
    module = module.eval()
    gm, report = rewriter.optimize_module(module, tuple(inputs), **options)
    assert report.rewritten_count == rewrites, report.summary()
    assert op_count(gm) == rewrites, gm.graph
    def run(fn):
        leaves = [x.detach().clone().requires_grad_(grads) if _is_float(x) else x for x in inputs]
        outs = _outputs(fn(*leaves))
        if not grads:
            return outs, []
        weights = [torch.randn(o.shape, generator=torch.Generator().manual_seed(i), dtype=o.dtype).to(o.device)
                   for i, o in enumerate(outs)]
        loss = sum((o * w).sum() for o, w in zip(outs, weights))
        differentiable = [x for x in leaves if isinstance(x, torch.Tensor) and x.requires_grad]
        parameters = [p for _, p in sorted(fn.named_parameters()) if p.requires_grad]
        return outs, torch.autograd.grad(loss, differentiable + parameters, allow_unused=True)

    with torch.set_grad_enabled(grads):
        expected, expected_grads = run(module)
        actual, actual_grads = run(gm)
    for want, got in zip(expected, actual):
        torch.testing.assert_close(got, want, atol=atol, rtol=rtol, equal_nan=True)
    for want, got in zip(expected_grads, actual_grads):
        if want is None:
            assert got is None or not got.abs().any()
        else:
            torch.testing.assert_close(got, want, atol=grad_atol, rtol=rtol, equal_nan=True)
    return gm, report


def assert_module_parity(model, gm, inputs, atol=1e-5, grad_atol=1e-4) -> int:
    """`gm` against `model`: outputs, input grads and parameter grads; returns how many parameters had grads."""
    eager_in = [x.clone().requires_grad_(x.is_floating_point()) for x in inputs]
    graph_in = [x.clone().requires_grad_(x.is_floating_point()) for x in inputs]
    expected, actual = model(*eager_in), gm(*graph_in)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=1e-4)
    grad = torch.randn_like(expected)
    (expected * grad).sum().backward()
    (actual * grad).sum().backward()
    for want, got in zip(eager_in, graph_in):
        if want.grad is not None:
            torch.testing.assert_close(got.grad, want.grad, atol=grad_atol, rtol=1e-4)
    graph_params = dict(gm.named_parameters())
    checked = 0
    for name, param in model.named_parameters():
        if param.grad is not None:
            torch.testing.assert_close(graph_params[name].grad, param.grad, atol=grad_atol, rtol=1e-4, msg=name)
            checked += 1
    return checked
