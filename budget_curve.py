"""The budget curve: forget and utility accuracy against training steps, for the full forget set and for a coreset,
under the same number of steps. It shows how long a coreset needs to catch up with the full set (the paper's
"provided training is sufficiently extended"), measured rather than assumed.

    python budget_curve.py --method rmu --ratio 0.05 --every 25            # the embedded toy, CPU minutes
    python budget_curve.py --method rmu --model DIR --forget bio.jsonl,cyber.jsonl --retain wiki.txt \\
        --data DATA --tasks wmdp_bio,wmdp_cyber,mmlu --ratio 0.05 --epochs 1 --every 50 --out runs/curve
    (make budget-curve METHOD=rmu RATIO=0.05 EVERY=25)

Two unlearning runs (unlearn.run in process, no checkpoints kept): the full forget set and a seeded random `ratio`
coreset, each evaluated every --every steps inside the run (unlearn's eval_every; step 0 is the base model).
Steps: --steps N, or --epochs E of the FULL forget set (both runs get that count; the coreset is cycled), or by
default the method's own budget on the full set (the toy's defaults.json; RMU's reference rule; NPO's 500). Each
curve is one run: a --retain-orders K in the defaults (K runs averaged after their last step) is set to 1 here.
Writes --out/results.{json,md,png} (json: the run record, both curves, both runs' budgets) and, with --docs PREFIX,
copies them to PREFIX.{json,md,png}.
"""
import argparse
import shlex
import time
from pathlib import Path

import budget
import data
import evaluate
import methods
import unlearn
from hf_tokenizer import load_tokenizer
from infra import (TOY_DIR, TOY_MODEL, ProjectError, check_output, cli_main, is_results_file, pyplot,
                   run_info, save_figure, split_list, write_results)


def build_parser():
    p = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--method", default="rmu", help="unlearning method (unlearn.py --method)")
    p.add_argument("--model", default=str(TOY_MODEL))
    p.add_argument("--data", default=str(TOY_DIR), help="DATA dir of the evaluation tasks")
    p.add_argument("--forget", default=str(TOY_DIR / "forget_corpus.jsonl"))
    p.add_argument("--retain", default=None, help="retain corpus (default: the embedded toy's for --method, methods.toy_data)")
    p.add_argument("--tasks", default="toy_hazard,toy_general", help="evaluation tasks")
    p.add_argument("--utility-tasks", default=",".join(data.UTILITY_TASKS),
                   help="tasks that measure retained utility (the others are forget tasks)")
    p.add_argument("--ratio", default="0.05", help="the coreset: fraction (<= 1) or count (> 1) per forget file")
    p.add_argument("--seed", type=int, default=42)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--steps", type=int, default=None, help="optimizer steps of both runs")
    g.add_argument("--epochs", type=float, default=None, help="passes over the FULL forget set (both runs)")
    p.add_argument("--every", type=int, default=None, help="evaluate every K steps (default: steps / 10)")
    p.add_argument("--unlearn-args", default="", help="extra unlearn.py flags, e.g. \"--lr 1e-4 --order shuffle\"")
    p.add_argument("--eval-limit", type=int, default=None)
    p.add_argument("--out", default="runs/budget-curve")
    p.add_argument("--docs", default=None, help="also copy results.{md,json,png} to this prefix")
    p.add_argument("--device", default=None)
    p.add_argument("--no-progress", action="store_true")
    return p


def overrides(args, ratio, out) -> dict:
    ov = {"method": args.method, "model": args.model, "forget": args.forget, "retain": args.retain,
          "data": args.data, "eval_tasks": args.tasks, "eval_limit": args.eval_limit, "seed": args.seed,
          "ratio": ratio, "out": str(out), "save": False, "device": args.device, "progress": not args.no_progress,
          "eval_cache_dir": str(Path(args.out) / ".eval_cache"),
          "retain_orders": 1}   # a curve follows one run (a defaults' --retain-orders K is K runs averaged at the end)
    ov = {k: v for k, v in ov.items() if v is not None}
    extra = unlearn.overrides_from_argv(shlex.split(args.unlearn_args))
    if {"steps", "epochs", "eval_every", "eval_tasks"} & set(extra):
        raise ProjectError("--unlearn-args: give the budget (--steps / --epochs), --every and --tasks as this "
                           "script's own flags")
    ov.update(extra)
    return ov


def curve_steps(args) -> int:
    """Both runs' step count (see the module docstring)."""
    cfg = methods.resolve(overrides(args, None, Path(args.out) / "full"))
    docs = data.read_corpora(cfg.forget, cfg.min_chars)
    full = budget.full_set_items(cfg, docs, load_tokenizer(cfg.model) if getattr(cfg, "chunk_tokens", 0) else None)
    if args.steps is not None:
        return args.steps
    if args.epochs is not None:
        return budget.epoch_steps(args.epochs, cfg.batch_size, cfg.grad_accum, full)
    if cfg.steps is not None:
        return cfg.steps
    retain = [len(d) for d in data.read_corpora(cfg.retain, cfg.min_chars)]
    return budget.reference_steps(cfg.max_num_batches, cfg.batch_size, full, retain)


def run_curve(args, name, ratio, steps, every):
    """One run evaluated every `every` steps -> its curve (metric values per evaluated step) and budget."""
    sub = "full" if ratio is None else f"r{ratio}"
    given = {**overrides(args, ratio, Path(args.out) / sub), "steps": steps, "eval_every": every}
    rec = unlearn.run(methods.resolve(given), given=given)
    return {"name": name, "ratio": ratio, "budget": rec["budget"], "train_s": rec["train_s"],
            "curve_eval_s": rec["curve_eval_s"],
            "points": [{"step": p["step"], "metrics": evaluate.task_metrics(p["results"])} for p in rec["curve"]]}


def markdown(curves, metrics, util, title):
    head = ["step"] + [f"{c['name']}: {m} ({'utility' if data.is_utility(m, util) else 'forget'})" for c in curves for m in metrics]
    rows = {}
    for j, c in enumerate(curves):
        for p in c["points"]:
            rows.setdefault(p["step"], [None] * (len(curves) * len(metrics)))
            for k, m in enumerate(metrics):
                rows[p["step"]][j * len(metrics) + k] = p["metrics"].get(m)
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for step in sorted(rows):
        lines.append(f"| {step} | " + " | ".join("-" if v is None else f"{data.metric_pct(m, v):.1f}"
                                                for m, v in zip(metrics * len(curves), rows[step])) + " |")
    seen = "; ".join(f"{c['name']}: {sum(f['docs_seen'] for f in c['budget']['forget'])} documents seen, "
                     f"{c['budget']['epochs']:g} epochs, {c['train_s']:.0f}s of training" for c in curves)
    return "\n".join(lines + ["", "Metrics in % (accuracy; MUSE's as muse-bench reports them) at each evaluated step (step 0: the base model). " + seen]) + "\n"


def plot(curves, metrics, util, path, title):
    plt = pyplot("budget curve")
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for j, c in enumerate(curves):
        for k, m in enumerate(metrics):
            xs = [p["step"] for p in c["points"]]
            ys = [data.metric_pct(m, p["metrics"].get(m)) for p in c["points"]]
            ax.plot(xs, ys, color=colors[k % len(colors)], ls="-" if j == 0 else "--", marker="os"[j % 2], ms=3,
                    label=f"{m} ({'utility' if data.is_utility(m, util) else 'forget'}), {c['name']}")
    if all(map(data.is_accuracy, metrics)):   # multiple-choice accuracies: 4 choices
        ax.axhline(25, color="gray", ls=":", lw=1, label="chance (4 choices)")
    ax.set_xlabel("optimizer steps")
    ax.set_ylabel("accuracy (%)" if all(map(data.is_accuracy, metrics)) else "%")
    return save_figure(fig, path, title, [ax])


def main_work(args):
    t0 = time.time()
    args.retain = args.retain or methods.default_retain(args.method)
    if not split_list(args.tasks, "--tasks", allow_empty=True) or args.tasks.strip().lower() == "none":
        raise ProjectError("--tasks: the budget curve needs at least one evaluation task")
    inputs = [args.model, *split_list(args.forget.split(","), "--forget"), *split_list(args.retain.split(","), "--retain")]
    inputs += evaluate.task_files(split_list(args.tasks, "--tasks"), args.data)
    check_output(Path(args.out) / "results.json", inputs, "--out", kind="file", ours=lambda p: is_results_file(p, "curves"),
                 name="budget curve")
    steps = curve_steps(args)
    every = args.every or max(1, steps // 10)
    if every < 1:
        raise ProjectError(f"--every {every}: expected an integer >= 1")
    record = run_info(args)
    curves = [run_curve(args, "full set", None, steps, every),
              run_curve(args, f"{args.ratio} coreset", args.ratio, steps, every)]
    util = set(split_list(args.utility_tasks, "--utility-tasks"))
    metrics = list(dict.fromkeys(m for c in curves for p in c["points"] for m in p["metrics"]))
    metrics = [m for m in metrics if not data.is_utility(m, util)] + [m for m in metrics if data.is_utility(m, util)]
    title = f"{args.method.upper()}: full forget set vs {args.ratio} coreset, {steps} steps, seed {args.seed}"
    out = Path(args.out)
    record.update(steps=steps, every=every, curves=curves, metrics=metrics, time_s=round(time.time() - t0, 3))
    md = markdown(curves, metrics, util, title)
    write_results(out, record, md, lambda png: plot(curves, metrics, util, png, title), args.docs)
    print(md)
    return record


def main(argv=None):
    return cli_main("budget curve", main_work, build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
