"""fused_logprob: per-token log p(target) from hidden states and the LM head, without (N, V) logits.

    logp = fused_logprob(hidden (N, d), weight (V, d), targets (N,))   # (N,) fp32, 0 at ignored rows

Forward, per row chunk: logits = hidden[rows] @ weight.T into one (rows, V) buffer (cuBLAS), then a
Triton kernel streams each row once (online softmax) to get lse and x[target] - lse.
Backward (upstream gradient g (N,) known only now): per chunk, recompute the logits, a Triton kernel
overwrites them in place with g * (onehot - softmax), then grad_hidden[rows] = G @ W and
grad_weight += G^T @ hidden[rows]. Four matmuls in all; extra memory O(chunk x V + N).
"""
import torch
import triton
import triton.language as tl

from . import reference
from ._util import block_v, check_inputs, launch, use_triton
from ._util import chunk_rows as pick_chunk_rows


@triton.jit
def _lse_logp_kernel(x_ptr, stride_x, t_ptr, lse_ptr, logp_ptr, V, ignore_index, BLOCK_V: tl.constexpr):
    # one program per row: lse = logsumexp(x), logp = x[t] - lse (0 if t == ignore_index)
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    offs = tl.arange(0, BLOCK_V)
    m = tl.full([BLOCK_V], -1e30, tl.float32)   # per-lane running max (finite: no inf - inf)
    s = tl.zeros([BLOCK_V], tl.float32)         # per-lane running sum of exp(x - m)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        mask = cols < V
        x = tl.load(x_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, x)
        s = s * tl.exp(m - m_new) + tl.where(mask, tl.exp(x - m_new), 0.0)
        m = m_new
    mx = tl.max(m, axis=0)
    lse = mx + tl.log(tl.sum(s * tl.exp(m - mx), axis=0))
    t = tl.load(t_ptr + row)
    valid = t != ignore_index
    xt = tl.load(x_row + tl.where(valid, t, 0)).to(tl.float32)
    tl.store(lse_ptr + row, lse)
    tl.store(logp_ptr + row, tl.where(valid, xt - lse, 0.0))


@triton.jit
def _grad_kernel(x_ptr, stride_x, t_ptr, lse_ptr, c_ptr, V, ignore_index, BLOCK_V: tl.constexpr):
    # one program per row: x <- c * (onehot(t) - exp(x - lse)), in place, in the buffer's dtype
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    t = tl.load(t_ptr + row)
    lse = tl.load(lse_ptr + row)
    c = tl.load(c_ptr + row)
    c = tl.where(t != ignore_index, c, 0.0)
    offs = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        mask = cols < V
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        g = c * (tl.where(cols == t, 1.0, 0.0) - tl.exp(x - lse))
        tl.store(x_row + cols, g.to(x_ptr.dtype.element_ty), mask=mask)


def _warps(V):
    return 16 if V >= 65536 else 8


def lse_logp(x, targets, ignore_index, lse_out, logp_out):
    """Row op 1 on a logits chunk x (n, V): lse_out (n,), logp_out (n,) fp32."""
    if not use_triton(x):
        return reference.lse_logp(x, targets, ignore_index, lse_out, logp_out)
    n, V = x.shape
    if n:
        launch(_lse_logp_kernel, (n,), x, x.stride(0), targets, lse_out, logp_out, V, ignore_index,
               BLOCK_V=block_v(V), num_warps=_warps(V))


def grad_inplace(x, targets, lse, coef, ignore_index):
    """Row op 2: overwrite x (n, V) with coef * (onehot(target) - softmax(x)); zero at ignored rows."""
    if not use_triton(x):
        return reference.grad_inplace(x, targets, lse, coef, ignore_index)
    n, V = x.shape
    if n:
        launch(_grad_kernel, (n,), x, x.stride(0), targets, lse, coef, V, ignore_index,
               BLOCK_V=block_v(V), num_warps=_warps(V))


def _forward(hidden, weight, targets, ignore_index, rows):
    N, V = hidden.shape[0], weight.shape[0]
    lse = torch.empty(N, dtype=torch.float32, device=hidden.device)    # (N,)
    logp = torch.empty(N, dtype=torch.float32, device=hidden.device)   # (N,)
    buf = torch.empty(min(rows, N), V, dtype=hidden.dtype, device=hidden.device)  # (rows, V)
    for r0 in range(0, N, rows):
        r1 = min(N, r0 + rows)
        x = buf[: r1 - r0]
        torch.mm(hidden[r0:r1], weight.t(), out=x)
        lse_logp(x, targets[r0:r1], ignore_index, lse[r0:r1], logp[r0:r1])
    return logp, lse


class FusedLogprobFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, rows):
        logp, lse = _forward(hidden, weight, targets, ignore_index, rows)
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.ignore_index, ctx.rows = ignore_index, rows
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        hidden, weight, targets, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        N, V, rows = hidden.shape[0], weight.shape[0], ctx.rows
        g = grad_logp.float().contiguous()                                # (N,)
        gh = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_h else None
        gw = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device) if need_w else None  # set by chunk 0
        buf = torch.empty(min(rows, N), V, dtype=hidden.dtype, device=hidden.device)  # (rows, V)
        for r0 in range(0, N, rows):
            r1 = min(N, r0 + rows)
            x = buf[: r1 - r0]
            torch.mm(hidden[r0:r1], weight.t(), out=x)                    # recompute logits
            grad_inplace(x, targets[r0:r1], ignore_index=ctx.ignore_index, lse=lse[r0:r1], coef=g[r0:r1])
            if need_h:
                torch.mm(x, weight, out=gh[r0:r1])                        # (n, d)
            if need_w:
                if r0 == 0:
                    torch.mm(x.t(), hidden[r0:r1], out=gw)                # (V, d)
                else:
                    gw.addmm_(x.t(), hidden[r0:r1])
        return gh, gw, None, None, None


def fused_logprob(hidden, weight, targets, ignore_index=-100, chunk_rows=None):
    """log_softmax(hidden @ weight.T)[target] per row, fp32, 0 where target == ignore_index.

    hidden (..., d) and weight (V, d) in fp32/bf16/fp16 (same dtype), targets (...) integer.
    Returns (...) float32. Differentiable in hidden and weight. chunk_rows forces the chunk size.
    """
    h, t = check_inputs("fused_logprob", hidden, weight, targets, ignore_index)
    rows = pick_chunk_rows(h.shape[0], weight.shape[0], h.dtype, h.device, chunk_rows)
    if h.shape[0] == 0:
        return (h.sum(-1) * 0).float().reshape(targets.shape)
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        logp = FusedLogprobFunction.apply(h, weight, t, int(ignore_index), rows)
    else:
        logp, _ = _forward(h.detach(), weight.detach(), t, int(ignore_index), rows)
    return logp.reshape(targets.shape)
