"""Mode connectivity: is a coreset-unlearned model the same kind of model as a full-set one? The forget and utility
metrics along the straight line between two unlearned models of one base, theta(t) = (1 - t) theta_A + t theta_B,
and the barrier (Garipov et al. 2018; Frankle et al. 2020).

    python connectivity.py                      # the toy: trains A (RMU, full forget set) and B (a 5% coreset)
    python connectivity.py --a RUN_A/model --b RUN_B/model --base MODEL --data DATA --tasks wmdp_bio,mmlu
    (make connectivity METHOD=rmu RATIO=0.05)

Paths: A <-> B, and base <-> A, base <-> B (is forgetting a cliff or a slope?). Only the tensors that differ
between a path's two ends are interpolated (RMU: the three trained down_proj matrices), so a 7B path costs one
model in memory plus two copies of those tensors (kept on the CPU); the output lists them. Per path and metric,
at --points evenly spaced t (default 11, t = 0, 0.1, ..., 1):
    barrier = max_t [E(t) - ((1 - t) E(0) + t E(1))]   and the t where it occurs (> 0: above the straight line)
    dip     = min_t [ ... ]                              (< 0: below it)
Without --a / --b both ends are trained first with unlearn.run (same method, seed and settings; A on the full
forget set, B on a seeded random --ratio coreset) into --out/a and --out/b.
--bezier also fits a quadratic Bezier curve theta(t) = (1-t)^2 A + 2t(1-t) C + t^2 B (Garipov et al. 2018): C starts
at the midpoint and is trained by unlearn.run on the unlearning loss of the full forget set (the ends' method,
seed, budget and settings) at a fresh t ~ U(0, 1) per step (BezierControl), into --out/c; the curve is then walked
like the line. Does a low-loss curve join models that the straight line does not?
Writes --out/results.{json,md,png} (json: the run record, the interpolated tensors, every point); --docs PREFIX
copies them.
"""
import argparse
import json
import time
from contextlib import ExitStack
from pathlib import Path

import torch

import arms
import budget
import data
import evaluate
import methods
import unlearn
from infra import (TOY_DIR, TOY_MODEL, ProjectError, check_output, cli_main, is_results_file, parse_ratio,
                   pyplot, run_info, save_figure, split_list, write_results)
from loglik import eval_settings
from model import checkpoint_shards, iter_tensors, load, open_safetensors


def build_parser():
    p = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--a", default=None, help="checkpoint A (default: trained here on the full forget set)")
    p.add_argument("--b", default=None, help="checkpoint B (default: trained here on a --ratio coreset)")
    p.add_argument("--base", default=str(TOY_MODEL), help="the model both were unlearned from")
    p.add_argument("--method", default="rmu", help="unlearning method when A and B are trained here")
    p.add_argument("--ratio", default="0.05", help="B's coreset when trained here")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--forget", default=str(TOY_DIR / "forget_corpus.jsonl"))
    p.add_argument("--retain", default=None, help="retain corpus (default: the embedded toy's for --method, methods.toy_data)")
    p.add_argument("--unlearn-args", default="", help="extra unlearn.py flags for A and B, e.g. \"--epochs 1\"")
    p.add_argument("--data", default=str(TOY_DIR), help="DATA dir of the evaluation tasks")
    p.add_argument("--tasks", default="toy_hazard,toy_general", help="evaluation tasks")
    p.add_argument("--utility-tasks", default=",".join(data.UTILITY_TASKS),
                   help="tasks that measure retained utility (the others are forget tasks)")
    p.add_argument("--points", type=int, default=11, help="evenly spaced t in [0, 1]")
    p.add_argument("--bezier", action="store_true", help="also fit a quadratic Bezier curve A - C - B on the "
                   "unlearning loss (C: the method's own budget and settings, a fresh t per step) and walk it")
    p.add_argument("--eval-limit", type=int, default=None)
    p.add_argument("--eval-preset", default="current", help="evaluator settings (loglik.EVAL_PRESETS)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default=None)
    p.add_argument("--out", default="runs/connectivity")
    p.add_argument("--docs", default=None, help="also copy results.{md,json,png} to this prefix")
    p.add_argument("--no-progress", action="store_true")
    return p


def barrier(ts, values):
    """(max, argmax t, min, argmin t) of E(t) minus the straight line between E(0) and E(1)."""
    gaps = [v - ((1 - t) * values[0] + t * values[-1]) for t, v in zip(ts, values)]
    hi, lo = max(range(len(gaps)), key=gaps.__getitem__), min(range(len(gaps)), key=gaps.__getitem__)
    return {"barrier": gaps[hi], "barrier_t": ts[hi], "dip": gaps[lo], "dip_t": ts[lo]}


def differing_tensors(path_a, path_b) -> dict:
    """name -> (A's tensor, B's tensor) on the CPU for every tensor whose values differ (same names and shapes
    required: both must come from one base)."""
    def files_of(path):   # tensor name -> its shard
        out = {}
        for file in checkpoint_shards(Path(path)):
            with open_safetensors(file) as f:
                out.update(dict.fromkeys(f.keys(), file))
        return out
    in_a, in_b = files_of(path_a), files_of(path_b)
    if set(in_a) != set(in_b):
        raise ProjectError(f"{path_a} / {path_b}: different tensor names ({sorted(set(in_a) ^ set(in_b))[:4]}); "
                           "expected two models of one base")
    diff = {}
    with ExitStack() as stack:   # each shard of B opened once
        shard_b = {f: stack.enter_context(open_safetensors(f)) for f in set(in_b.values())}
        for file_a in sorted(set(in_a.values())):
            with open_safetensors(file_a) as fa:
                for k in fa.keys():
                    ta, tb = fa.get_tensor(k), shard_b[in_b[k]].get_tensor(k)
                    if ta.shape != tb.shape:
                        raise ProjectError(f"{k}: shape {tuple(ta.shape)} in {path_a}, {tuple(tb.shape)} in {path_b}")
                    if not torch.equal(ta, tb):
                        diff[k] = (ta, tb)
    return diff


def linear(t):
    return [1 - t, t]


def bezier(t):
    """The weights of A, C, B on the quadratic Bezier curve at t."""
    return [(1 - t) ** 2, 2 * t * (1 - t), t ** 2]


def walk(args, name, ends, settings, progress=True, weights=linear):
    """Evaluate the path through the checkpoints `ends` (A, B: the straight line; A, C, B with weights=bezier: the
    curve) -> {"path", "tensors", "points": [{t, metrics}], "barriers"}. Only the tensors that differ between
    consecutive checkpoints are set; the model is the first end's."""
    names = set()
    for x, y in zip(ends, ends[1:]):
        names |= set(differing_tensors(x, y))
    vals = [dict(iter_tensors(e, names)) for e in ends]
    model, tok = load(ends[0], args.device, args.dtype)
    params = dict(model.named_parameters())
    ts = [i / (args.points - 1) for i in range(args.points)]
    points = []
    for t in ts:
        w = weights(t)
        with torch.no_grad():
            for k in names:
                if k in params:   # a tied lm_head is the embedding matrix: set once
                    params[k].copy_(sum(wi * v[k].double() for wi, v in zip(w, vals)).to(params[k].dtype))
        res = evaluate.evaluate_tasks(model, tok, args.data, split_list(args.tasks, "--tasks"), args.batch_size,
                                      args.eval_limit, False, bos=settings["bos"], ll_dtype=settings["ll_dtype"])
        points.append({"t": t, "metrics": evaluate.task_metrics(evaluate.summarize(res))})
        if progress:
            print(f"connectivity: {name} t={t:.2f} " + " ".join(f"{m} {data.metric_pct(m, v):.1f}"
                                                           for m, v in points[-1]["metrics"].items()), flush=True)
    metrics = list(points[0]["metrics"])
    return {"path": name, "from": str(ends[0]), "to": str(ends[-1]), "through": [str(e) for e in ends[1:-1]],
            "tensors": sorted(names), "points": points,
            "barriers": {m: barrier(ts, [p["metrics"][m] for p in points]) for m in metrics}}


class BezierControl:
    """What unlearn.run trains in place of its optimizer when it fits the control point C of a quadratic Bezier
    curve between A and B (Garipov et al. 2018): before each step the trained tensors are set to
    theta(t) = (1-t)^2 A + 2t(1-t) C + t^2 B at a fresh t ~ U(0, 1); after the backward, C's gradient is
    2t(1-t) times theta's (the chain rule) and Adam (the run's own lr, betas, eps, weight decay; fp32) steps C.
    Between steps, and so in the checkpoint the run writes, the trained tensors hold C. The run's frozen
    references (RMU's frozen path, NPO's reference log-probs) are taken before the first step: the base's."""

    def __init__(self, train, inner, a, b, seed):
        self.train = train
        dev = lambda x, p: x.to(p.device, torch.float32)
        self.a = {n: dev(a[n], p) for n, p in train.items()}
        self.b = {n: dev(b[n], p) for n, p in train.items()}
        self.c = {n: ((self.a[n] + self.b[n]) / 2).requires_grad_(True) for n in train}   # the midpoint to start
        g = inner.param_groups[0]
        self.opt = torch.optim.AdamW(list(self.c.values()), lr=g["lr"], betas=g.get("betas", (0.9, 0.999)),
                                     eps=g.get("eps", 1e-8), weight_decay=g.get("weight_decay", 0.0))
        self.param_groups = self.opt.param_groups   # the run sets the scheduled lr here
        self.gen = torch.Generator().manual_seed(seed)
        self.ts = []

    def zero_grad(self, set_to_none=True):
        t = torch.rand((), generator=self.gen).item()
        self.ts.append(t)
        w = bezier(t)
        with torch.no_grad():
            for n, p in self.train.items():
                p.grad = None
                p.copy_(w[0] * self.a[n] + w[1] * self.c[n] + w[2] * self.b[n])

    def step(self):
        w = bezier(self.ts[-1])[1]
        for n, p in self.train.items():
            self.c[n].grad = None if p.grad is None else w * p.grad.float()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for n, p in self.train.items():
                p.copy_(self.c[n])


def train_control(args, a, b):
    """Fit the Bezier control point between A and B on the unlearning loss (the method, seed, budget and settings of
    the ends; the full forget set) into --out/c -> its checkpoint dir (the base with C in the trained tensors)."""
    common = {"out": str(Path(args.out) / "c"), "eval_tasks": "none", "progress": not args.no_progress,
              **arms.shared_settings(args)}   # --unlearn-args last, as for the ends
    common["update_scale"] = 1.0   # C is the fitted control point, not an unlearned model: kept as trained,
    common["retain_orders"] = 1    # and fitted once, on the ends' loss along the curve
    cfg = methods.resolve(common)
    ends = {}
    rec = unlearn.run(cfg, given=common, wrap_optimizer=lambda train, opt: ends.setdefault(
        "opt", BezierControl(train, opt, dict(iter_tensors(a, set(train))), dict(iter_tensors(b, set(train))),
                             args.seed)))
    return str(Path(args.out) / "c" / "model"), {"loss": rec["loss"], "t": ends["opt"].ts, "steps": rec["steps"]}


def train_ends(args):
    """A (full forget set) and B (a --ratio coreset), same method, seed and settings -> their checkpoint dirs."""
    common = arms.shared_settings(args)
    ends = arms.train_arms([("a", None, False), ("b", parse_ratio(args.ratio), False)], common, args.out,
                           not args.no_progress)
    return ends["a"], ends["b"]


def markdown(paths, util, title):
    lines = [f"### {title}", ""]
    for p in paths:
        ms = list(p["barriers"])
        lines += [f"**{p['path']}** ({len(p['tensors'])} tensors interpolated)", "",
                  "| t | " + " | ".join(f"{m} ({'utility' if data.is_utility(m, util) else 'forget'})" for m in ms) + " |",
                  "|" + "---|" * (len(ms) + 1)]
        lines += [f"| {q['t']:.2f} | " + " | ".join(f"{data.metric_pct(m, q['metrics'][m]):.1f}" for m in ms) + " |" for q in p["points"]]
        lines += ["| barrier (t) | " + " | ".join(f"{data.metric_pct(m, b['barrier']):+.1f} ({b['barrier_t']:.1f})"
                                                   for m, b in p["barriers"].items()) + " |",
                  "| dip (t) | " + " | ".join(f"{data.metric_pct(m, b['dip']):+.1f} ({b['dip_t']:.1f})"
                                               for m, b in p["barriers"].items()) + " |", ""]
    lines.append("Accuracy in %. barrier / dip: the largest rise above / fall below the straight line between the "
                 "path's two ends, in points, and where it occurs.")
    return "\n".join(lines) + "\n"


def plot(paths, path, title):
    plt = pyplot("connectivity")
    if plt is None:
        return None
    ms = list(paths[0]["barriers"])
    fig, axes = plt.subplots(1, len(ms), figsize=(4.2 * len(ms), 3.6), dpi=120, squeeze=False)
    for ax, m in zip(axes[0], ms):
        for p in paths:
            ax.plot([q["t"] for q in p["points"]], [data.metric_pct(m, q["metrics"][m]) for q in p["points"]], marker="o", ms=3,
                    label=p["path"])
        if data.is_accuracy(m):   # a multiple-choice accuracy (acc or acc_norm): 4 choices
            ax.axhline(25, color="gray", ls=":", lw=1)
        ax.set_xlabel("t (0: first end, 1: second end)")
        ax.set_ylabel(f"{m} ({'accuracy, ' if data.is_accuracy(m) else ''}%)")
    return save_figure(fig, path, title, axes[0])


def main_work(args):
    t0 = time.time()
    args.retain = args.retain or methods.default_retain(args.method)
    if args.points < 2:
        raise ProjectError(f"--points {args.points}: expected at least 2 (the two ends)")
    if (args.a is None) != (args.b is None):
        raise ProjectError("--a and --b: give both checkpoints, or neither (both are then trained here)")
    settings = eval_settings(args.eval_preset, None, None, args.base)
    inputs = [args.base, args.a, args.b, args.forget, args.retain] + \
        evaluate.task_files(split_list(args.tasks, "--tasks"), args.data)
    check_output(Path(args.out) / "results.json", inputs, "--out", kind="file", ours=lambda p: is_results_file(p, "paths"),
                 name="connectivity")
    record = run_info(args)
    tasks = split_list(args.tasks, "--tasks")
    n_q = sum(len(evaluate.load_mc_task(t, args.data, args.eval_limit)[1]) for t in tasks if t not in data.MUSE_TASKS)
    mc = json.loads((Path(args.base) / "config.json").read_text())
    est = budget.gpu_estimate(methods.param_counts(mc)[0], eval_questions=(3 + args.bezier) * args.points * n_q)
    print(f"connectivity: {est['line']} (the paths' multiple-choice evaluations; training A and B comes on top)",
          flush=True)
    a, b = (args.a, args.b) if args.a else train_ends(args)
    progress = not args.no_progress
    paths = [walk(args, "A <-> B", [a, b], settings, progress), walk(args, "base <-> A", [args.base, a], settings, progress),
             walk(args, "base <-> B", [args.base, b], settings, progress)]
    curve = None
    if args.bezier:
        c, curve = train_control(args, a, b)
        paths.insert(1, walk(args, "A <-> B (Bezier)", [a, c, b], settings, progress, weights=bezier))
    util = set(split_list(args.utility_tasks, "--utility-tasks"))
    title = f"{args.method.upper()}, seed {args.seed}: A = full forget set, B = {args.ratio} coreset" if not args.a \
        else f"Paths: A = {Path(a).parent.name}/{Path(a).name}, B = {Path(b).parent.name}/{Path(b).name}"
    out = Path(args.out)
    record.update(a=str(a), b=str(b), base=str(args.base), eval_settings=settings, paths=paths, bezier=curve, gpu_estimate=est,
                  time_s=round(time.time() - t0, 3))
    md = markdown(paths, util, title)
    write_results(out, record, md, lambda png: plot(paths, png, title), args.docs)
    print(md)
    return record


def main(argv=None):
    return cli_main("connectivity", main_work, build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
