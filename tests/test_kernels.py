"""Tests for lpkernels/: the Triton kernels (under TRITON_INTERPRET=1 on CPU) and the chunked PyTorch
reference path, both against float64 PyTorch built from the full logits; the kernel benchmark (benches/kernels.py)
as a CPU smoke run. GPU tests skip without CUDA."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import lpkernels
from lpkernels import KernelInputError, TokenStats, fused_logprob, fused_sequence_loss, token_stats
from lpkernels._util import chunk_rows as pick_chunk_rows, kernels_interpreted

IGNORE = -100
TOL = {torch.float32: 1e-5, torch.bfloat16: 1.5e-2}   # max abs error relative to max |reference|
CUDA = torch.cuda.is_available()
BETA = 0.1
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(params=["triton", "reference"])
def dev(request, monkeypatch):
    """Device for the test tensors. 'triton': the Triton kernels, in the interpreter on CPU tensors
    (or compiled on CUDA tensors when the kernels were defined without the interpreter, i.e. on a GPU
    machine); 'reference': the chunked PyTorch path on CPU."""
    if request.param == "reference":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        return "cpu"
    if kernels_interpreted():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        return "cpu"
    return "cuda"


def npo(lp, ref):
    return -(2 / BETA) * F.logsigmoid(-BETA * (lp - ref))


def make(N, d, V, dtype, seed=0, n_ignore=3, dev="cpu"):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, d, generator=g).to(dtype)                       # (N, d)
    w = (2 / d ** 0.5 * torch.randn(V, d, generator=g)).to(dtype)      # (V, d) logits std ~2
    t = torch.randint(0, V, (N,), generator=g)                         # (N,)
    t[torch.randperm(N, generator=g)[:n_ignore]] = IGNORE
    t[0] = V - 1                                                       # last vocab column used
    return h.to(dev), w.to(dev), t.to(dev)


def full_logprob64(h, w, t):
    """float64 reference on CPU from the full (N, V) logits; h, w float64 (leaves for gradients)."""
    t = t.cpu()
    lsm = torch.log_softmax(h @ w.T, dim=-1)                           # (N, V)
    valid = t != IGNORE
    return lsm.gather(1, t.clamp_min(0)[:, None])[:, 0] * valid, lsm


def leaf64(x):
    return x.detach().cpu().double().requires_grad_()


def assert_near(got, ref, dtype, what):
    got, ref = got.detach().cpu().double(), ref.detach().cpu().double()
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} vs {tuple(ref.shape)}"
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    err = (got - ref).abs().max().item()
    scale = max(ref.abs().max().item(), 1e-3)
    assert err <= TOL[dtype] * scale, f"{what} ({dtype}): max err {err:.3g} > {TOL[dtype]} x {scale:.3g}"


# (N, d, V, chunk_rows): N not a multiple of the chunk or of the vocab block, V not a power of two
SHAPES = [(37, 16, 1000, 16), (9, 8, 257, None)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_fused_logprob(dev, dtype, shape):
    N, d, V, rows = shape
    h, w, t = make(N, d, V, dtype, dev=dev)
    h.requires_grad_()
    w.requires_grad_()
    logp = fused_logprob(h, w, t, ignore_index=IGNORE, chunk_rows=rows)
    assert logp.dtype == torch.float32 and logp.shape == (N,)
    assert (logp[t == IGNORE] == 0).all()
    g = torch.randn(N, generator=torch.Generator().manual_seed(1))    # random upstream gradient
    logp.backward(g.to(dev))
    h64, w64 = leaf64(h), leaf64(w)
    ref, _ = full_logprob64(h64, w64, t)
    ref.backward(g.double())
    assert_near(logp, ref, dtype, "logp")
    assert h.grad.dtype == dtype and w.grad.dtype == dtype
    assert_near(h.grad, h64.grad, dtype, "grad hidden")
    assert_near(w.grad, w64.grad, dtype, "grad weight")


def test_fused_logprob_batched_shape_and_partial_grad(dev):
    h, w, t = make(12, 8, 300, torch.float32, dev=dev)
    h3, t3 = h.reshape(3, 4, 8).requires_grad_(), t.reshape(3, 4)
    logp = fused_logprob(h3, w, t3, chunk_rows=5)                      # w needs no grad
    assert logp.shape == (3, 4)
    logp.sum().backward()
    assert w.grad is None and h3.grad.shape == (3, 4, 8)
    h64 = leaf64(h)
    ref, _ = full_logprob64(h64, w.cpu().double(), t)
    ref.sum().backward()
    assert_near(logp.reshape(-1), ref, torch.float32, "logp")
    assert_near(h3.grad.reshape(12, 8), h64.grad, torch.float32, "grad hidden")
    with torch.no_grad():
        assert torch.equal(fused_logprob(h3, w, t3, chunk_rows=5), logp.detach())


# unequal lengths, one sequence longer than the chunk (two-pass path), ignored tokens, N=46
LENS = [5, 17, 1, 9, 12, 2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mean_tokens", [False, True])
def test_fused_sequence_loss(dev, dtype, mean_tokens):
    N, d, V = sum(LENS), 16, 257
    h, w, t = make(N, d, V, dtype, seed=2, n_ignore=5, dev=dev)
    t[40:42] = IGNORE                                                  # sequence 5 (rows 44..45) partly
    t[44:46] = IGNORE                                                  # last sequence fully ignored
    S = len(LENS)
    ref_lp = (torch.randn(S, generator=torch.Generator().manual_seed(3)) * 3
              - (4.0 if mean_tokens else 40.0))                        # cached reference log-probs
    h.requires_grad_()
    w.requires_grad_()
    loss = fused_sequence_loss(h, w, t, torch.tensor(LENS), npo, extras=(ref_lp.to(dev),), mean_tokens=mean_tokens,
                               ignore_index=IGNORE, chunk_rows=8)
    assert loss.shape == () and loss.dtype == torch.float32
    (1.7 * loss).backward()                                            # upstream scalar != 1
    h64, w64 = leaf64(h), leaf64(w)
    tok, _ = full_logprob64(h64, w64, t)
    sid = torch.repeat_interleave(torch.arange(S), torch.tensor(LENS))
    lp = torch.zeros(S, dtype=torch.float64).index_add(0, sid, tok)
    if mean_tokens:
        lp = lp / torch.zeros(S, dtype=torch.float64).index_add(0, sid, (t.cpu() != IGNORE).double()).clamp_min(1)
    ref = npo(lp, ref_lp.double()).mean()
    (1.7 * ref).backward()
    assert_near(loss, ref, dtype, "loss")
    assert_near(h.grad, h64.grad, dtype, "grad hidden")
    assert_near(w.grad, w64.grad, dtype, "grad weight")
    with torch.no_grad():
        again = fused_sequence_loss(h, w, t, LENS, npo, extras=(ref_lp,), mean_tokens=mean_tokens,
                                    chunk_rows=8)
    assert_near(again, ref, dtype, "loss under no_grad")


def test_sequence_loss_cross_entropy_and_single_chunk(dev):
    # plain mean-token CE as a seq_loss, default chunk size (one chunk), weight frozen
    lens = [7, 3, 11]
    h, w, t = make(sum(lens), 8, 300, torch.float32, seed=4, dev=dev)
    h.requires_grad_()
    loss = fused_sequence_loss(h, w, t, lens, lambda lp: -lp, mean_tokens=True)
    loss.backward()
    assert w.grad is None
    h64 = leaf64(h)
    tok, _ = full_logprob64(h64, w.cpu().double(), t)
    sid = torch.repeat_interleave(torch.arange(3), torch.tensor(lens))
    n = torch.zeros(3, dtype=torch.float64).index_add(0, sid, (t.cpu() != IGNORE).double())
    ref = (-torch.zeros(3, dtype=torch.float64).index_add(0, sid, tok) / n).mean()
    ref.backward()
    assert_near(loss, ref, torch.float32, "loss")
    assert_near(h.grad, h64.grad, torch.float32, "grad hidden")


def test_sequence_loss_backward_twice_raises(dev):
    h, w, t = make(10, 8, 50, torch.float32, dev=dev)
    w.requires_grad_()
    loss = fused_sequence_loss(h, w, t, [4, 6], lambda lp: -lp)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_token_stats(dev, dtype, shape):
    N, d, V, rows = shape
    h, w, t = make(N, d, V, dtype, seed=5, dev=dev)
    st = token_stats(h, w, t, ignore_index=IGNORE, chunk_rows=rows)
    assert isinstance(st, TokenStats)
    tok, lsm = full_logprob64(leaf64(h), leaf64(w), t)
    p = lsm.exp()
    mean = (p * lsm).sum(-1)
    std = ((p * lsm.square()).sum(-1) - mean.square()).clamp_min(0).sqrt()
    for got, ref, name in zip(st, (tok, -mean, mean, std), TokenStats._fields):
        assert got.dtype == torch.float32 and not got.requires_grad
        assert_near(got, ref, dtype, name)


def test_token_stats_peaked_rows(dev):
    # very confident rows (large logit spread) keep std and entropy finite and accurate
    h, w, t = make(6, 8, 500, torch.float32, seed=6, dev=dev)
    h = h * 12
    st = token_stats(h, w, t)
    _, lsm = full_logprob64(h.cpu().double(), w.cpu().double(), t)
    p = lsm.exp()
    mean = (p * lsm).sum(-1)
    std = (p * (lsm - mean[:, None]).square()).sum(-1).sqrt()
    assert (st.entropy >= 0).all()
    assert torch.allclose(st.mean_logp.cpu().double(), mean, atol=1e-4, rtol=1e-4)
    assert torch.allclose(st.std_logp.cpu().double(), std, atol=2e-3, rtol=1e-3)


def test_bad_inputs():
    h, w, t = make(10, 8, 50, torch.float32)
    with pytest.raises(KernelInputError, match="hidden must be"):
        fused_logprob(h[:, :7], w, t)
    with pytest.raises(KernelInputError, match="targets must have shape"):
        fused_logprob(h, w, t[:9])
    with pytest.raises(KernelInputError, match=r"targets must lie in \[0, 50\)"):
        token_stats(h, w, torch.full((10,), 50))
    with pytest.raises(KernelInputError, match="share one dtype"):
        fused_logprob(h, w.to(torch.bfloat16), t)
    with pytest.raises(KernelInputError, match="integer"):
        fused_logprob(h, w, t.float())
    with pytest.raises(KernelInputError, match="summing to N=10"):
        fused_sequence_loss(h, w, t, [4, 5], lambda lp: -lp)
    with pytest.raises(KernelInputError, match="summing to N=10"):
        fused_sequence_loss(h, w, t, [11, -1], lambda lp: -lp)
    with pytest.raises(KernelInputError, match="leading dim S=2"):
        fused_sequence_loss(h, w, t, [4, 6], npo, extras=(torch.zeros(3),))
    with pytest.raises(KernelInputError, match=r"must map \(2,\)"):
        fused_sequence_loss(h, w, t, [4, 6], lambda lp: (-lp).sum())
    with pytest.raises(KernelInputError, match="chunk_rows"):
        fused_logprob(h, w, t, chunk_rows=0)
    assert issubclass(KernelInputError, ValueError)


def test_chunk_size_choice():
    cuda = torch.device("cuda")
    assert pick_chunk_rows(8192, 32000, torch.bfloat16, cuda) == 4096      # 2 chunks of 250 MiB
    assert pick_chunk_rows(8192, 128256, torch.bfloat16, cuda) == 2048     # 4 chunks of 501 MiB
    for N, V, dt in [(8192, 128256, torch.float32), (100, 32000, torch.bfloat16), (5000, 151936, torch.bfloat16)]:
        rows = pick_chunk_rows(N, V, dt, cuda)
        assert rows * V * torch.empty((), dtype=dt).element_size() <= lpkernels._util.MAX_CHUNK_BYTES
        assert 1 <= rows <= max(N, 16)
    assert pick_chunk_rows(1000, 32000, torch.float32, torch.device("cpu")) * 32000 * 4 <= 64 * 2**20


@pytest.mark.skipif(not kernels_interpreted(), reason="kernels compiled for the GPU (TRITON_INTERPRET unset at import)")
def test_interpret_flag_read_at_call_time(monkeypatch):
    # the same call runs the reference (TRITON_INTERPRET=0) and the interpreted kernels (=1)
    h, w, t = make(7, 8, 100, torch.float32)
    out = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("TRITON_INTERPRET", flag)
        out[flag] = token_stats(h, w, t).entropy
    assert torch.allclose(out["0"], out["1"], atol=1e-5)


# ---------------------------------------------------------------- GPU only (skip cleanly without CUDA)

@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("V", [32000, 50257])
def test_gpu_bf16_against_float64(monkeypatch, V):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    N, d = 1024, 256
    h, w, t = (x.cuda() for x in make(N, d, V, torch.bfloat16, seed=7))
    h.requires_grad_()
    w.requires_grad_()
    logp = fused_logprob(h, w, t, chunk_rows=384)
    g = torch.randn(N, device="cuda")
    logp.backward(g)
    h64, w64 = leaf64(h), leaf64(w)
    ref, lsm = full_logprob64(h64, w64, t)
    ref.backward(g.double().cpu())   # the float64 reference lives on the CPU
    assert_near(logp, ref, torch.bfloat16, "logp")
    assert_near(h.grad, h64.grad, torch.bfloat16, "grad hidden")
    assert_near(w.grad, w64.grad, torch.bfloat16, "grad weight")
    st = token_stats(h, w, t, chunk_rows=384)
    p = lsm.detach().exp()
    assert_near(st.entropy, -(p * lsm.detach()).sum(-1), torch.bfloat16, "entropy")


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_sequence_loss_memory_bounded(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    N, d, V = 2048, 512, 32000
    h, w, t = (x.cuda() for x in make(N, d, V, torch.bfloat16, seed=8))
    h.requires_grad_()
    w.requires_grad_()
    ref_lp = torch.randn(4, device="cuda") - 300
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = fused_sequence_loss(h, w, t, [512] * 4, npo, extras=(ref_lp,), chunk_rows=1024)
    loss.backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base - (h.numel() + w.numel()) * 2
    assert extra <= 1024 * V * 2 + 8 * 2**20, f"extra memory {extra / 2**20:.0f} MiB"
    assert torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all()


_COMPILE_SCRIPT = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from lpkernels.logprob import _lse_logp_kernel, _grad_kernel
from lpkernels.token_stats import _stats_kernel
common = dict(stride_x="i32", t_ptr="*i64", V="i32", ignore_index="i32", BLOCK_V="constexpr")
for dt in ("bf16", "fp32"):
    for fn, outs, warps in ((_lse_logp_kernel, ("lse_ptr", "logp_ptr"), 8), (_grad_kernel, ("lse_ptr", "c_ptr"), 8),
                            (_stats_kernel, ("logp_ptr", "ent_ptr", "mean_ptr", "std_ptr"), 16)):
        sig = {name: (f"*{dt}" if name == "x_ptr" else "*fp32" if name in outs else common[name])
               for name in fn.arg_names}
        triton.compile(ASTSource(fn=fn, signature=sig, constexprs={"BLOCK_V": 4096}),
                       target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
print("compiled")
"""


@pytest.mark.skipif(CUDA, reason="on a GPU machine the kernels are compiled and run by the GPU tests")
def test_kernels_compile_for_sm90_without_gpu():
    # the interpreter accepts code the compiler rejects: compile the real kernels (TTIR -> cubin) for an
    # H100 target in a subprocess without TRITON_INTERPRET; needs no GPU (about 5 s with an empty Triton cache)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    r = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and "compiled" in r.stdout, r.stderr[-2000:]


# ---------------------------------------------------------------- the benchmark script (make bench)

def test_kernel_bench_cpu_smoke_run(tmp_path):
    """`python -m benches.kernels --cpu-smoke` (what `make bench` runs, at toy shapes on the CPU): every task and
    implementation runs, the record is written, eager's log-probs agree with ours, and each ratio is its row's
    time over the floor measured in the same run."""
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "-m", "benches.kernels", "--cpu-smoke", "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rec = json.loads(out.read_text())
    assert rec["bench"] == "benches/kernels.py" and rec["device"].startswith("cpu smoke run")
    assert json.loads(r.stdout.strip().splitlines()[-1]) == rec            # the last line printed is the record
    rows = rec["results"]
    assert {(x["task"], x["impl"]) for x in rows} >= {(t, i) for t in ("fwd", "tok_fb", "npo_fb")
                                                       for i in ("floor", "ours", "eager")}
    floor = {x["task"]: x["ms"] for x in rows if x["impl"] == "floor"}
    for x in rows:
        if x["impl"] in ("ours", "eager"):
            assert "error" not in x, x
            assert x["ratio"] == pytest.approx(x["ms"] / floor[x["task"]])
    eager_fwd = [x for x in rows if x["task"] == "fwd" and x["impl"] == "eager"][0]
    assert eager_fwd["max_abs_diff_vs_ours"] < 1e-2                        # bf16 log-probs, |logp| ~ log 300


@pytest.mark.skipif(CUDA, reason="checks the no-GPU refusal")
def test_kernel_bench_refuses_without_gpu():
    from benches import kernels as bench_kernels
    assert bench_kernels.main([]) == 2
