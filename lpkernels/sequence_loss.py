"""fused_sequence_loss: mean over sequences of seq_loss(per-sequence log-prob), gradients formed in the
forward (three matmuls), without (N, V) logits.

    loss = fused_sequence_loss(hidden (N, d), weight (V, d), targets (N,), seq_lens (S,), seq_loss,
                               extras=(ref_logp,), mean_tokens=False)
    # lp_s = sum_{t in s, target != ignore} log p(target_t)   (mean over those tokens if mean_tokens)
    # loss = mean_s seq_loss(lp, *extras)[s]

Sequences are consecutive runs of rows (seq_lens sums to N). Chunks hold whole sequences: per chunk,
logits = hidden[rows] @ W^T into a (rows, V) buffer; a Triton pass gives lse and token log-probs; the
chunk's sequence log-probs go through seq_loss and autograd on those few numbers gives
c_s = dloss/dlp_s; a second Triton pass overwrites the buffer with c_s(t) * (onehot - softmax); then
grad_hidden[rows] = G @ W and grad_weight += G^T @ hidden[rows]. The backward only scales the stored
gradients by the upstream scalar (in place; backward may run once per forward).

seq_loss is evaluated chunk by chunk on the chunk's sequences, so it must act row-wise: output s may
depend only on input s (true of NPO, SimNPO, cross-entropy, GradDiff). A sequence longer than the chunk
is handled in two passes over sub-chunks (its logits are recomputed: four matmuls for that sequence).
"""
import torch

from ._util import KernelInputError, check_inputs
from ._util import chunk_rows as pick_chunk_rows
from .logprob import grad_inplace, lse_logp


def _groups(lens, max_rows):
    """Greedy packing of consecutive sequences: list of (s0, s1, r0, r1), rows r1 - r0 <= max_rows
    unless one sequence alone is longer."""
    out, s0, r0, r = [], 0, 0, 0
    for s, n in enumerate(lens):
        if r + n > max_rows and s > s0:
            out.append((s0, s, r0, r))
            s0, r0 = s, r
        r += n
    if s0 < len(lens):
        out.append((s0, len(lens), r0, r))
    return out


def _seq_loss_and_grad(seq_loss, lp, extras, need_grad):
    """seq_loss on one chunk's k sequences: returns (losses (k,) fp32, dsum(losses)/dlp (k,) or None)."""
    k = lp.shape[0]
    with torch.enable_grad():
        x = lp.detach().requires_grad_(need_grad)
        out = seq_loss(x, *extras)
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (k,):
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise KernelInputError(f"fused_sequence_loss: seq_loss must map ({k},) log-probs to ({k},) losses, "
                                   f"got {shape}")
        grad = None
        if need_grad:
            if out.requires_grad:
                (grad,) = torch.autograd.grad(out.sum(), x, allow_unused=True)
            grad = torch.zeros_like(lp) if grad is None else grad.float()
    return out.detach().float(), grad


def _run(hidden, weight, targets, lens, seq_loss, extras, mean_tokens, ignore_index, rows, need_h, need_w):
    """Loss (0-d fp32), and grad_hidden / grad_weight of the loss (None when not needed)."""
    N, V = hidden.shape[0], weight.shape[0]
    S = len(lens)
    dev = hidden.device
    lens_t = torch.tensor(lens, dtype=torch.int64, device=dev)                  # (S,)
    seq_id = torch.repeat_interleave(torch.arange(S, device=dev), lens_t)      # (N,)
    ntok = torch.zeros(S, dtype=torch.float32, device=dev).index_add_(
        0, seq_id, (targets != ignore_index).float()).clamp_min(1.0)          # (S,)
    lse = torch.empty(N, dtype=torch.float32, device=dev)                      # (N,)
    logp = torch.empty(N, dtype=torch.float32, device=dev)                     # (N,)
    total = torch.zeros((), dtype=torch.float32, device=dev)
    need_grad = need_h or need_w
    gh = torch.empty(hidden.shape, dtype=hidden.dtype, device=dev) if need_h else None
    gw = (torch.empty if N else torch.zeros)(weight.shape, dtype=weight.dtype, device=dev) if need_w else None
    buf = torch.empty(min(rows, max(N, 1)), V, dtype=hidden.dtype, device=dev)  # (rows, V)
    first_w = True
    for s0, s1, r0, r1 in _groups(lens, rows):
        subs = [(a, min(r1, a + rows)) for a in range(r0, r1, rows)]
        for a, b in subs:                          # pass 1: lse and token log-probs
            x = buf[: b - a]
            torch.mm(hidden[a:b], weight.t(), out=x)
            lse_logp(x, targets[a:b], ignore_index, lse[a:b], logp[a:b])
        sid = seq_id[r0:r1] - s0                                               # (n,)
        lp = torch.zeros(s1 - s0, dtype=torch.float32, device=dev).index_add_(0, sid, logp[r0:r1])
        if mean_tokens:
            lp = lp / ntok[s0:s1]
        ex = tuple(e[s0:s1] if isinstance(e, torch.Tensor) else e for e in extras)
        losses, dlp = _seq_loss_and_grad(seq_loss, lp, ex, need_grad)
        total += losses.sum()
        if not need_grad or r1 == r0:
            continue
        c_seq = dlp / S                                                        # dloss/dlp_s
        if mean_tokens:
            c_seq = c_seq / ntok[s0:s1]
        coef = c_seq[sid].contiguous()                                         # (n,) per token
        for a, b in subs:                          # pass 2: gradients (buffer reused if one sub-chunk)
            x = buf[: b - a]
            if len(subs) > 1:
                torch.mm(hidden[a:b], weight.t(), out=x)
            grad_inplace(x, targets[a:b], lse=lse[a:b], coef=coef[a - r0:b - r0], ignore_index=ignore_index)
            if need_h:
                torch.mm(x, weight, out=gh[a:b])
            if need_w:
                if first_w:
                    torch.mm(x.t(), hidden[a:b], out=gw)
                    first_w = False
                else:
                    gw.addmm_(x.t(), hidden[a:b])
    return total / S, gh, gw


class FusedSequenceLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, lens, seq_loss, extras, mean_tokens, ignore_index, rows):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss, gh, gw = _run(hidden, weight, targets, lens, seq_loss, extras, mean_tokens, ignore_index,
                            rows, need_h, need_w)
        ctx.grads = (gh, gw)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.grads is None:
            raise RuntimeError("fused_sequence_loss: backward ran twice on one forward; its gradients are "
                               "formed in the forward and scaled in place, so retain_graph is not supported")
        gh, gw = ctx.grads
        ctx.grads = None
        g = grad_loss.float()
        if gh is not None:
            gh.mul_(g)
        if gw is not None:
            gw.mul_(g)
        return gh, gw, None, None, None, None, None, None, None


def fused_sequence_loss(hidden, weight, targets, seq_lens, seq_loss, extras=(), mean_tokens=False,
                        ignore_index=-100, chunk_rows=None):
    """mean_s seq_loss(lp, *extras)[s], lp (S,) fp32 per-sequence summed token log-probs (mean over
    non-ignored tokens when mean_tokens; a sequence with none has lp = 0).

    hidden (N, d), weight (V, d) same float dtype; targets (N,) integer; seq_lens (S,) non-negative
    integers summing to N (list or tensor); seq_loss: (S,) fp32 tensor [, extras sliced to the same
    sequences] -> (S,) tensor, row-wise; extras: tensors with leading dim S (others passed as is).
    Returns a 0-d fp32 tensor, differentiable in hidden and weight. chunk_rows sets the chunk size.
    NPO: seq_loss = lambda lp, ref: -(2 / beta) * F.logsigmoid(-beta * (lp - ref)), extras=(ref_logp,).
    """
    op = "fused_sequence_loss"
    h, t = check_inputs(op, hidden, weight, targets, ignore_index)
    if h.dim() != 2 or hidden.dim() != 2:
        raise KernelInputError(f"{op}: hidden must be (N, d), got shape {tuple(hidden.shape)}")
    N = h.shape[0]
    if isinstance(seq_lens, torch.Tensor):
        if seq_lens.dim() != 1 or seq_lens.dtype.is_floating_point:
            raise KernelInputError(f"{op}: seq_lens must be a 1-D integer tensor, got {seq_lens.dtype} "
                                   f"shape {tuple(seq_lens.shape)}")
        lens = [int(n) for n in seq_lens.tolist()]
    else:
        lens = [int(n) for n in seq_lens]
    if len(lens) == 0 or min(lens) < 0 or sum(lens) != N:
        raise KernelInputError(f"{op}: seq_lens must be >= 1 non-negative lengths summing to N={N} rows "
                               f"of hidden, got {len(lens)} lengths summing to {sum(lens)}")
    if not callable(seq_loss):
        raise KernelInputError(f"{op}: seq_loss must be callable (S,) -> (S,)")
    if isinstance(extras, torch.Tensor):
        extras = (extras,)
    S = len(lens)
    ex = []
    for i, e in enumerate(extras):
        if isinstance(e, torch.Tensor):
            if e.dim() == 0 or e.shape[0] != S:
                raise KernelInputError(f"{op}: extras[{i}] must have leading dim S={S}, got shape "
                                       f"{tuple(e.shape)}")
            e = e.detach().to(h.device)
        ex.append(e)
    rows = pick_chunk_rows(N, weight.shape[0], h.dtype, h.device, chunk_rows)
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return FusedSequenceLossFunction.apply(h, weight, t, lens, seq_loss, tuple(ex), bool(mean_tokens),
                                               int(ignore_index), rows)
    loss, _, _ = _run(h.detach(), weight.detach(), t, lens, seq_loss, tuple(ex), bool(mean_tokens),
                      int(ignore_index), rows, False, False)
    return loss
