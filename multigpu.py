"""More than one process (torchrun): the ranks, FSDP2 for the NPO family, data parallelism for RMU.

    world = World.from_env(device)          # torchrun's WORLD_SIZE / RANK / LOCAL_RANK; one process: size 1
    rows, ids, mask, share = world.take(ids, mask, count)   # this rank's rows r, r + W, ... of a global batch
    loss * share                            # so that the ranks' averaged gradients are one process's gradient
    shard(model, world, param_dtype)        # FSDP2: fully_shard per decoder block, then the root (NPO family)
    world.average_grads(params)             # RMU: all-reduce the trained matrices' gradients only
    full = full_state(model, world)         # every parameter gathered (a collective); on rank 0 only

Every rank runs the same plan (the same seeded global batches) and takes rows r::W of each, after the global
batch is padded to its longest row, so W ranks compute exactly what one process computes on the whole batch.
A loss that is a mean (over sequences for NPO / SimNPO, over target tokens for GradDiff and the retain CE or KL,
over counted positions for RMU's MSE) is computed over the rank's rows and scaled by W * local count / global
count: FSDP2's reduce-scatter (and RMU's all-reduce) average over the W ranks, which gives the global mean's
gradient. A rank whose share of a short batch is empty runs row 0 with weight 0, so every rank takes part in
every collective. Backend: NCCL on GPUs (one per rank, cuda:LOCAL_RANK), gloo on CPUs (the tests).
REFERENCE section 11 has the FSDP2 facts this follows.
"""
import datetime
import os
from dataclasses import dataclass

import torch

from infra import ProjectError


@dataclass
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device: str) -> "World":
        """One process, or torchrun's group (initialised here once): CUDA device LOCAL_RANK when `device` is a
        CUDA device, else the CPU with gloo."""
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size == 1:
            return cls(device=device)
        import torch.distributed as dist
        local = int(os.environ.get("LOCAL_RANK", "0"))
        cuda = str(device).startswith("cuda")
        if cuda:
            if local >= torch.cuda.device_count():
                raise ProjectError(f"torchrun: LOCAL_RANK {local} but this machine has {torch.cuda.device_count()} "
                                   "GPU(s); give --nproc-per-node at most that")
            torch.cuda.set_device(local)
        if not dist.is_initialized():   # rank 0 alone evaluates and writes while the others wait: a long timeout
            dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=4))
        return cls(dist.get_rank(), dist.get_world_size(), local, f"cuda:{local}" if cuda else "cpu")

    def rows(self, n) -> list:
        """This rank's rows of a global batch of n rows (possibly none)."""
        return list(range(self.rank, n, self.size))

    def take(self, ids, mask, count):
        """This rank's rows of a global batch (already padded to its longest row) -> (row indices, ids, mask,
        share): count(ids, mask) counts what the loss averages over (sequences, target tokens, positions), and
        share weighs the rank's mean so that the ranks' averaged gradients are the global mean's. One process:
        every row, share 1. A rank with no rows runs row 0 with share 0, so it still takes part in every collective."""
        if self.size == 1:
            return list(range(ids.shape[0])), ids, mask, 1.0
        rows = self.rows(ids.shape[0])
        local = count(ids[rows], mask[rows]) if rows else 0
        use = rows or [0]
        return use, ids[use], mask[use], self.share(local, count(ids, mask))

    def share(self, local, total) -> float:
        """The weight of this rank's mean (over `local` of the global batch's `total` counted elements): the
        ranks' gradients, averaged, then equal the gradient of the global mean. 1.0 in one process."""
        if self.size == 1:
            return 1.0
        return self.size * float(local) / float(total) if total else 0.0

    def sum(self, value: float) -> float:
        """A float summed over the ranks (every rank gets the sum)."""
        if self.size == 1:
            return value
        import torch.distributed as dist
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.item()

    def gather(self, obj) -> list:
        """Every rank's obj, on every rank."""
        if self.size == 1:
            return [obj]
        import torch.distributed as dist
        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def average_grads(self, params):
        """Data parallelism: each gradient summed over the ranks and divided by W (gloo has no AVG)."""
        if self.size == 1:
            return
        import torch.distributed as dist
        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad.div_(self.size)

    def barrier(self):
        if self.size > 1:
            import torch.distributed as dist
            dist.barrier()

    def on_main(self, fn):
        """fn() on rank 0 only -> its result there (None elsewhere). When it raises there, every rank raises
        (rank 0 its own error, the others one line naming it), so no rank waits forever in a collective."""
        if self.size == 1:
            return fn()
        result, err = None, None
        if self.main:
            try:
                result = fn()
            except BaseException as e:   # noqa: BLE001 (re-raised below, after the others are told)
                err = e
        msg = self.broadcast(None if err is None else f"{type(err).__name__}: {err}")
        if err is not None:
            raise err
        if msg is not None:
            raise ProjectError(f"rank 0 failed ({msg}); this rank stopped with it")
        return result

    def broadcast(self, obj):
        """Rank 0's obj on every rank (an error raised on rank 0 reaches the others as its message)."""
        if self.size == 1:
            return obj
        import torch.distributed as dist
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def shard(model, world: World, param_dtype):
    """FSDP2 over the world: fully_shard each decoder block, then the root (embeddings, final norm, LM head), with
    the parameters' own dtype (fp32: the master copy) sharded and param_dtype for compute, fp32 gradient
    reduction. The optimizer must be built after this."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = init_device_mesh("cuda" if world.device.startswith("cuda") else "cpu", (world.size,))
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in model.model.layers:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def set_gradient_sync(model, sync: bool):
    """FSDP2: reduce-scatter gradients on this backward (the last micro-step) or keep accumulating locally."""
    if is_sharded(model):
        model.set_requires_gradient_sync(sync)


def full_tensor(t):
    """A sharded parameter (DTensor) gathered whole on every rank (a collective); a plain tensor as is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def full_state(model, world: World) -> dict | None:
    """name -> full tensor on the CPU, on rank 0 (None elsewhere). Every rank must call it (each parameter is
    gathered with a collective, one at a time, so a 7B model never sits whole on one GPU twice)."""
    out = {}
    for name, p in model.named_parameters():
        full = full_tensor(p.detach())
        if world.main:
            out[name] = full.to("cpu", copy=True)
        del full
    return out if world.main else None
