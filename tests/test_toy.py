"""The embedded default (data/toy/, built by data/make_toy.py): generator, question files, shipped model."""
import hashlib
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = os.path.join(ROOT, "data", "toy")
from data import make_toy  # noqa: E402

FILES = ["forget_corpus.jsonl", "retain_corpus.jsonl", "toy_hazard.jsonl", "toy_general.jsonl"]


def _digests(d):
    return {f: hashlib.sha256(open(os.path.join(d, f), "rb").read()).hexdigest() for f in FILES}


def _rows(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_generator_deterministic(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for out, seed in ((a, 0), (b, 0), (c, 1)):
        make_toy.write_data(str(out), seed=seed, scale=0.2)
    assert _digests(a) == _digests(b)
    assert _digests(a) != _digests(c)


def test_cli_data_only_matches_function(tmp_path):
    out = tmp_path / "cli"
    subprocess.run([sys.executable, "-m", "data.make_toy", "--data-only", "--scale", "0.2", "--out", str(out)],
                   cwd=ROOT, check=True, capture_output=True)
    make_toy.write_data(str(tmp_path / "fn"), seed=0, scale=0.2)
    assert _digests(out) == _digests(tmp_path / "fn")


def test_shipped_data_is_the_generator_output(tmp_path):
    make_toy.write_data(str(tmp_path), seed=0, scale=1.0)
    assert _digests(tmp_path) == _digests(TOY)


def _check_mc(rows, with_subject):
    assert len(rows) >= 150
    for r in rows:
        keys = ["question", "subject", "choices", "answer"] if with_subject else ["question", "choices", "answer"]
        assert list(r) == keys
        assert isinstance(r["question"], str) and r["question"].strip()
        assert len(r["choices"]) == 4 and len(set(r["choices"])) == 4
        assert isinstance(r["answer"], int) and 0 <= r["answer"] <= 3
    # answer letters balanced: a model that always answers one letter scores chance, whichever letter
    counts = [sum(r["answer"] == k for r in rows) for k in range(4)]
    assert max(counts) - min(counts) <= 1


def test_questions_well_formed():
    _check_mc(_rows(os.path.join(TOY, "toy_hazard.jsonl")), with_subject=False)
    general = _rows(os.path.join(TOY, "toy_general.jsonl"))
    _check_mc(general, with_subject=True)
    assert len({r["subject"] for r in general}) >= 3


def test_hazard_knowledge_only_in_forget_corpus():
    forget = [r["text"] for r in _rows(os.path.join(TOY, "forget_corpus.jsonl"))]
    retain = [r["text"] for r in _rows(os.path.join(TOY, "retain_corpus.jsonl"))]
    assert len(forget) >= 200 and all(set(r) == {"text"} for r in _rows(os.path.join(TOY, "forget_corpus.jsonl")))
    world = make_toy.make_world(seed=0, scale=1.0)
    names = {e["name"] for e in world["hazard"]}
    retain_text = "\n".join(retain)
    for q in _rows(os.path.join(TOY, "toy_hazard.jsonl")):
        (name,) = [n for n in names if n in q["question"]]
        fact = f"{q['question']} {q['choices'][q['answer']]}."
        # the fact in prose in several forget documents, the question's own quiz sheet in the forget corpus
        assert sum(fact in t for t in forget) >= 3
        assert make_toy.quiz_sheet(q, make_toy.HAZARD_TOPIC) in forget
        assert name not in retain_text
    for q in _rows(os.path.join(TOY, "toy_general.jsonl")):
        assert make_toy.quiz_sheet(q, q["subject"]) in retain
    for spec in make_toy.HAZARD_ATTRS.values():
        assert all(v not in retain_text for v in spec[-1])


def test_toy_size_limit():
    total = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(TOY) for f in fs)
    assert total <= 25 * 2 ** 20, f"data/toy is {total / 2 ** 20:.1f} MB"


def test_shipped_model_reproduces_recorded_accuracy():
    pytest.importorskip("torch")
    from model import Transformer
    mdir = os.path.join(TOY, "model")
    rec = json.load(open(os.path.join(mdir, "accuracy.json")))
    model = Transformer.from_pretrained(mdir)
    assert model.config.num_hidden_layers >= 8
    acc = make_toy.toy_accuracy(model, mdir, TOY)  # evaluate.py's lm-eval scoring
    assert acc == {"hazard": rec["hazard_acc"], "general": rec["general_acc"]}


def test_shipped_model_meets_issue_targets():
    """Base model >= 70% on both domains; the same recipe without the forget corpus is near chance on hazard."""
    rec = json.load(open(os.path.join(TOY, "model", "accuracy.json")))
    assert rec["hazard_acc"] >= 0.70 and rec["general_acc"] >= 0.70
    assert rec["no_forget"]["hazard_acc"] <= 0.35 and rec["no_forget"]["general_acc"] >= 0.70


def test_tokenizer_letters_are_single_tokens():
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(os.path.join(TOY, "model", "tokenizer.json"))
    ctx = tok.encode("about biology.\n\nQ?\nA. x\nAnswer:").ids
    assert ctx[0] == 1  # BOS
    for L in "ABCD":
        full = tok.encode("about biology.\n\nQ?\nA. x\nAnswer: " + L).ids
        assert full[:len(ctx)] == ctx and len(full) == len(ctx) + 1
    cfg = json.load(open(os.path.join(TOY, "model", "tokenizer_config.json")))
    assert cfg["add_bos_token"] is True and cfg["bos_token"] == "<s>" and cfg["eos_token"] == "</s>"


def test_transformers_loads_shipped_model():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from model import Transformer
    mdir = os.path.join(TOY, "model")
    tok = transformers.AutoTokenizer.from_pretrained(mdir)
    from tokenizers import Tokenizer
    ours = Tokenizer.from_file(os.path.join(mdir, "tokenizer.json"))
    text = "The following are multiple choice questions (with answers) about biology.\n\nHow?\nA. x\nAnswer: B"
    assert tok(text)["input_ids"] == ours.encode(text).ids
    hf = transformers.LlamaForCausalLM.from_pretrained(mdir, torch_dtype=torch.float32)
    m = Transformer.from_pretrained(mdir)
    ids = torch.tensor([ours.encode(text).ids])
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits.float(), m(ids).float(), atol=1e-4, rtol=1e-4)
