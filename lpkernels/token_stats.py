"""token_stats: everything loss, Min-K% and Min-K%++ scoring need, in one pass, without (N, V) logits.

    st = token_stats(hidden (N, d), weight (V, d), targets (N,))
    st.logprob  (N,) log p(target), 0 where target == ignore_index
    st.entropy  (N,) -sum_v p_v log p_v
    st.mean_logp (N,) sum_v p_v log p_v               (= -entropy; Min-K%++'s mu)
    st.std_logp (N,) sqrt(sum_v p_v (log p_v)^2 - mean_logp^2)   (Min-K%++'s sigma)
All fp32, no gradient. entropy/mean/std are computed for every row, ignored or not.

Per row chunk: logits = hidden[rows] @ weight.T (cuBLAS), then a Triton kernel streams each row once
with per-lane online accumulators: running max m, s0 = sum e^y, s1 = sum e^y y, s2 = sum e^y y^2 with
y = x - m; rescaling to a new max m' (d = m - m', a = e^d) gives s0' = a s0, s1' = a (s1 + d s0),
s2' = a (s2 + 2 d s1 + d^2 s0). Then with L = log s0: mean_logp = s1/s0 - L, var = s2/s0 - (s1/s0)^2.
"""
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import reference
from ._util import block_v, check_inputs, launch, use_triton
from ._util import chunk_rows as pick_chunk_rows


class TokenStats(NamedTuple):
    logprob: torch.Tensor
    entropy: torch.Tensor
    mean_logp: torch.Tensor
    std_logp: torch.Tensor


@triton.jit
def _rescale(s0, s1, s2, d):
    # moments of y about a max that moved by d (<= 0); lanes with s0 == 0 stay 0 (d may be huge there)
    d = tl.where(s0 > 0, d, 0.0)
    a = tl.exp(d)
    return a * s0, a * (s1 + d * s0), a * (s2 + 2.0 * d * s1 + d * d * s0)


@triton.jit
def _stats_kernel(x_ptr, stride_x, t_ptr, logp_ptr, ent_ptr, mean_ptr, std_ptr, V, ignore_index,
                  BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    offs = tl.arange(0, BLOCK_V)
    m = tl.full([BLOCK_V], -1e30, tl.float32)
    s0 = tl.zeros([BLOCK_V], tl.float32)
    s1 = tl.zeros([BLOCK_V], tl.float32)
    s2 = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        mask = cols < V
        x = tl.load(x_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, x)
        s0, s1, s2 = _rescale(s0, s1, s2, m - m_new)
        y = tl.where(mask, x - m_new, 0.0)
        e = tl.where(mask, tl.exp(y), 0.0)
        s0 += e
        s1 += e * y
        s2 += e * y * y
        m = m_new
    mx = tl.max(m, axis=0)
    s0, s1, s2 = _rescale(s0, s1, s2, m - mx)
    S0 = tl.sum(s0, axis=0)
    S1 = tl.sum(s1, axis=0)
    S2 = tl.sum(s2, axis=0)
    L = tl.log(S0)
    mu = S1 / S0
    mean = mu - L
    var = tl.maximum(S2 / S0 - mu * mu, 0.0)
    t = tl.load(t_ptr + row)
    valid = t != ignore_index
    xt = tl.load(x_row + tl.where(valid, t, 0)).to(tl.float32)
    tl.store(logp_ptr + row, tl.where(valid, xt - mx - L, 0.0))
    tl.store(ent_ptr + row, -mean)
    tl.store(mean_ptr + row, mean)
    tl.store(std_ptr + row, tl.sqrt(var))


def stats(x, targets, ignore_index, logp_out, ent_out, mean_out, std_out):
    """Row op on a logits chunk x (n, V): writes the four (n,) fp32 statistics."""
    if not use_triton(x):
        return reference.stats(x, targets, ignore_index, logp_out, ent_out, mean_out, std_out)
    n, V = x.shape
    if n:
        launch(_stats_kernel, (n,), x, x.stride(0), targets, logp_out, ent_out, mean_out, std_out, V,
               ignore_index, BLOCK_V=block_v(V), num_warps=16)  # 58 regs at 4096 (8 warps: 123)


@torch.no_grad()
def token_stats(hidden, weight, targets, ignore_index=-100, chunk_rows=None) -> TokenStats:
    """TokenStats(logprob, entropy, mean_logp, std_logp) of log_softmax(hidden @ weight.T), each
    shaped like targets, fp32, no gradient. chunk_rows forces the chunk size."""
    h, t = check_inputs("token_stats", hidden, weight, targets, ignore_index)
    N, V = h.shape[0], weight.shape[0]
    rows = pick_chunk_rows(N, V, h.dtype, h.device, chunk_rows)
    out = torch.zeros(4, N, dtype=torch.float32, device=h.device)     # (4, N)
    if N:
        buf = torch.empty(min(rows, N), V, dtype=h.dtype, device=h.device)  # (rows, V)
        for r0 in range(0, N, rows):
            r1 = min(N, r0 + rows)
            x = buf[: r1 - r0]
            torch.mm(h[r0:r1], weight.t(), out=x)
            stats(x, t[r0:r1], int(ignore_index), *(o[r0:r1] for o in out))
    return TokenStats(*(o.reshape(targets.shape) for o in out))
