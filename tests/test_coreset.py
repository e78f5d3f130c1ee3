"""coreset.py on a tiny random model: every selection method (determinism, ratio semantics, scores against direct
float64 / per-document computations), keyword extraction, the coreset file as unlearn.py reads it, the sweep's
resume and report, and one-line errors."""
import json
import math
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

import coreset as C
import helpers
from helpers import bpe_tokenizer
from model import ModelConfig, Transformer, load_tokenizer

WORDS = "the virus spores toxin anthrax lab culture cat sat on mat with hat river stone".split()


@pytest.fixture(autouse=True)
def reference_kernels(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # kernels' fast chunked PyTorch path on CPU


def make_tokenizer(path: Path):
    return bpe_tokenizer(path, [" ".join(WORDS)] * 20, {"bos_token": "<s>", "eos_token": "</s>"})


def write_corpus(path, n, seed, lo=1, hi=25):
    return helpers.write_corpus(path, n, seed, WORDS, lo, hi)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 3-layer random Llama (GQA, odd vocab) with a BPE tokenizer and two forget corpora."""
    root = tmp_path_factory.mktemp("tiny")
    V = make_tokenizer(root / "tok")
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, max_position_embeddings=256, bos_token_id=0, eos_token_id=1)
    m = Transformer(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    m.save_pretrained(root / "model", tokenizer_dir=root / "tok")
    f1 = write_corpus(root / "f1.jsonl", 13, 1)
    f2 = write_corpus(root / "f2.jsonl", 9, 2)
    return dict(root=root, model=str(root / "model"), f1=f1, f2=f2)


def sel_args(tiny, out, *extra, method="random", ratio="0.3", forget=None):
    argv = ["--method", method, "--model", tiny["model"], "--forget", forget or f"{tiny['f1']},{tiny['f2']}",
            "--ratio", str(ratio), "--out", str(out), "--batch-size", "4", "--no-progress",
            "--layer-id", "2", "--layer-ids", "1,2", *extra]
    return C.build_parser().parse_args(argv)


def read_lines(path):
    return [json.loads(x) for x in Path(path).read_text().splitlines()]


# ----------------------------------------------------------------------------------------------- ratios

def test_ratio_semantics():
    assert C.coreset_size(0.05, 100) == 5          # fraction
    assert C.coreset_size(0.3, 10) == 3
    assert C.coreset_size(1.0, 7) == 7             # 1 = the whole file
    assert C.coreset_size(0.001, 50) == 1          # at least one document
    assert C.coreset_size(3, 10) == 3              # above 1: a count
    assert C.coreset_size(50, 10) == 10            # ... capped at the file's size
    for bad in (0, -0.5, 2.5, "x", float("nan")):
        with pytest.raises(C.CoresetError):
            C.parse_ratio(bad)


def test_random_matches_unlearn_ratio_and_is_seeded():
    import unlearn
    for n, r, seed, t in [(100, 0.05, 0, 0), (37, 0.2, 3, 1), (9, 4, 1, 0)]:
        k = C.coreset_size(r, n)
        assert list(C.random_indices(n, k, seed, t)) == unlearn.random_subset(n, r, seed, t)
    a = C.random_indices(200, 10, 0)
    assert list(a) == list(C.random_indices(200, 10, 0)) and list(a) != list(C.random_indices(200, 10, 1))


def test_choose_order_ties_and_nan():
    s = np.array([0.5, np.nan, 0.9, 0.5, 0.1])
    assert list(C.choose(s, 2, "high")) == [0, 2]      # 0.9, then the tie 0.5 goes to the lower index
    assert list(C.choose(s, 2, "low")) == [0, 4]
    assert list(C.choose(s, 5, "low")) == [0, 1, 2, 3, 4]  # NaN only when nothing else is left


# ----------------------------------------------------------------------------------------------- every method

@pytest.mark.parametrize("method", ["random", "loss", "zlib", "mink", "minkpp", "grand", "moderate"])
def test_every_method_deterministic_per_file(tiny, tmp_path, method):
    r1 = C.select(sel_args(tiny, tmp_path / "a.jsonl", method=method, ratio="0.3"))
    r2 = C.select(sel_args(tiny, tmp_path / "b.jsonl", method=method, ratio="0.3"))
    a, b = read_lines(tmp_path / "a.jsonl"), read_lines(tmp_path / "b.jsonl")
    assert a == b
    assert [sorted(x) for x in a] == [["file", "index", "score"]] * len(a)
    by_file = {}
    for x in a:
        by_file.setdefault(x["file"], []).append(x["index"])
    assert by_file == {tiny["f1"]: sorted(by_file[tiny["f1"]]), tiny["f2"]: sorted(by_file[tiny["f2"]])}
    assert [len(by_file[tiny["f1"]]), len(by_file[tiny["f2"]])] == [C.coreset_size(0.3, 13), C.coreset_size(0.3, 9)]
    assert (method == "random") == all(x["score"] is None for x in a)
    run = json.loads((tmp_path / "a.json").read_text())
    assert run["method"] == method and run["args"]["seed"] == 0 and "total_s" in run["timings"]
    assert r1["files"] == r2["files"]
    if method != "random":  # the selected scores are the extreme ones of the order
        order = C.DEFAULT_ORDER[method]
        for f in (tiny["f1"], tiny["f2"]):
            picked = [x["score"] for x in a if x["file"] == f]
            stats = [s for s in r1["files"] if s["file"] == f][0]["score_stats"]
            assert (min(picked) if order == "low" else max(picked)) == pytest.approx(
                stats["min"] if order == "low" else stats["max"])


def test_count_ratio_and_order_flag(tiny, tmp_path):
    C.select(sel_args(tiny, tmp_path / "c.jsonl", "--order", "high", method="loss", ratio="4"))
    hi = read_lines(tmp_path / "c.jsonl")
    C.select(sel_args(tiny, tmp_path / "d.jsonl", "--order", "low", method="loss", ratio="4"))
    lo = read_lines(tmp_path / "d.jsonl")
    assert len(hi) == len(lo) == 8
    for f in (tiny["f1"], tiny["f2"]):
        assert min(x["score"] for x in hi if x["file"] == f) >= max(x["score"] for x in lo if x["file"] == f)


# ----------------------------------------------------------------------------------------------- scores vs direct

def direct_token_arrays(model, tok, text):
    """Per-token log p, mu, sigma from the full logits of the document alone, in float64."""
    ids = torch.tensor([tok.encode(text)])
    with torch.no_grad():
        logits = model(ids)[0, :-1].double()                               # (T-1, V)
    logp = torch.log_softmax(logits, -1)
    p = logp.exp()
    mu = (p * logp).sum(-1)
    sigma = ((p * logp.square()).sum(-1) - mu.square()).clamp_min(0).sqrt()
    lp = logp.gather(1, ids[0, 1:, None])[:, 0]
    return lp.numpy(), mu.numpy(), sigma.numpy()


def test_token_scores_equal_float64_reference(tiny):
    model = Transformer.from_pretrained(tiny["model"]).eval()
    tok = load_tokenizer(tiny["model"])
    docs = [json.loads(x)["text"] for x in Path(tiny["f1"]).read_text().splitlines()]
    got = C.token_scores(model, tok, docs, batch_size=5, progress=False)
    for i, d in enumerate(docs):
        lp, mu, sd = direct_token_arrays(model, tok, d)
        if lp.size == 0:
            assert all(math.isnan(got[m][i]) for m in C.TOKEN_METHODS)
            continue
        n = lp.size
        k = max(1, int(0.4 * n))
        loss = -lp.mean()
        ref = {"loss": loss, "zlib": loss / len(zlib.compress(tok.decode(tok.encode(d)).encode())),
               "mink": -np.sort(lp)[:k].mean(), "minkpp": -np.sort((lp - mu) / sd)[:k].mean()}
        for m in C.TOKEN_METHODS:
            assert got[m][i] == pytest.approx(ref[m], rel=1e-4, abs=1e-5), (m, i)


def per_doc_grad_norm(model, tok, text, loss, c=None, layer_id=2, layer_ids=(1, 2)):
    """GraNd by plain autograd, one document at a time, no padding."""
    mods = C.grand_targets(model, loss, layer_ids)
    ws = [m.weight for m in mods]
    for p in model.parameters():
        p.requires_grad_(False)
    for w in ws:
        w.requires_grad_(True)
    ids = torch.tensor([tok.encode(text)])
    if loss == "rmu":
        act = model(ids, until_layer=layer_id)
        L = (act - c).square().mean()
    else:
        logp = torch.log_softmax(model(ids)[0, :-1], -1).gather(1, ids[0, 1:, None])
        L = -logp.mean()
    gs = torch.autograd.grad(L, ws)
    for w in ws:
        w.requires_grad_(False)
    return math.sqrt(sum(float(g.double().square().sum()) for g in gs))


@pytest.mark.parametrize("loss", ["rmu", "npo"])
def test_grand_equals_per_document_autograd(tiny, loss):
    model = Transformer.from_pretrained(tiny["model"]).eval()
    tok = load_tokenizer(tiny["model"])
    docs = [json.loads(x)["text"] for x in Path(tiny["f1"]).read_text().splitlines()]
    docs = [d for d in docs if len(tok.encode(d)) >= 2]
    c = C.control_vector(model.config.hidden_size, 6.5, 0)
    got = C.grand_scores(model, tok, docs, loss, 2, [1, 2], c, batch_size=4, progress=False)
    ref = [per_doc_grad_norm(model, tok, d, loss, c) for d in docs]
    np.testing.assert_allclose(got, ref, rtol=1e-4)


def test_linear_grad_sq_gram_and_einsum_agree():
    torch.manual_seed(0)
    x, g = torch.randn(3, 5, 7), torch.randn(3, 5, 4)
    ref = torch.stack([(g[b].T @ x[b]).square().sum() for b in range(3)]).double()
    torch.testing.assert_close(C.linear_grad_sq(x, g), ref, rtol=1e-5, atol=1e-6)        # einsum (T large)
    x, g = torch.randn(2, 3, 16), torch.randn(2, 3, 16)
    ref = torch.stack([(g[b].T @ x[b]).square().sum() for b in range(2)]).double()
    torch.testing.assert_close(C.linear_grad_sq(x, g), ref, rtol=1e-5, atol=1e-6)        # Gram (T small)


def test_moderate_equals_numpy(tiny, tmp_path):
    model = Transformer.from_pretrained(tiny["model"]).eval()
    tok = load_tokenizer(tiny["model"])
    docs = [json.loads(x)["text"] for x in Path(tiny["f2"]).read_text().splitlines()]
    with torch.no_grad():
        feats = np.stack([model(torch.tensor([tok.encode(d)]), output="hidden")[0].double().mean(0).numpy()
                          for d in docs])
    dist = np.sqrt(((feats - feats.mean(0)) ** 2).sum(1))
    ref = np.abs(dist - np.median(dist))
    got = C.pooled_features(model, tok, docs, -1, batch_size=4, progress=False)
    np.testing.assert_allclose(got, feats, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(C.moderate_scores(got), ref, rtol=1e-4, atol=1e-6)
    C.select(sel_args(tiny, tmp_path / "m.jsonl", method="moderate", ratio="3", forget=tiny["f2"]))
    picked = [x["index"] for x in read_lines(tmp_path / "m.jsonl")]
    assert picked == sorted(np.argsort(ref, kind="stable")[:3].tolist())


# ----------------------------------------------------------------------------------------------- keywords

def test_keywords_on_a_hand_made_corpus(tmp_path):
    forget = ["The anthrax spores were grown in the lab.", "Anthrax toxin and the spores of the culture.",
              "In the lab, the toxin is purified from anthrax."] * 3
    retain = ["The cat sat on the mat.", "The river was in the valley and the stone was in the river.",
              "A lab is a room."] * 5
    kws = C.extract_keywords(forget, retain, min_z=1.0)
    words = [w for w, _, _ in kws]
    assert {"anthrax", "spores", "toxin"} <= set(words)
    assert "the" not in words and "cat" not in words
    assert words[0] == "anthrax"                       # the most frequent forget-only word leads
    assert C.keyword_document("The Anthrax spores, the cat.", set(words)) == "Anthrax spores"
    # the CLI writes a forget corpus unlearn.py reads (data.read_corpus)
    f, r = tmp_path / "f.jsonl", tmp_path / "r.jsonl"
    f.write_text("".join(json.dumps({"text": t}) + "\n" for t in forget))
    r.write_text("".join(json.dumps({"text": t}) + "\n" for t in retain))
    out = tmp_path / "kw.jsonl"
    C.main(["--method", "keywords", "--forget", str(f), "--retain", str(r), "--out", str(out), "--min-z", "1.0"])
    import data
    texts = data.read_corpus(out)
    assert len(texts) == len(forget) and all(set(t.lower().split()) <= set(words) for t in texts)
    assert texts[0].split()[:2] == ["anthrax", "spores"]   # in document order, original case kept
    assert json.loads((tmp_path / "kw.json").read_text())["files"][0]["keywords"][0]["word"] == "anthrax"


# ----------------------------------------------------------------------------------------------- unlearn reads it

def test_coreset_file_read_back_by_unlearn(tiny, tmp_path):
    import data
    import unlearn
    out = tmp_path / "cs.jsonl"
    C.select(sel_args(tiny, out, method="mink", ratio="0.25"))
    files = [tiny["f1"], tiny["f2"]]
    sizes = [len(data.read_corpus(f)) for f in files]
    got = unlearn.read_coreset(str(out), files, sizes)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert got == [sorted(r["index"] for r in lines if r["file"] == f) for f in files]
    assert [len(g) for g in got] == [C.coreset_size(0.25, n) for n in sizes]


# ----------------------------------------------------------------------------------------------- sweep

def fake_unlearn(calls):
    def run(args):
        calls.append(args)
        n = 1 if args.coreset is None else len(Path(args.coreset).read_text().splitlines())
        acc = 0.25 + 0.01 * n + 0.001 * args.seed
        return {"steps": args.steps, "train_s": 0.1, "coreset": {"n_docs": [13, 9], "n_selected": [n]},
                "args": vars(args),
                "eval": {"before": {"toy_hazard": {"acc": 0.8}, "toy_general": {"acc": 0.6}},
                         "after": {"toy_hazard": {"acc": acc}, "toy_general": {"acc": 0.59}}}}
    return run


def test_sweep_resumes_and_reports(tiny, tmp_path, monkeypatch):
    import unlearn
    calls = []
    monkeypatch.setattr(unlearn, "run", fake_unlearn(calls))
    out = tmp_path / "sweep"
    argv = ["--method", "rmu", "--select", "random", "--ratios", "0.2 1.0", "--seeds", "0,1", "--model",
            tiny["model"], "--data", str(tmp_path), "--forget", f"{tiny['f1']},{tiny['f2']}", "--retain",
            tiny["f2"], "--tasks", "toy_hazard,toy_general", "--steps", "3", "--out", str(out), "--no-progress",
            "--docs", str(tmp_path / "docs" / "sweep")]
    agg = C.sweep_main(argv)
    assert len(calls) == 4
    full = [c for c in calls if c.coreset is None]
    assert len(full) == 2                                  # ratio 1: the full set, no coreset file
    assert all(c.steps == 3 and c.no_save for c in calls)
    assert sorted(c.seed for c in calls) == [0, 0, 1, 1]
    assert agg["base"] == {"toy_hazard": 0.8, "toy_general": 0.6}
    assert agg["forget_metrics"] == ["toy_hazard"] and agg["utility_metrics"] == ["toy_general"]
    row = [r for r in agg["rows"] if r["ratio"] == 0.2][0]
    vals = row["metrics"]["toy_hazard"]["values"]
    assert row["metrics"]["toy_hazard"]["mean"] == pytest.approx(np.mean(vals))
    assert row["metrics"]["toy_hazard"]["std"] == pytest.approx(np.std(vals, ddof=1))
    for f in ("results.json", "results.md"):
        assert (out / f).is_file() and (tmp_path / "docs" / f"sweep.{f.split('.')[1]}").is_file()
    md = (out / "results.md").read_text()
    assert "base model" in md and "80.0" in md and "20%" in md and "100%" in md
    # rerun: every cell has its result -> no unlearning at all
    C.sweep_main(argv)
    assert len(calls) == 4
    # a removed cell result is the only one redone; a new seed adds its cells
    (out / "cells" / "random_r0.2_s1" / "result.json").unlink()
    C.sweep_main(argv)
    assert len(calls) == 5 and calls[-1].seed == 1 and calls[-1].coreset is not None
    C.sweep_main([a if a != "0,1" else "0,1,2" for a in argv])
    assert len(calls) == 7


# ----------------------------------------------------------------------------------------------- errors

@pytest.mark.parametrize("argv, msg", [
    (["--method", "bogus", "--ratio", "0.1"], "--method"),
    (["--method", "random", "--ratio", "0"], "--ratio"),
    (["--method", "random", "--ratio", "-1"], "--ratio"),
    (["--method", "random", "--ratio", "2.5"], "whole number"),
    (["--method", "random"], "--ratio"),
    (["--method", "random", "--ratio", "0.1", "--forget", "/nonexistent/forget.jsonl"], "/nonexistent/forget.jsonl"),
    (["--method", "loss", "--ratio", "0.1", "--model", "/nonexistent/model"], "/nonexistent/model"),
])
def test_bad_inputs_give_one_line_errors(tiny, tmp_path, argv, msg):
    argv = argv + ["--out", str(tmp_path / "x.jsonl")]
    if "--forget" not in argv:
        argv += ["--forget", tiny["f1"]]
    with pytest.raises(SystemExit) as e:
        C.main(argv)
    text = str(e.value.code)
    assert text.startswith("error:") and msg in text and "\n" not in text


def test_sweep_bad_inputs(tiny, tmp_path):
    for argv, msg in [(["--select", "bogus"], "--select"), (["--ratios", "0.1 0"], "--ratios"),
                      (["--forget", "/nonexistent/f.jsonl"], "/nonexistent/f.jsonl")]:
        base = ["--forget", tiny["f1"], "--out", str(tmp_path / "s")]
        with pytest.raises(SystemExit) as e:
            C.sweep_main(base + argv)
        text = str(e.value.code)
        assert text.startswith("error:") and msg in text and "\n" not in text, text


def test_keywords_per_forget_file(tiny, tmp_path):
    out = tmp_path / "kw.jsonl"
    rec = C.select(C.build_parser().parse_args(
        ["--method", "keywords", "--forget", f"{tiny['f1']},{tiny['f2']}", "--retain", tiny["f2"], "--out", str(out),
         "--min-z", "-100", "--min-count", "1", "--keep-stopwords"]))
    outs = rec["forget_out"].split(",")
    assert [Path(o).name for o in outs] == ["kw.f1.jsonl", "kw.f2.jsonl"] and all(Path(o).is_file() for o in outs)
    assert (tmp_path / "kw.json").is_file()
