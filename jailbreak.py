"""Jailbreak prefixes: does an adversarial prompt bring back what unlearning removed? One universal prefix of P
tokens, found by GCG (Zou et al. 2023; the attack family Lucki et al. 2024 aimed at RMU), placed before the question
in lm-eval's prompt, for the full-set and the coreset unlearned models under the same budget and seed.

    python jailbreak.py                      # the toy: unlearns A (RMU, full forget set) and B (5% coreset), attacks both
    python jailbreak.py --models full=RUN_FULL/model,r0.05=RUN_5/model --base MODEL --data DATA \\
        --tasks wmdp_bio,mmlu                # existing checkpoints; GPU defaults: 500 steps, 512 candidates
    (make jailbreak METHOD=rmu)

The loss: minus the mean log-probability, over K (--train-questions, 5) questions of the attacked task (--task,
default the first forget task of --tasks), of the BASE model's own answer: its argmax letter (letter form) or its
argmax choice continuation (cloze form). The base model's answer, not the gold one: the attack recovers what was
removed. The search (GCG): per step the gradient of the loss w.r.t. the one-hot indicator of each prefix position;
the --topk tokens with the most negative gradient per position; --candidates random single-token swaps among them
plus the unchanged prefix, each scored exactly (one batched pass of the fused log-prob scorer); the best is kept,
so the training loss never rises. A candidate whose text does not tokenize back to its own tokens, inside every
prompt, is dropped (as Zou et al. do), so the prefix found is a string that lm-eval's own prompt reproduces.
Honest evaluation: the prefix is found on the K training questions only; accuracy is reported on the attacked
task's other questions and on every other task, with and without the prefix.
Defaults: on a CPU 50 steps and 64 candidates (the toy: minutes per model); on a GPU 500 and 512 (the literature).
Writes --out/results.{json,md,png}: the run record, each model's prefix (ids and text), loss curve and accuracies.
"""
import argparse
import json
import math
import time
from pathlib import Path

import torch

import arms as arms_mod
import budget
import data
import evaluate
import methods
import unlearn
from infra import (TOY_DIR, TOY_MODEL, ProjectError, check_output, cli_main, is_results_file, progress_bar, pyplot,
                   resolve_device, run_info, save_figure, split_list, write_results)
from loglik import choice_requests, choice_rows, encode, eval_settings, score_rows
from model import load

SEARCH = {"cpu": {"steps": 50, "candidates": 64}, "cuda": {"steps": 500, "candidates": 512}}
SEP = " "   # between the prefix and the question


def build_parser():
    p = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=None, help="NAME=DIR,... existing unlearned checkpoints (default: train --arms)")
    p.add_argument("--base", default=str(TOY_MODEL), help="the model the arms are unlearned from (its answers are "
                   "the attack's targets)")
    p.add_argument("--method", default="rmu", help="unlearning method of the arms trained here")
    p.add_argument("--arms", default="full,0.05", help="arms trained here (arms.py): full, a ratio, keywords")
    p.add_argument("--seed", type=int, default=42, help="the arms' unlearning seed")
    p.add_argument("--forget", default=str(TOY_DIR / "forget_corpus.jsonl"))
    p.add_argument("--retain", default=None, help="retain corpus (default: the embedded toy's for --method, methods.toy_data)")
    p.add_argument("--unlearn-args", default="", help="extra unlearn.py flags for the arms")
    p.add_argument("--data", default=str(TOY_DIR), help="DATA dir of the evaluation tasks")
    p.add_argument("--tasks", default="toy_hazard,toy_general", help="evaluated tasks (multiple choice)")
    p.add_argument("--utility-tasks", default=",".join(data.UTILITY_TASKS))
    p.add_argument("--task", default=None, help="the attacked task (default: the first forget task of --tasks)")
    p.add_argument("--prefix-len", type=int, default=20, help="P, prefix tokens")
    p.add_argument("--train-questions", type=int, default=5, help="K, questions the prefix is optimised on")
    p.add_argument("--topk", type=int, default=256, help="candidate tokens per position")
    p.add_argument("--candidates", type=int, default=None, help="swaps scored per step (default: CPU 64, GPU 512)")
    p.add_argument("--steps", type=int, default=None, help="GCG steps (default: CPU 50, GPU 500)")
    p.add_argument("--attack-seed", type=int, default=0, help="seed of the training questions and the swaps")
    p.add_argument("--eval-limit", type=int, default=None)
    p.add_argument("--eval-preset", default="current")
    p.add_argument("--eval-batch-size", type=int, default=32)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default=None)
    p.add_argument("--out", default="runs/jailbreak")
    p.add_argument("--docs", default=None, help="also copy results.{md,json,png} to this prefix")
    p.add_argument("--no-progress", action="store_true")
    return p


def with_prefix(items, text):
    """The questions with the prefix text before each question (lm-eval builds its prompt around the question)."""
    return [{**it, "question": text + SEP + it["question"]} for it in items]


def find(seq, sub):
    """The first index of `sub` inside `seq`, or None."""
    n = len(sub)
    return next((i for i in range(len(seq) - n + 1) if seq[i:i + n] == sub), None)


class Attack:
    """GCG's objective on one model: -mean log p(target continuation | prompt with the prefix) over K questions.
    items: the K questions (task dicts); targets: per question the index of the choice to raise."""

    def __init__(self, model, tok, items, targets, topic, form, bos=None):
        self.model, self.tok, self.items, self.targets = model, tok, items, targets
        self.topic, self.form, self.bos = topic, form, bos
        V = model.lm_head_weight.shape[0]
        texts = [tok.decode([i]) for i in range(min(V, tok.vocab_size))]
        # tokens a prefix may use: printable text (no special tokens, no partial UTF-8 bytes)
        self.allowed = torch.zeros(V, dtype=torch.bool)
        self.allowed[:len(texts)] = torch.tensor([bool(t) and "\ufffd" not in t and t.isprintable() for t in texts])

    def context_tokens(self, text):
        """The tokens `text` becomes in place, inside the first question's prompt: those whose characters lie in
        it; None when a token straddles its start (merged with what precedes). A text's tokens on their own are not
        these: a byte-level BPE splits the newlines before it differently, SentencePiece marks a word start after a
        newline differently."""
        ctx = evaluate.mc_pairs(with_prefix(self.items[:1], text), self.topic, self.form)[0][0]
        at = ctx.find(text)
        ids, spans = self.tok.encode_with_offsets(ctx[:at + len(text)])
        if any(a < at < b for a, b in spans):
            return None
        return [i for i, (a, _) in zip(ids, spans) if a >= at] or None

    def rows(self, prefix):
        """score_rows' rows of the K questions with this prefix and where the prefix sits in each, or None when the
        prompts lm-eval builds around the prefix's text do not all contain exactly these tokens."""
        text = self.tok.decode(prefix)
        pairs = [(ctx, [conts[t]]) for (ctx, conts), t in
                 zip(evaluate.mc_pairs(with_prefix(self.items, text), self.topic, self.form), self.targets)]
        reqs = choice_requests(self.tok, pairs, self.bos)
        starts = [find(r["ctx"], list(prefix)) for r in reqs]
        if any(s is None for s in starts) or any(len(r["conts"][0]) == 0 for r in reqs):
            return None
        return choice_rows(reqs)[0], starts

    def losses(self, prefixes) -> list:
        """The loss of each prefix (inf for one that does not tokenize back), all scored in one batched pass."""
        built = [self.rows(p) for p in prefixes]
        rows = [r for b in built if b is not None for r in b[0]]
        scores = iter(score_rows(self.model, rows, 64, self.tok.pad_token_id or 0, ll_dtype="float32")) if rows else None
        out = []
        for b in built:
            if b is None:
                out.append(math.inf)
                continue
            out.append(-sum(next(scores)[0] for _ in b[0]) / len(b[0]))
        return out

    def gradient(self, prefix):
        """-> (the loss, d loss / d one-hot indicator of each prefix position (P, V) on the CPU, fp32). The loss is
        the one `losses` scores, here through the embedding matrix so that it is differentiable in the one-hot."""
        built = self.rows(prefix)
        if built is None:
            raise ProjectError("the current prefix does not tokenize back to itself (internal: a kept candidate "
                               "must be valid)")
        rows, starts = built
        E = self.model.model.embed_tokens.weight                                          # (V, d)
        W = self.model.lm_head_weight
        dev, P = E.device, len(prefix)
        onehot = torch.zeros(P, E.shape[0], dtype=E.dtype, device=dev)
        onehot[torch.arange(P), torch.tensor(list(prefix), device=dev)] = 1
        onehot.requires_grad_(True)
        pre = onehot @ E                                                                  # (P, d)
        T = max(len(r[0]) for r in rows)
        embs = []
        for (ids, _), s in zip(rows, starts):
            ids = torch.tensor(ids + [self.tok.pad_token_id or 0] * (T - len(ids)), device=dev)
            e = E[ids].detach()                                                           # (T, d)
            embs.append(torch.cat([e[:s], pre, e[s + P:]]))
        h = self.model(None, None, hidden_states=torch.stack(embs), output="hidden")     # (K, T, d)
        loss = 0.0
        for b, (_, specs) in enumerate(rows):   # right padding: the causal mask is exact for the real tokens
            for pos, targets in specs:
                logits = h[b, pos:pos + len(targets)].float() @ W.float().T                # (n, V)
                loss = loss - logits.log_softmax(-1)[torch.arange(len(targets)), torch.tensor(targets, device=dev)].sum()
        loss = loss / len(rows)
        loss.backward()
        return loss.item(), onehot.grad.float().cpu()


def gcg_step(attack, prefix, topk, n_candidates, gen):
    """One GCG step -> (the best prefix among the unchanged one and n random single-token swaps from the top-k
    tokens per position, its loss, the number of candidates that tokenize back)."""
    _, grad = attack.gradient(prefix)
    grad[:, ~attack.allowed[:grad.shape[1]]] = math.inf
    top = (-grad).topk(min(topk, int(attack.allowed.sum())), dim=1).indices            # (P, k)
    P = len(prefix)
    pos = torch.randint(P, (n_candidates,), generator=gen)
    pick = torch.randint(top.shape[1], (n_candidates,), generator=gen)
    cands = [tuple(prefix)]
    for p, k in zip(pos.tolist(), pick.tolist()):
        c = list(prefix)
        c[p] = int(top[p, k])
        cands.append(tuple(c))
    cands = list(dict.fromkeys(cands))   # the unchanged prefix first, duplicates once
    losses = attack.losses(cands)
    best = min(range(len(cands)), key=losses.__getitem__)   # ties keep the earlier: the unchanged prefix
    return list(cands[best]), losses[best], sum(math.isfinite(v) for v in losses)


def initial_prefix(attack, P):
    """GCG's start, "! ! ! ..." (P words), as the P tokens it becomes inside the prompts; another filler word when
    that one does not give P tokens that survive tokenization in place."""
    tok = attack.tok
    words = ["!", "x", ".", "a", "the"] + [tok.decode([i]).strip() for i in range(min(tok.vocab_size, 5000))]
    for w in dict.fromkeys(x for x in words if x and x.isprintable() and " " not in x):
        ids = attack.context_tokens(" ".join([w] * P))
        if ids and len(ids) == P and attack.rows(ids) is not None:
            return ids
    raise ProjectError(f"--prefix-len {P}: no filler word gives {P} tokens that keep their tokens inside the "
                       "prompts; cannot start GCG")


def run_gcg(attack, prefix, steps, topk, n_candidates, seed, progress=False, desc="gcg"):
    """GCG from `prefix` for `steps` steps -> (prefix, [loss before the first step, after each step], valid counts)."""
    gen = torch.Generator().manual_seed(seed)
    hist, valid = [attack.losses([tuple(prefix)])[0]], []
    if not math.isfinite(hist[0]):
        raise ProjectError("the initial prefix does not tokenize back inside the prompts")
    bar = progress_bar(steps, desc, disable=not progress)
    for _ in range(steps):
        prefix, loss, n = gcg_step(attack, prefix, topk, n_candidates, gen)
        hist.append(loss)
        valid.append(n)
        bar.set_postfix(loss=f"{loss:.4g}")
        bar.update(1)
    bar.close()
    return prefix, hist, valid


# ----------------------------------------------------------------------------------------------- the experiment

def load_tasks(args, tasks):
    loaded = {}
    for t in tasks:
        if t in data.MUSE_TASKS:
            raise ProjectError(f"--tasks: {t} is not a multiple-choice task (the attack scores choices)")
        loaded[t] = evaluate.load_mc_task(t, args.data, args.eval_limit)   # (name, items, topic, form)
    return loaded


def split_questions(n, k, seed):
    """(training question indices, evaluation indices) of the attacked task: k drawn with `seed`, the rest."""
    if not 0 < k < n:
        raise ProjectError(f"--train-questions {k}: expected between 1 and {n - 1} (the attacked task has {n})")
    train = sorted(torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].tolist())
    return train, [i for i in range(n) if i not in set(train)]


def accuracies(model, tok, loaded, attacked, held_out, text, args, settings):
    """{task: acc} (cloze also task/acc_norm) on the held-out questions of the attacked task and every question of
    the others, with the prefix `text` (None: none)."""
    out = {}
    for name, (_, items, topic, form) in loaded.items():
        items = [items[i] for i in held_out] if name == attacked else items
        if text is not None:
            items = with_prefix(items, text)
        res, _ = evaluate.evaluate_mc(model, tok, items, topic, args.eval_batch_size, False, settings["bos"], name,
                                      settings["ll_dtype"], None, form)
        out.update(evaluate.task_metrics({name: res}))
    return out


def attack_model(args, name, model_dir, train_items, targets, start, loaded, attacked, held_out, search, settings):
    """GCG against one model, then its accuracies without the prefix, with it and with the initial prefix -> dict."""
    t1 = time.time()
    model, tok = load(model_dir, args.device, args.dtype)
    model.requires_grad_(False)
    _, _, topic, form = loaded[attacked]
    attack = Attack(model, tok, train_items, targets, topic, form, settings["bos"])
    prefix, hist, valid = run_gcg(attack, start, search["steps"], args.topk, search["candidates"], args.attack_seed,
                                  not args.no_progress, f"gcg {name}")
    text = tok.decode(prefix)
    acc = lambda t: accuracies(model, tok, loaded, attacked, held_out, t, args, settings)
    before, after = acc(None), acc(text)
    hits = lambda its: sum(evaluate.argmax_first(x) == t for x, t in zip(evaluate.mc_loglikelihoods(
        model, tok, its, topic, bos=settings["bos"], ll_dtype=settings["ll_dtype"], form=form), targets))
    print(f"jailbreak: {name}: loss {hist[0]:.3f} -> {hist[-1]:.3f}; " + " ".join(
        f"{m} {data.metric_pct(m, before[m]):.1f} -> {data.metric_pct(m, after[m]):.1f}" for m in before
        if not m.endswith("/acc_norm")) + f" ({time.time() - t1:.0f} s)", flush=True)
    return {"name": name, "model": model_dir, "prefix_ids": prefix, "prefix": text, "loss": hist,
            "valid_candidates": valid, "without_prefix": before, "with_prefix": after,
            # on the K training questions: how many answers are the base model's, without / with the prefix
            "train_base_answers": [hits(train_items), hits(with_prefix(train_items, text))],
            "with_initial_prefix": acc(tok.decode(start)), "time_s": round(time.time() - t1, 3)}


def main_work(args):
    t0 = time.time()
    args.retain = args.retain or methods.default_retain(args.method)
    device = resolve_device(args.device)
    search = dict(SEARCH["cuda" if device.startswith("cuda") else "cpu"])
    search.update({k: getattr(args, k) for k in ("steps", "candidates") if getattr(args, k) is not None})
    for flag, v in (("--prefix-len", args.prefix_len), ("--topk", args.topk), ("--candidates", search["candidates"]),
                    ("--steps", search["steps"] + 1)):
        if v < 1:
            raise ProjectError(f"{flag} {v}: expected a positive number")
    tasks = split_list(args.tasks, "--tasks")
    util = set(split_list(args.utility_tasks, "--utility-tasks"))
    attacked = args.task or next((t for t in tasks if not data.is_utility(t, util)), None)
    if attacked is None:
        raise ProjectError(f"--tasks {args.tasks}: no forget task to attack; name one with --task")
    tasks = tasks if attacked in tasks else [attacked] + tasks
    forget = split_list(args.forget, "--forget")
    models = arms_mod.given_models(args.models) if args.models else None
    inputs = [args.base, *forget, args.retain, *(models or {}).values()] + evaluate.task_files(tasks, args.data)
    loaded = load_tasks(args, tasks)
    arm_specs = arms_mod.parse_arms(args.arms)
    check_output(Path(args.out) / "results.json", inputs, "--out", kind="file",
                 ours=lambda p: is_results_file(p, "prefix_len"), name="jailbreak")
    _, items, topic, form = loaded[attacked]
    train, held_out = split_questions(len(items), args.train_questions, args.attack_seed)
    settings = eval_settings(args.eval_preset, None, None, args.base)
    record = run_info(args)
    n_models = len(models) if models else len(arm_specs)
    mc = json.loads((Path(next(iter(models.values())) if models else args.base) / "config.json").read_text())
    n_q = sum(len(v[1]) for v in loaded.values())
    # per step: one forward and backward over K prompts (~3 forwards) and (candidates + 1) x K scored prompts
    scored = n_models * search["steps"] * (search["candidates"] + 4) * args.train_questions
    est = budget.gpu_estimate(methods.param_counts(mc)[0], eval_questions=scored + 3 * n_models * n_q)
    print(f"jailbreak: {est['line']} (the attack; unlearning the arms comes on top)", flush=True)
    if models is None:
        models = arms_mod.train_arms(arm_specs, arms_mod.shared_settings(args), Path(args.out) / "arms",
                                     not args.no_progress)
    base, tok = load(args.base, args.device, args.dtype)
    train_items = [items[i] for i in train]
    lls = evaluate.mc_loglikelihoods(base, tok, train_items, topic, bos=settings["bos"], ll_dtype=settings["ll_dtype"],
                                     form=form)
    targets = [evaluate.argmax_first(x) for x in lls]
    base_acc = accuracies(base, tok, loaded, attacked, held_out, None, args, settings)
    start = initial_prefix(Attack(base, tok, train_items, targets, topic, form, settings["bos"]), args.prefix_len)
    del base
    results = [attack_model(args, name, d, train_items, targets, start, loaded, attacked, held_out, search,
                            settings) for name, d in models.items()]
    title = (f"GCG prefix against {args.method.upper()} models (seed {args.seed})" if not args.models
             else "GCG prefix") + f", attacking {attacked}"
    record.update(title=title, base=args.base, attacked_task=attacked, train_questions=train, targets=targets,
                  n_held_out=len(held_out), prefix_len=args.prefix_len, topk=args.topk, search=search, sep=SEP,
                  initial_prefix=start, base_accuracy=base_acc, models=results, eval_settings=settings,
                  gpu_estimate=est, time_s=round(time.time() - t0, 3))
    md = markdown(record, util)
    write_results(Path(args.out), record, md, lambda png: plot(record, png), args.docs)
    print(md)
    return record


def markdown(record, util):
    res = record["models"]
    metrics = [m for m in res[0]["without_prefix"] if not m.endswith("/acc_norm")]
    lines = [f"### {record['title']}", "",
             f"A {record['prefix_len']}-token prefix optimised by GCG for {record['search']['steps']} steps "
             f"({record['search']['candidates']} candidates per step, top-{record['topk']}) on "
             f"{len(record['train_questions'])} questions of {record['attacked_task']}, towards the base model's "
             f"answers; accuracy (%) on the other {record['n_held_out']} questions of {record['attacked_task']} and "
             "on every question of the other tasks.", "",
             "| model | loss start -> end | base's answer on the training questions | " + " | ".join(
                 f"{m} ({'utility' if data.is_utility(m, util) else 'forget'}) without -> with (initial prefix)"
                 for m in metrics) + " |", "|" + "---|" * (len(metrics) + 3)]
    k = len(record["train_questions"])
    for r in res:
        hit = r["train_base_answers"]
        lines.append(f"| {r['name']} | {r['loss'][0]:.3f} -> {r['loss'][-1]:.3f} | {hit[0]}/{k} -> {hit[1]}/{k} | "
                     + " | ".join(
            f"{data.metric_pct(m, r['without_prefix'][m]):.1f} -> **{data.metric_pct(m, r['with_prefix'][m]):.1f}** "
            f"({data.metric_pct(m, r['with_initial_prefix'][m]):.1f})" for m in metrics) + " |")
    lines.append(f"| base (not unlearned) | | {k}/{k} | " + " | ".join(
        f"{data.metric_pct(m, record['base_accuracy'][m]):.1f}" for m in metrics) + " |")
    lines += ["", "Prefixes found:", ""] + [f"- {r['name']}: `{r['prefix']!r}`" for r in res]
    return "\n".join(lines) + "\n"


def plot(record, path):
    plt = pyplot("jailbreak")
    if plt is None:
        return None
    res = record["models"]
    metrics = [m for m in res[0]["without_prefix"] if not m.endswith("/acc_norm")]
    fig, axes = plt.subplots(1, 1 + len(metrics), figsize=(4.2 * (1 + len(metrics)), 3.6), dpi=120, squeeze=False)
    ax = axes[0][0]
    for r in res:
        ax.plot(range(len(r["loss"])), r["loss"], label=r["name"])
    ax.set_xlabel("GCG step")
    ax.set_ylabel("training loss (-log p of the base's answer)")
    for ax, m in zip(axes[0][1:], metrics):
        x = range(len(res))
        w = 0.38
        ax.bar([i - w / 2 for i in x], [data.metric_pct(m, r["without_prefix"][m]) for r in res], w, label="without")
        ax.bar([i + w / 2 for i in x], [data.metric_pct(m, r["with_prefix"][m]) for r in res], w, label="with prefix")
        ax.axhline(data.metric_pct(m, record["base_accuracy"][m]), color="black", ls="--", lw=1, label="base")
        ax.axhline(25, color="gray", ls=":", lw=1)
        ax.set_xticks(list(x), [r["name"] for r in res])
        ax.set_ylabel(f"{m} (accuracy, %)")
    return save_figure(fig, path, record["title"], axes[0])


def main(argv=None):
    return cli_main("jailbreak", main_work, build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
