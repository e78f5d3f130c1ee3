"""coreset.py on a tiny random model: every selection method (determinism, ratio semantics, scores against direct
float64 / per-document computations), keyword extraction, the coreset file as unlearn.py reads it (read_coreset),
GraNd-RMU's control vectors = the training's, the sweep's resume and report (coreset_sweep.py), and one-line errors.
The scores' own math (Min-K%, Min-K%++, zlib, the control vector) is tested in test_losses.py."""
import json
import math
import os
import random
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

import coreset as C
import doc_scores as D
import coreset_sweep as S
import data
import helpers
import losses
import methods
import objectives
from infra import TOY_MODEL, ProjectError
from hf_tokenizer import load_tokenizer
from model import Transformer

ROOT = Path(__file__).resolve().parent.parent

WORDS = "the virus spores toxin anthrax lab culture cat sat on mat with hat river stone".split()


@pytest.fixture(autouse=True)
def reference_kernels(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # kernels' fast chunked PyTorch path on CPU


def write_corpus(path, n, seed, lo=1, hi=25):
    return helpers.write_corpus(path, n, seed, WORDS, lo, hi)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 3-layer random Llama (GQA, odd vocab) with a BPE tokenizer and two forget corpora."""
    root = tmp_path_factory.mktemp("tiny")
    helpers.tiny_llama(root, WORDS, {"bos_token": "<s>", "eos_token": "</s>"}, init=lambda m: [
        p.normal_(0, 0.3) for p in m.parameters()], hidden_size=32, intermediate_size=48, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256, bos_token_id=0,
        eos_token_id=1)
    f1 = write_corpus(root / "f1.jsonl", 13, 1)
    f2 = write_corpus(root / "f2.jsonl", 9, 2)
    return dict(root=root, model=str(root / "model"), f1=f1, f2=f2)


def sel_args(tiny, out, *extra, method="random", ratio="0.3", forget=None):
    """The CLI's flags -> the SelectConfig coreset.select takes (as coreset.main builds it)."""
    argv = ["--method", method, "--model", tiny["model"], "--forget", forget or f"{tiny['f1']},{tiny['f2']}",
            "--ratio", str(ratio), "--out", str(out), "--batch-size", "4", "--no-progress",
            "--layer-id", "2", "--layer-ids", "1,2", *extra]
    return C.SelectConfig(**vars(C.build_parser().parse_args(argv)))


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
        with pytest.raises(ProjectError, match="--ratio"):
            C.parse_ratio(bad)


def test_random_matches_unlearn_ratio_and_is_seeded():
    """unlearn.py --ratio draws the very documents coreset.py --method random writes: random.Random seeded with
    seed * 1000003 + file index, a sorted sample."""
    from types import SimpleNamespace

    for n, r, seed, t in [(100, 0.05, 0, 0), (37, 0.2, 3, 1), (9, 4, 1, 0)]:
        k = C.coreset_size(r, n)
        want = sorted(random.Random(seed * 1_000_003 + t).sample(range(n), k))
        assert C.random_indices(n, k, seed, t).tolist() == want
    cfg = SimpleNamespace(coreset=None, ratio=0.2, seed=3, forget=["a", "b"])
    docs = [["x"] * 37, ["y"] * 12]
    assert C.chosen_documents(cfg, docs)[0] == [C.random_indices(37, 7, 3, 0).tolist(), C.random_indices(12, 2, 3, 1).tolist()]
    assert C.chosen_documents(SimpleNamespace(coreset=None, ratio=None), docs)[0] == [list(range(37)), list(range(12))]
    a = C.random_indices(200, 10, 0)
    assert list(a) == list(C.random_indices(200, 10, 0)) and list(a) != list(C.random_indices(200, 10, 1))
    assert list(a) != list(C.random_indices(200, 10, 0, 1))


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
    assert run["method"] == method and run["args"]["seed"] == 42 and "total_s" in run["timings"]
    assert run["args"]["method"] == method and run["versions"]["torch"] == torch.__version__
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
    got = D.token_scores(model, tok, docs, batch_size=5, progress=False)
    for i, d in enumerate(docs):
        lp, mu, sd = direct_token_arrays(model, tok, d)
        if lp.size == 0:
            assert all(math.isnan(got[m][i]) for m in D.TOKEN_METHODS)
            continue
        n = lp.size
        k = max(1, int(losses.MIN_K * n))
        loss = -lp.mean()
        ref = {"loss": loss, "zlib": loss / len(zlib.compress(tok.decode(tok.encode(d)).encode())),
               "mink": -np.sort(lp)[:k].mean(), "minkpp": -np.sort((lp - mu) / sd)[:k].mean()}
        for m in D.TOKEN_METHODS:
            assert got[m][i] == pytest.approx(ref[m], rel=1e-4, abs=1e-5), (m, i)


def per_doc_grad_norm(model, tok, text, loss, c=None, layer_id=2, layer_ids=(1, 2), params=("mlp.down_proj",)):
    """GraNd by plain autograd, one document at a time, no padding. NPO with layer_ids None: every weight of every
    decoder layer except the norms' (its 7 projections)."""
    if layer_ids is None:
        ws = [w for blk in model.model.layers for n, w in blk.named_parameters() if "norm" not in n]
        assert len(ws) == 7 * len(model.model.layers)
    else:
        ws = [model.model.layers[i].get_submodule(p).weight for i in layer_ids for p in params]
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


@pytest.mark.parametrize("loss,layer_ids,params", [("rmu", [1, 2], ["mlp.down_proj"]), ("npo", None, None),
                                                    ("npo", [0, 2], ["mlp.gate_proj", "self_attn.v_proj"])])
def test_grand_equals_per_document_autograd(tiny, loss, layer_ids, params):
    """RMU's matrices; NPO's every projection of every layer; NPO's --train-scope params matrices."""
    model = Transformer.from_pretrained(tiny["model"]).eval()
    tok = load_tokenizer(tiny["model"])
    docs = [json.loads(x)["text"] for x in Path(tiny["f1"]).read_text().splitlines()]
    docs = [d for d in docs if len(tok.encode(d)) >= 2]
    c = losses.control_vector(model.config.hidden_size, 6.5, 0)
    kw = {"params": params} if params else {}
    got = D.grand_scores(model, tok, docs, loss, 2, layer_ids, c, batch_size=4, progress=False, **kw)
    ref = [per_doc_grad_norm(model, tok, d, loss, c, layer_ids=layer_ids, **kw) for d in docs]
    np.testing.assert_allclose(got, ref, rtol=1e-4)


def test_linear_grad_sq_gram_and_einsum_agree():
    torch.manual_seed(0)
    x, g = torch.randn(3, 5, 7), torch.randn(3, 5, 4)
    ref = torch.stack([(g[b].T @ x[b]).square().sum() for b in range(3)]).double()
    torch.testing.assert_close(D.linear_grad_sq(x, g), ref, rtol=1e-5, atol=1e-6)        # einsum (T large)
    x, g = torch.randn(2, 3, 16), torch.randn(2, 3, 16)
    ref = torch.stack([(g[b].T @ x[b]).square().sum() for b in range(2)]).double()
    torch.testing.assert_close(D.linear_grad_sq(x, g), ref, rtol=1e-5, atol=1e-6)        # Gram (T small)


def test_moderate_equals_numpy(tiny, tmp_path):
    model = Transformer.from_pretrained(tiny["model"]).eval()
    tok = load_tokenizer(tiny["model"])
    docs = [json.loads(x)["text"] for x in Path(tiny["f2"]).read_text().splitlines()]
    with torch.no_grad():
        feats = np.stack([model(torch.tensor([tok.encode(d)]), output="hidden")[0].double().mean(0).numpy()
                          for d in docs])
    dist = np.sqrt(((feats - feats.mean(0)) ** 2).sum(1))
    ref = np.abs(dist - np.median(dist))
    got = D.pooled_features(model, tok, docs, -1, batch_size=4, progress=False)
    np.testing.assert_allclose(got, feats, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(D.moderate_scores(got), ref, rtol=1e-4, atol=1e-6)
    C.select(sel_args(tiny, tmp_path / "m.jsonl", method="moderate", ratio="3", forget=tiny["f2"]))
    picked = [x["index"] for x in read_lines(tmp_path / "m.jsonl")]
    assert picked == sorted(np.argsort(ref, kind="stable")[:3].tolist())


# ----------------------------------------------------------------------------------------------- keywords

def test_keywords_cli_writes_a_coreset_with_texts(tmp_path):
    """coreset.py --method keywords writes a coreset file whose lines carry each document reduced to
    losses.extract_keywords' words (their math is tested in test_losses.py); read_coreset returns those texts."""
    forget = ["The anthrax spores were grown in the lab.", "Anthrax toxin and the spores of the culture.",
              "In the lab, the toxin is purified from anthrax."] * 3
    retain = ["The cat sat on the mat.", "The river was in the valley and the stone was in the river.",
              "A lab is a room."] * 5
    words = [w for w, _, _ in losses.extract_keywords(forget, retain, min_z=1.0)]
    f, r = tmp_path / "f.jsonl", tmp_path / "r.jsonl"
    f.write_text("".join(json.dumps({"text": t}) + "\n" for t in forget))
    r.write_text("".join(json.dumps({"text": t}) + "\n" for t in retain))
    out = tmp_path / "kw.jsonl"
    C.main(["--method", "keywords", "--forget", str(f), "--retain", str(r), "--out", str(out), "--min-z", "1.0"])
    idx, texts = C.read_coreset(out, [str(f)], [len(forget)], with_texts=True)
    assert idx == [list(range(len(forget)))]
    assert [texts[0][i] for i in idx[0]] == [losses.keyword_document(t, set(words)) for t in forget]
    assert all(set(t.lower().split()) <= set(words) for t in texts[0].values())
    assert texts[0][0].split()[:2] == ["anthrax", "spores"]   # in document order, original case kept
    rec = json.loads((tmp_path / "kw.json").read_text())
    assert [k["word"] for k in rec["files"][0]["keywords"]] == words and words[0] == "anthrax"
    # a ratio samples first, with the random coreset's draw; the keywords come from the sample alone
    C.main(["--method", "keywords", "--forget", str(f), "--retain", str(r), "--out", str(out), "--min-z", "1.0",
            "--ratio", "3", "--seed", "5"])
    assert C.read_coreset(out, [str(f)], [len(forget)]) == [sorted(C.random_indices(len(forget), 3, 5, 0).tolist())]


# ----------------------------------------------------------------------------------------------- unlearn reads it

def test_coreset_file_read_back_by_unlearn(tiny, tmp_path):
    out = tmp_path / "cs.jsonl"
    C.select(sel_args(tiny, out, method="mink", ratio="0.25"))
    files = [tiny["f1"], tiny["f2"]]
    sizes = [len(data.read_corpus(f)) for f in files]
    got = C.read_coreset(str(out), files, sizes)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert got == [sorted(r["index"] for r in lines if r["file"] == f) for f in files]
    assert [len(g) for g in got] == [C.coreset_size(0.25, n) for n in sizes]
    # unlearn.py --coreset reads it through the same function
    from types import SimpleNamespace
    cfg = SimpleNamespace(coreset=str(out), ratio=None, seed=0, forget=files)
    assert C.chosen_documents(cfg, [data.read_corpus(f) for f in files])[0] == got


@pytest.mark.parametrize("lines, msg", [
    (['{"file": "F1", "index": 99, "score": null}'], "index 99 out of range"),
    (['{"file": "F1", "index": 0, "score": null}', '{"file": "F1", "index": 0, "score": 1.0}'], "duplicate index 0"),
    (['{"file": "/elsewhere/x.jsonl", "index": 0, "score": null}'], "is not one of --forget"),
    (['{"file": "F1", "index": "0", "score": null}'], "expected {\"file\": str, \"index\": int"),
    (['{"file": "F1", "index": true, "score": null}'], "expected {\"file\": str, \"index\": int"),
    (['{"file": "F1", "index": 0, "score": "high"}'], "'score' to be a number or null"),
    (['{"file": "F1", "index": 0, "score": null}'], "selects no document of forget file F2"),
])
def test_read_coreset_rejects_bad_files(tiny, tmp_path, lines, msg):
    f1, f2 = tiny["f1"], tiny["f2"]
    path = tmp_path / "cs.jsonl"
    path.write_text("".join(x.replace("F1", f1) + "\n" for x in lines))
    with pytest.raises(C.CoresetError) as e:
        C.read_coreset(path, [f1, f2] if "F2" in msg else [f1], [13, 9])
    text = str(e.value).replace(f2, "F2")
    assert msg in text and "\n" not in text
    assert isinstance(e.value, ProjectError)


def test_read_coreset_missing_or_unreadable_file(tiny, tmp_path):
    with pytest.raises(C.CoresetError, match="--coreset: missing file"):
        C.read_coreset(tmp_path / "none.jsonl", [tiny["f1"]], [13])
    binary = tmp_path / "cs.jsonl"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe")
    with pytest.raises(data.DataError, match="cs.jsonl:1: expected UTF-8 text"):
        C.read_coreset(binary, [tiny["f1"]], [13])
    binary.write_text('{"file": 1}\nnot json\n')
    with pytest.raises(ProjectError, match=r"cs.jsonl:1: expected \{"):
        C.read_coreset(binary, [tiny["f1"]], [13])
    # the same file by another spelling of its path counts
    other = str(Path(tiny["f1"]).parent / "." / Path(tiny["f1"]).name)
    binary.write_text(json.dumps({"file": other, "index": 3, "score": None}) + "\n")
    assert C.read_coreset(binary, [tiny["f1"]], [13]) == [[3]]


# ----------------------------------------------------------------------------------------------- GraNd-RMU = training

def old_control_vector(d, coeff, seed, file_index):
    """The control vector GraNd used before the layout change: its own seeding (seed * 1000003 + file), not RMU's."""
    g = torch.Generator().manual_seed(int(seed) * 1000003 + int(file_index))
    u = torch.rand(d, generator=g)
    return coeff * u / u.norm()


def test_grand_control_vectors_are_the_trainings(tiny, tmp_path, monkeypatch):
    """Seed 1, two topics with their own steering coefficients: the control vector GraNd-RMU scores file 1 with is,
    bit for bit, the one unlearn.train_rmu trains topic 1 towards (losses.control_vector), not the old formula's."""
    import unlearn
    seen_grand = {}
    real_grand = C.grand_scores

    def grand_spy(model, tok, docs, loss, layer_id, layer_ids, control, *a, **k):
        seen_grand[len(seen_grand)] = (layer_id, list(layer_ids), control.detach().clone())
        return real_grand(model, tok, docs, loss, layer_id, layer_ids, control, *a, **k)
    monkeypatch.setattr(C, "grand_scores", grand_spy)
    rec = C.select(C.SelectConfig(method="grand", model=tiny["model"], forget=f"{tiny['f1']},{tiny['f2']}", ratio=0.5,
                                  seed=1, layer_id=2, layer_ids="1,2", steering_coeffs="4,9", progress=False, device="cpu",
                                  out=str(tmp_path / "cs.jsonl")))
    assert rec["grand"] == {"layer_id": 2, "layer_ids": [1, 2], "steering_coeffs": [4.0, 9.0], "loss": "rmu"}

    seen_train = []
    real_loss = objectives.RMU.loss

    def loss_spy(self, f_h, f_mask, c, *a, **k):
        seen_train.append(c.detach().clone())
        return real_loss(self, f_h, f_mask, c, *a, **k)
    monkeypatch.setattr(objectives.RMU, "loss", loss_spy)
    cfg = methods.resolve({"method": "rmu", "model": tiny["model"], "forget": [tiny["f1"], tiny["f2"]],
                           "retain": [tiny["f2"]], "seed": 1, "steps": 2, "layer_id": 2, "layer_ids": [1, 2],
                           "steering_coeffs": [4.0, 9.0], "eval_tasks": [], "save": False, "progress": False, "device": "cpu",
                           "out": str(tmp_path / "u")})
    unlearn.run(cfg)
    assert len(seen_train) == 2                               # step 0: topic 0, step 1: topic 1

    d = Transformer.from_pretrained(tiny["model"]).config.hidden_size
    for t, coeff in ((0, 4.0), (1, 9.0)):
        layer_id, layer_ids, c_grand = seen_grand[t]
        assert (layer_id, layer_ids) == (2, [1, 2])
        assert c_grand.shape == seen_train[t].shape == (1, 1, d)
        assert torch.equal(c_grand, seen_train[t])
        assert torch.equal(c_grand, losses.control_vector(d, coeff, 1, t, torch.float32))
        assert not torch.allclose(c_grand.flatten(), old_control_vector(d, coeff, 1, t), atol=1e-3)
    assert not torch.allclose(seen_grand[0][2] / 4.0, seen_grand[1][2] / 9.0)   # one direction per topic


def test_grand_rmu_defaults_are_unlearnings_for_the_model():
    """Without flags GraNd-RMU uses what unlearning uses for the model: the toy's own values on the toy (data/toy/
    defaults.json), the reference recipe elsewhere; a flag wins."""
    toy = methods.resolve({"method": "rmu"})
    assert C.grand_rmu_settings(C.SelectConfig(model=str(TOY_MODEL))) == \
        (toy.layer_id, toy.layer_ids, toy.steering_coeffs)
    ref = methods.RMUConfig()
    assert C.grand_rmu_settings(C.SelectConfig(model="/some/real/model")) == \
        (ref.layer_id, ref.layer_ids, ref.steering_coeffs) == (7, [5, 6, 7], [6.5])
    assert C.grand_rmu_settings(C.SelectConfig(model="/m", layer_id=3, layer_ids="1 2", steering_coeffs="2,5")) == \
        (3, [1, 2], [2.0, 5.0])
    args = C.build_parser().parse_args(["--steering-coeffs", "2,5"])
    assert args.steering_coeffs == "2,5" and args.layer_id is None and args.layer_ids is None


# ----------------------------------------------------------------------------------------------- sweep

def fake_unlearn(calls):
    def run(cfg, given=None):
        calls.append(cfg)
        n = 1 if cfg.coreset is None else len(Path(cfg.coreset).read_text().splitlines())
        acc = 0.25 + 0.01 * n + 0.002 * cfg.seed
        return {"steps": cfg.steps, "train_s": 0.1, "coreset": {"n_docs": [13, 9], "n_selected": [n]},
                "args": given, "budget": {"steps": cfg.steps, "epochs": 0.5, "forget": [{"docs_seen": n}]},
                "eval": {"before": {"toy_hazard": {"acc": 0.8}, "toy_general": {"acc": 0.6}},
                         "after": {"toy_hazard": {"acc": acc}, "toy_general": {"acc": 0.59}}}}
    return run


def sweep_argv(tiny, tmp_path, *extra):
    return ["--method", "rmu", "--select", "random", "--ratios", "0.2 1.0", "--seeds", "0,1", "--model",
            tiny["model"], "--data", str(tmp_path), "--forget", f"{tiny['f1']},{tiny['f2']}", "--retain",
            tiny["f2"], "--tasks", "toy_hazard,toy_general", "--steps", "3", "--out", str(tmp_path / "sweep"),
            "--no-progress", "--device", "cpu", "--unlearn-args", "--layer-id 2 --layer-ids 1,2", *extra]


def test_sweep_resumes_and_reports(tiny, tmp_path, monkeypatch):
    import unlearn
    calls = []
    monkeypatch.setattr(unlearn, "run", fake_unlearn(calls))
    out = tmp_path / "sweep"
    argv = sweep_argv(tiny, tmp_path, "--docs", str(tmp_path / "docs" / "sweep"))
    agg = S.main(argv)
    assert len(calls) == 4
    full = [c for c in calls if c.coreset is None]
    assert len(full) == 2                                  # ratio 1: the full set, no coreset file
    assert all(isinstance(c, methods.RMUConfig) for c in calls)   # resolved configs, checked before any run
    assert all(c.steps == 3 and c.save is False and (c.layer_id, c.layer_ids) == (2, [1, 2]) for c in calls)
    assert sorted(c.seed for c in calls) == [0, 0, 1, 1]
    assert agg["base"] == {"toy_hazard": 0.8, "toy_general": 0.6}
    assert agg["forget_metrics"] == ["toy_hazard"] and agg["utility_metrics"] == ["toy_general"]
    row = [r for r in agg["rows"] if r["ratio"] == 0.2][0]
    vals = row["metrics"]["toy_hazard"]["values"]
    # ratio 0.2: round(0.2 * 13) = 3 selected lines from f1 + 2 from f2 -> acc 0.25 + 0.05 + 0.002 * seed
    assert vals == pytest.approx([0.30, 0.302])
    assert row["metrics"]["toy_hazard"]["mean"] == pytest.approx(np.mean(vals))
    assert row["metrics"]["toy_hazard"]["std"] == pytest.approx(np.std(vals, ddof=1))
    for f in ("results.json", "results.md"):
        assert (out / f).is_file() and (tmp_path / "docs" / f"sweep.{f.split('.')[1]}").is_file()
    md = (out / "results.md").read_text()
    assert "base model" in md and "80.0" in md and "20%" in md and "100%" in md
    assert "| random | 20% | 5 | 3 | 0.5 | 30.1 ± 0.1 | 59.0 ± 0.0 | 2 |" in md
    # rerun: every cell has its result -> no unlearning at all
    S.main(argv)
    assert len(calls) == 4
    # a removed cell result is the only one redone; a new seed adds its cells
    (out / "cells" / "random_r0.2_s1" / "result.json").unlink()
    S.main(argv)
    assert len(calls) == 5 and calls[-1].seed == 1 and calls[-1].coreset is not None
    S.main([a if a != "0,1" else "0,1,2" for a in argv])
    assert len(calls) == 7


@pytest.mark.parametrize("forget,muse", [(["toy_hazard", "toy_hazard/acc_norm"], False),
                                         (["muse_toy/verbmem_f", "muse_toy/knowmem_f"], True)])
def test_sweep_report_names_its_units(forget, muse):
    """acc_norm is an accuracy like acc (x100, a 4-choice chance line); only MUSE's metrics are labelled as such."""
    stat = {"mean": 0.5, "std": 0.1}
    row = {"select": "random", "ratio": 0.05, "n_selected": [20], "steps": 200, "epochs": 40, "seeds": [0, 1],
           "time_s": 9.0, "metrics": {m: stat for m in forget + ["toy_general"]}}
    agg = {"forget_metrics": forget, "utility_metrics": ["toy_general"], "base": {}, "rows": [row]}
    md = S.markdown_table(agg, "t")
    assert ("MUSE's metrics" in md) == muse and "Accuracy in %" in md
    assert "| 50.0 ± 10.0 |" in md if not muse else "| 0.5 ± 0.1 |" in md


def test_sweep_grand_cell_scores_with_the_cells_control_vectors(tiny, tmp_path, monkeypatch):
    """A GraNd cell selects with the layers and control vectors of the very unlearning run the cell makes
    (--unlearn-args included), at the cell's seed."""
    import unlearn
    calls, seen = [], []
    monkeypatch.setattr(unlearn, "run", fake_unlearn(calls))

    def grand_spy(model, tok, docs, loss, layer_id, layer_ids, control, *a, **k):
        seen.append((loss, layer_id, list(layer_ids), control.detach().clone()))
        return np.arange(len(docs), dtype=np.float64)
    monkeypatch.setattr(C, "grand_scores", grand_spy)
    argv = sweep_argv(tiny, tmp_path, "--select", "grand", "--ratios", "0.5", "--seeds", "2",
                      "--unlearn-args", "--layer-id 2 --layer-ids 1 --steering-coeffs 3,9")
    S.main(argv)
    assert [c.seed for c in calls] == [2] and calls[0].coreset is not None
    d = Transformer.from_pretrained(tiny["model"]).config.hidden_size
    assert [(s[0], s[1], s[2]) for s in seen] == [("rmu", 2, [1])] * 2
    for t, coeff in ((0, 3.0), (1, 9.0)):
        assert torch.equal(seen[t][3], losses.control_vector(d, coeff, 2, t))
    lines = read_lines(Path(calls[0].coreset))
    # grand keeps the highest scores (here the last documents of each file)
    assert [x["index"] for x in lines if x["file"] == tiny["f1"]] == list(range(13 - C.coreset_size(0.5, 13), 13))


def test_sweep_overrides():
    assert S.select_overrides("--mink-k 0.2 --order high") == {"mink_k": 0.2, "order": "high"}
    assert S.select_overrides("") == {}
    args = S.build_parser().parse_args(["--method", "npo", "--steps", "4", "--unlearn-args", "--lr 1e-4 --beta 0.2"])
    ov = S.unlearn_overrides(args, 3, Path("/tmp/c"), coreset_file="/tmp/c/coreset.jsonl",
                             cell_budget=S.cell_budget(args, [["doc"] * 13]))
    assert ov["method"] == "npo" and ov["seed"] == 3 and ov["steps"] == 4 and ov["coreset"] == "/tmp/c/coreset.jsonl"
    assert ov["lr"] == 1e-4 and ov["beta"] == 0.2 and ov["save"] is False and "eval_limit" not in ov
    args = S.build_parser().parse_args(["--eval-preset", "wmdp-published", "--eval-ll-dtype", "model"])
    cfg = methods.resolve(S.unlearn_overrides(args, 0, Path("/tmp/c")))
    assert (cfg.eval_preset, cfg.eval_bos, cfg.eval_ll_dtype) == ("wmdp-published", None, "model")


# ----------------------------------------------------------------------------------------------- errors

@pytest.mark.parametrize("argv, msg", [
    (["--method", "bogus", "--ratio", "0.1"], "--method"),
    (["--method", "random", "--ratio", "0"], "--ratio"),
    (["--method", "random", "--ratio", "-1"], "--ratio"),
    (["--method", "random", "--ratio", "2.5"], "whole number"),
    (["--method", "random"], "--ratio"),
    (["--method", "random", "--ratio", "0.1", "--forget", "/nonexistent/forget.jsonl"], "/nonexistent/forget.jsonl"),
    (["--method", "loss", "--ratio", "0.1", "--model", "/nonexistent/model"], "/nonexistent/model"),
    (["--method", "grand", "--ratio", "0.1", "--layer-id", "5", "--layer-ids", "1"], "--layer-id 5"),
    (["--method", "grand", "--ratio", "0.1", "--layer-id", "2", "--layer-ids", "1,x"], "--layer-ids"),
    (["--method", "grand", "--ratio", "0.1", "--layer-id", "2", "--layer-ids", "1", "--params", "mlp.nope"],
     "--params mlp.nope: expected names among"),
    (["--method", "grand", "--ratio", "0.1", "--layer-id", "2", "--layer-ids", "1", "--params", ""], "--params"),
    (["--method", "grand", "--ratio", "0.1", "--grand-loss", "npo", "--layer-ids", "1", "--params", "mlp"],
     "--params mlp: expected names among"),
    (["--method", "grand", "--ratio", "0.1", "--grand-loss", "npo", "--layer-ids", "1,1"],
     "--layer-ids 1,1: expected each layer once"),
    (["--method", "grand", "--ratio", "0.1", "--grand-loss", "npo", "--layer-ids", "7"], "--layer-ids 7: expected "
                                                                                          "layers of the model"),
])
def test_bad_inputs_give_one_line_errors(tiny, tmp_path, argv, msg):
    argv = argv + ["--out", str(tmp_path / "x.jsonl")]
    if "--forget" not in argv:
        argv += ["--forget", tiny["f1"]]
    if "--model" not in argv:
        argv += ["--model", tiny["model"]]
    with pytest.raises(SystemExit) as e:
        C.main(argv)
    text = str(e.value.code)
    assert text.startswith("error:") and msg in text and "\n" not in text, text
    assert not (tmp_path / "x.jsonl").exists()


def test_sweep_bad_inputs(tiny, tmp_path):
    for argv, msg in [(["--select", "bogus"], "--select"), (["--ratios", "0.1 0"], "--ratios"),
                      (["--forget", "/nonexistent/f.jsonl"], "/nonexistent/f.jsonl"),
                      (["--unlearn-args", "--beta 0.1"], "--beta"),
                      (["--unlearn-args", "--layer-id 9", "--ratios", "1"], "--layer-id 9"),
                      (["--method", "npo", "--procs-per-cell", "2", "--unlearn-args", "--retain-orders 2"],
                       "--procs-per-cell: a cell of several retain orders")]:
        base = ["--forget", tiny["f1"], "--retain", tiny["f2"], "--model", tiny["model"], "--out",
                str(tmp_path / "s"), "--seeds", "0", "--tasks", "none", "--no-progress"]
        with pytest.raises(SystemExit) as e:
            S.main(base + argv)
        text = str(e.value.code)
        assert text.startswith("error:") and msg in text and "\n" not in text, text
        assert not (tmp_path / "s" / "results.json").exists()


def test_keywords_per_forget_file(tiny, tmp_path):
    out = tmp_path / "kw.jsonl"
    rec = C.select(C.SelectConfig(method="keywords", forget=f"{tiny['f1']},{tiny['f2']}", retain=tiny["f2"],
                                  out=str(out), min_z=-100, min_count=1, keep_stopwords=True))
    assert (tmp_path / "kw.json").is_file() and rec["coreset"] == str(out)
    idx, texts = C.read_coreset(out, [tiny["f1"], tiny["f2"]], [f["documents"] for f in rec["files"]], with_texts=True)
    assert [len(i) for i in idx] == [f["selected"] for f in rec["files"]] and all(len(t) for t in texts)


# ----------------------------------------------------------------------------------------------- the method's own loss

def test_grand_scores_with_the_loss_of_the_method_being_run(tiny, tmp_path, monkeypatch):
    """GraNd-NPO and GraNd-RMU score differently, and the sweep scores an NPO cell with the NPO loss."""
    lines = {}
    for loss in ("rmu", "npo"):
        C.select(sel_args(tiny, tmp_path / f"{loss}.jsonl", "--grand-loss", loss, method="grand", ratio="0.5"))
        lines[loss] = read_lines(tmp_path / f"{loss}.jsonl")
    scores = {k: sorted((x["file"], x["index"], x["score"]) for x in v) for k, v in lines.items()}
    assert [s[2] for s in scores["rmu"]] != pytest.approx([s[2] for s in scores["npo"]], rel=1e-3)
    import unlearn
    calls, seen = [], []
    monkeypatch.setattr(unlearn, "run", fake_unlearn(calls))
    real = C.grand_scores
    monkeypatch.setattr(C, "grand_scores", lambda model, tok, docs, loss, *a, **k: seen.append(
        (loss, k.get("layer_ids"), k.get("params"))) or real(model, tok, docs, loss, *a, **k))
    S.main(sweep_argv(tiny, tmp_path, "--method", "npo", "--select", "grand", "--ratios", "0.5", "--seeds", "0",
                      "--unlearn-args", ""))
    every = (list(range(methods.model_layers(tiny["model"]))), list(methods.MATRICES))
    assert seen == [("npo", *every)] * 2 and calls[0].method == "npo"
    seen.clear()   # --train-scope params: the cell's own matrices
    S.main(sweep_argv(tiny, tmp_path / "p", "--method", "npo", "--select", "grand", "--ratios", "0.5", "--seeds", "0",
                      "--unlearn-args", "--train-scope params --layer-ids 1 --params mlp.up_proj"))
    assert seen == [("npo", [1], ["mlp.up_proj"])] * 2


def make_dry(*args):
    r = subprocess.run(["make", "-n", *args, "PY=python3"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_passes_the_methods_loss_the_retain_contrast_and_seed_42():
    out = make_dry("wmdp-npo", "SELECT=grand")
    assert "--grand-loss npo" in out and "--seed 42" in out
    assert "--grand-loss rmu" in make_dry("wmdp-rmu", "SELECT=grand")
    kw = make_dry("wmdp-rmu", "SELECT=keywords", "RATIO=0.05")
    # on the toy no --retain: each script takes the toy's retain corpus for its method (methods.toy_data)
    assert "--method keywords" in kw and "--retain" not in kw and "--retain" not in make_dry("wmdp-npo")
    real = make_dry("wmdp-npo", "DATA=/d", "MODEL=/m")
    assert "--retain /d/wikitext/wikitext-2-raw-v1-test.txt" in real
    assert "--retain /d/wikitext/" in make_dry("sweep", "DATA=/d", "MODEL=/m") and "--retain" not in make_dry("sweep")
    assert "--coreset runs/wmdp-rmu-keywords-r0.05-s42.coreset.jsonl" in kw
    assert "--epochs 2" in make_dry("wmdp-rmu", "EPOCHS=2")
    sweep = make_dry("sweep", "BUDGET=equal-epochs", "EPOCHS=3")
    assert "--budget equal-epochs" in sweep and "--epochs 3" in sweep and "sweep-rmu-random-equal-epochs" in sweep
    assert "budget_curve.py" in make_dry("budget-curve", "EVERY=5") and "--every 5" in make_dry("budget-curve", "EVERY=5")
    # one flag as UNLEARN_FLAGS reaches the script as one value (argparse takes "--x" alone for an option)
    for target in ("sweep", "budget-curve", "connectivity", "relearn", "jailbreak"):
        assert '--unlearn-args="--no-progress"' in make_dry(target, "UNLEARN_FLAGS=--no-progress"), target
    rl, jb = make_dry("relearn", 'ARMS=full 0.1', 'RELEARN_STEPS=0 7'), make_dry("jailbreak", "RATIO=0.2")
    assert '--arms "full 0.1"' in rl and '--steps "0 7"' in rl and "runs/relearn-rmu" in rl
    assert '--arms "full 0.2"' in jb and "runs/jailbreak-rmu-r0.2" in jb
    assert "--bezier" in make_dry("connectivity", "BEZIER=1") and "--bezier" not in make_dry("connectivity")
    assert S.build_parser().parse_args(["--unlearn-args=--no-progress"]).unlearn_args == "--no-progress"


@pytest.mark.make
@pytest.mark.skipif(shutil.which("make") is None or not (ROOT / "data/toy/model/model.safetensors").is_file(),
                    reason="no make, or the embedded toy is not built")
def test_keyword_pipeline_through_make_on_the_toy(tmp_path):
    """make wmdp-rmu SELECT=keywords: coreset.py writes the keyword coreset (retain contrast from the target's
    retain corpus), unlearn.py trains on the reduced texts, budgeted against the full forget set."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    r = subprocess.run(["make", "-s", "wmdp-rmu", "SELECT=keywords", "RATIO=0.05", "EPOCHS=1", f"OUT={tmp_path}",
                        f"PY={sys.executable}", "UNLEARN_FLAGS=--eval-limit 8 --no-progress --no-save"],
                       cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "| rmu" in r.stdout and "keywords" in r.stdout
    rec = json.loads((tmp_path / "wmdp-rmu-keywords-r0.05-s42" / "run.json").read_text())
    n = len((ROOT / "data/toy/forget_corpus.jsonl").read_text().splitlines())   # 400 documents in toy v2
    k = round(0.05 * n)
    assert rec["coreset"]["texts_from_coreset"] and rec["coreset"]["n_selected"] == [k]
    b = rec["budget"]["forget"][0]
    assert (b["docs_available"], b["docs_selected"], b["docs_seen"]) == (n, k, k)
    sel = json.loads((tmp_path / "wmdp-rmu-keywords-r0.05-s42.coreset.json").read_text())
    assert sel["method"] == "keywords" and "--retain" not in sel["argv"]   # coreset.py's default: retain_corpus.jsonl
