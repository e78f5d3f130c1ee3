"""make bench-unlearn: one RMU step at the 7B shape (Zephyr/Mistral, random weights, bf16, batch 4 x 512), the
reference design (two full models, full forwards, every parameter requiring grad) against unlearn.py's (forward
stopped at the steering layer, a shared frozen trunk, the frozen path as copies of the trained matrices only).

    python -m benches.unlearn_step        # needs a CUDA GPU; REFERENCE section 8: 193 ms, 36.3 GiB for the reference

Prints a table and, last, one JSON line with every number.
"""
import copy
import json
import time

import torch

from infra import ProjectError, cli_main
from losses import control_vector, rmu_loss
from model import ModelConfig
from optimizer import HFAdamW
from objectives import RMU, ActCache
from benches.random_model import SHAPES, random_model


def bench_rmu(cfg, device, dtype, steps=10, warmup=2, batch=4, seq=512, layer_id=7, layer_ids=(5, 6, 7),
              paired=False):
    """RMU steps, timed: the reference design (two full models, full forwards with the activation taken by a hook,
    every parameter requiring grad as in Hugging Face, optimizer over the trained matrices) vs ours (train_rmu's
    code path). paired=False: every step has fresh batches (nothing reusable). paired=True: the reference's
    two-topic schedule, where the retain batch of step i is batch i // 2 (wikitext passed once per topic), which
    ours reuses through its activation cache and the reference recomputes.
    -> dict with ms/step, peak memory and the losses of both (they should agree)."""
    import gc
    device = torch.device(device)
    g = torch.Generator().manual_seed(0)
    n = warmup + steps
    data = dict(
        fids=[torch.randint(0, cfg.vocab_size, (batch, seq), generator=g).to(device) for _ in range(n)],
        rids=[torch.randint(0, cfg.vocab_size, (batch, seq), generator=g).to(device) for _ in range(n)],
        ridx=[i // 2 if paired else i for i in range(n)],
        mask=torch.ones(batch, seq, dtype=torch.long, device=device),
        c=control_vector(cfg.hidden_size, 6.5, seed=0, dtype=dtype).to(device))
    results = {}
    for design in ("reference", "ours"):
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        results[design] = _bench_design(design, cfg, device, dtype, data, steps, warmup, layer_id, layer_ids)
    ref, ours = results["reference"], results["ours"]
    results["speedup"] = round(ref["ms_per_step"] / ours["ms_per_step"], 2)
    results["memory_ratio"] = None if ref["peak_gib"] is None else round(ours["peak_gib"] / ref["peak_gib"], 3)
    return results


def _bench_design(design, cfg, device, dtype, data, steps, warmup, layer_id, layer_ids, alpha=1200.0):
    """One design's timed steps (a function, so that everything it built is freed when it returns)."""
    cuda = device.type == "cuda"
    fids, rids, ridx, mask, c = data["fids"], data["rids"], data["ridx"], data["mask"], data["c"]
    names = [f"model.layers.{i}.mlp.down_proj.weight" for i in layer_ids]
    model = random_model(cfg, device, dtype)
    named = dict(model.named_parameters())
    hooks = []
    if design == "reference":
        frozen = copy.deepcopy(model)
        model.requires_grad_(True)  # HF default: every parameter requires grad
        opt = HFAdamW([named[n] for n in names], lr=5e-5, eps=1e-6, hf_eps=True)
        grab = []
        hooks = [m.model.layers[layer_id].register_forward_hook(lambda mod, i, o: grab.append(o))
                 for m in (model, frozen)]

        def step(i):
            model(fids[i], mask)
            act_f = grab.pop()
            model(rids[ridx[i]], mask)
            act_r = grab.pop()
            with torch.no_grad():
                frozen(rids[ridx[i]], mask)
                act_r0 = grab.pop()
            loss, _, _ = rmu_loss(act_f, c, act_r, act_r0, alpha)
            opt.zero_grad()  # as the reference: only the optimizer's params are zeroed
            loss.backward()
            opt.step()
            return loss.item()
    else:
        model.requires_grad_(False)
        train = {n: named[n] for n in names}
        for p in train.values():
            p.requires_grad_(True)
        opt = HFAdamW(list(train.values()), lr=5e-5, eps=1e-6, hf_eps=True)
        rmu = RMU(model, train, layer_id, list(layer_ids))
        uses = {}
        for k in ridx:
            uses[k] = uses.get(k, 0) + 1
        cache = ActCache(uses, 2 * 2**30)

        def step(i):
            f_h = rmu.trunk(fids[i], mask)

            def fwd_r():
                h = rmu.trunk(rids[ridx[i]], mask)
                return h, rmu.frozen_acts(h, mask)
            r_h, r_tgt = cache.get(ridx[i], fwd_r)
            loss, _, _ = rmu.loss(f_h, mask, c, r_h, mask, r_tgt, alpha)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss.item()
    losses = [step(i) for i in range(warmup)]
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(warmup, warmup + steps):
        losses.append(step(i))  # .item() syncs each step, as a training loop that logs its loss does
    if cuda:
        torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) / steps * 1e3
    peak = torch.cuda.max_memory_allocated() if cuda else None
    for h in hooks:
        h.remove()
    return {"ms_per_step": round(ms, 2), "peak_gib": None if peak is None else round(peak / 2**30, 2),
            "first_loss": losses[0], "losses": losses}


def bench():
    if not torch.cuda.is_available():
        raise ProjectError("bench-unlearn: needs a CUDA GPU (none found); it times a 7B-shaped RMU step, "
                         "reference design vs ours (REFERENCE 8: 193 ms, 36.3 GiB for the reference)")
    cfg = ModelConfig(**SHAPES["zephyr-7b"])
    dev = torch.cuda.get_device_name()
    print(f"RMU step, 7B-shaped Mistral/Zephyr (random weights, bf16), batch 4 x 512 forget + retain, {dev}")
    print("| schedule | design | ms/step | peak GiB | first loss |\n|---|---|---|---|---|")
    rec = {"bench": "rmu_step", "model": "zephyr-7b-shaped (random weights)", "dtype": "bfloat16", "batch": [4, 512],
           "device": dev, "torch": torch.__version__}
    for name, paired in (("fresh batches", False), ("paired retain (reference schedule)", True)):
        res = bench_rmu(cfg, "cuda", torch.bfloat16, paired=paired)
        for k in ("reference", "ours"):
            r = res[k]
            print(f"| {name} | {k} | {r['ms_per_step']:.1f} | {r['peak_gib']:.2f} | {r['first_loss']:.4f} |")
        print(f"| {name} | ratio | {res['speedup']:.2f}x faster | {res['memory_ratio']:.3f} of the memory | |")
        rec["paired" if paired else "fresh"] = res
    print(json.dumps(rec))
    return rec


def main():
    return cli_main("bench-unlearn", bench)


if __name__ == "__main__":
    main()
