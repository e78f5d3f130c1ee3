"""The unlearning objectives on a model, between the math (losses.py) and the loops (unlearn.py).

    rmu = RMU(model, trained, layer_id, layer_ids, pad_rows)     # RMU's forwards, same numbers as two full models
    loss, forget, retain = rmu.loss(rmu.trunk(f_ids, f_mask), f_mask, c, r_h, r_mask, rmu.frozen_acts(r_h, r_mask), alpha)
    forget_loss(cfg, model, ids, mask, ref)                       # NPO / SimNPO / GradDiff forget term (fused kernels)
    retain_ce(model, ids, mask), retain_kl(model, ids, mask, ref_h, W_ref)

RMU: the forward stops at the steering layer; layers below min(layer_ids) run once without gradients and feed
both the updated and the frozen path; the frozen path is not a second model but copies of the trained matrices
(torch.func.functional_call); ActCache keeps recurring trunk outputs and frozen targets within a byte budget.
NPO family: every log-prob goes through lpkernels.fused_sequence_loss / fused_logprob (the (N, V) logits never
exist), except the KL term.
"""
import torch

import losses


class RMU:
    """RMU's forward passes with a shared, gradient-free trunk and a frozen path made of copies of the trained
    matrices only. loss(...) is losses.rmu_loss on activations equal to full-model ones."""

    def __init__(self, model, train: dict, layer_id: int, layer_ids: list, pad_rows: str = "all"):
        self.model, self.L, self.lo, self.pad_rows = model, layer_id, min(layer_ids), pad_rows
        self.frozen = {n: p.detach().clone() for n, p in train.items()}  # only the trained matrices

    def trunk(self, ids, mask):
        """(B, T, d) input of layer lo (output of layer lo - 1), no gradients."""
        with torch.no_grad():
            if self.lo == 0:
                return self.model.model.embed_tokens(ids)
            return self.model(ids, mask, until_layer=self.lo - 1, pad_rows=self.pad_rows)

    def updated(self, h, mask):
        return self.model(hidden_states=h, attention_mask=mask, from_layer=self.lo, until_layer=self.L,
                          pad_rows=self.pad_rows)

    def frozen_acts(self, h, mask):
        with torch.no_grad():
            return torch.func.functional_call(self.model, self.frozen, (), dict(
                hidden_states=h, attention_mask=mask, from_layer=self.lo, until_layer=self.L, pad_rows=self.pad_rows),
                strict=False)

    def loss(self, f_h, f_mask, c, r_h, r_mask, r_target, alpha, f_counted=None, r_counted=None):
        """f_h / r_h: trunk outputs (B, T, d); r_target: frozen activations -> (loss, forget term, retain term)."""
        return losses.rmu_loss(self.updated(f_h, f_mask), c, self.updated(r_h, r_mask), r_target, alpha,
                               f_counted, r_counted)


class ActCache:
    """Keeps values of keys that will be asked for again (uses counted ahead), within a byte budget."""

    def __init__(self, uses: dict, budget_bytes: float):
        self.left, self.budget, self.used, self.store = dict(uses), budget_bytes, 0, {}
        self.hits = 0

    def get(self, key, fn):
        self.left[key] = self.left.get(key, 1) - 1
        if key in self.store:
            self.hits += 1
            val = self.store[key]
            if self.left[key] <= 0:
                del self.store[key]
                self.used -= nbytes(val)
            return val
        val = fn()
        if self.left[key] > 0 and self.used + nbytes(val) <= self.budget:
            self.store[key] = val
            self.used += nbytes(val)
        return val


def nbytes(val):
    return sum(v.numel() * v.element_size() for v in val if isinstance(v, torch.Tensor))


# ----------------------------------------------------------------------------------------------- NPO family

def sequence_logps(model, ids, mask):
    """Per-sequence (sum of target log-probs (B,), number of targets (B,)), no gradients."""
    from lpkernels import fused_logprob
    with torch.no_grad():
        h = model(ids, mask, output="hidden")                                   # (B, T, d)
        tgt = losses.next_token_targets(ids, mask)
        lp = fused_logprob(h, model.lm_head_weight, tgt)                        # (B, T) fp32
        return lp.sum(-1), (tgt != -100).sum(-1).float()


def forget_loss(cfg, model, ids, mask, ref=None):
    """The forget term of one batch through lpkernels.fused_sequence_loss. ref: (B,) reference log-probs (NPO)."""
    from lpkernels import fused_sequence_loss
    h = model(ids, mask, output="hidden")                                       # (B, T, d)
    B, T, d = h.shape
    tgt = losses.next_token_targets(ids, mask).reshape(-1)
    h, W = h.reshape(B * T, d), model.lm_head_weight
    if cfg.method == "npo":
        return fused_sequence_loss(h, W, tgt, [T] * B, lambda lp, r: losses.npo_loss(lp, r, cfg.beta), extras=(ref,),
                                   mean_tokens=cfg.npo_mean_tokens)
    if cfg.method == "simnpo":
        return fused_sequence_loss(h, W, tgt, [T] * B, lambda lp: losses.simnpo_loss(lp, cfg.beta, cfg.delta),
                                   mean_tokens=True)
    # graddiff: -CE, i.e. + the mean log-prob over all tokens of the batch (one "sequence")
    return fused_sequence_loss(h, W, tgt, [B * T], lambda lp: lp, mean_tokens=True)


def retain_ce(model, ids, mask):
    from lpkernels import fused_sequence_loss
    h = model(ids, mask, output="hidden")
    B, T, d = h.shape
    return fused_sequence_loss(h.reshape(B * T, d), model.lm_head_weight,
                               losses.next_token_targets(ids, mask).reshape(-1), [B * T], lambda lp: -lp,
                               mean_tokens=True)


def retain_kl(model, ids, mask, ref_h, W_ref):
    h = model(ids, mask, output="hidden")
    keep = losses.next_token_targets(ids, mask) != -100                         # (B, T)
    return losses.kl_ref_current(h[keep], model.lm_head_weight, ref_h.to(h.device, h.dtype), W_ref)
