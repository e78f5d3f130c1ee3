"""The embedded default's MUSE-shaped split (toy_muse.py, data/toy/muse/): determinism, the real MUSE readers,
held-out KnowMem questions, the metrics on the split against MUSE's definitions, and the shipped measurements."""
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import data
import make_toy
import muse_eval
import toy_muse
from infra import ROOT, TOY_DIR, ProjectError
from hf_tokenizer import load_tokenizer

MUSE = TOY_DIR / "muse" / "toy"
STEMS = ["raw_forget", "raw_retain1", "raw_holdout", "verbmem_forget", "knowmem_forget_qa", "knowmem_forget_qa_icl",
         "knowmem_retain_qa", "knowmem_retain_qa_icl", "privleak_forget", "privleak_holdout"]
PATHOGEN = re.compile(r"\b[A-Z][a-z]+(?:" + "|".join(make_toy.HAZARD_SUFFIX) + r")\b")   # a fictional pathogen's name


def digests(out):
    files = [os.path.join(toy_muse.MUSE_DIR, s + ".jsonl") for s in STEMS] + [toy_muse.PRACTICE_FILE]
    return {f: hashlib.sha256(open(os.path.join(out, f), "rb").read()).hexdigest() for f in files}


def test_split_is_deterministic_and_shipped(tmp_path):
    """Same seed, same bytes; another seed, other files; the shipped files are the generator's output."""
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        toy_muse.write_muse_split(str(tmp_path / name), seed=seed)
    assert digests(tmp_path / "a") == digests(tmp_path / "b") == digests(TOY_DIR)
    assert digests(tmp_path / "a") != digests(tmp_path / "c")


def test_split_reads_with_the_real_muse_readers():
    d = data.read_muse(MUSE, STEMS)
    assert d["raw_forget"] == data.read_corpus(str(TOY_DIR / "forget_corpus.jsonl"))       # the WMDP toy's prose
    assert d["raw_retain1"] == data.read_corpus(str(TOY_DIR / "retain_corpus.jsonl"))
    assert len(d["verbmem_forget"]) == len(d["knowmem_forget_qa"]) == len(d["knowmem_retain_qa"]) == 100
    assert len(d["privleak_forget"]) == len(d["privleak_holdout"]) == 100
    for it in d["verbmem_forget"]:   # a forget document, cut in two at a sentence boundary
        assert it["prompt"] + it["gt"] in d["raw_forget"] and it["gt"].startswith(" ") and it["prompt"].endswith(".")
    assert set(d["privleak_forget"]) <= set(d["raw_forget"])
    # the holdout is about pathogens that no training text mentions
    training = "\n".join(d["raw_forget"] + d["raw_retain1"] + data.read_corpus(str(TOY_DIR / toy_muse.PRACTICE_FILE)))
    names = {m for text in d["privleak_holdout"] for m in PATHOGEN.findall(text)}
    assert len(names) == 25 and not any(n in training for n in names)
    # evaluate.py finds the split under the task muse_toy
    assert data.MUSE_TASKS["muse_toy"] == "toy" and os.path.isdir(TOY_DIR / data.MUSE_DIRS["toy"])


def test_no_knowmem_question_is_in_a_training_file():
    qa = data.read_muse(MUSE, ["knowmem_forget_qa", "knowmem_retain_qa", "knowmem_forget_qa_icl"])
    training = [open(TOY_DIR / f, encoding="utf-8").read() for f in
                ("forget_corpus.jsonl", "retain_corpus.jsonl", toy_muse.PRACTICE_FILE)]
    for d in qa["knowmem_forget_qa"] + qa["knowmem_retain_qa"]:
        assert not any(d["question"] in t for t in training), d
        assert d["answer"] in {v for spec in {**data_attrs()}.values() for v in spec[-1]}
    # the few-shot examples are on practice entities, which no test question asks about
    names = lambda qs: {n for q in qs for n in PATHOGEN.findall(q["question"])}
    assert len(names(qa["knowmem_forget_qa_icl"])) == 3 and len(names(qa["knowmem_forget_qa"])) >= 40
    assert not names(qa["knowmem_forget_qa"]) & names(qa["knowmem_forget_qa_icl"])
    toy_muse.check_knowmem_held_out(qa["knowmem_forget_qa"], training)          # the generator's own check
    with pytest.raises(ProjectError, match="appears in a training document"):
        toy_muse.check_knowmem_held_out(qa["knowmem_forget_qa"][:1], [qa["knowmem_forget_qa"][0]["question"]])


def data_attrs():
    return {**make_toy.HAZARD_ATTRS, **make_toy.GENERAL_ATTRS}


def test_chance_f1_by_hand():
    """A value shares no word with the other values of its attribute, so a uniform guess scores F1 1 a quarter of
    the time: 25. With one shared word ("salt crabs" against a made-up "salt flats"): (1 + 0.5) / 4 per question."""
    qa = [{"question": "q", "answer": "cave bats"}, {"question": "q", "answer": "liver"}]
    assert toy_muse.chance_f1(qa, data_attrs()) == 25.0
    attrs = {"x": ([], "", ["salt crabs", "salt flats", "oak", "clay"])}
    assert toy_muse.chance_f1([{"question": "q", "answer": "salt crabs"}], attrs) == pytest.approx(37.5)


def test_metrics_on_the_split_match_muse_definitions(monkeypatch):
    """evaluate_muse on the shipped split with the model's outputs chosen by hand: VerbMem is the mean ROUGE-L F1
    x100 against the ground truth, KnowMem the same on the answers after MUSE's cut, PrivLeak (AUC - AUC_retrain) /
    AUC_retrain x100 with the AUC_retrain recorded in split.json."""
    d = data.read_muse(MUSE, STEMS)
    gts = {it["prompt"]: it["gt"] for it in d["verbmem_forget"]}
    answers = {toy_muse_prompt(q, d[f"knowmem_{s}_qa_icl"]): q["answer"]
               for s in ("forget", "retain") for q in d[f"knowmem_{s}_qa"]}
    wmdp = "\n".join(d["raw_forget"])

    def fake_generate(model, tok, prompts, *a, **k):
        if prompts[0] in gts:   # VerbMem: the true continuation for the first half, nothing for the rest
            return [gts[p] if i < 50 else "" for i, p in enumerate(prompts)]
        # KnowMem: right answers, then MUSE's cut removes the next question
        return [answers[p] + "\n\nQuestion: what?" if i % 4 else "wrong" for i, p in enumerate(prompts)]

    def fake_logprobs(model, tok, texts, *a, **k):
        # members are likelier than every holdout text: Min-K (minus the mean of the lowest 40% log-probs) 0.1
        # against 5, score -Min-K, label 1 = holdout: the AUC is 0, as for a model that memorised the forget set
        return [[-0.1] * 10 if t in wmdp else [-5.0] * 10 for t in texts]
    monkeypatch.setattr(muse_eval, "generate_texts", fake_generate)
    monkeypatch.setattr(muse_eval, "token_logprobs", fake_logprobs)
    tok = load_tokenizer(TOY_DIR / "model")   # VerbMem cuts the ground truth to 128 tokens of the model's tokenizer
    res, _ = muse_eval.evaluate_muse(None, tok, MUSE, "muse_toy", progress=False)
    assert res["verbmem_f"] == pytest.approx(50.0)
    assert res["knowmem_f"] == pytest.approx(75.0) and res["knowmem_r"] == pytest.approx(75.0)
    recorded = json.loads((MUSE / "split.json").read_text())["auc_retrain"]
    assert res["auc_retrain"] == recorded and res["auc_forget_holdout"] == 0.0
    assert res["privleak"] == pytest.approx((0.0 - recorded) / recorded * 100) == -100.0
    # an explicit --auc-retrain wins over the recorded one
    res2, _ = muse_eval.evaluate_muse(None, tok, MUSE, "muse_toy", progress=False, auc_retrain=0.5)
    assert res2["privleak"] == pytest.approx(-100.0) and res2["auc_retrain"] == 0.5


def toy_muse_prompt(q, icl):
    return muse_eval.knowmem_prompt(q["question"], icl)


def test_recorded_auc_retrain_is_checked(tmp_path):
    (tmp_path / "split.json").write_text(json.dumps({"auc_retrain": 1.7}))
    with pytest.raises(muse_eval.MuseError, match="split.json: auc_retrain 1.7: expected a number between 0 and 1"):
        muse_eval.recorded_auc_retrain(tmp_path)
    (tmp_path / "split.json").write_text("[1]")
    with pytest.raises(muse_eval.MuseError, match="not a JSON object"):
        muse_eval.recorded_auc_retrain(tmp_path)
    assert muse_eval.recorded_auc_retrain(tmp_path / "none") is None


def test_shipped_measurements_make_the_model_worth_unlearning():
    """split.json records the target and control models' metrics (make toy measured them): VerbMem clearly above
    the control's; KnowMem-forget clearly above chance F1 (10 points: 2 standard errors on 100 questions) and the
    control's; AUC_retrain near 0.5 (the control saw neither forget nor holdout); the forget prose separable from
    the holdout by the target (the PrivLeak the unlearning has to remove)."""
    meta = json.loads((MUSE / "split.json").read_text())
    base, control = meta["target"], meta["control"]
    assert base["verbmem_f"] >= control["verbmem_f"] + 30
    assert base["knowmem_f"] >= meta["chance_f1"]["knowmem_f"] + 10
    assert base["knowmem_f"] >= control["knowmem_f"] + 10
    assert 0.3 <= meta["auc_retrain"] <= 0.7 and meta["auc_retrain"] == control["auc_forget_holdout"]
    assert base["auc_forget_holdout"] <= 0.1
    assert set(meta["sizes"]) == set(STEMS)


def test_cli_data_only(tmp_path):
    out = tmp_path / "t"
    subprocess.run([sys.executable, "toy_muse.py", "--data-only", "--out", str(out)], cwd=str(ROOT), check=True,
                   capture_output=True)
    assert digests(out) == digests(TOY_DIR)
    meta = json.loads((out / toy_muse.MUSE_DIR / "split.json").read_text())
    assert "auc_retrain" not in meta and meta["sizes"]["verbmem_forget"] == 100 and "run" in meta
    # rewriting the same files keeps the models' recorded measurements (they still describe these files)
    shutil.copy(MUSE / "split.json", out / toy_muse.MUSE_DIR / "split.json")
    subprocess.run([sys.executable, "toy_muse.py", "--data-only", "--out", str(out)], cwd=str(ROOT), check=True,
                   capture_output=True)
    meta = json.loads((out / toy_muse.MUSE_DIR / "split.json").read_text())
    shipped = json.loads((MUSE / "split.json").read_text())
    assert meta["auc_retrain"] == shipped["auc_retrain"] and meta["target"] == shipped["target"]
    r = subprocess.run([sys.executable, "toy_muse.py", "--out", str(tmp_path / "empty"), "--steps", "1"],
                       cwd=str(ROOT), capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0 and "build the toy first" in r.stderr


@pytest.mark.slow
@pytest.mark.skipif(not (TOY_DIR / "muse" / "model" / "config.json").is_file() or shutil.which("make") is None,
                    reason="the toy's MUSE model is not built (make toy-muse)")
def test_make_muse_npo_on_the_toy(tmp_path):
    """`make muse-npo RATIO=0.05` with no DATA: NPO on a 5% coreset of the split's raw_forget, from the toy's MUSE
    target model with its tuned defaults; the before/after table carries VerbMem, KnowMem (forget, retain) and
    PrivLeak, and run.json says what was trained on and what it did."""
    r = subprocess.run(["make", "-s", "muse-npo", "RATIO=0.05", f"OUT={tmp_path}", "UNLEARN_FLAGS=--no-progress"],
                       cwd=str(ROOT), capture_output=True, text=True, timeout=900, env=dict(os.environ, TRITON_INTERPRET="0"))
    assert r.returncode == 0, r.stderr[-2000:]
    for col in ("muse_toy:verbmem_f", "muse_toy:knowmem_f", "muse_toy:knowmem_r", "muse_toy:privleak"):
        assert col in r.stdout, r.stdout
    rec = json.loads(next(Path(tmp_path).rglob("run.json")).read_text())
    assert rec["config"]["model"].endswith("data/toy/muse/model") and rec["toy"]
    assert rec["config"]["forget"][0].endswith("muse/toy/raw_forget.jsonl")
    spent = rec["budget"]["forget"][0]
    assert spent["docs_available"] == 400 and spent["docs_selected"] == spent["docs_seen"] == 20
    before, after = rec["eval"]["before"]["muse_toy"], rec["eval"]["after"]["muse_toy"]
    assert before["auc_retrain"] == json.loads((MUSE / "split.json").read_text())["auc_retrain"]
    assert after["verbmem_f"] < before["verbmem_f"] - 10 and after["knowmem_f"] < before["knowmem_f"]


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_refuses_real_muse_data_without_its_model(tmp_path):
    """With DATA (the real MUSE files) the toy's MUSE model would be unlearned on text it never saw: one line (then
    make's own "Error 2" line), exit 2, before anything runs."""
    for target in (["muse-npo"], *([t, "BENCHMARK=muse", "METHOD=npo"] for t in ("sweep", "budget-curve", "connectivity", "relearn"))):
        r = subprocess.run(["make", "-s", *target, f"DATA={tmp_path}", f"OUT={tmp_path / 'o'}"], cwd=str(ROOT),
                           capture_output=True, text=True, timeout=60)
        ours = [line for line in r.stderr.splitlines() if not re.match(r"make(\[\d+\])?: ", line)]   # make's own
        assert r.returncode == 2 and len(ours) == 1, r.stderr
        assert f"DATA={tmp_path} needs MODEL=the MUSE News target model" in ours[0] and not (tmp_path / "o").exists()
    # the jailbreak scores multiple-choice answers: the MUSE split has none
    r = subprocess.run(["make", "-s", "jailbreak", "BENCHMARK=muse", f"OUT={tmp_path / 'o'}"], cwd=str(ROOT),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "BENCHMARK=muse has none" in r.stderr and not (tmp_path / "o").exists()


def test_the_muse_model_resolves_to_its_own_files_and_defaults(tmp_path, monkeypatch):
    """--model data/toy/muse/model alone: the split's forget and retain prose, the MUSE task with the cloze utility
    task, and defaults.json's "muse" values; a defaults.json without that section is refused in one line."""
    import methods
    cfg = methods.resolve({"method": "npo", "model": str(TOY_DIR / "muse" / "model")})
    assert methods.toy_kind(cfg.model) == "muse" and methods.toy_kind(TOY_DIR / "model") == "wmdp"
    assert cfg.forget == [str(MUSE / "raw_forget.jsonl")] and cfg.retain == [str(MUSE / "raw_retain1.jsonl")]
    muse = json.loads((TOY_DIR / "defaults.json").read_text())["muse"]["npo"]
    assert cfg.eval_tasks == ["muse_toy", "toy_general"] and (cfg.lr, cfg.beta, cfg.steps) == \
        (muse["lr"], muse["beta"], muse["steps"])
    fake = tmp_path / "toy"
    shutil.copytree(TOY_DIR / "muse" / "model", fake / "muse" / "model")
    (fake / "defaults.json").write_text(json.dumps({"npo": {"lr": 0.1}}))
    monkeypatch.setattr(methods, "TOY_DIR", fake)
    monkeypatch.setattr(methods, "TOY_MUSE_MODEL", fake / "muse" / "model")
    with pytest.raises(methods.ConfigError, match='defaults.json: no "muse" section'):
        methods.resolve({"method": "npo", "model": str(fake / "muse" / "model")})
