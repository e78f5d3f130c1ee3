"""Coreset selection for LLM unlearning, keyword-only forget sets, and the coreset sweep (the paper's main figure).

Selection: one JSON line per selected forget document, read by `unlearn.py --coreset FILE`:

    python coreset.py --method random --forget data/toy/forget_corpus.jsonl --ratio 0.05 --seed 0 --out cs.jsonl
    python coreset.py --method mink --model data/toy/model --forget F1.jsonl,F2.jsonl --ratio 0.05 --out cs.jsonl
    -> cs.jsonl  {"file": <forget path as given>, "index": <0-based index in data.read_corpus(file)>, "score": float|null}
       cs.json   run record: run_info (args, versions, device), per-file counts, timings

--ratio: a fraction of each forget file's documents (0 < r <= 1, Python's round), or above 1 a whole document
count per file (capped at the file's size); always at least one document per file. With several forget files
(one per topic, `--forget bio.jsonl,cyber.jsonl`) every file is scored and selected on its own.

Methods and their scores (selection keeps the `--order` end; ties go to the lower index; a document with no score,
e.g. a single token, comes last):
  random    seeded uniform sample without replacement (score null). No model needed.
  loss      mean token negative log-likelihood                                            default order: low
  zlib      loss / zlib-compressed byte length of the scored text (Carlini et al. 2021)   default order: low
  mink      Min-K% Prob: -mean of the lowest k% token log-probs (k = --mink-k, 0.4)       default order: low
  minkpp    Min-K%++: -mean of the lowest k% of (log p(x_t) - mu_t) / sigma_t             default order: low
            (mu_t, sigma_t: mean and std of log p under the model's next-token distribution)
            These four are loss-like (higher = the model finds the text less likely) and all come from one
            batched pass of lpkernels.token_stats. The default keeps the documents the model finds most likely:
            the membership-inference reading (what the model has absorbed is what unlearning must remove);
            `--order high` keeps the hardest documents instead.
  grand     GraNd: per-document gradient norm of the unlearning loss with respect to the trained parameters,
            at the starting model (default order: high).
            --grand-loss rmu (default): RMU's forget loss mean_{t,d} (h_t - c)^2 at the output of decoder layer
              --layer-id (over the document's real tokens; the reference RMU also averages over padding), with
              c = --steering-coeff * u/|u|, u ~ U[0,1)^d seeded per forget file (= topic); parameters: the
              mlp.down_proj weights of --layer-ids (what RMU trains).
            --grand-loss npo: NPO's loss at theta = ref, -(2/beta) logsigmoid(-beta (logp - logp_ref)), has the
              gradient 2 sigmoid(0) grad logp = grad logp: the gradient of the sequence log-prob, taken as the
              mean token log-prob (the WMDP NPO variant); parameters: every linear projection of every
              decoder layer (q, k, v, o, gate, up, down; not the embeddings, norms or LM head).
            Per-document gradients of a linear layer y = x W^T are G_b = sum_t g_bt x_bt^T, from the inputs x
            saved in the forward and the output gradients g of ONE backward of the summed batch loss (documents
            do not interact), so ||G_b||_F^2 = sum_{t,s} (g_t.g_s)(x_t.x_s) is a batched Gram product (or an
            explicit einsum when that is cheaper); no per-document backward.
  moderate  Moderate-DS (Xia et al. 2023): mean-pooled hidden states (real tokens) at --layer (-1: the final
            normed hidden states); distance of each document to its file's centroid; score = |distance - median
            distance|; keeps the smallest (the documents of typical difficulty).
  keywords  keyword-only forget set (no model): words of each forget file scored against the retain corpus by
            the log-odds ratio with an informative Dirichlet prior (Monroe, Colaresi & Quinn 2008: the pooled
            word frequencies of forget + retain, strength --prior-frac x the pooled word count); keywords = words with z >=
            --min-z seen >= --min-count times in the forget file, English function words excluded
            (--keep-stopwords keeps them), at most --max-keywords. Writes --out as a
            forget corpus: one {"text": ...} line per document, each document reduced to its keywords in
            order (documents without keywords dropped); with several forget files one file per forget file
            (<out stem>.<forget stem>.jsonl). --ratio (default 1) first samples documents at random.

Scoring runs in bf16 on a GPU and fp32 on the CPU (--dtype overrides); documents are tokenized with the model's
tokenizer, truncated to --max-length tokens, right-padded, batched by length; pads never count.

The sweep (one command for the paper's main figure):

    python coreset.py sweep --method rmu --select random --ratios 0.01,0.05,0.1,0.2,1.0 --seeds 0,1,2 \\
        --model data/toy/model --data data/toy --forget data/toy/forget_corpus.jsonl \\
        --retain data/toy/retain_corpus.jsonl --tasks toy_hazard,toy_general --out runs/sweep
    (make sweep METHOD=rmu SELECT=random RATIOS="0.01 0.05 0.1 0.2 1.0" SEEDS="0 1 2")

For every (selection method, ratio, seed): select a coreset (cells/<select>_r<ratio>_s<seed>/coreset.jsonl;
ratio 1 = the full forget set, no coreset; --select keywords: unlearn on the keyword-only forget set of a random
`ratio` of the documents instead), unlearn in-process with unlearn.run at a fixed number of steps (the seed is
both the selection's and the unlearning's), evaluate the tasks (unlearn.py caches the base model's evaluation in
cells/.eval_cache); each cell's result.json is written atomically when it is done, and a rerun skips cells that
have one. Checkpoints are not kept (--keep-models keeps them). Then results.json / results.md (mean +- sample std
over seeds per (selection, ratio), and the base model) and results.png (matplotlib, optional: accuracy against
ratio with error bars, log-scaled ratio axis; a bar chart per selection method when there is one ratio and several
methods); --docs PREFIX copies the three to PREFIX.{md,json,png}.
"""
import argparse
import json
import math
import os
import random
import re
import sys
import time
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import data
from model import CheckpointError, Transformer, atomic_write_json, atomic_write_lines, default_dtype, load_tokenizer, run_info

# ----------------------------------------------------------------------------------------------- defaults
METHODS = ("random", "loss", "zlib", "mink", "minkpp", "grand", "moderate", "keywords")
TOKEN_METHODS = ("loss", "zlib", "mink", "minkpp")
DEFAULT_ORDER = {"loss": "low", "zlib": "low", "mink": "low", "minkpp": "low", "grand": "high", "moderate": "low"}
MAX_LENGTH = 512            # RMU's forget max_length (bio); tokens beyond are not scored
BATCH_SIZE = 8
MINK_K = 0.4                # Min-K% / Min-K%++ fraction of lowest tokens (MUSE's 40%)
MINKPP_EPS = 1e-6           # floor on sigma_t in Min-K%++ (a one-hot next-token distribution has sigma 0)
LAYER_ID = 7                # RMU: activations after this decoder layer (WMDP reference)
LAYER_IDS = "5,6,7"         # RMU: trained down_proj layers
STEERING_COEFF = 6.5        # RMU control-vector norm (zephyr run)
PRIOR_FRAC = 0.1           # keywords: prior pseudo-count alpha_0 as a fraction of the pooled word count
MIN_Z = 1.96                # keywords: log-odds z-score threshold
MIN_COUNT = 2               # keywords: minimum count in the forget file
MAX_KEYWORDS = 1000
STOPWORDS = frozenset("""a about above after again against all am an and any are as at be because been before being
below between both but by can could did do does doing down during each few for from further had has have having he her
here hers herself him himself his how i if in into is it its itself just may me might more most must my myself no nor not
now of off on once only or other our ours ourselves out over own same shall she should so some such than that the their
theirs them themselves then there these they this those through to too under until up upon very was we were what when
where which while who whom why will with would you your yours yourself yourselves also its one two three""".split())
UTILITY_TASKS = ("mmlu", "toy_general", "wikitext")   # sweep: tasks that measure retained utility (others: forget)


class CoresetError(ValueError):
    """Bad input to coreset selection or the sweep; the message names the flag or file and what was expected."""


# ----------------------------------------------------------------------------------------------- ratios

def parse_ratio(ratio, flag="--ratio"):
    """A fraction in (0, 1] or a whole count > 1. -> float"""
    try:
        r = float(ratio)
    except (TypeError, ValueError):
        raise CoresetError(f"{flag} {ratio!r}: expected a number (a fraction in (0, 1] or a document count > 1)") from None
    if not math.isfinite(r) or r <= 0:
        raise CoresetError(f"{flag} {ratio}: expected a fraction in (0, 1] or a document count > 1")
    if r > 1 and r != int(r):
        raise CoresetError(f"{flag} {ratio}: above 1 it is a document count and must be a whole number")
    return r


def coreset_size(ratio, n):
    """Documents to keep out of n: round(ratio * n) for a fraction, min(ratio, n) for a count; >= 1."""
    r = parse_ratio(ratio)
    k = int(r) if r > 1 else round(r * n)    # Python's round, as unlearn.py --ratio
    return max(1, min(n, k))


def choose(scores, k, order):
    """Indices (sorted ascending) of the k documents at the `order` ("high"/"low") end of scores (n,); ties to the
    lower index; NaN scores last."""
    s = np.asarray(scores, dtype=np.float64)
    nan = np.isnan(s)
    key = np.where(nan, 0.0, -s if order == "high" else s)
    rank = np.lexsort((np.arange(len(s)), key, nan))  # primary: NaN last, then key, then index
    return np.sort(rank[:k])


def random_indices(n, k, seed, file_index=0):
    """k distinct indices of range(n), sorted; the same draw as `unlearn.py --ratio` (random.Random seeded with
    seed * 1000003 + file index), so a random coreset file and unlearn's own --ratio pick the same documents."""
    rng = random.Random(int(seed) * 1_000_003 + int(file_index))
    return np.array(sorted(rng.sample(range(n), k)), dtype=np.int64)


# ----------------------------------------------------------------------------------------------- token scores (pure)

def mink_score(logprob, k=MINK_K):
    """Min-K% Prob: -mean of the int(k * n) lowest token log-probs (at least one). logprob (n,) -> float"""
    lp = np.sort(np.asarray(logprob, dtype=np.float64))
    if lp.size == 0:
        return float("nan")
    m = max(1, int(lp.size * k))
    return float(-lp[:m].mean())


def minkpp_score(logprob, mean_logp, std_logp, k=MINK_K, eps=MINKPP_EPS):
    """Min-K%++: -mean of the lowest k% of z_t = (log p(x_t) - mu_t) / sigma_t. Each arg (n,) -> float"""
    lp = np.asarray(logprob, dtype=np.float64)
    z = (lp - np.asarray(mean_logp, dtype=np.float64)) / np.maximum(np.asarray(std_logp, dtype=np.float64), eps)
    return mink_score(z, k)


def zlib_score(loss, text):
    """Carlini et al.'s zlib ratio: mean token NLL / zlib-compressed length (bytes) of the text."""
    return float(loss) / max(1, len(zlib.compress(text.encode("utf-8"))))


def token_method_scores(logprob, mean_logp, std_logp, text, k=MINK_K):
    """All four token-statistic scores of one document from its per-token arrays (n,). -> dict"""
    lp = np.asarray(logprob, dtype=np.float64)
    if lp.size == 0:
        return {m: float("nan") for m in TOKEN_METHODS}
    loss = float(-lp.mean())
    return {"loss": loss, "zlib": zlib_score(loss, text), "mink": mink_score(lp, k),
            "minkpp": minkpp_score(lp, mean_logp, std_logp, k)}


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
def token_scores(model, tok, docs, max_length=MAX_LENGTH, batch_size=BATCH_SIZE, k=MINK_K, progress=True, desc="scoring"):
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
        targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)          # (B, T-1)
        st = token_stats(h.reshape(-1, h.shape[-1]), W, targets.reshape(-1))
        lp, mu, sd = (x.view(B, T - 1).double().cpu().numpy() for x in (st.logprob, st.mean_logp, st.std_logp))
        for b, i in enumerate(batch):
            n = len(seqs[i]) - 1
            text = tok.decode(seqs[i])
            for m, v in token_method_scores(lp[b, :n], mu[b, :n], sd[b, :n], text, k).items():
                out[m][i] = v
    return out


# ----------------------------------------------------------------------------------------------- GraNd

def control_vector(d, coeff, seed, file_index=0):
    """RMU's control vector c = coeff * u / |u|, u ~ U[0, 1)^d, seeded by (seed, file_index). -> (d,) fp32"""
    g = torch.Generator().manual_seed(int(seed) * 1000003 + int(file_index))
    u = torch.rand(d, generator=g)
    return coeff * u / u.norm()


def linear_grad_sq(x, g):
    """Per-sample squared Frobenius norms of the weight gradient of y = x W^T. x (B, T, in), g (B, T, out) -> (B,)
    fp64, ||sum_t g_t x_t^T||^2 via Gram matrices (B, T, T) or an explicit (B, out, in) einsum, whichever is cheaper."""
    x, g = x.float(), g.float()
    T, din, dout = x.shape[1], x.shape[2], g.shape[2]
    if T * (din + dout) <= din * dout:
        gram = torch.bmm(x, x.transpose(1, 2)) * torch.bmm(g, g.transpose(1, 2))  # (B, T, T)
        return gram.sum((1, 2)).double()
    return torch.einsum("bto,bti->boi", g, x).square().sum((1, 2)).double()


def grand_targets(model, loss, layer_ids):
    """The linear modules whose weights the unlearning loss trains (see the module docstring)."""
    layers = model.model.layers
    if loss == "rmu":
        return [layers[i].mlp.down_proj for i in layer_ids]
    mods = []
    for blk in layers:
        a, m = blk.self_attn, blk.mlp
        mods += [a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj]
    return mods


def grand_batch(model, ids, mask, loss="rmu", layer_id=LAYER_ID, layer_ids=(5, 6, 7), control=None):
    """Per-document GraNd scores of one right-padded batch. ids, mask (B, T); control (d,) for RMU -> (B,) fp64.

    The batch loss is the SUM of per-document losses, so the output gradients g seen by each linear layer are the
    per-document gradients; one backward gives them all."""
    mods = grand_targets(model, loss, layer_ids)
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
                m = mask.float()                                        # (B, T)
                per_tok = (act.float() - control.to(act.device)).square().mean(-1)            # (B, T)
                doc_loss = (per_tok * m).sum(1) / m.sum(1)               # (B,)
            else:
                from lpkernels import fused_logprob
                h = model.model.embed_tokens(ids).detach().requires_grad_(True)   # (B, T, d)
                hid = model(hidden_states=h, attention_mask=mask, output="hidden")[:, :-1]  # (B, T-1, d)
                targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)            # (B, T-1)
                lp = fused_logprob(hid.reshape(-1, hid.shape[-1]), model.lm_head_weight, targets.reshape(-1))
                n = (targets != -100).sum(1).clamp_min(1)
                doc_loss = -lp.view(targets.shape).sum(1) / n           # (B,) mean token NLL
            torch.autograd.grad(doc_loss.sum(), h)
    finally:
        for hd in handles:
            hd.remove()
    return sq.sqrt()


def grand_scores(model, tok, docs, loss="rmu", layer_id=LAYER_ID, layer_ids=(5, 6, 7), control=None,
                 max_length=MAX_LENGTH, batch_size=BATCH_SIZE, progress=True, desc="grand"):
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
        s = grand_batch(model, ids, mask, loss, layer_id, layer_ids, control).cpu().numpy()
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


# ----------------------------------------------------------------------------------------------- keywords

WORD_RE = re.compile(r"[^\W\d_][\w'\-]*\w|[^\W\d_]")   # words starting with a letter (digits inside allowed)


def words(text):
    return WORD_RE.findall(text)


def log_odds_z(forget_counts, retain_counts, prior_frac=PRIOR_FRAC):
    """Log-odds ratio with an informative Dirichlet prior (Monroe et al. 2008), forget vs retain. The prior is the
    pooled word distribution with alpha_0 = prior_frac * (pooled word count), alpha_w = alpha_0 * p_pooled(w):
        delta_w = log((y_f + a_w) / (n_f + a_0 - y_f - a_w)) - log((y_r + a_w) / (n_r + a_0 - y_r - a_w))
        z_w = delta_w / sqrt(1 / (y_f + a_w) + 1 / (y_r + a_w))
    Counters of lowercased words -> dict word -> z (positive: characteristic of the forget set)."""
    vocab = set(forget_counts) | set(retain_counts)
    nf, nr = sum(forget_counts.values()), sum(retain_counts.values())
    total = nf + nr
    a0 = prior_frac * total
    z = {}
    for w in vocab:
        yf, yr = forget_counts.get(w, 0), retain_counts.get(w, 0)
        a = a0 * (yf + yr) / total                                      # alpha_w
        delta = math.log((yf + a) / (nf + a0 - yf - a)) - math.log((yr + a) / (nr + a0 - yr - a))
        var = 1.0 / (yf + a) + 1.0 / (yr + a)
        z[w] = delta / math.sqrt(var)
    return z


def extract_keywords(forget_docs, retain_docs, prior_frac=PRIOR_FRAC, min_z=MIN_Z, min_count=MIN_COUNT,
                     max_keywords=MAX_KEYWORDS, stopwords=STOPWORDS):
    """Keywords of forget_docs by contrast with retain_docs -> list of (word, z, count), highest z first.
    English function words (STOPWORDS) are never keywords: a forget corpus written in another register than the
    retain corpus uses some of them more often, which says nothing about its topic."""
    fc = Counter(w.lower() for d in forget_docs for w in words(d))
    rc = Counter(w.lower() for d in retain_docs for w in words(d))
    z = log_odds_z(fc, rc, prior_frac)
    keep = [(w, z[w], fc[w]) for w in fc if fc[w] >= min_count and z[w] >= min_z and w not in stopwords]
    keep.sort(key=lambda t: (-t[1], t[0]))
    return keep[:max_keywords]


def keyword_document(text, keywords):
    """The document reduced to its keywords (case-insensitive match), in order, joined by spaces."""
    return " ".join(w for w in words(text) if w.lower() in keywords)


# ----------------------------------------------------------------------------------------------- I/O

def run_json_path(out):
    p = Path(out)
    return p.with_suffix(".json") if p.suffix != ".json" else p.with_suffix(".run.json")


def write_coreset(path, selected):
    """selected: list of (file, index, score or None) -> JSON Lines in the coreset format."""
    def clean(s):
        return None if s is None or not math.isfinite(float(s)) else float(s)
    atomic_write_lines(path, [json.dumps({"file": f, "index": int(i), "score": clean(s)}) for f, i, s in selected])


# ----------------------------------------------------------------------------------------------- selection CLI

def build_parser():
    p = argparse.ArgumentParser(
        description="Select a coreset of the forget set (or write a keyword-only forget set). "
                    "`python coreset.py sweep --help` for the coreset sweep.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--method", default="random", help="|".join(METHODS))
    p.add_argument("--model", default="data/toy/model", help="HF checkpoint dir (not needed by random, keywords)")
    p.add_argument("--forget", default="data/toy/forget_corpus.jsonl", help="forget corpus file(s), comma-separated")
    p.add_argument("--retain", default="data/toy/retain_corpus.jsonl", help="retain corpus file(s) (keywords only)")
    p.add_argument("--ratio", default=None, help="fraction (0, 1] or count > 1 per forget file (default 1 for keywords)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/coreset.jsonl", help="coreset .jsonl (keywords: the keyword forget set)")
    p.add_argument("--order", choices=["high", "low"], default=None, help="keep the highest or lowest scores "
                   "(default: low for loss/zlib/mink/minkpp/moderate, high for grand)")
    p.add_argument("--min-chars", type=int, default=0, help="data.read_corpus min_chars (must match unlearn.py's)")
    p.add_argument("--max-length", type=int, default=MAX_LENGTH, help="tokens per document scored")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    p.add_argument("--mink-k", type=float, default=MINK_K, help="Min-K%% / Min-K%%++ fraction of tokens")
    p.add_argument("--grand-loss", choices=["rmu", "npo"], default="rmu")
    p.add_argument("--layer-id", type=int, default=None, help=f"RMU layer (default {LAYER_ID}, or the toy defaults.json)")
    p.add_argument("--layer-ids", default=None, help=f"RMU trained layers (default {LAYER_IDS}, or defaults.json)")
    p.add_argument("--steering-coeff", type=float, default=None, help=f"RMU control norm (default {STEERING_COEFF})")
    p.add_argument("--layer", type=int, default=-1, help="moderate: hidden states after this layer (-1: final)")
    p.add_argument("--prior-frac", type=float, default=PRIOR_FRAC,
                   help="keywords: Dirichlet prior strength alpha_0 as a fraction of the pooled word count")
    p.add_argument("--min-z", type=float, default=MIN_Z, help="keywords: z-score threshold")
    p.add_argument("--min-count", type=int, default=MIN_COUNT, help="keywords: minimum count in the forget file")
    p.add_argument("--max-keywords", type=int, default=MAX_KEYWORDS)
    p.add_argument("--keep-stopwords", action="store_true", help="keywords: let English function words be keywords")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None, help="default: bf16 GPU, fp32 CPU")
    p.add_argument("--no-progress", action="store_true")
    return p


def split_paths(s, flag):
    paths = [x.strip() for x in str(s or "").split(",") if x.strip()]
    if not paths:
        raise CoresetError(f"{flag}: expected at least one file (comma-separated)")
    return paths


def rmu_defaults(args, model_dir):
    """layer_id, layer_ids, steering_coeff (first topic's) for GraNd-RMU: the flags, else what unlearn.py would use
    for this model (the toy's data/toy/defaults.json, else the WMDP reference values)."""
    d = {}
    try:
        import unlearn
        a = unlearn.resolve_args(unlearn.build_parser().parse_args(
            ["--method", "rmu", "--model", str(model_dir), "--forget", "-", "--retain", "-"]))
        d = {"layer_id": a.layer_id, "layer_ids": a.layer_ids, "steering_coeff": a.steering_coeffs}
    except Exception:  # unlearn.py absent or unusable: the reference values
        pass
    layer_id = int(args.layer_id if args.layer_id is not None else d.get("layer_id", LAYER_ID))
    ids = args.layer_ids if args.layer_ids is not None else d.get("layer_ids", LAYER_IDS)
    layer_ids = [int(x) for x in str(ids).split(",") if x.strip()]
    coeff = args.steering_coeff if args.steering_coeff is not None else d.get("steering_coeff", STEERING_COEFF)
    return layer_id, layer_ids, float(str(coeff).split(",")[0])


def load_model(args):
    dtype = getattr(torch, args.dtype) if args.dtype else default_dtype(args.device)
    try:
        model = Transformer.from_pretrained(args.model, dtype=dtype, device=args.device).eval()
        tok = load_tokenizer(args.model)
    except (CheckpointError, FileNotFoundError, OSError) as e:
        raise CoresetError(f"--model {args.model}: {e}") from None
    return model, tok


def score_documents(args, model, tok, docs, file_index=0):
    """Scores (n,) of one forget file's documents under args.method (None for random)."""
    progress = not args.no_progress
    if args.method in TOKEN_METHODS:
        return token_scores(model, tok, docs, args.max_length, args.batch_size, args.mink_k, progress)[args.method]
    if args.method == "grand":
        layer_id, layer_ids, coeff = rmu_defaults(args, args.model)
        n_layers = model.config.num_hidden_layers
        if args.grand_loss == "rmu" and not all(0 <= i <= layer_id < n_layers for i in layer_ids):
            raise CoresetError(f"--layer-id {layer_id} / --layer-ids {layer_ids}: expected layer ids <= layer id < "
                               f"{n_layers} (the model's layers)")
        c = control_vector(model.config.hidden_size, coeff, args.seed, file_index)
        return grand_scores(model, tok, docs, args.grand_loss, layer_id, layer_ids, c, args.max_length,
                            args.batch_size, progress)
    if args.method == "moderate":
        if args.layer >= model.config.num_hidden_layers:
            raise CoresetError(f"--layer {args.layer}: the model has {model.config.num_hidden_layers} layers")
        return moderate_scores(pooled_features(model, tok, docs, args.layer, args.max_length, args.batch_size, progress))
    return None


def check_args(args):
    if args.method not in METHODS:
        raise CoresetError(f"--method {args.method!r}: expected one of {', '.join(METHODS)}")
    if args.ratio is None and args.method != "keywords":
        raise CoresetError("--ratio: required (a fraction in (0, 1] or a document count > 1)")
    parse_ratio(args.ratio if args.ratio is not None else 1)
    if args.max_length < 2:
        raise CoresetError(f"--max-length {args.max_length}: expected >= 2")
    if args.batch_size < 1:
        raise CoresetError(f"--batch-size {args.batch_size}: expected >= 1")
    if not 0 < args.mink_k <= 1:
        raise CoresetError(f"--mink-k {args.mink_k}: expected a fraction in (0, 1]")


def select(args, model=None, tok=None, cache=None):
    """Run one selection as the CLI does -> run record (dict). model/tok: reuse a loaded model; cache: a dict in
    which per-file scores are kept across calls (the sweep scores once for all ratios)."""
    check_args(args)
    t0 = time.time()
    forget = split_paths(args.forget, "--forget")
    try:
        corpora = [data.read_corpus(p, args.min_chars) for p in forget]
    except data.DataError as e:
        raise CoresetError(f"--forget: {e}") from None
    record = run_info(args)
    record["timings"] = {}
    if args.method == "keywords":
        return keywords_run(args, forget, corpora, record, t0)
    order = args.order or DEFAULT_ORDER.get(args.method)
    keys = [(args.method, path, fi) + ((args.seed, args.grand_loss) if args.method == "grand" else ())
            for fi, path in enumerate(forget)]
    record["scores_cached"] = cache is not None and all(k in cache for k in keys)
    if args.method != "random" and model is None and not record["scores_cached"]:
        model, tok = load_model(args)   # freed when this returns: the sweep keeps only the scores
        record["timings"]["load_s"] = time.time() - t0
    t1 = time.time()
    selected, files = [], []
    for fi, (path, docs, key) in enumerate(zip(forget, corpora, keys)):
        if cache is not None and key in cache:
            scores = cache[key]
        else:
            scores = score_documents(args, model, tok, docs, fi)
            if cache is not None:
                cache[key] = scores
        k = coreset_size(args.ratio, len(docs))
        idx = random_indices(len(docs), k, args.seed, fi) if scores is None else choose(scores, k, order)
        selected += [(path, i, None if scores is None else scores[i]) for i in idx]
        files.append({"file": path, "documents": len(docs), "selected": int(k),
                      "score_stats": None if scores is None else _stats(scores)})
    record["timings"]["score_s"] = time.time() - t1
    write_coreset(args.out, selected)
    record.update(method=args.method, order=order, ratio=float(parse_ratio(args.ratio)), files=files,
                  coreset=str(args.out), selected=len(selected))
    if args.method == "grand":
        record["grand"] = dict(zip(("layer_id", "layer_ids", "steering_coeff"), rmu_defaults(args, args.model)),
                               loss=args.grand_loss)
    record["timings"]["total_s"] = time.time() - t0
    atomic_write_json(run_json_path(args.out), record)
    return record


def _stats(scores):
    s = np.asarray(scores, dtype=np.float64)
    s = s[np.isfinite(s)]
    if s.size == 0:
        return None
    return {"min": float(s.min()), "median": float(np.median(s)), "max": float(s.max()), "n": int(s.size)}


def keywords_run(args, forget, corpora, record, t0):
    try:
        retain = [d for docs in data.read_corpora(split_paths(args.retain, "--retain"), args.min_chars) for d in docs]
    except data.DataError as e:
        raise CoresetError(f"--retain: {e}") from None
    out = Path(args.out)
    outs = [out] if len(forget) == 1 else [out.with_name(f"{out.stem}.{Path(p).stem}.jsonl") for p in forget]
    files = []
    for fi, (path, docs, o) in enumerate(zip(forget, corpora, outs)):
        if args.ratio is not None:
            keep = random_indices(len(docs), coreset_size(args.ratio, len(docs)), args.seed, fi)
            docs = [docs[i] for i in keep]
        kws = extract_keywords(docs, retain, args.prior_frac, args.min_z, args.min_count, args.max_keywords,
                               frozenset() if args.keep_stopwords else STOPWORDS)
        kwset = {w for w, _, _ in kws}
        texts = [t for t in (keyword_document(d, kwset) for d in docs) if t]
        if not texts:
            raise CoresetError(f"--forget {path}: no keywords found (try a lower --min-z or --min-count)")
        atomic_write_lines(o, [json.dumps({"text": t}) for t in texts])
        files.append({"file": path, "out": str(o), "documents": len(docs), "written": len(texts),
                      "keywords": [{"word": w, "z": round(z, 3), "count": c} for w, z, c in kws]})
    record.update(method="keywords", forget_out=",".join(str(o) for o in outs), files=files)
    record["timings"]["total_s"] = time.time() - t0
    atomic_write_json(run_json_path(outs[0] if len(outs) == 1 else out), record)
    return record


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "sweep":
        return sweep_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        rec = select(args)
    except (CoresetError, data.DataError) as e:
        sys.exit(f"error: {e}")
    if rec["method"] == "keywords":
        for f in rec["files"]:
            print(f"{f['file']}: {len(f['keywords'])} keywords, {f['written']}/{f['documents']} documents -> {f['out']}")
        print(f"unlearn with: --forget {rec['forget_out']}")
    else:
        for f in rec["files"]:
            print(f"{f['file']}: {f['selected']}/{f['documents']} documents ({rec['method']})")
        print(f"wrote {rec['coreset']} and {run_json_path(rec['coreset'])} in {rec['timings']['total_s']:.1f}s")
    return rec


# ----------------------------------------------------------------------------------------------- sweep

def split_list(s, flag, conv=str):
    items = [x for x in re.split(r"[,\s]+", str(s or "").strip()) if x]
    if not items:
        raise CoresetError(f"{flag}: expected at least one value (comma- or space-separated)")
    try:
        return [conv(x) for x in items]
    except ValueError:
        raise CoresetError(f"{flag} {s!r}: expected {conv.__name__} values") from None


def build_sweep_parser():
    p = argparse.ArgumentParser(
        prog="coreset.py sweep", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="The coreset sweep: select, unlearn and evaluate for every (selection, ratio, seed); then a "
                    "table (Markdown + JSON) and a plot of accuracy against coreset ratio. Reruns skip finished cells.")
    p.add_argument("--method", default="rmu", help="unlearning method (unlearn.py --method)")
    p.add_argument("--select", default="random", help="selection method(s), comma/space list: " + "|".join(METHODS)
                   + " (keywords: unlearn on the keyword-only forget set of a random `ratio` of the documents)")
    p.add_argument("--ratios", default="0.01,0.05,0.1,0.2,1.0", help="coreset ratios, comma/space list")
    p.add_argument("--seeds", default="0,1,2", help="seeds (selection and unlearning), comma/space list")
    p.add_argument("--model", default="data/toy/model")
    p.add_argument("--data", default="data/toy", help="DATA dir of the evaluation tasks")
    p.add_argument("--forget", default="data/toy/forget_corpus.jsonl")
    p.add_argument("--retain", default="data/toy/retain_corpus.jsonl")
    p.add_argument("--tasks", default="toy_hazard,toy_general", help="evaluation tasks")
    p.add_argument("--utility-tasks", default=",".join(UTILITY_TASKS),
                   help="tasks that measure retained utility (the others are forget tasks)")
    p.add_argument("--steps", type=int, default=None, help="unlearning steps (default: unlearn.py's, the same for "
                   "every ratio: a coreset is cycled)")
    p.add_argument("--out", default="runs/sweep")
    p.add_argument("--unlearn-args", default="", help="extra unlearn.py flags, e.g. \"--lr 1e-4 --batch-size 4\"")
    p.add_argument("--select-args", default="", help="extra selection flags, e.g. \"--mink-k 0.2 --order high\"")
    p.add_argument("--eval-batch-size", type=int, default=32)
    p.add_argument("--eval-limit", type=int, default=None)
    p.add_argument("--keep-models", action="store_true", help="keep each cell's unlearned checkpoint")
    p.add_argument("--report-only", action="store_true", help="only rebuild the table and plot from finished cells")
    p.add_argument("--docs", default=None, help="also copy results.{md,json,png} to this prefix (e.g. docs/coreset_sweep)")
    p.add_argument("--device", default=None)
    p.add_argument("--no-progress", action="store_true")
    return p


def cell_name(select_method, ratio, seed):
    return f"{select_method}_r{ratio:g}_s{seed}"


def task_metrics(results):
    """{task: evaluate result} -> {name: value}: a task's acc (MC), else its numeric metrics as task/metric."""
    out = {}
    for task, r in (results or {}).items():
        if isinstance(r.get("acc"), (int, float)):
            out[task] = float(r["acc"])
            continue
        for k, v in r.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not k.endswith(("stderr", "_s", "per_s")) \
                    and k not in ("n", "time_s"):
                out[f"{task}/{k}"] = float(v)
    return out


def full_set(ratio, sizes):
    return all(coreset_size(ratio, n) == n for n in sizes)


def unlearn_argv(args, seed, cdir, forget=None):
    """unlearn.py's flags for one cell (the coreset flag is added by run_cell)."""
    import shlex
    argv = ["--method", args.method, "--model", args.model, "--forget", forget or args.forget, "--retain", args.retain,
            "--seed", str(seed), "--out", str(cdir), "--data", args.data, "--eval-tasks", args.tasks,
            "--eval-batch-size", str(args.eval_batch_size)]
    if args.steps is not None:
        argv += ["--steps", str(args.steps)]
    if args.eval_limit is not None:
        argv += ["--eval-limit", str(args.eval_limit)]
    if args.device:
        argv += ["--device", args.device]
    if not args.keep_models:
        argv.append("--no-save")
    if args.no_progress:
        argv.append("--no-progress")
    return argv + shlex.split(args.unlearn_args)


def run_cell(args, sel, ratio, seed, sizes, cache):
    """One (selection, ratio, seed) cell: select, unlearn.run, evaluate. Returns the cell's result dict."""
    import shlex
    import shutil
    import unlearn
    cdir = Path(args.out) / "cells" / cell_name(sel, ratio, seed)
    t0 = time.time()
    coreset_file, selection, forget = None, None, None
    if sel == "keywords":   # the keyword-only forget set of a random `ratio` of the documents
        sargv = ["--method", "keywords", "--forget", args.forget, "--retain", args.retain, "--ratio", f"{ratio:g}",
                 "--seed", str(seed), "--out", str(cdir / "keywords.jsonl")]
        selection = select(build_parser().parse_args(sargv + shlex.split(args.select_args)))
        forget = selection["forget_out"]
    elif not full_set(ratio, sizes):
        # random included: the same documents as unlearn.py --ratio (random_indices), written for the record
        sargv = ["--method", sel, "--model", args.model, "--forget", args.forget, "--retain", args.retain,
                 "--ratio", f"{ratio:g}", "--seed", str(seed), "--out", str(cdir / "coreset.jsonl")]
        if args.device:
            sargv += ["--device", args.device]
        if args.no_progress:
            sargv.append("--no-progress")
        if sel == "grand":
            ua = unlearn.resolve_args(unlearn.build_parser().parse_args(unlearn_argv(args, seed, cdir)))
            sargv += ["--grand-loss", "rmu" if args.method == "rmu" else "npo", "--layer-id", str(ua.layer_id),
                      "--layer-ids", str(ua.layer_ids), "--steering-coeff", str(ua.steering_coeffs).split(",")[0]]
        sargs = build_parser().parse_args(sargv + shlex.split(args.select_args))
        selection = select(sargs, cache=cache)
        coreset_file = str(cdir / "coreset.jsonl")
    uargv = unlearn_argv(args, seed, cdir, forget) + (["--coreset", coreset_file] if coreset_file else [])
    uargs = unlearn.build_parser().parse_args(uargv)
    rec = unlearn.run(uargs)
    ev = rec.get("eval") or {}
    result = {
        "select": sel, "ratio": ratio, "seed": seed, "method": args.method,
        "n_docs": rec.get("coreset", {}).get("n_docs", sizes),
        "n_selected": rec.get("coreset", {}).get("n_selected"),
        "coreset": coreset_file, "forget": forget or args.forget,
        "selection_s": None if selection is None else selection["timings"].get("total_s"),
        "steps": rec.get("steps"), "train_s": rec.get("train_s"), "time_s": round(time.time() - t0, 3),
        "before": task_metrics(ev.get("before")), "after": task_metrics(ev.get("after")),
        "unlearn_args": rec.get("args"),
    }
    if not args.keep_models:
        shutil.rmtree(cdir / "model", ignore_errors=True)
    atomic_write_json(cdir / "result.json", result)
    return result


def mean_std(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    m = float(np.mean(xs))
    return m, float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0


def aggregate(cells, utility_tasks):
    """Finished cells -> {"base", "metrics", "forget_metrics", "utility_metrics", "rows"} (rows: mean/std over seeds
    per (selection, ratio))."""
    metrics = list(dict.fromkeys(k for c in cells for k in c["after"]))
    base = {}
    for c in cells:
        for k, v in c["before"].items():
            base.setdefault(k, v)
    util = [m for m in metrics if m.split("/")[0] in utility_tasks]
    groups = {}
    for c in cells:
        groups.setdefault((c["select"], c["ratio"]), []).append(c)
    rows = []
    first = {s: i for i, s in reversed(list(enumerate(c["select"] for c in cells)))}   # the grid's order
    for (sel, ratio), cs in sorted(groups.items(), key=lambda kv: (first[kv[0][0]], kv[0][1])):
        cs = sorted(cs, key=lambda c: c["seed"])
        row = {"select": sel, "ratio": ratio, "seeds": [c["seed"] for c in cs],
               "n_selected": cs[0].get("n_selected"), "n_docs": cs[0].get("n_docs"),
               "time_s": float(np.mean([c["time_s"] for c in cs])), "metrics": {}}
        for m in metrics:
            vals = [c["after"].get(m) for c in cs]
            mu, sd = mean_std(vals)
            row["metrics"][m] = {"mean": mu, "std": sd, "values": vals}
        rows.append(row)
    return {"base": base, "metrics": metrics, "utility_metrics": util,
            "forget_metrics": [m for m in metrics if m not in util], "rows": rows}


def fmt_pct(v, sd=None):
    if v is None:
        return "-"
    scale = 100 if abs(v) <= 1 else 1
    s = f"{scale * v:.1f}"
    return s if sd is None else f"{s} ± {scale * sd:.1f}"


def ratio_label(r):
    return f"{100 * r:g}%" if r <= 1 else f"{int(r)} docs"


def _quote(a):
    import shlex
    return shlex.quote(str(a))


def markdown_table(agg, title, notes=()):
    ms = agg["forget_metrics"] + agg["utility_metrics"]
    tag = {m: "forget" if m in agg["forget_metrics"] else "utility" for m in ms}
    head = ["selection", "ratio", "docs"] + [f"{m} ({tag[m]})" for m in ms] + ["seeds", "time/cell"]
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines.append("| base model | - | - | " + " | ".join(fmt_pct(agg["base"].get(m)) for m in ms) + " | - | - |")
    for r in agg["rows"]:
        docs = "+".join(str(n) for n in (r["n_selected"] or [])) or "-"
        vals = [fmt_pct(r["metrics"][m]["mean"], r["metrics"][m]["std"]) for m in ms]
        lines.append(f"| {r['select']} | {ratio_label(r['ratio'])} | {docs} | " + " | ".join(vals)
                     + f" | {len(r['seeds'])} | {r['time_s']:.0f}s |")
    lines += ["", "Accuracy in % (mean ± sample std over seeds); base model = before unlearning; docs = selected "
              "documents per forget file; time/cell = selection + unlearning + evaluation, mean over seeds.",
              *notes]
    return "\n".join(lines) + "\n"


def plot(agg, path, title):
    """Accuracy against coreset ratio with error bars (or bars per selection at a single ratio) -> PNG."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("coreset sweep: matplotlib is not installed, no plot (pip install matplotlib, or "
              "pip install -e '.[plot]'); the table is written", file=sys.stderr)
        return None
    ms = agg["forget_metrics"] + agg["utility_metrics"]
    sels = list(dict.fromkeys(r["select"] for r in agg["rows"]))
    ratios = sorted({r["ratio"] for r in agg["rows"]})
    scale = lambda v: None if v is None else (100 * v if abs(v) <= 1 else v)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    if len(ratios) == 1 and len(sels) > 1:   # sweep-select: bars per selection method
        w = 0.8 / len(ms)
        for j, m in enumerate(ms):
            rows = {r["select"]: r for r in agg["rows"]}
            ys = [scale(rows[s]["metrics"][m]["mean"]) for s in sels]
            es = [scale(rows[s]["metrics"][m]["std"]) for s in sels]
            ax.bar(np.arange(len(sels)) + (j - (len(ms) - 1) / 2) * w, ys, w, yerr=es, capsize=3,
                   color=colors[j % len(colors)], label=m)
            if m in agg["base"]:
                ax.axhline(scale(agg["base"][m]), color=colors[j % len(colors)], ls="--", lw=1,
                           label=f"{m} (base)")
        if ms and all("/" not in m for m in ms):
            ax.axhline(25, color="gray", ls=":", lw=1, label="chance (4 choices)")
        ax.set_xticks(np.arange(len(sels)), sels)
        ax.set_xlabel(f"selection method (coreset ratio {ratio_label(ratios[0])})")
    else:
        for j, m in enumerate(ms):
            c = colors[j % len(colors)]
            for k, s in enumerate(sels):
                rows = sorted((r for r in agg["rows"] if r["select"] == s), key=lambda r: r["ratio"])
                xs = [r["ratio"] for r in rows]
                ys = [scale(r["metrics"][m]["mean"]) for r in rows]
                es = [scale(r["metrics"][m]["std"]) for r in rows]
                ax.errorbar(xs, ys, yerr=es, color=c, marker="os^vD<>"[k % 7], capsize=3,
                            ls="-" if m in agg["forget_metrics"] else "-.",
                            label=m + ("" if len(sels) == 1 else f" ({s})"))
            if m in agg["base"]:
                ax.axhline(scale(agg["base"][m]), color=c, ls="--", lw=1, label=f"{m} (base model)")
        if ms and all("/" not in m for m in ms):   # multiple-choice accuracies: 4 choices
            ax.axhline(25, color="gray", ls=":", lw=1, label="chance (4 choices)")
        if all(r <= 1 for r in ratios):
            ax.set_xscale("log")
            ax.set_xticks(ratios, [ratio_label(r) for r in ratios])
            ax.minorticks_off()
        ax.set_xlabel("coreset ratio (fraction of the forget set)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def report(args, sels, ratios, seeds, record, with_plot=True):
    out = Path(args.out)
    cells = []
    for s in sels:
        for r in ratios:
            for seed in seeds:
                f = out / "cells" / cell_name(s, r, seed) / "result.json"
                if f.is_file():
                    cells.append(json.loads(f.read_text()))
    if not cells:
        raise CoresetError(f"--out {out}: no finished cells to report")
    agg = aggregate(cells, set(split_list(args.utility_tasks, "--utility-tasks")))
    what = f"{'/'.join(sels)} coresets" if len(sels) <= 2 else f"{len(sels)} selection methods"
    title = f"{args.method.upper()} on {Path(args.forget.split(',')[0]).parent.name or args.forget}: " \
            f"{what}, {len(seeds)} seed(s), {cells[0].get('steps')} steps"
    done = len(cells)
    total = len(sels) * len(ratios) * len(seeds)
    cell_s = sum(c["time_s"] for c in cells)
    notes = ["", f"{done}/{total} cells done, {cell_s / 60:.1f} min of cell time on {record.get('device')}. Command:",
             "", "    python coreset.py sweep " + " ".join(_quote(a) for a in record.get("argv", [])[2:])]
    md = markdown_table(agg, title, notes)
    record.update(results=agg, cells_done=len(cells), cells_total=len(sels) * len(ratios) * len(seeds))
    atomic_write_json(out / "results.json", record)
    atomic_write_lines(out / "results.md", md.rstrip("\n").split("\n"))
    png = plot(agg, out / "results.png", title) if with_plot else None
    if args.docs:
        import shutil
        prefix = Path(args.docs)
        prefix.parent.mkdir(parents=True, exist_ok=True)
        for ext, src in (("md", out / "results.md"), ("json", out / "results.json"), ("png", png)):
            if src is not None and Path(src).is_file():
                shutil.copyfile(src, f"{prefix}.{ext}")
    if with_plot:
        print(md)
    return agg


def sweep(args):
    """The whole grid -> the aggregate (also results.{json,md,png} in --out)."""
    t0 = time.time()
    sels = split_list(args.select, "--select")
    for s in sels:
        if s not in METHODS:
            raise CoresetError(f"--select {s!r}: expected some of {', '.join(METHODS)}")
    ratios = [parse_ratio(r, "--ratios") for r in split_list(args.ratios, "--ratios")]
    seeds = split_list(args.seeds, "--seeds", int)
    forget = split_paths(args.forget, "--forget")
    try:
        sizes = [len(data.read_corpus(p)) for p in forget]
    except data.DataError as e:
        raise CoresetError(f"--forget: {e}") from None
    out = Path(args.out)
    record = run_info(args)
    record["timings"] = {}
    if not args.report_only:
        cache = {}   # selection scores per (method, file): scored once for every ratio (GraNd: per seed)
        grid = [(s, r, seed) for s in sels for r in ratios for seed in seeds]
        todo = [g for g in grid if not (out / "cells" / cell_name(*g) / "result.json").is_file()]
        print(f"coreset sweep: {len(grid)} cells, {len(grid) - len(todo)} done, {len(todo)} to run -> {out}")
        for i, (s, r, seed) in enumerate(todo):
            print(f"--- cell {i + 1}/{len(todo)}: select={s} ratio={r:g} seed={seed} "
                  f"({time.time() - t0:.0f}s elapsed)", flush=True)
            run_cell(args, s, r, seed, sizes, cache)
            report(args, sels, ratios, seeds, dict(record, timings={"total_s": time.time() - t0}), with_plot=False)
    record["timings"]["total_s"] = time.time() - t0
    return report(args, sels, ratios, seeds, record)


def sweep_main(argv):
    args = build_sweep_parser().parse_args(argv)
    err = (CoresetError, data.DataError, CheckpointError)
    try:
        import evaluate
        import unlearn
        err += (unlearn.UnlearnError, evaluate.EvalError)
    except (ImportError, AttributeError):
        pass
    try:
        return sweep(args)
    except err as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
