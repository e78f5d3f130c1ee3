"""Benchmark the fused kernels against the bare-matmul floor, eager PyTorch, torch.compile and Liger.

    python -m benches.kernels                   # N=8192 (16 x 512), d=4096, V in {32000, 128256}, bf16
    python -m benches.kernels --quick           # N=2048 (4 x 512), d=1024, V=32000: a one-minute smoke run
    python -m benches.kernels --out run.json    # also write the JSON record to a file (atomically)

Three tasks, each timed with triton.testing.do_bench (median ms, L2 flushed between runs):
  fwd     per-token log-probs, no grad                           floor: 1 matmul  H W^T
  tok_fb  per-token log-probs, forward + backward of sum(g*logp)  floor: 4 matmuls H W^T twice, G W, G^T H
  npo_fb  NPO loss over S sequences, forward + backward          floor: 3 matmuls H W^T, G W, G^T H
Extra memory = peak allocated during one call - allocated before it - bytes of what the op must
produce (logp / loss, and grad_hidden + grad_weight for the backward tasks), in MiB.
Needs a CUDA GPU; without one it prints a one-line message and exits with status 2.
The last line printed is one JSON object with every number.
"""
import argparse
import datetime
import gc
import json
import sys
import time

# ----------------------------------------------------------------------------- defaults
N_SEQ = 16
SEQ_LEN = 512
D_MODEL = 4096
VOCABS = "32000,128256"
IMPLS = "ours,eager,compile,liger"
TASKS = "fwd,tok_fb,npo_fb"
BETA = 0.1
SEED = 0
WARMUP_MS = 25
REP_MS = 100
# targets from issue 6 (ratio to the floor; extra MiB by vocab)
TARGET_RATIO = {"fwd": 1.10, "tok_fb": 1.10, "npo_fb": 1.15}
TARGET_MIB = {32000: 256, 128256: 512}
# -----------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n-seq", type=int, default=N_SEQ, help="sequences (N = n_seq * seq_len tokens)")
    p.add_argument("--seq-len", type=int, default=SEQ_LEN)
    p.add_argument("--d", type=int, default=D_MODEL, help="hidden size")
    p.add_argument("--vocab", default=VOCABS, help="comma-separated vocabulary sizes")
    p.add_argument("--impls", default=IMPLS, help="comma-separated subset of ours,eager,compile,liger")
    p.add_argument("--tasks", default=TASKS, help="comma-separated subset of fwd,tok_fb,npo_fb")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--quick", action="store_true", help="small shapes: 4 x 512 tokens, d=1024, V=32000")
    p.add_argument("--warmup-ms", type=float, default=WARMUP_MS)
    p.add_argument("--rep-ms", type=float, default=REP_MS)
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--out", default="", help="also write the JSON record here (atomic)")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="run the script's code paths on CPU at toy shapes (checks the script, measures nothing)")
    a = p.parse_args(argv)
    if a.quick:
        a.n_seq, a.seq_len, a.d, a.vocab = 4, 512, 1024, "32000"
    if a.cpu_smoke:
        a.n_seq, a.seq_len, a.d, a.vocab = 2, 8, 16, "300"
        if a.impls == IMPLS:
            a.impls = "ours,eager,liger"
    a.vocab = [int(v) for v in a.vocab.split(",") if v]
    a.impls = [s for s in a.impls.split(",") if s]
    a.tasks = [s for s in a.tasks.split(",") if s]
    for s in a.impls:
        if s not in IMPLS.split(","):
            p.error(f"--impls: unknown implementation {s!r}, expected a subset of {IMPLS}")
    for s in a.tasks:
        if s not in TASKS.split(","):
            p.error(f"--tasks: unknown task {s!r}, expected a subset of {TASKS}")
    return a


# ----------------------------------------------------------------------------- implementations
def npo_loss(lp, ref):
    from losses import npo_loss as npo
    return npo(lp, ref, BETA)


def eager_logprob(h, w, t):
    import torch
    logits = (h @ w.t()).float()                                          # (N, V)
    return torch.log_softmax(logits, dim=-1).gather(1, t[:, None])[:, 0]  # (N,)


def eager_npo(h, w, t, ref, n_seq):
    lp = eager_logprob(h, w, t).view(n_seq, -1).sum(1)                    # (S,)
    return npo_loss(lp, ref).mean()


def make_impls(names):
    """{impl: {task: callable(H, W, t, g, ref, n_seq) -> output}} for the importable implementations."""
    import torch
    from lpkernels import fused_logprob, fused_sequence_loss
    impls = {}
    if "ours" in names:
        def ours_npo(h, w, t, ref, S):
            return fused_sequence_loss(h, w, t, [t.numel() // S] * S, npo_loss, extras=(ref,))
        impls["ours"] = {"logprob": fused_logprob, "npo": ours_npo}
    if "eager" in names:
        impls["eager"] = {"logprob": eager_logprob, "npo": eager_npo}
    if "compile" in names:
        impls["compile"] = {"logprob": torch.compile(eager_logprob, dynamic=False),
                            "npo": torch.compile(eager_npo, dynamic=False)}
    if "liger" in names:
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        except Exception as e:  # not installed: skip, say so
            print(f"# liger: not importable ({type(e).__name__}: {e}); skipped", file=sys.stderr)
        else:
            ce_mean = LigerFusedLinearCrossEntropyLoss(reduction="mean")
            ce_none = LigerFusedLinearCrossEntropyLoss(reduction="none")

            def first(x):
                return x[0] if isinstance(x, tuple) else x

            def liger_logprob(h, w, t):          # forward: -mean CE (its forward also forms gradients
                return -first(ce_mean(w, h, t))  # when inputs require grad; backward scales them)

            def liger_npo(h, w, t, ref, S):      # per-token CE, then NPO (Liger's backward scales by a
                lp = -first(ce_none(w, h, t)).view(S, -1).sum(1)   # scalar: timing only)
                return npo_loss(lp, ref).mean()
            impls["liger"] = {"logprob": liger_logprob, "npo": liger_npo, "mean_only": True}
    return impls


# ----------------------------------------------------------------------------- measuring
def bench(fn, grads, args):
    if args.cpu_smoke:
        t0 = time.perf_counter()
        for x in grads or []:
            x.grad = None
        fn()
        return (time.perf_counter() - t0) * 1e3
    import triton.testing
    return triton.testing.do_bench(fn, warmup=args.warmup_ms, rep=args.rep_ms, grad_to_none=grads,
                                   return_mode="median")


def extra_mib(fn, grads, out_bytes, args):
    import torch
    if args.cpu_smoke:
        return 0.0
    for x in grads:
        x.grad = None
    gc.collect()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del out
    for x in grads:
        x.grad = None
    return max(0.0, (peak - base - out_bytes) / 2**20)


def run_vocab(V, args, impls, dtype):
    import torch
    N, d, S = args.n_seq * args.seq_len, args.d, args.n_seq
    dev = "cpu" if args.cpu_smoke else "cuda"
    gen = torch.Generator(device=dev).manual_seed(args.seed)
    H = (torch.randn(N, d, device=dev, generator=gen)).to(dtype)                      # (N, d)
    W = (torch.randn(V, d, device=dev, generator=gen) / d ** 0.5).to(dtype)           # (V, d)
    t = torch.randint(0, V, (N,), device=dev, generator=gen)                          # (N,)
    g = torch.randn(N, device=dev, generator=gen)                                     # (N,) upstream
    ref = torch.randn(S, device=dev, generator=gen) * 10 - 10.0 * args.seq_len        # (S,) ref log-probs
    Hg, Wg = H.clone().requires_grad_(), W.clone().requires_grad_()
    elt = H.element_size()
    grad_bytes = (N * d + V * d) * elt
    rows = []

    # floors: bare matmuls measured in this run
    G = torch.empty(N, V, device=dev, dtype=dtype)                                     # (N, V) stand-in

    def floor1():
        return H @ W.t()

    def floor4():
        a = H @ W.t()
        b = H @ W.t()
        return a, b, G @ W, G.t() @ H

    def floor3():
        a = H @ W.t()
        return a, G @ W, G.t() @ H
    floors = {"fwd": bench(floor1, None, args), "tok_fb": bench(floor4, None, args),
              "npo_fb": bench(floor3, None, args)}
    del G
    empty_cache(dev)
    ours_lp = None
    for task in args.tasks:
        rows.append(dict(V=V, task=task, impl="floor", ms=floors[task], ratio=1.0, extra_mib=None))
        print_row(rows[-1])
        for name, im in impls.items():
            if task == "fwd":
                def fn(im=im):
                    with torch.no_grad():
                        return im["logprob"](H, W, t)
                grads, out_bytes = [], N * 4
            elif task == "tok_fb":
                if im.get("mean_only"):
                    def fn(im=im):
                        loss = im["logprob"](Hg, Wg, t)
                        loss.backward()
                        return loss
                else:
                    def fn(im=im):
                        lp = im["logprob"](Hg, Wg, t)
                        lp.backward(g)
                        return lp
                grads, out_bytes = [Hg, Wg], N * 4 + grad_bytes
            else:
                def fn(im=im):
                    loss = im["npo"](Hg, Wg, t, ref, S)
                    loss.backward()
                    return loss
                grads, out_bytes = [Hg, Wg], 4 + grad_bytes
            try:
                out = fn()                          # compile / autotune / first-call costs
                for x in grads:
                    x.grad = None
                check = None
                if task == "fwd" and not im.get("mean_only"):
                    if name == "ours":
                        ours_lp = out
                    elif ours_lp is not None:
                        check = (out.float() - ours_lp).abs().max().item()
                del out
                ms = bench(fn, grads, args)
                mib = extra_mib(fn, grads, out_bytes, args)
            except Exception as e:
                print(f"# {name} {task} V={V}: failed: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr)
                rows.append(dict(V=V, task=task, impl=name, ms=None, ratio=None, extra_mib=None,
                                 error=f"{type(e).__name__}: {str(e)[:200]}"))
                print_row(rows[-1])
                empty_cache(dev)
                continue
            row = dict(V=V, task=task, impl=name, ms=ms, ratio=ms / floors[task], extra_mib=mib)
            if check is not None:
                row["max_abs_diff_vs_ours"] = check
            if name == "ours" and not args.cpu_smoke:
                row["meets_time_target"] = row["ratio"] <= TARGET_RATIO[task]
                if V in TARGET_MIB:
                    row["meets_memory_target"] = mib <= TARGET_MIB[V]
            rows.append(row)
            print_row(row)
            gc.collect()
            empty_cache(dev)
    del H, W, Hg, Wg
    empty_cache(dev)
    return rows


def empty_cache(dev):
    import torch
    if dev == "cuda":
        torch.cuda.empty_cache()


HEADER = f"{'V':>7} {'task':<7} {'impl':<8} {'ms':>9} {'x floor':>8} {'extra MiB':>10}  note"


def print_row(r):
    """One table row, printed (and flushed) as soon as it is measured: a run cut short keeps what it measured."""
    ms = "-" if r["ms"] is None else f"{r['ms']:.3f}"
    ratio = "-" if r["ratio"] is None else f"{r['ratio']:.3f}"
    mib = "-" if r["extra_mib"] is None else f"{r['extra_mib']:.0f}"
    note = r.get("error", "")
    if "meets_time_target" in r:
        note = (f"target <= {TARGET_RATIO[r['task']]:.2f}x: {'met' if r['meets_time_target'] else 'MISSED'}"
                + (f"; <= {TARGET_MIB[r['V']]} MiB: {'met' if r['meets_memory_target'] else 'MISSED'}"
                   if "meets_memory_target" in r else ""))
    if "max_abs_diff_vs_ours" in r:
        note += f"max|logp - ours| {r['max_abs_diff_vs_ours']:.2e}"
    print(f"{r['V']:>7} {r['task']:<7} {r['impl']:<8} {ms:>9} {ratio:>8} {mib:>10}  {note}", flush=True)


def main(argv=None):
    args = parse_args(argv)
    import torch
    if not torch.cuda.is_available() and not args.cpu_smoke:
        print("benches/kernels.py: needs a CUDA GPU (torch.cuda.is_available() is False); nothing was measured",
              file=sys.stderr)
        return 2
    import triton
    dtype = getattr(torch, args.dtype)
    t0 = time.time()
    impls = make_impls(args.impls)
    rows = []
    print(HEADER, flush=True)
    for V in args.vocab:
        rows += run_vocab(V, args, impls, dtype)
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    rec = dict(bench="benches/kernels.py", date=now, seed=args.seed,
               device="cpu smoke run (not a measurement)" if args.cpu_smoke else torch.cuda.get_device_name(),
               torch=torch.__version__, triton=triton.__version__,
               args={k: v for k, v in vars(args).items()}, seconds=round(time.time() - t0, 1), results=rows)
    line = json.dumps(rec)
    if args.out:
        from infra import atomic_write_lines
        atomic_write_lines(args.out, [line])
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
