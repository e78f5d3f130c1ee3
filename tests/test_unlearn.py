"""unlearn.py on tiny random models: RMU against hand computations and a naive two-model implementation, NPO and
relatives against their formulas, coreset semantics, failure modes, and the make target on the embedded toy."""
import copy
import json
import statistics
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import budget
import coreset
import helpers
import losses
import methods
import optimizer
import objectives as O
import unlearn as U
from hf_tokenizer import load_tokenizer
from model import ModelConfig, Transformer

ROOT = Path(__file__).resolve().parent.parent
WORDS = "the quick brown fox jumps over lazy dog answer alpha beta gamma delta river stone".split()


@pytest.fixture(autouse=True)
def reference_kernels(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # kernels' fast chunked PyTorch path on CPU


def write_corpus(path, n, seed, lo=3, hi=30):
    return helpers.write_corpus(path, n, seed, WORDS, lo, hi)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 4-layer random Llama (GQA) with a byte-level BPE tokenizer, two forget corpora and a retain corpus."""
    root = tmp_path_factory.mktemp("tiny")
    helpers.tiny_llama(root, WORDS, {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}, init=lambda m: [
        p.add_(0.1 * torch.randn_like(p)) for n, p in m.named_parameters() if "norm" in n], hidden_size=32,
        intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        bos_token_id=0, eos_token_id=1)
    return dict(root=root, model=str(root / "model"), forget=write_corpus(root / "forget_a.jsonl", 30, 1),
                forget2=write_corpus(root / "forget_b.jsonl", 11, 2), retain=write_corpus(root / "retain.jsonl", 40, 3))


def args_for(tiny, out, *extra, method="rmu"):
    base = ["--method", method, "--model", tiny["model"], "--forget", tiny["forget"], "--retain", tiny["retain"],
            "--out", str(out), "--no-progress", "--eval-tasks", "none", "--seed", "0", "--device", "cpu"]
    if method == "rmu":
        base += ["--layer-id", "2", "--layer-ids", "1,2"]
    return methods.resolve(U.overrides_from_argv(base + list(extra)))


def load_state(path):
    return Transformer.from_pretrained(path).state_dict()


# ----------------------------------------------------------------------------------------------- RMU

def test_rmu_changes_only_chosen_matrices(tiny, tmp_path):
    rec = U.run(args_for(tiny, tmp_path / "o", "--steps", "3", "--lr", "1e-2"))
    before, after = load_state(tiny["model"]), load_state(tmp_path / "o" / "model")
    chosen = {"model.layers.1.mlp.down_proj.weight", "model.layers.2.mlp.down_proj.weight"}
    assert set(rec["trained_params"]) == chosen
    for k in before:
        if k in chosen:
            assert not torch.equal(before[k], after[k]), k
        else:
            assert torch.equal(before[k], after[k]), f"{k} changed"
    # the checkpoint is a complete HF-layout directory with the tokenizer
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (tmp_path / "o" / "model").iterdir()}
    saved = json.loads((tmp_path / "o" / "run.json").read_text())
    assert saved["loss"] == rec["loss"] and len(rec["loss"]) == 3 and saved["coreset"]["source"] == "all"


def naive_acts(model, ids, mask, layer):
    """Residual stream after `layer`, from a full forward (logits and all) with a hook: the reference's way (left-pad
    rows attend to their whole row, as transformers 4.38.2 with sdpa on CUDA; test_rmu_padding checks that)."""
    grab = []
    h = model.model.layers[layer].register_forward_hook(lambda mod, i, o: grab.append(o))
    model(ids, mask, pad_rows="all")
    h.remove()
    return grab[0]


def left_batch(tok, texts, max_len):
    seqs = [tok.encode(t)[:max_len] for t in texts]
    return tok.pad(seqs, "left", pad_id=tok.eos_token_id)


def test_rmu_step_losses_equal_hand_computation(tiny, tmp_path):
    """Steps 0 and 1 of run() against an explicit two-model computation: control vector, left-padded EOS batches,
    unmasked MSE, and one transformers-style AdamW step by hand."""
    coeff, alpha, lr, eps = 3.0, 50.0, 1e-3, 1e-6
    rec = U.run(args_for(tiny, tmp_path / "o", "--steps", "2", "--lr", str(lr), "--steering-coeffs", str(coeff),
                         "--alpha", str(alpha), "--batch-size", "3", "--no-save"))
    tok = load_tokenizer(tiny["model"])
    from data import read_corpus
    fdocs, rdocs = read_corpus(tiny["forget"]), read_corpus(tiny["retain"])
    upd = Transformer.from_pretrained(tiny["model"])
    frozen = Transformer.from_pretrained(tiny["model"])
    u = torch.rand(1, 1, 32, generator=torch.Generator().manual_seed(0))
    c = coeff * u / u.norm()
    names = ["model.layers.1.mlp.down_proj.weight", "model.layers.2.mlp.down_proj.weight"]
    params = [dict(upd.named_parameters())[n] for n in names]

    def loss_at(k):
        fi, fm = left_batch(tok, fdocs[3 * k:3 * k + 3], 512)
        ri, rm = left_batch(tok, rdocs[3 * k:3 * k + 3], 512)
        af, ar = naive_acts(upd, fi, fm, 2), naive_acts(upd, ri, rm, 2)
        with torch.no_grad():
            ar0 = naive_acts(frozen, ri, rm, 2)
        return ((af - c) ** 2).mean() + alpha * ((ar - ar0) ** 2).mean()

    l0 = loss_at(0)
    assert rec["loss"][0] == pytest.approx(l0.item(), rel=1e-5)
    grads = torch.autograd.grad(l0, params)
    with torch.no_grad():  # transformers.AdamW, step 1: m = 0.1 g, v = 0.001 g^2
        for p, g in zip(params, grads):
            m, v = 0.1 * g, 0.001 * g * g
            p -= lr * math.sqrt(0.001) / 0.1 * m / (v.sqrt() + eps)
    assert rec["loss"][1] == pytest.approx(loss_at(1).item(), rel=1e-4)
    assert rec["loss_parts"][1]["retain"] > 0 and rec["loss_parts"][0]["retain"] == 0


@pytest.mark.parametrize("layer_ids,masked", [((1, 2), False), ((0, 2), True), ((2,), False)])
def test_shared_trunk_equals_two_full_models(tiny, layer_ids, masked):
    """The truncated, shared-trunk RMU (frozen path = copies of the trained matrices) gives the naive two-model
    loss and gradients, with padding, after the weights have moved away from the frozen copy."""
    tok = load_tokenizer(tiny["model"])
    from data import read_corpus
    fdocs, rdocs = read_corpus(tiny["forget"]), read_corpus(tiny["retain"])
    fi, fm = left_batch(tok, fdocs[:4], 64)
    ri, rm = left_batch(tok, rdocs[:4], 64)
    assert (fm == 0).any() and (rm == 0).any()
    model = Transformer.from_pretrained(tiny["model"])
    frozen = copy.deepcopy(model)
    names = [f"model.layers.{i}.mlp.down_proj.weight" for i in layer_ids]
    model.requires_grad_(False)
    train = {n: dict(model.named_parameters())[n] for n in names}
    rmu = O.RMU(model, train, 2, list(layer_ids))
    with torch.no_grad():  # the updated model has drifted from the frozen one
        for p in train.values():
            p.add_(0.05 * torch.randn_like(p))
    for p in train.values():
        p.requires_grad_(True)
    c = 4.0 * torch.ones(1, 1, 32) / math.sqrt(32)
    r_h = rmu.trunk(ri, rm)
    fc, rc = (losses.content_positions(fi, fm, tok.bos_token_id), losses.content_positions(ri, rm, tok.bos_token_id)) \
        if masked else (None, None)
    loss, lf, lr_ = rmu.loss(rmu.trunk(fi, fm), fm, c, r_h, rm, rmu.frozen_acts(r_h, rm), 7.0, fc, rc)
    g_ours = torch.autograd.grad(loss, list(train.values()))
    # naive: a second full model, full forwards
    naive_model = copy.deepcopy(model)
    naive_model.requires_grad_(True)
    af, ar = naive_acts(naive_model, fi, fm, 2), naive_acts(naive_model, ri, rm, 2)
    with torch.no_grad():
        ar0 = naive_acts(frozen, ri, rm, 2)
    if masked:  # real tokens after the BOS: left padding puts the BOS at the first real position
        first = fm.float().argmax(1)
        mf, mr = fm.clone().float(), rm.clone().float()
        mf[torch.arange(4), first] = 0
        mr[torch.arange(4), rm.float().argmax(1)] = 0
        assert (fi[torch.arange(4), first] == tok.bos_token_id).all()
        mf, mr = mf[..., None], mr[..., None]
        ref = ((af - c) ** 2 * mf).sum() / (mf.sum() * 32) + 7.0 * ((ar - ar0) ** 2 * mr).sum() / (mr.sum() * 32)
    else:
        ref = F.mse_loss(af, c.expand_as(af)) + 7.0 * F.mse_loss(ar, ar0)
    nparams = dict(naive_model.named_parameters())
    g_ref = torch.autograd.grad(ref, [nparams[n] for n in names])
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    for a, b in zip(g_ours, g_ref):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)
    # the frozen path used the frozen copies, not the drifted weights
    assert lr_.item() > 0


def test_activation_cache_does_not_change_the_run(tiny, tmp_path):
    a = U.run(args_for(tiny, tmp_path / "a", "--steps", "6", "--ratio", "4", "--no-save", "--cache-gib", "1"))
    b = U.run(args_for(tiny, tmp_path / "b", "--steps", "6", "--ratio", "4", "--no-save", "--cache-gib", "0"))
    assert a["cache_hits"] > 0 and b["cache_hits"] == 0
    assert a["loss"] == b["loss"]


def test_reference_step_count_and_topics(tiny, tmp_path):
    """Default steps: min(max_num_batches, batches of the smallest full forget file, of the retain file), even with a
    small coreset (which is then cycled); two forget files alternate."""
    rec = U.run(args_for(tiny, tmp_path / "o", "--ratio", "0.2", "--no-save", "--batch-size", "2",
                         "--max-num-batches", "100", "--forget", f"{tiny['forget']},{tiny['forget2']}",
                         # as the reference's wikitext,wikitext: one corpus, shared
                         "--retain", f"{tiny['retain']},{tiny['retain']}"))
    assert rec["steps"] == min(100, math.ceil(11 / 2), math.ceil(40 / 2)) == 6
    assert rec["coreset"]["n_selected"] == [6, 2]
    # steps (topic, k): (0,0) (1,0) (0,1) (1,1) (0,2) (1,2); topic 1 has one coreset batch, cycled (2 reuses); each
    # retain batch k serves both topics (3 reuses)
    assert rec["cache_hits"] == 5


# ----------------------------------------------------------------------------------------------- NPO family

def test_npo_simnpo_graddiff_losses_equal_formulas():
    lp = torch.tensor([-12.0, -3.5, -40.0])
    ref = torch.tensor([-10.0, -4.0, -41.0])
    beta = 0.1
    want = torch.tensor([-(2 / beta) * math.log(1 / (1 + math.exp(beta * (a - b)))) for a, b in zip(lp.tolist(), ref.tolist())])
    assert torch.allclose(losses.npo_loss(lp, ref, beta), want, rtol=1e-6)
    assert losses.npo_loss(ref, ref, beta).tolist() == pytest.approx([2 / beta * math.log(2)] * 3)
    n = torch.tensor([4.0, 2.0, 10.0])
    delta = 0.5
    want = torch.tensor([-(2 / beta) * math.log(1 / (1 + math.exp(beta * a / k + delta))) for a, k in zip(lp.tolist(), n.tolist())])
    assert torch.allclose(losses.simnpo_loss(lp / n, beta, delta), want, rtol=1e-6)


@pytest.mark.parametrize("method,mean_tokens", [("npo", False), ("npo", True), ("simnpo", True), ("graddiff", False)])
def test_forget_losses_through_kernels_equal_full_logits(tiny, method, mean_tokens):
    tok = load_tokenizer(tiny["model"])
    from data import read_corpus
    ids, mask = tok.pad([tok.encode(t) for t in read_corpus(tiny["forget"])[:4]], "right")
    model = Transformer.from_pretrained(tiny["model"])
    beta, delta = 0.1, 0.3
    ref = torch.tensor([-50.0, -20.0, -35.0, -60.0]) / (10 if mean_tokens else 1)
    from types import SimpleNamespace
    cfg = SimpleNamespace(method=method, beta=beta, delta=delta, npo_mean_tokens=mean_tokens)
    got = O.forget_loss(cfg, model, ids, mask, ref)
    got.backward()
    g_ours = model.lm_head.weight.grad.clone()
    model.zero_grad()
    logp = torch.log_softmax(model(ids, mask), -1)[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]  # (B, T-1)
    valid = mask[:, 1:].float()
    s, n = (logp * valid).sum(-1), valid.sum(-1)
    if method == "npo":
        lp = s / n if mean_tokens else s
        want = (-(2 / beta) * F.logsigmoid(-beta * (lp - ref))).mean()
    elif method == "simnpo":
        want = (-(2 / beta) * F.logsigmoid(-beta * s / n - delta)).mean()
    else:
        want = s.sum() / n.sum()  # -CE
    want.backward()
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    assert torch.allclose(g_ours, model.lm_head.weight.grad, rtol=1e-4, atol=1e-6)


def test_cached_reference_logps_equal_live(tiny, tmp_path):
    """Reference log-probs computed once (kernels) equal a live frozen model's (full logits); NPO's first step,
    where the model is still the reference, gives exactly (2/beta) log 2."""
    tok = load_tokenizer(tiny["model"])
    from data import read_corpus
    ids, mask = tok.pad([tok.encode(t) for t in read_corpus(tiny["forget"])[:5]], "right")
    model = Transformer.from_pretrained(tiny["model"])
    cached, ntok = O.sequence_logps(model, ids, mask)
    live = copy.deepcopy(model)
    logp = torch.log_softmax(live(ids, mask), -1)[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
    assert torch.allclose(cached, (logp * mask[:, 1:]).sum(-1), rtol=1e-5)
    assert ntok.tolist() == mask[:, 1:].sum(-1).float().tolist()
    rec = U.run(args_for(tiny, tmp_path / "o", "--steps", "3", "--lr", "1e-3", "--no-save", "--beta", "0.1",
                         "--order", "file", method="npo"))
    assert rec["loss_parts"][0]["forget"] == pytest.approx(20 * math.log(2), rel=1e-5)
    assert rec["loss_parts"][2]["forget"] < rec["loss_parts"][0]["forget"]


@pytest.mark.parametrize("extra", [["--retain-loss", "kl", "--grad-accum", "2"],
                                   ["--no-npo-mean-tokens", "--fp32-optimizer-state", "--dtype", "bfloat16"]])
def test_npo_options_run(tiny, tmp_path, extra):
    rec = U.run(args_for(tiny, tmp_path / "o", "--steps", "2", "--lr", "1e-3", "--no-save", "--ratio", "0.5",
                         *extra, method="npo"))
    assert len(rec["loss"]) == 2 and all(math.isfinite(x) for x in rec["loss"])
    if "kl" in extra:
        assert rec["loss_parts"][0]["retain"] == pytest.approx(0.0, abs=1e-6)  # KL(ref || ref)


@pytest.mark.parametrize("scope", [["--train-scope", "layers"],
                                   ["--train-scope", "params", "--layer-ids", "0,1", "--params", "mlp.up_proj,mlp.down_proj"]])
def test_train_scope_moves_its_tensors_and_nothing_else(tiny, tmp_path, scope):
    """layers: every decoder tensor (norms included), not the embeddings, LM head or final norm; params: exactly the
    listed matrices of the listed layers."""
    cfg = args_for(tiny, tmp_path / "o", "--steps", "2", "--lr", "1e-2", *scope, method="npo")
    rec = U.run(cfg)
    before, after = load_state(tiny["model"]), load_state(tmp_path / "o" / "model")
    if scope[1] == "layers":
        chosen = {k for k in before if k.startswith("model.layers.")}
    else:
        chosen = {f"model.layers.{i}.mlp.{m}.weight" for i in (0, 1) for m in ("up_proj", "down_proj")}
    assert set(rec["trained_params"]) == chosen and len(chosen) < len(before)
    for k in before:
        assert torch.equal(before[k], after[k]) == (k not in chosen), k
    mc = json.loads((Path(tiny["model"]) / "config.json").read_text())
    assert methods.param_counts(mc, cfg)[1] == sum(before[k].numel() for k in chosen)
    assert methods.param_counts(mc, args_for(tiny, tmp_path / "p", method="npo"))[1] == methods.param_counts(mc)[0]


@pytest.mark.parametrize("method,extra", [("rmu", []), ("npo", []), ("npo", ["--train-scope", "layers"])])
def test_update_scale_moves_the_trained_tensors_back_along_the_line_to_the_base(tiny, tmp_path, method, extra):
    """theta = base + s (theta_trained - base) on exactly the trained tensors; the same run at s = 1 gives
    theta_trained (CPU runs are bitwise repeatable)."""
    common = ["--steps", "3", "--lr", "1e-2", *extra]
    U.run(args_for(tiny, tmp_path / "full", *common, method=method))
    rec = U.run(args_for(tiny, tmp_path / "scaled", *common, "--update-scale", "0.3", method=method))
    base, full, scaled = (load_state(p) for p in (tiny["model"], tmp_path / "full" / "model",
                                                  tmp_path / "scaled" / "model"))
    assert rec["config"]["update_scale"] == 0.3
    moved = [k for k in base if not torch.equal(base[k], full[k])]
    assert moved and set(moved) <= set(rec["trained_params"])
    for k in base:
        want = base[k].double() + 0.3 * (full[k].double() - base[k].double())
        torch.testing.assert_close(scaled[k].double(), want, rtol=0, atol=1e-6)
        if k not in moved:
            assert torch.equal(scaled[k], base[k]), k


def test_budget_curve_points_are_the_scaled_models_and_training_goes_on_unscaled(tiny, tmp_path, monkeypatch):
    """With --update-scale and --eval-every, the curve's point at step k evaluates what a k-step run writes (the
    scaled weights), and the weights go on training as they were: the final checkpoint is the one a run without the
    curve writes. RMU's constant schedule and file order make step k the same in runs of any length."""
    from data import TASKS
    data = tmp_path / "data"
    data.mkdir()
    row = {"question": "the quick brown", "choices": ["fox", "dog", "river", "stone"], "answer": 0}
    for name in ("toy_hazard", "toy_general"):
        (data / TASKS[name][0]).write_text(json.dumps(row) + "\n")
    name = "model.layers.1.mlp.down_proj.weight"
    seen, evaluate_model = [], U.evaluate_model
    monkeypatch.setattr(U, "evaluate_model", lambda cfg, model, *a: (
        seen.append(dict(model.named_parameters())[name].detach().clone()), evaluate_model(cfg, model, *a))[1])
    common = ["--lr", "1e-2", "--update-scale", "0.5", "--data", str(data), "--eval-tasks", "toy_hazard,toy_general"]
    U.run(args_for(tiny, tmp_path / "one", "--steps", "1", *common))
    U.run(args_for(tiny, tmp_path / "plain", "--steps", "3", *common))
    seen.clear()
    rec = U.run(args_for(tiny, tmp_path / "curve", "--steps", "3", "--eval-every", "1", *common, "--no-eval-cache"))
    assert [p["step"] for p in rec["curve"]] == [0, 1, 2, 3] and len(seen) == 4   # before, steps 1 and 2, after
    assert torch.equal(seen[1], load_state(tmp_path / "one" / "model")[name])
    assert torch.equal(load_state(tmp_path / "curve" / "model")[name], load_state(tmp_path / "plain" / "model")[name])


@pytest.mark.parametrize("method,extra", [("npo", []), ("rmu", ["--order", "shuffle"])])
def test_retain_orders_average_runs_that_differ_only_in_the_retain_order(tiny, tmp_path, monkeypatch, method, extra):
    """--retain-orders 3: the first member is the one-order run (same losses, same weights), every member is the run
    its retain order alone gives (from the base, with a fresh optimizer), the members see the same forget batches and
    different retain batches, and the checkpoint is the plain mean of the members' weights."""
    common = ["--steps", "3", "--lr", "1e-2", "--ratio", "0.5", *extra]
    one = U.run(args_for(tiny, tmp_path / "one", *common, method=method))
    members, add = [], optimizer.WeightMean.add
    monkeypatch.setattr(optimizer.WeightMean, "add", lambda self, train: (
        members.append({k: p.detach().clone() for k, p in train.items()}), add(self, train)))
    rec = U.run(args_for(tiny, tmp_path / "soup", *common, "--retain-orders", "3", method=method))
    assert [m["retain_order"] for m in rec["retain_orders"]] == [0, 1, 2] and one["retain_orders"] == []
    assert rec["loss"] == rec["retain_orders"][0]["loss"] == one["loss"]
    assert rec["retain_orders"][1]["loss"] != one["loss"] and rec["retain_orders"][2]["loss"] != one["loss"]
    soup, single = load_state(tmp_path / "soup" / "model"), load_state(tmp_path / "one" / "model")
    assert len(members) == 3 and set(members[0]) == set(rec["trained_params"])
    for k, first in members[0].items():
        assert torch.equal(first, single[k]), k
        torch.testing.assert_close(soup[k], (members[0][k] + members[1][k] + members[2][k]) / 3, rtol=0, atol=1e-6)
    assert any(not torch.equal(members[0][k], members[1][k]) for k in members[0])
    plan_of = budget.make_plan   # a one-order run on retain order 2 is the third member: each starts from the base
    monkeypatch.setattr(budget, "make_plan", lambda *a: plan_of(*a[:8], 2))
    U.run(args_for(tiny, tmp_path / "two", *common, method=method))
    for k, third in load_state(tmp_path / "two" / "model").items():
        if k in members[2]:
            assert torch.equal(third, members[2][k]), k
    base = load_state(tiny["model"])
    for k in set(base) - set(rec["trained_params"]):
        assert torch.equal(soup[k], base[k]), k
    cfg = args_for(tiny, tmp_path / "x", *common, method=method)
    fb, rb = [3, 2], [5]
    plans = [plan_of(4, 1, 2, fb, rb, [0, 0], "shuffle", 7, i) for i in range(3)]
    assert plans[0] == plan_of(4, 1, 2, fb, rb, [0, 0], "shuffle", 7)   # order 0: the one-order plan
    assert all([(t, f) for m in p for t, f, _, _ in m] == [(t, f) for m in plans[0] for t, f, _, _ in m]
               for p in plans)
    assert len({tuple(rr for m in p for _, _, _, rr in m) for p in plans}) == 3 and cfg.retain_orders == 1


def test_kl_equals_full_kl():
    g = torch.Generator().manual_seed(0)
    h, hr = torch.randn(10, 8, generator=g, requires_grad=True), torch.randn(10, 8, generator=g)
    W, Wr = torch.randn(13, 8, generator=g), torch.randn(13, 8, generator=g)
    got = losses.kl_ref_current(h, W, hr, Wr, chunk=3)
    want = F.kl_div(torch.log_softmax(h @ W.T, -1), torch.log_softmax(hr @ Wr.T, -1), log_target=True,
                    reduction="batchmean")
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


def test_hf_adamw_matches_torch_and_fp32_master():
    g = torch.Generator().manual_seed(0)
    p1 = torch.nn.Parameter(torch.randn(5, 4, generator=g))
    p2 = torch.nn.Parameter(p1.detach().clone())
    o1 = optimizer.HFAdamW([p1], lr=1e-2, eps=1e-8, weight_decay=0.1)
    o2 = torch.optim.AdamW([p2], lr=1e-2, eps=1e-8, weight_decay=0.1)
    for _ in range(3):
        grad = torch.randn(5, 4, generator=g)
        p1.grad, p2.grad = grad.clone(), grad.clone()
        o1.step()
        o2.step()
    assert torch.allclose(p1, p2, atol=1e-6)
    # bf16 weights: tiny updates vanish without fp32 master weights, accumulate with them
    w = torch.nn.Parameter(torch.ones(64, dtype=torch.bfloat16))
    wm = torch.nn.Parameter(torch.ones(64, dtype=torch.bfloat16))
    o, om = optimizer.HFAdamW([w], lr=1e-4), optimizer.HFAdamW([wm], lr=1e-4, fp32_state=True)
    for _ in range(40):
        w.grad = torch.ones_like(w)
        wm.grad = torch.ones_like(wm)
        o.step()
        om.step()
    assert torch.equal(w, torch.ones_like(w)) and (wm < 1).all()
    assert om.state[wm]["exp_avg"].dtype == torch.float32


def test_adamw_takes_the_own_optimizer_only_where_torch_cannot():
    fp32 = [torch.nn.Parameter(torch.zeros(3))]
    bf16 = [torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))]
    assert type(optimizer.adamw(fp32, 1e-3, fp32_state=True)) is torch.optim.AdamW      # fp32 weights: nothing to keep
    assert type(optimizer.adamw(bf16, 1e-3, fp32_state=True)) is optimizer.HFAdamW     # bf16: fp32 master weights
    assert type(optimizer.adamw(bf16, 1e-3)) is torch.optim.AdamW                      # pure bf16, as asked
    opt = optimizer.adamw(fp32, 1e-3, eps=1e-6, weight_decay=0.1, hf_eps=True)         # the RMU reference's eps rule
    assert type(opt) is optimizer.HFAdamW and opt.param_groups[0]["hf_eps"] and opt.param_groups[0]["eps"] == 1e-6
    assert optimizer.adamw(fp32, 2e-3, weight_decay=0.1).param_groups[0]["weight_decay"] == 0.1


@pytest.mark.parametrize("extra,own", [([], False), (["--hf-adam-eps"], True),
                                       (["--fp32-optimizer-state", "--dtype", "bfloat16"], True),
                                       (["--fp32-optimizer-state"], False)])
def test_optimizer_is_torch_adamw_unless_a_run_needs_more(tiny, tmp_path, extra, own):
    """torch.optim.AdamW (foreach on CPU, fused on CUDA) unless the run needs the transformers-style eps or fp32
    master weights for low-precision parameters."""
    cfg = args_for(tiny, tmp_path / "o", *extra, method="npo")
    model = Transformer.from_pretrained(tiny["model"], dtype=getattr(torch, cfg.dtype or "float32"))
    _, opt = U.build(cfg, model)
    assert isinstance(opt, optimizer.HFAdamW) == own and (own or type(opt) is torch.optim.AdamW)


def test_lr_schedule():
    assert [optimizer.lr_at(s, 10, 1.0, 0.2, "linear") for s in (0, 1, 2)] == [0.5, 1.0, 1.0]
    assert optimizer.lr_at(9, 10, 1.0, 0.2, "linear") == pytest.approx(1 - 7 / 8)
    assert optimizer.lr_at(5, 10, 2.0, 0, "constant") == 2.0
    assert optimizer.lr_at(2, 10, 1.0, 2, "cosine", 0.1) == pytest.approx(1.0)   # first step after warmup
    assert optimizer.lr_at(10, 10, 1.0, 2, "cosine", 0.1) == pytest.approx(0.1)  # the floor at the end


# ----------------------------------------------------------------------------------------------- coreset

def test_ratio_draws_the_same_documents_as_coreset_random(tiny, tmp_path):
    """--ratio inside unlearn.py and `coreset.py --method random` are one draw (coreset.random_indices)."""
    cfg = args_for(tiny, tmp_path / "o", "--ratio", "0.2", "--seed", "3",
                   "--forget", f"{tiny['forget']},{tiny['forget2']}")
    from data import read_corpus
    sel = coreset.chosen_documents(cfg, [read_corpus(tiny["forget"]), read_corpus(tiny["forget2"])])[0]
    rec = coreset.select(coreset.SelectConfig(method="random", forget=f"{tiny['forget']},{tiny['forget2']}",
                                              ratio=0.2, seed=3, out=str(tmp_path / "cs.jsonl"), progress=False))
    assert sel == coreset.read_coreset(rec["coreset"], cfg.forget, [30, 11]) and [len(x) for x in sel] == [6, 2]


def test_coreset_file(tiny, tmp_path):
    cs = tmp_path / "cs.jsonl"
    cs.write_text("\n".join(json.dumps(x) for x in [
        {"file": tiny["forget"], "index": 7, "score": 0.5}, {"file": tiny["forget"], "index": 2, "score": None},
        {"file": tiny["forget2"], "index": 10, "score": 1}]) + "\n")
    assert coreset.read_coreset(cs, [tiny["forget"], tiny["forget2"]], [30, 11]) == [[2, 7], [10]]
    rec = U.run(args_for(tiny, tmp_path / "o", "--coreset", str(cs), "--steps", "5", "--no-save", "--batch-size", "2",
                         "--forget", f"{tiny['forget']},{tiny['forget2']}"))
    assert rec["coreset"]["indices"] == [[2, 7], [10]] and rec["coreset"]["source"] == str(cs)
    with pytest.raises(coreset.CoresetError, match="is not one of --forget"):  # a file the run does not use
        coreset.read_coreset(cs, [tiny["forget"]], [30])


@pytest.mark.parametrize("lines,msg", [
    (['{"file": "F", "index": 99, "score": null}'], "out of range"),
    (['{"file": "nope.jsonl", "index": 1, "score": null}'], "is not one of --forget"),
    (['{"file": "F", "index": "1"}'], "expected {"),
    (["not json"], "expected one JSON object"),
    (['{"file": "F", "index": 1, "score": null}', '{"file": "F", "index": 1, "score": 2.0}'], "duplicate index 1"),
    (['{"file": "F", "index": 1, "score": "high"}'], "'score'"),
    ([""], "selects no document"),
])
def test_bad_coreset_lines(tiny, tmp_path, lines, msg):
    cs = tmp_path / "cs.jsonl"
    cs.write_text("\n".join(l.replace('"F"', json.dumps(tiny["forget"])) for l in lines) + "\n")
    with pytest.raises((coreset.CoresetError, coreset.data.DataError), match=msg):
        coreset.read_coreset(cs, [tiny["forget"]], [30])


# ----------------------------------------------------------------------------------------------- failures

def test_nan_loss_stops_without_outputs(tiny, tmp_path):
    with pytest.raises(U.UnlearnError, match=r"step 1: loss is (inf|nan).*no checkpoint"):
        U.run(args_for(tiny, tmp_path / "o", "--steps", "3", "--lr", "1e30"))
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("method", ["npo", "graddiff", "simnpo"])
def test_non_finite_weights_stop_without_checkpoint(tiny, tmp_path, method):
    """The issue's case: a huge lr leaves every trained tensor non-finite while the last loss was finite."""
    with pytest.raises(U.UnlearnError, match=r"non-finite (weights|loss)|loss is (inf|nan)") as e:
        U.run(args_for(tiny, tmp_path / "o", "--steps", "2", "--lr", "1e6", "--max-grad-norm", "0", method=method))
    assert "no checkpoint" in str(e.value) and not (tmp_path / "o").exists()


def test_weight_check_names_the_tensor_and_step():
    w = {"a.weight": torch.ones(3), "b.weight": torch.tensor([1.0, float("nan")])}
    with pytest.raises(U.UnlearnError, match=r"^b\.weight: non-finite weights after step 4"):
        U.check_weights_finite(w, 5)


@pytest.mark.parametrize("argv,msg", [
    (["--forget", "/nonexistent/forget.jsonl"], "missing /nonexistent/forget.jsonl"),
    (["--coreset", "/nonexistent/cs.jsonl"], "--coreset: missing file"),
    (["--ratio", "0"], "--ratio 0.0: expected"),
    (["--ratio", "-0.5"], "--ratio -0.5: expected"),
    (["--ratio", "2.5"], "whole number"),
    (["--method", "ga"], "--method: unknown method 'ga'"),
    (["--layer-ids", "1,3"], "--layer-ids"),
    (["--update-scale", "-1"], "--update-scale -1.0: expected a number > 0"),
    (["--retain-orders", "0"], "--retain-orders 0: expected an integer >= 1"),
    (["--retain-orders", "2"], "--retain-orders 2: expected 1 with --order file"),
    (["--retain-orders", "2", "--order", "shuffle", "--eval-every", "2", "--eval-tasks", "toy_hazard"],
     "--retain-orders 2: expected 1 with --eval-every"),
])
def test_bad_inputs_give_one_line_errors(tiny, tmp_path, argv, msg):
    base = ["--model", tiny["model"], "--forget", tiny["forget"], "--retain", tiny["retain"], "--out",
            str(tmp_path / "o"), "--eval-tasks", "none", "--layer-id", "2", "--layer-ids", "1,2", "--no-progress"]
    with pytest.raises(SystemExit) as e:
        U.main(base + argv)
    text = str(e.value.code)
    assert text.startswith("error: ") and msg in text and "\n" not in text


def test_bench_designs_agree_on_cpu():
    """benches/unlearn_step.py's two designs train the same: the reference (two full models) and ours."""
    from benches.unlearn_step import bench_rmu
    cfg = ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=6, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8)
    for paired in (False, True):
        res = bench_rmu(cfg, "cpu", torch.float32, steps=3, warmup=1, batch=2, seq=8, layer_id=3,
                        layer_ids=(1, 2, 3), paired=paired)
        assert res["ours"]["losses"] == pytest.approx(res["reference"]["losses"], rel=1e-4)  # same training
        assert abs(res["speedup"] - res["reference"]["ms_per_step"] / res["ours"]["ms_per_step"]) <= 0.0051  # round(, 2)


def test_bench_without_cuda_is_one_line():
    if torch.cuda.is_available():
        pytest.skip("has CUDA")
    r = subprocess.run([sys.executable, "-m", "benches.unlearn_step"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and "needs a CUDA GPU" in r.stderr and len(r.stderr.strip().splitlines()) == 1


# ----------------------------------------------------------------------------------------------- the make target

TOY_READY = all((ROOT / "data" / "toy" / f).exists() for f in
                ("model/model.safetensors", "forget_corpus.jsonl", "retain_corpus.jsonl", "toy_hazard.cloze.jsonl",
                 "toy_general.cloze.jsonl"))


@pytest.mark.slow
@pytest.mark.skipif(not TOY_READY or shutil.which("make") is None, reason="embedded toy not built (make toy)")
def test_make_wmdp_rmu_table_on_toy(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="0")
    r = subprocess.run(["make", "-s", "wmdp-rmu", "RATIO=0.05", "STEPS=2", f"OUT={tmp_path}",
                        # a task given as a file path is reported under its file stem
                        "UNLEARN_FLAGS=--eval-limit 20 --no-progress --eval-tasks data/toy/toy_hazard.cloze.jsonl,toy_general"],
                       cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "toy_hazard" in r.stdout and "toy_general" in r.stdout and "| base" in r.stdout and "| rmu" in r.stdout
    runs = list(Path(tmp_path).rglob("run.json"))
    rec = json.loads(runs[0].read_text())
    assert rec["steps"] == 2 and rec["eval"]["after"]["toy_hazard.cloze"]["acc"] is not None


@pytest.mark.slow
@pytest.mark.skipif(not TOY_READY, reason="embedded toy not built (make toy)")
@pytest.mark.parametrize("method", ["rmu", "npo"])
def test_toy_defaults_meet_the_issue_targets(tmp_path, monkeypatch, method):
    """`make wmdp-rmu RATIO=0.05` (and wmdp-npo) with the toy's shipped defaults on the verification seeds 5-9, which
    the tuning never used (it used 0-4 and 10-14): at every seed hazard acc at most 35% (chance 25%) and general acc
    within 5 points of the base model; the spread of hazard acc over the five seeds at most 5 points; every document
    of the coreset seen. About 3 min (RMU) and 8 min (NPO: three retain orders per run) on a 2-core CPU."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    hazard = []
    for seed in range(5, 10):
        rec = U.run(methods.resolve({"method": method, "ratio": 0.05, "seed": seed, "out": str(tmp_path / f"s{seed}"),
                                     "save": False, "progress": False}))
        spent = rec["budget"]["forget"][0]
        assert spent["docs_selected"] == spent["docs_seen"] == 20
        before, after = rec["eval"]["before"], rec["eval"]["after"]
        assert after["toy_hazard"]["acc"] <= 0.35, (seed, after)
        # in points, rounded: "within 5 points" includes exactly 5 (9 of 180 questions), which a float compare of
        # the raw fractions can refuse (0.6167 - 0.05 = 0.5667000000000001)
        drop = round(100 * (before["toy_general"]["acc"] - after["toy_general"]["acc"]), 6)
        assert drop <= 5.0, (seed, before, after)
        hazard.append(100 * after["toy_hazard"]["acc"])
    assert statistics.stdev(hazard) <= 5.0, hazard


def test_interrupt_leaves_earlier_outputs(tiny, tmp_path, monkeypatch):
    out = tmp_path / "o"
    U.run(args_for(tiny, out, "--steps", "2"))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(U, "train_rmu", interrupted)
    argv = ["--model", tiny["model"], "--forget", tiny["forget"], "--retain", tiny["retain"], "--out", str(out),
            "--eval-tasks", "none", "--layer-id", "2", "--layer-ids", "1,2", "--steps", "2", "--no-progress"]
    with pytest.raises(SystemExit) as e:
        U.main(argv)
    assert e.value.code == 130
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_eval_cache_key_follows_model_and_question_files(tiny, tmp_path):
    """The cached base-model evaluation is keyed by the files it read: a regenerated question file (same path)
    or a changed model must miss the cache."""
    row = '{"question": "q", "choices": ["a", "b", "c", "d"], "answer": 0}\n'
    (tmp_path / "toy_hazard.cloze.jsonl").write_text(row)
    own = tmp_path / "own.jsonl"
    own.write_text(row)
    import evaluate
    key_of = lambda dtype: evaluate.eval_key(tiny["model"], tmp_path, ["toy_hazard", str(own)], None, dtype)
    key = key_of(torch.float32)
    assert key_of(torch.float32) == key
    assert key_of(torch.bfloat16) != key
    for f in (tmp_path / "toy_hazard.cloze.jsonl", own):
        f.write_text(row * 2)
        assert key_of(torch.float32) != key
        key = key_of(torch.float32)
    cfg = Path(tiny["model"]) / "config.json"
    os.utime(cfg, ns=(cfg.stat().st_atime_ns, cfg.stat().st_mtime_ns + 10**9))
    assert key_of(torch.float32) != key


# ----------------------------------------------------------------------------------------------- the reference's pads

def transformers_4_38_sdpa_mask(mask, dtype=torch.float32):
    """The additive (B, 1, T, T) mask transformers 4.38.2 gave Llama/Mistral attention with sdpa on CUDA (the WMDP
    reference's setup): _prepare_4d_causal_attention_mask_for_sdpa = causal, pads masked as keys, finfo.min where
    masked; then AttentionMaskConverter._unmask_unattended set every fully masked row (a left pad's) to 0, i.e.
    that query attends to every position of its row, future included."""
    B, T = mask.shape
    allowed = torch.ones(T, T, dtype=torch.bool).tril()[None] & mask[:, None, :].bool()   # (B, T, T)
    bias = torch.zeros(B, 1, T, T, dtype=dtype).masked_fill(~allowed[:, None], torch.finfo(dtype).min)
    return bias.masked_fill(~allowed.any(-1)[:, None, :, None], 0.0)


def test_the_4_38_mask_rule_on_its_own_docstring_example():
    """_unmask_unattended's docstring (transformers 4.38): attention_mask [[0,0,1],[1,1,1],[0,1,1]] -> attended
    [[1,1,1],[1,1,1],[0,0,1]], [[1,0,0],[1,1,0],[1,1,1]], [[1,1,1],[0,1,0],[0,1,1]]."""
    attended = transformers_4_38_sdpa_mask(torch.tensor([[0, 0, 1], [1, 1, 1], [0, 1, 1]]))[:, 0] == 0
    assert attended.int().tolist() == [[[1, 1, 1], [1, 1, 1], [0, 0, 1]], [[1, 0, 0], [1, 1, 0], [1, 1, 1]],
                                       [[1, 1, 1], [0, 1, 0], [0, 1, 1]]]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_rmu_loss_with_pads_equals_transformers(tiny, attn):
    """The full RMU loss (forget and retain terms over every position, left pads included) on left-padded EOS
    batches equals the one computed from transformers' LlamaForCausalLM hidden states under the reference's
    masking (transformers 4.38.2, sdpa, CUDA: pad rows attend to the whole row; position_ids 0..T-1)."""
    from transformers import LlamaForCausalLM
    tok = load_tokenizer(tiny["model"])
    from data import read_corpus
    fi, fm = left_batch(tok, read_corpus(tiny["forget"])[:4], 64)
    ri, rm = left_batch(tok, read_corpus(tiny["retain"])[4:8], 64)
    assert (fm == 0).sum() > 10 and (rm == 0).sum() > 10
    hf_frozen = LlamaForCausalLM.from_pretrained(tiny["model"], attn_implementation=attn, dtype=torch.float32)
    hf_upd = copy.deepcopy(hf_frozen)
    ours = Transformer.from_pretrained(tiny["model"])
    names = [f"model.layers.{i}.mlp.down_proj.weight" for i in (1, 2)]
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():   # the updated model has moved away from the frozen one
        for n in names:
            delta = 0.05 * torch.randn(dict(ours.named_parameters())[n].shape, generator=g)
            dict(ours.named_parameters())[n].add_(delta)
            dict(hf_upd.named_parameters())[n].add_(delta)
    # ours: the frozen path holds copies of the frozen matrices
    ours.requires_grad_(False)
    rmu = O.RMU(ours, {n: dict(ours.named_parameters())[n] for n in names}, 2, [1, 2], "all")
    rmu.frozen = {n: dict(hf_frozen.named_parameters())[n].detach().clone() for n in names}
    c = losses.control_vector(32, 5.0, 0, 0)
    r_h = rmu.trunk(ri, rm)
    loss, lf, lr_ = rmu.loss(rmu.trunk(fi, fm), fm, c, r_h, rm, rmu.frozen_acts(r_h, rm), 300.0)

    def hf_act(m, ids, mask):
        pos = torch.arange(ids.shape[1])[None].expand_as(ids)
        with torch.no_grad():
            return m(input_ids=ids, attention_mask=transformers_4_38_sdpa_mask(mask), position_ids=pos,
                     output_hidden_states=True).hidden_states[3]   # after decoder layer 2
    af, ar, ar0 = hf_act(hf_upd, fi, fm), hf_act(hf_upd, ri, rm), hf_act(hf_frozen, ri, rm)
    want_f, want_r = ((af - c) ** 2).mean(), ((ar - ar0) ** 2).mean()
    assert lf.item() == pytest.approx(want_f.item(), rel=1e-5) and lr_.item() == pytest.approx(want_r.item(), rel=1e-5)
    assert loss.item() == pytest.approx((want_f + 300.0 * want_r).item(), rel=1e-5)
    # the pad positions are what differs: attending only to itself gives another loss
    own = O.RMU(ours, {n: dict(ours.named_parameters())[n] for n in names}, 2, [1, 2], "self")
    own.frozen = rmu.frozen
    assert own.loss(own.trunk(fi, fm), fm, c, r_h, rm, rmu.frozen_acts(r_h, rm), 300.0)[1].item() != \
        pytest.approx(want_f.item(), rel=1e-3)
    # real tokens agree whatever the pad rule
    real = fm.bool()
    assert torch.allclose(ours(fi, fm, until_layer=2, pad_rows="self")[real], af[real], atol=1e-5)


def test_fp32_master_weights_keep_updates_pure_bf16_loses(tiny, tmp_path):
    """NPO on bf16 weights at a learning rate whose per-step update is below half a bf16 ulp for |w| in
    [1/16, 1/8): pure bf16 leaves those weights unchanged, the default fp32 master copy moves them."""
    base = Transformer.from_pretrained(tiny["model"], dtype=torch.bfloat16).state_dict()
    flags = ["--dtype", "bfloat16", "--lr", "1e-4", "--steps", "12", "--warmup", "0", "--lr-schedule", "constant",
             "--max-grad-norm", "0"]
    moved = {}
    for name, extra in (("master", []), ("pure", ["--no-fp32-optimizer-state"])):
        rec = U.run(args_for(tiny, tmp_path / name, *flags, *extra, method="npo"))
        assert rec["config"]["fp32_optimizer_state"] == (name == "master")
        after = Transformer.from_pretrained(tmp_path / name / "model", dtype=torch.bfloat16).state_dict()
        band = [(base[k], after[k]) for k in base if "proj" in k]
        moved[name] = sum(int(((a != b) & (a.abs() >= 1 / 16) & (a.abs() < 1 / 8)).sum()) for a, b in band)
    assert moved["pure"] == 0 and moved["master"] > 50, moved


def test_eval_settings_reach_the_evaluator_and_the_cache_key(tiny, tmp_path, monkeypatch):
    import evaluate
    seen = []
    real = evaluate.evaluate_tasks

    def spy(*a, **k):
        seen.append((k.get("bos"), k.get("ll_dtype")))
        return real(*a, **k)
    monkeypatch.setattr(evaluate, "evaluate_tasks", spy)
    data = tmp_path / "data"
    data.mkdir()
    (data / "toy_hazard.cloze.jsonl").write_text(
        '{"question": "the quick", "choices": ["fox", "dog", "river", "stone"], "answer": 0}\n' * 3)
    common = ["--data", str(data), "--eval-tasks", "toy_hazard", "--steps", "1", "--no-save"]
    rec = U.run(args_for(tiny, tmp_path / "a", *common, "--eval-preset", "wmdp-published"))
    assert rec["eval"]["settings"] == {"preset": "wmdp-published", "bos_rule": "lm-eval-0.4.2", "bos": False,
                                       "ll_dtype": "float32"}
    assert seen == [(False, "float32")] * 2 and rec["eval"]["before_cached"] is False
    rec = U.run(args_for(tiny, tmp_path / "b", *common, "--eval-bos", "yes"))   # another setting: not the cache
    assert seen[2:] == [(True, "model")] * 2 and rec["eval"]["before_cached"] is False
    rec = U.run(args_for(tiny, tmp_path / "c", *common, "--eval-preset", "wmdp-published"))
    assert rec["eval"]["before_cached"] is True and seen[4:] == [(False, "float32")]
    with pytest.raises(methods.ConfigError, match="--eval-preset"):
        methods.resolve({"eval_preset": "lm-eval-0.3"})


def test_memory_estimate_and_the_refusal():
    """The estimate for Zephyr-7B (config.json values): NPO with fp32 master weights and Adam state needs ~16 bytes
    per parameter; on an 80 GB card that is one line naming both numbers and the options. RMU fits."""
    zephyr = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, vocab_size=32000,
                  num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False)
    npo = methods.resolve({"method": "npo", "model": "/nonexistent", "forget": ["f"], "retain": ["r"]})
    est = methods.memory_estimate(npo, zephyr, 2)
    assert est["params"] == 7_241_732_096 and est["trained_params"] == est["params"]
    assert est["weights"] + est["gradients"] + est["optimizer"] == 16 * est["params"]   # ~ 116 GB before activations
    with pytest.raises(methods.ConfigError) as e:
        methods.check_memory(est, 80 * 2**30, "cuda:0", npo)
    msg = str(e.value)
    assert "\n" not in msg and f"{est['total'] / 2**30:.0f} GiB" in msg and "80 GiB" in msg
    assert "--no-fp32-optimizer-state" in msg and "several GPUs" in msg
    rmu = methods.resolve({"method": "rmu", "model": "/nonexistent", "forget": ["f"], "retain": ["r"]})
    est = methods.memory_estimate(rmu, zephyr, 2)
    assert est["trained_params"] == 3 * 14336 * 4096
    methods.check_memory(est, 80 * 2**30, "cuda:0", rmu)   # fits: no error
