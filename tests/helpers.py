"""Shared test helpers (imported by the test modules; pytest puts this folder on sys.path)."""
import json
from pathlib import Path


def bpe_tokenizer(path: Path, texts: list, config: dict, bos_in_tokenizer_json: bool = True, vocab_size: int = 300) -> int:
    """Train a byte-level BPE on `texts` and save tokenizer.json + tokenizer_config.json (= config) in `path`.
    Like real Llama/Zephyr/Llama-3 tokenizer.json files it prepends BOS through its post-processor
    (unless bos_in_tokenizer_json is False). Special tokens: <s> = 0, </s> = 1, <pad> = 2. Returns the vocab size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    if bos_in_tokenizer_json:
        tok.post_processor = processors.TemplateProcessing(single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1",
                                                           special_tokens=[("<s>", 0)])
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return tok.get_vocab_size()


def write_corpus(path, n: int, seed: int, words: list, lo: int, hi: int) -> str:
    """A JSON Lines corpus of n documents, each lo..hi random words: {"text": ...} per line. Returns the path."""
    import random
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(lo, hi)))}) + "\n")
    return str(path)


def tiny_llama(root, words, tokenizer_config: dict, init=None, **config):
    """A random Llama-family checkpoint (model.py's, saved in the Hugging Face layout with a BPE tokenizer trained
    on `words`) in root/model -> its path. config: ModelConfig fields (vocab_size comes from the tokenizer);
    init(model) may reshape the random weights. torch is seeded with 0 first, so the weights are reproducible."""
    import torch
    from model import ModelConfig, Transformer
    root = Path(root)
    V = bpe_tokenizer(root / "tok", [" ".join(words)] * 20, tokenizer_config)
    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=V, **config))
    if init is not None:
        with torch.no_grad():
            init(m)
    m.save_pretrained(root / "model", tokenizer_dir=root / "tok")
    return str(root / "model")
