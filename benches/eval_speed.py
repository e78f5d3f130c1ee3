"""make bench-eval: multiple-choice questions/s of evaluate.py against lm-evaluation-harness's Hugging Face path
on the same weights and questions, with the predictions compared (GPU; REFERENCE section 8's anchors).

    python -m benches.eval_speed --model DIR --data DATA --tasks wmdp_bio,mmlu --limit 50
    python -m benches.eval_speed --random-shape zephyr-7b     # random 7B weights, the toy's tokenizer and questions

The harness is lm_eval's own HFLM when lm_eval is importable, else an emulation of its loglikelihood path, written
out here (harness_hf_loglikelihoods). Prints a line per task and writes bench_eval.json beside --out; the last
line printed is one JSON object.
"""
import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from data import MUSE_TASKS
from evaluate import DEFAULTS, EvalError, argmax_first, load_mc_task, mc_loglikelihoods, mc_pairs, mc_requests
from loglik import scoring_bar
from infra import ProjectError, atomic_write_json, cli_main, resolve_dtype, run_info
from model import load
from benches.random_model import SHAPES, write_random_checkpoint


def harness_hf_loglikelihoods(hf_model, tok, items, topic=None, batch_size=32, bos=None, progress=False, form="letter"):
    """The harness's Hugging Face path, emulated line for line (lm_eval HFLM._loglikelihood_tokens with its default
    logits_cache): requests grouped by context + continuation[:-1], one forward per group over (ctx + cont)[:-1]
    without attention mask, groups sorted by descending length, right padded to the longest of the batch;
    F.log_softmax(model(inps).logits, dim=-1) over every position (in the logits' dtype: bf16 for a bf16 model
    with transformers >= 4.46, fp32 before), gather, sum in that dtype, float(). -> per question a float per choice."""
    import torch.nn.functional as F
    reqs = mc_requests(tok, items, topic, bos, form)
    groups = {}  # key (ctx + cont[:-1]) -> list of (question, choice, ctx, cont)
    for q, r in enumerate(reqs):
        for j, c in enumerate(r["conts"]):
            groups.setdefault(tuple(r["ctx"] + c[:-1]), []).append((q, j, r["ctx"], c))
    # lm-eval sorts requests by (-len(ctx + cont), tokens) and keeps the longest continuation per group
    keys = sorted(groups, key=lambda k: (-(len(k) + 1), k))
    max_length = hf_model.config.max_position_embeddings  # HFLM.max_length; longer inputs lose their left end
    lls = [[None] * len(r["conts"]) for r in reqs]
    device = next(hf_model.parameters()).device
    bar = scoring_bar(len(keys), "harness", progress)
    for s in range(0, len(keys), batch_size):
        chunk = keys[s:s + batch_size]
        inputs = [k[-max_length:] for k in chunk]  # (ctx + cont)[-(max_length + 1):][:-1]
        T = max(len(k) for k in inputs)
        inps = torch.zeros((len(chunk), T), dtype=torch.long)
        for b, k in enumerate(inputs):
            inps[b, :len(k)] = torch.tensor(k, dtype=torch.long)
        with torch.no_grad():
            multi_logits = F.log_softmax(hf_model(inps.to(device)).logits, dim=-1)  # (B, T, V)
        for b, k in enumerate(chunk):
            for q, j, ctx, c in groups[k]:
                inplen = len(inputs[b])  # _select_cont_toks: logits[inplen - contlen : inplen]
                pos = torch.arange(inplen - len(c), inplen, device=device)
                lls[q][j] = float(multi_logits[b, pos, torch.tensor(c, device=device)].sum())
        bar.update(len(chunk))
    bar.close()
    return lls


def harness_lm_eval_loglikelihoods(hf_model, hf_tok, items, topic=None, batch_size=32, form="letter"):
    """lm-eval itself (when installed): HFLM.loglikelihood on our contexts and continuations."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    lm = HFLM(pretrained=hf_model, tokenizer=hf_tok, batch_size=batch_size)
    reqs, spans = [], []
    for it, (ctx, conts) in zip(items, mc_pairs(items, topic, form)):
        spans.append((len(reqs), len(conts)))
        reqs += [Instance(request_type="loglikelihood", doc=it, arguments=(ctx, c), idx=j) for j, c in enumerate(conts)]
    res = lm.loglikelihood(reqs, disable_tqdm=True)
    return [[res[a + j][0] for j in range(n)] for a, n in spans]


def bench(args, device=None):
    """make bench-eval: questions/s of ours and of the harness's HF path on the same weights and questions, with
    the predictions compared. Writes bench_eval.json beside --out. device None = CUDA (required)."""
    if device is None:
        if not torch.cuda.is_available():
            raise ProjectError("bench-eval needs a CUDA GPU (none found): it times our evaluator against the "
                               "harness's Hugging Face path; run it on a GPU machine")
        device = "cuda"
    try:
        import transformers
    except ImportError:
        raise ProjectError("bench-eval needs transformers (the harness's model class): pip install transformers") from None
    dtype = resolve_dtype(args.dtype, device)
    tasks = [t for t in args.tasks.split(",") if t and t not in MUSE_TASKS]
    if not tasks:
        raise EvalError("--tasks: bench-eval needs at least one multiple-choice task")
    sets = [load_mc_task(t, args.data, args.limit) for t in tasks]   # (name, items, topic, form)
    if getattr(args, "random_shape", None):
        # random weights of a real shape, in a checkpoint directory (under $TMPDIR) that both loaders read, removed
        # afterwards
        with tempfile.TemporaryDirectory(prefix="bench-eval-random-") as tmp:
            print(f"writing a random {args.random_shape} checkpoint (tokenizer of {args.model}) ...", flush=True)
            path = write_random_checkpoint(args.random_shape, Path(tmp) / "model", args.model, device, dtype)
            report = _bench(args, sets, path, device, dtype)
        report["model"] = f"{args.random_shape}-shaped, random weights (tokenizer of {args.model})"
    else:
        report = _bench(args, sets, args.model, device, dtype)
    out = Path(args.out).with_name("bench_eval.json")
    atomic_write_json(out, dict(report, run=run_info(args)))
    print(f"wrote {out}")
    return report


def _bench(args, sets, model_dir, device, dtype):
    """Times ours, then the harness's path, on the checkpoint at model_dir. -> the report (without the run record)"""
    import transformers
    cuda = torch.device(device).type == "cuda"
    ours, tok = load(model_dir, device, dtype)
    report = {"model": str(args.model), "dtype": str(dtype).replace("torch.", ""), "batch_size": args.batch_size,
              "ours_batch_tokens": args.batch_tokens,
              "device": torch.cuda.get_device_name() if cuda else "cpu", "tasks": {}}

    def timed(fn):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.time()
        r = fn()
        if cuda:
            torch.cuda.synchronize()
        return r, time.time() - t0

    # ours first, then free it: a 7B model twice does not fit everywhere
    warm = sets[0][1][:args.batch_size]
    run_ours = lambda items, topic, form: mc_loglikelihoods(ours, tok, items, topic, args.batch_size, bos=args.bos,
                                                            ll_dtype=args.ll_dtype, batch_tokens=args.batch_tokens,
                                                            form=form)
    run_ours(warm, *sets[0][2:])
    ours_ll = {}
    for name, items, topic, form in sets:
        ours_ll[name], dt = timed(lambda: run_ours(items, topic, form))
        report["tasks"][name] = {"n": len(items), "ours_s": dt, "ours_qps": len(items) / dt}
    del ours
    if cuda:
        torch.cuda.empty_cache()
    try:
        hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    except TypeError:  # transformers < 4.56 names it torch_dtype
        hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=dtype)
    hf = hf.to(device).eval()
    try:
        import lm_eval  # noqa: F401
        hf_tok = transformers.AutoTokenizer.from_pretrained(model_dir)
        harness = lambda items, topic, form: harness_lm_eval_loglikelihoods(hf, hf_tok, items, topic, args.batch_size,
                                                                            form)
        report["harness"] = "lm_eval " + getattr(lm_eval, "__version__", "?") + " HFLM"
    except ImportError:
        harness = lambda items, topic, form: harness_hf_loglikelihoods(hf, tok, items, topic, args.batch_size,
                                                                       args.bos, form=form)
        report["harness"] = "emulation of lm-eval HFLM (transformers " + transformers.__version__ + ")"
    harness(warm, *sets[0][2:])
    for name, items, topic, form in sets:
        ll, dt = timed(lambda: harness(items, topic, form))
        r = report["tasks"][name]
        p_h, p_o = [argmax_first(x) for x in ll], [argmax_first(x) for x in ours_ll[name]]
        same = sum(a == b for a, b in zip(p_h, p_o))
        r.update(harness_s=dt, harness_qps=len(items) / dt, speedup=dt / r["ours_s"], identical_predictions=same,
                 acc_ours=sum(p == it["answer"] for p, it in zip(p_o, items)) / len(items),
                 acc_harness=sum(p == it["answer"] for p, it in zip(p_h, items)) / len(items),
                 max_abs_ll_diff=max(abs(x - y) for a, b in zip(ll, ours_ll[name]) for x, y in zip(a, b)))
        print(f"{name}: n={len(items)}  ours {r['ours_qps']:.1f} q/s  harness {r['harness_qps']:.1f} q/s  "
              f"speedup {r['speedup']:.2f}x  identical predictions {same}/{len(items)}  "
              f"acc {r['acc_ours']:.4f} vs {r['acc_harness']:.4f}", flush=True)
    del hf
    if cuda:
        torch.cuda.empty_cache()
    return report


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULTS["model"])
    p.add_argument("--data", default=DEFAULTS["data"])
    p.add_argument("--tasks", default=DEFAULTS["tasks"])
    p.add_argument("--limit", type=int, default=50, help="questions per task (MMLU: per subject)")
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    p.add_argument("--batch-tokens", type=int, default=DEFAULTS["batch_tokens"])
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    p.add_argument("--bos", choices=["config", "yes", "no"], default="config")
    p.add_argument("--ll-dtype", choices=["model", "float32"], default=DEFAULTS["ll_dtype"])
    p.add_argument("--random-shape", choices=sorted(SHAPES), default=None,
                   help="time random weights of this shape (written to a temporary checkpoint under $TMPDIR, "
                        "removed afterwards; --model gives only the tokenizer): a 7B timing where no 7B checkpoint is at hand")
    p.add_argument("--out", default="runs/bench/bench_eval.json")
    args = p.parse_args(argv)
    args.bos = {"config": None, "yes": True, "no": False}[args.bos]
    rep = cli_main("bench-eval", bench, args)
    print(json.dumps(rep, default=str))
    return rep


if __name__ == "__main__":
    main()
