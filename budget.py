"""What a run trains on, for how long and in what order: training items, the budget and the data order.

    fb, rb = corpus_batches(cfg, tok, forget_texts, retain_texts)   # Batches: fb[t][items] -> (ids, mask)

    steps, rule = resolve_steps(cfg, full_sizes, selected_sizes, retain_sizes)
    plan = make_plan(steps, accum, batch_size, selected_sizes, retain_sizes, retain_of, order, seed)
    record = budget_record(plan, ...)          # run.json's "budget": steps, epochs, docs seen per forget file

The paper's claim ("a 5 % coreset matches the full forget set, provided training is long enough") is a statement
about budgets, so every run states its own (REFERENCE section 4, last item):
  --steps N      N optimizer steps.
  --epochs E     E passes over the run's forget set (the coreset, or the full set): the largest topic's batches
                 times E, times the number of topics (topics alternate), divided by --grad-accum, rounded up.
  neither (RMU)  the WMDP reference's rule: min(max_num_batches, batches of the smallest FULL forget file, batches
                 of the smallest retain file) -- the same count for every coreset of a corpus, so a coreset is
                 cycled; with --order file this is the reference's run exactly.
Order (--order): `file` takes the selected documents in file order, batch after batch, cycling (the reference);
`shuffle` draws each epoch's batches from a seeded permutation of the whole selected set (numpy PCG64 seeded with
(seed, forget/retain, topic, epoch)), so every document is seen once per epoch. The last batch of an epoch may be
short. Micro-batch m takes topic m % n_topics and that topic's k = m // n_topics-th batch; its retain batch is
batch k of the topic's retain file (the reference's pairing: both topics of one k share a wikitext batch).
"""
import math

import numpy as np

from infra import per_topic

ORDERS = ("file", "shuffle")


# ----------------------------------------------------------------------------------------------- training items

class Batches:
    """A corpus as training items: its documents (truncated on the right to max_len tokens; the tokenizer's special
    tokens added as it says), or with chunk > 0 the pieces of `chunk` tokens each document splits into.
    self[items] -> (ids (B, T), mask (B, T)) of those items padded on `side` with pad_id; tokenized on first use."""

    def __init__(self, tok, docs, max_len, pad_id, side, chunk=0):
        self.tok, self.docs, self.max_len, self.pad_id, self.side = tok, docs, max_len, pad_id, side
        if chunk:
            self.seqs, self.doc_of = [], []
            for d, ids in enumerate(tok.encode_batch(docs)):
                for a in range(0, len(ids), chunk):
                    self.seqs.append(ids[a:a + chunk])
                    self.doc_of.append(d)
        else:
            self.seqs, self.doc_of = [None] * len(docs), list(range(len(docs)))

    def __len__(self):
        return len(self.seqs)

    def tokens(self, items):
        todo = [i for i in items if self.seqs[i] is None]
        for i, ids in zip(todo, self.tok.encode_batch([self.docs[i] for i in todo]) if todo else []):
            self.seqs[i] = ids[:self.max_len]
        return [self.seqs[i] for i in items]

    def __getitem__(self, items):
        return self.tok.pad(self.tokens(items), self.side, pad_id=self.pad_id)   # (B, T) ids, mask


def corpus_batches(cfg, tok, forget_sel, retain_docs):
    """The run's Batches: forget per topic, retain per file. RMU pads on the left with EOS (the reference), the NPO
    family on the right with the pad token."""
    rmu = cfg.method == "rmu"
    pad = (tok.eos_token_id if tok.eos_token_id is not None else tok.pad_token_id) if rmu else tok.pad_token_id
    side, chunk = ("left", 0) if rmu else ("right", cfg.chunk_tokens)
    lens = per_topic(cfg.forget_max_len, len(forget_sel))
    fb = [Batches(tok, docs, lens[t], pad, side, chunk) for t, docs in enumerate(forget_sel)]
    return fb, [Batches(tok, docs, cfg.retain_max_len, pad, side, chunk) for docs in retain_docs]


# ----------------------------------------------------------------------------------------------- budget and order


def n_batches(n, batch_size) -> int:
    return -(-n // batch_size)


def reference_steps(max_num_batches, batch_size, full_forget_sizes, retain_sizes) -> int:
    """The WMDP reference's step count: min(max_num_batches, batches of the smallest full forget file, of the
    smallest retain file)."""
    return min(max_num_batches, min(n_batches(n, batch_size) for n in full_forget_sizes),
               min(n_batches(n, batch_size) for n in retain_sizes))


def epoch_steps(epochs, batch_size, accum, selected_sizes) -> int:
    """Optimizer steps of `epochs` passes over the selected documents (the largest topic sets the pace)."""
    micro = math.ceil(epochs * max(n_batches(n, batch_size) for n in selected_sizes) - 1e-9) * len(selected_sizes)
    return max(1, math.ceil(micro / accum))


def resolve_steps(cfg, full_sizes, selected_sizes, retain_sizes):
    """-> (steps, rule): cfg.steps, else cfg.epochs of the selected set, else the reference's rule (RMU)."""
    if cfg.steps is not None:
        return int(cfg.steps), "steps"
    if cfg.epochs is not None:
        return epoch_steps(cfg.epochs, cfg.batch_size, cfg.grad_accum, selected_sizes), "epochs"
    return reference_steps(cfg.max_num_batches, cfg.batch_size, full_sizes, retain_sizes), "reference"


def batch_indices(n, batch_size, k, order, seed, stream):
    """Item indices (0..n-1, positions in the run's selected set) of batch k of a cycled sequence of epochs."""
    nb = n_batches(n, batch_size)
    epoch, j = divmod(k, nb)
    perm = np.arange(n) if order == "file" else np.random.default_rng([seed, *stream, epoch]).permutation(n)
    return tuple(int(i) for i in perm[j * batch_size:(j + 1) * batch_size])


def make_plan(steps, accum, batch_size, forget_sizes, retain_sizes, retain_of, order, seed, retain_order=0):
    """Micro-batch plan: a list over optimizer steps of lists of (topic, forget items, retain file, retain items);
    items are index tuples into the topic's selected documents / the retain file's documents. retain_order i > 0
    draws the retain batches from a stream of their own (--retain-orders); the forget batches stay the seed's."""
    # order 0 keeps the stream a one-order run has; 1_000_003 is a tag no epoch number reaches
    r_stream = lambda r: (1, r) if retain_order == 0 else (1, r, 1_000_003, retain_order)
    n_topics = len(forget_sizes)
    plan = []
    for s in range(steps):
        micro = []
        for j in range(accum):
            m = s * accum + j
            t, k = m % n_topics, m // n_topics
            r = retain_of[t]
            micro.append((t, batch_indices(forget_sizes[t], batch_size, k, order, seed, (0, t)), r,
                          batch_indices(retain_sizes[r], batch_size, k, order, seed, r_stream(r))))
        plan.append(micro)
    return plan


def budget_record(plan, rule, order, files, docs_available, selected_doc_of, retain_files, retain_doc_of):
    """run.json's "budget". selected_doc_of[t] / retain_doc_of[r]: the document behind each item of forget topic t /
    retain file r (an item is a document, or a piece of one when documents are chunked). epochs: items drawn /
    items selected (fractional)."""
    drawn = [[] for _ in files]
    r_drawn = [set() for _ in retain_files]
    for micro in plan:
        for t, f, r, rr in micro:
            drawn[t] += f
            r_drawn[r].update(rr)
    per_file = []
    for t, f in enumerate(files):
        items = selected_doc_of[t]
        seen = {items[i] for i in drawn[t]}
        per_file.append({"file": f, "docs_available": docs_available[t], "docs_selected": len(set(items)),
                         "docs_seen": len(seen), "items_selected": len(items), "items_drawn": len(drawn[t]),
                         "epochs": round(len(drawn[t]) / len(items), 4)})
    return {"rule": rule, "order": order, "steps": len(plan),
            "micro_batches": sum(len(m) for m in plan),
            "epochs": min(p["epochs"] for p in per_file), "forget": per_file,
            "retain": [{"file": f, "docs_available": len(set(d)), "docs_seen": len({d[i] for i in s})}
                       for f, d, s in zip(retain_files, retain_doc_of, r_drawn)]}


def full_set_items(cfg, forget_docs, tok=None) -> list:
    """Training items per forget file of the FULL set (documents; with --chunk-tokens, the pieces they split into,
    which needs the tokenizer): what "E epochs of the full set" counts."""
    chunk = getattr(cfg, "chunk_tokens", 0)
    if not chunk:
        return [len(d) for d in forget_docs]
    return [len(Batches(tok, docs, 0, 0, "right", chunk)) for docs in forget_docs]


def coverage_warnings(record) -> list:
    """One line per forget file whose selected documents are not all trained on."""
    return [f"budget: {p['file']}: the run sees {p['docs_seen']} of its {p['docs_selected']} selected documents "
            f"({record['steps']} steps, rule {record['rule']}, order {record['order']}); give --epochs 1 or more "
            "steps to cover them" for p in record["forget"] if p["docs_seen"] < p["docs_selected"]]


# ----------------------------------------------------------------------------------------------- GPU cost estimate

# REFERENCE section 8 and lpkernels/BENCH.md (one H200, bf16): Llama-7B (6.74e9 parameters) scores 8192 tokens in
# 238 ms, i.e. 2 * 6.74e9 * 8192 / 0.238 = 4.6e14 FLOP/s of dense work; our RMU step at 7B (batch 4 x 512) took
# 49.5 ms; lm-eval-style multiple choice on 256-token prompts, one forward per question, 137 questions/s.
ANCHOR_PARAMS, ANCHOR_FLOPS, ANCHOR_RMU_STEP_S, ANCHOR_MC_QPS = 6.74e9, 4.6e14, 0.0495, 137.0


def gpu_estimate(n_params, train_tokens=0, rmu_steps=0, eval_questions=0) -> dict:
    """Seconds on one H200 for a job of this size, scaled from the anchors above by the parameter count (an
    estimate, not a measurement): full-model training at 6 FLOP per parameter per token, RMU steps at the measured
    step time, multiple-choice questions at the measured rate. -> {"train_s", "rmu_s", "eval_s", "total_s", "line"}"""
    scale = n_params / ANCHOR_PARAMS
    train_s = 6 * n_params * train_tokens / ANCHOR_FLOPS
    rmu_s = rmu_steps * ANCHOR_RMU_STEP_S * scale
    eval_s = eval_questions / ANCHOR_MC_QPS * scale
    total = train_s + rmu_s + eval_s
    t = lambda s: f"{s / 60:.1f} min" if s >= 60 else f"{s:.1f} s"
    line = (f"GPU cost, estimated (not measured) for one H200 from the anchors in REFERENCE section 8: about "
            f"{t(total)} for a {n_params / 1e6:,.0f}M-parameter model (training {t(train_s)}, RMU {t(rmu_s)}, "
            f"evaluation {t(eval_s)})")
    return {"train_s": train_s, "rmu_s": rmu_s, "eval_s": eval_s, "total_s": total, "line": line}
