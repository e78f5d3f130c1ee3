"""Readers of data/__init__.py (corpora, multiple choice, MUSE, the lm-eval prompt) and the offline behaviour of
data/fetch.py, on small files made in tmp_path."""

import fnmatch
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

import data  # noqa: E402
from data import DataError  # noqa: E402
from data import fetch  # noqa: E402
from infra import ProjectError  # noqa: E402

try:
    import pyarrow  # noqa: F401
    HAVE_PYARROW = True
except ImportError:
    HAVE_PYARROW = False


def write_jsonl(path, rows):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), str(path))
    return str(path)


def mc(q="What is 1+1?", choices=("1", "2", "3", "4"), answer=1, **kw):
    return {"question": q, "choices": list(choices), "answer": answer, **kw}


# -----------------------------------------------------------------------------
# corpora

def test_corpus_jsonl_and_min_chars(tmp_path):
    p = write_jsonl(tmp_path / "c.jsonl", [{"text": "short", "id": 1}, "", {"text": "a longer document"}, {"text": ""}])
    assert data.read_corpus(p) == ["short", "a longer document"]
    assert data.read_corpus(p, min_chars=5) == ["a longer document"]  # len > min_chars, like the reference
    assert data.read_corpus(p, min_chars=4) == ["short", "a longer document"]


@pytest.mark.parametrize("line, expect", [
    ('{"text": "ok"', ":2: expected one JSON object per line"),
    ('["text"]', ":2: expected a JSON object, got list"),
    ('{"body": "x"}', ":2: expected a string field 'text' (missing)"),
    ('{"text": 3}', ":2: expected a string field 'text' (int)"),
])
def test_corpus_jsonl_malformed(tmp_path, line, expect):
    p = write_jsonl(tmp_path / "bad.jsonl", [{"text": "fine"}, line])
    with pytest.raises(DataError) as e:
        data.read_corpus(p)
    assert str(e.value).startswith(p + ":2: ") and expect in str(e.value)


def test_jsonl_records_name_the_line_and_binary_files(tmp_path):
    p = write_jsonl(tmp_path / "r.jsonl", [{"a": 1}, "", {"b": "ü"}])
    assert list(data.jsonl_records(p)) == [(f"{p}:1", {"a": 1}), (f"{p}:3", {"b": "ü"})]   # blank lines skipped
    binary = tmp_path / "model.safetensors.jsonl"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(128, 256)))
    with pytest.raises(DataError, match=r"model.safetensors.jsonl:1: expected UTF-8 text \(is this a binary file\?\)"):
        list(data.jsonl_records(binary))
    with pytest.raises(DataError, match="expected UTF-8 text"):
        data.read_corpus(binary)                                   # every reader goes through it
    with pytest.raises(DataError, match="missing"):
        list(data.jsonl_records(tmp_path / "none.jsonl"))
    assert issubclass(DataError, ProjectError)                     # one error class for every main()


def test_jsonl_records_binary_line_number(tmp_path):
    binary = tmp_path / "r.jsonl"
    binary.write_bytes(b'{"a": 1}\n' + b"\xff\n")
    with pytest.raises(DataError, match=r"r.jsonl:2: expected UTF-8 text"):
        list(data.jsonl_records(binary))


def test_corpus_txt(tmp_path):
    p = tmp_path / "docs.txt"
    p.write_text("first doc\n\n   \nsecond doc\r\nthird", encoding="utf-8")
    assert data.read_corpus(p) == ["first doc", "second doc", "third"]
    assert data.read_corpus(p, min_chars=9) == ["second doc"]


def test_corpus_wikitext_keeps_row_newlines(tmp_path):
    rows = ["", " = Robert Boulter = \n", "", " Robert Boulter is an English actor . \n", " x \n"]
    p = tmp_path / "wikitext" / "wikitext-2-raw-v1-test.txt"
    p.parent.mkdir()
    p.write_text("".join(r if r else "\n" for r in rows), encoding="utf-8")  # what fetch.py writes
    assert data.read_corpus(p) == [r for r in rows if r]  # = the Hub's non-empty rows, newline included
    assert data.read_corpus(p, min_chars=4) == [r for r in rows if len(r) > 4]


def test_corpus_missing_and_bad_extension(tmp_path):
    with pytest.raises(DataError, match="missing .*wmdp/cyber-forget-corpus.jsonl: .*make fetch"):
        data.read_corpus(tmp_path / "wmdp" / "cyber-forget-corpus.jsonl")
    with pytest.raises(DataError, match="gated.*cais/wmdp-bio-forget-corpus"):
        data.read_corpus(tmp_path / "wmdp" / "bio-forget-corpus.jsonl")
    with pytest.raises(DataError, match="make toy"):
        data.read_corpus(tmp_path / "toy" / "forget_corpus.jsonl")
    (tmp_path / "x.csv").write_text("a\n")
    with pytest.raises(DataError, match=r"x.csv: expected a corpus file ending in .jsonl, .txt or .parquet"):
        data.read_corpus(tmp_path / "x.csv")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(DataError, match="at least one document"):
        data.read_corpus(tmp_path / "empty.txt")


def test_read_corpora(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": "a1"}, {"text": "a2"}])
    b = tmp_path / "b.txt"
    b.write_text("b1\nb2\nb3\n")
    assert data.read_corpora(f"{a}, {b}") == [["a1", "a2"], ["b1", "b2", "b3"]]
    assert data.read_corpora([b]) == [["b1", "b2", "b3"]]
    # reference names resolve under a DATA dir
    write_jsonl(tmp_path / "wmdp" / "cyber-forget-corpus.jsonl", [{"text": "cyber doc"}])
    (tmp_path / "wikitext").mkdir()
    (tmp_path / "wikitext" / "wikitext-2-raw-v1-test.txt").write_text("\n = A = \n")
    assert data.read_corpora("cyber-forget-corpus,wikitext", data_dir=tmp_path) == [["cyber doc"], [" = A = \n"]]
    with pytest.raises(DataError, match="at least one corpus"):
        data.read_corpora(" , ")


# -----------------------------------------------------------------------------
# multiple choice

def test_mc_jsonl(tmp_path):
    p = write_jsonl(tmp_path / "q.jsonl", [mc(), mc("Q2", answer=3, subject="high_school_biology"), mc(subject="")])
    rows = data.read_mc(p)
    assert rows[0] == {"question": "What is 1+1?", "choices": ["1", "2", "3", "4"], "answer": 1, "subject": None}
    assert rows[1]["subject"] == "high_school_biology" and rows[1]["answer"] == 3
    assert rows[2]["subject"] is None


@pytest.mark.parametrize("row, expect", [
    (mc(choices=("a", "b", "c")), "expected 'choices' as a list of exactly 4 strings (3 items)"),
    (mc(choices=("a", "b", "c", "d", "e")), "(5 items)"),
    (mc(choices=("a", "b", "c", 4)), "exactly 4 strings"),
    ({"question": "q", "answer": 0}, "'choices' as a list of exactly 4 strings (missing)"),
    (mc(answer=4), "expected 'answer' as an integer 0..3 (4)"),
    (mc(answer="B"), "expected 'answer' as an integer 0..3 ('B')"),
    (mc(answer=True), "integer 0..3 (True)"),
    ({"choices": ["a", "b", "c", "d"], "answer": 0}, "expected a string field 'question' (missing)"),
    (mc(subject=7), "expected 'subject' to be a string"),
    ("not json", "expected one JSON object per line"),
])
def test_mc_malformed(tmp_path, row, expect):
    p = write_jsonl(tmp_path / "q.jsonl", [mc(), mc(), row])
    with pytest.raises(DataError) as e:
        data.read_mc(p)
    assert str(e.value).startswith(p + ":3: ") and expect in str(e.value)


def test_mc_missing_and_format(tmp_path):
    with pytest.raises(DataError, match=r"missing .*mmlu/mmlu.jsonl: download it with `make fetch"):
        data.read_mc(tmp_path / "mmlu" / "mmlu.jsonl")
    (tmp_path / "q.csv").write_text("x")
    with pytest.raises(DataError, match="expected a .jsonl or .parquet file"):
        data.read_mc(tmp_path / "q.csv")
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(DataError, match="at least one question"):
        data.read_mc(tmp_path / "e.jsonl")


def test_parquet_without_pyarrow_is_a_clear_error(tmp_path, monkeypatch):
    p = tmp_path / "q.parquet"
    p.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(DataError, match=r"q.parquet: reading Parquet needs pyarrow \(pip install pyarrow\)"):
        data.read_mc(p)


@pytest.mark.skipif(not HAVE_PYARROW, reason="pyarrow not installed")
def test_parquet_readers(tmp_path):
    p = write_parquet(tmp_path / "q.parquet", [mc(subject="anatomy"), mc("Q2", answer=0, subject="virology")])
    assert [r["subject"] for r in data.read_mc(p)] == ["anatomy", "virology"]
    p = write_parquet(tmp_path / "nosubj.parquet", [mc(), mc("Q2", answer=2)])  # cais/wmdp: no subject column
    assert [(r["question"], r["answer"], r["subject"]) for r in data.read_mc(p)] == [("What is 1+1?", 1, None), ("Q2", 2, None)]
    p = write_parquet(tmp_path / "bad.parquet", [mc(), mc(choices=("a", "b", "c"))])
    with pytest.raises(DataError, match=r"bad.parquet:row 2: expected 'choices' as a list of exactly 4 strings \(3 items\)"):
        data.read_mc(p)
    p = write_parquet(tmp_path / "c.parquet", [{"text": "doc one"}, {"text": ""}, {"text": "doc two!"}])
    assert data.read_corpus(p) == ["doc one", "doc two!"]
    assert data.read_corpus(p, min_chars=7) == ["doc two!"]
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="junk.parquet: expected a Parquet file"):
        data.read_corpus(tmp_path / "junk.parquet")


# -----------------------------------------------------------------------------
# tasks and the WMDP file set

def test_tasks_table():
    assert data.TASKS["wmdp_bio"] == ("wmdp/wmdp_bio.jsonl", "biology")
    assert data.TASKS["wmdp_cyber"][1] == "cybersecurity" and data.TASKS["wmdp_chem"][1] == "chemistry"
    assert data.TASKS["mmlu"] == ("mmlu/mmlu.jsonl", None)
    assert set(data.TASKS) >= {"toy_hazard", "toy_general", "toy_hazard_para", "toy_general_para"}
    # the paraphrase tasks measure what their main tasks measure: forgetting (hazard) and utility (general)
    assert [data.is_utility(t) for t in ("toy_hazard_para", "toy_general_para", "toy_general_para/acc_norm")] == \
        [False, True, True]
    assert data.mc_description("biology") == "The following are multiple choice questions (with answers) about biology.\n\n"
    assert data.mc_description("high_school_biology").endswith("about high school biology.\n\n")
    assert data.mc_description(None) == "The following are multiple choice questions (with answers).\n\n"
    assert data.MUSE_TASKS == {"muse_news": "news", "muse_books": "books", "muse_toy": "toy"}
    assert all(c in data.MUSE_DIRS for c in data.MUSE_TASKS.values())


def test_is_utility_follows_the_task():
    assert data.is_utility("toy_general") and data.is_utility("toy_general/acc_norm")
    assert not data.is_utility("toy_hazard/acc_norm") and not data.is_utility("wmdp_bio")
    assert data.is_utility("muse_news/knowmem_r", {"muse_news"}) and not data.is_utility("mmlu", {"muse_news"})
    # a MUSE task: KnowMem on the retain QA is its utility, VerbMem / KnowMem-forget / PrivLeak measure forgetting
    assert data.is_utility("muse_toy/knowmem_r")
    assert not any(data.is_utility(f"muse_toy/{m}") for m in ("verbmem_f", "knowmem_f", "privleak"))


def test_toy_tasks_are_cloze_form():
    """The embedded toy's tasks are scored in the cloze form (no lm-eval description, so no topic)."""
    for task in ("toy_hazard", "toy_general"):
        rel, topic = data.TASKS[task]
        assert data.task_form(rel) == "cloze" and topic is None


def test_mc_prompt_is_lm_evals():
    """The one definition of lm-eval's zero-shot wmdp_* / mmlu_* context."""
    p = data.mc_prompt("  What is 2+2? \n", ["3", "4", "5", "6"], "college_biology")
    assert p == ("The following are multiple choice questions (with answers) about college biology.\n\n"
                 "What is 2+2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:")
    assert data.mc_prompt("Q", list("abcd"), "biology").startswith(
        "The following are multiple choice questions (with answers) about biology.\n\nQ\nA. a")
    assert data.mc_prompt("Q", list("abcd")) == data.mc_description(None) + "Q\nA. a\nB. b\nC. c\nD. d\nAnswer:"
    with pytest.raises(DataError, match="expected 4 choices, got 2"):
        data.mc_prompt("Q", ["a", "b"], None)


def test_resolve_task(tmp_path):
    p = write_jsonl(tmp_path / "wmdp" / "wmdp_bio.jsonl", [mc()])
    assert data.resolve_task("wmdp_bio", tmp_path) == ("wmdp_bio", p, "biology")
    with pytest.raises(DataError, match=r"missing .*mmlu.jsonl: download it with `make fetch"):
        data.resolve_task("mmlu", tmp_path)
    with pytest.raises(DataError, match="make toy"):
        data.resolve_task("toy_hazard", tmp_path / "toy")
    # a path: name = stem; a known stem keeps its topic; others use per-question subjects
    assert data.resolve_task(p, "/nowhere") == ("wmdp_bio", p, "biology")
    q = write_jsonl(tmp_path / "my_quiz.jsonl", [mc(subject="astronomy")])
    assert data.resolve_task(q, None) == ("my_quiz", q, None)
    with pytest.raises(DataError, match="missing .*other.jsonl: check the path"):
        data.resolve_task(str(tmp_path / "other.jsonl"), None)
    with pytest.raises(DataError, match="unknown task 'wmdp-bio': expected one of wmdp_bio"):
        data.resolve_task("wmdp-bio", tmp_path)
    with pytest.raises(DataError, match="expected a multiple-choice .jsonl or .parquet file"):
        data.resolve_task(str(tmp_path / "wmdp"), tmp_path)


def test_wmdp_files(tmp_path):
    write_jsonl(tmp_path / "wmdp" / "cyber-forget-corpus.jsonl", [{"text": "c"}])
    write_jsonl(tmp_path / "wmdp" / "wmdp_bio.jsonl", [mc()])
    with pytest.raises(DataError) as e:
        data.wmdp_files(tmp_path)
    msg = str(e.value)
    assert msg.startswith(f"4 file(s) missing in DATA dir {tmp_path}:")
    for rel in ["wmdp/bio-forget-corpus.jsonl", "wikitext/wikitext-2-raw-v1-test.txt", "wmdp/wmdp_cyber.jsonl",
                "mmlu/mmlu.jsonl"]:
        assert str(tmp_path / rel) in msg
    assert "cyber-forget-corpus" not in msg and "wmdp_bio.jsonl" not in msg
    assert "cais/wmdp-bio-forget-corpus" in msg and "make fetch" in msg
    for rel in ["wmdp/bio-forget-corpus.jsonl", "wikitext/wikitext-2-raw-v1-test.txt", "wmdp/wmdp_cyber.jsonl",
                "mmlu/mmlu.jsonl"]:
        write_jsonl(tmp_path / rel, [{"text": "x"}])
    f = data.wmdp_files(tmp_path)
    assert f["forget"] == [str(tmp_path / "wmdp/bio-forget-corpus.jsonl"), str(tmp_path / "wmdp/cyber-forget-corpus.jsonl")]
    assert f["retain"] == [str(tmp_path / "wikitext/wikitext-2-raw-v1-test.txt")]
    assert f["tasks"] == ["wmdp_bio", "wmdp_cyber", "mmlu"]


# -----------------------------------------------------------------------------
# MUSE

def make_muse(d, n=2):
    for stem, fields in data.MUSE_FILES.items():
        write_jsonl(Path(d) / f"{stem}.jsonl", [{k: f"{stem} {k} {i}" for k in fields} for i in range(n)])


def test_read_muse(tmp_path):
    make_muse(tmp_path / "news")
    m = data.read_muse(tmp_path / "news")
    assert set(m) == set(data.MUSE_FILES)
    assert m["raw_forget"] == ["raw_forget text 0", "raw_forget text 1"]
    assert m["verbmem_forget"][1] == {"prompt": "verbmem_forget prompt 1", "gt": "verbmem_forget gt 1"}
    assert m["knowmem_retain_qa_icl"][0] == {"question": "knowmem_retain_qa_icl question 0",
                                             "answer": "knowmem_retain_qa_icl answer 0"}
    assert m["privleak_holdout"] == ["privleak_holdout text 0", "privleak_holdout text 1"]
    assert list(data.read_muse(tmp_path / "news", parts=["knowmem_forget_qa"])) == ["knowmem_forget_qa"]
    with pytest.raises(DataError, match="unknown MUSE part"):
        data.read_muse(tmp_path / "news", parts=["forget"])


def test_read_muse_errors(tmp_path):
    make_muse(tmp_path)
    os.remove(tmp_path / "verbmem_forget.jsonl")
    os.remove(tmp_path / "privleak_retain.jsonl")
    with pytest.raises(DataError, match=r"missing MUSE file\(s\) in .*: privleak_retain.jsonl, verbmem_forget.jsonl|"
                                        r"missing MUSE file\(s\) in .*: verbmem_forget.jsonl, privleak_retain.jsonl"):
        data.read_muse(tmp_path)
    write_jsonl(tmp_path / "verbmem_forget.jsonl", [{"prompt": "p", "gt": "g"}, {"prompt": "p"}])
    with pytest.raises(DataError, match=r"verbmem_forget.jsonl:2: expected a string field 'gt' \(missing\)"):
        data.read_muse(tmp_path, parts=["verbmem_forget"])


# -----------------------------------------------------------------------------
# fetch.py, offline: a fake Hub serving files made here

def fake_hub(fmt):
    """repo -> {file in the repo (without extension): rows}, in the dataset repos' real layout."""
    muse_new = {"raw/forget-00000-of-00001": [{"text": "news forget"}],
                "raw/retain1-00000-of-00001": [{"text": "news retain1"}],
                "raw/retain2-00000-of-00001": [{"text": "news retain2"}],
                "raw/holdout-00000-of-00001": [{"text": "news holdout"}],
                "verbmem/forget-00000-of-00001": [{"prompt": "p", "gt": "g", "rougeL_target": 0.5}],
                "knowmem/forget_qa-00000-of-00001": [{"question": "fq", "answer": "fa"}],
                "knowmem/forget_qa_icl-00000-of-00001": [{"question": "fqi", "answer": "fai"}],
                "knowmem/retain_qa-00000-of-00001": [{"question": "rq", "answer": "ra"}],
                "knowmem/retain_qa_icl-00000-of-00001": [{"question": "rqi", "answer": "rai"}],
                "privleak/forget-00000-of-00001": [{"text": "pf"}],
                "privleak/retain-00000-of-00001": [{"text": "pr"}],
                "privleak/holdout-00000-of-00001": [{"text": "ph"}]}
    # MUSE-Books with the older split names (retain2_qa, retain2)
    muse_old = {k.replace("retain_qa", "retain2_qa").replace("privleak/retain-", "privleak/retain2-"):
                [{kk: (v.replace("news", "books") if isinstance(v, str) else v) for kk, v in r.items()} for r in rows]
                for k, rows in muse_new.items()}
    # MUSE-News has both: the recent name wins (MUSE-Books' main branch keeps both, too)
    muse_new["privleak/retain2-00000-of-00001"] = [{"text": "stale"}]
    muse_new["knowmem/retain2_qa-00000-of-00001"] = [{"question": "stale", "answer": "stale"}]
    return {
        "cais/wmdp": {"wmdp-bio/test-00000-of-00001": [mc("bio q"), mc("bio q2", answer=3)],
                      "wmdp-bio/train-00000-of-00001": [mc("not the test split")],
                      "wmdp-cyber/test-00000-of-00001": [mc("cyber q")],
                      "wmdp-chem/test-00000-of-00001": [mc("chem q")]},
        "cais/mmlu": {"all/test-00000-of-00001": [mc("m1", subject="anatomy"), mc("m2", subject="virology")],
                      "anatomy/test-00000-of-00001": [mc("m1", subject="anatomy")]},
        "cais/wmdp-corpora": {"cyber-forget-corpus/train-00000-of-00001": [{"text": "cyber forget"}],
                              "cyber-retain-corpus/train-00000-of-00001": [{"text": "cyber retain"}],
                              "bio-retain-corpus/train-00000-of-00002": [{"text": "bio retain 0"}],
                              "bio-retain-corpus/train-00001-of-00002": [{"text": "bio retain 1"}]},
        "Salesforce/wikitext": {"wikitext-2-raw-v1/test-00000-of-00001":
                                [{"text": ""}, {"text": " = Valkyria = \n"}, {"text": ""}, {"text": " Senjō . \n"}],
                                "wikitext-103-raw-v1/test-00000-of-00001": [{"text": " other \n"}]},
        "muse-bench/MUSE-News": muse_new,
        "muse-bench/MUSE-Books": muse_old,
    }


class FakeDownloader:
    def __init__(self, root, fmt, hub, gated=("cais/wmdp-bio-forget-corpus",)):
        self.root, self.fmt, self.hub, self.gated, self.calls = Path(root), fmt, hub, gated, []

    def __call__(self, repo_id, repo_type="dataset", allow_patterns=None, local_dir=None):
        self.calls.append((repo_id, repo_type, tuple(allow_patterns or ())))
        if repo_type == "model":
            out = Path(local_dir)
            out.mkdir(parents=True, exist_ok=True)
            files = {"config.json": "{}", "tokenizer.json": "{}", "model.safetensors": "weights",
                     "pytorch_model.bin": "old weights", ".cache/huggingface/x.lock": ""}
        else:
            if repo_id in self.gated or repo_id not in self.hub:
                raise PermissionError(f"403 Client Error: access to {repo_id} is restricted")
            out = self.root / repo_id.replace("/", "__")
            files = {}
            for name, rows in self.hub[repo_id].items():
                files[f"{name}.{self.fmt}"] = rows
            files["knowmem/forget-qa.json"] = "[]"  # MUSE's old JSON files sit next to the Parquet ones
        for name, content in files.items():
            if allow_patterns and not any(fnmatch.fnmatch(name, p) for p in allow_patterns):
                continue
            path = out / name
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, str):
                path.write_text(content)
            elif self.fmt == "parquet":
                write_parquet(path, content)
            else:
                write_jsonl(path, content)
        return str(out)


@pytest.mark.parametrize("fmt", ["jsonl", pytest.param("parquet", marks=pytest.mark.skipif(
    not HAVE_PYARROW, reason="pyarrow not installed"))])
def test_fetch_offline(tmp_path, fmt):
    D = tmp_path / "DATA"
    hub = fake_hub(fmt)
    dl = FakeDownloader(tmp_path / "hub", fmt, hub)
    logs = []
    report = fetch.fetch(str(D), model="org/tiny-llama", download=dl, log=logs.append)

    # the model: files moved into DATA/models/<name>, only config/tokenizer/safetensors, no hub metadata
    mdir = D / "models" / "tiny-llama"
    assert sorted(os.listdir(mdir)) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert not (D / "models" / "tiny-llama.partial").exists()

    # multiple choice
    assert [r["question"] for r in data.read_mc(D / "wmdp/wmdp_bio.jsonl")] == ["bio q", "bio q2"]
    assert data.read_mc(D / "wmdp/wmdp_bio.jsonl")[1]["answer"] == 3
    assert [r["question"] for r in data.read_mc(D / "wmdp/wmdp_cyber.jsonl")] == ["cyber q"]
    assert [r["question"] for r in data.read_mc(D / "wmdp/wmdp_chem.jsonl")] == ["chem q"]
    assert [r["subject"] for r in data.read_mc(D / "mmlu/mmlu.jsonl")] == ["anatomy", "virology"]
    for task in ["wmdp_bio", "wmdp_cyber", "wmdp_chem", "mmlu"]:
        assert data.resolve_task(task, D)[1] == os.path.join(D, data.TASKS[task][0])

    # corpora, shards in order; wikitext = the Hub's non-empty rows exactly
    assert data.read_corpora("cyber-forget-corpus,cyber-retain-corpus,bio-retain-corpus", data_dir=D) == [
        ["cyber forget"], ["cyber retain"], ["bio retain 0", "bio retain 1"]]
    assert data.read_corpus(D / data.WIKITEXT) == [" = Valkyria = \n", " Senjō . \n"]
    assert (D / data.WIKITEXT).read_text(encoding="utf-8") == "\n = Valkyria = \n\n Senjō . \n"

    # MUSE, new and old split names
    news, books = data.read_muse(D / "muse/news"), data.read_muse(D / "muse/books")
    assert news["knowmem_retain_qa"] == [{"question": "rq", "answer": "ra"}]
    assert news["verbmem_forget"] == [{"prompt": "p", "gt": "g"}] and news["privleak_retain"] == ["pr"]
    assert books["privleak_retain"] == ["pr"] and books["raw_forget"] == ["books forget"]
    assert books["knowmem_retain_qa_icl"] == [{"question": "rqi", "answer": "rai"}]

    # the gated bio corpus: not downloaded, the run says how to get it; the WMDP set names only that file
    assert any("cais/wmdp-bio-forget-corpus" in line and "request access" in line for line in logs)
    with pytest.raises(DataError) as e:
        data.wmdp_files(D)
    assert str(e.value).startswith("1 file(s) missing") and "bio-forget-corpus.jsonl" in str(e.value)
    assert report["wmdp/wmdp_bio.jsonl"] == 2 and report["wmdp/bio-retain-corpus.jsonl"] == 2
    assert not list(D.rglob("*.tmp*"))

    # one download per repo
    repos = [c[0] for c in dl.calls]
    assert len(repos) == len(set(repos))

    # a rerun skips what exists (no download at all) ...
    def no_network(*a, **k):
        raise AssertionError("downloaded again")
    report = fetch.fetch(str(D), model="org/tiny-llama", download=no_network, log=lambda s: None,
                         parts=[p for p in fetch.PARTS if p != "bio-forget"])
    assert set(report.values()) == {"skipped", "model"}

    # ... and with access to the gated repo, the bio forget corpus arrives too (all its fields kept)
    hub["cais/wmdp-bio-forget-corpus"] = {"bio-forget-corpus": [
        {"title": "t", "abstract": "a", "text": "bio forget doc", "doi": "10.1/x"}]}
    dl = FakeDownloader(tmp_path / "hub2", fmt, hub, gated=())
    report = fetch.fetch(str(D), model="", download=dl, log=lambda s: None)
    assert report[data.BIO_FORGET] == 1 and [c[0] for c in dl.calls] == ["cais/wmdp-bio-forget-corpus"]
    assert data.read_corpus(D / data.BIO_FORGET) == ["bio forget doc"]
    assert json.loads((D / data.BIO_FORGET).read_text())["doi"] == "10.1/x"
    assert data.wmdp_files(D)["tasks"] == ["wmdp_bio", "wmdp_cyber", "mmlu"]


def test_fetch_bad_rows_and_changed_repo(tmp_path):
    hub = {"cais/wmdp": {"wmdp-bio/test-00000-of-00001": [mc(), mc(choices=("a", "b"))],
                         "wmdp-cyber/test-00000-of-00001": [mc()], "wmdp-chem/test-00000-of-00001": [mc()]}}
    dl = FakeDownloader(tmp_path / "hub", "jsonl", hub)
    with pytest.raises(DataError, match=r"wmdp-bio/test-00000-of-00001.jsonl:2: expected 'choices'"):
        fetch.fetch(str(tmp_path / "D"), parts=["wmdp"], download=dl, log=lambda s: None)
    assert not (tmp_path / "D" / "wmdp" / "wmdp_bio.jsonl").exists() and not list(tmp_path.rglob("*.tmp*"))
    hub = {"cais/mmlu": {"auxiliary_train/train-00000-of-00001": [mc()]}}
    dl = FakeDownloader(tmp_path / "hub2", "jsonl", hub)
    with pytest.raises(SystemExit, match="cais/mmlu: no file matches all/test-"):
        fetch.fetch(str(tmp_path / "D"), parts=["mmlu"], download=dl, log=lambda s: None)


def test_fetch_without_huggingface_hub(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(SystemExit, match="needs huggingface_hub: pip install huggingface_hub"):
        fetch.hub_download("cais/wmdp", allow_patterns=["*"])


def test_fetch_cli(tmp_path):
    with pytest.raises(SystemExit):
        fetch.main(["--data", str(tmp_path), "--parts", "wmdp,bogus"])
    dl = FakeDownloader(tmp_path / "hub", "jsonl", fake_hub("jsonl"))
    fetch.main(["--data", str(tmp_path / "D"), "--parts", "wmdp,wikitext"], download=dl)
    record = json.loads((tmp_path / "D" / "fetch.json").read_text())
    assert record["args"]["parts"] == "wmdp,wikitext" and record["results"]["wmdp/wmdp_chem.jsonl"] == 1
    assert sorted(os.listdir(tmp_path / "D")) == ["fetch.json", "wikitext", "wmdp"]
    r = subprocess.run([sys.executable, "-m", "data.fetch", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--model-dir" in r.stdout


def test_raw_json_lines_as_the_reference_reads_the_cyber_corpus(tmp_path):
    """read_corpus(raw=True): each record's line as it stands (JSON syntax, escapes and newline included), for the
    same records as the parsed reading (blank lines and empty texts skipped), so coreset indices still apply."""
    p = tmp_path / "cyber-forget-corpus.jsonl"
    lines = ['{"text": "a \\"quoted\\" exploit"}\n', "\n", '{"text": ""}\n', '{"text": "second"}']
    p.write_text("".join(lines))
    assert data.read_corpus(p) == ['a "quoted" exploit', "second"]
    assert data.read_corpus(p, raw=True) == [lines[0], lines[3]]
    # the length filter reads the parsed text (18 and 6 characters), not the longer raw line: the same documents
    assert data.read_corpus(p, min_chars=10, raw=True) == [lines[0]] and data.read_corpus(p, min_chars=10) == ['a "quoted" exploit']
    with pytest.raises(DataError, match="longer than --min-chars 20"):
        data.read_corpus(p, min_chars=20, raw=True)
    (tmp_path / "x.txt").write_text("a\n")
    with pytest.raises(DataError, match="raw lines"):
        data.read_corpus(tmp_path / "x.txt", raw=True)
