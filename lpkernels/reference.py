"""Plain PyTorch versions of the per-chunk row operations (the CPU / memory-safe reference path).

The ops in lpkernels/ loop over row chunks of the logits, logits_chunk = hidden[rows] @ weight.T (rows, V),
and hand each chunk to three row operations. These are the PyTorch versions; the Triton kernels in
logprob.py and token_stats.py compute the same things in one pass over each row. All math is fp32,
whatever the dtype of the chunk buffer.
"""
import torch


def lse_logp(x, targets, ignore_index, lse_out, logp_out):
    """x (n, V) logits chunk; targets (n,) int64. Writes lse_out (n,) = logsumexp_v x and
    logp_out (n,) = x[target] - lse (0 where target == ignore_index)."""
    x = x.float()                                                    # (n, V)
    lse = torch.logsumexp(x, dim=-1)                                 # (n,)
    valid = targets != ignore_index                                  # (n,)
    tx = x.gather(1, torch.where(valid, targets, 0)[:, None])[:, 0]  # (n,)
    lse_out.copy_(lse)
    logp_out.copy_(torch.where(valid, tx - lse, torch.zeros_like(lse)))


def grad_inplace(x, targets, lse, coef, ignore_index):
    """Overwrite x (n, V) with d(sum_i coef_i * logp_i)/d logits = coef * (onehot(target) - softmax),
    zero rows where target == ignore_index. lse (n,) from lse_logp, coef (n,) fp32."""
    valid = targets != ignore_index                                  # (n,)
    c = torch.where(valid, coef.float(), torch.zeros_like(coef, dtype=torch.float32))  # (n,)
    g = torch.exp(x.float() - lse[:, None]).mul_(-c[:, None])       # (n, V)  -c * p
    g.scatter_add_(1, torch.where(valid, targets, 0)[:, None], c[:, None])
    x.copy_(g)


def stats(x, targets, ignore_index, logp_out, ent_out, mean_out, std_out):
    """Token statistics of one chunk x (n, V): log p(target) (0 at ignored rows), entropy,
    mean_logp = sum_v p_v log p_v and std_logp = sqrt(sum_v p_v (log p_v)^2 - mean_logp^2)."""
    logp = torch.log_softmax(x.float(), dim=-1)                      # (n, V)
    p = logp.exp()
    mean = (p * logp).sum(-1)                                        # (n,)
    var = (p * (logp - mean[:, None]).square()).sum(-1)              # (n,)
    valid = targets != ignore_index
    tl = logp.gather(1, torch.where(valid, targets, 0)[:, None])[:, 0]
    logp_out.copy_(torch.where(valid, tl, torch.zeros_like(tl)))
    ent_out.copy_(-mean)
    mean_out.copy_(mean)
    std_out.copy_(var.clamp_min(0).sqrt())
