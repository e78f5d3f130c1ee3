"""Fused per-token log-probs, sequence losses and token statistics from hidden states and the LM head,
chunked over rows so the (N, V) logits never exist. CUDA tensors run Triton kernels; CPU tensors run the
chunked PyTorch reference unless TRITON_INTERPRET=1 (then the Triton kernels run in the interpreter).

    from lpkernels import fused_logprob, fused_sequence_loss, token_stats, TokenStats
"""
from ._util import KernelInputError
from .logprob import fused_logprob
from .sequence_loss import fused_sequence_loss
from .token_stats import TokenStats, token_stats

__all__ = ["fused_logprob", "fused_sequence_loss", "token_stats", "TokenStats", "KernelInputError"]
