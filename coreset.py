"""Coreset selection for LLM unlearning, and keyword-only forget sets. One JSON line per selected forget document,
read by `unlearn.py --coreset FILE`:

    python coreset.py --method random --forget data/toy/forget_corpus.jsonl --ratio 0.05 --seed 0 --out cs.jsonl
    python coreset.py --method mink --model data/toy/model --forget F1.jsonl,F2.jsonl --ratio 0.05 --out cs.jsonl
    -> cs.jsonl  {"file": <forget path as given>, "index": <0-based index in data.read_corpus(file)>, "score": float|null}
                 (keywords: also "text", the document reduced to its keywords, which unlearn.py trains on)
       cs.json   run record: arguments, versions, device, per-file counts, timings

--ratio: a fraction of each forget file's documents (0 < r <= 1, Python's round) or above 1 a document count per
file; at least one document per file. Each forget file (one per topic) is scored and selected on its own.

Methods (selection keeps the `--order` end; ties to the lower index; a document with no score comes last):
  random    seeded uniform sample without replacement (score null); the same draw as `unlearn.py --ratio`.
  loss      mean token negative log-likelihood                                            default order: low
  zlib      loss / zlib-compressed byte length of the scored text (Carlini et al. 2021)   default order: low
  mink      Min-K% Prob: -mean of the lowest k% token log-probs (k = --mink-k, 0.4)       default order: low
  minkpp    Min-K%++ on (log p(x_t) - mu_t) / sigma_t under the next-token distribution   default order: low
            These four come from one batched pass of lpkernels.token_stats (math in losses.py). The default keeps
            what the model finds most likely (what it has absorbed is what unlearning must remove).
  grand     GraNd: per-document gradient norm of the unlearning loss w.r.t. the trained parameters, at the
            starting model (default order: high). --grand-loss rmu: RMU's forget loss at the steering layer with
            the very control vector the run trains with for this seed and topic (losses.control_vector; layer and
            coefficients from the flags, else methods.method_defaults for the model), over mlp.down_proj of the
            trained layers. --grand-loss npo: the gradient of the mean token log-prob (NPO's at theta = ref) over
            the matrices the NPO run trains (--layer-ids / --params, else its --train-scope params' for the model;
            every linear projection of every layer for its other scopes). One backward per batch gives every document's gradient
            norm (grand_batch's docstring says how).
  moderate  Moderate-DS (Xia et al. 2023): distance of mean-pooled hidden states (--layer) to the file's centroid;
            score = |distance - median|; keeps the documents of typical difficulty.
  keywords  keyword-only forget set (no model): words scored against the retain corpus by the log-odds ratio with
            an informative Dirichlet prior (Monroe, Colaresi & Quinn 2008; strength --prior-frac x the pooled
            word count); keywords have z >= --min-z and >= --min-count uses, no English function words (unless
            --keep-stopwords), at most --max-keywords. --out becomes a forget corpus, each document reduced to
            its keywords: a coreset file whose lines carry the reduced "text" (unlearn.py --coreset trains on it,
            budgeted against the full forget set). --ratio (default 1) samples first; documents without a keyword
            are left out.

Scoring runs in bf16 on a GPU and fp32 on the CPU (--dtype overrides), on the model's tokens truncated to
--max-length, right-padded, batched by length. The coreset sweep is coreset_sweep.py.
"""
import argparse
import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import data
import losses
import methods
from doc_scores import (BATCH_SIZE, MAX_LENGTH, TOKEN_METHODS, grand_scores, moderate_scores, pooled_features,
                        token_scores)
import model as model_io
from infra import (TOY_DIR, TOY_MODEL, ProjectError, atomic_write_json, atomic_write_lines, check_output, cli_main,
                   parse_ratio, per_topic, run_info, split_list)

# ----------------------------------------------------------------------------------------------- defaults
METHODS = ("random", "loss", "zlib", "mink", "minkpp", "grand", "moderate", "keywords")
DEFAULT_ORDER = {"loss": "low", "zlib": "low", "mink": "low", "minkpp": "low", "grand": "high", "moderate": "low"}


class CoresetError(ProjectError):
    """Bad input to coreset selection; the message names the flag or file and what was expected."""


# ----------------------------------------------------------------------------------------------- ratios

def coreset_size(ratio, n):
    """Documents to keep out of n: round(ratio * n) for a fraction, min(ratio, n) for a count; >= 1."""
    r = parse_ratio(ratio)
    k = int(r) if r > 1 else round(r * n)    # Python's round, as unlearn.py --ratio
    return max(1, min(n, k))


def choose(scores, k, order):
    """Indices (sorted ascending) of the k documents at the `order` ("high"/"low") end of scores (n,); ties to the
    lower index; NaN scores last."""
    s = np.asarray(scores, dtype=np.float64)
    nan = np.isnan(s)
    key = np.where(nan, 0.0, -s if order == "high" else s)
    rank = np.lexsort((np.arange(len(s)), key, nan))  # primary: NaN last, then key, then index
    return np.sort(rank[:k])


def random_indices(n, k, seed, file_index=0):
    """k distinct indices of range(n), sorted; the same draw as `unlearn.py --ratio` (random.Random seeded with
    seed * 1000003 + file index), so a random coreset file and unlearn's own --ratio pick the same documents."""
    rng = random.Random(int(seed) * 1_000_003 + int(file_index))
    return np.array(sorted(rng.sample(range(n), k)), dtype=np.int64)


# ----------------------------------------------------------------------------------------------- coreset files

def run_json_path(out):
    p = Path(out)
    return p.with_suffix(".json") if p.suffix != ".json" else p.with_suffix(".run.json")


def write_coreset(path, selected):
    """selected: list of (file, index, score or None[, text]) -> JSON Lines in the coreset format; a line with a
    text (a keyword-only forget set) trains on that text in place of the document."""
    def clean(s):
        return None if s is None or not math.isfinite(float(s)) else float(s)
    atomic_write_lines(path, [json.dumps({"file": f, "index": int(i), "score": clean(s), **({"text": x[0]} if x else {})})
                              for f, i, s, *x in selected])


def read_coreset(path, forget_files, sizes, with_texts=False):
    """A coreset file -> sorted index list per forget file (with_texts: and per forget file {index: text} of the
    lines that carry their own "text", a keyword-only forget set's). Every line must name one of the forget files
    (as given, or the same file by path) with an in-range, unique index; every forget file must keep a document."""
    path = str(path)
    if not os.path.isfile(path):
        raise CoresetError(f"--coreset: missing file {path}")
    by_name = {f: i for i, f in enumerate(forget_files)}
    by_real = {os.path.realpath(f): i for i, f in enumerate(forget_files)}
    sel = [set() for _ in forget_files]
    texts = [{} for _ in forget_files]
    for where, obj in data.jsonl_records(path):
        if not isinstance(obj.get("file"), str) or isinstance(obj.get("index"), bool) or \
                not isinstance(obj.get("index"), int):
            raise CoresetError(f'{where}: expected {{"file": str, "index": int, "score": float|null}}')
        score = obj.get("score")
        if score is not None and (isinstance(score, bool) or not isinstance(score, (int, float))):
            raise CoresetError(f"{where}: expected 'score' to be a number or null, got {score!r}")
        t = by_name.get(obj["file"], by_real.get(os.path.realpath(obj["file"])))
        if t is None:
            raise CoresetError(f"{where}: file {obj['file']!r} is not one of --forget ({', '.join(forget_files)})")
        i = obj["index"]
        if not 0 <= i < sizes[t]:
            raise CoresetError(f"{where}: index {i} out of range for {forget_files[t]} ({sizes[t]} documents)")
        if i in sel[t]:
            raise CoresetError(f"{where}: duplicate index {i} for {forget_files[t]}")
        sel[t].add(i)
        if "text" in obj:
            if not isinstance(obj["text"], str) or not obj["text"].strip():
                raise CoresetError(f"{where}: expected 'text' to be a non-empty string")
            texts[t][i] = obj["text"]
    for t, s_ in enumerate(sel):
        if not s_:
            raise CoresetError(f"{path}: selects no document of forget file {forget_files[t]}")
    return ([sorted(s_) for s_ in sel], texts) if with_texts else [sorted(s_) for s_ in sel]


def chosen_documents(cfg, forget_docs):
    """The documents an unlearning run trains on (cfg.coreset, cfg.ratio, cfg.seed, cfg.forget as unlearn.py's
    flags): a coreset file, a seeded random draw (the same as --method random), or all. -> (sorted indices per
    forget file, texts per forget file: the documents', or the coreset's own where it gives them, a keyword-only
    forget set's)."""
    sizes = [len(d) for d in forget_docs]
    if cfg.coreset:
        sel, given = read_coreset(cfg.coreset, cfg.forget, sizes, with_texts=True)
    elif cfg.ratio is not None:
        sel = [random_indices(n, coreset_size(cfg.ratio, n), cfg.seed, t).tolist() for t, n in enumerate(sizes)]
        given = [{} for _ in sizes]
    else:
        sel, given = [list(range(n)) for n in sizes], [{} for _ in sizes]
    return sel, [[g.get(i, docs[i]) for i in idx] for docs, idx, g in zip(forget_docs, sel, given)]


# ----------------------------------------------------------------------------------------------- selection

@dataclass
class SelectConfig:
    """One selection (the CLI's flags). GraNd's layer_id / layer_ids / steering_coeffs / params: None = what
    unlearning uses for this model (methods.method_defaults), so the scores see the training's own control vectors
    (RMU) and matrices (RMU; the NPO family under --train-scope params)."""
    method: str = "random"
    model: str = str(TOY_MODEL)
    forget: str = str(TOY_DIR / "forget_corpus.jsonl")   # comma list, one file per topic
    retain: str = str(TOY_DIR / "retain_corpus.jsonl")   # keywords only
    ratio: float | str | None = None
    seed: int = 42                        # unlearn.py's default: a random coreset and GraNd's vectors match it
    out: str = "runs/coreset.jsonl"
    order: str | None = None
    min_chars: int = 0
    max_length: int = MAX_LENGTH
    batch_size: int = BATCH_SIZE
    mink_k: float = losses.MIN_K
    grand_loss: str = "rmu"
    layer_id: int | None = None
    layer_ids: str | None = None
    steering_coeffs: str | None = None
    params: str | None = None             # GraNd's trained matrices (None: unlearning's)
    masked_loss: bool | None = None       # GraNd-RMU: BOS out of the loss (None: unlearning's)
    layer: int = -1
    prior_frac: float = losses.PRIOR_FRAC
    min_z: float = losses.MIN_Z
    min_count: int = losses.MIN_COUNT
    max_keywords: int = losses.MAX_KEYWORDS
    keep_stopwords: bool = False
    device: str | None = None
    dtype: str | None = None
    progress: bool = True
    overwrite: bool = False   # replace an --out that is not a previous selection's own file


def grand_rmu_settings(cfg):
    """(layer_id, layer_ids, steering coefficient per topic) for GraNd-RMU: the flags, else unlearning's own."""
    d = methods.method_defaults("rmu", cfg.model)
    layer_id = int(cfg.layer_id if cfg.layer_id is not None else d["layer_id"])
    layer_ids = split_list(cfg.layer_ids, "--layer-ids", int) if cfg.layer_ids is not None else d["layer_ids"]
    coeffs = split_list(cfg.steering_coeffs, "--steering-coeffs", float) if cfg.steering_coeffs is not None \
        else d["steering_coeffs"]
    return layer_id, layer_ids, coeffs


def grand_rmu_loss_terms(cfg):
    """(trained matrices, BOS left out of the loss?) for GraNd-RMU: the flags, else unlearning's own for the model."""
    d = methods.method_defaults("rmu", cfg.model)
    params = split_list(cfg.params, "--params") if cfg.params is not None else d["params"]
    return params, cfg.masked_loss if cfg.masked_loss is not None else d["masked_loss"]


def npo_trained(train_scope, layer_ids, params, n_layers):
    """(layers, matrices) an NPO run trains among the decoder layers' linear layers: --train-scope params' --params
    of --layer-ids, else every projection of every layer."""
    if train_scope == "params":
        return list(layer_ids), list(params)
    return list(range(n_layers)), list(methods.MATRICES)


def grand_npo_targets(cfg, n_layers):
    """(layers, matrices) GraNd-NPO scores: the flags, else what NPO trains on this model (methods.method_defaults):
    --params of --layer-ids as --train-scope params trains them (its params default with layers given), or every
    projection of every layer."""
    if n_layers is None:
        raise CoresetError(f"--model {cfg.model}: config.json does not say num_hidden_layers")
    d = methods.method_defaults("npo", cfg.model)
    layer_ids, params = npo_trained("params" if cfg.layer_ids is not None else d["train_scope"],
                                    split_list(cfg.layer_ids, "--layer-ids", int) if cfg.layer_ids is not None
                                    else d["layer_ids"], d["params"], n_layers)
    if cfg.params is not None:
        params = split_list(cfg.params, "--params")
    return layer_ids, params


def load_model(cfg):
    try:
        return model_io.load(cfg.model, cfg.device, cfg.dtype)
    except (FileNotFoundError, OSError) as e:
        raise CoresetError(f"--model {cfg.model}: {e}") from None


def score_documents(cfg, model, tok, docs, file_index=0, n_files=1):
    """Scores (n,) of one forget file's documents under cfg.method (None for random)."""
    if cfg.method in TOKEN_METHODS:
        return token_scores(model, tok, docs, cfg.max_length, cfg.batch_size, cfg.mink_k, cfg.progress)[cfg.method]
    if cfg.method == "grand" and cfg.grand_loss == "npo":   # the matrices NPO trains: no RMU settings
        layer_ids, params = grand_npo_targets(cfg, model.config.num_hidden_layers)
        methods.check_matrices(layer_ids, params, model.config.num_hidden_layers)
        return grand_scores(model, tok, docs, "npo", layer_ids=layer_ids, max_length=cfg.max_length,
                            batch_size=cfg.batch_size, progress=cfg.progress, params=params)
    if cfg.method == "grand":
        layer_id, layer_ids, coeffs = grand_rmu_settings(cfg)
        n_layers = model.config.num_hidden_layers
        if cfg.grand_loss == "rmu" and not all(0 <= i <= layer_id < n_layers for i in layer_ids):
            raise CoresetError(f"--layer-id {layer_id} / --layer-ids {layer_ids}: expected layer ids <= layer id < "
                               f"{n_layers} (the model's layers)")
        c = losses.control_vector(model.config.hidden_size, per_topic(coeffs, n_files)[file_index], cfg.seed,
                                  file_index, model.lm_head_weight.dtype)
        params, masked = grand_rmu_loss_terms(cfg)
        methods.check_matrices(layer_ids, params)
        return grand_scores(model, tok, docs, cfg.grand_loss, layer_id, layer_ids, c, cfg.max_length,
                            cfg.batch_size, cfg.progress, params=params, bos_id=tok.bos_token_id if masked else None)
    if cfg.method == "moderate":
        if cfg.layer >= model.config.num_hidden_layers:
            raise CoresetError(f"--layer {cfg.layer}: the model has {model.config.num_hidden_layers} layers")
        return moderate_scores(pooled_features(model, tok, docs, cfg.layer, cfg.max_length, cfg.batch_size,
                                               cfg.progress))
    return None


def check_config(cfg):
    if cfg.method not in METHODS:
        raise CoresetError(f"--method {cfg.method!r}: expected one of {', '.join(METHODS)}")
    if cfg.ratio is None and cfg.method != "keywords":
        raise CoresetError("--ratio: required (a fraction in (0, 1] or a document count > 1)")
    parse_ratio(cfg.ratio if cfg.ratio is not None else 1)
    if cfg.max_length < 2:
        raise CoresetError(f"--max-length {cfg.max_length}: expected >= 2")
    if cfg.batch_size < 1:
        raise CoresetError(f"--batch-size {cfg.batch_size}: expected >= 1")
    if not 0 < cfg.mink_k <= 1:
        raise CoresetError(f"--mink-k {cfg.mink_k}: expected a fraction in (0, 1]")
    if cfg.order not in (None, "high", "low"):
        raise CoresetError(f"--order {cfg.order!r}: expected high or low")
    if cfg.grand_loss not in ("rmu", "npo"):
        raise CoresetError(f"--grand-loss {cfg.grand_loss!r}: expected rmu or npo")


def is_previous_selection(path) -> bool:
    """A file this script wrote: its run record (run_json_path) is there and is ours."""
    try:
        rec = json.loads(Path(run_json_path(path)).read_text())
        return isinstance(rec, dict) and "argv" in rec and "method" in rec
    except (OSError, ValueError):
        return False


def check_outputs(cfg, forget):
    """The output policy (infra.check_output) for --out and, with several forget files, the keyword files."""
    out = Path(cfg.out)
    outs = [out]
    inputs = [*forget, *split_list(cfg.retain.split(","), "--retain")] + ([cfg.model] if cfg.method not in
                                                                          ("random", "keywords") else [])
    mine = lambda p: is_previous_selection(out)
    for o in outs + [Path(run_json_path(out))]:
        check_output(o, inputs, "--out", kind="file", ours=mine, overwrite=cfg.overwrite, name="coreset")


def select(cfg, model=None, tok=None, cache=None):
    """One selection -> run record (dict); writes cfg.out and its run record. model/tok: reuse a loaded model;
    cache: a dict in which per-file scores are kept across calls (the sweep scores once for all ratios)."""
    check_config(cfg)
    t0 = time.time()
    forget = split_list(cfg.forget.split(",") if isinstance(cfg.forget, str) else cfg.forget, "--forget")
    check_outputs(cfg, forget)
    try:
        corpora = [data.read_corpus(p, cfg.min_chars) for p in forget]
    except data.DataError as e:
        raise CoresetError(f"--forget: {e}") from None
    record = run_info(cfg)
    record["timings"] = {}
    if cfg.method == "keywords":
        return keywords_run(cfg, forget, corpora, record, t0)
    order = cfg.order or DEFAULT_ORDER.get(cfg.method)
    keys = [(cfg.method, path, fi) + ((cfg.seed, cfg.grand_loss) if cfg.method == "grand" else ())
            for fi, path in enumerate(forget)]
    record["scores_cached"] = cache is not None and all(k in cache for k in keys)
    if cfg.method != "random" and model is None and not record["scores_cached"]:
        model, tok = load_model(cfg)   # freed when this returns: the sweep keeps only the scores
        record["timings"]["load_s"] = time.time() - t0
    t1 = time.time()
    selected, files = [], []
    for fi, (path, docs, key) in enumerate(zip(forget, corpora, keys)):
        if cache is not None and key in cache:
            scores = cache[key]
        else:
            scores = score_documents(cfg, model, tok, docs, fi, len(forget))
            if cache is not None:
                cache[key] = scores
        k = coreset_size(cfg.ratio, len(docs))
        idx = random_indices(len(docs), k, cfg.seed, fi) if scores is None else choose(scores, k, order)
        selected += [(path, i, None if scores is None else scores[i]) for i in idx]
        files.append({"file": path, "documents": len(docs), "selected": int(k),
                      "score_stats": None if scores is None else _stats(scores)})
    record["timings"]["score_s"] = time.time() - t1
    write_coreset(cfg.out, selected)
    record.update(method=cfg.method, order=order, ratio=float(parse_ratio(cfg.ratio)), files=files,
                  coreset=str(cfg.out), selected=len(selected))
    if cfg.method == "grand":
        record["grand"] = dict(zip(("layer_ids", "params"), grand_npo_targets(cfg, methods.model_layers(
            cfg.model))), loss="npo") if cfg.grand_loss == "npo" else \
            dict(zip(("layer_id", "layer_ids", "steering_coeffs"), grand_rmu_settings(cfg)), loss="rmu")
    record["timings"]["total_s"] = time.time() - t0
    atomic_write_json(run_json_path(cfg.out), record)
    return record


def _stats(scores):
    s = np.asarray(scores, dtype=np.float64)
    s = s[np.isfinite(s)]
    if s.size == 0:
        return None
    return {"min": float(s.min()), "median": float(np.median(s)), "max": float(s.max()), "n": int(s.size)}


def keywords_run(cfg, forget, corpora, record, t0):
    """Keyword-only forget set: per forget file, keywords against the retain corpus, each (sampled) document
    reduced to them; written as a coreset file whose lines carry the reduced text."""
    try:
        retain = [d for docs in data.read_corpora(split_list(cfg.retain.split(","), "--retain"), cfg.min_chars)
                  for d in docs]
    except data.DataError as e:
        raise CoresetError(f"--retain: {e}") from None
    files, selected = [], []
    for fi, (path, docs) in enumerate(zip(forget, corpora)):
        keep = range(len(docs)) if cfg.ratio is None else \
            sorted(random_indices(len(docs), coreset_size(cfg.ratio, len(docs)), cfg.seed, fi).tolist())
        kws = losses.extract_keywords([docs[i] for i in keep], retain, cfg.prior_frac, cfg.min_z, cfg.min_count,
                                      cfg.max_keywords, frozenset() if cfg.keep_stopwords else losses.STOPWORDS)
        kwset = {w for w, _, _ in kws}
        lines = [(path, i, None, t) for i in keep if (t := losses.keyword_document(docs[i], kwset))]
        if not lines:
            raise CoresetError(f"--forget {path}: no keywords found (try a lower --min-z or --min-count)")
        selected += lines
        files.append({"file": path, "documents": len(docs), "sampled": len(keep), "selected": len(lines),
                      "keywords": [{"word": w, "z": round(z, 3), "count": c} for w, z, c in kws]})
    write_coreset(cfg.out, selected)
    record.update(method="keywords", ratio=float(parse_ratio(cfg.ratio if cfg.ratio is not None else 1)),
                  files=files, coreset=str(cfg.out), selected=len(selected))
    record["timings"]["total_s"] = time.time() - t0
    atomic_write_json(run_json_path(cfg.out), record)
    return record


# ----------------------------------------------------------------------------------------------- CLI

def build_parser():
    d = SelectConfig()
    p = argparse.ArgumentParser(
        description="Select a coreset of the forget set (or write a keyword-only forget set). "
                    "The coreset sweep is coreset_sweep.py.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--method", default=d.method, help="|".join(METHODS))
    p.add_argument("--model", default=d.model, help="HF checkpoint dir (not needed by random, keywords)")
    p.add_argument("--forget", default=d.forget, help="forget corpus file(s), comma-separated")
    p.add_argument("--retain", default=d.retain, help="retain corpus file(s) (keywords only)")
    p.add_argument("--ratio", default=None, help="fraction (0, 1] or count > 1 per forget file (default 1 for keywords)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--out", default=d.out, help="coreset .jsonl (keywords: lines carry the reduced text)")
    p.add_argument("--order", choices=["high", "low"], default=None, help="keep the highest or lowest scores "
                   "(default: low for loss/zlib/mink/minkpp/moderate, high for grand)")
    p.add_argument("--min-chars", type=int, default=d.min_chars, help="data.read_corpus min_chars (as unlearn.py's)")
    p.add_argument("--max-length", type=int, default=d.max_length, help="tokens per document scored")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--mink-k", type=float, default=d.mink_k, help="Min-K%% / Min-K%%++ fraction of tokens")
    p.add_argument("--grand-loss", choices=["rmu", "npo"], default=d.grand_loss)
    p.add_argument("--layer-id", type=int, default=None, help="GraNd-RMU layer (default: unlearning's for the model)")
    p.add_argument("--layer-ids", default=None, help="GraNd's trained layers (default: unlearning's)")
    p.add_argument("--steering-coeffs", default=None, help="GraNd-RMU control norms per topic (default: unlearning's)")
    p.add_argument("--params", default=None, help="GraNd's trained matrices (default: unlearning's)")
    p.add_argument("--masked-loss", default=None, action=argparse.BooleanOptionalAction,
                   help="GraNd-RMU: BOS out of the loss (default: unlearning's)")
    p.add_argument("--layer", type=int, default=d.layer, help="moderate: hidden states after this layer (-1: final)")
    p.add_argument("--prior-frac", type=float, default=d.prior_frac,
                   help="keywords: Dirichlet prior strength alpha_0 as a fraction of the pooled word count")
    p.add_argument("--min-z", type=float, default=d.min_z, help="keywords: z-score threshold")
    p.add_argument("--min-count", type=int, default=d.min_count, help="keywords: minimum count in the forget file")
    p.add_argument("--max-keywords", type=int, default=d.max_keywords)
    p.add_argument("--keep-stopwords", action="store_true", help="keywords: let English function words be keywords")
    p.add_argument("--device", default=None, help="default: cuda when available")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None, help="default: bf16 GPU, fp32 CPU")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--overwrite", action="store_true", help="replace an --out that is not a previous selection's")
    return p


def report_selection(rec):
    for f in rec["files"]:
        kws = f", reduced to {len(f['keywords'])} keywords" if rec["method"] == "keywords" else ""
        print(f"{f['file']}: {f['selected']}/{f['documents']} documents ({rec['method']}{kws})")
    print(f"wrote {rec['coreset']} and {run_json_path(rec['coreset'])} in {rec['timings']['total_s']:.1f}s; "
          f"unlearn with: --coreset {rec['coreset']}")
    return rec


def main(argv=None):
    cfg = SelectConfig(**vars(build_parser().parse_args(argv)))
    return cli_main("coreset", lambda: report_selection(select(cfg)))


if __name__ == "__main__":
    main()
