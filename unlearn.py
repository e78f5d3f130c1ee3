"""Unlearning in plain loops: RMU (WMDP's reference algorithm) and NPO with its relatives (GradDiff, SimNPO),
trained on a coreset of the forget set, evaluated before and after.

    python unlearn.py                                          # RMU on the embedded toy (data/toy), full forget set
    python unlearn.py --ratio 0.05 --seed 0                    # ... on a seeded random 5% of the forget documents
    python unlearn.py --method npo --ratio 0.05 --print-config # the resolved settings, nothing run
    python unlearn.py --method rmu --model DIR --forget bio.jsonl,cyber.jsonl --retain wikitext.txt \
        --ratio 0.05 --data DATA --eval-tasks wmdp_bio,wmdp_cyber,mmlu --out runs/rmu
    python unlearn.py --method npo --coreset coreset.jsonl ...  # a coreset written by coreset.py
    python -m torch.distributed.run --standalone --nproc-per-node 4 unlearn.py --method npo ...   # 4 GPUs

In process: `record = run(methods.resolve({...}))`. Settings and their defaults live in methods.py (one function
resolves them); the math in losses.py; this file holds the loops. The record is run.json: the resolved config,
seed, coreset indices, loss per step, time, peak memory, versions, evaluation before and after.

The budget: --steps N, --epochs E (passes over the run's forget set), or (RMU) the reference's rule; --order file
(RMU's default, the reference's) or shuffle (a seeded permutation per epoch). budget.py has the rules; run.json's
"budget" says what the run saw (docs_seen per forget file), and a run that does not see its whole coreset says so.

RMU, by default exactly as the reference (REFERENCE section 2): per forget file ("topic") a control vector c; loss
mse(h_L(x_f), c) + alpha * mse(h_L(x_r), h_L^frozen(x_r)) at the output of decoder layer L = --layer-id, over every
position, pads included, with left-pad rows attending as in the reference's transformers (--pad-attention all);
only --params of --layer-ids train; topics interleaved; left padding with EOS; steps = min(max_num_batches,
#batches of the smallest FULL forget file, of the smallest retain file), so a coreset is cycled to the same number
of steps. Losses in fp32. objectives.py computes the same numbers cheaply (truncated forward, one frozen trunk,
no second model, an activation cache within --cache-gib).

NPO family (REFERENCE section 3): per step one forget batch (topics interleaved, right padding) and one retain
batch; fp32 master weights and Adam state for bf16 weights (--no-fp32-optimizer-state: pure bf16); npo / simnpo /
graddiff forget terms + gamma * CE_retain (gd) or KL(ref || current) (kl). Reference log-probs are computed once
before training (no second model resident); the log-probs go through the fused kernels (objectives.py).

Under torchrun (multigpu.py) the NPO family is sharded with FSDP2 and RMU runs data parallel; each rank takes its rows
of every global batch and the losses are weighed so that the run computes what one process computes. Rank 0
evaluates, gathers the weights and writes the outputs.

--update-scale S pulls the trained tensors back along the straight line to the base after the last step (task
arithmetic's coefficient; the checkpoint, "after" and the budget curve's points are the scaled model's),
--train-scope layers trains the NPO family's decoder layers only, and --retain-orders K trains K runs that differ
only in the order of the retain batches and keeps the plain average of their weights (run.json's "retain_orders"
has each member's losses and evaluation); data/toy/README.md has what they do on the toy.

Outputs in --out: model/ (Hugging Face layout, tokenizer copied) and run.json, written atomically. A non-finite
loss, or a non-finite weight after the last update, stops the run before anything is written. On a GPU the memory
the run needs is estimated before loading (methods.memory_estimate) and a run that cannot fit stops there.
Evaluation before and after uses the evaluator's settings (--eval-preset, --eval-bos, --eval-ll-dtype; recorded);
--eval-every K also evaluates every K steps (the budget curve). The base model's evaluation is cached in
<out>/../.eval_cache/ (keyed by model files, data, tasks, limit, dtype and the evaluator's settings).
"""
import argparse
import gc
import json
import math
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

import budget
import coreset
import evaluate
import losses
import methods
import multigpu
import optimizer
from objectives import RMU, ActCache, forget_loss, retain_ce, retain_kl, sequence_logps
from data import read_corpora, read_corpus
from infra import (ProjectError, atomic_write_json, check_output, cli_main, is_run_dir, peak_memory, per_topic, progress_bar,
                   resolve_dtype, run_info, staged_dir)
from loglik import eval_settings
from hf_tokenizer import TOKENIZER_FILES
from model import load


class UnlearnError(ProjectError):
    """A failed run (non-finite loss or weights, bad coreset); the message says what and where."""


# ----------------------------------------------------------------------------------------------- what trains

def trainable(model, cfg) -> dict:
    """name -> parameter trained: RMU (and the NPO family with --train-scope params) the listed matrices of the
    listed layers; the NPO family everything, or (--train-scope layers) the decoder layers' tensors only."""
    named = dict(model.named_parameters())
    if cfg.method != "rmu" and cfg.train_scope != "params":
        return named if cfg.train_scope == "all" else {k: v for k, v in named.items() if k.startswith("model.layers.")}
    out = {}
    for i in cfg.layer_ids:
        for pn in cfg.params:
            name = f"model.layers.{i}.{pn}.weight"
            if name not in named:
                raise UnlearnError(f"--params: no parameter {name} (expected e.g. mlp.down_proj, self_attn.o_proj)")
            out[name] = named[name]
    return out


def build(cfg, model):
    """The one place where what is trained and its optimizer are decided. Under FSDP2 (multigpu.shard, before
    this) the parameters are fp32 shards, the master copy, and a plain AdamW steps them."""
    model.requires_grad_(False)
    train = trainable(model, cfg)
    for p in train.values():
        p.requires_grad_(True)
    opt = optimizer.adamw(dict.fromkeys(train.values()), cfg.lr, cfg.adam_eps, cfg.weight_decay, cfg.hf_adam_eps,
                          cfg.fp32_optimizer_state, sharded=multigpu.is_sharded(model))
    return train, opt


# ----------------------------------------------------------------------------------------------- training

def training_steps(cfg, plan, opt, model, desc, after_step=None):
    """The loop both trainers share: per optimizer step set the learning rate and zero the gradients, then yield
    (step, its micro-batches, the progress bar); after each step after_step(step + 1) runs in eval mode (the
    budget curve's evaluations). The model is in train mode inside, in eval mode after."""
    model.train()
    bar = progress_bar(len(plan), desc, disable=not cfg.progress)
    try:
        for s, micro in enumerate(plan):
            for g in opt.param_groups:
                g["lr"] = optimizer.lr_at(s, len(plan), cfg.lr, cfg.warmup, cfg.lr_schedule)
            opt.zero_grad(set_to_none=True)
            yield s, micro, bar
            if after_step is not None:
                model.eval()
                after_step(s + 1)
                model.train()
    finally:
        bar.close()
        model.eval()


def finish_step(step, cfg, params, opt, bar, hist, parts_hist, tot, tf, tr, world=None):
    """The end of every training step: stop on a non-finite loss, average the gradients over data-parallel ranks
    (RMU; FSDP2 has reduced the NPO family's), clip, step, record the losses, update the bar."""
    if not math.isfinite(tot):
        raise UnlearnError(f"step {step}: loss is {tot} (forget {tf:.4g}, retain {tr:.4g}); stopped, no checkpoint "
                           "written (try a lower --lr or --max-grad-norm)")
    if world is not None and cfg.method == "rmu":
        world.average_grads(params)
    if cfg.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
    opt.step()
    hist.append(tot)
    parts_hist.append({"forget": tf, "retain": tr})
    bar.set_postfix(loss=f"{tot:.4g}", forget=f"{tf:.4g}", retain=f"{tr:.3g}")
    bar.update(1)


def check_weights_finite(train: dict, steps):
    """After the last update, before anything is saved: a non-finite weight stops the run (no checkpoint)."""
    for name, p in train.items():
        if not torch.isfinite(p).all():
            raise UnlearnError(f"{name}: non-finite weights after step {steps - 1} (the last update); stopped, no "
                               "checkpoint written (try a lower --lr or --max-grad-norm)")


def train_rmu(cfg, model, tok, fb, rb, plan, train, opt, device, after_step=None, world=multigpu.World()):
    n_topics = len(fb)
    coeffs, alphas = per_topic(cfg.steering_coeffs, n_topics), per_topic(cfg.alpha, n_topics)
    dtype = model.lm_head_weight.dtype
    cvec = [losses.control_vector(model.config.hidden_size, coeffs[t], cfg.seed, t, dtype).to(device)
            for t in range(n_topics)]
    rmu = RMU(model, train, cfg.layer_id, cfg.layer_ids, cfg.pad_attention)
    bos = tok.bos_token_id  # a special token: in a document only as the BOS the tokenizer adds
    counted = (lambda ids, mask: losses.content_positions(ids, mask, bos)) if cfg.masked_loss else \
        (lambda ids, mask: None)
    n_counted = lambda ids, mask: int(counted(ids, mask).sum()) if cfg.masked_loss else ids.numel()
    uses = {}
    for micro in plan:
        for t, f, r, rr in micro:
            uses[("f", t, f)] = uses.get(("f", t, f), 0) + 1
            uses[("r", r, rr)] = uses.get(("r", r, rr), 0) + 1
    cache = ActCache(uses, cfg.cache_gib * 2**30)
    params, hist, parts_hist = list(train.values()), [], []
    for s, micro, bar in training_steps(cfg, plan, opt, model, "rmu", after_step):
        tot, tf, tr = 0.0, 0.0, 0.0
        for t, f, r, rr in micro:
            def fwd_f():
                _, ids, mask, share = world.take(*fb[t][f], n_counted)
                ids, mask = ids.to(device), mask.to(device)
                return rmu.trunk(ids, mask), mask, counted(ids, mask), share

            def fwd_r():
                _, ids, mask, share = world.take(*rb[r][rr], n_counted)
                ids, mask = ids.to(device), mask.to(device)
                h = rmu.trunk(ids, mask)
                return h, mask, rmu.frozen_acts(h, mask), counted(ids, mask), share
            f_h, f_mask, f_cnt, sf = cache.get(("f", t, f), fwd_f)
            r_h, r_mask, r_tgt, r_cnt, sr = cache.get(("r", r, rr), fwd_r)
            loss, lf, lr_ = rmu.loss(f_h, f_mask, cvec[t], r_h, r_mask, r_tgt, alphas[t], f_cnt, r_cnt)
            if world.size > 1:   # each term is a mean over its own rows: weigh each by its share
                lf, lr_ = lf * sf, lr_ * sr
                loss = lf + alphas[t] * lr_
            (loss / len(micro)).backward()
            n = world.size * len(micro)
            tot, tf, tr = (tot + world.sum(loss.item()) / n, tf + world.sum(lf.item()) / n,
                           tr + world.sum(lr_.item()) / n)
        finish_step(s, cfg, params, opt, bar, hist, parts_hist, tot, tf, tr, world)
    return hist, parts_hist, {"cache_hits": cache.hits, "steering_coeffs": coeffs, "alphas": alphas}


def item_values(items, fn, batch_size):
    """fn(item batch) -> per-item values, over `items` in batches -> {item: value}."""
    out, items = {}, sorted(items)
    for a in range(0, len(items), batch_size):
        out.update(zip(items[a:a + batch_size], fn(tuple(items[a:a + batch_size]))))
    return out


def train_npo(cfg, model, tok, fb, rb, plan, train, opt, device, after_step=None, world=multigpu.World()):
    # reference quantities per item, once, before any update (under FSDP2 every rank computes all of them: the
    # forwards are collectives, and the pass is over the coreset only)
    ref, ref_h, W_ref = {}, {}, None
    if cfg.method == "npo":
        for t in range(len(fb)):
            def ref_logps(items):
                ids, mask = (x.to(device) for x in fb[t][items])
                lp_sum, ntok = sequence_logps(model, ids, mask)
                return (lp_sum / ntok.clamp_min(1) if cfg.npo_mean_tokens else lp_sum).tolist()
            ref[t] = item_values({i for micro in plan for tt, f, _, _ in micro if tt == t for i in f}, ref_logps,
                                 cfg.batch_size)
    if cfg.retain_loss == "kl":
        W_ref = multigpu.full_tensor(model.lm_head_weight.detach()).clone()
        for r in range(len(rb)):
            def ref_hidden(items):
                ids, mask = (x.to(device) for x in rb[r][items])
                with torch.no_grad():
                    h = model(ids, mask, output="hidden")                             # (B, T, d)
                keep = losses.next_token_targets(ids, mask) != -100                   # (B, T)
                return [h[b][keep[b]].to("cpu") for b in range(len(items))]
            ref_h[r] = item_values({i for micro in plan for _, _, rr_, rr in micro if rr_ == r for i in rr},
                                   ref_hidden, cfg.batch_size)
    # what each forget term averages over: sequences (NPO, SimNPO) or target tokens (GradDiff)
    f_count = losses.count_targets if cfg.method == "graddiff" else (lambda ids, mask: ids.shape[0])
    params, hist, parts_hist = list(train.values()), [], []
    for s, micro, bar in training_steps(cfg, plan, opt, model, cfg.method, after_step):
        tot, tf, tr = 0.0, 0.0, 0.0
        for m, (t, f, r, rr) in enumerate(micro):
            multigpu.set_gradient_sync(model, m == len(micro) - 1)   # FSDP2: reduce on the last micro-step only
            rows, ids, mask, sf = world.take(*fb[t][f], f_count)
            ids, mask = ids.to(device), mask.to(device)
            ref_f = torch.tensor([ref[t][f[i]] for i in rows], device=device) if ref else None
            lf = forget_loss(cfg, model, ids, mask, ref_f) * sf if world.size > 1 else \
                forget_loss(cfg, model, ids, mask, ref_f)
            loss, lr_ = lf, torch.zeros(())
            if cfg.retain_loss != "none" and cfg.gamma:
                rrows, rids, rmask, sr = world.take(*rb[r][rr], losses.count_targets)
                rids, rmask = rids.to(device), rmask.to(device)
                lr_ = retain_ce(model, rids, rmask) if cfg.retain_loss == "gd" else \
                    retain_kl(model, rids, rmask, torch.cat([ref_h[r][rr[i]] for i in rrows]), W_ref)
                lr_ = lr_ * sr if world.size > 1 else lr_
                loss = lf + cfg.gamma * lr_
            (loss / len(micro)).backward()
            n = world.size * len(micro)
            tot, tf, tr = (tot + world.sum(loss.item()) / n, tf + world.sum(lf.item()) / n,
                           tr + world.sum(lr_.item()) / n)
        finish_step(s, cfg, params, opt, bar, hist, parts_hist, tot, tf, tr, world)
    return hist, parts_hist, {"n_reference_items": sum(len(v) for v in ref.values())}


# ----------------------------------------------------------------------------------------------- evaluation

def evaluate_model(cfg, model, tok, dtype, settings, base: bool):
    """evaluate.py's tasks on the model with the evaluator's settings -> ({task: summary}, cached?); the base
    model's result is cached in <out>/../.eval_cache (keyed by the files it reads and every setting)."""
    cache_dir = Path(cfg.eval_cache_dir or Path(cfg.out).resolve().parent / ".eval_cache") if base else None
    return evaluate.evaluate_cached(model, tok, cfg.model, cfg.data, cfg.eval_tasks, cfg.eval_limit, dtype,
                                    cache_dir, batch_size=cfg.eval_batch_size, progress=cfg.progress and base,
                                    read_cache=cfg.eval_cache, bos=settings["bos"], ll_dtype=settings["ll_dtype"])


# ----------------------------------------------------------------------------------------------- run

def is_previous_run(path) -> bool:
    """An --out directory that holds only what a run of this script writes (run.json, the checkpoint's files)."""
    ckpt = lambda n: n in TOKENIZER_FILES or n in ("config.json", "model.safetensors", "model.safetensors.index.json") \
        or (n.startswith("model-") and n.endswith(".safetensors"))
    return is_run_dir(path, {"run.json": None, "model": ckpt})


def config_record(cfg) -> dict:
    """run.json's "config": the resolved settings and their dataclass."""
    return {"class": type(cfg).__name__, **asdict(cfg)}


def config_changes(record, cfg) -> list:
    """The settings in which a finished run (its run.json record) differs from `cfg`, a config resolved now: [] for
    the same run. A changed default (the toy's NPO recipe) shows here when the explicit arguments are the same. The
    progress bar is not a setting; steps a budget rule resolves during the run count only when cfg fixes them."""
    got = record.get("config") or {}
    want = json.loads(json.dumps(config_record(cfg)))
    return [k for k, v in want.items() if k != "progress" and not (k == "steps" and v is None) and got.get(k) != v]


def run(cfg, given=None, wrap_optimizer=None) -> dict:
    """One unlearning run from a resolved config (methods.resolve) -> the run record (also <out>/run.json).
    given: the settings the caller set explicitly (recorded as "args"; the full config as "config").
    wrap_optimizer(trained params {name: p}, optimizer) -> an object with zero_grad / step / param_groups used in
    the optimizer's place (connectivity.py's Bezier control point trains through it).
    The output directory is checked before any work and written as one unit: model/ and run.json land together
    when everything, the evaluation after training included, has finished; until then the previous run stays."""
    t_start = time.time()
    methods.check(cfg)
    world = multigpu.World.from_env(cfg.device)   # torchrun's ranks, or one process
    sharded = world.size > 1 and cfg.method != "rmu"   # the NPO family on FSDP2; RMU is data parallel
    if world.size > 1 and (cfg.eval_every or wrap_optimizer is not None):
        raise UnlearnError("--eval-every: one process only (the curve evaluates the model mid-run)")
    if cfg.retain_orders > 1 and (world.size > 1 or wrap_optimizer is not None):
        raise UnlearnError(f"--retain-orders {cfg.retain_orders}: one process and unlearn's own optimizer only (K > 1 "
                           "restarts the run); give --retain-orders 1" +
                           (" (the toy's NPO default is 3)" if methods.is_toy(cfg.model) else ""))
    cfg.progress = cfg.progress and world.main
    inputs = [cfg.model, *cfg.forget, *cfg.retain, cfg.coreset] + evaluate.task_files(cfg.eval_tasks, cfg.data)
    world.on_main(lambda: check_output(cfg.out, inputs, "--out", ours=is_previous_run, overwrite=cfg.overwrite,
                                       name="unlearn"))
    device = torch.device(world.device)
    dtype = resolve_dtype(cfg.dtype, device)
    info = run_info(dict(given) if given is not None else None)
    forget_docs = [read_corpus(f, cfg.min_chars, raw=t in cfg.raw_json_topics) for t, f in enumerate(cfg.forget)]
    real = [os.path.realpath(f) for f in cfg.retain]
    uniq = list(dict.fromkeys(real))  # wikitext,wikitext: one corpus
    retain_docs = read_corpora([cfg.retain[real.index(u)] for u in uniq], cfg.min_chars)
    retain_of = [uniq.index(r) for r in (real if len(real) > 1 else real * len(cfg.forget))]
    sel, forget_sel = coreset.chosen_documents(cfg, forget_docs)
    memory = methods.check_device_memory(cfg, device, dtype, shards=world.size if sharded else 1)
    settings = eval_settings(cfg.eval_preset, cfg.eval_bos, cfg.eval_ll_dtype, cfg.model)
    torch.manual_seed(cfg.seed)
    base_eval = lambda m, t: evaluate_model(cfg, m, t, dtype, settings, True) if cfg.eval_tasks else (None, False)
    if sharded:   # rank 0 scores the base in the run's dtype; then every rank holds its fp32 master shards
        before, before_cached = world.on_main(lambda: base_eval(*load(cfg.model, device, dtype))) or (None, False)
        model, tok = load(cfg.model, "cpu", torch.float32)   # fully_shard moves each rank's shards to its GPU
        multigpu.shard(model, world, dtype)
    else:
        model, tok = load(cfg.model, device, dtype)
        before, before_cached = world.on_main(lambda: base_eval(model, tok)) or (None, False)
    model.activation_checkpointing = getattr(cfg, "activation_checkpointing", False)
    fb, rb = budget.corpus_batches(cfg, tok, forget_sel, retain_docs)
    cfg.steps, rule = budget.resolve_steps(cfg, [len(d) for d in forget_docs], [len(b) for b in fb],
                                           [len(d) for d in retain_docs])
    plans = [budget.make_plan(cfg.steps, cfg.grad_accum, cfg.batch_size, [len(b) for b in fb], [len(b) for b in rb],
                              retain_of, cfg.order, cfg.seed, i) for i in range(cfg.retain_orders)]
    plan = plans[0]
    spent = budget.budget_record(plan, rule, cfg.order, cfg.forget, [len(d) for d in forget_docs],
                                 [b.doc_of for b in fb], uniq, [b.doc_of for b in rb])
    for line in budget.coverage_warnings(spent) if world.main else []:
        print(f"unlearn: warning: {line}", file=sys.stderr)
    out = Path(cfg.out)
    curve = [{"step": 0, "results": before}] if cfg.eval_every and cfg.eval_tasks else None
    curve_eval_s = [0.0]   # time in the curve's (or the retain orders') evaluations, kept out of train_s

    def after_step(step):   # the budget curve: the tasks every eval_every steps (the last step is the "after")
        if curve is not None and step % cfg.eval_every == 0 and step < cfg.steps:
            te = time.time()
            with optimizer.update_scaled(train, cfg.model, cfg.update_scale):
                curve.append({"step": step, "results": evaluate_model(cfg, model, tok, dtype, settings, False)[0]})
            curve_eval_s[0] += time.time() - te
    train, opt = build(cfg, model)
    if wrap_optimizer is not None:
        opt = wrap_optimizer(train, opt)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    trainer = train_rmu if cfg.method == "rmu" else train_npo
    members, soup = [], optimizer.WeightMean()
    for i, plan_i in enumerate(plans):   # --retain-orders K: K runs from the base, then the mean of their weights
        if i:
            optimizer.scale_update(train, cfg.model, 0.0)   # back to the base's weights, with a fresh optimizer
            train, opt = build(cfg, model)
        hist_i, parts_i, extra_i = trainer(cfg, model, tok, fb, rb, plan_i, train, opt, device,
                                           after_step if curve else None, world)
        if i == 0:
            hist, parts, extra = hist_i, parts_i, extra_i
        if len(plans) > 1:
            te = time.time()   # what this member alone would land (scaled as the run is), kept out of train_s
            with optimizer.update_scaled(train, cfg.model, cfg.update_scale):
                after_i = evaluate_model(cfg, model, tok, dtype, settings, False)[0] if cfg.eval_tasks else None
            members.append({"retain_order": i, "loss": hist_i, "loss_parts": parts_i, "after": after_i})
            soup.add(train)
            curve_eval_s[0] += time.time() - te
    if members:
        soup.write(train)
    if device.type == "cuda":
        torch.cuda.synchronize()
    train_s = time.time() - t0 - curve_eval_s[0]
    tokens = sum(len(x) for p_ in plans for micro in p_ for t, f, r, rr in micro for x in fb[t].tokens(f) +
                 (rb[r].tokens(rr) if cfg.method == "rmu" or cfg.retain_loss != "none" else []))
    full = multigpu.full_state(model, world) if sharded else None   # a collective: every rank
    peaks = world.gather(peak_memory(device))
    trained_names = list(train)
    if sharded:   # the shards and Adam state go before rank 0 loads the whole model to write and evaluate it
        model = opt = train = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    def land():   # rank 0: the checkpoint, the evaluation after, run.json; written as one unit
        final = model
        if sharded:   # the base's files with the trained weights gathered from the shards, in the run's dtype
            final, _ = load(cfg.model, device, dtype)
            missing, unexpected = final.load_state_dict(full, strict=False)
            if unexpected or set(missing) - ({"lm_head.weight"} if final.config.tie_word_embeddings else set()):
                raise UnlearnError(f"gathered state does not match {cfg.model}: missing {missing[:3]}, "
                                   f"unexpected {unexpected[:3]}")
        trained = trainable(final, cfg) if sharded else train
        optimizer.scale_update(trained, cfg.model, cfg.update_scale)
        check_weights_finite(trained, cfg.steps)
        record = {
            **info, "method": cfg.method, "seed": cfg.seed, "toy": methods.is_toy(cfg.model), "steps": cfg.steps,
            "budget": spent, "device": str(device), "dtype": str(dtype).removeprefix("torch."),
            "coreset": {"source": cfg.coreset or ("ratio" if cfg.ratio is not None else "all"), "ratio": cfg.ratio,
                        "files": cfg.forget, "n_docs": [len(d) for d in forget_docs],
                        "n_selected": [len(i) for i in sel], "indices": sel,
                        "texts_from_coreset": any(t != d[i] for ts, d, idx in zip(forget_sel, forget_docs, sel)
                                                  for t, i in zip(ts, idx))},
            "trained_params": trained_names, "loss": hist, "loss_parts": parts, **extra, "retain_orders": members,
            "train_s": round(train_s, 3), "steps_per_s": cfg.steps * len(plans) / train_s if train_s > 0 else None,
            "tokens_per_s": tokens / train_s if train_s > 0 else None, "curve_eval_s": round(curve_eval_s[0], 3),
            "peak_memory_bytes": peaks[0], "memory_estimate_bytes": memory,
            "world": {"size": world.size, "parallel": "fsdp2" if sharded else "data" if world.size > 1 else None,
                      "peak_memory_bytes_per_rank": peaks},
            "checkpoint": str(out / "model") if cfg.save else None,
            "eval": {"tasks": cfg.eval_tasks, "settings": settings, "before": before, "before_cached": before_cached,
                     "after": None},
            "config": config_record(cfg), "retain_of": retain_of,
        }
        with staged_dir(out) as stage:  # lands whole at the end of the block, or not at all
            if cfg.save:
                final.save_pretrained(stage / "model", tokenizer_dir=cfg.model)
            if cfg.eval_tasks:
                record["eval"]["after"], _ = evaluate_model(cfg, final, tok, dtype, settings, False)
                if curve is not None:
                    record["curve"] = curve + [{"step": cfg.steps, "results": record["eval"]["after"]}]
            record["time_s"] = round(time.time() - t_start, 3)
            atomic_write_json(stage / "run.json", record)
        if cfg.eval_tasks:
            print(evaluate.format_table(before, record["eval"]["after"], cfg.method, cfg.steps, train_s))
        print(f"unlearn: {cfg.method} {cfg.steps} steps ({spent['epochs']:g} epochs, {spent['order']} order)"
              + (f" x {len(plans)} retain orders, weights averaged," if len(plans) > 1 else "") +
              f" in {train_s:.1f}s ({cfg.steps * len(plans) / max(train_s, 1e-9):.2f} steps/s"
              + (f", {world.size} processes" if world.size > 1 else "") + "), "
              f"{sum(p['docs_seen'] for p in spent['forget'])} forget docs seen; wrote {out / 'run.json'}"
              + (f" and {out / 'model'}" if cfg.save else ""))
        return record
    return world.on_main(land)


# ----------------------------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    """Every flag defaults to 'not given' (methods.resolve fills it): what was given is what overrides."""
    p = argparse.ArgumentParser(description="Unlearning (RMU, NPO, GradDiff, SimNPO) on a coreset of the forget set. "
                                "Defaults: the reference recipe of the method (the toy's own on the toy model); "
                                "--print-config shows them.", argument_default=argparse.SUPPRESS)
    p.add_argument("--print-config", action="store_true", default=False, help="print the resolved settings and exit")
    p.add_argument("--settings-file", help="JSON of settings (as methods.resolve takes them); flags override it")
    p.add_argument("--method", help="rmu | npo | graddiff | simnpo (default rmu)")
    p.add_argument("--model", help="Hugging Face Llama/Mistral checkpoint directory (default: the embedded toy)")
    p.add_argument("--forget", help="forget corpora FILE[,FILE] (one per topic)")
    p.add_argument("--retain", help="retain corpora FILE[,FILE] (one per topic, or one; toy: its retain corpus for "
                   "the method, methods.toy_data)")
    sel = p.add_mutually_exclusive_group()
    sel.add_argument("--coreset", help="coreset JSONL written by coreset.py")
    sel.add_argument("--ratio", type=float, help="random coreset per forget file: fraction (<= 1) or count (> 1)")
    p.add_argument("--seed", type=int)
    p.add_argument("--out", help="output dir: model/ and run.json")
    b = p.add_argument_group("budget (budget.py)")
    b.add_argument("--steps", type=int, help="optimizer steps")
    b.add_argument("--epochs", type=float, help="passes over the run's forget set (coreset or full); replaces the "
                   "recipe's step count")
    b.add_argument("--order", choices=["file", "shuffle"], help="file: file order, cycled (RMU's default, the "
                   "reference's); shuffle: a seeded permutation per epoch (the NPO family's default)")
    p.add_argument("--data", help="DATA dir for --eval-tasks")
    p.add_argument("--eval-tasks", help="tasks evaluated before and after; 'none' skips")
    p.add_argument("--eval-limit", type=int, help="questions per task")
    p.add_argument("--eval-batch-size", type=int)
    p.add_argument("--eval-preset", help="evaluator settings: current (today's lm-eval) | wmdp-published (lm-eval "
                   "0.4.2 + transformers 4.38: no BOS, fp32 log-softmax)")
    p.add_argument("--eval-bos", choices=["config", "yes", "no", "lm-eval-0.4.2"], help="BOS rule (default: the preset's)")
    p.add_argument("--eval-ll-dtype", choices=["model", "float32"], help="log-softmax dtype (default: the preset's)")
    p.add_argument("--eval-every", type=int, help="also evaluate every N steps (run.json's curve); 0: off")
    p.add_argument("--min-chars", type=int)
    p.add_argument("--raw-json-topics", help="forget topics (0-based) read as raw JSON lines, as the reference reads "
                   "the cyber corpus (--raw-json-topics 1)")
    p.add_argument("--device")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--save", action=argparse.BooleanOptionalAction, help="write the checkpoint (default on)")
    p.add_argument("--eval-cache", action=argparse.BooleanOptionalAction, help="reuse the base model's evaluation")
    p.add_argument("--eval-cache-dir", help="where the base model's evaluation is cached (default: <out>/../.eval_cache)")
    p.add_argument("--overwrite", action="store_true", help="replace an --out that holds files of anything but a "
                   "previous run (a previous run's own output is replaced without it)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction)
    g = p.add_argument_group("optimization")
    g.add_argument("--lr", type=float)
    g.add_argument("--adam-eps", type=float)
    g.add_argument("--hf-adam-eps", action=argparse.BooleanOptionalAction, help="eps added to the uncorrected sqrt(v)")
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--batch-size", type=int)
    g.add_argument("--grad-accum", type=int)
    g.add_argument("--warmup", type=float, help="warmup steps (>= 1) or fraction of steps (< 1)")
    g.add_argument("--lr-schedule", choices=["constant", "linear", "cosine"])
    g.add_argument("--max-grad-norm", type=float, help="0: no clipping")
    g.add_argument("--fp32-optimizer-state", action=argparse.BooleanOptionalAction,
                   help="fp32 Adam moments and master weights for bf16 weights (NPO family: on; --no-...: pure bf16)")
    g.add_argument("--memory-check", action=argparse.BooleanOptionalAction,
                   help="on a GPU, stop before loading when the run's memory estimate exceeds the device's")
    g.add_argument("--forget-max-len", help="max tokens per forget document, one per topic (last repeats)")
    g.add_argument("--retain-max-len", type=int)
    g.add_argument("--update-scale", type=float, help="after the last step, theta = base + S * (theta - base) on the "
                   "trained tensors (task arithmetic's coefficient); 1: as trained")
    g.add_argument("--retain-orders", type=int, help="K > 1: train K runs that differ only in the retain batches' "
                   "order (the first is the K = 1 run) and keep the average of their weights; 1: one run")
    r = p.add_argument_group("RMU")
    r.add_argument("--max-num-batches", type=int)
    r.add_argument("--steering-coeffs", help="one per topic (last repeats)")
    r.add_argument("--alpha", help="retain weight, one per topic (last repeats)")
    r.add_argument("--layer-id", type=int, help="steering layer (activation after this decoder layer)")
    r.add_argument("--layer-ids", help="layers whose --params are trained (also the NPO family's, --train-scope params)")
    r.add_argument("--params", help="trained matrices inside each layer, comma list (mlp.down_proj)")
    r.add_argument("--masked-loss", action=argparse.BooleanOptionalAction, help="MSE over real tokens but BOS")
    r.add_argument("--cache-gib", type=float, help="activation cache budget (0: off)")
    r.add_argument("--pad-attention", choices=["all", "self"], help="left-pad rows attend to every position (the "
                   "reference's transformers 4.38.2, sdpa on CUDA) or to themselves only")
    n = p.add_argument_group("NPO / SimNPO / GradDiff")
    n.add_argument("--beta", type=float)
    n.add_argument("--gamma", type=float, help="retain term weight")
    n.add_argument("--delta", type=float, help="SimNPO margin")
    n.add_argument("--retain-loss", choices=["gd", "kl", "none"])
    n.add_argument("--npo-mean-tokens", action=argparse.BooleanOptionalAction, help="token-mean log-probs in NPO")
    n.add_argument("--train-scope", choices=methods.TRAIN_SCOPES, help="all: every parameter (the reference); "
                   "layers: the decoder layers only (embeddings, lm_head, final norm frozen); params: --params of --layer-ids")
    n.add_argument("--chunk-tokens", type=int, help="split documents into pieces of N tokens (MUSE); 0: truncate")
    n.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction,
                   help="recompute each decoder block in the backward (less memory, about a third more compute)")
    return p


def overrides_from_argv(argv) -> dict:
    """unlearn.py flags -> the dict methods.resolve takes (only the flags given)."""
    ov = vars(build_parser().parse_args(argv))
    ov.pop("print_config", None)
    return ov


def main(argv=None):
    args = build_parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k not in ("print_config", "settings_file")}
    if getattr(args, "settings_file", None):   # a config object another script wrote (the sweep's torchrun cells)
        try:
            overrides = {**json.loads(Path(args.settings_file).read_text()), **overrides}
        except (OSError, ValueError) as e:
            sys.exit(f"error: --settings-file {args.settings_file}: {e}")

    def work():
        cfg = methods.resolve(overrides)
        if args.print_config:
            print(methods.describe(cfg))
            return cfg
        return run(cfg, given=overrides)
    return cli_main("unlearn", work)


if __name__ == "__main__":
    main()
