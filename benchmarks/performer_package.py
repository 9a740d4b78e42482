"""performer-pytorch's own causal `PerformerLM` (1.1.4, its CPU path as shipped) against its rewrite.

The model (`PackageModel`, defaults): `PerformerLM(num_tokens=32, dim=32, depth=1, heads=1,
dim_head=64, nb_features=256, ff_mult=1, causal=True)`, projection fixed (no redraw), batch 1, fp32;
kernel "favor" (FAVOR+ `softmax_kernel`, M features) or "no_projection" (softmax(q) and exp(k) over
the head dim: M = D). "package" runs it as
installed: `causal_linear_attention_noncuda`, 128 chunks each materialising chunk × M × Dv prefix
sums (and autograd keeps every chunk's); "rewritten" runs `rewriter.optimize_module` of the same
model, its attention block replaced by `rewriter::linear_attention`. Inference is a `no_grad`
forward; training a forward and backward of the logits' sum. `prepare_call` is imported by the
fresh child process of `rewriter.tools.measure.measure_in_fresh_process`. On device "cuda" the same
model, tokens and call run on the GPU (the package has no CUDA kernel of its own without
fast-transformers, so it runs the same `causal_linear_attention_noncuda`), and the call ends with
`torch.cuda.synchronize()` so that its wall time covers the work.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging

import torch

__all__ = ["IMPLS", "KERNELS", "PackageModel", "estimate_gib", "prepare_call"]

logger = logging.getLogger(__name__)

IMPLS = ("package", "rewritten")
NUM_TOKENS, DIM, HEADS = 32, 32, 1
# The package's peak in copies of one (B, H, L, M, Dv) fp32 prefix-summed context: its chunks'
# contexts and prefix sums (kept for the backward in training), rounded up from L = 4096.
CONTEXT_COPIES = {"inference": 0.2, "training": 2.5}  # measured 0.14 and 2.2 at L = 4096


KERNELS = ("favor", "no_projection")


@dataclasses.dataclass(frozen=True)
class PackageModel:
    """What varies between the measured models: the feature map, the head dim D and (FAVOR+) M."""

    kernel: str = "favor"
    head_dim: int = 64
    features: int = 256

    @property
    def feature_count(self) -> int:
        """M as the model uses it: `features` for FAVOR+, D for no_projection."""
        return self.features if self.kernel == "favor" else self.head_dim

    def describe(self) -> str:
        return f"{self.kernel}, D={self.head_dim}, M={self.feature_count}"


def _model(length: int, rewritten: bool, device: str = "cpu", config: PackageModel = PackageModel()):
    from performer_pytorch import PerformerLM

    torch.manual_seed(0)
    with contextlib.redirect_stdout(io.StringIO()):  # it prints that the CUDA kernel is missing
        model = PerformerLM(num_tokens=NUM_TOKENS, max_seq_len=length, dim=DIM, depth=1, heads=HEADS,
                            dim_head=config.head_dim, nb_features=config.features, ff_mult=1, causal=True,
                            no_projection=config.kernel == "no_projection").eval()
    model.fix_projection_matrices_()
    model.to(device)
    tokens = torch.randint(0, NUM_TOKENS, (1, length), generator=torch.Generator().manual_seed(1)).to(device)
    if not rewritten:
        return model, tokens
    import rewriter

    graph, report = rewriter.optimize_module(model, (tokens,))
    if report.rewritten_count != 1:
        raise RuntimeError(f"expected the one Performer block rewritten: {report.summary()}")
    return graph, tokens


def prepare_call(impl: str, mode: str, length: int, threads: int, warmup: int, device: str = "cpu",
                 config: PackageModel = PackageModel()):
    """The call to measure: `impl` ("package" or "rewritten") at `length`, "inference" or "training",
    on `device` ("cpu" or "cuda"), of the model `config`."""
    torch.set_num_threads(threads)
    training = mode == "training"
    synchronize = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def make_call(n):
        model, tokens = _model(n, impl == "rewritten", device, config)

        def call():
            with torch.set_grad_enabled(training):
                out = model(tokens).sum()
            if training:
                out.backward()
            synchronize()
        return call

    make_call(warmup)()  # loads kernels, starts the thread pool
    return make_call(length)


def estimate_gib(impl: str, mode: str, length: int, config: PackageModel = PackageModel()) -> float:
    """The package's estimated extra peak (0 for the rewrite, whose memory does not grow with L·M·Dv)."""
    if impl != "package":
        return 0.0
    return CONTEXT_COPIES[mode] * HEADS * length * config.feature_count * config.head_dim * 4 / 2**30
