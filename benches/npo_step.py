"""make bench-unlearn, second part: one full-parameter NPO step (NPO forget term + retain cross-entropy, batch 4 x 512
each) at the 7B shape, sharded with FSDP2 over the GPUs present (multigpu.shard: fp32 master shards, bf16 compute),
random weights built on the meta device and materialised shard by shard, activation checkpointing on. Prints
ms/step, tokens/s and the peak memory of every rank, then one JSON line (rank 0).

    python -m torch.distributed.run --standalone --nproc-per-node N -m benches.npo_step        # N GPUs
    python -m torch.distributed.run --standalone --nproc-per-node 2 -m benches.npo_step --shape tiny --device cpu

The second line is the CPU smoke test of this code path (the tests run it); its numbers mean nothing.
"""
import argparse
import json
import time

import torch

import multigpu
from benches.random_model import SHAPES
from infra import ProjectError, cli_main, peak_memory
from model import ModelConfig, Transformer
from objectives import forget_loss, retain_ce, sequence_logps


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="zephyr-7b", choices=sorted(SHAPES))
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch", type=int, default=4, help="global batch (rows) of forget and of retain")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--no-activation-checkpointing", action="store_true")
    return p


def sharded_random_model(cfg, world, compute_dtype, seed=0):
    """The model built on the meta device, sharded, then each rank's shards materialised: N(0, 0.02), norms 1."""
    with torch.device("meta"):
        m = Transformer(cfg)
    multigpu.shard(m, world, compute_dtype)
    m.to_empty(device=world.device)
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in m.named_parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            local.fill_(1.0) if "norm" in n else local.normal_(0.0, 0.02)
    return m


def bench(args):
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ProjectError("bench npo_step: --device cuda but no CUDA GPU (use --shape tiny --device cpu for the "
                           "CPU smoke test)")
    world = multigpu.World.from_env(args.device)
    cuda = world.device.startswith("cuda")
    compute = torch.bfloat16 if cuda else torch.float32
    cfg = ModelConfig(**SHAPES[args.shape])
    model = sharded_random_model(cfg, world, compute)
    model.activation_checkpointing = not args.no_activation_checkpointing
    npo = argparse.Namespace(method="npo", beta=0.1, npo_mean_tokens=True)
    g = torch.Generator().manual_seed(1)
    rows = world.rows(args.batch) or [0]   # this rank's rows of each global batch
    n = args.warmup + args.steps
    fids = [torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=g)[rows].to(world.device) for _ in range(n)]
    rids = [torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=g)[rows].to(world.device) for _ in range(n)]
    mask = torch.ones(len(rows), args.seq, dtype=torch.long, device=world.device)
    share = world.share(len(world.rows(args.batch)), args.batch)
    model.eval()
    ref = [(lambda lp, k: lp / k)(*sequence_logps(model, f, mask)) for f in fids]
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters()], lr=1e-5, weight_decay=0.0)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for i in range(n):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = (forget_loss(npo, model, fids[i], mask, ref[i]) + retain_ce(model, rids[i], mask)) * share
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters()], 1.0)
        opt.step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(world.sum(loss.item()) / world.size)
    ms = 1000 * sorted(times[args.warmup:])[len(times[args.warmup:]) // 2]
    peaks = world.gather(peak_memory(torch.device(world.device)))
    rec = {"bench": "npo_step_fsdp2", "shape": args.shape, "world_size": world.size, "device":
           torch.cuda.get_device_name() if cuda else "cpu", "batch": [args.batch, args.seq],
           "activation_checkpointing": model.activation_checkpointing, "ms_per_step": ms,
           "tokens_per_s": 2 * args.batch * args.seq / (ms / 1000), "peak_gib_per_rank": [p / 2**30 for p in peaks],
           "losses": losses, "torch": torch.__version__}
    if world.main:
        print(f"NPO step (forget + retain, batch {args.batch} x {args.seq} each), {args.shape} shape, random weights, "
              f"FSDP2 over {world.size} {'GPU' if cuda else 'CPU process'}(es), {rec['device']}")
        print("| ms/step | tokens/s | peak GiB per rank |\n|---|---|---|")
        print(f"| {ms:.1f} | {rec['tokens_per_s']:.0f} | {', '.join(f'{p:.1f}' for p in rec['peak_gib_per_rank'])} |")
        print(json.dumps(rec))
    return rec


def main(argv=None):
    return cli_main("bench npo_step", bench, build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
