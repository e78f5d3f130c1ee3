"""The math of unlearning and of document scoring, as pure functions of tensors (no model, no files).

RMU (REFERENCE section 2)
    control_vector(d, coeff, seed, topic)       c = coeff * u / ||u||, u ~ U[0, 1)^d: the one definition, used by
                                                training and by GraNd-RMU scoring alike
    mse(a, b, counted)                          fp32 mean squared error over (B, T, d), optionally over counted tokens
    rmu_loss(act_f, c, act_r, act_r_frozen, alpha, ...)   mse(h_f, c) + alpha * mse(h_r, h_r^frozen)
    content_positions(ids, mask, bos_id)        real tokens other than BOS (the toy's masked loss)
NPO family (REFERENCE section 3), per sequence, from sequence log-probs
    npo_loss(logp, ref_logp, beta)              -(2/beta) logsigmoid(-beta (logp - ref))
    simnpo_loss(logp_mean, beta, delta)         -(2/beta) logsigmoid(-beta logp_mean - delta)
    kl_ref_current(h, W, h_ref, W_ref)          mean KL(p_ref || p_cur) over rows, chunked
    next_token_targets(ids, mask)               (B, T) targets, -100 at padding and at the last position
Membership scores (REFERENCE section 5; coreset selection and MUSE PrivLeak)
    min_k_score(logprob, k)                     Min-K% Prob: -mean of the lowest k of the token log-probs
    min_kpp_score(logprob, mu, sigma, k)        Min-K%++ on (log p - mu_t) / sigma_t
    zlib_score(loss, text)                      mean token NLL / zlib-compressed bytes
Keyword scores (the paper's keyword-only forget sets)
    log_odds_z(forget_counts, retain_counts)    log-odds ratio z-scores with an informative Dirichlet prior
    extract_keywords(forget_docs, retain_docs)  the words that mark the forget set; keyword_document reduces to them
"""
import math
import re
import zlib
from collections import Counter

import numpy as np
import torch
import torch.nn.functional as F

MIN_K = 0.4          # Min-K% / Min-K%++ fraction of the lowest tokens (MUSE's 40%)
MIN_KPP_EPS = 1e-6   # floor on sigma_t in Min-K%++ (a one-hot next-token distribution has sigma 0)
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


# ----------------------------------------------------------------------------------------------- RMU

def control_vector(d, coeff, seed, topic=0, dtype=torch.float32) -> torch.Tensor:
    """RMU's control vector of forget topic `topic` in a run seeded with `seed`: (1, 1, d), in `dtype`.
    As the reference: one generator seeded once per run, one u ~ U[0, 1)^(1, 1, d) per topic in topic order, cast
    to the model's dtype, then c = u / ||u|| * coeff (the norm taken in that dtype)."""
    gen = torch.Generator().manual_seed(int(seed))
    for _ in range(int(topic) + 1):
        u = torch.rand(1, 1, int(d), generator=gen).to(dtype)
    return u / torch.norm(u) * coeff


def mse(a, b, counted=None):
    """Mean squared error in fp32 over (B, T, d); with counted (B, T) over those tokens only."""
    diff = (a.float() - b.float()) ** 2
    if counted is None:
        return diff.mean()
    m = counted[..., None].to(diff.dtype)
    return (diff * m).sum() / (m.sum() * a.shape[-1]).clamp_min(1)


def rmu_loss(act_f, c, act_r, act_r_frozen, alpha, f_counted=None, r_counted=None):
    """RMU's loss from the steered activations -> (loss, forget term, retain term before alpha).
    act_f (B, Tf, d) forget activations, c (1, 1, d), act_r / act_r_frozen (B, Tr, d) retain activations of the
    updated and the frozen model; *_counted (B, T): the tokens averaged over (None: every position, as the reference)."""
    lf = mse(act_f, c.expand_as(act_f), f_counted)
    lr = mse(act_r, act_r_frozen, r_counted)
    return lf + alpha * lr, lf, lr


def content_positions(ids, mask, bos_id):
    """(B, T) bool: real tokens other than BOS. The BOS activation is the same in every document (nothing
    precedes it), so the forget term would push it to c while the retain term holds it: a pure conflict."""
    keep = mask.bool()
    return keep & (ids != bos_id) if bos_id is not None else keep


# ----------------------------------------------------------------------------------------------- NPO family

def next_token_targets(ids, mask):
    """(B, T) next-token targets: ids shifted left, -100 at padding and at the last position."""
    tgt = torch.full_like(ids, -100)
    tgt[:, :-1] = torch.where(mask[:, 1:].bool(), ids[:, 1:], -100)
    return tgt


def count_targets(ids, mask) -> int:
    """The number of next-token targets of a batch: what a token-mean loss averages over."""
    return int((next_token_targets(ids, mask) != -100).sum())


def npo_loss(logp, ref_logp, beta):
    """(S,) NPO loss per sequence from sequence log-probs under the model and the reference."""
    return -(2.0 / beta) * F.logsigmoid(-beta * (logp - ref_logp))


def simnpo_loss(logp_mean, beta, delta):
    """(S,) SimNPO loss per sequence from token-mean log-probs (no reference model)."""
    return -(2.0 / beta) * F.logsigmoid(-beta * logp_mean - delta)


def kl_ref_current(h, W, h_ref, W_ref, chunk=1024):
    """mean over rows of KL(p_ref || p_cur), p = softmax(h @ W.T); h, h_ref (N, d), W, W_ref (V, d).
    Chunked over rows and recomputed in backward: the (N, V) distributions never exist whole."""
    from torch.utils.checkpoint import checkpoint

    def part(hc, hrc):
        lc = torch.log_softmax((hc @ W.T).float(), -1)                          # (n, V)
        lr = torch.log_softmax((hrc @ W_ref.T).float(), -1)
        return (lr.exp() * (lr - lc)).sum()
    total = h.new_zeros((), dtype=torch.float32)
    for a in range(0, h.shape[0], chunk):
        total = total + checkpoint(part, h[a:a + chunk], h_ref[a:a + chunk], use_reentrant=False)
    return total / max(1, h.shape[0])


# ----------------------------------------------------------------------------------------------- scores

def min_k_score(logprob, k=MIN_K) -> float:
    """Min-K% Prob (Shi et al.; MUSE): -mean of the int(k * n) lowest token log-probs (at least one).
    logprob (n,) -> float (nan for an empty document)."""
    lp = np.sort(np.asarray(logprob, dtype=np.float64))
    if lp.size == 0:
        return float("nan")
    m = max(1, int(lp.size * k))
    return float(-lp[:m].mean())


def min_kpp_score(logprob, mean_logp, std_logp, k=MIN_K, eps=MIN_KPP_EPS) -> float:
    """Min-K%++: -mean of the lowest k of z_t = (log p(x_t) - mu_t) / sigma_t. Each arg (n,) -> float."""
    lp = np.asarray(logprob, dtype=np.float64)
    z = (lp - np.asarray(mean_logp, dtype=np.float64)) / np.maximum(np.asarray(std_logp, dtype=np.float64), eps)
    return min_k_score(z, k)


def zlib_score(loss, text) -> float:
    """Carlini et al.'s zlib ratio: mean token NLL / zlib-compressed length (bytes) of the text."""
    return float(loss) / max(1, len(zlib.compress(text.encode("utf-8"))))


# ----------------------------------------------------------------------------------------------- keyword scores

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
