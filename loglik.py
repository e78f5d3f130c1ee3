"""Log-likelihoods and greedy text exactly as lm-evaluation-harness (and MUSE) compute them: the encoding rules
(lm-eval's BOS rule, _encode_pair's context/continuation split), batched scoring of target tokens with the LM head
run only where needed, per-token log-probs, perplexity, and greedy generation decoded as MUSE decodes.
evaluate.py (multiple choice) and muse_eval.py (MUSE) build on these; nothing here knows a task.
"""
import json
import math
import sys
from pathlib import Path

import torch

from infra import ProjectError


# ----------------------------------------------------------------------------------------------- evaluator settings

# Two settings decide what a log-likelihood is (and both moved between harness releases): whether a BOS token
# starts each request, and the dtype of the log-softmax. A preset names the combination behind a set of numbers.
EVAL_PRESETS = {
    # lm-eval >= 0.4.10 (PR #3347: the tokenizer's config decides BOS) with transformers >= 4.46 (logits stay in the
    # model's dtype, so a bf16 model gives bf16 log-softmax): what `lm_eval` reports today
    "current": {"bos": "config", "ll_dtype": "model"},
    # lm-eval 0.4.2 with transformers 4.38 (the WMDP paper's numbers: zephyr 63.7 / 44.0 / 58.1): HFLM passed
    # add_special_tokens=False (no BOS; True for model_type gemma) and LlamaForCausalLM upcast logits to fp32
    "wmdp-published": {"bos": "lm-eval-0.4.2", "ll_dtype": "float32"},
}
BOS_RULES = ("config", "yes", "no", "lm-eval-0.4.2")
LL_DTYPES = ("model", "float32")


def eval_settings(preset="current", bos=None, ll_dtype=None, model_dir=None) -> dict:
    """The evaluator's settings: the preset's, with bos / ll_dtype overriding when given (model_dir: whose
    config.json's model_type lm-eval 0.4.2's BOS rule reads). -> {"preset", "bos_rule", "bos" (None: the
    tokenizer's config; True/False: forced), "ll_dtype"}; a bad name is a ProjectError."""
    if preset not in EVAL_PRESETS:
        raise ProjectError(f"--eval-preset {preset}: expected one of {', '.join(EVAL_PRESETS)}")
    rule = bos or EVAL_PRESETS[preset]["bos"]
    ll = ll_dtype or EVAL_PRESETS[preset]["ll_dtype"]
    if rule not in BOS_RULES:
        raise ProjectError(f"--eval-bos {rule}: expected one of {', '.join(BOS_RULES)}")
    if ll not in LL_DTYPES:
        raise ProjectError(f"--eval-ll-dtype {ll}: expected one of {', '.join(LL_DTYPES)}")
    if rule == "lm-eval-0.4.2":
        try:
            model_type = json.loads((Path(model_dir) / "config.json").read_text()).get("model_type")
        except (OSError, ValueError, TypeError):
            model_type = None   # an unreadable config: loading the model reports it
    forced = {"config": None, "yes": True, "no": False}.get(rule, rule == "lm-eval-0.4.2" and model_type == "gemma")
    return {"preset": preset, "bos_rule": rule, "bos": forced, "ll_dtype": ll}


# ----------------------------------------------------------------------------------------------- encoding

def encode(tok, text, bos=None):
    """tok.encode with lm-eval's BOS rule: None = the tokenizer's config decides (lm-eval's add_bos_token=None);
    True = BOS first, added when the tokenizer would not add it (HFLM add_bos_token=True); False = no special
    tokens (add_bos_token=False)."""
    return encode_many(tok, [text], bos)[0]


def encode_many(tok, texts, bos=None):
    """encode() over a list (the tokenizers library's batch encoder when the wrapper has one)."""
    special = bos is not False
    if hasattr(tok, "encode_batch"):
        ids = tok.encode_batch(list(texts), add_special_tokens=special)
    else:
        ids = [tok.encode(t, add_special_tokens=special) for t in texts]
    b = getattr(tok, "bos_token_id", None)
    if bos and b is not None:
        ids = [x if x[:1] == [b] else [b] + x for x in ids]
    return ids


def split_context(context, continuation):
    """lm-eval's _encode_pair, first step: trailing whitespace of the context moves to the continuation."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        return context[:-n_spaces], context[-n_spaces:] + continuation
    return context, continuation


def encode_pair(tok, context, continuation, bos=None):
    """lm-eval's TemplateLM._encode_pair for a causal LM -> (context ids, continuation ids):
    whole = encode(context + continuation), ctx = encode(context), cont = whole[len(ctx):]."""
    context, continuation = split_context(context, continuation)
    whole = encode(tok, context + continuation, bos)
    ctx = encode(tok, context, bos)
    return ctx, whole[len(ctx):]


def choice_requests(tok, pairs, bos=None):
    """Per item (context, [continuation, ...]) -> dict(ctx, conts, fast), each (context, continuation) tokenized as
    encode_pair does (the context's trailing whitespace moved first; one context encoding per item). fast: every
    continuation is one token that extends the context's tokens, so one forward over the context scores them all."""
    texts, spans = [], []
    for context, conts in pairs:
        split = [split_context(context, c) for c in conts]
        spans.append((len(texts), len(conts)))
        texts += [split[0][0]] + [c + x for c, x in split]
    enc = encode_many(tok, texts, bos)
    reqs = []
    for a, n in spans:
        ctx, wholes = enc[a], enc[a + 1:a + 1 + n]
        conts = [w[len(ctx):] for w in wholes]
        reqs.append(dict(ctx=ctx, conts=conts, fast=all(len(c) == 1 and w[:len(ctx)] == ctx
                                                        for c, w in zip(conts, wholes))))
    return reqs


def choice_rows(reqs):
    """Requests -> score_rows' rows and, per item, where each continuation's score comes from (row, target)."""
    rows, where = [], []
    for r in reqs:
        ctx, conts = r["ctx"], r["conts"]
        if r["fast"]:  # one forward over the context, every target at its last position
            where.append([(len(rows), j) for j in range(len(conts))])
            rows.append((ctx, [(len(ctx) - 1, c) for c in conts]))
        else:          # the harness's sequence per choice: input (ctx + cont)[:-1], cont scored from len(ctx)-1
            where.append([(len(rows) + j, 0) for j in range(len(conts))])
            rows.extend(((ctx + c)[:-1], [(len(ctx) - 1, c)]) for c in conts)
    return rows, where


# ----------------------------------------------------------------------------------------------- scoring core

def gather_logprobs(hidden, weight, inv, targets, round_to_model=True):
    """hidden (U, d) final hidden states at the needed positions, weight (V, d); inv (M,) which position each of
    the M targets (M,) is read at -> (M,) fp32 tensor of log-probs. The LM head runs on these U rows only, in
    row chunks. The log-softmax is the harness's: F.log_softmax over logits in the model's dtype (transformers
    >= 4.46 no longer upcasts logits, and lm-eval's softmax_dtype defaults to None), so a bf16 model gives
    bf16-rounded log-probs; round_to_model=False gives fp32 log-probs (older transformers: logits.float())."""
    out = torch.empty(len(targets), dtype=torch.float32, device=hidden.device)
    chunk = max(1, (256 * 2**20) // (4 * weight.shape[0]))  # rows per (chunk, V) fp32 buffer of <= 256 MiB
    for c in range(0, hidden.shape[0], chunk):
        logits = hidden[c:c + chunk] @ weight.T                                 # (u, V) model dtype
        logp = torch.log_softmax(logits if round_to_model else logits.float(), dim=-1)  # (u, V)
        sel = ((inv >= c) & (inv < c + chunk)).nonzero()[:, 0]                  # targets read in this chunk
        out[sel] = logp[inv[sel] - c, targets[sel]].float()
    return out


def score_rows(model, rows, batch_size, pad_id, progress=False, desc="scoring", ll_dtype="model",
                batch_tokens=None):
    """rows: list of (input_ids, specs), specs = [(pos, targets)]: target j is scored at position pos + j.
    -> per row, per spec, the summed log-prob. Rows run longest first, right padded, batch_size at a time, or
    when batch_tokens is set as many as fit in batch_tokens padded tokens (at least one).
    ll_dtype "model": log-probs and their sums rounded to the model's dtype as the harness's HF path does
    (no-op for fp32 models); "float32": fp32 throughout."""
    weight = model.lm_head_weight
    device = weight.device
    if ll_dtype not in ("model", "float32"):
        raise ProjectError(f"ll_dtype: expected 'model' or 'float32', got {ll_dtype!r}")
    rounding = ll_dtype == "model" and weight.dtype != torch.float32
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    out = [None] * len(rows)
    bar = scoring_bar(len(rows), desc, progress)
    s = 0
    while s < len(order):
        T = len(rows[order[s]][0])  # the longest of this batch
        n = max(1, batch_tokens // max(T, 1)) if batch_tokens else batch_size
        idx, s = order[s:s + n], s + n
        ids = torch.full((len(idx), T), pad_id, dtype=torch.long)
        flat, tgt = [], []
        for b, i in enumerate(idx):
            seq, specs = rows[i]
            ids[b, :len(seq)] = torch.tensor(seq, dtype=torch.long)
            for pos, targets in specs:
                flat.extend(b * T + pos + j for j in range(len(targets)))
                tgt.extend(targets)
        with torch.no_grad():
            # right padding: every real token precedes the pads, so the plain causal mask is exact (and lets
            # SDPA use its fastest kernel); pad positions give values nobody reads
            h = model(ids.to(device), None, output="hidden")                         # (B, T, d)
            # unique (row, position) pairs: the fast path reads four targets at one position
            uniq, inv = torch.unique(torch.tensor(flat, device=device), return_inverse=True)  # (U,), (M,)
            hu = h.reshape(-1, h.shape[-1])[uniq]                                   # (U, d)
            lp = gather_logprobs(hu, weight, inv, torch.tensor(tgt, device=device), ll_dtype == "model")  # (M,)
        lp = lp.double().cpu().tolist()
        k = 0
        for i in idx:
            sums = []
            for _, targets in rows[i][1]:
                v = math.fsum(lp[k:k + len(targets)])
                if rounding and len(targets) > 1:  # the harness sums a bf16 tensor: the sum is rounded too
                    v = torch.tensor(v, dtype=weight.dtype).item()
                sums.append(v)
                k += len(targets)
            out[i] = sums
        bar.update(len(idx))
    bar.close()
    return out


def scoring_bar(total, desc, progress):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, disable=not progress, leave=False, dynamic_ncols=True)


# ----------------------------------------------------------------------------------------------- text scoring

def token_logprobs(model, tok, texts, batch_size=8, progress=False, bos=None, desc="log-probs", batch_tokens=None):
    """Per text, [log p(token_t | tokens_<t) for t = 1..] of encode(text): the first token (BOS when the tokenizer
    adds one) is not scored, as in MUSE's compute_ppl. No truncation. -> list of lists of floats."""
    seqs = encode_many(tok, texts, bos)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    too_long = [i for i, s in enumerate(seqs) if max_pos and len(s) - 1 > max_pos]
    if too_long:
        print(f"warning: {desc}: {len(too_long)} text(s) longer than max_position_embeddings={max_pos} "
              f"(scored uncut): indices {too_long[:10]}", file=sys.stderr)
    live = [i for i, s in enumerate(seqs) if len(s) > 1]
    rows = [(seqs[i][:-1], [(p, [t]) for p, t in enumerate(seqs[i][1:])]) for i in live]  # one spec per token
    scores = score_rows(model, rows, batch_size, tok.pad_token_id or 0, progress, desc, "float32", batch_tokens)
    out = [[] for _ in texts]
    for i, sc in zip(live, scores):
        out[i] = sc
    return out


def perplexity(model, tok, texts, batch_size=8, progress=False, bos=None, batch_tokens=None):
    """exp(total NLL / total predicted tokens) over a set of texts (each scored from its second token)."""
    lps = token_logprobs(model, tok, texts, batch_size, progress, bos, "perplexity", batch_tokens)
    n = sum(len(x) for x in lps)
    if n == 0:
        raise ProjectError("perplexity: no text has two tokens or more")
    return math.exp(-math.fsum(v for x in lps for v in x) / n)


def clean_up_tokenization(text):
    """transformers' clean_up_tokenization (MUSE decodes with clean_up_tokenization_spaces=True)."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
                 (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


def decode(tok, ids):
    """MUSE's batch_decode(skip_special_tokens=True, clean_up_tokenization_spaces=True)."""
    return clean_up_tokenization(tok.decode(ids, skip_special_tokens=True))


def eos_ids(model, tok):
    """Token ids that end a greedy generation: the tokenizer's EOS and the model config's (HF generate's)."""
    ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    cfg_eos = getattr(model.config, "eos_token_id", None)
    ids |= set(cfg_eos if isinstance(cfg_eos, (list, tuple)) else [cfg_eos] if cfg_eos is not None else [])
    return sorted(ids)


def generate_texts(model, tok, prompts, max_new_tokens, batch_size=8, progress=False, bos=None, desc="generate"):
    """Greedy continuations (decoded as MUSE does) of text prompts, batched by length (KV cache)."""
    ids = encode_many(tok, prompts, bos)
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    out = [None] * len(ids)
    bar = scoring_bar(len(ids), desc, progress)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        new = model.generate([ids[i] for i in idx], max_new_tokens, eos_ids(model, tok), tok.pad_token_id or 0)
        for i, n in zip(idx, new):
            out[i] = decode(tok, n)
        bar.update(len(idx))
    bar.close()
    return out
