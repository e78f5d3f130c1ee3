"""MUSE's metrics (muse-bench eval.py, metrics/{verbmem,knowmem,privleak}.py, constants.py; REFERENCE section 5):
  - VerbMem: greedy 128 new tokens after the prompt (with BOS) vs the ground truth cut to its first 128 tokens
    (BOS included in the count, then decoded without it); ROUGE-L F1 (rouge-score, use_stemmer=False), mean x100.
  - KnowMem: prompt = "".join(f"Question: {q}\nAnswer: {a}\n\n" for ICL) + f"Question: {q}\nAnswer: ",
    greedy 32 tokens, output cut before "\n\n", "\nQuestion", "Question:"; ROUGE-L F1 vs the answer, mean x100.
  - PrivLeak: Min-K% (k = 40%) per text = -mean of the int(0.4 * n) lowest token log-probs (tokens after BOS);
    AUC with forget = label 0, holdout = label 1, score = -Min-K ("forget_holdout_Min-40%");
    PrivLeak = (AUC - AUC_retrain) / AUC_retrain * 100. AUC_retrain: --auc-retrain, else the value measured on a
    split's retrained (control) model and recorded in its split.json (the embedded toy's), else MUSE's constants.
evaluate.py runs these for the tasks muse_news / muse_books.
"""
import json
import os
import time

import losses
from data import DataError, read_muse
from infra import ProjectError
from loglik import decode, encode, generate_texts, token_logprobs

VERBMEM_NEW_TOKENS = 128   # muse-bench verbmem_max_new_tokens
KNOWMEM_NEW_TOKENS = 32    # muse-bench knowmem_max_new_tokens
KNOWMEM_CUT = ("\n\n", "\nQuestion", "Question:")  # muse-bench knowmem: get_prefix_before_words_occur
# muse-bench constants.py AUC_RETRAIN[corpus]["forget_holdout_Min-40%"] (retrained Llama-2-7B models)
AUC_RETRAIN = {"muse_news": 0.47719999999999996, "muse_books": 0.5392999999999999}


class MuseError(ProjectError):
    """A missing or malformed MUSE file; the message names it."""


def recorded_auc_retrain(muse_dir):
    """The AUC_retrain measured for a split and recorded beside its files (split.json's "auc_retrain"), or None."""
    path = os.path.join(str(muse_dir), "split.json")
    if not os.path.isfile(path):
        return None
    try:
        v = json.loads(open(path).read()).get("auc_retrain")
    except (json.JSONDecodeError, AttributeError):
        raise MuseError(f"{path}: not a JSON object with a number auc_retrain") from None
    if v is not None and not (isinstance(v, (int, float)) and 0 < v < 1):
        raise MuseError(f"{path}: auc_retrain {v!r}: expected a number between 0 and 1")
    return v


# ----------------------------------------------------------------------------------------------- ROUGE-L, AUC

def roc_auc(neg_scores, pos_scores):
    """Area under the ROC curve (= sklearn roc_curve + auc): P(pos > neg) + 0.5 P(pos == neg), by ranks."""
    pairs = sorted([(s, 0) for s in neg_scores] + [(s, 1) for s in pos_scores])
    n_pos, n_neg = len(pos_scores), len(neg_scores)
    if n_pos == 0 or n_neg == 0:
        raise MuseError("AUC needs at least one score in each class")
    rank_sum, i = 0.0, 0
    while i < len(pairs):  # average ranks over ties
        j = i
        while j < len(pairs) and pairs[j][0] == pairs[i][0]:
            j += 1
        avg_rank = (i + 1 + j) / 2
        rank_sum += avg_rank * sum(lbl for _, lbl in pairs[i:j])
        i = j
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def rouge_tokenize(text):
    """rouge-score's default tokenizer (no stemmer): lowercase, non [a-z0-9] -> space, split on whitespace."""
    import re
    return [t for t in re.split(r"\s+", re.sub(r"[^a-z0-9]+", " ", text.lower())) if re.fullmatch(r"[a-z0-9]+", t)]


def lcs_length(a, b):
    """Length of the longest common subsequence of two token lists (O(len(a) * len(b)), one row of memory)."""
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(target, prediction):
    """rouge_score.RougeScorer(['rougeL'], use_stemmer=False).score(target, prediction)['rougeL']
    -> dict(precision, recall, fmeasure)."""
    t, p = rouge_tokenize(target), rouge_tokenize(prediction)
    if not t or not p:
        return dict(precision=0.0, recall=0.0, fmeasure=0.0)
    lcs = lcs_length(t, p)
    precision, recall = lcs / len(p), lcs / len(t)
    f = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return dict(precision=precision, recall=recall, fmeasure=f)


def rouge_l_f1(target, prediction):
    return rouge_l(target, prediction)["fmeasure"]


# ----------------------------------------------------------------------------------------------- MUSE metrics

def verbmem(model, tok, prompts, gts, max_new_tokens=VERBMEM_NEW_TOKENS, batch_size=8, progress=False, bos=None):
    """MUSE VerbMem: -> (mean ROUGE-L F1 x 100, per-item logs)."""
    outputs = generate_texts(model, tok, prompts, max_new_tokens, batch_size, progress, bos, "verbmem")
    logs = []
    for prompt, gt, output in zip(prompts, gts, outputs):
        gt_short = decode(tok, encode(tok, gt, bos)[:max_new_tokens])
        logs.append(dict(gt=gt_short, output=output, rougeL_f1=rouge_l_f1(gt_short, output)))
    return 100 * sum(x["rougeL_f1"] for x in logs) / max(1, len(logs)), logs


def knowmem_prompt(question, icl):
    """MUSE KnowMem's few-shot prompt; icl: list of dict(question, answer)."""
    shots = "".join(f"Question: {d['question']}\nAnswer: {d['answer']}\n\n" for d in icl)
    return shots + f"Question: {question}\nAnswer: "


def cut_answer(text, words=KNOWMEM_CUT):
    """MUSE's get_prefix_before_words_occur."""
    for w in words:
        text = text.split(w)[0]
    return text


def knowmem(model, tok, qa, icl, max_new_tokens=KNOWMEM_NEW_TOKENS, batch_size=8, progress=False, bos=None):
    """MUSE KnowMem on one QA set: -> (mean ROUGE-L F1 x 100, per-item logs)."""
    prompts = [knowmem_prompt(d["question"], icl) for d in qa]
    outputs = generate_texts(model, tok, prompts, max_new_tokens, batch_size, progress, bos, "knowmem")
    logs = []
    for d, output in zip(qa, outputs):
        output = cut_answer(output)
        logs.append(dict(question=d["question"], answer=d["answer"], output=output,
                         rougeL_f1=rouge_l_f1(d["answer"], output)))
    return 100 * sum(x["rougeL_f1"] for x in logs) / max(1, len(logs)), logs


def privleak(model, tok, forget_texts, holdout_texts, auc_retrain, batch_size=8, progress=False, bos=None,
             batch_tokens=None):
    """MUSE PrivLeak: -> (privleak %, AUC forget-vs-holdout, Min-K scores of forget, of holdout)."""
    f = [losses.min_k_score(x) for x in token_logprobs(model, tok, forget_texts, batch_size, progress, bos, "privleak forget",
                                                batch_tokens)]
    h = [losses.min_k_score(x) for x in token_logprobs(model, tok, holdout_texts, batch_size, progress, bos,
                                                "privleak holdout", batch_tokens)]
    auc = roc_auc([-x for x in f], [-x for x in h])  # forget = label 0, holdout = label 1, score -Min-K
    return (auc - auc_retrain) / auc_retrain * 100, auc, f, h


def evaluate_muse(model, tok, muse_dir, task="muse_news", batch_size=8, limit=None, progress=True,
                  auc_retrain=None, bos=None, batch_tokens=None):
    """VerbMem_f, KnowMem_f, KnowMem_r (when the files exist) and PrivLeak of one MUSE corpus dir.
    -> (results dict, samples dict)."""
    parts = [p for p in ("verbmem_forget", "knowmem_forget_qa", "knowmem_forget_qa_icl", "knowmem_retain_qa",
                         "knowmem_retain_qa_icl", "privleak_forget", "privleak_holdout")
             if os.path.isfile(os.path.join(str(muse_dir), p + ".jsonl"))]
    for need in ("verbmem_forget", "privleak_forget", "privleak_holdout"):
        if need not in parts:
            raise MuseError(f"missing MUSE file {os.path.join(str(muse_dir), need + '.jsonl')}: "
                            "get it with `make fetch DATA=<dir>` (python -m data.fetch --data <dir>)")
    try:
        d = read_muse(muse_dir, parts)
    except DataError as e:
        raise MuseError(str(e)) from None
    cut = (lambda xs: xs[:limit]) if limit else (lambda xs: xs)
    if auc_retrain is None:
        auc_retrain = recorded_auc_retrain(muse_dir)
    if auc_retrain is None:
        auc_retrain = AUC_RETRAIN.get(task)
    if auc_retrain is None:
        raise MuseError(f"{task}: give --auc-retrain (PrivLeak's AUC of the retrained model)")
    res, samples, t0 = {}, {}, time.time()
    vm = cut(d["verbmem_forget"])
    res["verbmem_f"], samples["verbmem_f"] = verbmem(model, tok, [x["prompt"] for x in vm], [x["gt"] for x in vm],
                                                     batch_size=batch_size, progress=progress, bos=bos)
    res["n_verbmem_f"] = len(vm)
    for split in ("forget", "retain"):
        qa, icl = f"knowmem_{split}_qa", f"knowmem_{split}_qa_icl"
        if qa in d and icl in d:
            key = f"knowmem_{split[0]}"
            res[key], samples[key] = knowmem(model, tok, cut(d[qa]), d[icl], batch_size=batch_size,
                                             progress=progress, bos=bos)
            res["n_" + key] = len(cut(d[qa]))
    pl, auc, f, h = privleak(model, tok, cut(d["privleak_forget"]), cut(d["privleak_holdout"]), auc_retrain,
                             batch_size, progress, bos, batch_tokens)
    res.update(privleak=pl, auc_forget_holdout=auc, auc_retrain=auc_retrain, n_privleak_forget=len(f),
               n_privleak_holdout=len(h))
    samples["privleak"] = dict(mink_forget=f, mink_holdout=h)
    res["time_s"] = time.time() - t0
    return res, samples
