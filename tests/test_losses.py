"""losses.py: the pure math of unlearning and document scoring, against hand-computed float64 values.

Min-K% / Min-K%++ / zlib are the scores of coreset selection (coreset.py) and of MUSE PrivLeak (muse_eval.py); the
control vector is RMU's, shared by training (unlearn.train_rmu) and GraNd-RMU scoring (coreset.score_documents);
the keyword scores make coreset.py's keyword-only forget sets."""
import math
import zlib
from collections import Counter

import numpy as np
import pytest
import torch

import losses as L


# ----------------------------------------------------------------------------------------------- Min-K%, Min-K%++

def test_min_k_hand_values():
    assert L.MIN_K == 0.4   # MUSE's forget_holdout_Min-40%
    # int(0.4 * 5) = 2 lowest of {-1, -5, -0.1, -3, -2}: -5 and -3 -> 4
    assert L.min_k_score([-1.0, -5.0, -0.1, -3.0, -2.0]) == 4.0
    assert L.min_k_score([-2.0]) == 2.0                       # at least one token
    assert L.min_k_score([-2.0, -1.0]) == 2.0                 # int(0.8) = 0 -> 1 token
    assert L.min_k_score([-1.0, -5.0, -0.1, -3.0, -2.0], k=1.0) == pytest.approx(11.1 / 5, abs=1e-15)
    assert L.min_k_score([-1.0, -5.0, -0.1, -3.0, -2.0], k=0.2) == 5.0
    assert math.isnan(L.min_k_score([]))
    # torch and numpy inputs, any float dtype: computed in float64
    assert L.min_k_score(torch.tensor([-1.0, -5.0, -0.1, -3.0, -2.0])) == pytest.approx(4.0, abs=1e-7)
    x = np.array([-0.1, -0.2, -0.3], dtype=np.float32)
    assert L.min_k_score(x, k=1.0) == pytest.approx(float(-(np.float64(x[0]) + np.float64(x[1]) + np.float64(x[2])) / 3),
                                                    abs=1e-15)


def test_min_k_against_float64_sort():
    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 7, 50, 513):
        lp = -rng.exponential(2.0, n)
        for k in (0.1, 0.4, 1.0):
            m = max(1, int(n * k))
            assert L.min_k_score(lp, k) == pytest.approx(-np.sort(lp)[:m].mean(), rel=1e-14)
            assert L.min_k_score(lp[::-1].copy(), k) == L.min_k_score(lp, k)   # order-free


def test_min_kpp_hand_values():
    lp = [-1.0, -4.0, -0.5, -2.0, -3.0]
    mu = [-1.5, -2.0, -1.0, -2.0, -1.0]
    sd = [0.5, 1.0, 0.25, 2.0, 4.0]
    # z = (lp - mu) / sd = [1, -2, 2, 0, -0.5]; int(0.4 * 5) = 2 lowest: -2, -0.5 -> 1.25
    assert L.min_kpp_score(lp, mu, sd) == 1.25
    assert L.min_kpp_score(lp, mu, sd, k=1.0) == pytest.approx(-(1 - 2 + 2 + 0 - 0.5) / 5, abs=1e-15)
    # sigma 0 (a one-hot next-token distribution) is floored at MIN_KPP_EPS, never a division by zero
    z = L.min_kpp_score([-1.0], [-0.5], [0.0], k=1.0)
    assert z == pytest.approx(0.5 / L.MIN_KPP_EPS) and math.isfinite(z)
    assert math.isnan(L.min_kpp_score([], [], []))


# ----------------------------------------------------------------------------------------------- zlib

def test_zlib_score_hand_values():
    text = "the virus the virus the virus"
    n = len(zlib.compress(text.encode("utf-8")))
    assert L.zlib_score(2.5, text) == 2.5 / n
    uni = "Senjō no Valkyria ─ ü"                                   # bytes, not characters
    assert L.zlib_score(1.0, uni) == 1.0 / len(zlib.compress(uni.encode("utf-8")))
    assert L.zlib_score(torch.tensor(3.0), "a") == 3.0 / len(zlib.compress(b"a"))
    assert L.zlib_score(1.0, "") == 1.0 / len(zlib.compress(b""))    # never a division by zero
    assert L.zlib_score(1.0, "abc" * 100) > L.zlib_score(1.0, "a different, less repetitive text of similar size")


# ----------------------------------------------------------------------------------------------- control vector

def test_control_vector_is_the_references():
    """The reference (WMDP rmu/unlearn.py): one generator seeded once per run; per topic in order u = rand(1, 1, d)
    cast to the model's dtype; c = u / ||u|| * coeff."""
    d, seed = 24, 3
    gen = torch.Generator().manual_seed(seed)
    us = [torch.rand(1, 1, d, generator=gen) for _ in range(3)]
    for t, coeff in enumerate((6.5, 1000.0, 2.0)):
        c = L.control_vector(d, coeff, seed, t)
        assert c.shape == (1, 1, d) and c.dtype == torch.float32
        torch.testing.assert_close(c, us[t] / torch.norm(us[t]) * coeff, rtol=0, atol=0)
        c64 = us[t].double()
        assert torch.norm(c.double()).item() == pytest.approx(coeff, rel=1e-6)
        torch.testing.assert_close(c.double(), c64 / c64.norm() * coeff, rtol=1e-6, atol=0)
        assert (c > 0).all()                                           # u ~ U[0, 1): one orthant
    assert torch.equal(L.control_vector(d, 6.5, seed, 1), L.control_vector(d, 6.5, seed, 1))
    assert not torch.equal(L.control_vector(d, 6.5, seed, 0), L.control_vector(d, 6.5, seed, 1))
    assert not torch.equal(L.control_vector(d, 6.5, 0, 0), L.control_vector(d, 6.5, 1, 0))


def test_control_vector_dtype_cast_before_the_norm():
    d, seed = 64, 1
    u = torch.rand(1, 1, d, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
    c = L.control_vector(d, 6.5, seed, 0, torch.bfloat16)
    assert c.dtype == torch.bfloat16
    assert torch.equal(c, u / torch.norm(u) * 6.5)
    assert torch.norm(c.double()).item() == pytest.approx(6.5, rel=2e-2)


# ----------------------------------------------------------------------------------------------- RMU loss

def test_mse_and_rmu_loss_hand_values():
    a = torch.tensor([[[1.0, 2.0], [3.0, 5.0]]])                       # (1, 2, 2)
    b = torch.zeros(1, 2, 2)
    assert L.mse(a, b).item() == (1 + 4 + 9 + 25) / 4
    counted = torch.tensor([[True, False]])
    assert L.mse(a, b, counted).item() == (1 + 4) / 2                  # over the counted tokens' d values
    assert L.mse(a.to(torch.bfloat16), b.to(torch.bfloat16)).dtype == torch.float32
    assert L.mse(a, b, torch.zeros(1, 2, dtype=torch.bool)).item() == 0.0   # nothing counted: 0, not nan
    g = torch.Generator().manual_seed(0)
    f, r, r0 = (torch.randn(2, 3, 4, generator=g, dtype=torch.float64) for _ in range(3))
    c = torch.rand(1, 1, 4, generator=g, dtype=torch.float64)
    loss, lf, lr = L.rmu_loss(f, c, r, r0, alpha=30.0)
    want_f = ((f - c) ** 2).mean().item()
    want_r = ((r - r0) ** 2).mean().item()
    assert lf.item() == pytest.approx(want_f, rel=1e-6) and lr.item() == pytest.approx(want_r, rel=1e-6)
    assert loss.item() == pytest.approx(want_f + 30.0 * want_r, rel=1e-6)


def test_content_positions_drop_bos_and_padding():
    ids = torch.tensor([[0, 5, 6, 2], [2, 2, 0, 7]])
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 1, 1]])
    assert L.content_positions(ids, mask, 0).tolist() == [[False, True, True, False], [False, False, False, True]]
    assert L.content_positions(ids, mask, None).tolist() == mask.bool().tolist()


# ----------------------------------------------------------------------------------------------- NPO family

def test_next_token_targets():
    ids = torch.tensor([[1, 5, 6, 7], [1, 8, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    assert L.next_token_targets(ids, mask).tolist() == [[5, 6, 7, -100], [8, -100, -100, -100]]


def test_npo_and_simnpo_float64_hand_values():
    logp = torch.tensor([-10.0, -4.0, -41.0], dtype=torch.float64)
    ref = torch.tensor([-12.0, -4.0, -30.0], dtype=torch.float64)
    beta = 0.1
    # -(2/beta) log sigmoid(-beta (logp - ref)) = (2/beta) log(1 + exp(beta (logp - ref)))
    want = [(2 / beta) * math.log1p(math.exp(beta * (a - b))) for a, b in zip(logp.tolist(), ref.tolist())]
    got = L.npo_loss(logp, ref, beta)
    assert got.dtype == torch.float64 and got.tolist() == pytest.approx(want, rel=1e-13)
    assert got[1].item() == pytest.approx(2 / beta * math.log(2), rel=1e-14)    # logp = ref
    # at theta = ref the gradient of NPO is grad logp (2 sigmoid(0) = 1): GraNd-NPO's premise
    x = logp.clone().requires_grad_(True)
    L.npo_loss(x, x.detach(), beta).sum().backward()
    assert x.grad.tolist() == pytest.approx([1.0, 1.0, 1.0], abs=1e-14)
    delta = 0.5
    want = [(2 / beta) * math.log1p(math.exp(beta * a + delta)) for a in logp.tolist()]
    assert L.simnpo_loss(logp, beta, delta).tolist() == pytest.approx(want, rel=1e-13)


def test_kl_ref_current_float64():
    g = torch.Generator().manual_seed(0)
    h, hr = torch.randn(7, 5, generator=g, dtype=torch.float64), torch.randn(7, 5, generator=g, dtype=torch.float64)
    W, Wr = torch.randn(11, 5, generator=g, dtype=torch.float64), torch.randn(11, 5, generator=g, dtype=torch.float64)
    pc, pr = torch.softmax(h @ W.T, -1), torch.softmax(hr @ Wr.T, -1)
    want = (pr * (pr.log() - pc.log())).sum(-1).mean().item()
    assert L.kl_ref_current(h, W, hr, Wr, chunk=3).item() == pytest.approx(want, rel=1e-5)   # fp32 log-softmax
    assert L.kl_ref_current(h, W, h, W).item() == pytest.approx(0.0, abs=1e-6)


# ----------------------------------------------------------------------------------------------- keywords

def test_log_odds_z_hand_values():
    """Monroe et al.'s z with prior_frac 0.5: n_f = n_r = 4, a_0 = 4, a_w = 2 for both words.
    a: y_f = 3, y_r = 1 -> delta = log(5 / 3) - log(3 / 5), var = 1/5 + 1/3; b is the mirror image."""
    z = L.log_odds_z(Counter(a=3, b=1), Counter(a=1, b=3), prior_frac=0.5)
    want = (math.log(5 / 3) - math.log(3 / 5)) / math.sqrt(1 / 5 + 1 / 3)
    assert z["a"] == pytest.approx(want, rel=1e-14) and z["b"] == pytest.approx(-want, rel=1e-14)
    # a word only in the retain corpus: y_f = 0, a_w = 4 * 2 / 8 = 1
    z = L.log_odds_z(Counter(a=4), Counter(a=2, c=2), prior_frac=0.5)
    want_c = (math.log(1 / (4 + 4 - 0 - 1)) - math.log(3 / (4 + 4 - 2 - 1))) / math.sqrt(1 / 1 + 1 / 3)
    assert z["c"] == pytest.approx(want_c, rel=1e-14) and z["a"] > 0


def test_keywords_on_a_hand_made_corpus():
    forget = ["The anthrax spores were grown in the lab.", "Anthrax toxin and the spores of the culture.",
              "In the lab, the toxin is purified from anthrax."] * 3
    retain = ["The cat sat on the mat.", "The river was in the valley and the stone was in the river.",
              "A lab is a room."] * 5
    kws = L.extract_keywords(forget, retain, min_z=1.0)
    words = [w for w, _, _ in kws]
    assert {"anthrax", "spores", "toxin"} <= set(words)
    assert "the" not in words and "cat" not in words
    assert words[0] == "anthrax"                       # the most frequent forget-only word leads
    assert [z for _, z, _ in kws] == sorted((z for _, z, _ in kws), reverse=True)
    fc = Counter(w.lower() for d in forget for w in L.words(d))
    rc = Counter(w.lower() for d in retain for w in L.words(d))
    z = L.log_odds_z(fc, rc)
    assert kws == [(w, z[w], fc[w]) for w in words] and all(z[w] >= 1.0 and fc[w] >= 2 for w in words)
    assert "the" in [w for w, _, _ in L.extract_keywords(forget, retain, min_z=-100, stopwords=frozenset())]
    assert len(L.extract_keywords(forget, retain, min_z=-100, max_keywords=2)) == 2
    assert L.keyword_document("The Anthrax spores, the cat.", set(words)) == "Anthrax spores"
    assert L.words("Covid-19's wave, 42 x2 R2-D2 _a") == ["Covid-19's", "wave", "x2", "R2-D2", "a"]
