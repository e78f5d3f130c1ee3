"""Relearning attack: how fast does unlearned knowledge come back when the model is fine-tuned on a little forget
text? The paper's "potential vulnerabilities in low-data regimes", measured for full-set, coreset and keyword-only
unlearned models of one base.

    python relearn.py                       # the toy: unlearns four arms with RMU, then attacks each
    python relearn.py --models full=RUN_FULL/model,r0.05=RUN_5/model --base MODEL --forget bio.jsonl \\
        --data DATA --tasks wmdp_bio,mmlu   # attack existing checkpoints (their run.json gives their coresets)
    (make relearn METHOD=rmu)

The arms (--arms, trained here with unlearn.run when --models is not given; same method, seed and budget):
  full       the whole forget set
  0.05, 0.01 a seeded random coreset of that ratio (the same draw as unlearn.py --ratio)
  keywords   the keyword-only forget set of every document (coreset.py --method keywords)
The attack (the OPTML unlearning codebases' protocol, REFERENCE section 10): plain next-token cross-entropy on
--n-docs forget documents, AdamW (lr --lr, weight decay 0), batch 4, 512 tokens, linear schedule with warmup of
steps // 10, gradient clipping 1.0. Each budget in --steps is a fresh run from the unlearned checkpoint with its
own schedule (as a max-steps series is in the literature); 15 steps of batch 4 over 20 documents is the
"20 documents x 3 epochs" budget. Each epoch takes the documents in a seeded order, the same for every model.
The documents: --n-docs drawn with --doc-seed from the forget corpus, by default from outside every coreset arm
(so outside the smallest); the full-set model has necessarily seen them, the keyword model saw their keywords.
Each model's overlap with them is recorded. The toy's learning rate is its own (data/toy/defaults.json
"relearn"): the literature's 1e-5 does not move a 9 MB model trained at 3e-3.
Writes --out/results.{json,md,png}: the run record, the documents, every model's overlap and accuracy after each
budget; --docs PREFIX copies them.
"""
import argparse
import json
import re
import time
from pathlib import Path

import numpy as np
import torch

import arms as arms_mod
import budget
import data
import evaluate
import methods
import optimizer
import unlearn
from infra import (TOY_DIR, TOY_MODEL, ProjectError, check_output, cli_main, is_results_file, progress_bar, pyplot,
                   run_info, save_figure, split_list, write_results)
from loglik import eval_settings
from model import load
from objectives import retain_ce

# the literature's attack (REFERENCE section 10); the toy's own values come from defaults.json "relearn"
ATTACK = {"lr": 1e-5, "batch_size": 4, "max_len": 512, "warmup_frac": 0.1, "max_grad_norm": 1.0,
          "weight_decay": 0.0, "schedule": "linear"}


def build_parser():
    p = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=None, help="NAME=DIR,... existing unlearned checkpoints (default: train --arms)")
    p.add_argument("--base", default=str(TOY_MODEL), help="the model the arms are unlearned from")
    p.add_argument("--method", default="rmu", help="unlearning method of the arms trained here")
    p.add_argument("--arms", default="full,0.05,0.01,keywords", help="arms trained here: full, a ratio, keywords")
    p.add_argument("--seed", type=int, default=42, help="the arms' unlearning seed")
    p.add_argument("--forget", default=str(TOY_DIR / "forget_corpus.jsonl"), help="forget corpora FILE[,FILE]")
    p.add_argument("--retain", default=None, help="retain corpus (default: the embedded toy's for --method, methods.toy_data)")
    p.add_argument("--unlearn-args", default="", help="extra unlearn.py flags for the arms, e.g. \"--steps 200\"")
    p.add_argument("--data", default=str(TOY_DIR), help="DATA dir of the evaluation tasks")
    p.add_argument("--tasks", default="toy_hazard,toy_general", help="evaluation tasks")
    p.add_argument("--utility-tasks", default=",".join(data.UTILITY_TASKS))
    p.add_argument("--n-docs", type=int, default=20, help="relearning documents")
    p.add_argument("--doc-seed", type=int, default=0, help="seed of the documents' draw and of their order")
    p.add_argument("--docs-from", choices=["outside", "any"], default="outside",
                   help="outside: only documents in no coreset arm; any: the whole forget corpus")
    p.add_argument("--steps", default="0,5,10,15,25,50", help="relearning budgets (optimizer steps)")
    p.add_argument("--lr", type=float, default=None, help="default: 1e-5, the toy's own on the toy")
    p.add_argument("--batch-size", type=int, default=None, help=f"default {ATTACK['batch_size']}")
    p.add_argument("--max-len", type=int, default=None, help=f"tokens per document, default {ATTACK['max_len']}")
    p.add_argument("--eval-limit", type=int, default=None)
    p.add_argument("--eval-preset", default="current")
    p.add_argument("--eval-batch-size", type=int, default=32)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default=None)
    p.add_argument("--out", default="runs/relearn")
    p.add_argument("--docs", default=None, help="also copy results.{md,json,png} to this prefix")
    p.add_argument("--no-progress", action="store_true")
    return p


def attack_settings(args) -> dict:
    """The one place the attack's settings are resolved: the literature's, then the toy's own (defaults.json
    "relearn") when --base is an embedded toy model, then the flags."""
    out = dict(ATTACK)
    kind = methods.toy_kind(args.base)
    if kind:
        out.update({k: v for k, v in methods.toy_values(kind).get("relearn", {}).items() if k in ATTACK})
    for k in ("lr", "batch_size", "max_len"):
        if getattr(args, k) is not None:
            out[k] = getattr(args, k)
    for k in ("lr", "batch_size", "max_len"):
        if not out[k] > 0:
            raise ProjectError(f"--{k.replace('_', '-')} {out[k]}: expected a positive number")
    return out


# ----------------------------------------------------------------------------------------------- the arms

def draw_documents(sizes, seen: dict, n, seed, docs_from) -> list:
    """n (file, index) pairs drawn with `seed`, outside every coreset (a model that saw only part of the forget
    set, keywords aside) when docs_from == "outside"."""
    excluded = set()
    if docs_from == "outside":
        for s in seen.values():
            if s and not s["keywords"] and sum(map(len, s["indices"])) < sum(sizes):
                excluded |= {(f, i) for f, idx in enumerate(s["indices"]) for i in idx}
    pool = [(f, i) for f, size in enumerate(sizes) for i in range(size) if (f, i) not in excluded]
    if len(pool) < n:
        raise ProjectError(f"--n-docs {n}: only {len(pool)} forget documents lie outside the coresets compared")
    pick = np.random.default_rng(seed).choice(len(pool), n, replace=False)
    return sorted(pool[int(j)] for j in pick)


def overlap(seen, docs) -> dict:
    if seen is None:
        return {"trained_on": None, "note": "no run.json beside the checkpoint: overlap unknown"}
    hit = sum(i in set(seen["indices"][f]) for f, i in docs)
    return {"trained_on": hit, "of": len(docs), "as_keywords": seen["keywords"]}


# ----------------------------------------------------------------------------------------------- the attack

def relearn(model, tok, texts, steps, att, seed, progress=False, desc="relearn") -> list:
    """Fine-tune `model` in place on `texts` for `steps` optimizer steps with next-token cross-entropy -> the loss
    per step. Batches of att["batch_size"] documents; each epoch a permutation of the documents drawn with
    (seed, epoch), so every model of a comparison sees the same batches. 0 steps changes nothing."""
    if steps <= 0:
        return []
    batches = budget.Batches(tok, texts, att["max_len"], tok.pad_token_id, "right")
    per_epoch = budget.n_batches(len(texts), att["batch_size"])
    params = [p for p in model.parameters()]
    for p in params:
        p.requires_grad_(True)
    # bf16 weights: fp32 master copy and moments, as unlearning's NPO family
    opt = optimizer.adamw(params, att["lr"], weight_decay=att["weight_decay"], fp32_state=True)
    device, hist = params[0].device, []
    model.train()
    bar = progress_bar(steps, desc, disable=not progress)
    for s in range(steps):
        epoch, k = divmod(s, per_epoch)
        order = np.random.default_rng((seed, epoch)).permutation(len(texts))
        items = tuple(int(i) for i in order[k * att["batch_size"]:(k + 1) * att["batch_size"]])
        for g in opt.param_groups:
            g["lr"] = optimizer.lr_at(s, steps, att["lr"], steps // 10, att["schedule"])
        opt.zero_grad(set_to_none=True)
        ids, mask = (x.to(device) for x in batches[items])
        loss = retain_ce(model, ids, mask)
        if not torch.isfinite(loss):
            raise ProjectError(f"relearn step {s}: loss is {loss.item()} (try a lower --lr)")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, att["max_grad_norm"])
        opt.step()
        hist.append(loss.item())
        bar.set_postfix(loss=f"{hist[-1]:.4g}")
        bar.update(1)
    bar.close()
    model.eval()
    model.requires_grad_(False)
    return hist


NAME = re.compile(r"\b[A-Z][a-zA-Z]{3,}\b")


def named_in(items, texts) -> list:
    """Per question: does it name something the relearning documents name? A name: a capitalised word of 4+
    letters in the documents whose lower-case form they never use. On the toy these are exactly the pathogens and
    towns, so the split separates questions whose facts the attack taught outright from the rest; on real data
    it is a heuristic."""
    lower = {w.lower() for t in texts for w in re.findall(r"\b[a-z][a-zA-Z]{3,}\b", t)}
    names = {w for t in texts for w in NAME.findall(t) if w.lower() not in lower}
    return [any(w in names for w in NAME.findall(it["question"])) for it in items]


def split_accuracy(samples, named) -> dict:
    """Accuracy on the questions `named` marks and on the others."""
    out = {}
    for key, keep in (("named", True), ("other", False)):
        accs = [s["acc"] for s, n in zip(samples, named) if n == keep]
        out[key], out[f"n_{key}"] = (sum(accs) / len(accs) if accs else None), len(accs)
    return out


def attack_model(args, name, model_dir, texts, budgets, att, settings, tasks, named):
    """Every budget from a fresh copy of the checkpoint -> [{"steps", "epochs", "loss", "metrics", "split"}];
    named: {task: per question, does it name what the relearning documents name}."""
    points = []
    for steps in budgets:
        model, tok = load(model_dir, args.device, args.dtype)
        hist = relearn(model, tok, texts, steps, att, args.doc_seed, not args.no_progress, f"relearn {name}")
        res = evaluate.evaluate_tasks(model, tok, args.data, tasks, args.eval_batch_size, args.eval_limit, False,
                                      bos=settings["bos"], ll_dtype=settings["ll_dtype"])
        points.append({"steps": steps, "epochs": steps * att["batch_size"] / len(texts),
                       "loss_first": hist[0] if hist else None, "loss_last": hist[-1] if hist else None,
                       "metrics": evaluate.task_metrics(evaluate.summarize(res)),
                       "split": {t: split_accuracy(res["samples"][t], m) for t, m in named.items()}})
        print(f"relearn: {name} {steps} steps " + " ".join(
            f"{m} {data.metric_pct(m, v):.1f}" for m, v in points[-1]["metrics"].items()), flush=True)
        del model
    return points


# ----------------------------------------------------------------------------------------------- report

def markdown(record, util):
    arms = record["models"]
    metrics = list(arms[0]["points"][0]["metrics"])
    lines = [f"### {record['title']}", "",
             f"Relearning on {len(record['documents'])} forget documents (doc seed {record['doc_seed']}, "
             f"{record['docs_from']} the coresets), lr {record['attack']['lr']:g}, batch "
             f"{record['attack']['batch_size']}.", ""]
    lines += ["| model | trained on the relearning docs |", "|---|---|"]
    for a in arms:
        o = a["overlap"]
        seen = "unknown" if o["trained_on"] is None else \
            f"{o['trained_on']} of {o['of']}" + (" (their keywords)" if o["as_keywords"] else "")
        lines.append(f"| {a['name']} | {seen} |")
    base = record.get("base_metrics") or {}
    for m in metrics:
        kind = "utility" if data.is_utility(m, util) else "forget"
        lines += ["", f"**{m}** ({kind}, %) after relearning steps", "",
                  "| steps | epochs | " + " | ".join(a["name"] for a in arms) + " |", "|" + "---|" * (len(arms) + 2)]
        for j, pt in enumerate(arms[0]["points"]):
            lines.append(f"| {pt['steps']} | {pt['epochs']:.2g} | " + " | ".join(
                f"{data.metric_pct(m, a['points'][j]['metrics'][m]):.1f}" for a in arms) + " |")
        if m in base:
            lines.append(f"| base (not unlearned) | | {data.metric_pct(m, base[m]):.1f} |" + " |" * (len(arms) - 1))
    for t in arms[0]["points"][0].get("split", {}):
        sp = arms[0]["points"][0]["split"][t]
        lines += ["", f"**{t}** split (acc, %): questions naming what the relearning documents name "
                  f"({sp['n_named']}) / the others ({sp['n_other']})", "",
                  "| steps | " + " | ".join(a["name"] for a in arms) + " |", "|" + "---|" * (len(arms) + 1)]
        pct = lambda v: "-" if v is None else f"{100 * v:.1f}"
        for j, pt in enumerate(arms[0]["points"]):
            lines.append(f"| {pt['steps']} | " + " | ".join(
                f"{pct(a['points'][j]['split'][t]['named'])} / {pct(a['points'][j]['split'][t]['other'])}"
                for a in arms) + " |")
        bs = (record.get("base_split") or {}).get(t)
        if bs:
            lines.append(f"| base (not unlearned) | {pct(bs['named'])} / {pct(bs['other'])} |" + " |" * (len(arms) - 1))
    return "\n".join(lines) + "\n"


def plot(record, path):
    plt = pyplot("relearn")
    if plt is None:
        return None
    arms = record["models"]
    metrics = [m for m in arms[0]["points"][0]["metrics"] if not m.endswith("/acc_norm")]
    # one more panel per forget task: its questions that name nothing the relearning documents name
    others = [t for t in arms[0]["points"][0].get("split", {}) if not data.is_utility(t, record["utility_tasks"])]
    bm, bs = record.get("base_metrics") or {}, record.get("base_split") or {}
    panels = [(m, lambda p, m=m: data.metric_pct(m, p["metrics"][m]), f"{m} ({'accuracy, ' if data.is_accuracy(m) else ''}%)",
               data.metric_pct(m, bm.get(m))) for m in metrics] + \
        [(t, lambda p, t=t: 100 * p["split"][t]["other"], f"{t}, questions the documents do not name (%)",
          100 * bs[t]["other"] if bs.get(t) else None) for t in others if arms[0]["points"][0]["split"][t]["n_other"]]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), dpi=120, squeeze=False)
    for ax, (m, value, label, base) in zip(axes[0], panels):
        for a in arms:
            ax.plot([p["steps"] for p in a["points"]], [value(p) for p in a["points"]], marker="o", ms=3,
                    label=a["name"])
        if base is not None:
            ax.axhline(base, color="black", ls="--", lw=1, label="base")
        if data.is_accuracy(m):   # a multiple-choice accuracy (acc or acc_norm): chance with 4 choices
            ax.axhline(25, color="gray", ls=":", lw=1)
        ax.set_xlabel("relearning steps")
        ax.set_ylabel(label, fontsize=8)
    return save_figure(fig, path, record["title"], axes[0])


def main_work(args):
    t0 = time.time()
    args.retain = args.retain or methods.default_retain(args.method)
    budgets = sorted(set(split_list(args.steps, "--steps", int)))
    if budgets[0] < 0:
        raise ProjectError(f"--steps {args.steps}: expected step counts >= 0")
    att = attack_settings(args)
    tasks = split_list(args.tasks, "--tasks")
    forget = split_list(args.forget, "--forget")
    inputs = [args.base, *forget, args.retain] + evaluate.task_files(tasks, args.data)
    models = arms_mod.given_models(args.models) if args.models else None
    arm_specs = arms_mod.parse_arms(args.arms)
    inputs += list((models or {}).values())
    check_output(Path(args.out) / "results.json", inputs, "--out", kind="file",
                 ours=lambda p: is_results_file(p, "documents"), name="relearn")
    corpora = [data.read_corpus(f) for f in forget]
    settings = eval_settings(args.eval_preset, None, None, args.base)
    record = run_info(args)
    n_q = sum(len(evaluate.load_mc_task(t, args.data, args.eval_limit)[1]) for t in tasks if t not in data.MUSE_TASKS)
    mc = json.loads((Path(models[next(iter(models))] if models else args.base) / "config.json").read_text())
    n_models = len(models) if models else len(arm_specs)
    est = budget.gpu_estimate(methods.param_counts(mc)[0],
                              train_tokens=n_models * sum(budgets) * att["batch_size"] * att["max_len"],
                              eval_questions=n_models * len(budgets) * n_q)
    print(f"relearn: {est['line']} (the attack; unlearning the arms comes on top)", flush=True)
    if models is None:
        models = arms_mod.train_arms(arm_specs, arms_mod.shared_settings(args), Path(args.out) / "arms",
                                     not args.no_progress)
    seen = {name: arms_mod.seen_documents(d, forget) for name, d in models.items()}
    for name, s in seen.items():   # run.json's indices count the documents unlearn.py read (after --min-chars)
        if s and s["n_docs"] != [len(c) for c in corpora]:
            raise ProjectError(f"{models[name]}: trained on {s['n_docs']} documents of {', '.join(forget)}, which has "
                               f"{[len(c) for c in corpora]} here (a --min-chars filter?); its coreset indices "
                               "would point at other documents")
    docs = draw_documents([len(c) for c in corpora], seen, args.n_docs, args.doc_seed, args.docs_from)
    texts = [corpora[f][i] for f, i in docs]
    named = {t: named_in(evaluate.load_mc_task(t, args.data, args.eval_limit)[1], texts)
             for t in tasks if t not in data.MUSE_TASKS}
    base_model, base_tok = load(args.base, args.device, args.dtype)
    base_res = evaluate.evaluate_tasks(base_model, base_tok, args.data, tasks, args.eval_batch_size, args.eval_limit,
                                       False, bos=settings["bos"], ll_dtype=settings["ll_dtype"])
    base_metrics = evaluate.task_metrics(evaluate.summarize(base_res))
    base_split = {t: split_accuracy(base_res["samples"][t], m) for t, m in named.items()}
    del base_model
    arms = []
    for name, d in models.items():
        arms.append({"name": name, "model": d, "overlap": overlap(seen[name], docs),
                     "points": attack_model(args, name, d, texts, budgets, att, settings, tasks, named)})
    title = (f"Relearning {args.method.upper()} models (seed {args.seed})" if not args.models
             else "Relearning attack") + f": {len(texts)} forget documents, lr {att['lr']:g}"
    record.update(title=title, base=args.base, attack=att, budgets=budgets, doc_seed=args.doc_seed,
                  docs_from=args.docs_from, base_metrics=base_metrics, base_split=base_split,
                  utility_tasks=sorted(set(split_list(args.utility_tasks, "--utility-tasks"))), documents=[{"file": forget[f], "index": i} for f, i in docs],
                  models=arms, eval_settings=settings, gpu_estimate=est, time_s=round(time.time() - t0, 3))
    md = markdown(record, set(split_list(args.utility_tasks, "--utility-tasks")))
    write_results(Path(args.out), record, md, lambda png: plot(record, png), args.docs)
    print(md)
    return record


def main(argv=None):
    return cli_main("relearn", main_work, build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
