"""Unlearning in plain loops: RMU (WMDP's reference algorithm) and NPO with its relatives (GradDiff, SimNPO),
trained on a coreset of the forget set, evaluated before and after.

    python unlearn.py                                          # RMU on the embedded toy (data/toy), full forget set
    python unlearn.py --ratio 0.05 --seed 0                    # ... on a seeded random 5% of the forget documents
    python unlearn.py --method rmu --model DIR --forget bio.jsonl,cyber.jsonl --retain wikitext.txt,wikitext.txt \
        --ratio 0.05 --data DATA --eval-tasks wmdp_bio,wmdp_cyber,mmlu --out runs/rmu
    python unlearn.py --method npo --coreset coreset.jsonl ...  # a coreset written by coreset.py
    python unlearn.py --bench                                  # RMU step: reference design vs ours (GPU)

In-process use (the coreset sweep): `record = run(build_parser().parse_args([...]))`; the record is the run JSON
(args, seed, coreset indices, loss per step, time, peak memory, versions, eval before/after).

RMU (REFERENCE 2, WMDP rmu/unlearn.py), by default exactly as the reference:
  - one control vector per forget file ("topic"): u = rand(1, 1, d) (uniform [0, 1)), c = coeff * u / ||u||;
  - loss = mse(h_L(x_f), c) + alpha * mse(h_L(x_r), h_L^frozen(x_r)), h_L the residual stream after decoder
    layer --layer-id, mean over batch x seq x d including padding (--masked-loss: real tokens but BOS);
  - only mlp.down_proj of --layer-ids is trained; AdamW lr 5e-5, eps 1e-6 (transformers.AdamW: eps added to the
    uncorrected sqrt(v)), wd 0, no schedule; batch 4; topics interleaved (step i: topic i % n, batch i // n);
    forget max length 512 / 768 (bio / cyber: one value per topic), retain 512; left padding with EOS, right
    truncation; documents in file order; steps = min(max_num_batches, #batches of the smallest forget file,
    #batches of the smallest retain file), computed on the *full* forget set, so a coreset is cycled to reach
    the same number of steps (the coreset paper's protocol); --steps overrides.
  - one retain file per topic; a single retain file serves every topic (the reference passes wikitext twice).
  Efficient, same numbers: the forward stops at layer L; layers below min(layer_ids) run once without gradients
  and feed both the updated and the frozen path; the frozen model is not a second model: only the trained
  matrices are copied and layers min(layer_ids)..L run with them (torch.func.functional_call). Trunk outputs and
  frozen targets of batches that recur (a small coreset, a retain batch shared by two topics) are cached within
  --cache-gib. Differences from the reference: losses are computed in fp32; pad positions (which enter the
  unmasked loss) carry this model's own finite values for pads (HF's differ); real tokens are identical.

NPO family (REFERENCE 3): per step one forget batch (topics interleaved, right padding) and one retain batch.
  npo:      -(2/beta) mean_i logsigmoid(-beta (logp(y_i) - logp_ref(y_i))), logp summed over the sequence
            (--npo-mean-tokens: mean over its tokens, the WMDP runs of the coreset paper)
  simnpo:   -(2/beta) mean_i logsigmoid(-(beta/|y_i|) logp(y_i) - delta)   (no reference model)
  graddiff: -CE_forget
  + retain term gamma * CE_retain (--retain-loss gd) or gamma * KL(ref || current) on retain tokens (kl).
  The reference log-probs are computed once before training (no second model resident); for kl the reference's
  final hidden states of the retain batches (CPU) and a copy of its LM head are kept. All log-probs go through
  lpkernels.fused_sequence_loss / fused_logprob (the (N, V) logits never exist), except the KL term (a chunked,
  checkpointed log-softmax: it needs whole distributions). Warmup, linear/cosine/constant schedule, gradient
  accumulation, clipping, bf16 weights with --fp32-optimizer-state (fp32 moments and master weights).

Coreset: --ratio R draws a seeded random subset of each forget file (R <= 1 a fraction, R > 1 a count);
--coreset FILE takes JSON Lines {"file": <forget file as given>, "index": <0-based index after read_corpus>,
"score": float|null}, per forget file. Selected documents are trained on in file order.

Outputs in --out: model/ (Hugging Face layout, tokenizer copied), run.json; both written atomically. A NaN or
infinite loss stops with an error before anything is written; Ctrl-C leaves earlier outputs as they were.
The base model's evaluation is cached in <out>/../.eval_cache/ (keyed by model files, data, tasks, limit, dtype).
"""
import argparse
import copy
import hashlib
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
TOY_DIR = HERE / "data" / "toy"

# ----------------------------------------------------------------------------------------------- defaults
# Flags left at None are filled per method: from the toy's data/toy/defaults.json when --model is the embedded
# toy model, else from the reference values below. An explicit flag always wins.
DEFAULTS = dict(
    method="rmu",                 # rmu | npo | graddiff | simnpo
    model=str(TOY_DIR / "model"),  # Hugging Face Llama/Mistral checkpoint dir
    forget=None,                  # FILE[,FILE]: one forget corpus per topic (toy: data/toy/forget_corpus.jsonl)
    retain=None,                  # FILE[,FILE]: one per topic, or one for all (toy: data/toy/retain_corpus.jsonl)
    coreset=None,                 # JSONL from coreset.py
    ratio=None,                   # random coreset: fraction (<= 1) or count (> 1) per forget file
    seed=42,                      # the reference's seed
    out="runs/unlearn",
    steps=None,                   # optimizer steps (default: see RMU above; NPO: REAL_NPO steps)
    data=None,                    # DATA dir for --eval-tasks (toy: data/toy)
    eval_tasks=None,              # comma list; "none" to skip (toy default: toy_hazard,toy_general)
    eval_limit=None,
    eval_batch_size=32,
    min_chars=0,                  # keep documents with len(text) > min_chars (reference min_len 0)
    device=None,                  # default cuda when available
    dtype=None,                   # default bf16 on CUDA (as the reference), fp32 on CPU
    cache_gib=2.0,                # RMU: cache of recurring trunk activations / frozen targets
)
REAL_RMU = dict(                  # WMDP's Zephyr run (REFERENCE 2)
    lr=5e-5, adam_eps=1e-6, hf_adam_eps=True, weight_decay=0.0, batch_size=4, grad_accum=1, warmup=0.0,
    lr_schedule="constant", max_grad_norm=0.0, max_num_batches=150, steering_coeffs="6.5", alpha="1200",
    layer_id=7, layer_ids="5,6,7", params="mlp.down_proj", forget_max_len="512,768", retain_max_len=512,
)
REAL_NPO = dict(                  # NPO/GradDiff/SimNPO as the coreset paper's WMDP runs (REFERENCE 3)
    lr=1e-5, adam_eps=1e-8, hf_adam_eps=False, weight_decay=0.0, batch_size=4, grad_accum=1, warmup=0.1,
    lr_schedule="linear", max_grad_norm=1.0, steps=500, beta=0.1, gamma=1.0, delta=0.0, retain_loss="gd",
    forget_max_len="512", retain_max_len=512, chunk_tokens=0,
)
TOY_TASKS = "toy_hazard,toy_general"
BOOL_FLAGS = ("masked_loss", "npo_mean_tokens", "fp32_optimizer_state")  # --x / --no-x, off by default
METHODS = ("rmu", "npo", "graddiff", "simnpo")


class UnlearnError(ValueError):
    """Bad input or a failed run; the message names the flag or file and what was expected."""


# ----------------------------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Unlearning (RMU, NPO, GradDiff, SimNPO) on a coreset of the forget set.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = DEFAULTS
    p.add_argument("--method", default=d["method"], help="rmu | npo | graddiff | simnpo")
    p.add_argument("--model", default=d["model"], help="Hugging Face Llama/Mistral checkpoint directory")
    p.add_argument("--forget", default=d["forget"], help="forget corpora FILE[,FILE] (one per topic)")
    p.add_argument("--retain", default=d["retain"], help="retain corpora FILE[,FILE] (one per topic, or one)")
    sel = p.add_mutually_exclusive_group()
    sel.add_argument("--coreset", default=d["coreset"], help="coreset JSONL written by coreset.py")
    sel.add_argument("--ratio", type=float, default=d["ratio"],
                     help="random coreset per forget file: fraction (<= 1) or document count (> 1)")
    p.add_argument("--seed", type=int, default=d["seed"])
    p.add_argument("--out", default=d["out"], help="output dir: model/ and run.json")
    p.add_argument("--steps", type=int, default=d["steps"], help="optimizer steps (default: the method's)")
    p.add_argument("--data", default=d["data"], help="DATA dir for --eval-tasks")
    p.add_argument("--eval-tasks", default=d["eval_tasks"], help="tasks evaluated before and after; 'none' skips")
    p.add_argument("--eval-limit", type=int, default=d["eval_limit"])
    p.add_argument("--eval-batch-size", type=int, default=d["eval_batch_size"])
    p.add_argument("--min-chars", type=int, default=d["min_chars"])
    p.add_argument("--device", default=d["device"])
    p.add_argument("--dtype", default=d["dtype"], choices=["float32", "bfloat16", "float16"])
    p.add_argument("--cache-gib", type=float, default=d["cache_gib"], help="RMU activation cache budget (0: off)")
    p.add_argument("--no-save", action="store_true", help="no checkpoint (run.json only)")
    p.add_argument("--no-eval-cache", action="store_true", help="re-evaluate the base model")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--bench", action="store_true", help="time an RMU step at 7B: reference design vs ours (GPU)")
    g = p.add_argument_group("optimization (default: per method; the toy's own on the toy model)")
    g.add_argument("--lr", type=float)
    g.add_argument("--adam-eps", type=float)
    g.add_argument("--hf-adam-eps", type=int, choices=[0, 1], help="1: eps added to the uncorrected sqrt(v) (transformers.AdamW)")
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--batch-size", type=int)
    g.add_argument("--grad-accum", type=int)
    g.add_argument("--warmup", type=float, help="warmup steps (>= 1) or fraction of steps (< 1)")
    g.add_argument("--lr-schedule", choices=["constant", "linear", "cosine"])
    g.add_argument("--max-grad-norm", type=float, help="0: no clipping")
    g.add_argument("--fp32-optimizer-state", action=argparse.BooleanOptionalAction,
                   help="fp32 Adam moments and master weights (default: off)")
    g.add_argument("--forget-max-len", help="max tokens per forget document, one per topic (last repeats)")
    g.add_argument("--retain-max-len", type=int)
    r = p.add_argument_group("RMU")
    r.add_argument("--max-num-batches", type=int)
    r.add_argument("--steering-coeffs", help="one per topic (last repeats)")
    r.add_argument("--alpha", help="retain weight, one per topic (last repeats)")
    r.add_argument("--layer-id", type=int, help="steering layer (activation after this decoder layer)")
    r.add_argument("--layer-ids", help="layers whose --params are trained")
    r.add_argument("--params", help="trained matrices inside each layer, comma list (mlp.down_proj)")
    r.add_argument("--masked-loss", action=argparse.BooleanOptionalAction,
                   help="MSE over real tokens other than BOS (reference: all positions, padding and BOS included; "
                        "the toy's default: on)")
    n = p.add_argument_group("NPO / SimNPO / GradDiff")
    n.add_argument("--beta", type=float)
    n.add_argument("--gamma", type=float, help="retain term weight")
    n.add_argument("--delta", type=float, help="SimNPO margin")
    n.add_argument("--retain-loss", choices=["gd", "kl", "none"])
    n.add_argument("--npo-mean-tokens", action=argparse.BooleanOptionalAction,
                   help="token-mean log-probs in NPO (WMDP runs) (default: off)")
    n.add_argument("--chunk-tokens", type=int, help="split documents into pieces of N tokens (MUSE); 0: truncate")
    return p


def is_toy(model_dir) -> bool:
    try:
        return Path(model_dir).resolve() == (TOY_DIR / "model").resolve()
    except OSError:
        return False


def toy_defaults(method) -> dict:
    """data/toy/defaults.json: {"rmu": {...}, "npo": {...}} or a flat dict (RMU). Keys as our flags
    (underscores), with the reference's spellings accepted (steering_coeff(s), layer_ids as a list, ...)."""
    path = TOY_DIR / "defaults.json"
    if not path.is_file():  # the reference's 7B values do nothing useful on an 8-layer toy: refuse, do not guess
        raise UnlearnError(f"{path}: missing; it holds the toy model's tuned hyperparameters (restore it with git)")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UnlearnError(f"{path}: not valid JSON ({e})") from None
    fam = "rmu" if method == "rmu" else "npo"
    if any(k in raw for k in METHODS + ("npo_family",)):
        sect = raw.get(method) or raw.get(fam) or raw.get("npo_family") or {}
    else:
        sect = raw if method == "rmu" else {}
    known = set(REAL_RMU) | set(REAL_NPO) | {"steps"} | set(BOOL_FLAGS)
    out = {}
    for k, v in sect.items():
        k = k.replace("-", "_")
        k = {"steering_coeff": "steering_coeffs", "max_len": "forget_max_len", "retain_len": "retain_max_len",
             "eps": "adam_eps", "max_num_steps": "max_num_batches", "retain_coeff": "gamma"}.get(k, k)
        if k not in known:  # notes, measured results, selection settings: not hyperparameters of the run
            continue
        if isinstance(v, list):
            v = ",".join(str(x) for x in v)
        out[k] = v
    return out


def resolve_args(args) -> argparse.Namespace:
    """Fill per-method and toy defaults into a copy of args; validate what can be checked without files."""
    a = argparse.Namespace(**vars(args))
    if a.method not in METHODS:
        raise UnlearnError(f"--method: unknown method {a.method!r} (expected one of {', '.join(METHODS)})")
    toy = is_toy(a.model)
    base = dict(REAL_RMU if a.method == "rmu" else REAL_NPO)
    if toy:
        base.update(toy_defaults(a.method))
    for k, v in base.items():  # toy's own, else the reference's; explicit flags win
        if getattr(a, k, None) is None:
            setattr(a, k, v)
    for k, v in (REAL_RMU | REAL_NPO).items():  # the other family's flags stay defined
        if k != "steps" and getattr(a, k, None) is None:
            setattr(a, k, v)
    for k in BOOL_FLAGS:  # --x / --no-x: unset means off unless the toy's defaults say otherwise
        setattr(a, k, bool(getattr(a, k, None)))
    a.toy = toy
    if toy and not (TOY_DIR / "model" / "config.json").is_file():
        raise UnlearnError(f"{TOY_DIR / 'model'}: the embedded toy model is not built; run `make toy`")
    if a.forget is None:
        if not toy:
            raise UnlearnError("--forget: required unless --model is the embedded toy (data/toy/model)")
        a.forget = str(TOY_DIR / "forget_corpus.jsonl")
    if a.retain is None:
        if not toy:
            raise UnlearnError("--retain: required unless --model is the embedded toy (data/toy/model)")
        a.retain = str(TOY_DIR / "retain_corpus.jsonl")
    if a.data is None:
        a.data = str(TOY_DIR) if toy else "."
    if a.eval_tasks is None:
        a.eval_tasks = TOY_TASKS if toy else "none"
    a.tasks = [] if str(a.eval_tasks).strip().lower() in ("", "none") else \
        [t.strip() for t in str(a.eval_tasks).split(",") if t.strip()]
    if a.ratio is not None and not a.ratio > 0:
        raise UnlearnError(f"--ratio: expected a fraction in (0, 1] or a count > 1, got {a.ratio}")
    if a.ratio is not None and a.ratio > 1 and a.ratio != int(a.ratio):
        raise UnlearnError(f"--ratio: above 1 it is a document count and must be a whole number, got {a.ratio}")
    for k in ("batch_size", "grad_accum"):
        if int(getattr(a, k)) < 1:
            raise UnlearnError(f"--{k.replace('_', '-')}: expected an integer >= 1, got {getattr(a, k)}")
    if a.steps is not None and int(a.steps) < 1:
        raise UnlearnError(f"--steps: expected an integer >= 1, got {a.steps}")
    if not a.lr > 0:
        raise UnlearnError(f"--lr: expected > 0, got {a.lr}")
    a.forget_files = [f.strip() for f in str(a.forget).split(",") if f.strip()]
    a.retain_files = [f.strip() for f in str(a.retain).split(",") if f.strip()]
    if not a.forget_files or not a.retain_files:
        raise UnlearnError("--forget/--retain: expected at least one file")
    if len(a.retain_files) not in (1, len(a.forget_files)):
        raise UnlearnError(f"--retain: expected one file or one per forget file ({len(a.forget_files)}), "
                           f"got {len(a.retain_files)}")
    a.layer_ids_list = int_list(a.layer_ids, "--layer-ids")
    a.params_list = [s.strip() for s in str(a.params).split(",") if s.strip()]
    if a.method == "rmu":
        if max(a.layer_ids_list) > a.layer_id or min(a.layer_ids_list) < 0:
            raise UnlearnError(f"--layer-ids {a.layer_ids}: expected layers in 0..--layer-id ({a.layer_id}); "
                               "later layers cannot change the steered activation")
    a.device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return a


def int_list(s, flag):
    try:
        return [int(x) for x in str(s).split(",") if x.strip()]
    except ValueError:
        raise UnlearnError(f"{flag}: expected comma-separated integers, got {s!r}") from None


def float_list(s, flag, n):
    """One value per topic; the last value repeats."""
    try:
        vals = [float(x) for x in str(s).split(",") if x.strip()]
    except ValueError:
        raise UnlearnError(f"{flag}: expected comma-separated numbers, got {s!r}") from None
    if not vals:
        raise UnlearnError(f"{flag}: expected at least one number")
    return [vals[min(i, len(vals) - 1)] for i in range(n)]


# ----------------------------------------------------------------------------------------------- coreset

def random_subset(n: int, ratio: float, seed: int, topic: int = 0) -> list:
    """Seeded random document indices of one forget file (sorted): ratio <= 1 a fraction (at least one
    document), > 1 a count (at most the whole file). The same draw as coreset.py --method random."""
    if not ratio > 0:
        raise UnlearnError(f"--ratio: expected > 0, got {ratio}")
    k = max(1, min(n, round(ratio * n) if ratio <= 1 else int(ratio)))
    rng = random.Random(seed * 1_000_003 + topic)
    return sorted(rng.sample(range(n), k))


def read_coreset(path, forget_files, sizes) -> list:
    """coreset.py's JSONL -> sorted index list per forget file. Every line must name one of the forget files
    (as given on the command line, or the same file by path) with an in-range, unique index."""
    path = str(path)
    if not os.path.isfile(path):
        raise UnlearnError(f"--coreset: missing file {path}")
    by_name = {f: i for i, f in enumerate(forget_files)}
    by_real = {os.path.realpath(f): i for i, f in enumerate(forget_files)}
    sel = [set() for _ in forget_files]
    with open(path, encoding="utf-8") as fh:
        for ln, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UnlearnError(f"{path}:{ln}: expected a JSON object per line ({e.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("file"), str) or \
                    isinstance(obj.get("index"), bool) or not isinstance(obj.get("index"), int):
                raise UnlearnError(f'{path}:{ln}: expected {{"file": str, "index": int, "score": float|null}}')
            score = obj.get("score")
            if score is not None and (isinstance(score, bool) or not isinstance(score, (int, float))):
                raise UnlearnError(f"{path}:{ln}: expected 'score' to be a number or null, got {score!r}")
            t = by_name.get(obj["file"], by_real.get(os.path.realpath(obj["file"])))
            if t is None:
                raise UnlearnError(f"{path}:{ln}: file {obj['file']!r} is not one of --forget "
                                   f"({', '.join(forget_files)})")
            i = obj["index"]
            if not 0 <= i < sizes[t]:
                raise UnlearnError(f"{path}:{ln}: index {i} out of range for {forget_files[t]} ({sizes[t]} documents)")
            if i in sel[t]:
                raise UnlearnError(f"{path}:{ln}: duplicate index {i} for {forget_files[t]}")
            sel[t].add(i)
    for t, s in enumerate(sel):
        if not s:
            raise UnlearnError(f"{path}: selects no document of forget file {forget_files[t]}")
    return [sorted(s) for s in sel]


def select(args, forget_docs) -> list:
    """Per forget file the selected document indices: --coreset, --ratio, or all."""
    sizes = [len(d) for d in forget_docs]
    if args.coreset:
        return read_coreset(args.coreset, args.forget_files, sizes)
    if args.ratio is not None:
        return [random_subset(n, args.ratio, args.seed, t) for t, n in enumerate(sizes)]
    return [list(range(n)) for n in sizes]


# ----------------------------------------------------------------------------------------------- batches

class Batches:
    """Documents -> batches of `size` in order, tokenized on first use (add_special_tokens as the tokenizer
    says, truncated on the right to max_len), padded on `side` with pad_id. With chunk > 0 every document is
    split into pieces of `chunk` tokens first (tokenized eagerly)."""

    def __init__(self, tok, docs, size, max_len, pad_id, side, chunk=0):
        self.tok, self.size, self.max_len, self.pad_id, self.side = tok, size, max_len, pad_id, side
        if chunk:
            pieces = []
            for ids in tok.encode_batch(docs):
                pieces += [ids[a:a + chunk] for a in range(0, len(ids), chunk)]
            self.seqs, self.docs = pieces, None
        else:
            self.seqs, self.docs = None, docs
        self.memo = {}
        n = len(self.seqs if chunk else docs)
        self.n = -(-n // size)

    def __len__(self):
        return self.n

    def tokens(self, b):
        if b not in self.memo:
            if self.seqs is not None:
                seqs = self.seqs[b * self.size:(b + 1) * self.size]
            else:
                seqs = [s[:self.max_len] for s in self.tok.encode_batch(self.docs[b * self.size:(b + 1) * self.size])]
            self.memo[b] = seqs
        return self.memo[b]

    def __getitem__(self, b):
        return self.tok.pad(self.tokens(b % self.n), self.side, pad_id=self.pad_id)


def schedule(steps, accum, n_topics, n_forget, n_retain, retain_of=None):
    """Micro-batch plan: list over optimizer steps of lists of (topic, forget batch, retain file, retain batch).
    Micro-batch m: topic m % n_topics, its k = m // n_topics-th batch, cycled over the topic's batches; the
    retain batch of the same k (the reference's pairing) from retain file retain_of[topic] (default: the topic's
    own, or the only one)."""
    if retain_of is None:
        retain_of = list(range(n_topics)) if len(n_retain) > 1 else [0] * n_topics
    plan = []
    for s in range(steps):
        micro = []
        for j in range(accum):
            m = s * accum + j
            t, k = m % n_topics, m // n_topics
            r = retain_of[t]
            micro.append((t, k % n_forget[t], r, k % n_retain[r]))
        plan.append(micro)
    return plan


def reference_steps(args, n_full_forget_docs, n_retain_docs):
    """RMU's step count: min(max_num_batches, batches of the smallest forget file (full), of the smallest retain)."""
    bs = args.batch_size
    return min(args.max_num_batches, min(-(-n // bs) for n in n_full_forget_docs), min(-(-n // bs) for n in n_retain_docs))


# ----------------------------------------------------------------------------------------------- optimizer

class AdamW(torch.optim.Optimizer):
    """AdamW with two options: hf_eps (eps added to the uncorrected sqrt(v), as transformers.AdamW, which the RMU
    reference uses) and fp32_state (fp32 moments and fp32 master weights for bf16/fp16 parameters)."""

    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, hf_eps=False, fp32_state=False):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, hf_eps=hf_eps,
                                      fp32_state=fp32_state))

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            lr, (b1, b2), eps, wd = g["lr"], g["betas"], g["eps"], g["weight_decay"]
            for p in g["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    sdt = torch.float32 if g["fp32_state"] else p.dtype
                    st["step"] = 0
                    st["exp_avg"] = torch.zeros_like(p, dtype=sdt)
                    st["exp_avg_sq"] = torch.zeros_like(p, dtype=sdt)
                    if g["fp32_state"] and p.dtype != torch.float32:
                        st["master"] = p.detach().float().clone()
                st["step"] += 1
                t, m, v = st["step"], st["exp_avg"], st["exp_avg_sq"]
                w = st.get("master", p)
                grad = p.grad.to(m.dtype)
                m.mul_(b1).add_(grad, alpha=1 - b1)
                v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
                bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
                if g["hf_eps"]:
                    denom, step_size = v.sqrt().add_(eps), lr * math.sqrt(bc2) / bc1
                else:
                    denom, step_size = (v.sqrt() / math.sqrt(bc2)).add_(eps), lr / bc1
                if wd:
                    w.mul_(1 - lr * wd)
                w.addcdiv_(m, denom, value=-step_size)
                if w is not p:
                    p.copy_(w)


def lr_at(step, steps, base, warmup, schedule_name):
    """Learning rate of optimizer step `step` (0-based): linear warmup, then constant / linear / cosine decay."""
    w = int(round(warmup * steps)) if 0 < warmup < 1 else int(warmup)
    if w and step < w:
        return base * (step + 1) / w
    if schedule_name == "constant":
        return base
    prog = (step - w) / max(1, steps - w)
    return base * (1 - prog) if schedule_name == "linear" else base * 0.5 * (1 + math.cos(math.pi * prog))


def trainable(model, method, layer_ids, params) -> dict:
    """name -> parameter trained: RMU the listed matrices of the listed layers; NPO family everything."""
    named = dict(model.named_parameters())
    if method != "rmu":
        return named
    out = {}
    for i in layer_ids:
        if i >= model.config.num_hidden_layers:
            raise UnlearnError(f"--layer-ids: layer {i} does not exist (the model has {model.config.num_hidden_layers})")
        for pn in params:
            name = f"model.layers.{i}.{pn}.weight"
            if name not in named:
                raise UnlearnError(f"--params: no parameter {name} (expected e.g. mlp.down_proj, self_attn.o_proj)")
            out[name] = named[name]
    return out


def build(args, model):
    """The one place where what is trained and its optimizer are decided (an FSDP wrapper would go here)."""
    model.requires_grad_(False)
    train = trainable(model, args.method, args.layer_ids_list, args.params_list)
    for p in train.values():
        p.requires_grad_(True)
    opt = AdamW(list(dict.fromkeys(train.values())), lr=args.lr, eps=args.adam_eps, weight_decay=args.weight_decay,
                hf_eps=bool(args.hf_adam_eps), fp32_state=args.fp32_optimizer_state)
    return train, opt


# ----------------------------------------------------------------------------------------------- RMU

def control_vectors(n_topics, d, coeffs, generator, dtype, device):
    """Per topic c = coeff * u / ||u||, u ~ U[0, 1)^d, shape (1, 1, d) (the reference draws in model dtype)."""
    out = []
    for t in range(n_topics):
        u = torch.rand(1, 1, d, generator=generator).to(dtype)
        out.append((u / torch.norm(u) * coeffs[t]).to(device))
    return out


def mse(a, b, mask=None):
    """Mean squared error in fp32 over (B, T, d); with mask (B, T) over real tokens only."""
    diff = (a.float() - b.float()) ** 2
    if mask is None:
        return diff.mean()
    m = mask[..., None].to(diff.dtype)
    return (diff * m).sum() / (m.sum() * a.shape[-1]).clamp_min(1)


class RMU:
    """RMU's forward passes with a shared, gradient-free trunk and a frozen path made of copies of the trained
    matrices only. loss(...) is the reference loss; the activations equal full-model ones exactly."""

    def __init__(self, model, train: dict, layer_id: int, layer_ids: list):
        self.model, self.L, self.lo = model, layer_id, min(layer_ids)
        self.frozen = {n: p.detach().clone() for n, p in train.items()}  # only the trained matrices

    def trunk(self, ids, mask):
        """(B, T, d) input of layer lo (output of layer lo - 1), no gradients."""
        with torch.no_grad():
            if self.lo == 0:
                return self.model.model.embed_tokens(ids)
            return self.model(ids, mask, until_layer=self.lo - 1)

    def updated(self, h, mask):
        return self.model(hidden_states=h, attention_mask=mask, from_layer=self.lo, until_layer=self.L)

    def frozen_acts(self, h, mask):
        with torch.no_grad():
            return torch.func.functional_call(self.model, self.frozen, (), dict(
                hidden_states=h, attention_mask=mask, from_layer=self.lo, until_layer=self.L), strict=False)

    def loss(self, f_h, f_mask, c, r_h, r_mask, r_target, alpha, f_counted=None, r_counted=None):
        """-> (loss, forget term, retain term before alpha). f_h / r_h: trunk outputs; r_target: frozen acts;
        f_counted / r_counted: (B, T) positions the MSE averages over (None: all positions, as the reference)."""
        act_f = self.updated(f_h, f_mask)                         # (B, Tf, d)
        lf = mse(act_f, c.expand_as(act_f), f_counted)
        act_r = self.updated(r_h, r_mask)                         # (B, Tr, d)
        lr_ = mse(act_r, r_target, r_counted)
        return lf + alpha * lr_, lf, lr_


def content_positions(ids, mask, bos_id):
    """(B, T) bool: real tokens other than BOS. The BOS activation is the same in every document (nothing
    precedes it), so the forget term would push it to c while the retain term holds it: a pure conflict."""
    keep = mask.bool()
    return keep & (ids != bos_id) if bos_id is not None else keep


class ActCache:
    """Keeps values of keys that will be asked for again (uses counted ahead), within a byte budget."""

    def __init__(self, uses: dict, budget_bytes: float):
        self.left, self.budget, self.used, self.store = dict(uses), budget_bytes, 0, {}
        self.hits = 0

    def get(self, key, fn):
        self.left[key] = self.left.get(key, 1) - 1
        if key in self.store:
            self.hits += 1
            val = self.store[key]
            if self.left[key] <= 0:
                del self.store[key]
                self.used -= nbytes(val)
            return val
        val = fn()
        if self.left[key] > 0 and self.used + nbytes(val) <= self.budget:
            self.store[key] = val
            self.used += nbytes(val)
        return val


def nbytes(val):
    return sum(v.numel() * v.element_size() for v in val if isinstance(v, torch.Tensor))


# ----------------------------------------------------------------------------------------------- NPO family

def shift_targets(ids, mask):
    """(B, T) next-token targets, -100 at padding and at the last position."""
    tgt = torch.full_like(ids, -100)
    tgt[:, :-1] = torch.where(mask[:, 1:].bool(), ids[:, 1:], -100)
    return tgt


def npo_loss_fn(beta):
    return lambda lp, ref: -(2.0 / beta) * F.logsigmoid(-beta * (lp - ref))


def simnpo_loss_fn(beta, delta):
    return lambda lp: -(2.0 / beta) * F.logsigmoid(-beta * lp - delta)  # lp is the token mean here


def sequence_logps(model, ids, mask):
    """Per-sequence (sum of target log-probs (B,), number of targets (B,)), no gradients."""
    from lpkernels import fused_logprob
    with torch.no_grad():
        h = model(ids, mask, output="hidden")                                   # (B, T, d)
        tgt = shift_targets(ids, mask)
        lp = fused_logprob(h, model.lm_head_weight, tgt)                        # (B, T) fp32
        return lp.sum(-1), (tgt != -100).sum(-1).float()


def kl_ref_current(h, W, h_ref, W_ref, chunk=1024):
    """mean over rows of KL(p_ref || p_cur), p = softmax(h @ W.T); chunked and recomputed in backward."""
    from torch.utils.checkpoint import checkpoint

    def part(hc, hrc):
        lc = torch.log_softmax((hc @ W.T).float(), -1)                          # (n, V)
        lr = torch.log_softmax((hrc @ W_ref.T).float(), -1)
        return (lr.exp() * (lr - lc)).sum()
    total = h.new_zeros((), dtype=torch.float32)
    for a in range(0, h.shape[0], chunk):
        total = total + checkpoint(part, h[a:a + chunk], h_ref[a:a + chunk], use_reentrant=False)
    return total / max(1, h.shape[0])


def forget_loss(method, model, ids, mask, beta, delta, mean_tokens, ref=None):
    """The forget term of one batch through lpkernels.fused_sequence_loss. ref: (B,) reference log-probs (NPO)."""
    from lpkernels import fused_sequence_loss
    h = model(ids, mask, output="hidden")                                       # (B, T, d)
    B, T, d = h.shape
    tgt = shift_targets(ids, mask).reshape(-1)
    h = h.reshape(B * T, d)
    W = model.lm_head_weight
    if method == "npo":
        return fused_sequence_loss(h, W, tgt, [T] * B, npo_loss_fn(beta), extras=(ref,), mean_tokens=mean_tokens)
    if method == "simnpo":
        return fused_sequence_loss(h, W, tgt, [T] * B, simnpo_loss_fn(beta, delta), mean_tokens=True)
    if method == "graddiff":  # -CE: + mean log-prob over all tokens of the batch (one "sequence")
        return fused_sequence_loss(h, W, tgt, [B * T], lambda lp: lp, mean_tokens=True)
    raise UnlearnError(f"--method: unknown method {method!r}")


def retain_ce(model, ids, mask):
    from lpkernels import fused_sequence_loss
    h = model(ids, mask, output="hidden")
    B, T, d = h.shape
    return fused_sequence_loss(h.reshape(B * T, d), model.lm_head_weight, shift_targets(ids, mask).reshape(-1),
                               [B * T], lambda lp: -lp, mean_tokens=True)


def retain_kl(model, ids, mask, ref_h, W_ref):
    h = model(ids, mask, output="hidden")
    keep = shift_targets(ids, mask) != -100                                     # (B, T)
    return kl_ref_current(h[keep], model.lm_head_weight, ref_h.to(h.device, h.dtype), W_ref)


# ----------------------------------------------------------------------------------------------- training

def finish_step(step, args, params, opt, bar, hist, parts_hist, tot, tf, tr):
    """The end of every training step: stop on a non-finite loss, clip, step, record the losses, update the bar."""
    check_finite(step, tot, {"forget": tf, "retain": tr})
    if args.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
    opt.step()
    hist.append(tot)
    parts_hist.append({"forget": tf, "retain": tr})
    bar.set_postfix(loss=f"{tot:.4g}", forget=f"{tf:.4g}", retain=f"{tr:.3g}")
    bar.update(1)


def check_finite(step, loss, parts):
    if not math.isfinite(loss):
        detail = ", ".join(f"{k} {v:.4g}" for k, v in parts.items())
        raise UnlearnError(f"step {step}: loss is {loss} ({detail}); stopped, no checkpoint written "
                           "(try a lower --lr or --max-grad-norm)")


def peak_memory(device):
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated()
    try:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    except Exception:
        return None


def progress_bar(total, desc, disable):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="step", disable=disable, dynamic_ncols=True)


def train_rmu(args, model, tok, forget_sel, retain_docs, train, opt, device):
    n_topics = len(forget_sel)
    coeffs = float_list(args.steering_coeffs, "--steering-coeffs", n_topics)
    alphas = float_list(args.alpha, "--alpha", n_topics)
    max_lens = [int(x) for x in float_list(args.forget_max_len, "--forget-max-len", n_topics)]
    pad = tok.eos_token_id if tok.eos_token_id is not None else tok.pad_token_id  # reference: pad = eos
    fb = [Batches(tok, docs, args.batch_size, max_lens[t], pad, "left") for t, docs in enumerate(forget_sel)]
    rb = [Batches(tok, docs, args.batch_size, args.retain_max_len, pad, "left") for docs in retain_docs]
    plan = schedule(args.steps, args.grad_accum, n_topics, [len(b) for b in fb], [len(b) for b in rb], args.retain_of)
    gen = torch.Generator().manual_seed(args.seed)
    cvec = control_vectors(n_topics, model.config.hidden_size, coeffs, gen, model.lm_head_weight.dtype, device)
    rmu = RMU(model, train, args.layer_id, args.layer_ids_list)
    bos = tok.bos_token_id  # a special token: in a document only as the BOS the tokenizer adds
    counted = (lambda ids, mask: content_positions(ids, mask, bos)) if args.masked_loss else (lambda ids, mask: None)
    uses = {}
    for micro in plan:
        for t, f, r, rr in micro:
            uses[("f", t, f)] = uses.get(("f", t, f), 0) + 1
            uses[("r", r, rr)] = uses.get(("r", r, rr), 0) + 1
    cache = ActCache(uses, args.cache_gib * 2**30)
    params = list(train.values())
    hist, parts_hist = [], []
    model.train()
    bar = progress_bar(args.steps, "rmu", args.no_progress)
    for s, micro in enumerate(plan):
        for g in opt.param_groups:
            g["lr"] = lr_at(s, args.steps, args.lr, args.warmup, args.lr_schedule)
        opt.zero_grad(set_to_none=True)
        tot, tf, tr = 0.0, 0.0, 0.0
        for t, f, r, rr in micro:
            def fwd_f():
                ids, mask = (x.to(device) for x in fb[t][f])
                return rmu.trunk(ids, mask), mask, counted(ids, mask)

            def fwd_r():
                ids, mask = (x.to(device) for x in rb[r][rr])
                h = rmu.trunk(ids, mask)
                return h, mask, rmu.frozen_acts(h, mask), counted(ids, mask)
            f_h, f_mask, f_cnt = cache.get(("f", t, f), fwd_f)
            r_h, r_mask, r_tgt, r_cnt = cache.get(("r", r, rr), fwd_r)
            loss, lf, lr_ = rmu.loss(f_h, f_mask, cvec[t], r_h, r_mask, r_tgt, alphas[t], f_cnt, r_cnt)
            (loss / len(micro)).backward()
            tot, tf, tr = tot + loss.item() / len(micro), tf + lf.item() / len(micro), tr + lr_.item() / len(micro)
        finish_step(s, args, params, opt, bar, hist, parts_hist, tot, tf, tr)
    bar.close()
    model.eval()
    return hist, parts_hist, {"cache_hits": cache.hits, "steering_coeffs": coeffs, "alphas": alphas}


def train_npo(args, model, tok, forget_sel, retain_docs, train, opt, device):
    n_topics = len(forget_sel)
    max_lens = [int(x) for x in float_list(args.forget_max_len, "--forget-max-len", n_topics)]
    pad = tok.pad_token_id
    chunk = int(args.chunk_tokens or 0)
    fb = [Batches(tok, docs, args.batch_size, max_lens[t], pad, "right", chunk) for t, docs in enumerate(forget_sel)]
    rb = [Batches(tok, docs, args.batch_size, args.retain_max_len, pad, "right", chunk) for docs in retain_docs]
    plan = schedule(args.steps, args.grad_accum, n_topics, [len(b) for b in fb], [len(b) for b in rb], args.retain_of)
    # reference quantities, once, before any update
    ref, ref_h, W_ref = {}, {}, None
    if args.method == "npo":
        for t, f in sorted({(t, f) for micro in plan for t, f, _, _ in micro}):
            ids, mask = (x.to(device) for x in fb[t][f])
            lp_sum, ntok = sequence_logps(model, ids, mask)
            ref[(t, f)] = lp_sum / ntok.clamp_min(1) if args.npo_mean_tokens else lp_sum
    if args.retain_loss == "kl":
        W_ref = model.lm_head_weight.detach().clone()
        with torch.no_grad():
            for r, rr in sorted({(r, rr) for micro in plan for _, _, r, rr in micro}):
                ids, mask = (x.to(device) for x in rb[r][rr])
                h = model(ids, mask, output="hidden")
                ref_h[(r, rr)] = h[shift_targets(ids, mask) != -100].to("cpu")
    params = list(train.values())
    hist, parts_hist = [], []
    model.train()
    bar = progress_bar(args.steps, args.method, args.no_progress)
    for s, micro in enumerate(plan):
        for g in opt.param_groups:
            g["lr"] = lr_at(s, args.steps, args.lr, args.warmup, args.lr_schedule)
        opt.zero_grad(set_to_none=True)
        tot, tf, tr = 0.0, 0.0, 0.0
        for t, f, r, rr in micro:
            ids, mask = (x.to(device) for x in fb[t][f])
            lf = forget_loss(args.method, model, ids, mask, args.beta, args.delta, args.npo_mean_tokens, ref.get((t, f)))
            loss = lf
            lr_ = torch.zeros(())
            if args.retain_loss != "none" and args.gamma:
                rids, rmask = (x.to(device) for x in rb[r][rr])
                lr_ = retain_ce(model, rids, rmask) if args.retain_loss == "gd" else \
                    retain_kl(model, rids, rmask, ref_h[(r, rr)], W_ref)
                loss = lf + args.gamma * lr_
            (loss / len(micro)).backward()
            tot, tf, tr = tot + loss.item() / len(micro), tf + lf.item() / len(micro), tr + lr_.item() / len(micro)
        finish_step(s, args, params, opt, bar, hist, parts_hist, tot, tf, tr)
    bar.close()
    model.eval()
    return hist, parts_hist, {"n_reference_batches": len(ref)}


# ----------------------------------------------------------------------------------------------- evaluation

def eval_key(args, dtype):
    """Cache key of the base model's evaluation: model and task files (size, mtime), tasks, limit, dtype."""
    from data import MUSE_DIRS, DataError, resolve_task
    from evaluate import MUSE_TASKS
    mdir = Path(args.model).resolve()
    files = [f for f in mdir.iterdir() if f.suffix in (".safetensors", ".json")]
    for t in args.tasks:  # the question files too: a regenerated benchmark must not hit an old entry
        if t in MUSE_TASKS:
            files += Path(args.data, MUSE_DIRS[MUSE_TASKS[t]]).glob("*")
            continue
        try:
            files.append(Path(resolve_task(t, args.data)[1]))
        except DataError:  # missing: the evaluation itself reports it
            pass
    stamp = sorted((str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file())
    blob = json.dumps([stamp, args.tasks, args.eval_limit, str(dtype)])
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def summarize(res):
    """evaluate_tasks' output -> {task: {acc, acc_stderr, n, subjects, ...}} without per-sample data."""
    return {t: {k: v for k, v in r.items() if not isinstance(v, list)} for t, r in res["results"].items()}


def evaluate(args, model, tok, dtype, base: bool):
    from evaluate import evaluate_tasks
    cache = Path(args.out).resolve().parent / ".eval_cache" / f"{eval_key(args, dtype)}.json" if base else None
    if cache is not None and not args.no_eval_cache and cache.is_file():
        try:
            return json.loads(cache.read_text())["results"], True
        except (json.JSONDecodeError, KeyError):
            pass
    res = summarize(evaluate_tasks(model, tok, args.data, args.tasks, batch_size=args.eval_batch_size,
                                   limit=args.eval_limit, progress=not args.no_progress))
    if cache is not None:
        from model import atomic_write_json
        atomic_write_json(cache, {"model": str(Path(args.model).resolve()), "tasks": args.tasks,
                                  "limit": args.eval_limit, "dtype": str(dtype), "results": res})
    return res, False


MUSE_COLUMNS = ("verbmem_f", "knowmem_f", "knowmem_r", "privleak")


def columns(task, res):
    """(header, value) pairs of one task's results for the table: acc in %, MUSE metrics as they are (x100)."""
    if isinstance(res.get("acc"), (int, float)):
        return [(task, 100 * res["acc"])]
    return [(f"{task}:{k}", res[k]) for k in MUSE_COLUMNS if isinstance(res.get(k), (int, float))]


def format_table(before, after, method, steps, train_s):
    """Markdown table: one row per model (base, unlearned), one column per task metric, then steps and time."""
    tasks = list(before)  # as evaluate.py names them (a task given as a file path is named by its stem)
    cols = [h for t in tasks for h, _ in columns(t, before[t])]
    row = lambda res: [f"{v:.1f}" for t in tasks for _, v in columns(t, res[t])]
    head = ["model"] + cols + ["steps", "time"]
    rows = [["base"] + row(before) + ["-", "-"]]
    if after is not None:
        rows.append([method] + row(after) + [str(steps), f"{train_s:.0f}s"])
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(head), sep] + [line(r) for r in rows])


# ----------------------------------------------------------------------------------------------- run

def run(args) -> dict:
    """One unlearning run from parsed arguments -> the run record (also written to <out>/run.json)."""
    from data import read_corpora
    from model import Transformer, atomic_write_json, default_dtype, load_tokenizer, run_info
    t_start = time.time()
    a = resolve_args(args)
    device = torch.device(a.device)
    dtype = getattr(torch, a.dtype) if a.dtype else default_dtype(device)
    info = run_info({k: v for k, v in vars(a).items()})
    forget_docs = read_corpora(a.forget_files, a.min_chars)
    uniq = list(dict.fromkeys(os.path.realpath(f) for f in a.retain_files))  # wikitext,wikitext: one corpus
    retain_docs = read_corpora([a.retain_files[[os.path.realpath(f) for f in a.retain_files].index(u)] for u in uniq],
                               a.min_chars)
    per_topic = a.retain_files if len(a.retain_files) > 1 else a.retain_files * len(a.forget_files)
    a.retain_of = [uniq.index(os.path.realpath(f)) for f in per_topic]
    sel = select(a, forget_docs)
    forget_sel = [[docs[i] for i in idx] for docs, idx in zip(forget_docs, sel)]
    if a.steps is None:  # RMU: the reference's count on the full forget set (a coreset is cycled)
        a.steps = reference_steps(a, [len(d) for d in forget_docs], [len(d) for d in retain_docs])
    a.steps = int(a.steps)
    torch.manual_seed(a.seed)
    model = Transformer.from_pretrained(a.model, dtype=dtype, device=device)
    tok = load_tokenizer(a.model)
    out = Path(a.out)
    if a.tasks:  # resolve the tasks before training: a typo fails now, not after the run
        from evaluate import load_mc_task
        for t in a.tasks:
            if not t.startswith("muse_"):
                load_mc_task(t, a.data, 1)
    before = after = None
    before_cached = False
    if a.tasks:
        before, before_cached = evaluate(a, model, tok, dtype, base=True)
    train, opt = build(a, model)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    trainer = train_rmu if a.method == "rmu" else train_npo
    hist, parts, extra = trainer(a, model, tok, forget_sel, retain_docs, train, opt, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    train_s = time.time() - t0
    record = {
        **info, "method": a.method, "seed": a.seed, "toy": a.toy, "steps": a.steps, "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "coreset": {"source": a.coreset or ("ratio" if a.ratio is not None else "all"), "ratio": a.ratio,
                    "files": a.forget_files, "n_docs": [len(d) for d in forget_docs],
                    "n_selected": [len(i) for i in sel], "indices": sel},
        "trained_params": list(train), "loss": hist, "loss_parts": parts, **extra,
        "train_s": round(train_s, 3), "steps_per_s": a.steps / train_s if train_s > 0 else None,
        "peak_memory_bytes": peak_memory(device),
        "checkpoint": None if a.no_save else str(out / "model"),
        "eval": {"tasks": a.tasks, "before": before, "before_cached": before_cached, "after": None},
    }
    record["args"] = {k: v for k, v in vars(args).items()}
    record["resolved_args"] = {k: v for k, v in vars(a).items()}
    if not a.no_save:
        model.save_pretrained(out / "model", tokenizer_dir=a.model)
    atomic_write_json(out / "run.json", record)
    if a.tasks:
        after, _ = evaluate(a, model, tok, dtype, base=False)
        record["eval"]["after"] = after
    record["time_s"] = round(time.time() - t_start, 3)
    atomic_write_json(out / "run.json", record)
    if a.tasks:
        print(format_table(before, after, a.method, a.steps, train_s))
    print(f"unlearn: {a.method} {a.steps} steps in {train_s:.1f}s ({a.steps / max(train_s, 1e-9):.2f} steps/s), "
          f"{sum(len(i) for i in sel)} forget docs; wrote {out / 'run.json'}"
          + ("" if a.no_save else f" and {out / 'model'}"))
    return record


# ----------------------------------------------------------------------------------------------- bench

ZEPHYR_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5,
                 rope_theta=10000.0, max_position_embeddings=32768, architecture="MistralForCausalLM")


def random_model(cfg, device, dtype, seed=0):
    """A Transformer with random weights built straight on `device` in `dtype` (no fp32 copy)."""
    from model import Transformer
    with torch.device("meta"):
        m = Transformer(cfg)
    m = m.to(dtype).to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
    return m.eval()


def bench_rmu(cfg, device, dtype, steps=10, warmup=2, batch=4, seq=512, layer_id=7, layer_ids=(5, 6, 7),
              paired=False):
    """RMU steps, timed: the reference design (two full models, full forwards with the activation taken by a hook,
    every parameter requiring grad as in Hugging Face, optimizer over the trained matrices) vs ours (train_rmu's
    code path). paired=False: every step has fresh batches (nothing reusable). paired=True: the reference's
    two-topic schedule, where the retain batch of step i is batch i // 2 (wikitext passed once per topic), which
    ours reuses through its activation cache and the reference recomputes.
    -> dict with ms/step, peak memory and the losses of both (they should agree)."""
    import gc
    device = torch.device(device)
    g = torch.Generator().manual_seed(0)
    n = warmup + steps
    data = dict(
        fids=[torch.randint(0, cfg.vocab_size, (batch, seq), generator=g).to(device) for _ in range(n)],
        rids=[torch.randint(0, cfg.vocab_size, (batch, seq), generator=g).to(device) for _ in range(n)],
        ridx=[i // 2 if paired else i for i in range(n)],
        mask=torch.ones(batch, seq, dtype=torch.long, device=device),
        c=control_vectors(1, cfg.hidden_size, [6.5], g, dtype, device)[0])
    results = {}
    for design in ("reference", "ours"):
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        results[design] = _bench_design(design, cfg, device, dtype, data, steps, warmup, layer_id, layer_ids)
    ref, ours = results["reference"], results["ours"]
    results["speedup"] = round(ref["ms_per_step"] / ours["ms_per_step"], 2)
    results["memory_ratio"] = None if ref["peak_gib"] is None else round(ours["peak_gib"] / ref["peak_gib"], 3)
    return results


def _bench_design(design, cfg, device, dtype, data, steps, warmup, layer_id, layer_ids, alpha=1200.0):
    """One design's timed steps (a function, so that everything it built is freed when it returns)."""
    cuda = device.type == "cuda"
    fids, rids, ridx, mask, c = data["fids"], data["rids"], data["ridx"], data["mask"], data["c"]
    names = [f"model.layers.{i}.mlp.down_proj.weight" for i in layer_ids]
    model = random_model(cfg, device, dtype)
    named = dict(model.named_parameters())
    hooks = []
    if design == "reference":
        frozen = copy.deepcopy(model)
        model.requires_grad_(True)  # HF default: every parameter requires grad
        opt = AdamW([named[n] for n in names], lr=5e-5, eps=1e-6, hf_eps=True)
        grab = []
        hooks = [m.model.layers[layer_id].register_forward_hook(lambda mod, i, o: grab.append(o))
                 for m in (model, frozen)]

        def step(i):
            model(fids[i], mask)
            act_f = grab.pop()
            model(rids[ridx[i]], mask)
            act_r = grab.pop()
            with torch.no_grad():
                frozen(rids[ridx[i]], mask)
                act_r0 = grab.pop()
            loss = mse(act_f, c.expand_as(act_f)) + alpha * mse(act_r, act_r0)
            opt.zero_grad()  # as the reference: only the optimizer's params are zeroed
            loss.backward()
            opt.step()
            return loss.item()
    else:
        model.requires_grad_(False)
        train = {n: named[n] for n in names}
        for p in train.values():
            p.requires_grad_(True)
        opt = AdamW(list(train.values()), lr=5e-5, eps=1e-6, hf_eps=True)
        rmu = RMU(model, train, layer_id, list(layer_ids))
        uses = {}
        for k in ridx:
            uses[k] = uses.get(k, 0) + 1
        cache = ActCache(uses, 2 * 2**30)

        def step(i):
            f_h = rmu.trunk(fids[i], mask)

            def fwd_r():
                h = rmu.trunk(rids[ridx[i]], mask)
                return h, rmu.frozen_acts(h, mask)
            r_h, r_tgt = cache.get(ridx[i], fwd_r)
            loss, _, _ = rmu.loss(f_h, mask, c, r_h, mask, r_tgt, alpha)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss.item()
    losses = [step(i) for i in range(warmup)]
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(warmup, warmup + steps):
        losses.append(step(i))  # .item() syncs each step, as a training loop that logs its loss does
    if cuda:
        torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) / steps * 1e3
    peak = torch.cuda.max_memory_allocated() if cuda else None
    for h in hooks:
        h.remove()
    return {"ms_per_step": round(ms, 2), "peak_gib": None if peak is None else round(peak / 2**30, 2),
            "first_loss": losses[0], "losses": losses}


def bench(args):
    from model import ModelConfig
    if not torch.cuda.is_available():
        raise SystemExit("bench-unlearn: needs a CUDA GPU (none found); it times a 7B-shaped RMU step, "
                         "reference design vs ours (REFERENCE 8: 193 ms, 36.3 GiB for the reference)")
    cfg = ModelConfig(**ZEPHYR_7B)
    dev = torch.cuda.get_device_name()
    print(f"RMU step, 7B-shaped Mistral/Zephyr (random weights, bf16), batch 4 x 512 forget + retain, {dev}")
    print("| schedule | design | ms/step | peak GiB | first loss |\n|---|---|---|---|---|")
    rec = {"bench": "rmu_step", "model": "zephyr-7b-shaped (random weights)", "dtype": "bfloat16", "batch": [4, 512],
           "device": dev, "torch": torch.__version__}
    for name, paired in (("fresh batches", False), ("paired retain (reference schedule)", True)):
        res = bench_rmu(cfg, "cuda", torch.bfloat16, paired=paired)
        for k in ("reference", "ours"):
            r = res[k]
            print(f"| {name} | {k} | {r['ms_per_step']:.1f} | {r['peak_gib']:.2f} | {r['first_loss']:.4f} |")
        print(f"| {name} | ratio | {res['speedup']:.2f}x faster | {res['memory_ratio']:.3f} of the memory | |")
        rec["paired" if paired else "fresh"] = res
    print(json.dumps(rec))
    return rec


def main(argv=None):
    args = build_parser().parse_args(argv)
    from data import DataError
    from model import CheckpointError
    errors = (UnlearnError, DataError, CheckpointError)
    try:
        from evaluate import EvalError
        from lpkernels import KernelInputError
        errors += (EvalError, KernelInputError)
    except ImportError:
        pass
    try:
        if args.bench:
            bench(args)
        else:
            run(args)
    except errors as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("unlearn: interrupted; earlier outputs were left as they were")


if __name__ == "__main__":
    main()
