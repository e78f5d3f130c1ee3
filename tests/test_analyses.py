"""The faithfulness analyses on a tiny model: mode connectivity (connectivity.py) against hand-built endpoints, the
relearning attack (relearn.py, arms.py) and GCG jailbreak prefixes (jailbreak.py)."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import arms as A
import connectivity as C
import evaluate
import jailbreak as J
import relearn as R
from data import TASKS
from infra import ROOT, ProjectError
from hf_tokenizer import load_tokenizer
from model import Transformer, load

from test_unlearn import tiny  # noqa: F401  (the tiny model and corpora fixture)

QUESTIONS = [{"question": "the quick brown", "choices": ["fox", "dog", "river", "stone"], "answer": 0},
             {"question": "lazy dog over", "choices": ["alpha", "beta", "gamma", "delta"], "answer": 2},
             {"question": "river stone answer", "choices": ["the", "quick", "jumps", "over"], "answer": 3}]


def test_barrier_of_a_hand_series():
    ts = [0.0, 0.25, 0.5, 0.75, 1.0]
    b = C.barrier(ts, [0.2, 0.5, 0.6, 0.3, 0.4])   # the line: 0.2, 0.25, 0.3, 0.35, 0.4
    assert b["barrier"] == pytest.approx(0.3) and b["barrier_t"] == 0.5
    assert b["dip"] == pytest.approx(-0.05) and b["dip_t"] == 0.75
    assert C.barrier([0.0, 1.0], [0.3, 0.7]) == {"barrier": 0.0, "barrier_t": 0.0, "dip": 0.0, "dip_t": 0.0}


def test_linear_path_interpolates_only_what_differs(tiny, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    data = tmp_path / "data"
    data.mkdir()
    for name in ("toy_hazard", "toy_general"):
        (data / TASKS[name][0]).write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    base = Transformer.from_pretrained(tiny["model"])
    moved = {"a": ["model.layers.1.mlp.down_proj.weight", "model.layers.2.mlp.down_proj.weight"],
             "b": ["model.layers.2.mlp.down_proj.weight", "model.layers.3.self_attn.o_proj.weight"]}
    g = torch.Generator().manual_seed(3)
    ends = {}
    for end, names in moved.items():
        m = Transformer.from_pretrained(tiny["model"])
        with torch.no_grad():
            for n in names:
                dict(m.named_parameters())[n].add_(0.5 * torch.randn(dict(m.named_parameters())[n].shape, generator=g))
        m.save_pretrained(tmp_path / end, tokenizer_dir=tiny["model"])
        ends[end] = m
    seen = []   # the weights each evaluation saw
    real = evaluate.evaluate_tasks

    def spy(model, *args, **kw):
        seen.append({n: p.detach().clone() for n, p in model.named_parameters()})
        return real(model, *args, **kw)
    monkeypatch.setattr(evaluate, "evaluate_tasks", spy)
    rec = C.main(["--a", str(tmp_path / "a"), "--b", str(tmp_path / "b"), "--base", tiny["model"], "--data",
                  str(data), "--points", "3", "--out", str(tmp_path / "out"), "--no-progress", "--device", "cpu"])
    monkeypatch.setattr(evaluate, "evaluate_tasks", real)
    pa, pb = dict(ends["a"].named_parameters()), dict(ends["b"].named_parameters())
    for t, w in zip((0.0, 0.5, 1.0), seen[:3]):   # the A <-> B path: every tensor at (1 - t) A + t B
        for n in w:
            assert torch.allclose(w[n], (1 - t) * pa[n] + t * pb[n], atol=1e-6), (t, n)
    ab, base_a, base_b = rec["paths"]
    assert ab["tensors"] == sorted(set(moved["a"]) | set(moved["b"]))
    assert base_a["tensors"] == sorted(moved["a"]) and base_b["tensors"] == sorted(moved["b"])
    assert [p["t"] for p in ab["points"]] == [0.0, 0.5, 1.0]

    tok = load_tokenizer(tiny["model"])

    def metrics(model):
        res = evaluate.evaluate_tasks(model, tok, data, ["toy_hazard", "toy_general"], progress=False)
        return evaluate.task_metrics(evaluate.summarize(res))
    mid = Transformer.from_pretrained(tiny["model"])
    with torch.no_grad():
        pa, pb, pm = (dict(x.named_parameters()) for x in (ends["a"], ends["b"], mid))
        for n in pm:
            pm[n].copy_((0.5 * pa[n].double() + 0.5 * pb[n].double()).float())
    assert ab["points"][0]["metrics"] == metrics(ends["a"]) and ab["points"][2]["metrics"] == metrics(ends["b"])
    assert ab["points"][1]["metrics"] == metrics(mid)
    assert base_a["points"][0]["metrics"] == metrics(base)
    for p in rec["paths"]:
        for m, b in p["barriers"].items():
            vals = [q["metrics"][m] for q in p["points"]]
            assert b == C.barrier([0.0, 0.5, 1.0], vals)
    for ext in ("json", "md", "png"):
        assert (tmp_path / "out" / f"results.{ext}").is_file()
    assert "| barrier (t) |" in (tmp_path / "out" / "results.md").read_text()
    # one end only, or too few points: one-line errors before any work
    for argv, msg in ((["--a", str(tmp_path / "a")], "--a and --b"), (["--points", "1"], "--points 1")):
        with pytest.raises(SystemExit) as e:
            C.main(argv + ["--out", str(tmp_path / "o2")])
        assert msg in str(e.value.code) and "\n" not in str(e.value.code)


# ----------------------------------------------------------------------------------------------- relearning attack

def test_relearning_documents_lie_outside_every_coreset_by_default():
    seen = {"full": {"indices": [list(range(40)), list(range(10))], "keywords": False},
            "r0.25": {"indices": [[0, 5, 9, 13, 22, 30, 31, 38, 39, 2], [4, 7]], "keywords": False},
            "r0.1": {"indices": [[5, 9, 30, 38], [7]], "keywords": False},
            "keywords": {"indices": [list(range(40)), list(range(10))], "keywords": True}, "given": None}
    docs = R.draw_documents([40, 10], seen, 20, seed=3, docs_from="outside")
    inside = {(0, i) for i in seen["r0.25"]["indices"][0]} | {(1, i) for i in seen["r0.25"]["indices"][1]}
    assert len(docs) == 20 == len(set(docs)) and not set(docs) & inside
    assert docs == R.draw_documents([40, 10], seen, 20, seed=3, docs_from="outside")   # seeded
    assert docs != R.draw_documents([40, 10], seen, 20, seed=4, docs_from="outside")
    # the overlap each model reports: the full set saw them all, the keyword model their keywords, coresets none
    assert R.overlap(seen["full"], docs) == {"trained_on": 20, "of": 20, "as_keywords": False}
    assert R.overlap(seen["keywords"], docs)["as_keywords"] and R.overlap(seen["r0.1"], docs)["trained_on"] == 0
    assert R.overlap(None, docs)["trained_on"] is None
    anywhere = R.draw_documents([40, 10], seen, 45, seed=3, docs_from="any")
    assert set(anywhere) & inside
    with pytest.raises(ProjectError, match="--n-docs 45: only 38"):
        R.draw_documents([40, 10], seen, 45, seed=3, docs_from="outside")


def test_relearning_zero_steps_changes_nothing_and_steps_lower_the_loss(tiny, monkeypatch):  # noqa: F811
    monkeypatch.setenv("TRITON_INTERPRET", "0")   # the kernels' chunked PyTorch path on the CPU
    model, tok = load(tiny["model"], "cpu", "float32")
    texts = [json.loads(x)["text"] for x in open(tiny["forget"])][:6]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    att = {**R.ATTACK, "lr": 1e-2, "max_len": 64}
    assert R.relearn(model, tok, texts, 0, att, seed=0) == []
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    hist = R.relearn(model, tok, texts, 12, att, seed=0)
    assert len(hist) == 12 and hist[-1] < hist[0]
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    # same documents, seed and settings: the same run (every model of a comparison gets the same batches)
    again, _ = load(tiny["model"], "cpu", "float32")
    assert R.relearn(again, tok, texts, 12, att, seed=0) == hist


def test_arms_and_their_records(tmp_path):
    assert A.parse_arms("full,0.05 keywords") == [("full", None, False), ("r0.05", 0.05, False),
                                                   ("keywords", None, True)]
    for spec, msg in (("full,half", "'half'"), ("1.0", "in \\(0, 1\\)"), ("0.05,0.05", "named twice")):
        with pytest.raises(ProjectError, match=msg):
            A.parse_arms(spec)
    with pytest.raises(ProjectError, match="NAME=CHECKPOINT_DIR"):
        A.given_models("justadir")
    with pytest.raises(ProjectError, match="no config.json"):
        A.given_models(f"a={tmp_path}")
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    forget = tmp_path / "f.jsonl"
    forget.write_text("")
    (run / "run.json").write_text(json.dumps({"coreset": {"files": [str(forget)], "indices": [[1, 4]], "n_docs": [9],
                                                          "texts_from_coreset": False}}))
    assert A.seen_documents(run / "model", [str(forget)]) == {"indices": [[1, 4]], "keywords": False, "n_docs": [9]}
    assert A.seen_documents(run / "model", [str(tmp_path / "other.jsonl")]) is None
    assert A.seen_documents(tmp_path / "nowhere" / "model", [str(forget)]) is None


# ----------------------------------------------------------------------------------------------- GCG

def attack_on(tiny, form, targets):  # noqa: F811
    model, tok = load(tiny["model"], "cpu", "float32")
    model.requires_grad_(False)
    return J.Attack(model, tok, QUESTIONS, targets, "tests", form), tok


@pytest.mark.parametrize("form", ["letter", "cloze"])
def test_gcg_gradient_path_scores_what_the_scorer_scores_and_a_step_never_raises_the_loss(tiny, form, monkeypatch):  # noqa: F811
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    attack, tok = attack_on(tiny, form, [2, 1, 3])
    prefix = J.initial_prefix(attack, 6)
    loss, grad = attack.gradient(prefix)
    assert loss == pytest.approx(attack.losses([tuple(prefix)])[0], rel=1e-5)
    assert len(prefix) == 6 and grad.shape == (6, attack.model.lm_head_weight.shape[0]) and torch.isfinite(grad).all()
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        new, new_loss, valid = J.gcg_step(attack, prefix, 16, 12, gen)
        assert new_loss <= attack.losses([tuple(prefix)])[0] and valid >= 1
        assert new_loss == pytest.approx(attack.losses([tuple(new)])[0])
        prefix = new


def test_gcg_prefix_raises_the_target_letters_log_probability(tiny, monkeypatch):  # noqa: F811
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    attack, tok = attack_on(tiny, "letter", [2, 2, 2])
    start = J.initial_prefix(attack, 5)
    prefix, hist, valid = J.run_gcg(attack, start, steps=8, topk=32, n_candidates=24, seed=0)
    assert hist[-1] < hist[0] and all(b <= a for a, b in zip(hist, hist[1:])) and prefix != start
    # the prefix is a string: lm-eval's own prompt, built around it, scores the target letter higher
    text = tok.decode(prefix)
    lls = lambda items: evaluate.mc_loglikelihoods(attack.model, tok, items, "tests")
    gain = [w[2] - wo[2] for w, wo in zip(lls(J.with_prefix(QUESTIONS, text)), lls(QUESTIONS))]
    assert sum(gain) > 0


def test_gcg_train_and_evaluation_questions_are_disjoint():
    train, held = J.split_questions(200, 5, seed=0)
    assert len(train) == 5 and len(held) == 195 and not set(train) & set(held) and set(train) | set(held) == set(range(200))
    assert J.split_questions(200, 5, seed=0) == (train, held) and J.split_questions(200, 5, seed=1)[0] != train
    with pytest.raises(ProjectError, match="--train-questions 3"):
        J.split_questions(3, 3, seed=0)


# ----------------------------------------------------------------------------------------------- Bezier curve

def test_bezier_control_sets_the_curve_and_steps_c_by_the_chain_rule():
    assert C.bezier(0.0) == [1, 0, 0] and C.bezier(1.0) == [0, 0, 1] and sum(C.bezier(0.3)) == pytest.approx(1)
    p = torch.nn.Parameter(torch.zeros(3))
    a, b = torch.tensor([1.0, 0.0, 2.0]), torch.tensor([3.0, 4.0, 2.0])
    ctl = C.BezierControl({"w": p}, torch.optim.AdamW([p], lr=0.1, weight_decay=0.0), {"w": a}, {"w": b}, seed=0)
    assert torch.equal(ctl.c["w"].detach(), (a + b) / 2)   # the midpoint to start
    ctl.opt = torch.optim.SGD(list(ctl.c.values()), lr=1.0)   # plain steps make the chain rule visible
    c0 = ctl.c["w"].detach().clone()
    ctl.zero_grad()
    t = ctl.ts[-1]
    assert 0 < t < 1 and torch.allclose(p.detach(), (1 - t) ** 2 * a + 2 * t * (1 - t) * c0 + t ** 2 * b)
    p.grad = torch.tensor([1.0, -2.0, 0.5])
    ctl.step()
    want = c0 - 2 * t * (1 - t) * torch.tensor([1.0, -2.0, 0.5])
    assert torch.allclose(ctl.c["w"].detach(), want) and torch.allclose(p.detach(), want)   # p holds C between steps
    ctl.zero_grad()
    assert ctl.ts[-1] != t and len(ctl.ts) == 2


def test_bezier_curve_on_a_tiny_model_passes_through_both_ends(tiny, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    import methods
    import unlearn
    data = tmp_path / "data"
    data.mkdir()
    for name in ("toy_hazard", "toy_general"):
        (data / TASKS[name][0]).write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    rmu = ["--layer-id", "2", "--layer-ids", "1,2", "--steps", "4", "--lr", "1e-2"]
    common = {"method": "rmu", "model": tiny["model"], "forget": tiny["forget"], "retain": tiny["retain"],
              "seed": 0, "eval_tasks": "none", "progress": False, "device": "cpu"}
    for end, ratio in (("a", None), ("b", 0.2)):
        given = {**common, "out": str(tmp_path / end), **({"ratio": ratio} if ratio else {}),
                 **unlearn.overrides_from_argv(rmu)}
        unlearn.run(methods.resolve(given), given=given)
    rec = C.main(["--a", str(tmp_path / "a" / "model"), "--b", str(tmp_path / "b" / "model"), "--base", tiny["model"],
                  "--forget", tiny["forget"], "--retain", tiny["retain"], "--seed", "0", "--data", str(data),
                  "--points", "3", "--bezier", "--unlearn-args", " ".join(rmu + ["--update-scale", "0.5"]),
                  "--out", str(tmp_path / "out"),
                  "--no-progress", "--device", "cpu"])
    names = ["A <-> B", "A <-> B (Bezier)", "base <-> A", "base <-> B"]
    assert [p["path"] for p in rec["paths"]] == names
    line, curve = rec["paths"][0], rec["paths"][1]
    assert curve["points"][0]["metrics"] == line["points"][0]["metrics"]     # t = 0: A
    assert curve["points"][-1]["metrics"] == line["points"][-1]["metrics"]   # t = 1: B
    assert len(rec["bezier"]["t"]) == 4 and all(0 < t < 1 for t in rec["bezier"]["t"])
    trained = {"model.layers.1.mlp.down_proj.weight", "model.layers.2.mlp.down_proj.weight"}
    base, c = Transformer.from_pretrained(tiny["model"]).state_dict(), Transformer.from_pretrained(
        tmp_path / "out" / "c" / "model").state_dict()
    a, b = (Transformer.from_pretrained(tmp_path / e / "model").state_dict() for e in ("a", "b"))
    for k in base:   # C lives in the trained tensors only, and has moved off the midpoint it started from
        if k in trained:
            assert not torch.allclose(c[k], (a[k] + b[k]) / 2), k
        else:
            assert torch.equal(c[k], base[k]), k
    assert set(curve["tensors"]) == trained and curve["through"] == [str(tmp_path / "out" / "c" / "model")]
    # C is the fitted control point, not an unlearned model: --update-scale is for the ends, never applied to C
    assert json.loads((tmp_path / "out" / "c" / "run.json").read_text())["config"]["update_scale"] == 1.0
    assert "A <-> B (Bezier)" in (tmp_path / "out" / "results.md").read_text()


def test_relearning_split_separates_questions_on_what_the_documents_name():
    docs = ["Zendracoccus is a virus. Field teams found it in bats.", "The river Ostra flows past Kelmor. The field is wide."]
    items = [{"question": "Field teams found that new cases of Zendracoccus came from"},   # names Zendracoccus
             {"question": "In the body of a patient, Rixdracoccus goes for the"},           # a name not in the docs
             {"question": "The traders of Kelmor sell"},                                     # names Kelmor
             {"question": "Field reports say the"}]   # "Field" is a word the documents also use in lower case
    assert R.named_in(items, docs) == [True, False, True, False]
    samples = [{"acc": 1.0}, {"acc": 0.0}, {"acc": 0.0}, {"acc": 1.0}]
    assert R.split_accuracy(samples, [True, False, True, False]) == {"named": 0.5, "n_named": 2, "other": 0.5,
                                                                     "n_other": 2}
    assert R.split_accuracy(samples[:1], [True]) == {"named": 1.0, "n_named": 1, "other": None, "n_other": 0}


# ----------------------------------------------------------------------------------------------- through make

@pytest.mark.make
@pytest.mark.skipif(shutil.which("make") is None or not (ROOT / "data/toy/model/model.safetensors").is_file(),
                    reason="no make, or the embedded toy is not built")
def test_the_three_analyses_run_through_make_on_the_toy(tmp_path):
    """make connectivity / relearn / jailbreak on the embedded default, with small budgets: each trains its arms
    with unlearn.run, prints its GPU estimate and writes results.{json,md,png}."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    small = [f"OUT={tmp_path}", f"PY={sys.executable}", "STEPS=15", "UNLEARN_FLAGS=--no-progress"]
    runs = {"connectivity-rmu-r0.05": ["connectivity", "POINTS=3", "BEZIER=1", "CONN_FLAGS=--eval-limit 12 --no-progress"],
            "relearn-rmu": ["relearn", "ARMS=full 0.05", "RELEARN_STEPS=0 2", "RELEARN_FLAGS=--eval-limit 12 --no-progress"],
            "jailbreak-rmu-r0.05": ["jailbreak", "JB_FLAGS=--steps 2 --candidates 8 --eval-limit 12 --no-progress"]}
    for out, target in runs.items():
        r = subprocess.run(["make", "-s", *target, *small], cwd=ROOT, capture_output=True, text=True, env=env,
                           timeout=600)
        assert r.returncode == 0, (target, r.stderr[-2000:])
        assert "GPU cost, estimated (not measured)" in r.stdout, target
        for ext in ("json", "md", "png"):
            assert (tmp_path / out / f"results.{ext}").is_file(), (out, ext)
        rec = json.loads((tmp_path / out / "results.json").read_text())
        assert rec["argv"] and rec["versions"]["torch"] and rec["time_s"] > 0
    rec = json.loads((tmp_path / "relearn-rmu" / "results.json").read_text())
    assert [a["name"] for a in rec["models"]] == ["full", "r0.05"] and rec["budgets"] == [0, 2]
    assert rec["models"][1]["overlap"]["trained_on"] == 0 and rec["models"][0]["overlap"]["trained_on"] == 20
    rec = json.loads((tmp_path / "jailbreak-rmu-r0.05" / "results.json").read_text())
    assert len(rec["models"]) == 2 and all(len(m["loss"]) == 3 and m["loss"][-1] <= m["loss"][0] for m in rec["models"])
    assert rec["n_held_out"] == 12 - 5
    rec = json.loads((tmp_path / "connectivity-rmu-r0.05" / "results.json").read_text())
    assert [p["path"] for p in rec["paths"]][1] == "A <-> B (Bezier)" and rec["bezier"]["steps"] == 15


def test_relearning_settings_are_the_literatures_except_on_the_toy(tiny):  # noqa: F811
    args = R.build_parser().parse_args(["--base", tiny["model"]])
    assert R.attack_settings(args) == R.ATTACK and R.ATTACK["lr"] == 1e-5 and R.ATTACK["batch_size"] == 4
    toy = R.attack_settings(R.build_parser().parse_args([]))   # the embedded toy: its own learning rate
    assert toy["lr"] == 1e-3 and toy["max_len"] == 512
    assert R.attack_settings(R.build_parser().parse_args(["--lr", "2e-4"]))["lr"] == 2e-4
    with pytest.raises(ProjectError, match="--batch-size 0"):
        R.attack_settings(R.build_parser().parse_args(["--batch-size", "0"]))


def test_the_analyses_refuse_bad_flags_in_one_line_before_any_work(tmp_path):
    cases = [(J.main, ["--prefix-len", "0"], "--prefix-len 0: expected a positive number"),
             (J.main, ["--tasks", "toy_general"], "no forget task to attack"),
             (J.main, ["--tasks", "muse_toy,toy_general", "--task", "muse_toy"], "not a multiple-choice task"),
             (J.main, ["--models", "nothing-here"], "expected NAME=CHECKPOINT_DIR"),
             (R.main, ["--steps=-1,5"], "expected step counts >= 0"),
             (R.main, ["--arms", "full,2"], "expected a ratio in (0, 1)"),
             (C.main, ["--points", "1"], "--points 1")]
    for main, argv, msg in cases:
        with pytest.raises(SystemExit) as e:
            main(argv + ["--out", str(tmp_path / "o"), "--no-progress"])
        assert msg in str(e.value.code) and "\n" not in str(e.value.code), (argv, e.value.code)
        assert not (tmp_path / "o").exists()
