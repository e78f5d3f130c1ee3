"""The embedded default (data/toy/, built by make_toy.py): generator, question files, shipped model."""
import argparse
import hashlib
import json
import os
import subprocess
import sys

import pytest

import make_toy
from infra import ROOT as _ROOT, TOY_DIR

ROOT = str(_ROOT)
TOY = str(TOY_DIR)

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
    subprocess.run([sys.executable, "make_toy.py", "--data-only", "--scale", "0.2", "--out", str(out)],
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


@pytest.fixture(scope="module")
def shipped_accuracy():
    """The shipped model's accuracy, computed now with evaluate.py's lm-eval scoring."""
    from model import Transformer
    mdir = os.path.join(TOY, "model")
    model = Transformer.from_pretrained(mdir)
    assert model.config.num_hidden_layers >= 8
    return make_toy.toy_accuracy(model, mdir, TOY)


def test_shipped_model_reproduces_recorded_accuracy(shipped_accuracy):
    rec = json.load(open(os.path.join(TOY, "model", "accuracy.json")))
    assert shipped_accuracy == {"hazard": rec["hazard_acc"], "general": rec["general_acc"]}


def test_shipped_model_meets_issue_targets(shipped_accuracy):
    """The base model, measured (not read back from accuracy.json): >= 70% on both domains."""
    assert shipped_accuracy["hazard"] >= 0.70 and shipped_accuracy["general"] >= 0.70


@pytest.mark.slow
def test_same_recipe_without_forget_corpus_is_near_chance_on_hazard():
    """The control of the issue's target, trained now (make_toy's recipe, its 1000 steps, on the retain corpus and
    the general quiz only, with the shipped tokenizer): hazard near chance, general still learned. 10-16 min on 2 cores."""
    from tokenizers import Tokenizer
    args = argparse.Namespace(**make_toy.DEFAULTS, eval_every=0, eval_fn=None)
    _, _, retain, _, gq = make_toy.make_benchmark(args.seed, args.scale)
    mdir = os.path.join(TOY, "model")
    tok = Tokenizer.from_file(os.path.join(mdir, "tokenizer.json"))
    quiz = [(make_toy.mc_prompt(q["question"], q["choices"], q["subject"]), " " + make_toy.LETTERS[q["answer"]])
            for q in gq]
    import torch
    torch.set_num_threads(args.threads)
    control, _, _ = make_toy.train_model(args, quiz, retain, lambda t: tok.encode(t).ids,
                                         make_toy.model_config(args, tok.get_vocab_size()), log=lambda *a, **k: None)
    acc = make_toy.toy_accuracy(control, mdir, TOY)
    assert acc["hazard"] <= 0.35 and acc["general"] >= 0.70, acc


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
