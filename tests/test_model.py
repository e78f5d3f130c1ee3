"""model.py against Hugging Face transformers (the test-only reference) on tiny random checkpoints; loading,
saving, bad checkpoints and the CLI on checkpoints of our own (those tests need no transformers)."""
import gc
import json
from pathlib import Path

import pytest
import torch

import model as M
from helpers import bpe_tokenizer
from hf_tokenizer import load_tokenizer
from infra import CheckpointError, ProjectError, atomic_write_json, atomic_write_lines
from model import ModelConfig, Transformer


def need_transformers():
    """transformers, the reference: only the tests that compare with it skip without it."""
    return pytest.importorskip("transformers", reason="transformers is the reference model.py is compared with")

CONFIGS = {
    "llama": dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=301, hidden_size=64,
                  intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
                  rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=128, tie_word_embeddings=False),
    # GQA + tied embeddings + head_dim != hidden/heads + Llama 3.1 rope scaling
    "llama3_gqa_tied": dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=257, hidden_size=64,
                            intermediate_size=80, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            head_dim=24, rms_norm_eps=1e-6, rope_theta=500000.0, max_position_embeddings=256,
                            tie_word_embeddings=True,
                            rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                              high_freq_factor=4.0, original_max_position_embeddings=32)),
    "mistral": dict(architectures=["MistralForCausalLM"], model_type="mistral", vocab_size=300, hidden_size=64,
                    intermediate_size=128, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                    rms_norm_eps=1e-5, rope_theta=1000000.0, max_position_embeddings=128, sliding_window=None,
                    tie_word_embeddings=False),
}


def make_hf_checkpoint(tmp_path, name, **save_kwargs):
    """A random HF model saved with transformers' own save_pretrained; returns (dir, hf_model)."""
    transformers = need_transformers()
    torch.manual_seed(0)
    cfg = transformers.AutoConfig.for_model(**{k: v for k, v in CONFIGS[name].items() if k != "architectures"})
    cfg.architectures = CONFIGS[name]["architectures"]
    hf = transformers.AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():  # HF inits norms to 1; randomise so the norm weights are really tested
        for n, p in hf.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    path = tmp_path / name
    hf.save_pretrained(path, **save_kwargs)
    return path, hf


def make_checkpoint(tmp_path, name):
    """A random checkpoint of the same config written by model.py itself (no transformers) -> (dir, model)."""
    torch.manual_seed(0)
    m = Transformer(ModelConfig.from_hf(CONFIGS[name]))
    with torch.no_grad():
        for n, p in m.named_parameters():
            p.copy_(torch.randn_like(p) * (0.1 if "norm" in n else 0.05) + (1.0 if "norm" in n else 0.0))
    path = m.save_pretrained(tmp_path / name)
    return path, Transformer.from_pretrained(path)


def max_rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(tmp_path, name):
    path, hf = make_hf_checkpoint(tmp_path, name)
    ours = Transformer.from_pretrained(path)
    ids = torch.randint(0, CONFIGS[name]["vocab_size"], (2, 17))
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours(ids)
    assert got.dtype == torch.float32 and got.shape == ref.shape
    assert max_rel_err(got, ref) <= 1e-5
    # the hidden exit times the LM head is the logits; until_layer matches HF's hidden_states
    with torch.no_grad():
        h = ours(ids, output="hidden")
        hs = hf(ids, output_hidden_states=True).hidden_states
        assert torch.allclose(h @ ours.lm_head_weight.T, got, atol=1e-5)
        for layer in range(CONFIGS[name]["num_hidden_layers"] - 1):
            assert max_rel_err(ours(ids, until_layer=layer), hs[layer + 1]) <= 1e-5
        # starting from a given layer with given hidden states continues the same computation
        mid = ours(ids, until_layer=0)
        assert torch.allclose(ours(hidden_states=mid, from_layer=1), got, atol=1e-5)


@pytest.mark.parametrize("name", ["llama", "llama3_gqa_tied"])
def test_padding_left_and_right(tmp_path, name):
    _, ours = make_checkpoint(tmp_path, name)
    V = CONFIGS[name]["vocab_size"]
    seqs = [torch.randint(0, V, (n,)) for n in (11, 5, 8)]
    T = 11
    for side in ("left", "right"):
        ids = torch.zeros(3, T, dtype=torch.long)
        mask = torch.zeros(3, T, dtype=torch.long)
        for b, s in enumerate(seqs):
            sl = slice(T - len(s), T) if side == "left" else slice(0, len(s))
            ids[b, sl], mask[b, sl] = s, 1
        with torch.no_grad():
            batched = ours(ids, mask)
            assert torch.isfinite(batched).all()
            for b, s in enumerate(seqs):
                alone = ours(s[None])[0]
                sl = slice(T - len(s), T) if side == "left" else slice(0, len(s))
                assert torch.allclose(batched[b, sl], alone, atol=1e-5), (side, b)


def test_save_roundtrip_loads_in_transformers(tmp_path):
    path, hf = make_hf_checkpoint(tmp_path, "llama3_gqa_tied")
    ours = Transformer.from_pretrained(path)
    out = ours.save_pretrained(tmp_path / "saved")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    assert not list(tmp_path.glob(".saved.tmp*"))
    back = need_transformers().AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    ids = torch.randint(0, 257, (2, 9))
    with torch.no_grad():
        assert torch.allclose(back(ids).logits, hf(ids).logits, atol=1e-6, rtol=0)
        assert torch.equal(Transformer.from_pretrained(out)(ids), ours(ids))


def test_sharded_checkpoint_loads_and_saves(tmp_path):
    path, hf = make_hf_checkpoint(tmp_path, "mistral", max_shard_size="100KB")
    assert (path / "model.safetensors.index.json").is_file()
    ours = Transformer.from_pretrained(path)
    ids = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        ref = hf(ids).logits
        assert max_rel_err(ours(ids), ref) <= 1e-5
    out = ours.save_pretrained(tmp_path / "resharded", max_shard_bytes=60_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    back = need_transformers().AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.allclose(back(ids).logits, ref, atol=1e-6, rtol=0)


def test_loading_holds_at_most_one_shard_beyond_the_model(tmp_path, monkeypatch):
    """A 7B checkpoint must never exist twice in memory: measure live CPU tensor bytes after every shard."""
    _, m = make_checkpoint(tmp_path, "mistral")
    path = m.save_pretrained(tmp_path / "sharded", max_shard_bytes=100_000)
    assert len(list(path.glob("*.safetensors"))) >= 3
    shard_bytes = max(p.stat().st_size for p in path.glob("*.safetensors"))
    model_bytes = sum(p.stat().st_size for p in path.glob("*.safetensors"))

    def live_tensor_bytes():
        gc.collect()
        seen, total = set(), 0
        for obj in gc.get_objects():
            if torch.is_tensor(obj) and obj.device.type == "cpu" and obj.untyped_storage().data_ptr() not in seen:
                seen.add(obj.untyped_storage().data_ptr())
                total += obj.untyped_storage().nbytes()
        return total

    gc.collect()
    baseline = live_tensor_bytes()
    peaks = []
    real_exit = M.open_safetensors.__exit__

    def exit_and_measure(self, *exc):
        peaks.append(live_tensor_bytes() - baseline)
        return real_exit(self, *exc)

    monkeypatch.setattr(M.open_safetensors, "__exit__", exit_and_measure)
    model = Transformer.from_pretrained(path)
    assert len(peaks) >= 2 * 3  # header pass + load pass over >= 3 shards
    assert max(peaks) <= model_bytes + shard_bytes
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_save_refuses_input_directory_and_is_atomic(tmp_path, monkeypatch):
    path, ours = make_checkpoint(tmp_path, "llama")
    with pytest.raises(CheckpointError, match="input model directory"):
        ours.save_pretrained(path)
    with pytest.raises(CheckpointError, match="input model directory"):
        ours.save_pretrained(path / "sub")
    out = ours.save_pretrained(tmp_path / "out")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def crash(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(M, "save_file", crash)  # interrupted mid-save: the earlier output stays whole
    with pytest.raises(KeyboardInterrupt):
        ours.save_pretrained(out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert issubclass(CheckpointError, ProjectError)


def test_kv_cache_generation_equals_uncached_greedy(tmp_path):
    _, ours = make_checkpoint(tmp_path, "llama3_gqa_tied")
    prompts = [[5, 9, 3, 200, 17, 8], [7, 1], [100, 101, 102]]
    got = ours.generate(prompts, max_new_tokens=10)
    with torch.no_grad():
        for p, g in zip(prompts, got):
            seq = list(p)
            for _ in range(10):
                seq.append(ours(torch.tensor([seq]))[0, -1].argmax().item())
            assert g == seq[len(p):]
    # EOS stops a row and is not returned
    eos = got[0][3]
    cut = ours.generate(prompts[:1], max_new_tokens=10, eos_token_id=eos)[0]
    assert cut == got[0][:got[0].index(eos)]


# ----------------------------------------------------------------------------------------------- tokenizer

def train_tokenizer(path: Path, config: dict, bos_in_tokenizer_json: bool = True):
    text = ["The quick brown fox jumps over the lazy dog. Answer: A B C D"] * 20 + ["hello world, unlearning!"] * 10
    bpe_tokenizer(path, text, config, bos_in_tokenizer_json)


@pytest.mark.parametrize("config", [
    # Zephyr / Mistral / Llama 2 style: LlamaTokenizer with add_bos_token true
    {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True, "add_eos_token": False,
     "tokenizer_class": "LlamaTokenizerFast"},
    # Llama 3 style: no flags, tokenizer.json's post-processor decides; explicit pad token
    {"bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": False, "normalized": False, "rstrip": False,
                   "single_word": False}, "eos_token": "</s>", "pad_token": "<pad>", "tokenizer_class": "PreTrainedTokenizerFast"},
])
def test_tokenizer_matches_transformers(tmp_path, config):
    train_tokenizer(tmp_path, config)
    ours = load_tokenizer(tmp_path)
    ref = need_transformers().AutoTokenizer.from_pretrained(tmp_path)
    texts = ["The quick brown fox.", "Answer: B", " hello", ""]
    for t in texts:
        assert ours.encode(t) == ref(t)["input_ids"], (t, config)
        assert ours.encode(t)[0] == ours.bos_token_id == 0
        assert ours.encode(t, add_special_tokens=False) == ref(t, add_special_tokens=False)["input_ids"]
        assert ours.decode(ours.encode(t)) == ref.decode(ref(t)["input_ids"], skip_special_tokens=True)
    assert ours.bos_token_id == ref.bos_token_id and ours.eos_token_id == ref.eos_token_id
    if ref.pad_token is None:  # our fallback is EOS, as lm-eval sets it
        ref.pad_token = ref.eos_token
    assert ours.pad_token_id == ref.pad_token_id
    for side in ("left", "right"):
        ref.padding_side = side
        enc = ref(texts[:3], padding=True, return_tensors="pt")
        ids, mask = ours(texts[:3], side=side)
        assert torch.equal(ids, enc["input_ids"]) and torch.equal(mask, enc["attention_mask"])


def test_tokenizer_config_flags_override_post_processor(tmp_path):
    """add_bos_token / add_eos_token in tokenizer_config.json rebuild the special tokens, as transformers 4's
    LlamaTokenizerFast does (transformers 5 ignores them for byte-level tokenizer.json files)."""
    train_tokenizer(tmp_path / "a", {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True, "add_eos_token": True},
                    bos_in_tokenizer_json=False)
    tok = load_tokenizer(tmp_path / "a")
    plain = tok.encode("hello", add_special_tokens=False)
    assert tok.encode("hello") == [0] + plain + [1]
    train_tokenizer(tmp_path / "b", {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": False})
    assert load_tokenizer(tmp_path / "b").encode("hello") == plain
    train_tokenizer(tmp_path / "c", {"bos_token": "<s>", "eos_token": "</s>"})
    assert load_tokenizer(tmp_path / "c").encode("hello") == [0] + plain
    with pytest.raises(ValueError, match="padding side"):
        tok.pad([[1, 2]], side="middle")
    ids, mask = tok.pad([[5, 6, 7], [8]], side="left", max_length=2)
    assert ids.tolist() == [[5, 6], [1, 8]] and mask.tolist() == [[1, 1], [0, 1]]
    assert tok.pad_token_id == 1  # no pad token in the config: EOS
    ids, mask = tok.pad([[5, 6, 7], [8]], side="right", pad_id=2)  # an explicit pad id wins
    assert ids.tolist() == [[5, 6, 7], [8, 2, 2]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]


# ----------------------------------------------------------------------------------------------- bad input

def test_bad_input_errors_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="nope: model directory does not exist"):
        Transformer.from_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"config\.json: missing"):
        Transformer.from_pretrained(tmp_path / "empty")
    path, _ = make_checkpoint(tmp_path, "llama")
    cfg = json.loads((path / "config.json").read_text())

    bad = tmp_path / "gpt2"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(CheckpointError, match="GPT2LMHeadModel"):
        ModelConfig.from_json(bad)
    (bad / "config.json").write_text(json.dumps({**cfg, "rope_parameters": None, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}))
    with pytest.raises(CheckpointError, match="yarn"):
        ModelConfig.from_json(bad)
    (bad / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"gpt2/config\.json"):
        ModelConfig.from_json(bad)

    from safetensors.torch import load_file, save_file
    weights = load_file(path / "model.safetensors")

    def checkpoint_with(name, tensors):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps(cfg))
        save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
        return d

    missing = {k: v for k, v in weights.items() if k != "model.norm.weight"}
    with pytest.raises(CheckpointError, match=r"missing: model\.norm\.weight"):
        Transformer.from_pretrained(checkpoint_with("missing", missing))
    extra = {**weights, "model.layers.9.mlp.up_proj.weight": torch.zeros(2)}
    with pytest.raises(CheckpointError, match=r"unexpected: model\.layers\.9"):
        Transformer.from_pretrained(checkpoint_with("extra", extra))
    misshaped = {**weights, "lm_head.weight": torch.zeros(300, 64)}
    with pytest.raises(CheckpointError, match=r"mismatched: lm_head\.weight \(300, 64\) != \(301, 64\)"):
        Transformer.from_pretrained(checkpoint_with("misshaped", misshaped))

    corrupt = checkpoint_with("corrupt", weights)
    data = (corrupt / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"corrupt/model\.safetensors: not a readable safetensors"):
        Transformer.from_pretrained(corrupt)
    with pytest.raises(CheckpointError, match=r"tokenizer\.json: missing"):
        load_tokenizer(path)


def test_load_resolves_device_and_dtype(tmp_path):
    path, ours = make_checkpoint(tmp_path, "llama")
    train_tokenizer(path, {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True})
    model, tok = M.load(path, "cpu")
    assert not model.training and model.lm_head_weight.dtype == torch.float32      # fp32 on a CPU
    assert model.lm_head_weight.device.type == "cpu" and tok.encode("hello")[0] == tok.bos_token_id == 0
    ids = torch.tensor([tok.encode("hello world")])
    with torch.no_grad():
        assert torch.equal(model(ids), ours(ids))
    bf, _ = M.load(path, "cpu", "bfloat16")
    assert bf.lm_head_weight.dtype == torch.bfloat16
    assert M.load(path, torch.device("cpu"), torch.float16)[0].lm_head_weight.dtype == torch.float16
    with pytest.raises(ProjectError, match="--dtype 'float8'"):
        M.load(path, "cpu", "float8")
    with pytest.raises(ProjectError, match="--device 'tpu'"):
        M.load(path, "tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ProjectError, match="no CUDA GPU"):
            M.load(path, "cuda")
    with pytest.raises(CheckpointError, match="nope: model directory does not exist"):
        M.load(tmp_path / "nope", "cpu")


def test_cli_smoke(tmp_path, capsys, monkeypatch):
    path, ours = make_checkpoint(tmp_path, "llama")
    train_tokenizer(path, {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True})
    M.main(["--model", str(path), "--prompt", "hello", "--max-new-tokens", "5", "--device", "cpu"])
    out = capsys.readouterr().out.splitlines()
    tok = load_tokenizer(path)
    new = ours.generate([tok.encode("hello")], 5, tok.eos_token_id, tok.pad_token_id)[0]
    assert out[0].startswith(f"loaded {path}") and "torch.float32" in out[0]
    assert out[1] == "hello" + tok.decode(new) and out[2].startswith(f"{len(new)} tokens in")
    for argv, words in (([], "nope"), (["--device", "tpu"], "--device"), (["--max-new-tokens", "0"], "--max-new-tokens")):
        with pytest.raises(SystemExit) as e:
            M.main(["--model", str(tmp_path / "nope" if not argv else path), *argv])
        assert str(e.value.code).startswith("error:") and words in str(e.value.code) and "\n" not in str(e.value.code)
    # Ctrl-C: one line, exit status 130 (infra.cli_main)
    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(M, "smoke_test", interrupted)
    with pytest.raises(SystemExit) as e:
        M.main(["--model", str(path)])
    assert e.value.code == 130 and "interrupted" in capsys.readouterr().err
    # as a script, from any directory
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(root / "model.py"), "--model", str(path), "--prompt", "hello",
                        "--max-new-tokens", "5"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "tokens/s" in r.stdout
    r = subprocess.run([sys.executable, str(root / "model.py"), "--model", str(tmp_path / "nope")],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 1 and r.stderr.strip().startswith("error:") and "nope" in r.stderr


def test_atomic_write_lines_keeps_earlier_file_on_interrupt(tmp_path):
    """infra's atomic writes (every output of every script, model.py's config and run records included)."""
    path = tmp_path / "out" / "rows.jsonl"
    assert atomic_write_lines(path, iter(["a", "b"])) == 2  # creates the folder, streams an iterator
    assert path.read_text() == "a\nb\n"

    def interrupted():
        yield "c"
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write_lines(path, interrupted())
    assert path.read_text() == "a\nb\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["rows.jsonl"]
    atomic_write_json(path.with_name("r.json"), {"x": 1})
    assert path.with_name("r.json").read_text() == '{\n  "x": 1\n}\n'
