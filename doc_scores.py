"""Per-document scores that need a pass of the model, for coreset selection (coreset.py) and its sweep:

    token_scores(model, tok, docs)    loss, zlib, Min-K%, Min-K%++ from one batched pass of lpkernels.token_stats
    grand_scores(model, tok, docs)    GraNd: each document's gradient norm of the unlearning loss (RMU or NPO)
    pooled_features + moderate_scores Moderate-DS: distance of mean-pooled hidden states to the centroid

The math of each score is in losses.py; this module runs the model over length-sorted, right-padded batches
(documents truncated to max_length tokens; pads never count).
"""
import numpy as np
import torch
from tqdm import tqdm

import losses

TOKEN_METHODS = ("loss", "zlib", "mink", "minkpp")
MAX_LENGTH = 512            # RMU's forget max_length (bio); tokens beyond are not scored
BATCH_SIZE = 8


# ----------------------------------------------------------------------------------------------- token scores

def token_method_scores(logprob, mean_logp, std_logp, text, k=losses.MIN_K):
    """All four token-statistic scores of one document from its per-token arrays (n,). -> dict"""
    lp = np.asarray(logprob, dtype=np.float64)
    if lp.size == 0:
        return {m: float("nan") for m in TOKEN_METHODS}
    loss = float(-lp.mean())
    return {"loss": loss, "zlib": losses.zlib_score(loss, text), "mink": losses.min_k_score(lp, k),
            "minkpp": losses.min_kpp_score(lp, mean_logp, std_logp, k)}


# ----------------------------------------------------------------------------------------------- batching

def encode_docs(tok, docs, max_length):
    return [ids[:max_length] for ids in tok.encode_batch(docs)]


def length_batches(seqs, batch_size):
    """Batches of indices of seqs, longest first (the first batch shows an out-of-memory at once)."""
    order = sorted(range(len(seqs)), key=lambda i: (-len(seqs[i]), i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def _pad(tok, seqs, device):
    ids, mask = tok.pad(seqs, side="right")
    return ids.to(device), mask.to(device)  # (B, T) each


# ----------------------------------------------------------------------------------------------- token_stats pass

@torch.no_grad()
def token_scores(model, tok, docs, max_length=MAX_LENGTH, batch_size=BATCH_SIZE, k=losses.MIN_K, progress=True, desc="scoring"):
    """One batched pass of lpkernels.token_stats over docs -> dict method -> np.ndarray (n,) (loss, zlib, mink, minkpp).
    Each document is scored on its tokens 2..L (L <= max_length): the first token has no prediction."""
    from lpkernels import token_stats
    device, W = model.lm_head_weight.device, model.lm_head_weight
    seqs = encode_docs(tok, docs, max_length)
    out = {m: np.full(len(docs), np.nan) for m in TOKEN_METHODS}
    for batch in tqdm(length_batches(seqs, batch_size), desc=desc, disable=not progress):
        ids, mask = _pad(tok, [seqs[i] for i in batch], device)
        B, T = ids.shape
        if T < 2:
            continue
        h = model(ids, mask, output="hidden")[:, :-1]                      # (B, T-1, d)
        targets = losses.next_token_targets(ids, mask)[:, :-1]            # (B, T-1)
        st = token_stats(h.reshape(-1, h.shape[-1]), W, targets.reshape(-1))
        lp, mu, sd = (x.view(B, T - 1).double().cpu().numpy() for x in (st.logprob, st.mean_logp, st.std_logp))
        for b, i in enumerate(batch):
            n = len(seqs[i]) - 1
            text = tok.decode(seqs[i])
            for m, v in token_method_scores(lp[b, :n], mu[b, :n], sd[b, :n], text, k).items():
                out[m][i] = v
    return out


# ----------------------------------------------------------------------------------------------- GraNd

def linear_grad_sq(x, g):
    """Per-sample squared Frobenius norms of the weight gradient of y = x W^T. x (B, T, in), g (B, T, out) -> (B,)
    fp64, ||sum_t g_t x_t^T||^2 via Gram matrices (B, T, T) or an explicit (B, out, in) einsum, whichever is cheaper."""
    x, g = x.float(), g.float()
    T, din, dout = x.shape[1], x.shape[2], g.shape[2]
    if T * (din + dout) <= din * dout:
        gram = torch.bmm(x, x.transpose(1, 2)) * torch.bmm(g, g.transpose(1, 2))  # (B, T, T)
        return gram.sum((1, 2)).double()
    return torch.einsum("bto,bti->boi", g, x).square().sum((1, 2)).double()


def grand_targets(model, loss, layer_ids, params=("mlp.down_proj",)):
    """The linear modules whose weights the unlearning loss trains (see the module docstring): `params` of
    `layer_ids` (RMU; NPO given layers), else, for NPO, every projection of every layer."""
    layers = model.model.layers
    if loss == "rmu" or layer_ids is not None:
        return [layers[i].get_submodule(p) for i in layer_ids for p in params]
    mods = []
    for blk in layers:
        a, m = blk.self_attn, blk.mlp
        mods += [a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj]
    return mods


def grand_batch(model, ids, mask, loss="rmu", layer_id=7, layer_ids=None, control=None,
                params=("mlp.down_proj",), bos_id=None):
    """Per-document GraNd scores of one right-padded batch. ids, mask (B, T); control (1, 1, d) for RMU -> (B,) fp64.
    `params` of `layer_ids` are the trained matrices (RMU needs them; NPO with layer_ids None: every projection of
    every layer); RMU with bos_id set: BOS left out of the loss (--masked-loss).

    The batch loss is the SUM of per-document losses, so the output gradients g seen by each linear layer are the
    per-document gradients; one backward gives them all. A linear layer y = x W^T has the per-document weight
    gradient G_b = sum_t g_bt x_bt^T, so ||G_b||_F^2 = sum_{t,s} (g_t.g_s)(x_t.x_s): a batched Gram product of the
    saved inputs and the output gradients (or an explicit einsum when cheaper), no per-document backward."""
    if loss == "rmu" and not layer_ids:
        raise ValueError("grand_batch: RMU's trained layers (layer_ids) are required")
    mods = grand_targets(model, loss, layer_ids, params)
    maskf = mask.to(model.lm_head_weight.dtype)[..., None]           # (B, T, 1)
    sq = torch.zeros(ids.shape[0], dtype=torch.float64, device=ids.device)
    handles = []

    def fwd_hook(mod, inp, out):
        if not out.requires_grad:
            return
        x = inp[0].detach() * maskf                                    # (B, T, in), pads zeroed

        def bwd_hook(g):
            nonlocal sq
            sq = sq + linear_grad_sq(x, g * maskf)
        out.register_hook(bwd_hook)

    for m in mods:
        handles.append(m.register_forward_hook(fwd_hook))
    try:
        with torch.enable_grad():
            if loss == "rmu":
                start = min(layer_ids)
                with torch.no_grad():
                    h = model.model.embed_tokens(ids) if start == 0 else model(ids, mask, until_layer=start - 1)
                h = h.detach().requires_grad_(True)                     # (B, T, d) input of layer `start`
                act = model(hidden_states=h, attention_mask=mask, from_layer=start, until_layer=layer_id)  # (B, T, d)
                m = losses.content_positions(ids, mask, bos_id).float() if bos_id is not None else mask.float()
                per_tok = (act.float() - control.to(act.device)).square().mean(-1)            # (B, T)
                doc_loss = (per_tok * m).sum(1) / m.sum(1).clamp_min(1)  # (B,)
            else:
                from lpkernels import fused_logprob
                h = model.model.embed_tokens(ids).detach().requires_grad_(True)   # (B, T, d)
                hid = model(hidden_states=h, attention_mask=mask, output="hidden")[:, :-1]  # (B, T-1, d)
                targets = losses.next_token_targets(ids, mask)[:, :-1]              # (B, T-1)
                lp = fused_logprob(hid.reshape(-1, hid.shape[-1]), model.lm_head_weight, targets.reshape(-1))
                n = (targets != -100).sum(1).clamp_min(1)
                doc_loss = -lp.view(targets.shape).sum(1) / n           # (B,) mean token NLL
            torch.autograd.grad(doc_loss.sum(), h)
    finally:
        for hd in handles:
            hd.remove()
    return sq.sqrt()


def grand_scores(model, tok, docs, loss="rmu", layer_id=7, layer_ids=None, control=None,
                 max_length=MAX_LENGTH, batch_size=BATCH_SIZE, progress=True, desc="grand", params=("mlp.down_proj",),
                 bos_id=None):
    """GraNd score of every document (see grand_batch). -> np.ndarray (n,)"""
    device = model.lm_head_weight.device
    seqs = encode_docs(tok, docs, max_length)
    out = np.full(len(docs), np.nan)
    for p in model.parameters():
        p.requires_grad_(False)
    for batch in tqdm(length_batches(seqs, batch_size), desc=desc, disable=not progress):
        live = [i for i in batch if len(seqs[i]) >= (2 if loss == "npo" else 1)]
        if not live:
            continue
        ids, mask = _pad(tok, [seqs[i] for i in live], device)
        s = grand_batch(model, ids, mask, loss, layer_id, layer_ids, control, params, bos_id).cpu().numpy()
        out[live] = s
    return out


# ----------------------------------------------------------------------------------------------- Moderate

@torch.no_grad()
def pooled_features(model, tok, docs, layer=-1, max_length=MAX_LENGTH, batch_size=BATCH_SIZE, progress=True,
                    desc="features"):
    """Mean over real tokens of the hidden states after decoder layer `layer` (-1: final normed). -> (n, d) fp64"""
    device = model.lm_head_weight.device
    seqs = encode_docs(tok, docs, max_length)
    feats = np.zeros((len(docs), model.config.hidden_size))
    for batch in tqdm(length_batches(seqs, batch_size), desc=desc, disable=not progress):
        ids, mask = _pad(tok, [seqs[i] for i in batch], device)
        h = model(ids, mask, output="hidden") if layer < 0 else model(ids, mask, until_layer=layer)  # (B, T, d)
        m = mask.float()[..., None]                                    # (B, T, 1)
        f = (h.float() * m).sum(1) / m.sum(1).clamp_min(1)             # (B, d)
        feats[batch] = f.double().cpu().numpy()
    return feats


def moderate_scores(features):
    """Moderate-DS: |d_i - median(d)| with d_i = ||f_i - mean_j f_j||. features (n, d) -> (n,) fp64 (keep lowest)."""
    f = np.asarray(features, dtype=np.float64)
    d = np.linalg.norm(f - f.mean(0, keepdims=True), axis=1)
    return np.abs(d - np.median(d))
