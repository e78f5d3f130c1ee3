"""
Readers for the real benchmark files, and the layout of a DATA directory.

Everything here is a pure function of the files on disk: no network, no tokenizer, no torch.
Bad input raises DataError (a ValueError) with a one-line message "FILE:LINE: expected ..."
(Parquet: "FILE:row N: expected ..."); a missing file is named together with how to get it.

The DATA layout (what `python -m data.fetch --data DATA` writes; `make fetch DATA=...`):

    DATA/wmdp/bio-forget-corpus.jsonl      {"text": ...} per line (gated: see BIO_FORGET_HOWTO)
    DATA/wmdp/cyber-forget-corpus.jsonl    {"text": ...}    cais/wmdp-corpora cyber-forget-corpus
    DATA/wmdp/bio-retain-corpus.jsonl      {"text": ...}    cais/wmdp-corpora bio-retain-corpus
    DATA/wmdp/cyber-retain-corpus.jsonl    {"text": ...}    cais/wmdp-corpora cyber-retain-corpus
    DATA/wmdp/wmdp_{bio,cyber,chem}.jsonl  {"question", "choices" (4), "answer" (0..3)}   cais/wmdp test
    DATA/mmlu/mmlu.jsonl                   {"question", "subject", "choices", "answer"}  cais/mmlu all test
    DATA/wikitext/wikitext-2-raw-v1-test.txt   the raw test file, one line per dataset row
    DATA/muse/{news,books}/<config>_<split>.jsonl   muse-bench/MUSE-{News,Books}, see MUSE_FILES
    data/toy/muse/toy/<config>_<split>.jsonl  the embedded toy's MUSE-shaped split (toy_muse.py), task muse_toy
    DATA/models/<name>/                    a model snapshot (any HF Llama/Mistral checkpoint dir)
    DATA/fetch.json                        fetch.py's run record

The embedded toy benchmark data/toy/ (built by make_toy.py) is a DATA dir too, with its own files:
forget_corpus.jsonl, retain_corpus.jsonl, retain_unseen.jsonl (the NPO family's retain corpus there: prose no
toy model trained on), toy_hazard.cloze.jsonl, toy_general.cloze.jsonl and their paraphrase tasks
toy_hazard_para.cloze.jsonl, toy_general_para.cloze.jsonl (TASKS toy_*), model/.

Corpora (read_corpus): documents are kept when len(text) > min_chars, as the reference RMU's
`len(text) > min_len` (so min_chars=0 drops only empty documents). Formats:
  - .jsonl: one JSON object per line with a string "text" (other fields ignored; blank lines skipped).
    Note: the reference RMU parses only bio-forget-corpus.jsonl as JSON and feeds the other .jsonl
    lines raw; we always take the "text" field, which is what the Hub's corpora hold.
  - .txt: one document per line, line ending removed, blank lines dropped.
  - wikitext*.txt (a .txt whose name starts with "wikitext"): read as the Hugging Face `wikitext`
    dataset yields its rows: each non-blank line is a document *with* its trailing "\\n", blank
    lines are dropped. This is the reference RMU's retain set (wikitext-2-raw-v1 test, non-empty rows).
  - .parquet: the "text" column (needs pyarrow), empty strings dropped.

Multiple choice (read_mc): .jsonl or .parquet rows with question (str), choices (list of exactly
4 str), answer (int 0..3), optional subject (str) -> dicts with exactly those four keys
(subject None when absent). These are the fields of cais/wmdp and cais/mmlu.

Tasks (TASKS, resolve_task): a task is a multiple-choice file plus a topic for the lm-eval
description ("... about {topic}."). topic None means: use each question's "subject"; a question
without a subject gets the generic description (mc_description(None)). A path to any MC file is a
task too: its name is the file stem, its topic that of TASKS[stem] when the stem is a known task
name, else None.

MUSE (read_muse): one directory per corpus, DATA/muse/news and DATA/muse/books, one JSON Lines file
per dataset config/split of muse-bench/MUSE-{News,Books}, named <config>_<split>.jsonl:

    raw_forget, raw_retain1, raw_retain2, raw_holdout    {"text"}   raw corpora: forget set; retain1, the
                                                                    retain data unlearning may use; retain2,
                                                                    the retain data the metrics use; holdout
    verbmem_forget                                       {"prompt", "gt"}   VerbMem prompts/continuations
    knowmem_forget_qa, knowmem_retain_qa                 {"question", "answer"}   KnowMem QA
    knowmem_forget_qa_icl, knowmem_retain_qa_icl         {"question", "answer"}   few-shot examples
    privleak_forget, privleak_retain, privleak_holdout   {"text"}   PrivLeak member/non-member texts

(The Hub calls the retain splits "retain_qa"/"retain" in recent revisions and "retain2_qa"/"retain2"
in older ones; fetch.py accepts both and writes the names above. Raw MUSE-Books texts are whole books:
chunking into model-sized pieces is the trainer's job.)
"""

import json
import os
from pathlib import Path

from infra import ProjectError


class DataError(ProjectError):
    """A data file is missing or malformed; the message names the file (and line) and what was expected."""


# -----------------------------------------------------------------------------
# DATA layout (paths relative to a DATA dir)

BIO_FORGET = "wmdp/bio-forget-corpus.jsonl"
CYBER_FORGET = "wmdp/cyber-forget-corpus.jsonl"
BIO_RETAIN = "wmdp/bio-retain-corpus.jsonl"
CYBER_RETAIN = "wmdp/cyber-retain-corpus.jsonl"
WIKITEXT = "wikitext/wikitext-2-raw-v1-test.txt"

# corpus names as the reference RMU spells them (--forget_corpora bio-forget-corpus,cyber-forget-corpus)
CORPORA = {
    "bio-forget-corpus": BIO_FORGET,
    "cyber-forget-corpus": CYBER_FORGET,
    "bio-retain-corpus": BIO_RETAIN,
    "cyber-retain-corpus": CYBER_RETAIN,
    "wikitext": WIKITEXT,
}

# A question file whose name ends in .cloze.jsonl / .cloze.parquet is scored in lm-eval's other multiple-choice
# form (ARC, SciQ, PIQA, MMLU-cloze): context = the question, continuations = " " + each choice's text; any number
# (>= 2) of non-empty choices. Every other file is the letter form (" A".." D" after the lm-eval prompt).
CLOZE_SUFFIX = ".cloze"


def task_form(path) -> str:
    """"cloze" for a *.cloze.jsonl / *.cloze.parquet question file, else "letter"."""
    return "cloze" if Path(str(path)).stem.endswith(CLOZE_SUFFIX) else "letter"


# task name -> (MC file relative to the DATA dir, topic for the description or None = per-question subject)
TASKS = {
    "wmdp_bio": ("wmdp/wmdp_bio.jsonl", "biology"),
    "wmdp_cyber": ("wmdp/wmdp_cyber.jsonl", "cybersecurity"),
    "wmdp_chem": ("wmdp/wmdp_chem.jsonl", "chemistry"),
    "mmlu": ("mmlu/mmlu.jsonl", None),
    "toy_hazard": ("toy_hazard.cloze.jsonl", None),   # the embedded toy (make_toy.py): cloze form, no description
    "toy_general": ("toy_general.cloze.jsonl", None),
    "toy_hazard_para": ("toy_hazard_para.cloze.jsonl", None),   # the same facts through two more held-out phrasings
    "toy_general_para": ("toy_general_para.cloze.jsonl", None),
}

# tasks that measure retained utility; every other task measures forgetting (tables and plots split on this)
UTILITY_TASKS = ("mmlu", "toy_general", "toy_general_para", "wikitext")


def is_utility(metric, utility_tasks=UTILITY_TASKS) -> bool:
    """A metric name, "task" or "task/metric" (e.g. toy_general/acc_norm), measures retained utility when its task
    does; a MUSE task's knowmem_r (KnowMem on the retain QA) is its utility metric, the rest measure forgetting."""
    return metric.split("/")[0] in utility_tasks or metric.endswith("/knowmem_r")


def is_accuracy(metric) -> bool:
    """A multiple-choice accuracy (a plain task name, or the cloze form's task/acc_norm), not one of MUSE's metrics
    (task/verbmem_f, ..., task/privleak)."""
    return "/" not in metric or metric.endswith("/acc_norm")


def metric_pct(metric, v):
    """A metric's value for display, in %: accuracies (is_accuracy) are fractions and get x100; MUSE's metrics are
    already x100. The one rule every table and plot uses."""
    if v is None:
        return None
    return 100 * v if is_accuracy(metric) else v

MUSE_DIRS = {"news": "muse/news", "books": "muse/books", "toy": "muse/toy"}
# evaluation task name -> MUSE corpus; muse_toy is the embedded default's MUSE-shaped split (toy_muse.py)
MUSE_TASKS = {"muse_news": "news", "muse_books": "books", "muse_toy": "toy"}
# MUSE file stem -> fields of each record. One string field "text" -> the reader returns list[str].
MUSE_FILES = {
    "raw_forget": ("text",),
    "raw_retain1": ("text",),
    "raw_retain2": ("text",),
    "raw_holdout": ("text",),
    "verbmem_forget": ("prompt", "gt"),
    "knowmem_forget_qa": ("question", "answer"),
    "knowmem_forget_qa_icl": ("question", "answer"),
    "knowmem_retain_qa": ("question", "answer"),
    "knowmem_retain_qa_icl": ("question", "answer"),
    "privleak_forget": ("text",),
    "privleak_retain": ("text",),
    "privleak_holdout": ("text",),
}

BIO_FORGET_HOWTO = ("the bio forget corpus is gated: request access to "
                    "https://huggingface.co/datasets/cais/wmdp-bio-forget-corpus (the WMDP authors' form is "
                    "linked from https://huggingface.co/datasets/cais/wmdp-corpora), then rerun `make fetch` "
                    "or save it as JSON Lines with a \"text\" field at DATA/" + BIO_FORGET)


def how_to_get(path):
    """One line saying how to obtain a missing data file."""
    p = Path(path).as_posix()
    if Path(p).name == Path(BIO_FORGET).name:
        return BIO_FORGET_HOWTO
    known = [BIO_RETAIN, CYBER_FORGET, CYBER_RETAIN, WIKITEXT] + [rel for rel, _ in TASKS.values()
                                                                  if not rel.startswith("toy_")]
    if "/toy/" in p and any(p.endswith(rel) for rel in known):  # a real benchmark's file asked of the toy
        return ("the embedded toy has no such file: give --data DATA (make ... DATA=<dir>) with the real files, "
                "downloaded with `make fetch DATA=<dir>`")
    toy_files = {rel for rel, _ in TASKS.values() if rel.startswith("toy_")} | {
        "forget_corpus.jsonl", "retain_corpus.jsonl", "retain_unseen.jsonl"}
    if Path(p).name.endswith(".cloze.jsonl") and Path(p).name in toy_files:
        return "write the toy's question files with `python make_toy.py --data-only` (the whole toy: `make toy`)"
    if "/toy/" in p or Path(p).name in toy_files:
        return "rebuild the embedded toy benchmark with `make toy` (python make_toy.py)"
    if any(p.endswith(rel) for rel in known) or "/muse/" in p or p.startswith("muse/"):
        return "download it with `make fetch DATA=<dir>` (python -m data.fetch --data <dir>)"
    return "check the path"


def _need(path):
    if not os.path.isfile(path):
        raise DataError(f"missing {path}: {how_to_get(path)}")


def check_files(data_dir, rel_paths):
    """Raise one DataError listing every file of rel_paths missing under data_dir, with how to get each."""
    missing = [rel for rel in rel_paths if not os.path.isfile(os.path.join(data_dir, rel))]
    if missing:
        lines = [f"  {os.path.join(data_dir, rel)}: {how_to_get(rel)}" for rel in missing]
        raise DataError(f"{len(missing)} file(s) missing in DATA dir {data_dir}:\n" + "\n".join(lines))


def wmdp_files(data_dir):
    """The standard WMDP RMU setup of a DATA dir, checked to be present (one DataError lists what is missing).

    -> {"forget": [bio-forget path, cyber-forget path], "retain": [wikitext path],
        "tasks": ["wmdp_bio", "wmdp_cyber", "mmlu"]}  (paths are str; tasks resolve with resolve_task)
    """
    forget, retain, tasks = [BIO_FORGET, CYBER_FORGET], [WIKITEXT], ["wmdp_bio", "wmdp_cyber", "mmlu"]
    check_files(data_dir, forget + retain + [TASKS[t][0] for t in tasks])
    return {
        "forget": [os.path.join(data_dir, rel) for rel in forget],
        "retain": [os.path.join(data_dir, rel) for rel in retain],
        "tasks": tasks,
    }


# -----------------------------------------------------------------------------
# low-level record iterators: yield (where, obj) with where = "FILE:LINE" or "FILE:row N"

def jsonl_records(path):
    """("FILE:LINE", object) for every non-blank line of a JSON Lines file; DataError names the line."""
    _need(path)
    with open(path, "rb") as f:  # decoded line by line, so a binary file is reported at its own line
        for i, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{path}:{i}: expected UTF-8 text (is this a binary file?)") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{i}: expected one JSON object per line ({e.msg})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{i}: expected a JSON object, got {type(obj).__name__}")
            yield f"{path}:{i}", obj


def _parquet_records(path, columns=None):
    _need(path)
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow), "
                        "or convert the file to JSON Lines") from None
    try:
        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
        if columns is not None:
            columns = [c for c in columns if c in names]  # absent columns are reported per row below
        i = 0
        for batch in pf.iter_batches(batch_size=1024, columns=columns):
            for row in batch.to_pylist():
                i += 1
                yield f"{path}:row {i}", row
    except DataError:
        raise
    except Exception as e:  # pyarrow's own errors (not a Parquet file, corrupt, ...)
        raise DataError(f"{path}: expected a Parquet file ({type(e).__name__}: {e})") from None


def _records(path, columns=None):
    ext = Path(path).suffix.lower()
    if ext == ".jsonl":
        return jsonl_records(path)
    if ext == ".parquet":
        return _parquet_records(path, columns)
    raise DataError(f"{path}: expected a .jsonl or .parquet file")


def _str_field(obj, key, where):
    v = obj.get(key)
    if not isinstance(v, str):
        got = "missing" if key not in obj else type(v).__name__
        raise DataError(f"{where}: expected a string field {key!r} ({got})")
    return v


# -----------------------------------------------------------------------------
# corpora

def read_corpus(path, min_chars=0, raw=False):
    """Documents of one corpus file (.jsonl "text", .txt one per line, wikitext*.txt, .parquet).

    Keeps documents with len(text) > min_chars, in file order. raw (.jsonl only): each document is its line as it
    stands, JSON syntax and newline included -- how WMDP's reference RMU reads every forget corpus but bio
    (`raw_text = line`), i.e. the cyber corpus; the same documents, so coreset indices still apply. -> list[str]
    """
    path = str(path)
    ext = Path(path).suffix.lower()
    if raw and ext != ".jsonl":
        raise DataError(f"{path}: raw lines (--raw-json-topics) need a .jsonl file")
    if ext == ".txt":
        _need(path)
        wikitext = Path(path).name.lower().startswith("wikitext")
        docs = []
        try:
            with open(path, encoding="utf-8") as f:  # universal newlines, like the Hub's wikitext builder
                for line in f:
                    text = line.rstrip("\n")
                    if text.strip():
                        docs.append(text + "\n" if wikitext else text)  # wikitext rows keep their newline
        except UnicodeDecodeError:
            raise DataError(f"{path}:{len(docs) + 1}: expected UTF-8 text (is this a binary file?)") from None
    elif ext in (".jsonl", ".parquet"):
        recs = [(where, _str_field(obj, "text", where)) for where, obj in _records(path, columns=["text"])]
        if raw:
            with open(path, encoding="utf-8") as f:   # universal newlines, as the reference's open(..., "r")
                lines = f.readlines()
            # the length filter below reads the parsed text, so the same documents (and coreset indices) survive
            docs = [lines[int(where.rsplit(":", 1)[1]) - 1] for where, t in recs if len(t) > min_chars]
            if not docs:
                raise DataError(f"{path}: no document is longer than --min-chars {min_chars}")
            return docs
        else:
            docs = [t for _, t in recs if t]
    else:
        raise DataError(f"{path}: expected a corpus file ending in .jsonl, .txt or .parquet")
    if not docs:
        raise DataError(f"{path}: expected at least one document, found none")
    kept = [d for d in docs if len(d) > min_chars]
    if not kept:
        raise DataError(f"{path}: no document is longer than --min-chars {min_chars} (the longest has "
                        f"{max(map(len, docs))} characters)")
    return kept


def corpus_path(name_or_path, data_dir=None):
    """A reference corpus name ("wikitext", "bio-forget-corpus", ...) -> its path under data_dir; else the path."""
    if name_or_path in CORPORA and data_dir is not None:
        return os.path.join(data_dir, CORPORA[name_or_path])
    return str(name_or_path)


def read_corpora(paths, min_chars=0, data_dir=None):
    """"a.jsonl,b.txt" (or a list) -> one list of documents per file, in the given order.

    With data_dir, the reference names of CORPORA ("bio-forget-corpus,cyber-forget-corpus") work too.
    -> list[list[str]]
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = str(paths).split(",")
    paths = [str(p).strip() for p in paths if str(p).strip()]
    if not paths:
        raise DataError("expected at least one corpus file (comma-separated list)")
    return [read_corpus(corpus_path(p, data_dir), min_chars) for p in paths]


# -----------------------------------------------------------------------------
# multiple choice

def mc_record(obj, where, form="letter"):
    """Validate one multiple-choice row -> dict(question, choices, answer, subject). Raises DataError.
    letter: exactly 4 choices; cloze: 2 or more non-empty choice texts (acc_norm divides by their length)."""
    q = _str_field(obj, "question", where)
    choices = obj.get("choices")
    cloze = form == "cloze"
    if cloze and not q.strip():   # the question is the whole context of every choice
        raise DataError(f"{where}: expected a non-empty 'question' (the context of the cloze form)")
    ok = isinstance(choices, (list, tuple)) and all(isinstance(c, str) for c in choices) and \
        (len(choices) >= 2 and all(choices) if cloze else len(choices) == 4)
    if not ok:
        got = "missing" if "choices" not in obj else (
            f"{len(choices)} items" if isinstance(choices, (list, tuple)) else type(choices).__name__)
        want = "2 or more non-empty strings" if cloze else "exactly 4 strings"
        raise DataError(f"{where}: expected 'choices' as a list of {want} ({got})")
    answer = obj.get("answer")
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        got = "missing" if "answer" not in obj else repr(answer)
        raise DataError(f"{where}: expected 'answer' as an integer 0..{len(choices) - 1} ({got})")
    subject = obj.get("subject")
    if subject is not None and not isinstance(subject, str):
        raise DataError(f"{where}: expected 'subject' to be a string ({type(subject).__name__})")
    return {"question": q, "choices": list(choices), "answer": answer, "subject": subject or None}


def read_mc(path):
    """Multiple-choice questions of a .jsonl / .parquet file (cais/wmdp, cais/mmlu fields; task_form(path) decides
    the form: a *.cloze file may have any number >= 2 of choices).

    -> list[dict(question=str, choices=[4 str], answer=int 0..3, subject=str|None)]
    """
    path = str(path)
    form = task_form(path)
    rows = [mc_record(obj, where, form) for where, obj in
            _records(path, columns=["question", "choices", "answer", "subject"])]
    if not rows:
        raise DataError(f"{path}: expected at least one question, found none")
    return rows


def mc_description(topic):
    """lm-eval's description line for a topic/subject; generic when topic is None."""
    if not topic:
        return "The following are multiple choice questions (with answers).\n\n"
    return f"The following are multiple choice questions (with answers) about {topic.replace('_', ' ')}.\n\n"


def mc_prompt(question, choices, topic=None):
    """The zero-shot context lm-eval builds for wmdp_* / mmlu_*: description + doc_to_text (REFERENCE section 4)."""
    if len(choices) != 4:
        raise DataError(f"expected 4 choices, got {len(choices)}")
    return (mc_description(topic) + f"{question.strip()}\nA. {choices[0]}\nB. {choices[1]}\nC. {choices[2]}"
            f"\nD. {choices[3]}\nAnswer:")


def resolve_task(name_or_path, data_dir):
    """A task name of TASKS (file under data_dir) or a path to any MC .jsonl/.parquet file.

    -> (task_name, path, topic): topic str, or None = each question's subject (generic description
    when a question has none). Raises DataError for unknown names and missing files.
    """
    name_or_path = str(name_or_path)
    if name_or_path in TASKS:
        rel, topic = TASKS[name_or_path]
        path = os.path.join(str(data_dir), rel)
        _need(path)
        return name_or_path, path, topic
    p = Path(name_or_path)
    if p.suffix.lower() in (".jsonl", ".parquet") or os.sep in name_or_path or p.exists():
        if p.suffix.lower() not in (".jsonl", ".parquet"):
            raise DataError(f"{name_or_path}: expected a multiple-choice .jsonl or .parquet file")
        _need(name_or_path)
        name = p.stem
        return name, name_or_path, TASKS[name][1] if name in TASKS else None
    raise DataError(f"unknown task {name_or_path!r}: expected one of {', '.join(TASKS)} "
                    "or a path to a multiple-choice .jsonl/.parquet file")


# -----------------------------------------------------------------------------
# MUSE

def read_muse_file(path, fields):
    """One MUSE JSON Lines file -> list[str] when fields == ("text",), else list[dict] with those fields."""
    rows = []
    for where, obj in jsonl_records(str(path)):
        vals = {k: _str_field(obj, k, where) for k in fields}
        rows.append(vals["text"] if fields == ("text",) else vals)
    if not rows:
        raise DataError(f"{path}: expected at least one record, found none")
    return rows


def read_muse(muse_dir, parts=None):
    """All (or the listed) files of one MUSE corpus dir (DATA/muse/news or DATA/muse/books).

    -> dict stem -> list: the stems of MUSE_FILES; "text" files give list[str], verbmem_forget
    list[dict(prompt, gt)], knowmem_* list[dict(question, answer)].
    """
    muse_dir = str(muse_dir)
    parts = list(MUSE_FILES) if parts is None else list(parts)
    unknown = [p for p in parts if p not in MUSE_FILES]
    if unknown:
        raise DataError(f"unknown MUSE part(s) {', '.join(unknown)}: expected some of {', '.join(MUSE_FILES)}")
    missing = [p for p in parts if not os.path.isfile(os.path.join(muse_dir, p + ".jsonl"))]
    if missing:
        raise DataError(f"missing MUSE file(s) in {muse_dir}: {', '.join(m + '.jsonl' for m in missing)}: "
                        "download them with `make fetch DATA=<dir>` (python -m data.fetch --data <dir>)")
    return {p: read_muse_file(os.path.join(muse_dir, p + ".jsonl"), MUSE_FILES[p]) for p in parts}
