"""The coreset sweep, the paper's main figure in one command: for every (selection method, ratio, seed) select a
coreset (coreset.py), unlearn on it (unlearn.run, in process) and evaluate; then a table and a plot.

    python coreset_sweep.py --method rmu --select random --ratios 0.01,0.05,0.1,0.2,1.0 --seeds 0,1,2 \\
        --model data/toy/model --data data/toy --forget data/toy/forget_corpus.jsonl \\
        --retain data/toy/retain_corpus.jsonl --tasks toy_hazard,toy_general --out runs/sweep
    (make sweep METHOD=rmu SELECT=random RATIOS="0.01 0.05 0.1 0.2 1.0" SEEDS="0 1 2")

The budget policy (--budget), the same for every cell of a sweep and recorded in each:
  equal-steps   every ratio trains the full forget set's optimizer steps: --epochs E (default 1) passes over the
                full set; smaller coresets are cycled (the paper's "provided training is sufficiently extended").
  equal-epochs  every ratio trains --epochs E passes over its own set (fewer steps for smaller coresets).
  --steps N     N steps for every cell.
Each cell, in cells/<select>_r<ratio>_s<seed>/: a coreset in selection/coreset.jsonl (ratio 1 = the full set, none;
--select keywords: a random `ratio` of the documents, each reduced to its keywords), then unlearning under the
budget (the seed is both the selection's and the unlearning's; GraNd scores with the loss, and for RMU the very
control vectors, that the cell trains with) into run/, then the tasks (the base model's evaluation is cached in
cells/.eval_cache). Each cell's result.json is written atomically when it is done; a rerun skips cells that have
one. Checkpoints are not kept (--keep-models keeps them in run/model). Then results.json / results.md (mean +- sample std over
seeds per (selection, ratio), and the base model) and results.png (accuracy against ratio with error bars on a
log ratio axis; a bar chart per selection method when there is one ratio and several methods); --docs PREFIX
copies the three to PREFIX.{md,json,png}. The table shows each row's steps, epochs and documents seen.
"""
import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import budget
import coreset
import data
import evaluate
import methods
import sweep_queue
import unlearn
from coreset import CoresetError, coreset_size
from data import UTILITY_TASKS, is_accuracy, is_utility, metric_pct
from hf_tokenizer import load_tokenizer
from infra import TOY_DIR, TOY_MODEL, atomic_write_json, cli_main, pyplot, run_info, save_figure, split_list, write_results

BUDGETS = ("equal-steps", "equal-epochs")


def build_parser():
    p = argparse.ArgumentParser(
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="The coreset sweep: select, unlearn and evaluate for every (selection, ratio, seed); then a "
                    "table (Markdown + JSON) and a plot of accuracy against coreset ratio. Reruns skip finished cells.")
    p.add_argument("--method", default="rmu", help="unlearning method (unlearn.py --method)")
    p.add_argument("--select", default="random", help="selection method(s), comma/space list: " + "|".join(coreset.METHODS)
                   + " (keywords: unlearn on the keyword-only forget set of a random `ratio` of the documents)")
    p.add_argument("--ratios", default="0.01,0.05,0.1,0.2,1.0", help="coreset ratios, comma/space list")
    p.add_argument("--seeds", default="0,1,2", help="seeds (selection and unlearning), comma/space list")
    p.add_argument("--model", default=str(TOY_MODEL))
    p.add_argument("--data", default=str(TOY_DIR), help="DATA dir of the evaluation tasks")
    p.add_argument("--forget", default=str(TOY_DIR / "forget_corpus.jsonl"))
    p.add_argument("--retain", default=None, help="retain corpus (default: the embedded toy's for --method, methods.toy_data)")
    p.add_argument("--tasks", default="toy_hazard,toy_general", help="evaluation tasks")
    p.add_argument("--utility-tasks", default=",".join(UTILITY_TASKS),
                   help="tasks that measure retained utility (the others are forget tasks)")
    p.add_argument("--budget", default="equal-steps", choices=list(BUDGETS),
                   help="equal-steps: every ratio trains the full set's steps (E epochs of it); equal-epochs: E "
                   "epochs of its own set")
    p.add_argument("--epochs", type=float, default=1.0, help="E of the budget policy")
    p.add_argument("--steps", type=int, default=None, help="N steps for every cell (overrides --budget)")
    p.add_argument("--out", default="runs/sweep")
    p.add_argument("--unlearn-args", default="", help="extra unlearn.py flags, e.g. \"--lr 1e-4 --batch-size 4\"")
    p.add_argument("--select-args", default="", help="extra selection flags, e.g. \"--mink-k 0.2 --order high\"")
    p.add_argument("--eval-batch-size", type=int, default=32)
    p.add_argument("--eval-preset", default=None, help="evaluator settings of every cell: current | wmdp-published "
                   "(default: unlearn.py's, current)")
    p.add_argument("--eval-bos", default=None, help="BOS rule: config | yes | no | lm-eval-0.4.2 (default: the preset's)")
    p.add_argument("--eval-ll-dtype", default=None, help="log-softmax dtype: model | float32 (default: the preset's)")
    p.add_argument("--eval-limit", type=int, default=None)
    p.add_argument("--keep-models", action="store_true", help="keep each cell's unlearned checkpoint")
    p.add_argument("--report-only", action="store_true", help="only rebuild the table and plot from finished cells")
    p.add_argument("--docs", default=None, help="also copy results.{md,json,png} to this prefix (e.g. docs/sweep_rmu_equal_steps)")
    p.add_argument("--device", default=None)
    p.add_argument("--no-progress", action="store_true")
    w = p.add_argument_group("several workers (sweep_queue.py: atomic claims in --out, so nodes sharing a file "
                             "system can work on one sweep)")
    w.add_argument("--gpus", default=None, help="one worker process per GPU, e.g. 0,1,2,3 (CUDA_VISIBLE_DEVICES)")
    w.add_argument("--workers", type=int, default=1, help="worker processes on this machine (without --gpus)")
    w.add_argument("--procs-per-cell", type=int, default=1, help="each cell's unlearning on a torchrun group of this "
                   "many processes (GPUs): with --gpus 0,1,2,3 and 2, two workers of two GPUs each")
    w.add_argument("--retry-failed", action="store_true", help="give cells that failed twice two more tries")
    w.add_argument("--claim-stale-s", type=float, default=900.0,
                   help="a claim not renewed for this long belongs to a dead worker and is taken over")
    w.add_argument("--worker", default=None, help=argparse.SUPPRESS)   # internal: run as a worker of this args file
    return p


def cell_name(select_method, ratio, seed):
    return f"{select_method}_r{ratio:g}_s{seed}"


def full_set(ratio, sizes):
    return all(coreset_size(ratio, n) == n for n in sizes)


def unlearn_overrides(args, seed, cdir, coreset_file=None, cell_budget=None) -> dict:
    """The settings of one cell's unlearning run (methods.resolve fills the rest; --unlearn-args add to them, the
    cell's budget comes last)."""
    ov = {"method": args.method, "model": args.model, "forget": args.forget, "retain": args.retain,
          "seed": seed, "out": str(cdir / "run"), "eval_cache_dir": str(cdir.parent / ".eval_cache"),
          "data": args.data, "eval_tasks": args.tasks, "eval_batch_size": args.eval_batch_size,
          "eval_limit": args.eval_limit, "device": args.device, "save": args.keep_models,
          "progress": not args.no_progress, "coreset": coreset_file, "eval_preset": args.eval_preset,
          "eval_bos": args.eval_bos, "eval_ll_dtype": args.eval_ll_dtype}
    ov = {k: v for k, v in ov.items() if v is not None}
    extra = unlearn.overrides_from_argv(shlex.split(args.unlearn_args))
    if {"steps", "epochs"} & set(extra):
        raise CoresetError("--unlearn-args: give the budget with the sweep's own --budget / --epochs / --steps "
                           "(the same for every cell), not inside --unlearn-args")
    ov.update(extra)
    ov.update(cell_budget or {})
    return ov


def cell_budget(args, corpora) -> dict:
    """The budget every cell trains under: {"steps": N} or {"epochs": E} (see the module docstring). corpora: the
    full forget files' documents (equal-steps counts their training items: chunks when documents are chunked)."""
    if args.steps is not None:
        return {"steps": args.steps}
    if args.budget == "equal-epochs":
        return {"epochs": args.epochs}
    ucfg = methods.resolve(unlearn_overrides(args, 0, Path(args.out) / "cells" / "budget"))
    tok = load_tokenizer(ucfg.model) if getattr(ucfg, "chunk_tokens", 0) else None
    return {"steps": budget.epoch_steps(args.epochs, ucfg.batch_size, ucfg.grad_accum,
                                        budget.full_set_items(ucfg, corpora, tok))}


def select_overrides(s) -> dict:
    """--select-args (coreset.py flags) -> the SelectConfig fields they set."""
    parser = coreset.build_parser()
    given, defaults = vars(parser.parse_args(shlex.split(s))), vars(parser.parse_args([]))
    return {k: v for k, v in given.items() if v != defaults[k]}


def run_cell(args, sel, ratio, seed, sizes, cache, spend):
    """One (selection, ratio, seed) cell: select, unlearn.run (under the budget `spend`), evaluate. Returns the
    cell's result dict."""
    cdir = Path(args.out) / "cells" / cell_name(sel, ratio, seed)
    t0 = time.time()
    coreset_file, selection = None, None
    common = dict(forget=args.forget, retain=args.retain, ratio=f"{ratio:g}", seed=seed, device=args.device,
                  progress=not args.no_progress)
    if sel == "keywords":   # a random `ratio` of the documents, each reduced to its keywords
        scfg = coreset.SelectConfig(method="keywords", out=str(cdir / "selection" / "coreset.jsonl"),
                                    **{**common, **select_overrides(args.select_args)})
        selection = coreset.select(scfg)
        coreset_file = scfg.out
    elif not full_set(ratio, sizes):
        # random included: the same documents as unlearn.py --ratio (coreset.random_indices), written for the record
        extra = {}
        if sel == "grand":  # score with the gradients of the loss this cell trains, its control vectors included
            ucfg = methods.resolve(unlearn_overrides(args, seed, cdir, cell_budget=spend))
            extra = {"grand_loss": "rmu" if args.method == "rmu" else "npo"}
            if args.method == "rmu":
                extra.update(layer_id=ucfg.layer_id, layer_ids=",".join(map(str, ucfg.layer_ids)),
                             steering_coeffs=",".join(map(str, ucfg.steering_coeffs)), params=",".join(ucfg.params),
                             masked_loss=ucfg.masked_loss)
            else:   # the matrices this cell trains
                layer_ids, params = coreset.npo_trained(ucfg.train_scope, ucfg.layer_ids, ucfg.params,
                                                        methods.model_layers(args.model) or 0)
                extra.update(layer_ids=",".join(map(str, layer_ids)), params=",".join(params))
        scfg = coreset.SelectConfig(method=sel, model=args.model, out=str(cdir / "selection" / "coreset.jsonl"),
                                    **{**common, **extra, **select_overrides(args.select_args)})
        selection = coreset.select(scfg, cache=cache)
        coreset_file = str(cdir / "selection" / "coreset.jsonl")
    given = unlearn_overrides(args, seed, cdir, coreset_file, spend)
    if args.procs_per_cell > 1:   # the cell's unlearning on its own torchrun group (this worker's GPUs)
        methods.resolve(dict(given))   # every setting checked here, before the group starts
        atomic_write_json(cdir / "unlearn_settings.json", given)
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                            f"--nproc-per-node={args.procs_per_cell}", str(Path(unlearn.__file__).resolve()),
                            "--settings-file", str(cdir / "unlearn_settings.json")])
        if r.returncode:
            raise CoresetError(f"cell {cdir.name}: torchrun unlearn.py exited with {r.returncode}")
        rec = json.loads((cdir / "run" / "run.json").read_text())
    else:
        rec = unlearn.run(methods.resolve(given), given=given)
    ev = rec.get("eval") or {}
    result = {
        "select": sel, "ratio": ratio, "seed": seed, "method": args.method, "policy": spend,
        "n_docs": rec.get("coreset", {}).get("n_docs", sizes),
        "n_selected": rec.get("coreset", {}).get("n_selected"),
        "coreset": coreset_file, "forget": args.forget,
        "selection_s": None if selection is None else selection["timings"].get("total_s"),
        "steps": rec.get("steps"), "epochs": rec["budget"]["epochs"],
        "docs_seen": [f["docs_seen"] for f in rec["budget"]["forget"]], "eval_settings": ev.get("settings"),
        "train_s": rec.get("train_s"), "time_s": round(time.time() - t0, 3),
        "before": evaluate.task_metrics(ev.get("before")), "after": evaluate.task_metrics(ev.get("after")),
        "unlearn_args": rec.get("args"),
    }
    atomic_write_json(cdir / "result.json", result)
    return result


def finished(cdir, spend, config_of=None) -> bool:
    """A cell with a result.json under this budget; one under another budget, or (config_of(result) -> the cell's
    config resolved now) with other settings, e.g. from before a default changed, is an error: a sweep's table
    must compare one policy and one recipe."""
    f = cdir / "result.json"
    if not f.is_file():
        return False
    result = json.loads(f.read_text())
    if result.get("policy") != spend:
        raise CoresetError(f"{f}: finished under budget {result.get('policy')}, this sweep's is {spend}; use another "
                           "--out")
    run_json = cdir / "run" / "run.json"
    if config_of is not None and run_json.is_file():
        changed = unlearn.config_changes(json.loads(run_json.read_text()), config_of(result))
        if changed:
            raise CoresetError(f"{run_json}: finished with other settings ({', '.join(changed[:4])}) than this "
                               "sweep resolves now; use another --out")
    return True


def mean_std(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    m = float(np.mean(xs))
    return m, float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0


def aggregate(cells, utility_tasks):
    """Finished cells -> {"base", "metrics", "forget_metrics", "utility_metrics", "rows"} (rows: mean/std over seeds
    per (selection, ratio))."""
    metrics = list(dict.fromkeys(k for c in cells for k in c["after"]))
    base = {}
    for c in cells:
        for k, v in c["before"].items():
            base.setdefault(k, v)
    util = [m for m in metrics if is_utility(m, utility_tasks)]
    groups = {}
    for c in cells:
        groups.setdefault((c["select"], c["ratio"]), []).append(c)
    rows = []
    first = {s: i for i, s in reversed(list(enumerate(c["select"] for c in cells)))}   # the grid's order
    for (sel, ratio), cs in sorted(groups.items(), key=lambda kv: (first[kv[0][0]], kv[0][1])):
        cs = sorted(cs, key=lambda c: c["seed"])
        row = {"select": sel, "ratio": ratio, "seeds": [c["seed"] for c in cs],
               "n_selected": cs[0].get("n_selected"), "n_docs": cs[0].get("n_docs"),
               "steps": cs[0].get("steps"), "epochs": cs[0].get("epochs"),
               "time_s": float(np.mean([c["time_s"] for c in cs])), "metrics": {}}
        for m in metrics:
            vals = [c["after"].get(m) for c in cs]
            mu, sd = mean_std(vals)
            row["metrics"][m] = {"mean": mu, "std": sd, "values": vals}
        rows.append(row)
    return {"base": base, "metrics": metrics, "utility_metrics": util,
            "forget_metrics": [m for m in metrics if m not in util], "rows": rows}


def fmt_pct(metric, v, sd=None):
    if v is None:
        return "-"
    s = f"{metric_pct(metric, v):.1f}"
    return s if sd is None else f"{s} ± {metric_pct(metric, sd):.1f}"


def ratio_label(r):
    return f"{100 * r:g}%" if r <= 1 else f"{int(r)} docs"


def _quote(a):
    return shlex.quote(str(a))


def markdown_table(agg, title, notes=()):
    ms = agg["forget_metrics"] + agg["utility_metrics"]
    tag = {m: "forget" if m in agg["forget_metrics"] else "utility" for m in ms}
    head = ["selection", "ratio", "docs", "steps", "epochs"] + [f"{m} ({tag[m]})" for m in ms] + ["seeds", "time/cell"]
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines.append("| base model | - | - | - | - | " + " | ".join(fmt_pct(m, agg["base"].get(m)) for m in ms) + " | - | - |")
    for r in agg["rows"]:
        docs = "+".join(str(n) for n in (r["n_selected"] or [])) or "-"
        vals = [fmt_pct(m, r["metrics"][m]["mean"], r["metrics"][m]["std"]) for m in ms]
        ep = "-" if r.get("epochs") is None else f"{r['epochs']:.3g}"
        lines.append(f"| {r['select']} | {ratio_label(r['ratio'])} | {docs} | {r.get('steps', '-')} | {ep} | "
                     + " | ".join(vals)
                     + f" | {len(r['seeds'])} | {r['time_s']:.0f}s |")
    units = "Accuracy in %" + ("" if all(map(is_accuracy, ms)) else " (MUSE's metrics: ROUGE-L F1 x100, PrivLeak in %)")
    lines += ["", f"{units} (mean ± sample std over seeds); base model = before unlearning; docs = selected "
              "documents per forget file; steps = optimizer steps; epochs = passes over the cell's own set (documents "
              "drawn / selected, the least-covered forget file); time/cell = selection + unlearning + evaluation, "
              "mean over seeds.",
              *notes]
    return "\n".join(lines) + "\n"


def plot(agg, path, title):
    """Accuracy against coreset ratio with error bars (or bars per selection at a single ratio) -> PNG."""
    plt = pyplot("coreset sweep")
    if plt is None:
        return None
    # PrivLeak (a relative difference, -100..+inf) would flatten the 0-100 metrics: it stays in the table
    ms = [m for m in agg["forget_metrics"] + agg["utility_metrics"] if not m.endswith("/privleak")]
    sels = list(dict.fromkeys(r["select"] for r in agg["rows"]))
    ratios = sorted({r["ratio"] for r in agg["rows"]})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    if len(ratios) == 1 and len(sels) > 1:   # sweep-select: bars per selection method
        w = 0.8 / len(ms)
        for j, m in enumerate(ms):
            rows = {r["select"]: r for r in agg["rows"]}
            ys = [metric_pct(m, rows[s]["metrics"][m]["mean"]) for s in sels]
            es = [metric_pct(m, rows[s]["metrics"][m]["std"]) for s in sels]
            ax.bar(np.arange(len(sels)) + (j - (len(ms) - 1) / 2) * w, ys, w, yerr=es, capsize=3,
                   color=colors[j % len(colors)], label=m)
            if m in agg["base"]:
                ax.axhline(metric_pct(m, agg["base"][m]), color=colors[j % len(colors)], ls="--", lw=1,
                           label=f"{m} (base)")
        if ms and all(map(is_accuracy, ms)):
            ax.axhline(25, color="gray", ls=":", lw=1, label="chance (4 choices)")
        ax.set_xticks(np.arange(len(sels)), sels, rotation=25 if len(sels) > 6 else 0)
        ax.set_xlabel(f"selection method (coreset ratio {ratio_label(ratios[0])})")
    else:
        for j, m in enumerate(ms):
            c = colors[j % len(colors)]
            for k, s in enumerate(sels):
                rows = sorted((r for r in agg["rows"] if r["select"] == s), key=lambda r: r["ratio"])
                xs = [r["ratio"] for r in rows]
                ys = [metric_pct(m, r["metrics"][m]["mean"]) for r in rows]
                es = [metric_pct(m, r["metrics"][m]["std"]) for r in rows]
                ax.errorbar(xs, ys, yerr=es, color=c, marker="os^vD<>"[k % 7], capsize=3,
                            ls="-" if m in agg["forget_metrics"] else "-.",
                            label=m + ("" if len(sels) == 1 else f" ({s})"))
            if m in agg["base"]:
                ax.axhline(metric_pct(m, agg["base"][m]), color=c, ls="--", lw=1, label=f"{m} (base model)")
        if ms and all(map(is_accuracy, ms)):   # multiple-choice accuracies: 4 choices
            ax.axhline(25, color="gray", ls=":", lw=1, label="chance (4 choices)")
        if all(r <= 1 for r in ratios):
            ax.set_xscale("log")
            ax.set_xticks(ratios, [ratio_label(r) for r in ratios])
            ax.minorticks_off()
        ax.set_xlabel("coreset ratio (fraction of the forget set)")
    ax.set_ylabel("accuracy (%)" if all(map(is_accuracy, ms)) else "MUSE metric (%)")
    return save_figure(fig, path, title, [ax])


def report(args, sels, ratios, seeds, record, with_plot=True):
    out = Path(args.out)
    cells = []
    for s in sels:
        for r in ratios:
            for seed in seeds:
                f = out / "cells" / cell_name(s, r, seed) / "result.json"
                if f.is_file():
                    cells.append(json.loads(f.read_text()))
    if not cells:
        raise CoresetError(f"--out {out}: no finished cells to report")
    agg = aggregate(cells, set(split_list(args.utility_tasks, "--utility-tasks")))
    what = f"{'/'.join(sels)} coresets" if len(sels) <= 2 else f"{len(sels)} selection methods"
    policy = f"{args.steps} steps" if args.steps else f"{args.budget}, {args.epochs:g} epoch(s)"
    title = f"{args.method.upper()} on {Path(args.forget.split(',')[0]).parent.name or args.forget}: " \
            f"{what}, {len(seeds)} seed(s), {policy}"
    done = len(cells)
    total = len(sels) * len(ratios) * len(seeds)
    cell_s = sum(c["time_s"] for c in cells)
    notes = ["", f"{done}/{total} cells done, {cell_s / 60:.1f} min of cell time on {record.get('device')}. Command:",
             "", "    python coreset_sweep.py " + " ".join(_quote(a) for a in record.get("argv", [])[1:])]
    md = markdown_table(agg, title, notes)
    record.update(results=agg, cells_done=len(cells), cells_total=len(sels) * len(ratios) * len(seeds))
    write_results(out, record, md, (lambda png: plot(agg, png, title)) if with_plot else None, args.docs)
    if with_plot:
        print(md)
    return agg


def sweep(args):
    """The whole grid -> the aggregate (also results.{json,md,png} in --out)."""
    t0 = time.time()
    args.retain = args.retain or methods.default_retain(args.method)
    sels = split_list(args.select, "--select")
    for s in sels:
        if s not in coreset.METHODS:
            raise CoresetError(f"--select {s!r}: expected some of {', '.join(coreset.METHODS)}")
    ratios = [coreset.parse_ratio(r, "--ratios") for r in split_list(args.ratios, "--ratios")]
    seeds = split_list(args.seeds, "--seeds", int)
    forget = split_list(args.forget.split(","), "--forget")
    try:
        corpora = [data.read_corpus(p) for p in forget]
    except data.DataError as e:
        raise CoresetError(f"--forget: {e}") from None
    sizes = [len(c) for c in corpora]
    out = Path(args.out)
    record = run_info(args)
    record["timings"] = {}
    spend = cell_budget(args, corpora)
    record["budget"] = {"policy": "steps" if args.steps else args.budget, "epochs": args.epochs, **spend}
    orders = methods.resolve(unlearn_overrides(args, 0, out, cell_budget=spend)).retain_orders
    if args.procs_per_cell > 1 and orders > 1:
        raise CoresetError("--procs-per-cell: a cell of several retain orders (the toy NPO's --retain-orders 3) runs "
                           "in one process; add --unlearn-args \"--retain-orders 1\" or drop --procs-per-cell")
    grid = [(s, r, seed) for s in sels for r in ratios for seed in seeds]
    queue = sweep_queue.CellQueue(out / "cells", args.claim_stale_s)
    name = lambda g: cell_name(*g)
    gpus = split_list(args.gpus, "--gpus") if args.gpus else None
    config_of = lambda g: lambda result: methods.resolve(unlearn_overrides(args, g[2], out / "cells" / name(g),
                                                                           result.get("coreset"), spend))
    is_done = lambda g: finished(out / "cells" / name(g), spend, config_of(g))
    if args.retry_failed and not args.worker:
        queue.retry_failed(grid, name, is_done)
    if not args.report_only:
        todo = [g for g in grid if not is_done(g)]
        print(f"coreset sweep: {len(grid)} cells, {len(grid) - len(todo)} done, {len(todo)} to run -> {out}")
        if (gpus or args.workers > 1) and not args.worker:   # (--gpus: each worker sees only its own GPUs)
            record["workers"] = launch_workers(args, gpus)
        else:
            cache = {}   # selection scores per (method, file): scored once for every ratio (GraNd: per seed)
            for i, ((s, r, seed), claim) in enumerate(queue.claims(grid, name, is_done)):
                print(f"--- cell {i + 1} of {len(todo)} to run: select={s} ratio={r:g} seed={seed} "
                      f"({time.time() - t0:.0f}s elapsed)", flush=True)
                with claim:
                    run_cell(args, s, r, seed, sizes, cache, spend)
                if not args.worker:
                    report(args, sels, ratios, seeds, dict(record, timings={"total_s": time.time() - t0}),
                           with_plot=False)
    if args.worker:
        return None
    record["failed_cells"] = queue.failed_cells(grid, name, is_done)
    for cell, err in record["failed_cells"].items():
        print(f"coreset sweep: cell {cell} failed twice, not retried: {err}", file=sys.stderr)
    record["timings"]["total_s"] = time.time() - t0
    return report(args, sels, ratios, seeds, record)


def launch_workers(args, gpus) -> list:
    """Run the grid on one worker process per GPU (or --workers processes), each the same sweep reading its
    settings from --out/worker_args.json, and wait for them -> [{gpus, pid, returncode}]. A worker that dies leaves
    its cell's claim to go stale; the others take it over."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("gpus", "workers", "worker", "retry_failed")}
    atomic_write_json(out / "worker_args.json", settings)
    procs, k = [], args.procs_per_cell
    if gpus and (len(gpus) % k or len(gpus) < k):
        raise CoresetError(f"--gpus {','.join(gpus)}: expected a multiple of --procs-per-cell {k}")
    groups = [",".join(gpus[i:i + k]) for i in range(0, len(gpus), k)] if gpus else None
    for i in range(len(groups) if gpus else args.workers):
        env = dict(os.environ, **({"CUDA_VISIBLE_DEVICES": groups[i]} if gpus else {}))
        procs.append(subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker",
                                       str(out / "worker_args.json")], env=env))
    print(f"coreset sweep: {len(procs)} workers" + (f" on GPUs {' | '.join(groups)}" if gpus else ""), flush=True)
    done = [{"gpus": groups[i] if gpus else None, "pid": p.pid, "returncode": p.wait()} for i, p in enumerate(procs)]
    for d in done:
        if d["returncode"]:
            print(f"coreset sweep: worker {d['pid']} exited with {d['returncode']}; its unfinished cell, if any, "
                  "was taken over or is reported below", file=sys.stderr)
    return done


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.worker:   # a worker: the sweep's own settings, from the file its launcher wrote
        worker = args.worker
        args = argparse.Namespace(**{**vars(build_parser().parse_args([])), **json.loads(Path(worker).read_text()),
                                     "worker": worker, "gpus": None, "workers": 1})
    return cli_main("coreset sweep", sweep, args)


if __name__ == "__main__":
    main()
