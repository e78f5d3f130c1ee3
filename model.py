"""A Llama-family decoder (Llama 2/3, Mistral, Zephyr) that loads and saves Hugging Face checkpoints.

Parameter names are Hugging Face's (`model.layers.5.mlp.down_proj.weight`, `lm_head.weight`, ...), so a
checkpoint loads and saves by identity. One forward with several exits serves every caller:

    logits = model(ids, mask)                          # (B, T, V) float32
    hidden = model(ids, mask, output="hidden")         # (B, T, d) after the final norm: for fused log-prob kernels
    act7   = model(ids, mask, until_layer=7)           # (B, T, d) residual stream after decoder layer 7 (RMU)
    act7   = model(hidden_states=act4, attention_mask=mask, from_layer=5, until_layer=7)   # reuse a frozen trunk

Smoke test on a real checkpoint: `python model.py --model DIR --prompt "The capital of France is"`.
"""
import argparse
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.utils.checkpoint
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from hf_tokenizer import copy_tokenizer_files, load_tokenizer
from infra import TOY_MODEL, CheckpointError, ProjectError, replace_dir, resolve_device, resolve_dtype

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
MAX_SHARD_BYTES = 5 * 1024**3  # Hugging Face's default shard size


# ----------------------------------------------------------------------------------------------- config

@dataclass
class ModelConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int = 128
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # only {"rope_type": "llama3", ...}
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    architecture: str = "LlamaForCausalLM"
    bos_token_id: int | None = 1
    eos_token_id: int | list | None = 2
    torch_dtype: str = "float32"
    extra: dict = field(default_factory=dict)  # unknown HF fields, written back on save

    @classmethod
    def from_hf(cls, hf: dict, source: str = "config.json") -> "ModelConfig":
        arch = (hf.get("architectures") or ["?"])[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise CheckpointError(f"{source}: architecture {arch!r} is not supported (expected one of {', '.join(SUPPORTED_ARCHITECTURES)})")
        # transformers >= 5 nests rope settings in `rope_parameters`; older files use rope_theta + rope_scaling
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise CheckpointError(f"{source}: rope scaling type {rope_type!r} is not supported (expected none or 'llama3')")
        if hf.get("mlp_bias"):
            raise CheckpointError(f"{source}: mlp_bias=true is not supported")
        heads = hf["num_attention_heads"]
        known = set(cls.__dataclass_fields__) | {"architectures", "rope_parameters", "model_type", "dtype", "mlp_bias"}
        return cls(
            vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"], num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-5),
            rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
            rope_scaling={**rope, "rope_type": "llama3"} if rope_type == "llama3" else None,
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            tie_word_embeddings=hf.get("tie_word_embeddings", False), attention_bias=hf.get("attention_bias", False),
            architecture=arch, bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"),
            torch_dtype=str(hf.get("torch_dtype") or hf.get("dtype") or "float32"),
            extra={k: v for k, v in hf.items() if k not in known},
        )

    @classmethod
    def from_json(cls, path) -> "ModelConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        elif path.suffix != ".json" or not path.parent.is_dir():
            raise CheckpointError(f"{path}: model directory does not exist")
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (expected a Hugging Face config.json)")
        try:
            hf = json.loads(path.read_text())
            return cls.from_hf(hf, str(path))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path}: not a valid Llama/Mistral config.json ({type(e).__name__}: {e})") from None

    def to_hf(self) -> dict:
        rope = {k: v for k, v in (self.rope_scaling or {}).items() if k != "rope_theta"}
        return {
            **self.extra, "architectures": [self.architecture],
            "model_type": "mistral" if self.architecture == "MistralForCausalLM" else "llama",
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers, "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads, "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps, "rope_theta": self.rope_theta, "rope_scaling": rope or None,
            "max_position_embeddings": self.max_position_embeddings, "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias, "hidden_act": "silu",
            "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id, "torch_dtype": self.torch_dtype,
        }


# ----------------------------------------------------------------------------------------------- math

def rope_inv_freq(cfg: ModelConfig, device=None) -> torch.Tensor:
    """(head_dim/2,) fp32 inverse frequencies, with Llama 3.1's long-context rescaling when configured."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.int64).float() / dim))
    if cfg.rope_scaling is None:
        return inv_freq
    s = cfg.rope_scaling
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s.get("original_max_position_embeddings", cfg.max_position_embeddings)
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x (B, H, T, hd); cos/sin (B, 1, T, hd). HF checkpoints use the half-split layout: no permutation needed.
    return x * cos + rotate_half(x) * sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in fp32, cast back, then scale: the order Hugging Face uses (it matters in bf16)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


# ----------------------------------------------------------------------------------------------- modules

class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, cache=None, layer=0):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)     # (B, KV, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, KV, S, hd) with S = cached length + T
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           enable_gqa=self.n_kv != self.n_heads)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache=None, layer=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class KVCache:
    """Preallocated keys/values for batched greedy decoding. key_mask (B, S_max) marks real (non-pad) keys."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device, dtype):
        shape = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.key_mask = torch.zeros(batch, max_len, device=device, dtype=torch.long)
        self.length = 0  # filled positions; advanced once per forward by Transformer.forward

    def update(self, layer, k, v):
        end = self.length + k.shape[2]
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.source_dir = None  # set by from_pretrained; save_pretrained refuses to write there
        self.activation_checkpointing = False
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.model.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.model.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.lm_head.weight  # (V, d); the embedding matrix when tied

    def forward(self, input_ids=None, attention_mask=None, *, hidden_states=None, from_layer=0,
                until_layer=None, output="logits", cache=None, pad_rows="self"):
        """input_ids (B, T) or hidden_states (B, T, d) entering layer `from_layer`; attention_mask (B, T), 1 = token.
        pad_rows: what a query row with no real key before it (a left pad) attends to. "self": itself only, and
        positions count real tokens. "all": every position of its row, and positions are 0..T-1 -- transformers
        4.38.2's Llama/Mistral with sdpa on CUDA (the WMDP reference's RMU), whose _unmask_unattended un-masks such
        rows. Real tokens get the same values either way (RoPE is relative; pads are never their keys). With a KV
        cache (generation) the "self" rule always applies.

        Returns the residual stream after layer `until_layer` if given, else the final-normed hidden states
        (output="hidden") or fp32 logits (output="logits").
        """
        h = self.model.embed_tokens(input_ids) if hidden_states is None else hidden_states
        B, T, _ = h.shape
        cos, sin, mask = self._positions_and_mask(B, T, attention_mask, cache, h.device, h.dtype, pad_rows)
        last = self.config.num_hidden_layers - 1 if until_layer is None else until_layer
        for i in range(from_layer, last + 1):
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                # keep only each block's input; recompute the block in the backward
                h = torch.utils.checkpoint.checkpoint(self.model.layers[i], h, cos, sin, mask, cache, i,
                                                      use_reentrant=False)
            else:
                h = self.model.layers[i](h, cos, sin, mask, cache, i)
        if cache is not None:
            cache.length += T
        if until_layer is not None:
            return h
        h = self.model.norm(h)
        return h if output == "hidden" else self.lm_head(h).float()

    def _positions_and_mask(self, B, T, attention_mask, cache, device, dtype, pad_rows="self"):
        start = 0 if cache is None else cache.length
        if attention_mask is None:
            attention_mask = torch.ones(B, T, device=device, dtype=torch.long)
        key_mask = attention_mask.long()
        if cache is not None:
            cache.key_mask[:, start:start + T] = key_mask
            key_mask = cache.key_mask[:, :start + T]
        if pad_rows == "all" and cache is None:
            pos = torch.arange(T, device=device).expand(B, T)  # transformers' default position_ids
        else:  # positions count real tokens only, so a left-padded row sees the same positions as an unpadded one
            pos = (key_mask.cumsum(-1) - 1).clamp(min=0)[:, start:]  # (B, T)
        freqs = pos[..., None].float() * rope_inv_freq(self.config, device)  # (B, T, hd/2), fp32
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, hd)
        cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
        if cache is None and bool(key_mask.all()):
            return cos, sin, None  # plain causal: lets SDPA pick its fastest kernel
        q_idx = torch.arange(start, start + T, device=device)[:, None]
        k_idx = torch.arange(start + T, device=device)[None, :]
        mask = (k_idx <= q_idx) & key_mask[:, None, :].bool()  # (B, T, S) causal in cache-index space, pads masked
        if pad_rows == "all" and cache is None:
            mask = mask | ~mask.any(-1, keepdim=True)  # a row with no key at all attends to every position
        else:
            mask = mask | (k_idx == q_idx)  # each query also sees itself, so pad rows stay finite
        return cos, sin, mask[:, None]

    @torch.no_grad()
    def generate(self, prompts: list, max_new_tokens: int = 32, eos_token_id=None, pad_token_id: int = 0) -> list:
        """Batched greedy decoding with a KV cache. prompts: list of token-id lists. Returns the new tokens per
        prompt, cut before the first EOS (eos_token_id: an int or a list of ints)."""
        device = self.lm_head_weight.device
        eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
        longest = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), longest), pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, p in enumerate(prompts):  # left padding: every row's next token lands in the same column
            ids[b, longest - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[b, longest - len(p):] = 1
        cache = KVCache(self.config, len(prompts), longest + max_new_tokens, device, self.lm_head_weight.dtype)
        h = self(ids.to(device), mask.to(device), output="hidden", cache=cache)
        out, done = [[] for _ in prompts], [False] * len(prompts)
        for _ in range(max_new_tokens):
            next_ids = (h[:, -1] @ self.lm_head_weight.T).float().argmax(-1)  # (B,)
            for b, t in enumerate(next_ids.tolist()):
                if not done[b]:
                    done[b] = t in eos
                    if not done[b]:
                        out[b].append(t)
            if all(done):
                break
            h = self(next_ids[:, None], torch.ones_like(next_ids)[:, None], output="hidden", cache=cache)
        return out

    # ------------------------------------------------------------------------------------------- I/O

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None) -> "Transformer":
        """Build on the meta device, then assign tensors shard by shard straight onto `device`: a 7B model never
        exists twice in memory. Every key and shape is checked before anything is read."""
        path = Path(path)
        cfg = ModelConfig.from_json(path)
        dtype = dtype or getattr(torch, cfg.torch_dtype, torch.float32)
        device = torch.device(device or "cpu")
        shards = checkpoint_shards(path)
        with torch.device("meta"):
            model = cls(cfg)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        if cfg.tie_word_embeddings:
            expected.pop("lm_head.weight")
        found = {}  # key -> (file, shape)
        for file in shards:
            with open_safetensors(file) as f:
                for key in f.keys():
                    found[key] = (file, tuple(f.get_slice(key).get_shape()))
        ignored = {k for k in found if k.endswith("rotary_emb.inv_freq") or (cfg.tie_word_embeddings and k == "lm_head.weight")}
        missing = sorted(set(expected) - set(found))
        unexpected = sorted(set(found) - set(expected) - ignored)
        mismatched = sorted(f"{k} {found[k][1]} != {expected[k]}" for k in set(expected) & set(found) if found[k][1] != expected[k])
        if missing or unexpected or mismatched:
            parts = [f"{name}: {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}"
                     for name, keys in (("missing", missing), ("unexpected", unexpected), ("mismatched", mismatched)) if keys]
            raise CheckpointError(f"{path}: checkpoint does not match config.json ({'; '.join(parts)})")
        for key, tensor in iter_tensors(path, expected, device):
            module, name = model.get_submodule(key.rsplit(".", 1)[0]), key.rsplit(".", 1)[1]
            module._parameters[name] = nn.Parameter(tensor.to(dtype), requires_grad=True)
        if cfg.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        model.source_dir = path.resolve()
        return model.eval()

    def save_pretrained(self, out_dir, tokenizer_dir=None, max_shard_bytes: int = MAX_SHARD_BYTES):
        """config.json + safetensors (sharded with an index above max_shard_bytes) + tokenizer files, written to a
        temporary directory and renamed into place. Refuses to write into the directory the model came from."""
        out_dir = Path(out_dir).resolve()
        for src in (self.source_dir, tokenizer_dir and Path(tokenizer_dir).resolve()):
            if src is not None and (out_dir == src or src in out_dir.parents):
                raise CheckpointError(f"{out_dir}: refusing to save into the input model directory {src}")
        tmp = out_dir.parent / f".{out_dir.name}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            state = {k: v.detach().contiguous() for k, v in self.state_dict().items()
                     if not (self.config.tie_word_embeddings and k == "lm_head.weight")}
            dtype = next(iter(state.values())).dtype
            (tmp / "config.json").write_text(json.dumps({**self.config.to_hf(), "torch_dtype": str(dtype).removeprefix("torch.")}, indent=2))
            shards, size = [[]], 0
            for k, v in state.items():
                nbytes = v.numel() * v.element_size()
                if shards[-1] and size + nbytes > max_shard_bytes:
                    shards.append([])
                    size = 0
                shards[-1].append(k)
                size += nbytes
            if len(shards) == 1:
                save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
            else:
                weight_map = {}
                for i, keys in enumerate(shards):
                    name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                    save_file({k: state[k] for k in keys}, tmp / name, metadata={"format": "pt"})
                    weight_map.update({k: name for k in keys})
                total = sum(v.numel() * v.element_size() for v in state.values())
                (tmp / "model.safetensors.index.json").write_text(
                    json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
            src = Path(tokenizer_dir) if tokenizer_dir else self.source_dir
            if src:
                copy_tokenizer_files(src, tmp)
            umask = os.umask(0)
            os.umask(umask)
            for f in tmp.rglob("*"):  # one mode for every file (safetensors writes its files 0600)
                f.chmod((0o777 if f.is_dir() else 0o666) & ~umask)
            replace_dir(tmp, out_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return out_dir


def checkpoint_shards(path: Path) -> list:
    if not path.is_dir():
        raise CheckpointError(f"{path}: model directory does not exist")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        shards = [path / f for f in files]
        for s in shards:
            if not s.is_file():
                raise CheckpointError(f"{s}: missing (listed in {index.name})")
        return shards
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json (only safetensors checkpoints are supported)")


class open_safetensors:
    """safe_open with an error that names the file when it is corrupt."""

    def __init__(self, file, device="cpu"):
        self.file, self.device = file, str(device)

    def __enter__(self):
        try:
            self.handle = safe_open(str(self.file), framework="pt", device=self.device)
            return self.handle.__enter__()
        except Exception as e:
            raise CheckpointError(f"{self.file}: not a readable safetensors file ({e})") from None

    def __exit__(self, *exc):
        return self.handle.__exit__(*exc)


def iter_tensors(path, names, device="cpu"):
    """(name, tensor on device) for each of `names` stored in the checkpoint at path, one shard open at a time (a
    7B model's tensors are never all in memory at once): what loading and every weight-space analysis read."""
    for file in checkpoint_shards(Path(path)):
        with open_safetensors(file, device) as f:
            for k in f.keys():
                if k in names:
                    yield k, f.get_tensor(k)


def load(path, device=None, dtype=None, allow_nonfinite=False):
    """The one way scripts load a checkpoint: -> (model in eval mode, tokenizer). device None: cuda when available;
    dtype None (or a name): bf16 on a GPU, fp32 on a CPU. A tensor with NaN or inf values is refused (it would
    give garbage or chance-level scores without a word) unless allow_nonfinite."""
    device = resolve_device(device) if device is None or isinstance(device, str) else device
    if dtype is None or isinstance(dtype, str):
        dtype = resolve_dtype(dtype, device)
    model = Transformer.from_pretrained(path, dtype=dtype, device=device)
    if not allow_nonfinite:
        for name, p in model.named_parameters():
            if not torch.isfinite(p).all():
                raise CheckpointError(f"{path}: tensor {name} has non-finite values (NaN or inf); pass "
                                      "--allow-nonfinite to load it anyway")
    return model.eval(), load_tokenizer(path)


# ----------------------------------------------------------------------------------------------- smoke test

def main(argv=None):
    p = argparse.ArgumentParser(description="Greedy continuation of a prompt: the first check on a real checkpoint.")
    p.add_argument("--model", default=str(TOY_MODEL), help="Hugging Face Llama/Mistral checkpoint directory")
    p.add_argument("--prompt", default="The capital of France is")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None, help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--allow-nonfinite", action="store_true", help="load a checkpoint with NaN/inf weights")
    args = p.parse_args(argv)
    from infra import cli_main
    cli_main("model.py", smoke_test, args)


def smoke_test(args):
    if args.max_new_tokens < 1:
        raise ProjectError(f"--max-new-tokens {args.max_new_tokens}: expected an integer >= 1")
    t0 = time.time()
    model, tok = load(args.model, args.device, args.dtype, args.allow_nonfinite)
    dtype = model.lm_head_weight.dtype
    print(f"loaded {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, {dtype}) in {time.time() - t0:.1f}s")
    t0 = time.time()
    new = model.generate([tok.encode(args.prompt)], args.max_new_tokens, tok.eos_token_id, tok.pad_token_id)[0]
    if model.lm_head_weight.device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.time() - t0
    print(args.prompt + tok.decode(new))
    print(f"{len(new)} tokens in {dt:.2f}s ({len(new) / max(dt, 1e-9):.1f} tokens/s)")


if __name__ == "__main__":
    main()
