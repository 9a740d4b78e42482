"""Masks and biases of real models recovered as score programs by the FX front end.

`transformers` models built from configs (random weights, tiny sizes, batch 2; batch row 1 has
leading padded keys, so in causal models its first rows see no key at all), optimised with the
dynamic default: outputs (NaN pattern included) and gradients equal eager at the example length
and at another one, the op receives programs over O(n) leaves instead of an n×n mask or bias, and
nothing n×n is computed in the rewritten graph. Near-misses keep a dense operand and stay exact.
"""

import math

import pytest
import torch
import torch.nn.functional as F
import transformers

import rewriter
import rewriter.compile_backend  # noqa: F401  (registers the "rewriter" backend)
from parity import assert_gradients_close
from rewriter.kernels.score_program import parse

ATTENTION_OP = torch.ops.rewriter.attention.default
BATCH, LENGTH, OTHER_LENGTH, PADDED = 2, 12, 19, 4
SMALL = dict(num_hidden_layers=2, vocab_size=100)
DECODER = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, use_cache=False)


def _hf_model(family: str, implementation: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "llama":
        model = transformers.LlamaModel(transformers.LlamaConfig(
            **DECODER, **SMALL, attn_implementation=implementation))
    elif family == "mistral":
        model = transformers.MistralModel(transformers.MistralConfig(
            **DECODER, **SMALL, sliding_window=5, attn_implementation=implementation))
    elif family == "bert":
        model = transformers.BertModel(transformers.BertConfig(
            hidden_size=64, intermediate_size=128, num_attention_heads=4, **SMALL, attn_implementation=implementation))
    elif family == "gpt2":
        model = transformers.GPT2Model(transformers.GPT2Config(
            n_embd=64, n_head=4, n_layer=2, vocab_size=100, bos_token_id=0, eos_token_id=0, use_cache=False,
            attn_implementation=implementation))
    elif family == "bloom":  # ALiBi on merged (batch·heads) scores, viewed to (B, H, L, L) around the mask
        model = transformers.BloomModel(transformers.BloomConfig(
            hidden_size=64, n_head=4, n_layer=2, vocab_size=100, use_cache=False, attn_implementation=implementation))
    else:
        model = transformers.T5EncoderModel(transformers.T5Config(
            d_model=64, d_ff=128, num_heads=4, d_kv=16, num_layers=2, vocab_size=100, use_cache=False))
    return model.eval()


def _tokens(length: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(length)
    ids = torch.randint(0, 100, (BATCH, length), generator=generator)
    attention_mask = torch.ones(BATCH, length, dtype=torch.long)
    attention_mask[1, :PADDED] = 0
    return ids, attention_mask


def _hidden(output) -> torch.Tensor:
    if isinstance(output, (tuple, list)):
        output = output[0]
    return output.last_hidden_state if hasattr(output, "last_hidden_state") else output


def _loss(output: torch.Tensor) -> torch.Tensor:
    return (output.nan_to_num() * torch.linspace(-1, 1, output.shape[-1])).sum()


def _assert_parity(run_eager, run_rewritten, wrt) -> None:
    """Forward (NaN pattern included) and the gradients with respect to `wrt`."""
    want, got = run_eager(), run_rewritten()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4, equal_nan=True)
    assert_gradients_close(torch.autograd.grad(_loss(got), wrt, allow_unused=True),
                           torch.autograd.grad(_loss(want), wrt, allow_unused=True))


def _is_sequence_axis(size, length: int) -> bool:
    """A symbolic size whose example value is the example length, or that static length."""
    if isinstance(size, torch.SymInt):
        return size.node.hint is not None and size.node.hint >= length and len(size.node.expr.free_symbols) == 1
    return size == length


def _is_n_by_n(node: torch.fx.Node, length: int) -> bool:
    value = node.meta.get("val")
    return isinstance(value, torch.Tensor) and sum(_is_sequence_axis(size, length) for size in value.shape) >= 2


def n_by_n_nodes(gm: torch.fx.GraphModule, length: int) -> list[str]:
    """Computed nodes whose value has two sequence axes (of the example `length`, unique among the sizes)."""
    return [f"{node.name} {tuple(node.meta['val'].shape)}" for node in gm.graph.nodes
            if node.op == "call_function" and _is_n_by_n(node, length)]


def _calls(gm) -> list[torch.fx.Node]:
    return [node for node in gm.graph.nodes if node.target is ATTENTION_OP]


def _assert_programs(gm, report, layers: int, *, causal: bool, mask: bool, bias: bool, fill=-math.inf) -> None:
    assert [match.rewritten for match in report.matches] == [True] * layers, report.summary()
    calls = _calls(gm)
    assert len(calls) == layers
    for call in calls:
        args = call.args
        assert args[3] is None and args[4] is None, "a dense bias or mask reached the op"
        assert (args[9], bool(args[14]), bool(args[15]), args[8]) == (causal, bias, mask, fill)
        for text in (args[14], args[15]):
            if text:
                parse(text)
        assert not any(leaf.op == "call_function" and _is_n_by_n(leaf, LENGTH) for leaf in args[5])
    assert not n_by_n_nodes(gm, LENGTH), n_by_n_nodes(gm, LENGTH)


# family, implementation, causal flag, mask program, bias program, mask fill
HF_CASES = [
    ("llama", "sdpa", True, True, False, -math.inf),
    # a finite fill with padding: the whole where(causal ∧ padding, 0, finfo.min) stays a bias program
    ("llama", "eager", False, False, True, -math.inf),
    ("bert", "sdpa", False, True, False, -math.inf),
    ("bert", "eager", False, False, True, -math.inf),
    ("mistral", "sdpa", True, True, False, -math.inf),  # sliding window 5 < length: the band is the mask program
    ("gpt2", "eager", False, False, True, -math.inf),
    ("bloom", "eager", False, False, True, -math.inf),  # ALiBi (B·H, 1, L) read at batch·H + head, plus the mask
    ("t5", "sdpa", False, False, True, -math.inf),  # relative position buckets + padding: one bias program
]


@pytest.mark.parametrize("family,implementation,causal,mask,bias,fill", HF_CASES,
                         ids=[f"{case[0]}-{case[1]}" for case in HF_CASES])
def test_hf_masks_become_programs(family, implementation, causal, mask, bias, fill):
    model = _hf_model(family, implementation)
    ids, attention_mask = _tokens(LENGTH)
    gm, report = rewriter.optimize_module(model, (ids,), example_kwargs={"attention_mask": attention_mask})
    _assert_programs(gm, report, 2, causal=causal, mask=mask, bias=bias, fill=fill)
    if family == "t5":  # the learned bucket table is a leaf of the bias program; its gradient is compared below
        table = model.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight
        assert all(any(leaf.op == "get_attr" and gm.get_parameter(leaf.target) is table for leaf in call.args[5])
                   for call in _calls(gm))
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    _assert_parity(lambda: _hidden(model(input_ids=ids, attention_mask=attention_mask)),
                   lambda: _hidden(gm(ids, attention_mask=attention_mask)), parameters)
    other_ids, other_mask = _tokens(OTHER_LENGTH)
    with torch.no_grad():
        torch.testing.assert_close(_hidden(gm(other_ids, attention_mask=other_mask)),
                                   _hidden(model(input_ids=other_ids, attention_mask=other_mask)),
                                   atol=1e-5, rtol=1e-4, equal_nan=True)


class _Block(torch.nn.Module):
    """softmax(q·kᵀ/8 + mask) @ v, with the mask a model writes (`style`)."""

    def __init__(self, style: str):
        super().__init__()
        self.style = style
        self.register_buffer("tri", torch.tril(torch.ones(64, 64)).view(1, 1, 64, 64))  # nanoGPT's `bias`

    def forward(self, q, k, v, first=None, second=None):
        scores = q @ k.transpose(-1, -2) / 8
        length = q.size(-2)
        if self.style == "triu":
            scores = scores + torch.full((length, length), float("-inf")).triu(1)
        elif self.style == "tril_buffer":
            scores = scores.masked_fill(self.tri[:, :, :length, :length] == 0, float("-inf"))
        elif self.style == "input_mask":
            scores = scores.masked_fill(~first, float("-inf"))
        elif self.style == "product_mask":  # varies per (query, key) through a product: not a program
            scores = scores.masked_fill(first @ second.transpose(-1, -2) < 0, float("-inf"))
        elif self.style == "mixed_bias":  # a distance bias (a program) and a product bias (not): two addends
            positions = torch.arange(length)
            distance = (positions[None, :] - positions[:, None]).abs().float()
            scores = scores - 0.1 * distance + (first[:, None, :] * second[None, :, :]).sum(-1)
        return torch.softmax(scores, -1) @ v


def _block_inputs(style: str, length: int) -> tuple:
    generator = torch.Generator().manual_seed(length)
    q, k, v = (torch.randn(BATCH, 2, length, 8, generator=generator, requires_grad=True) for _ in range(3))
    if style == "input_mask":
        mask = torch.rand(length, length, generator=generator) > 0.7
        mask[3] = False  # a row that sees no key: NaN
        return q, k, v, mask
    if style in ("product_mask", "mixed_bias"):
        return q, k, v, *(torch.randn(length, 3, generator=generator, requires_grad=True) for _ in range(2))
    return q, k, v


@pytest.mark.parametrize("style", ["triu", "tril_buffer"])
def test_written_causal_masks_become_the_causal_flag(style):
    model = _Block(style)
    inputs = _block_inputs(style, LENGTH)
    gm, report = rewriter.optimize_module(model, inputs)
    _assert_programs(gm, report, 1, causal=True, mask=False, bias=False)
    for length in (LENGTH, OTHER_LENGTH):
        inputs = _block_inputs(style, length)
        _assert_parity(lambda: model(*inputs), lambda: gm(*inputs), inputs[:3])


class _RarerOps(torch.nn.Module):
    """A bias built with clamp, rsub, remainder, floor division, select and unit-axis reshapes."""

    def forward(self, q, k, v, limits):
        length = q.size(-2)
        positions = torch.arange(length)
        relative = (positions[None, :] - positions[:, None]).clamp(-3, 3)
        band = torch.remainder(relative, 4) // 2
        limit = limits.select(1, 0).reshape(-1, 1, 1, 1)
        bias = (1 - band.float()) * 0.5 - (positions.view(1, 1, 1, length) >= limit).float() * 1e4
        return torch.softmax(q @ k.transpose(-1, -2) / 8 + bias, -1) @ v


def test_rarer_ops_become_a_bias_program():
    model = _RarerOps()
    limits = torch.tensor([[LENGTH, 0], [LENGTH - 3, 0]])
    inputs = _block_inputs("rare", LENGTH) + (limits,)
    gm, report = rewriter.optimize_module(model, inputs)
    _assert_programs(gm, report, 1, causal=False, mask=False, bias=True)
    assert [leaf.op for call in _calls(gm) for leaf in call.args[5]] == ["placeholder"]  # every op translated
    for length in (LENGTH, OTHER_LENGTH):
        inputs = _block_inputs("rare", length) + (limits,)
        _assert_parity(lambda: model(*inputs), lambda: gm(*inputs), inputs[:3])


@pytest.mark.parametrize("style", ["input_mask", "product_mask", "mixed_bias"])
def test_masks_that_vary_per_pair_stay_dense_and_exact(style):
    model = _Block(style)
    inputs = _block_inputs(style, LENGTH)
    gm, report = rewriter.optimize_module(model, inputs)
    assert report.matches[0].rewritten, report.summary()
    (call,) = _calls(gm)
    if style == "mixed_bias":  # added in turn (the model's rounding): the product bias is read as it is
        program = parse(call.args[14])
        assert call.args[3] is None and len(program.addends) == 2, call.args[14]
        assert program.steps[program.addends[1]].op == "load", call.args[14]
    else:
        assert call.args[4] is not None and call.args[15] == "", "the mask should stay a tensor operand"
    for length in (LENGTH, OTHER_LENGTH):
        inputs = _block_inputs(style, length)
        if style != "input_mask":
            _assert_parity(lambda: model(*inputs), lambda: gm(*inputs), inputs[:3] + inputs[3:])
            continue
        with torch.no_grad():  # NaN rows: the gradients are NaN in both
            want = model(*inputs)
            assert want.isnan().any()
            torch.testing.assert_close(gm(*inputs), want, atol=1e-5, rtol=1e-4, equal_nan=True)


def test_compiled_llama_sdpa_with_padding_matches_eager(monkeypatch):
    torch._dynamo.reset()
    graphs = []
    rewrite = rewriter.compile_backend.rewrite_graph_module
    monkeypatch.setattr(rewriter.compile_backend, "rewrite_graph_module",
                        lambda gm, *args, **kwargs: graphs.append(gm) or rewrite(gm, *args, **kwargs))
    model = _hf_model("llama", "sdpa")
    compiled = torch.compile(model, backend="rewriter", options={"compiler": "eager"})
    for length in (LENGTH, OTHER_LENGTH):
        ids, attention_mask = _tokens(length)
        with torch.no_grad():
            torch.testing.assert_close(_hidden(compiled(input_ids=ids, attention_mask=attention_mask)),
                                       _hidden(model(input_ids=ids, attention_mask=attention_mask)),
                                       atol=1e-5, rtol=1e-4, equal_nan=True)
    calls = [call for gm in graphs for call in _calls(gm)]
    assert calls and all(call.args[4] is None and call.args[15] for call in calls)
