"""The optimizer, the learning-rate schedule and the update scale of the training loops here (unlearn.py, relearn.py,
make_toy.py).

    opt = adamw(params, lr=1e-5, fp32_state=True)          # torch's AdamW, or HFAdamW where torch's cannot do it
    opt = HFAdamW(params, lr=1e-5, fp32_state=True)        # AdamW with fp32 master weights for bf16 parameters
    g["lr"] = lr_at(step, steps, 1e-5, 0.1, "linear")     # warmup, then constant / linear / cosine decay
    scale_update(trained, base_dir, 0.85)                   # after the last step: base + 0.85 (trained - base)
"""
import math
from contextlib import contextmanager

import torch

from infra import CheckpointError
from model import iter_tensors


class HFAdamW(torch.optim.Optimizer):
    """AdamW for the two things torch.optim.AdamW cannot do: hf_eps (eps added to the uncorrected sqrt(v), as
    transformers.AdamW, which the RMU reference uses: a different update for small v) and fp32_state (fp32
    moments and fp32 master weights for bf16/fp16 parameters: a bf16 weight loses updates below half its ulp)."""

    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, hf_eps=False, fp32_state=False):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, hf_eps=hf_eps,
                                      fp32_state=fp32_state))

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            lr, (b1, b2), eps, wd = g["lr"], g["betas"], g["eps"], g["weight_decay"]
            for p in g["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    sdt = torch.float32 if g["fp32_state"] else p.dtype
                    st["step"] = 0
                    st["exp_avg"] = torch.zeros_like(p, dtype=sdt)
                    st["exp_avg_sq"] = torch.zeros_like(p, dtype=sdt)
                    if g["fp32_state"] and p.dtype != torch.float32:
                        st["master"] = p.detach().float().clone()
                st["step"] += 1
                t, m, v = st["step"], st["exp_avg"], st["exp_avg_sq"]
                w = st.get("master", p)
                grad = p.grad.to(m.dtype)
                m.mul_(b1).add_(grad, alpha=1 - b1)
                v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
                bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
                if g["hf_eps"]:
                    denom, step_size = v.sqrt().add_(eps), lr * math.sqrt(bc2) / bc1
                else:
                    denom, step_size = (v.sqrt() / math.sqrt(bc2)).add_(eps), lr / bc1
                if wd:
                    w.mul_(1 - lr * wd)
                w.addcdiv_(m, denom, value=-step_size)
                if w is not p:
                    p.copy_(w)


def adamw(params, lr, eps=1e-8, weight_decay=0.0, hf_eps=False, fp32_state=False, sharded=False):
    """The optimizer of every training loop: HFAdamW where it is needed (hf_eps, or fp32_state with bf16/fp16
    parameters), else torch.optim.AdamW, fused on CUDA (not on FSDP2 shards, `sharded`), foreach on the CPU."""
    params = list(params)
    if hf_eps or (fp32_state and any(p.dtype != torch.float32 for p in params)):
        return HFAdamW(params, lr=lr, eps=eps, weight_decay=weight_decay, hf_eps=hf_eps, fp32_state=fp32_state)
    cuda = params[0].device.type == "cuda" and not sharded
    return torch.optim.AdamW(params, lr=lr, eps=eps, weight_decay=weight_decay, fused=cuda or None,
                             foreach=None if cuda else True)


def lr_at(step, steps, base, warmup, schedule, min_frac=0.0):
    """Learning rate of optimizer step `step` (0-based): linear warmup over `warmup` steps (>= 1) or that fraction
    of the steps (< 1), then constant, linear decay to 0, or cosine decay to min_frac * base."""
    w = int(round(warmup * steps)) if 0 < warmup < 1 else int(warmup)
    if w and step < w:
        return base * (step + 1) / w
    if schedule == "constant":
        return base
    prog = (step - w) / max(1, steps - w)
    if schedule == "linear":
        return base * (1 - prog)
    return base * (min_frac + (1 - min_frac) * 0.5 * (1 + math.cos(math.pi * prog)))


def scale_update(train: dict, base_dir, scale: float):
    """Task arithmetic's coefficient on the run's update (Ilharco et al. 2023; WiSE-FT's weight-space pull towards
    the starting model, Wortsman et al. 2022): theta = theta_base + scale * (theta - theta_base) for each trained
    tensor, the base read back from its checkpoint one shard at a time; in float64, cast to the tensor's dtype.
    A scale of 1 reads nothing and changes nothing."""
    if scale == 1:
        return
    seen = set()
    with torch.no_grad():
        for name, base in iter_tensors(base_dir, set(train)):
            p = train[name]
            p.copy_(torch.lerp(base.to(p.device, torch.float64), p.double(), scale).to(p.dtype))
            seen.add(name)
    if seen != set(train):
        raise CheckpointError(f"--update-scale: {base_dir} lacks trained tensor(s) {sorted(set(train) - seen)[:3]}")


class WeightMean:
    """The plain average of the trained tensors over runs from one base (a uniform model soup, Wortsman et al. 2022;
    the runs must share what they train). The sum is kept on the CPU in float32: for a full-parameter 7B run, 28 GB
    of host memory and none on the GPU."""

    def __init__(self):
        self.sum, self.n = None, 0

    def add(self, train: dict):
        with torch.no_grad():
            if self.sum is None:
                self.sum = {k: p.detach().to("cpu", torch.float32, copy=True) for k, p in train.items()}
            else:
                for k, p in train.items():
                    self.sum[k] += p.detach().to("cpu", torch.float32)
        self.n += 1

    def write(self, train: dict):
        """The trained tensors become the mean of the runs added."""
        with torch.no_grad():
            for k, p in train.items():
                p.copy_((self.sum[k] / self.n).to(p.device, p.dtype))


@contextmanager
def update_scaled(train: dict, base_dir, scale: float):
    """Inside the block the trained tensors are what the run would write if it stopped now (--update-scale applied);
    after it, the weights as trained again: the budget curve's points are the models such runs would land."""
    if scale == 1:
        yield
        return
    kept = {k: p.detach().to("cpu", copy=True) for k, p in train.items()}
    scale_update(train, base_dir, scale)
    try:
        yield
    finally:
        with torch.no_grad():
            for k, p in train.items():
                p.copy_(kept[k])
