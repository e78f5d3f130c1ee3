"""A checkpoint's Hugging Face fast tokenizer (tokenizer.json) and the files that travel with it.

    tok = load_tokenizer(model_dir)
    ids, mask = tok(["text", ...], side="left", max_length=512)   # (B, T) long each, padded

The `tokenizers` library, with tokenizer_config.json honoured as Hugging Face's fast tokenizer honours it.
"""
import json
import shutil
from pathlib import Path

import torch

from infra import CheckpointError

# copied beside every saved checkpoint: the tokenizer, its chat template(s) (transformers >= 4.5x keeps them in
# chat_template.jinja and additional_chat_templates/) and the generation defaults
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "chat_template.jinja", "tokenizer.model", "added_tokens.json", "additional_chat_templates")


def copy_tokenizer_files(src, dst):
    """TOKENIZER_FILES that exist in checkpoint dir src -> dst (files and folders)."""
    src, dst = Path(src), Path(dst)
    for name in TOKENIZER_FILES:
        if (src / name).is_dir():
            shutil.copytree(src / name, dst / name, dirs_exist_ok=True)
        elif (src / name).is_file():
            shutil.copy2(src / name, dst / name)


class Tokenizer:
    """The `tokenizers` library, with tokenizer_config.json honoured as Hugging Face's fast tokenizer does:
    when add_bos_token / add_eos_token are set there they define the special tokens around each text
    (Llama/Mistral tokenizers); otherwise tokenizer.json's own post-processor does (Llama 3)."""

    def __init__(self, path):
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers.processors import TemplateProcessing
        self.path = Path(path)
        file = self.path / "tokenizer.json"
        if not file.is_file():
            raise CheckpointError(f"{file}: missing (expected a Hugging Face fast tokenizer file)")
        try:
            self.tok = HFTokenizer.from_file(str(file))
        except Exception as e:
            raise CheckpointError(f"{file}: not a readable tokenizer.json ({e})") from None
        conf = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins, as in HF
            if (self.path / name).is_file():
                try:
                    conf.update(json.loads((self.path / name).read_text()))
                except json.JSONDecodeError as e:
                    raise CheckpointError(f"{self.path / name}: not valid JSON ({e})") from None
        token = lambda v: v.get("content") if isinstance(v, dict) else v
        self.bos_token, self.eos_token = token(conf.get("bos_token")), token(conf.get("eos_token"))
        self.bos_token_id = self.tok.token_to_id(self.bos_token) if self.bos_token else None
        self.eos_token_id = self.tok.token_to_id(self.eos_token) if self.eos_token else None
        pad = token(conf.get("pad_token"))
        self.pad_token_id = self.tok.token_to_id(pad) if pad else None
        if self.pad_token_id is None:
            self.pad_token_id = self.eos_token_id if self.eos_token_id is not None else 0
        self.add_bos_token = conf.get("add_bos_token")
        self.add_eos_token = conf.get("add_eos_token")
        if self.add_bos_token is not None or self.add_eos_token is not None:
            bos = [self.bos_token] if self.add_bos_token and self.bos_token_id is not None else []
            eos = [self.eos_token] if self.add_eos_token and self.eos_token_id is not None else []
            single = " ".join([f"{t}:0" for t in bos] + ["$A:0"] + [f"{t}:0" for t in eos])
            pair = single + " " + " ".join([f"{t}:1" for t in bos] + ["$B:1"] + [f"{t}:1" for t in eos])
            specials = [(t, self.tok.token_to_id(t)) for t in dict.fromkeys(bos + eos)]
            self.tok.post_processor = TemplateProcessing(single=single, pair=pair, special_tokens=specials)
        self.vocab_size = self.tok.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = True) -> list:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_with_offsets(self, text: str) -> tuple:
        """(ids, [(start, end) character span of each]) without special tokens."""
        e = self.tok.encode(text, add_special_tokens=False)
        return e.ids, e.offsets

    def encode_batch(self, texts: list, add_special_tokens: bool = True) -> list:
        return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def pad(self, seqs: list, side: str = "right", max_length: int | None = None, pad_id: int | None = None):
        """Pad id lists to one length -> (ids (B, T) long, mask (B, T) long). Sequences longer than max_length
        are truncated on the right. pad_id defaults to the tokenizer's pad token (RMU's reference pads with EOS)."""
        if side not in ("left", "right"):
            raise ValueError(f"padding side must be 'left' or 'right', got {side!r}")
        seqs = [list(s[:max_length]) if max_length else list(s) for s in seqs]
        T = max(1, max(len(s) for s in seqs))
        ids = torch.full((len(seqs), T), self.pad_token_id if pad_id is None else pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), T), dtype=torch.long)
        for b, s in enumerate(seqs):
            sl = slice(T - len(s), T) if side == "left" else slice(0, len(s))
            ids[b, sl] = torch.tensor(s, dtype=torch.long)
            mask[b, sl] = 1
        return ids, mask

    def __call__(self, texts: list, side: str = "right", max_length: int | None = None, add_special_tokens: bool = True):
        return self.pad(self.encode_batch(texts, add_special_tokens), side, max_length)


def load_tokenizer(path) -> Tokenizer:
    return Tokenizer(path)
