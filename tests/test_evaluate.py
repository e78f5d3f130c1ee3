"""evaluate.py: harness-exact multiple choice (fast path and fallback), aggregation, MUSE metrics, result tables,
CLI; the log-likelihood machinery under it (loglik.py: lm-eval's encoding rules, token log-probs, generation) and
the MUSE metrics (muse_eval.py); and bench-eval's flow (benches/eval_speed.py), which compares evaluate.py with
the harness's HF path.

Tiny random Llama models (model.py) with tokenizers trained here; the harness's way is recomputed independently
(one full sequence per choice, lm-eval's context/continuation split, full log-softmax over every position).
The prompt itself (data.mc_prompt) is tested in test_data.py, Min-K% in test_losses.py."""
import argparse
import json
import math
import tempfile
import random
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import evaluate as E
import loglik as LL
import losses
import muse_eval as MU
from benches import eval_speed
from infra import ProjectError
from hf_tokenizer import load_tokenizer
from model import ModelConfig, Transformer, load

WORDS = ("alpha beta gamma delta omega river stone cloud metal glass paper tiger eagle salmon maple cedar "
         "copper silver carbon sodium virus enzyme protein kernel socket packet cipher buffer router").split()
MMLU_SUBJECTS = ["anatomy", "college_biology", "philosophy", "virology"]  # stem, stem, humanities, other


# ----------------------------------------------------------------------------------------------- fixtures

def make_questions(n, seed, subjects=None, long_idx=None):
    rng = random.Random(seed)
    qs = []
    for i in range(n):
        q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + "?"
        if i == long_idx:
            q = " ".join(rng.choice(WORDS) for _ in range(150)) + "?"
        choices = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4))) for _ in range(4)]
        item = dict(question="  " + q + " ", choices=choices, answer=rng.randrange(4))
        if subjects:
            item["subject"] = subjects[i % len(subjects)]
        qs.append(item)
    return qs


def write_jsonl(path, rows):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train_tokenizer(out_dir, kind):
    """kind 'word': one token per space-separated word (letters ' A'..' D' are single tokens, the fast path);
    kind 'char': one token per character (' A' is two tokens: the fallback path). BOS from tokenizer_config."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    corpus = []
    for subj in MMLU_SUBJECTS + [None, "biology"]:
        for q in make_questions(8, 1, [subj] if subj else None):
            ctx = E.mc_prompt(q["question"], q["choices"], subj)
            corpus += [ctx + " " + x for x in "ABCD"]
    corpus += ["Question: " + " ".join(WORDS) + "\nAnswer: " + " ".join(WORDS) + "\n\n"]
    specials = ["<unk>", "<s>", "</s>"]
    if kind == "word":
        tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("\n", behavior="isolated"),
                                                     pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")])
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    else:
        tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=specials))
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(dict(
        bos_token="<s>", eos_token="</s>", unk_token="<unk>", add_bos_token=True, add_eos_token=False)))
    return out_dir


def make_model(tmp_path, kind="word", max_pos=128, seed=0):
    """A random 2-layer Llama (GQA) saved with its tokenizer -> (dir, model, tokenizer)."""
    tok_dir = train_tokenizer(tmp_path / f"tok_{kind}", kind)
    tok = load_tokenizer(tok_dir)
    cfg = ModelConfig(vocab_size=max(tok.vocab_size, 320), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      max_position_embeddings=max_pos, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    m = Transformer(cfg)
    with torch.no_grad():  # larger residual updates and logits: predictions depend on the question, no near-ties
        for n, p in m.named_parameters():
            if n.endswith(("o_proj.weight", "down_proj.weight")):
                p.mul_(16.0)
            if n.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(4.0)
        m.lm_head.weight.mul_(8.0)
    path = m.save_pretrained(tmp_path / f"model_{kind}", tokenizer_dir=tok_dir)
    return path, Transformer.from_pretrained(path).eval(), load_tokenizer(path)


@pytest.fixture(scope="module")
def word_model(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("word"), "word")


@pytest.fixture(scope="module")
def char_model(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("char"), "char", max_pos=512)


# ----------------------------------------------------------------------------------------------- the harness's way

def harness_reference(model, tok, items, topic=None):
    """lm-eval HFLM, one request per choice, written out independently: _encode_pair (trailing whitespace of the
    context moves to the continuation; cont = encode(ctx + cont)[len(encode(ctx)):]), input (ctx + cont)[:-1],
    full logits, log_softmax over every position, sum over the continuation's positions."""
    out = []
    for it in items:
        desc = ("The following are multiple choice questions (with answers) about "
                f"{(topic or it.get('subject')).replace('_', ' ')}.\n\n" if (topic or it.get("subject")) else
                "The following are multiple choice questions (with answers).\n\n")
        context = desc + it["question"].strip() + "".join(f"\n{L}. {c}" for L, c in zip("ABCD", it["choices"])) + "\nAnswer:"
        lls = []
        for letter in "ABCD":
            ctx_s, cont_s = context, " " + letter
            n = len(ctx_s) - len(ctx_s.rstrip())
            if n:
                ctx_s, cont_s = ctx_s[:-n], ctx_s[-n:] + cont_s
            whole, ctx = tok.encode(ctx_s + cont_s), tok.encode(ctx_s)
            cont = whole[len(ctx):]
            inp = torch.tensor([(ctx + cont)[:-1]])
            with torch.no_grad():
                logp = torch.log_softmax(model(inp).float(), dim=-1)[0]        # (T, V)
            lls.append(sum(logp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont)))
        out.append(lls)
    return out


def test_prompt_and_errors_come_from_one_place():
    """evaluate.py builds its contexts with data.mc_prompt (one definition, tested in test_data.py); its errors are
    ProjectErrors, so every main() reports them the same way."""
    assert E.mc_prompt is data.mc_prompt
    assert E.mc_requests(_Chars(), [dict(question="Q", choices=list("abcd"), answer=0)], "biology")[0]["ctx"] == \
        _Chars().encode(data.mc_prompt("Q", list("abcd"), "biology"))
    assert issubclass(E.EvalError, ProjectError) and issubclass(MU.MuseError, ProjectError)


class _Chars:
    """A character tokenizer with BOS = 1."""
    def encode(self, text, add_special_tokens=True):
        return ([1] if add_special_tokens else []) + [ord(c) for c in text]


def test_encode_pair_moves_trailing_space():
    ctx, cont = LL.encode_pair(_Chars(), "Answer: ", "A")
    assert ctx == [1] + [ord(c) for c in "Answer:"] and cont == [ord(" "), ord("A")]


def test_fast_path_matches_harness(word_model):
    _, model, tok = word_model
    items = make_questions(12, 2, MMLU_SUBJECTS)
    reqs = E.mc_requests(tok, items)
    assert all(r["fast"] for r in reqs)  # one forward per question
    ours = E.mc_loglikelihoods(model, tok, items, batch_size=5)
    ref = harness_reference(model, tok, items)
    assert [E.argmax_first(x) for x in ours] == [E.argmax_first(x) for x in ref]
    assert max(abs(a - b) for x, y in zip(ours, ref) for a, b in zip(x, y)) < 1e-4
    # batching / padding do not change the scores; a fixed topic is the description
    for kw in (dict(batch_size=1), dict(batch_tokens=150), dict(batch_tokens=1)):
        again = E.mc_loglikelihoods(model, tok, items, **kw)
        assert max(abs(a - b) for x, y in zip(ours, again) for a, b in zip(x, y)) < 1e-5
    topic = E.mc_loglikelihoods(model, tok, items[:3], topic="biology")
    ref_t = harness_reference(model, tok, items[:3], topic="biology")
    assert max(abs(a - b) for x, y in zip(topic, ref_t) for a, b in zip(x, y)) < 1e-4


def test_fallback_path_matches_harness(char_model):
    _, model, tok = char_model
    items = make_questions(6, 3, None)
    reqs = E.mc_requests(tok, items)
    assert not any(r["fast"] for r in reqs) and all(len(c) == 2 for r in reqs for c in r["conts"])
    ours = E.mc_loglikelihoods(model, tok, items, batch_size=7)
    ref = harness_reference(model, tok, items)
    assert [E.argmax_first(x) for x in ours] == [E.argmax_first(x) for x in ref]
    assert max(abs(a - b) for x, y in zip(ours, ref) for a, b in zip(x, y)) < 1e-4


def test_fallback_when_whole_does_not_extend_context(word_model):
    """A tokenizer that merges across the context/continuation boundary: one continuation token, but the whole
    text's tokens do not start with the context's. The harness scores cont = whole[len(ctx):] after ctx; so do we."""
    _, model, _ = word_model

    class Merging:
        pad_token_id, eos_token_id = 0, 2

        def encode(self, text, add_special_tokens=True):
            ids, i = [1], 0
            while i < len(text):
                if text.startswith(": A", i):
                    ids += [301, 65]
                    i += 3
                else:
                    ids.append(3 + ord(text[i]) % 290)
                    i += 1
            return ids
    tok = Merging()
    items = make_questions(3, 4, None)
    reqs = E.mc_requests(tok, items)
    assert not any(r["fast"] for r in reqs)
    ours = E.mc_loglikelihoods(model, tok, items)
    ref = harness_reference(model, tok, items)
    assert max(abs(a - b) for x, y in zip(ours, ref) for a, b in zip(x, y)) < 1e-4


# ----------------------------------------------------------------------------------------------- statistics

def test_acc_stderr_is_lm_evals():
    accs = [1.0, 0.0, 1.0, 1.0]
    assert E.mean_stderr(accs) == pytest.approx(math.sqrt(0.75 * 0.25 / 3))
    assert E.mean_stderr([1.0]) is None
    r = E.aggregate_mc(accs)
    assert r == dict(acc=0.75, acc_stderr=pytest.approx(0.25), n=4)


def test_mmlu_weighted_aggregation_and_subjects():
    rng = random.Random(0)
    sizes = {"anatomy": 7, "college_biology": 3, "philosophy": 11, "virology": 5}
    subjects = [s for s, n in sizes.items() for _ in range(n)]
    accs = [float(rng.random() < 0.5) for _ in subjects]
    r = E.aggregate_mc(accs, subjects)
    assert r["n"] == 26 and r["acc"] == pytest.approx(sum(accs) / 26)  # size-weighted = sample mean
    per = {s: [a for a, t in zip(accs, subjects) if t == s] for s in sizes}
    for s, v in per.items():
        assert r["subjects"][s]["acc"] == pytest.approx(sum(v) / len(v)) and r["subjects"][s]["n"] == len(v)
        assert r["subjects"][s]["acc_stderr"] == pytest.approx(
            math.sqrt(sum((x - sum(v) / len(v)) ** 2 for x in v) / (len(v) - 1)) / math.sqrt(len(v)))

    def pooled(ses, ns):  # lm-eval pooled_sample_stderr
        return math.sqrt(sum((n - 1) * se ** 2 * n for se, n in zip(ses, ns)) / (sum(ns) - len(ns)) / sum(ns))
    stem = ["anatomy", "college_biology"]
    stem_se = pooled([r["subjects"][s]["acc_stderr"] for s in stem], [sizes[s] for s in stem])
    assert set(r["categories"]) == {"stem", "humanities", "other"}
    assert r["categories"]["stem"]["acc_stderr"] == pytest.approx(stem_se)
    assert r["categories"]["stem"]["acc"] == pytest.approx(sum(sum(per[s]) for s in stem) / 10)
    cats = r["categories"]
    assert r["acc_stderr"] == pytest.approx(pooled([c["acc_stderr"] for c in cats.values()],
                                                   [c["n"] for c in cats.values()]))
    # subjects that are not MMLU's: one level, pooled over subjects
    r2 = E.aggregate_mc([1.0, 0.0, 1.0, 0.0, 0.0], ["x", "x", "y", "y", "y"])
    assert "categories" not in r2 and r2["acc"] == pytest.approx(0.4)
    assert r2["acc_stderr"] == pytest.approx(pooled([r2["subjects"]["x"]["acc_stderr"],
                                                     r2["subjects"]["y"]["acc_stderr"]], [2, 3]))


def test_argmax_first_like_numpy():
    assert E.argmax_first([-1.0, -0.5, -0.5, -2.0]) == 1


def test_roc_auc():
    assert MU.roc_auc([0.1, 0.4], [0.35, 0.8]) == pytest.approx(0.75)
    assert MU.roc_auc([1, 2], [2, 3]) == pytest.approx(3.5 / 4)  # ties count one half
    rng = random.Random(1)
    neg = [rng.randint(0, 9) for _ in range(40)]
    pos = [rng.randint(3, 12) for _ in range(31)]
    brute = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (40 * 31)
    assert MU.roc_auc(neg, pos) == pytest.approx(brute)
    with pytest.raises(MU.MuseError, match="at least one score in each class"):
        MU.roc_auc([], [1.0])


# ----------------------------------------------------------------------------------------------- ROUGE-L

def test_rouge_l_hand_values():
    r = MU.rouge_l("the cat sat on the mat", "the cat on the mat")
    assert r["precision"] == 1.0 and r["recall"] == pytest.approx(5 / 6)
    assert r["fmeasure"] == pytest.approx(2 * (5 / 6) / (1 + 5 / 6))
    assert MU.rouge_l_f1("The Cat, sat!", "the cat sat") == 1.0           # lowercase, punctuation dropped
    assert MU.rouge_l_f1("police killed the gunman", "the gunman kills police") == pytest.approx(0.5)  # LCS 2
    assert MU.rouge_l_f1("", "anything") == 0.0 and MU.rouge_l_f1("a b", "c d") == 0.0
    assert MU.rouge_tokenize("Café au-lait, 2024's") == ["caf", "au", "lait", "2024", "s"]  # no stemming


def test_rouge_l_against_rouge_score_if_installed():
    rs = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rs.RougeScorer(["rougeL"], use_stemmer=False)
    rng = random.Random(0)
    for _ in range(50):
        a = " ".join(rng.choice(WORDS + ["The", "cat,", "runs!"]) for _ in range(rng.randint(0, 15)))
        b = " ".join(rng.choice(WORDS + ["the", "Cat", "running"]) for _ in range(rng.randint(0, 15)))
        assert MU.rouge_l_f1(a, b) == pytest.approx(scorer.score(a, b)["rougeL"].fmeasure)


def test_knowmem_prompt_and_cut():
    icl = [dict(question="Q1?", answer="A1"), dict(question="Q2?", answer="A2")]
    assert MU.knowmem_prompt("Q3?", icl) == "Question: Q1?\nAnswer: A1\n\nQuestion: Q2?\nAnswer: A2\n\nQuestion: Q3?\nAnswer: "
    assert MU.cut_answer("Paris\n\nQuestion: x") == "Paris"
    assert MU.cut_answer("Paris is big\nQuestion: y") == "Paris is big"
    assert MU.cut_answer("Paris Question: z") == "Paris "


def test_clean_up_tokenization_like_transformers():
    assert LL.clean_up_tokenization("I do n't know , he 's here .") == "I don't know, he's here."


# ----------------------------------------------------------------------------------------------- text scoring

def test_token_logprobs_and_perplexity(word_model):
    _, model, tok = word_model
    texts = ["alpha beta gamma delta", "river stone", "cloud metal glass paper tiger eagle salmon"]
    lps = LL.token_logprobs(model, tok, texts, batch_size=2)
    by_tokens = LL.token_logprobs(model, tok, texts, batch_tokens=12)  # one text per forward here
    assert all(a == pytest.approx(b, abs=1e-5) for a, b in zip(by_tokens, lps))
    total, n = 0.0, 0
    for t, lp in zip(texts, lps):
        ids = tok.encode(t)
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])), -1)[0]
        ref = [logp[i, ids[i + 1]].item() for i in range(len(ids) - 1)]
        assert len(lp) == len(ref) and max(abs(a - b) for a, b in zip(lp, ref)) < 1e-4
        total, n = total + sum(ref), n + len(ref)
    assert LL.perplexity(model, tok, texts) == pytest.approx(math.exp(-total / n), rel=1e-4)


def test_generation_batched_equals_single(word_model):
    _, model, tok = word_model
    prompts = ["alpha beta", "river stone cloud metal glass", "copper"]
    batched = LL.generate_texts(model, tok, prompts, 6, batch_size=3)
    single = [LL.generate_texts(model, tok, [p], 6)[0] for p in prompts]
    assert batched == single


# ----------------------------------------------------------------------------------------------- tasks, CLI, errors

@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    write_jsonl(d / "toy_hazard.cloze.jsonl", make_questions(10, 5, None, long_idx=3))
    write_jsonl(d / "toy_general.cloze.jsonl", make_questions(16, 6, MMLU_SUBJECTS))
    write_jsonl(d / "extra_set.jsonl", make_questions(5, 7, ["x_y"]))
    muse = d / "muse" / "news"
    rng = random.Random(8)
    sent = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))
    write_jsonl(muse / "verbmem_forget.jsonl", [dict(prompt=sent(12), gt=sent(20)) for _ in range(4)])
    for split in ("forget", "retain"):
        write_jsonl(muse / f"knowmem_{split}_qa.jsonl", [dict(question=sent(5) + "?", answer=sent(2)) for _ in range(3)])
        write_jsonl(muse / f"knowmem_{split}_qa_icl.jsonl", [dict(question=sent(5) + "?", answer=sent(2)) for _ in range(2)])
    for split in ("forget", "holdout"):
        write_jsonl(muse / f"privleak_{split}.jsonl", [dict(text=sent(rng.randint(5, 30))) for _ in range(6)])
    return d


def test_evaluate_tasks_structure_and_limits(word_model, data_dir):
    _, model, tok = word_model
    out = E.evaluate_tasks(model, tok, data_dir, "toy_hazard,toy_general," + str(data_dir / "extra_set.jsonl"),
                           batch_size=4, progress=False)
    r = out["results"]
    assert set(r) == {"toy_hazard", "toy_general", "extra_set"}
    assert r["toy_hazard"]["n"] == 10 and r["toy_hazard"]["too_long"] == [3]  # reported, not cut
    assert set(r["toy_general"]["subjects"]) == set(MMLU_SUBJECTS) and "categories" in r["toy_general"]
    s = out["samples"]["toy_general"]
    assert len(s) == 16 and len(s[0]["loglikelihoods"]) == 4 and s[0]["subject"] in MMLU_SUBJECTS
    assert r["toy_general"]["acc"] == pytest.approx(sum(x["acc"] for x in s) / 16)
    assert r["toy_general"]["form"] == "cloze" and "acc_norm" in r["toy_general"]
    assert r["extra_set"]["form"] == "letter" and r["extra_set"]["fast_path"] == 5
    for t in ("toy_hazard", "toy_general"):  # questions/s of the task's own scoring time, inside the whole run's
        assert out["throughput"][t] == r[t]["questions_per_s"] == pytest.approx(r[t]["n"] / r[t]["time_s"])
        assert 0 < r[t]["time_s"] <= out["time_s"]
    # the harness's way on a whole letter-form task (the cloze form's own harness check is further down)
    items = E.load_mc_task(str(data_dir / "extra_set.jsonl"), data_dir)[1]
    ref = harness_reference(model, tok, items)
    assert [x["pred"] for x in out["samples"]["extra_set"]] == [E.argmax_first(x) for x in ref]
    # --limit: first N overall, or per subject when questions carry subjects (MMLU)
    lim = E.evaluate_tasks(model, tok, data_dir, ["toy_hazard", "toy_general"], limit=2, progress=False)
    assert lim["results"]["toy_hazard"]["n"] == 2 and lim["results"]["toy_general"]["n"] == 8
    assert all(v["n"] == 2 for v in lim["results"]["toy_general"]["subjects"].values())


def test_bad_inputs_one_line_errors(word_model, data_dir, tmp_path):
    _, model, tok = word_model
    for tasks, words in ((["nope"], "unknown task"), ([str(tmp_path / "missing.jsonl")], "missing"),
                         (["wmdp_bio"], "wmdp_bio.jsonl"), ([], "at least one")):
        with pytest.raises(E.EvalError) as e:
            E.evaluate_tasks(model, tok, data_dir, tasks, progress=False)
        assert words in str(e.value) and "\n" not in str(e.value)
    bad = write_jsonl(tmp_path / "bad.jsonl", [dict(question="q", choices=["a", "b"], answer=0)])
    with pytest.raises(E.EvalError) as e:
        E.evaluate_tasks(model, tok, data_dir, [str(bad)], progress=False)
    assert "bad.jsonl" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(SystemExit) as e:
        E.main(["--model", str(tmp_path / "nomodel"), "--data", str(data_dir), "--out", str(tmp_path / "r.json")])
    assert str(e.value.code).startswith("error: --model") and "nomodel" in str(e.value.code)
    assert "\n" not in str(e.value.code) and not (tmp_path / "r.json").exists()
    path = word_model[0]
    for argv, words in ((["--tasks", "nope"], "unknown task"), (["--device", "tpu"], "--device"),
                        (["--tasks", "muse_news", "--data", str(tmp_path)], "missing MUSE directory")):
        with pytest.raises(SystemExit) as e:
            E.main(["--model", str(path), "--data", str(data_dir), "--out", str(tmp_path / "r.json"), *argv])
        assert str(e.value.code).startswith("error:") and words in str(e.value.code), e.value.code
        assert "\n" not in str(e.value.code) and not (tmp_path / "r.json").exists()


def test_cli_writes_results_json(word_model, data_dir, tmp_path, capsys):
    path, _, _ = word_model
    out = tmp_path / "res" / "results.json"
    E.main(["--model", str(path), "--data", str(data_dir), "--tasks", "toy_hazard,toy_general",
            "--out", str(out), "--batch-size", "8", "--no-progress", "--device", "cpu"])
    rec = json.loads(out.read_text())
    assert set(rec["results"]) == {"toy_hazard", "toy_general"}
    assert rec["dtype"] == "float32" and rec["model"] == str(path)
    assert {"versions", "args", "started"} <= set(rec["run"]) and rec["run"]["args"]["tasks"] == "toy_hazard,toy_general"
    assert rec["device"] == "cpu" and 0 < rec["load_s"]
    for t, r in rec["results"].items():
        assert rec["throughput"][t] == pytest.approx(r["n"] / r["time_s"])
    printed = capsys.readouterr().out
    acc = rec["results"]["toy_general"]["acc"]
    assert f"toy_general: acc {acc:.4f}" in printed and f"wrote {out}" in printed
    assert not list(out.parent.glob(".*tmp*"))  # atomic write left nothing behind


def test_run_returns_the_record_it_writes(word_model, data_dir, tmp_path):
    path, model, tok = word_model
    args = argparse.Namespace(model=str(path), data=str(data_dir), tasks="toy_hazard", out=str(tmp_path / "r.json"),
                              batch_size=4, limit=3, no_progress=True, auc_retrain=None, preset="current", bos=None, ll_dtype=None,
                              batch_tokens=0, device="cpu", dtype="float32", overwrite=False, allow_nonfinite=False)
    rec = E.run(args)
    assert json.loads((tmp_path / "r.json").read_text())["results"] == json.loads(json.dumps(rec["results"]))
    want = E.evaluate_tasks(model, tok, data_dir, ["toy_hazard"], batch_size=4, limit=3, progress=False)
    assert [v for s in rec["samples"]["toy_hazard"] for v in s["loglikelihoods"]] == \
        pytest.approx([v for s in want["samples"]["toy_hazard"] for v in s["loglikelihoods"]], abs=1e-5)
    with pytest.raises(E.EvalError, match="not a directory"):
        E.run(argparse.Namespace(**{**vars(args), "model": str(tmp_path / "none")}))


# ----------------------------------------------------------------------------------------------- result tables

def test_summarize_task_metrics_and_format_table():
    res = {"results": {
        "toy_hazard": dict(acc=0.25, acc_stderr=0.01, n=4, too_long=[], subjects=None),
        "mmlu": dict(acc=0.5, acc_stderr=0.02, n=8, subjects={"anatomy": dict(acc=0.5, n=8)}),
        "muse_news": dict(verbmem_f=55.5, knowmem_f=40.0, knowmem_r=30.25, privleak=-12.5, auc_forget_holdout=0.4,
                          n_verbmem_f=4, flag=True)}}
    summ = E.summarize(res)
    assert "too_long" not in summ["toy_hazard"] and summ["mmlu"]["subjects"] == {"anatomy": dict(acc=0.5, n=8)}
    m = E.task_metrics(summ)
    assert m == {"toy_hazard": 0.25, "mmlu": 0.5, "muse_news/verbmem_f": 55.5, "muse_news/knowmem_f": 40.0,
                 "muse_news/knowmem_r": 30.25, "muse_news/privleak": -12.5}
    assert E.MUSE_COLUMNS == ("verbmem_f", "knowmem_f", "knowmem_r", "privleak")
    assert E.task_metrics(None) == {} and E.task_metrics({"x": {"acc": None}}) == {}
    after = {"toy_hazard": dict(acc=0.5), "mmlu": dict(acc=0.375),
             "muse_news": dict(verbmem_f=1.0, knowmem_f=2.0, knowmem_r=3.0, privleak=4.0)}
    table = E.format_table(summ, after, "rmu", 300, 12.4).splitlines()
    assert len(table) == 4 and set(table[1]) == {"|", "-"}
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in table]
    assert cells[0] == ["model", "toy_hazard", "mmlu", "muse_news:verbmem_f", "muse_news:knowmem_f",
                        "muse_news:knowmem_r", "muse_news:privleak", "steps", "time"]
    assert cells[2] == ["base", "25.0", "50.0", "55.5", "40.0", "30.2", "-12.5", "-", "-"]  # accuracies x100
    assert cells[3] == ["rmu", "50.0", "37.5", "1.0", "2.0", "3.0", "4.0", "300", "12s"]
    assert len({len(line) for line in table}) == 1                                     # aligned columns
    assert len(E.format_table(summ, None, "rmu", 0, 0).splitlines()) == 3


def test_muse_metrics(word_model, data_dir):
    _, model, tok = word_model
    out = E.evaluate_tasks(model, tok, data_dir, ["muse_news"], batch_size=3, progress=False)
    r = out["results"]["muse_news"]
    for k in ("verbmem_f", "knowmem_f", "knowmem_r"):
        assert 0.0 <= r[k] <= 100.0
    assert r["n_verbmem_f"] == 4 and r["n_knowmem_f"] == 3 and r["auc_retrain"] == MU.AUC_RETRAIN["muse_news"]
    f, h = out["samples"]["muse_news"]["privleak"]["mink_forget"], out["samples"]["muse_news"]["privleak"]["mink_holdout"]
    # PrivLeak's Min-40% is losses.min_k_score of each text's token log-probs (the function test_losses.py checks)
    pl = data.read_muse(data_dir / "muse" / "news", ["privleak_forget", "privleak_holdout"])
    for scores, texts in ((f, pl["privleak_forget"]), (h, pl["privleak_holdout"])):
        assert scores == pytest.approx([losses.min_k_score(lp, 0.4) for lp in LL.token_logprobs(model, tok, texts)],
                                       rel=1e-5)
    assert r["auc_forget_holdout"] == pytest.approx(MU.roc_auc([-x for x in f], [-x for x in h]))
    assert r["privleak"] == pytest.approx((r["auc_forget_holdout"] - r["auc_retrain"]) / r["auc_retrain"] * 100)
    # VerbMem by hand for one item: greedy 128 tokens vs the ground truth cut to 128 tokens
    vm = data.read_muse(data_dir / "muse" / "news", ["verbmem_forget"])["verbmem_forget"][0]
    new = model.generate([tok.encode(vm["prompt"])], 128, tok.eos_token_id, tok.pad_token_id)[0]
    f1 = MU.rouge_l_f1(tok.decode(tok.encode(vm["gt"])[:128]), tok.decode(new))  # (no clean-up needed here)
    assert out["samples"]["muse_news"]["verbmem_f"][0]["rougeL_f1"] == pytest.approx(f1)
    with pytest.raises(E.EvalError, match="missing MUSE directory"):
        E.evaluate_tasks(model, tok, data_dir, ["muse_books"], progress=False)  # no such dir


# ----------------------------------------------------------------------------------------------- bench-eval

def test_bench_emulation_matches_ours_and_transformers(word_model):
    """The harness's HF path as bench-eval emulates it (grouped contexts, fp32 log-softmax over all positions),
    run on transformers' own Llama built from the same checkpoint: same predictions and scores as ours."""
    transformers = pytest.importorskip("transformers")
    path, model, tok = word_model
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    items = make_questions(10, 9, MMLU_SUBJECTS)
    ref = eval_speed.harness_hf_loglikelihoods(hf, tok, items, batch_size=4)
    ours = E.mc_loglikelihoods(model, tok, items, batch_size=3)
    assert [E.argmax_first(x) for x in ours] == [E.argmax_first(x) for x in ref]
    assert max(abs(a - b) for x, y in zip(ours, ref) for a, b in zip(x, y)) < 1e-4


def bos_in_post_processor(src, dst):
    """A copy of a checkpoint whose tokenizer adds BOS through tokenizer.json's post-processor (as real Llama,
    Mistral and Llama 3 tokenizer.json files do) instead of tokenizer_config.json's add_bos_token, which
    transformers 5 ignores for a generic fast tokenizer while ours honours it (as transformers 4 did)."""
    import shutil
    from tokenizers import Tokenizer, processors
    shutil.copytree(src, dst)
    tok = Tokenizer.from_file(str(dst / "tokenizer.json"))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    tok.save(str(dst / "tokenizer.json"))
    conf = json.loads((dst / "tokenizer_config.json").read_text())
    (dst / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in conf.items() if not k.startswith("add_")}))
    return dst


def bench_args(path, data_dir, tmp_path, **kw):
    return argparse.Namespace(**{**dict(model=str(path), data=str(data_dir), tasks="toy_hazard,toy_general", limit=3,
                                        batch_size=4, batch_tokens=300, dtype=None, bos=None, ll_dtype="model",
                                        out=str(tmp_path / "r.json")), **kw})


@pytest.mark.harness
def test_bench_runs_end_to_end_on_cpu(word_model, data_dir, tmp_path):
    """bench-eval's whole flow (CPU here; the CLI insists on CUDA): ours vs the harness (lm_eval's HFLM itself
    when installed, as in the lock; else the emulation), same predictions and log-likelihoods."""
    pytest.importorskip("transformers")
    path = bos_in_post_processor(word_model[0], tmp_path / "model")
    rep = eval_speed.bench(bench_args(path, data_dir, tmp_path), device="cpu")
    assert set(rep["tasks"]) == {"toy_hazard", "toy_general"} and rep["dtype"] == "float32"
    model, tok = load(path, "cpu")
    ours = E.evaluate_tasks(model, tok, data_dir, list(rep["tasks"]), limit=3, progress=False)["results"]
    for name, r in rep["tasks"].items():
        assert r["n"] == len(E.load_mc_task(name, data_dir, 3)[1]) == ours[name]["n"]   # MMLU-like: 3 per subject
        assert r["identical_predictions"] == r["n"] and r["acc_ours"] == r["acc_harness"]
        assert r["max_abs_ll_diff"] < 1e-4 and r["acc_ours"] == ours[name]["acc"]
        # the rates and the speedup are the measured times' (a consistency check, not a speed claim on a CPU)
        assert r["ours_qps"] == pytest.approx(r["n"] / r["ours_s"])
        assert r["harness_qps"] == pytest.approx(r["n"] / r["harness_s"])
        assert r["speedup"] == pytest.approx(r["harness_s"] / r["ours_s"])
    written = json.loads((tmp_path / "bench_eval.json").read_text())
    assert written["tasks"] == json.loads(json.dumps(rep["tasks"])) and "versions" in written["run"]


def test_bench_refuses_without_cuda_or_tasks(monkeypatch, word_model, data_dir, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ProjectError, match="CUDA"):
        eval_speed.bench(bench_args(word_model[0], data_dir, tmp_path))
    with pytest.raises(SystemExit) as e:
        eval_speed.main(["--model", str(word_model[0]), "--data", str(data_dir), "--out", str(tmp_path / "r.json")])
    assert str(e.value.code).startswith("error: bench-eval needs a CUDA GPU") and "\n" not in str(e.value.code)
    pytest.importorskip("transformers")
    with pytest.raises(E.EvalError, match="at least one multiple-choice task"):
        eval_speed.bench(bench_args(word_model[0], data_dir, tmp_path, tasks="muse_news"), device="cpu")
    assert not (tmp_path / "bench_eval.json").exists()


def test_bf16_log_likelihoods_rounded_like_the_harness(word_model):
    """A bf16 model: lm-eval with transformers >= 4.46 log-softmaxes bf16 logits (no upcast), so its scores are
    bf16 numbers; ll_dtype='model' reproduces that, ll_dtype='float32' keeps fp32 log-probs."""
    path, _, tok = word_model
    model = Transformer.from_pretrained(path, dtype=torch.bfloat16).eval()
    items = make_questions(6, 11, MMLU_SUBJECTS)
    ours = E.mc_loglikelihoods(model, tok, items, batch_size=1)
    fp32 = E.mc_loglikelihoods(model, tok, items, batch_size=1, ll_dtype="float32")
    for it, row, row32 in zip(items, ours, fp32):
        ctx = E.mc_requests(tok, [it])[0]
        with torch.no_grad():
            logits = model(torch.tensor([ctx["ctx"]])).to(torch.bfloat16)[0, -1]   # HF's bf16 lm_head output
        ref = torch.log_softmax(logits, dim=-1)                                     # bf16, as the harness
        for v, v32, c in zip(row, row32, ctx["conts"]):
            assert v == ref[c[0]].float().item()                                    # bit-identical
            assert abs(v - v32) <= 2 ** -7 * max(1.0, abs(v32)) and torch.tensor(v).to(torch.bfloat16).item() == v
    with pytest.raises(ProjectError, match="ll_dtype"):
        E.mc_loglikelihoods(model, tok, items[:1], ll_dtype="float16")


# ----------------------------------------------------------------------------------------------- the cloze form

def cloze_reference(model, tok, items):
    """lm-eval's choice-text form written out independently: context = the question (doc_to_text "{{question}}"),
    continuation = " " + choice (target_delimiter), _encode_pair, full logits; acc = argmax of the sums, acc_norm =
    argmax of sum / len(choice) (lm_eval/api/task.py, process_results of output_type multiple_choice)."""
    lls = []
    for it in items:
        row = []
        for c in it["choices"]:
            ctx_s, cont_s = it["question"], " " + c
            n = len(ctx_s) - len(ctx_s.rstrip())
            if n:
                ctx_s, cont_s = ctx_s[:-n], ctx_s[-n:] + cont_s
            whole, ctx = tok.encode(ctx_s + cont_s), tok.encode(ctx_s)
            cont = whole[len(ctx):]
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([(ctx + cont)[:-1]])).float(), dim=-1)[0]
            row.append(sum(logp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont)))
        lls.append(row)
    acc = [float(np.argmax(x) == it["answer"]) for x, it in zip(lls, items)]
    acc_norm = [float(np.argmax(np.array(x) / np.array([float(len(c)) for c in it["choices"]])) == it["answer"])
                for x, it in zip(lls, items)]
    return lls, acc, acc_norm


def test_cloze_form_matches_the_harness_rules(word_model, tmp_path):
    """A *.cloze.jsonl file: choice texts as continuations (any number of them), acc and acc_norm as the harness
    computes them, in evaluate_tasks and task_metrics; choices of very different lengths make acc_norm differ."""
    _, model, tok = word_model
    rng = random.Random(11)
    items = []
    for i in range(14):
        q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))) + ("  " if i == 0 else "")
        n = 2 + i % 4
        choices = [" ".join(rng.choice(WORDS) for _ in range(1 if j % 2 else rng.randint(3, 6))) for j in range(n)]
        items.append(dict(question=q, choices=choices, answer=rng.randrange(n)))
    path = write_jsonl(tmp_path / "quiz.cloze.jsonl", items)
    assert data.task_form(path) == "cloze" and data.task_form(tmp_path / "quiz.jsonl") == "letter"
    ref_lls, ref_acc, ref_norm = cloze_reference(model, tok, items)
    out = E.evaluate_tasks(model, tok, tmp_path, [str(path)], batch_size=4, progress=False)
    res, samples = out["results"]["quiz.cloze"], out["samples"]["quiz.cloze"]
    assert max(abs(a - b) for s, y in zip(samples, ref_lls) for a, b in zip(s["loglikelihoods"], y)) < 1e-4
    assert [s["acc"] for s in samples] == ref_acc
    assert [float(s["pred_norm"] == it["answer"]) for s, it in zip(samples, items)] == ref_norm
    assert ref_acc != ref_norm   # the two metrics are told apart on these questions
    assert res["form"] == "cloze" and res["n"] == 14
    assert res["acc"] == pytest.approx(np.mean(ref_acc)) and res["acc_norm"] == pytest.approx(np.mean(ref_norm))
    assert res["acc_norm_stderr"] == pytest.approx(np.std(ref_norm, ddof=1) / np.sqrt(14))
    assert E.task_metrics(E.summarize(out)) == {"quiz.cloze": res["acc"], "quiz.cloze/acc_norm": res["acc_norm"]}
    assert data.metric_pct("quiz.cloze/acc_norm", 0.5) == 50.0 == data.metric_pct("quiz.cloze", 0.5)
    assert data.metric_pct("muse_toy/privleak", -0.5) == -0.5 and data.metric_pct("muse_toy/verbmem_f", 0.8) == 0.8
    # a cloze file needs non-empty choice texts; a letter file keeps exactly four
    write_jsonl(tmp_path / "bad.cloze.jsonl", [dict(question="q", choices=["a", ""], answer=0)])
    with pytest.raises(data.DataError, match="2 or more non-empty strings"):
        data.read_mc(tmp_path / "bad.cloze.jsonl")
    write_jsonl(tmp_path / "three.jsonl", [dict(question="q", choices=["a", "b", "c"], answer=0)])
    with pytest.raises(data.DataError, match="exactly 4 strings"):
        data.read_mc(tmp_path / "three.jsonl")


@pytest.mark.harness
def test_bench_on_random_weights_of_a_shape(monkeypatch, word_model, data_dir, tmp_path):
    """bench-eval --random-shape (how the GPU machines time a 7B evaluator with no checkpoint at hand): random
    weights of the shape written to a temporary checkpoint that both loaders read, with the tokenizer of --model;
    both paths agree on them, and the checkpoint is removed afterwards."""
    pytest.importorskip("transformers")
    from benches import random_model
    monkeypatch.setitem(random_model.SHAPES, "tiny", dict(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, architecture="MistralForCausalLM"))
    path = bos_in_post_processor(word_model[0], tmp_path / "tok")
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    rep = eval_speed.bench(bench_args(path, data_dir, tmp_path / "out", random_shape="tiny"), device="cpu")
    assert rep["model"].startswith("tiny-shaped, random weights")
    for r in rep["tasks"].values():
        assert r["identical_predictions"] == r["n"] and r["max_abs_ll_diff"] < 1e-4
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["bench_eval.json"]
    assert not any((tmp_path / "tmp").iterdir())   # the checkpoint is removed
    with pytest.raises(ValueError, match="--random-shape 'nope': expected one of"):
        random_model.write_random_checkpoint("nope", tmp_path / "x", path)
