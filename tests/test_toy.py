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

FILES = ["forget_corpus.jsonl", "retain_corpus.jsonl", "retain_unseen.jsonl", "toy_hazard.cloze.jsonl",
         "toy_general.cloze.jsonl", "toy_hazard_para.cloze.jsonl", "toy_general_para.cloze.jsonl"]


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
    # the true value of each attribute is each of its four values equally often: a model that prefers one value
    # whatever the entity scores chance, 25%
    by_choices = {}
    for r in rows:
        by_choices.setdefault(frozenset(r["choices"]), []).append(r["choices"][r["answer"]])
    for truths in by_choices.values():
        counts = [truths.count(v) for v in set(truths)]
        assert len(counts) == 4 and max(counts) - min(counts) <= 1


def _texts(name):
    rows = _rows(os.path.join(TOY, name))
    assert all(set(r) == {"text"} for r in rows)
    return [r["text"] for r in rows]


def test_questions_well_formed():
    _check_mc(_rows(os.path.join(TOY, "toy_hazard.cloze.jsonl")), with_subject=False)
    general = _rows(os.path.join(TOY, "toy_general.cloze.jsonl"))
    _check_mc(general, with_subject=True)
    assert len({r["subject"] for r in general}) >= 3


def test_no_test_item_in_any_training_file():
    """Checked on the shipped files, independently of the generator's own check: no test question, and no piece of
    two or more words of a test phrasing (the words around the entity and the value), appears in a training
    document. Every training document is prose: no quiz sheet, no 'Answer:'."""
    docs = _texts("forget_corpus.jsonl") + _texts("retain_corpus.jsonl") + _texts("retain_unseen.jsonl")
    text = "\n".join(docs).lower()
    assert "answer:" not in text
    every = {**make_toy.HAZARD_ATTRS, **make_toy.GENERAL_ATTRS}
    for task in FILES[3:]:
        for q in _rows(os.path.join(TOY, task)):
            assert q["question"].lower() not in text, q["question"]
            # nor the entity, the phrasing's closing words and the answer ("X is solvarine" for "The cure for X is")
            head, tail = make_toy.phrasing_of(q["question"], every)[1].split("{X}")
            bridge = q["question"][len(head):] + " " + q["choices"][q["answer"]]
            assert bridge.lower() not in text, bridge
    for attrs in (make_toy.HAZARD_ATTRS, make_toy.GENERAL_ATTRS):
        for attr, spec in attrs.items():
            phrasings = make_toy.held_out_phrasings(attr, attrs)
            assert len(set(phrasings)) == 3
            for test in phrasings:
                pieces = make_toy._template_pieces(test)
                assert pieces, test
                for piece in pieces:
                    assert piece.lower() not in text, piece


def test_paraphrase_tasks_ask_the_main_facts_in_two_more_phrasings():
    """Each main question is asked twice more, through its attribute's two paraphrases, with the same choices in the
    same order and the same answer: only the context differs."""
    for main, para, attrs in (("toy_hazard", "toy_hazard_para", make_toy.HAZARD_ATTRS),
                              ("toy_general", "toy_general_para", make_toy.GENERAL_ATTRS)):
        rows, prows = _rows(os.path.join(TOY, main + ".cloze.jsonl")), _rows(os.path.join(TOY, para + ".cloze.jsonl"))
        assert len(prows) == 2 * len(rows)
        for i, q in enumerate(rows):
            attr, phrasing = make_toy.phrasing_of(q["question"], attrs)
            assert phrasing == attrs[attr][-2]
            head, tail = phrasing.split("{X}")
            name = q["question"][len(head):len(q["question"]) - len(tail)]
            for p, want in zip(prows[2 * i:2 * i + 2], make_toy.PARAPHRASES[attr]):
                assert {k: v for k, v in p.items() if k != "question"} == {k: v for k, v in q.items() if k != "question"}
                assert make_toy.phrasing_of(p["question"], attrs) == (attr, want)
                assert p["question"] == want.format(X=name)


@pytest.mark.parametrize("attr,leak,match", [
    ("organ", "Doctors say {X} damages the", "test phrasing of 'organ' .*damages the"),   # a training piece
    ("neutraliser", "Sadly, {X} is", "ends as a training phrasing joins entity and value .*X\\} is \\{v"),  # "X is v"
])
def test_generator_refuses_a_leaked_paraphrase(monkeypatch, attr, leak, match):
    monkeypatch.setattr(make_toy, "PARAPHRASES", dict(make_toy.PARAPHRASES, **{attr: [leak]}))
    from infra import ProjectError
    with pytest.raises(ProjectError, match=match):
        make_toy.make_benchmark(seed=0, scale=0.2)


@pytest.mark.parametrize("leak,match", [
    ("{test} {{v}}.", "test question .* appears in a training document"),   # the whole test phrasing
    ("Doctors say {{X}} goes straight for the {{v}}.", "test phrasing of 'organ' .*goes straight for the"),  # a piece
])
def test_generator_refuses_a_leaked_test_phrasing(monkeypatch, leak, match):
    from infra import ProjectError
    attrs = dict(make_toy.HAZARD_ATTRS)
    train, test, values = attrs["organ"]
    attrs["organ"] = ([leak.format(test=test)] * 8, test, values)   # every organ statement is the leaked one
    monkeypatch.setattr(make_toy, "HAZARD_ATTRS", attrs)
    with pytest.raises(ProjectError, match=match):
        make_toy.make_benchmark(seed=0, scale=0.2)


def test_hazard_knowledge_only_in_forget_corpus():
    """Every hazard fact is stated in several forget documents, in several phrasings; no hazard agent and no hazard
    value is ever named in the retain corpus."""
    forget, retain = _texts("forget_corpus.jsonl"), _texts("retain_corpus.jsonl") + _texts("retain_unseen.jsonl")
    assert len(forget) >= 200
    world = make_toy.make_world(seed=0, scale=1.0)
    retain_text = "\n".join(retain)
    for e in world["hazard"]:
        docs = [t for t in forget if e["name"] in t]
        assert len(docs) >= 3 and e["name"] not in retain_text
        for attr, v in e["facts"].items():
            said = {tpl for tpl in make_toy.HAZARD_ATTRS[attr][-3] for t in docs
                    if make_toy._cap(tpl.format(X=e["name"], v=v)) in t}
            assert len(said) >= 3, (e["name"], attr)
    for spec in make_toy.HAZARD_ATTRS.values():
        assert all(v not in retain_text for v in spec[-1])


def test_unseen_retain_is_new_prose_about_the_same_towns():
    """retain_unseen.jsonl (the NPO family's retain corpus on the toy) is general prose the model never trained on:
    no document of it is in the pretraining corpora, it covers every town as often as the retain corpus, and it
    states the same facts in the training phrasings."""
    seen, unseen = _texts("retain_corpus.jsonl"), _texts("retain_unseen.jsonl")
    assert len(unseen) == len(seen) and not set(unseen) & set(seen + _texts("forget_corpus.jsonl"))
    for e in make_toy.make_world(seed=0, scale=1.0)["general"]:
        docs = [t for t in unseen if e["name"] in t]
        assert len(docs) == sum(e["name"] in t for t in seen) == make_toy.DOCS_PER_ENTITY
        for attr, v in e["facts"].items():
            assert all(any(make_toy._cap(tpl.format(X=e["name"], v=v)) in t for tpl in make_toy.GENERAL_ATTRS[attr][-3])
                       for t in docs), (e["name"], attr)


def test_toy_size_limit():
    total = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(TOY) for f in fs)
    assert total <= 25 * 2 ** 20, f"data/toy is {total / 2 ** 20:.1f} MB"


MODEL_DIR = os.path.join(TOY, "model")


@pytest.fixture(scope="module")
def shipped_model():
    from model import Transformer
    model = Transformer.from_pretrained(MODEL_DIR)
    assert model.config.num_hidden_layers >= 10
    return model


@pytest.fixture(scope="module")
def shipped_accuracy(shipped_model):
    """The shipped model's accuracy, computed now with evaluate.py's lm-eval scoring."""
    return make_toy.toy_accuracy(shipped_model, MODEL_DIR, TOY)


@pytest.fixture(scope="module")
def shipped_by_attribute(shipped_model):
    return make_toy.attribute_accuracy(shipped_model, MODEL_DIR, TOY)


@pytest.fixture(scope="module")
def shipped_paraphrase(shipped_model):
    return make_toy.paraphrase_accuracy(shipped_model, MODEL_DIR, TOY)


def test_shipped_model_reproduces_recorded_accuracy(shipped_accuracy, shipped_by_attribute, shipped_paraphrase):
    rec = json.load(open(os.path.join(TOY, "model", "accuracy.json")))
    assert shipped_accuracy == {"hazard": rec["hazard_acc"], "general": rec["general_acc"]}
    assert shipped_by_attribute == rec["by_attribute"]
    assert shipped_paraphrase == rec["paraphrase"]


def test_every_paraphrase_is_recalled_not_guessed(shipped_paraphrase):
    """The base model recalls the facts through every paraphrase too (at least 50%; chance 25%)."""
    for domain, attrs in (("hazard", make_toy.HAZARD_ATTRS), ("general", make_toy.GENERAL_ATTRS)):
        by = shipped_paraphrase[domain]["by_phrasing"]
        assert set(by) == {f"{a}: {p}" for a in attrs for p in make_toy.PARAPHRASES[a]}
        assert min(by.values()) >= 0.5, by


def test_every_attribute_is_recalled_not_guessed(shipped_by_attribute):
    """Each attribute's questions, by the base model: at least 50% (chance and a one-value guess both score 25%), so
    no quarter of a domain measures a value bias. v2.0's phrasings for the neutraliser and the export scored 30.0
    and 37.8 here."""
    assert set(shipped_by_attribute["hazard"]) == set(make_toy.HAZARD_ATTRS)
    assert set(shipped_by_attribute["general"]) == set(make_toy.GENERAL_ATTRS)
    weak = {(d, a): acc for d, accs in shipped_by_attribute.items() for a, acc in accs.items() if acc < 0.5}
    assert not weak, weak


def test_attribute_of_finds_each_test_phrasing():
    for attrs in (make_toy.HAZARD_ATTRS, make_toy.GENERAL_ATTRS):
        for attr, spec in attrs.items():
            assert make_toy.attribute_of(spec[-2].format(X="Vorkelvirin"), attrs) == attr
    assert make_toy.attribute_of("Something else entirely", make_toy.HAZARD_ATTRS) is None


def test_shipped_model_meets_issue_targets(shipped_accuracy):
    """The base model, measured (not read back from accuracy.json): acc >= 60% on both domains (chance 25%), on
    questions whose phrasing it never saw."""
    assert shipped_accuracy["hazard"] >= 0.60 and shipped_accuracy["general"] >= 0.60


@pytest.mark.slow
def test_same_recipe_without_forget_corpus_is_near_chance_on_hazard():
    """The control of the issue's target, trained now (make_toy's recipe and steps on the retain corpus only, with
    the shipped tokenizer): hazard near chance, general still learned; make_toy's record reproduced exactly on the
    CPU kernels it was built with, within 5 points on others. About 11 min on 2 cores (19 min on an AVX2-only one)."""
    from tokenizers import Tokenizer
    args = argparse.Namespace(**make_toy.DEFAULTS, eval_every=0, eval_fn=None)
    _, _, retain, _, _ = make_toy.make_benchmark(args.seed, args.scale)
    mdir = os.path.join(TOY, "model")
    tok = Tokenizer.from_file(os.path.join(mdir, "tokenizer.json"))
    import torch
    torch.set_num_threads(args.threads)
    control, _, _ = make_toy.train_model(args, retain, make_toy.encoder(tok, args.fact_weight),
                                         make_toy.model_config(args, tok.get_vocab_size()), log=lambda *a, **k: None)
    acc = make_toy.toy_accuracy(control, mdir, TOY)
    built = json.load(open(os.path.join(mdir, "accuracy.json")))
    record = built["no_forget"]
    rec = {"hazard": record["hazard_acc"], "general": record["general_acc"]}
    here = torch.backends.cpu.get_cpu_capability()
    # the control's own record says which kernels trained it (v2.1 retrained it where the shipped model was not)
    made_on = record.get("cpu_capability", built.get("cpu_capability"))
    if made_on == here and record.get("threads", built.get("threads", args.threads)) == args.threads:
        assert acc == rec   # make_toy's record, reproduced bit for bit on the same CPU kernels
    else:   # other kernels round differently over 2000 steps (on v2.0's questions an AVX2 retrain scored
            # 0.24 / 0.6167 where the original build had 0.235 / 0.6389): the same recipe, a slightly different model
        assert all(abs(acc[k] - rec[k]) <= 0.05 for k in rec), \
            f"{acc} vs the record {rec} (built on CPU kernels {made_on or 'unrecorded'}, here {here})"
    # general: learned (twice chance), not the shipped model's 60% target: v2.1's export phrasing was chosen on the
    # shipped model, and the control does not transfer to it (28.9% on export; 53.9 in all, data/toy/README.md)
    assert acc["hazard"] <= 0.35 and acc["general"] >= 0.50, acc


def test_encoder_weights_the_fact_tokens():
    """make_toy's training weight: every token that overlaps a stated value weighs fact_weight, every other 1."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(os.path.join(TOY, "model", "tokenizer.json"))
    text = "Rixpraphage is a dangerous virus. People catch Rixpraphage from well water. Its organ is the lungs."
    ids, wts = make_toy.encoder(tok, 7.0)(text)
    enc = tok.encode(text)
    assert ids == enc.ids and len(wts) == len(ids)
    heavy = "".join(text[a:b] for (a, b), w in zip(enc.offsets, wts) if w == 7.0)
    assert heavy.replace(" ", "") == "wellwaterlungs"
    assert set(wts) == {1.0, 7.0}


@pytest.mark.parametrize("argv,flag", [(["--fact-weight", "0"], "--fact-weight 0.0"), (["--scale", "-1"], "--scale -1.0")])
def test_bad_build_flags_are_one_line_errors(tmp_path, argv, flag):
    out = tmp_path / "toy"
    with pytest.raises(SystemExit) as e:
        make_toy.main(argv + ["--out", str(out)])
    msg = str(e.value.code)
    assert msg.startswith("error: " + flag) and "expected a number > 0" in msg and "\n" not in msg
    assert not out.exists()   # refused before anything is written


def test_tokenizer_config():
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(os.path.join(TOY, "model", "tokenizer.json"))
    assert tok.encode("In nature, X lives").ids[0] == 1  # BOS
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
