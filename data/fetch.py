"""
Download a model snapshot and the real benchmark data into the DATA layout of data/__init__.py.

    python -m data.fetch --model HuggingFaceH4/zephyr-7b-beta --data DATA [--model-dir DIR]
    (make fetch MODEL=... DATA=...)

Needs network access and two optional packages: huggingface_hub (downloads) and pyarrow (the Hub
stores these datasets as Parquet): pip install huggingface_hub pyarrow. Nothing else in the project
imports them. Already written files are skipped (--force rewrites them); every output file is written
to a temporary name and renamed, so an interrupted run leaves no half-written file behind.

Sources (file globs in the dataset repos; the first glob of a list that matches wins):
    cais/wmdp            wmdp-{bio,cyber,chem}/test-*      -> wmdp/wmdp_{bio,cyber,chem}.jsonl
    cais/mmlu            all/test-*                        -> mmlu/mmlu.jsonl
    cais/wmdp-corpora    {cyber-forget,cyber-retain,bio-retain}-corpus/train-*
                                                           -> wmdp/<name>-corpus.jsonl
    Salesforce/wikitext  wikitext-2-raw-v1/test-*          -> wikitext/wikitext-2-raw-v1-test.txt
    muse-bench/MUSE-News, muse-bench/MUSE-Books  <config>/<split>-*  -> muse/{news,books}/<config>_<split>.jsonl
    cais/wmdp-bio-forget-corpus (gated) -> wmdp/bio-forget-corpus.jsonl, when your token has access;
    otherwise the run ends by saying how to request it.

The one function that touches the network is `hub_download` (same arguments as
huggingface_hub.snapshot_download); tests pass their own to `fetch(..., download=...)`.
"""

import argparse
import fnmatch
import glob
import json
import os
import shutil
import sys
import time

from data import (BIO_FORGET, BIO_FORGET_HOWTO, BIO_RETAIN, CYBER_FORGET, CYBER_RETAIN, MUSE_DIRS, MUSE_FILES,
                  TASKS, WIKITEXT, DataError, mc_record)

# -----------------------------------------------------------------------------
# defaults
MODEL = "HuggingFaceH4/zephyr-7b-beta"
MODEL_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model"]  # config, tokenizer, safetensors weights
PARTS = ["model", "wmdp", "mmlu", "corpora", "wikitext", "muse", "bio-forget"]
BIO_FORGET_REPO = "cais/wmdp-bio-forget-corpus"
MUSE_REPOS = {"news": "muse-bench/MUSE-News", "books": "muse-bench/MUSE-Books"}
# MUSE output stem -> globs in the MUSE repo (recent revision's split name first, older one second)
MUSE_GLOBS = {
    "raw_forget": ["raw/forget-*"],
    "raw_retain1": ["raw/retain1-*"],
    "raw_retain2": ["raw/retain2-*"],
    "raw_holdout": ["raw/holdout-*"],
    "verbmem_forget": ["verbmem/forget-*"],
    "knowmem_forget_qa": ["knowmem/forget_qa-*"],
    "knowmem_forget_qa_icl": ["knowmem/forget_qa_icl-*"],
    "knowmem_retain_qa": ["knowmem/retain_qa-*", "knowmem/retain2_qa-*"],
    "knowmem_retain_qa_icl": ["knowmem/retain_qa_icl-*", "knowmem/retain2_qa_icl-*"],
    "privleak_forget": ["privleak/forget-*"],
    "privleak_retain": ["privleak/retain-*", "privleak/retain2-*"],
    "privleak_holdout": ["privleak/holdout-*"],
}
# (part, dataset repo, globs, output path under DATA, kind): kind "mc", "wikitext" or a tuple of string fields
SOURCES = [
    ("wmdp", "cais/wmdp", ["wmdp-bio/test-*"], TASKS["wmdp_bio"][0], "mc"),
    ("wmdp", "cais/wmdp", ["wmdp-cyber/test-*"], TASKS["wmdp_cyber"][0], "mc"),
    ("wmdp", "cais/wmdp", ["wmdp-chem/test-*"], TASKS["wmdp_chem"][0], "mc"),
    ("mmlu", "cais/mmlu", ["all/test-*"], TASKS["mmlu"][0], "mc"),
    ("corpora", "cais/wmdp-corpora", ["cyber-forget-corpus/train-*"], CYBER_FORGET, ("text",)),
    ("corpora", "cais/wmdp-corpora", ["cyber-retain-corpus/train-*"], CYBER_RETAIN, ("text",)),
    ("corpora", "cais/wmdp-corpora", ["bio-retain-corpus/train-*"], BIO_RETAIN, ("text",)),
    ("wikitext", "Salesforce/wikitext", ["wikitext-2-raw-v1/test-*"], WIKITEXT, "wikitext"),
] + [
    ("muse", MUSE_REPOS[name], MUSE_GLOBS[stem], f"{MUSE_DIRS[name]}/{stem}.jsonl", MUSE_FILES[stem])
    for name in ("news", "books") for stem in MUSE_FILES
] + [
    ("bio-forget", BIO_FORGET_REPO, ["*.jsonl", "*.parquet"], BIO_FORGET, "bio-forget"),
]
ROW_FILES = (".parquet", ".jsonl")  # what a glob may pick in a snapshot


# -----------------------------------------------------------------------------
# the network

def hub_download(repo_id, repo_type="dataset", allow_patterns=None, local_dir=None):
    """Download the files of a Hub repo matching allow_patterns; -> the local directory holding them."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise SystemExit("data/fetch.py needs huggingface_hub: pip install huggingface_hub pyarrow") from None
    try:
        return snapshot_download(repo_id=repo_id, repo_type=repo_type, allow_patterns=allow_patterns,
                                 local_dir=local_dir)
    except KeyboardInterrupt:
        raise
    except Exception as e:  # offline (HF_HUB_OFFLINE, no network), gated, missing repo: one line, not a traceback
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(f"{repo_id}: download failed ({type(e).__name__}: {first}); this needs network access "
                        "to the Hugging Face Hub (and HF_HUB_OFFLINE unset)") from None


# -----------------------------------------------------------------------------
# conversion (offline)

def find_files(snapshot_dir, globs):
    """Sorted row files (.parquet/.jsonl) of the first glob that matches anything under snapshot_dir."""
    for g in globs:
        if "/" in g:
            files = glob.glob(os.path.join(snapshot_dir, g))
        else:  # a bare pattern matches at any depth (as the Hub's allow_patterns do)
            files = [os.path.join(root, f) for root, _, names in os.walk(snapshot_dir)
                     for f in names if fnmatch.fnmatch(f, g)]
        files = sorted(f for f in files if f.endswith(ROW_FILES) and os.path.isfile(f))
        if files:
            return files
    return []


def iter_rows(path):
    """Rows (dicts) of one .parquet (pyarrow, streamed) or .jsonl file -> (where, row)."""
    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise SystemExit("data/fetch.py needs pyarrow to read the Hub's Parquet files: pip install pyarrow") from None
        i = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                i += 1
                yield f"{path}:row {i}", row
    else:
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if line.strip():
                    yield f"{path}:{i}", json.loads(line)


def convert_row(row, where, kind):
    """One Hub row -> the line to write (without newline); DataError when the row lacks what we need."""
    if kind == "mc":
        r = mc_record(row, where)
        out = {"question": r["question"], "choices": r["choices"], "answer": r["answer"]}
        if r["subject"] is not None:
            out["subject"] = r["subject"]
        return json.dumps(out, ensure_ascii=False)
    if kind == "wikitext":  # the raw file back: one line per row ("" rows are blank lines)
        text = row.get("text")
        if not isinstance(text, str) or "\n" in text.rstrip("\n"):
            raise DataError(f"{where}: expected a one-line string field 'text'")
        return text.rstrip("\n")
    if kind == "bio-forget":  # keep every field (title, abstract, text, doi), like the original jsonl
        if not isinstance(row.get("text"), str):
            raise DataError(f"{where}: expected a string field 'text'")
        return json.dumps(row, ensure_ascii=False, default=str)
    out = {}
    for k in kind:
        if not isinstance(row.get(k), str):
            raise DataError(f"{where}: expected a string field {k!r}")
        out[k] = row[k]
    return json.dumps(out, ensure_ascii=False)


def convert(files, out_path, kind):
    """Rows of the snapshot files -> out_path in our layout (atomic). -> number of rows written."""
    def lines():
        for path in files:
            for where, row in iter_rows(path):
                yield convert_row(row, where, kind)
    from infra import atomic_write_lines
    return atomic_write_lines(out_path, lines())


def fetch_model(model, model_dir, download=hub_download, force=False, log=print):
    """Snapshot of a model repo into model_dir (downloaded into model_dir + '.partial', then renamed)."""
    if os.path.isfile(os.path.join(model_dir, "config.json")) and not force:
        log(f"model: {model_dir} exists, skipped")
        return model_dir
    partial = model_dir.rstrip("/") + ".partial"
    os.makedirs(partial, exist_ok=True)
    log(f"model: downloading {model} -> {model_dir}")
    download(model, repo_type="model", allow_patterns=MODEL_PATTERNS, local_dir=partial)
    shutil.rmtree(os.path.join(partial, ".cache"), ignore_errors=True)  # the hub's resume metadata
    if not os.path.isfile(os.path.join(partial, "config.json")) or not glob.glob(os.path.join(partial, "*.safetensors")):
        raise SystemExit(f"model {model}: expected config.json and *.safetensors weights in the download ({partial})")
    if os.path.isdir(model_dir):
        shutil.rmtree(model_dir)
    os.replace(partial, model_dir)
    return model_dir


def fetch(data_dir, model=MODEL, model_dir=None, parts=PARTS, download=hub_download, force=False, log=print):
    """Download and convert everything of `parts` into data_dir. -> {output path: rows written or "skipped"}."""
    report = {}
    if "model" in parts and model:
        model_dir = model_dir or os.path.join(data_dir, "models", model.rstrip("/").split("/")[-1])
        fetch_model(model, model_dir, download, force, log)
        report[model_dir] = "model"
    todo = [s for s in SOURCES if s[0] in parts]
    for part, repo, globs, rel, kind in todo:
        if os.path.isfile(os.path.join(data_dir, rel)) and not force:
            report[rel] = "skipped"
            log(f"{os.path.join(data_dir, rel)} exists, skipped")
    repos = []
    for s in todo:
        if s[1] not in repos and s[3] not in report:
            repos.append(s[1])
    for repo in repos:
        sources = [s for s in todo if s[1] == repo and s[3] not in report]
        patterns = sorted({g for s in sources for g in s[2]})
        log(f"{repo}: downloading {len(sources)} file set(s)")
        try:
            snap = download(repo, repo_type="dataset", allow_patterns=patterns)
        except Exception as e:
            if repo != BIO_FORGET_REPO:
                raise
            log(f"{repo}: not downloaded ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
            continue
        for part, _, globs, rel, kind in sources:
            files = find_files(snap, globs)
            if not files:
                if repo == BIO_FORGET_REPO:
                    log(f"{repo}: no .jsonl/.parquet file in the download")
                    continue
                raise SystemExit(f"{repo}: no file matches {' or '.join(globs)} (has the dataset changed?)")
            n = convert(files, os.path.join(data_dir, rel), kind)
            report[rel] = n
            log(f"  wrote {os.path.join(data_dir, rel)} ({n} rows)")
    if "bio-forget" in parts and not os.path.isfile(os.path.join(data_dir, BIO_FORGET)):
        log(f"NOTE: {os.path.join(data_dir, BIO_FORGET)} is missing: {BIO_FORGET_HOWTO}")
    return report


def main(argv=None, download=hub_download):
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--model", default=MODEL, help="Hub model id to snapshot ('' to skip)")
    p.add_argument("--data", required=True, help="DATA dir to write (layout in data/__init__.py)")
    p.add_argument("--model-dir", default=None, help="where the model goes (default DATA/models/<name>)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--force", action="store_true", help="rewrite files that already exist")
    args = p.parse_args(argv)
    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    bad = [x for x in parts if x not in PARTS]
    if bad:
        p.error(f"--parts: unknown {', '.join(bad)}; expected some of {','.join(PARTS)}")
    from infra import atomic_write_json, run_info
    info, t0 = run_info(args), time.time()
    try:
        report = fetch(args.data, args.model, args.model_dir, parts, download=download, force=args.force)
    except DataError as e:
        raise SystemExit(f"data/fetch.py: {e}") from None
    except KeyboardInterrupt:
        print("data/fetch.py: interrupted; files already written are complete, the rest is not there (rerun to "
              "continue)", file=sys.stderr)
        raise SystemExit(130) from None
    atomic_write_json(os.path.join(args.data, "fetch.json"), dict(info, time_s=round(time.time() - t0, 1),
                                                                  results=report))


if __name__ == "__main__":
    main()
