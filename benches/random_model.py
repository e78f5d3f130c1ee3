"""Random-weight models of a real model's shape, for the GPU benchmarks: the device machines reach no model hub and
at most 64 MiB travels there, so a 7B benchmark builds its weights in place (the speed of a forward does not depend
on what the weights are; the comparisons it makes are between two implementations on the same weights).
"""
from pathlib import Path

import torch

from model import ModelConfig, Transformer

# the shapes the benchmarks use, as config.json fields (REFERENCE section 8's anchors are for this shape)
SHAPES = {
    "zephyr-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5,
                      rope_theta=10000.0, max_position_embeddings=32768, architecture="MistralForCausalLM"),
    # a few MB: the CPU smoke tests of the benchmarks' code paths
    "tiny": dict(vocab_size=1031, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0,
                 max_position_embeddings=1024, architecture="MistralForCausalLM"),
}


def random_model(cfg: ModelConfig, device, dtype, seed: int = 0) -> Transformer:
    """A Transformer with N(0, 0.02) weights (norms 1) built straight on `device` in `dtype` (no fp32 copy)."""
    with torch.device("meta"):
        m = Transformer(cfg)
    m = m.to(dtype).to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
    return m.eval()


def write_random_checkpoint(shape: str, out_dir, tokenizer_dir, device="cpu", dtype=torch.bfloat16, seed=0) -> Path:
    """A Hugging Face checkpoint directory (config.json, safetensors, the tokenizer files of `tokenizer_dir`) with
    random weights of `shape`, readable by model.load and by transformers alike. The tokenizer only has to produce
    ids below the shape's vocabulary size. -> out_dir"""
    if shape not in SHAPES:
        raise ValueError(f"--random-shape {shape!r}: expected one of {', '.join(SHAPES)}")
    m = random_model(ModelConfig(**SHAPES[shape]), device, dtype, seed).cpu()   # filled on the GPU, saved from RAM
    out = m.save_pretrained(out_dir, tokenizer_dir=tokenizer_dir)
    del m
    return out
