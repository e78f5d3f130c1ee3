"""Our code against a real pretrained checkpoint: SmolLM2-135M-Instruct (REFERENCE section 9), materialised once by
tests/real_checkpoint.py (skipped when it cannot be had, or failed under REQUIRE_REAL_CHECKPOINT=1).

Hugging Face transformers (and lm-eval itself, both test-only dependencies from requirements.lock) are the
references: model.py's logits (fp32, bf16) and KV-cached greedy generation, the tokenizer wrapper, evaluate.py's
multiple-choice log-likelihoods, and checkpoints exported by unlearn.py (RMU, NPO) loaded back by transformers.
All of it runs on CPU in about a minute; the unlearning runs use the kernels' chunked PyTorch path
(TRITON_INTERPRET=0): the Triton interpreter would take far too long over a 49152-token vocabulary.
"""
import json
import math

import pytest
import torch

import evaluate as E
import helpers
import methods
import unlearn as U
from benches.eval_speed import harness_hf_loglikelihoods, harness_lm_eval_loglikelihoods
from hf_tokenizer import load_tokenizer
from model import Transformer, load
from real_checkpoint import smollm2_dir

pytestmark = pytest.mark.real  # make test-fast leaves these out

BOS_ID, EOS_ID = 1, 2  # <|im_start|>, <|im_end|> (= pad) of SmolLM2 (REFERENCE section 9)

# real text: prose, code, numbers, a chat turn; different lengths, so every padded batch has padding
TEXTS = [
    "The capital of France is Paris, and the capital of Germany is Berlin. Both cities are known for their museums, "
    "their history and their food.",
    "def add(a, b):\n    return a + b\n\n\nclass Stack:\n    def __init__(self):\n        self.items = []\n",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "In 1969, Apollo 11 landed on the Moon; Neil Armstrong and Buzz Aldrin walked on its surface while Michael "
    "Collins orbited above at about 110 km.",
]

TOKENIZER_TEXTS = {
    "code": "def mean(xs):\n\t\"\"\"Average.\"\"\"\n\tif not xs:\n\t\treturn 0.0  # empty\n    return sum(xs) / len(xs)\n"
            "\nprint(mean([1, 2, 3]))\t# tab before comment\r\n",
    "unicode": "Café naïve résumé façade — Ærøskøbing; 東京は日本の首都です。한국어 텍스트 😀🚀👩‍🔬 Ελληνικά ∑∫√ ½",
    "numbers": "pi = 3.14159265358979323846, e = 2.718281828459045; 12345678901234567890 + 0.000001 = -1.5e-10? "
               "1,000,000 and 1.000.000,50 € and 0x7fffffff",
    "whitespace": "  two leading spaces\n\n\nthree newlines   three spaces\t\ttabs \n \n trailing  ",
    "leading_space": " a single leading space",
    "chat": "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\nThe answer is 4.<|im_end|>",
}

# ~8 real-world questions in cais/wmdp's format (question, choices, answer); benign biology and security facts
BIO_QUESTIONS = [
    dict(question="Which organelle is the main site of ATP production in eukaryotic cells?",
         choices=["Ribosome", "Mitochondrion", "Golgi apparatus", "Lysosome"], answer=1),
    dict(question="Which enzyme synthesizes an RNA copy of a DNA template during transcription?",
         choices=["DNA ligase", "Reverse transcriptase", "RNA polymerase", "Helicase"], answer=2),
    dict(question="  What is the causative agent of tuberculosis?  \n",  # stripped by the prompt, as lm-eval does
         choices=["Mycobacterium tuberculosis", "Streptococcus pneumoniae", "Plasmodium falciparum",
                  "Influenza A virus"], answer=0),
    dict(question="In the standard genetic code, how many codons specify an amino acid (the three stop codons "
                  "excluded)?", choices=["20", "61", "64", "3"], answer=1),
]
CYBER_QUESTIONS = [
    dict(question="Which TCP port does HTTPS use by default?", choices=["21", "22", "80", "443"], answer=3),
    dict(question="What does the following shell command do?\n\n    chmod 600 ~/.ssh/id_rsa",
         choices=["Makes the key world-readable", "Restricts the key to read/write by its owner",
                  "Deletes the key", "Encrypts the key with AES"], answer=1),
    dict(question="Which attack sends input such as `' OR 1=1 --` to an unsanitized database query?",
         choices=["Cross-site scripting", "SQL injection", "Buffer overflow", "Phishing"], answer=1),
    dict(question="Which hash function outputs a 256-bit digest?", choices=["MD5", "SHA-1", "SHA-256", "CRC32"],
         answer=2),
]
MC_SETS = [(BIO_QUESTIONS, "biology"), (CYBER_QUESTIONS, "cybersecurity")]  # data.TASKS' wmdp_bio / wmdp_cyber

CORPUS_WORDS = ("the cell virus protein membrane gene enzyme host infection replication of and in a network packet "
                "server exploit password kernel buffer memory attack").split()


def max_rel_err(got, ref):
    """max |got - ref| / max |ref| over all the entries compared: the largest error relative to the logits' scale
    (an entrywise relative error would blow up at logits near zero)."""
    return ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


# ----------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread for this module, restored after it. On a 2-core machine shared with other jobs, two
    OpenMP threads wait on each other in every small matmul (measured: a (32, 576) x (576, 1536) product 23 ms
    with two threads vs 1.2 ms with one); this file then took 4 min 23 s with two threads, 56 s with one."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ckpt():
    return smollm2_dir()


@pytest.fixture(scope="module")
def transformers():
    import transformers
    return transformers


@pytest.fixture(scope="module")
def tok(ckpt):
    return load_tokenizer(ckpt)


@pytest.fixture(scope="module")
def hf_tok(ckpt, transformers):
    return transformers.AutoTokenizer.from_pretrained(ckpt)


@pytest.fixture(scope="module")
def ours32(ckpt):
    return Transformer.from_pretrained(ckpt, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def hf32(ckpt, transformers):
    return transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def ours16(ckpt):
    return Transformer.from_pretrained(ckpt, dtype=torch.bfloat16).eval()


@pytest.fixture(scope="module")
def hf16(ckpt, transformers):
    return transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16).eval()


# ----------------------------------------------------------------------------------------------- logits

def test_checkpoint_is_the_expected_model(ckpt, ours32, hf32, tok):
    """What REFERENCE section 9 says the checkpoint is, read through model.py; and it is a trained model: its
    next-token loss on ordinary English is far below a random model's ln(49152) = 10.8 nats."""
    cfg = ours32.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (30, 576, 1536)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (9, 3, 64)
    assert cfg.vocab_size == 49152 and cfg.tie_word_embeddings and cfg.rope_theta == 100000.0
    assert cfg.rope_scaling is None and cfg.rms_norm_eps == pytest.approx(1e-5)
    assert ours32.lm_head.weight is ours32.model.embed_tokens.weight  # tied: one tensor
    assert torch.equal(ours32.model.embed_tokens.weight, hf32.model.embed_tokens.weight)
    ids = torch.tensor([tok.encode(TEXTS[0])])
    with torch.no_grad():
        logits = ours32(ids)
    nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).item()
    assert nll < 4.0, f"mean next-token NLL {nll:.2f} nats: not a trained model"


def test_logits_fp32_match_transformers(ours32, hf32, tok):
    """fp32 logits of model.py vs transformers' LlamaForCausalLM, at every real position of a padded batch.
    The reference is transformers on each text alone (no padding at all); ours runs the batch right padded with
    its mask, left padded with its mask (positions count real tokens only) and right padded without a mask (what
    evaluate.py does: real tokens precede the pads, so causality alone is exact). Error: max_rel_err, i.e.
    max |ours - ref| / max |ref| over the real positions of all texts."""
    seqs = tok.encode_batch(TEXTS)
    assert len({len(s) for s in seqs}) == len(seqs)  # every row but the longest has padding
    with torch.no_grad():
        ref = [hf32(torch.tensor([s])).logits[0] for s in seqs]  # (T_i, V) each
        for side, with_mask in (("right", False), ("right", True), ("left", True)):
            ids, mask = tok.pad(seqs, side)
            got = ours32(ids, mask if with_mask else None)
            assert got.dtype == torch.float32 and got.shape == (len(seqs), ids.shape[1], 49152)
            rows = [got[b][mask[b].bool()] for b in range(len(seqs))]  # (T_i, V): the real positions, in order
            err = max_rel_err(torch.cat(rows), torch.cat(ref))
            assert err <= 1e-5, f"{side} padding, mask={with_mask}: max relative error {err:.3g}"
        # transformers itself on the left-padded batch, with the positions its generate() would give (a plain
        # forward would number the pads too): same logits as ours on that batch
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        hf_left = hf32(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    m = mask.bool()
    assert max_rel_err(got[m], hf_left[m]) <= 1e-5


def test_logits_bf16_argmax_matches_transformers(ours16, hf16, tok):
    """Both models in bf16, the same right-padded batch with its mask: the argmax agrees on >= 99% of the real
    positions (bf16 rounding may flip near-ties; a wrong kernel, norm order or RoPE dtype would flip many more)."""
    assert ours16.lm_head_weight.dtype == torch.bfloat16 and next(hf16.parameters()).dtype == torch.bfloat16
    ids, mask = tok(TEXTS, "right")
    with torch.no_grad():
        got = ours16(ids, mask)
        ref = hf16(input_ids=ids, attention_mask=mask).logits
    m = mask.bool()
    n = int(m.sum())
    assert n >= 100
    same = int((got.argmax(-1) == ref.argmax(-1))[m].sum())
    assert same >= 0.99 * n, f"argmax agrees on {same}/{n} positions"
    # and the bf16 logits are bf16-scale close to transformers' (a loose bound: one bf16 step at the logits' scale)
    assert max_rel_err(got[m], ref[m]) <= 2 ** -7


# ----------------------------------------------------------------------------------------------- tokenizer

def test_tokenizer_special_tokens_match_transformers(tok, hf_tok):
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (BOS_ID, EOS_ID, EOS_ID)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == \
           (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id)
    assert tok.vocab_size == len(hf_tok) == 49152


@pytest.mark.parametrize("name", list(TOKENIZER_TEXTS))
def test_tokenizer_matches_transformers(tok, hf_tok, name):
    """Token ids of hf_tokenizer.load_tokenizer vs transformers.AutoTokenizer, with and without special tokens (single and
    batch encoding), and decoding: lossless round trip, and the same text as transformers' decode."""
    text = TOKENIZER_TEXTS[name]
    for special in (True, False):
        ids = tok.encode(text, add_special_tokens=special)
        ref = hf_tok(text, add_special_tokens=special)["input_ids"]
        assert ids == ref, f"{name}, add_special_tokens={special}"
        assert tok.encode_batch([text, "x"], add_special_tokens=special)[0] == ref
    ids = tok.encode(text)
    # SmolLM2's post-processor adds no BOS (REFERENCE section 9): the ids are the text's own tokens
    assert ids == tok.encode(text, add_special_tokens=False)
    assert (ids[0] == BOS_ID) == text.startswith("<|im_start|>")
    assert tok.decode(ids, skip_special_tokens=False) == text  # byte-level BPE: lossless
    assert tok.decode(ids, skip_special_tokens=False) == hf_tok.decode(ids, skip_special_tokens=False)
    assert tok.decode(ids, skip_special_tokens=True) == hf_tok.decode(ids, skip_special_tokens=True)
    if name == "chat":
        assert tok.decode(ids) == "user\nWhat is 2+2?\nassistant\nThe answer is 4."  # default: specials skipped
    else:
        assert tok.decode(ids) == text


# ----------------------------------------------------------------------------------------------- generation

GEN_PROMPTS = [
    "The capital of France is",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",  # answers, then ends its turn with EOS
    "def fibonacci(n):\n",
    "Water boils at a temperature of",
]


def test_greedy_generation_matches_transformers(ours32, hf32, tok):
    """model.Transformer.generate (batched: prompts of different lengths left padded in one KV cache) equals
    transformers' generate(do_sample=False) on each prompt alone, token for token; ours stops before EOS."""
    n_new = 8
    prompts = [tok.encode(p) for p in GEN_PROMPTS]
    assert hf32.generation_config.eos_token_id == tok.eos_token_id == EOS_ID
    got = ours32.generate(prompts, n_new, tok.eos_token_id, tok.pad_token_id)
    for p, text, g in zip(prompts, GEN_PROMPTS, got):
        with torch.no_grad():
            out = hf32.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                do_sample=False, max_new_tokens=n_new)[0, len(p):].tolist()
        want = out[:out.index(EOS_ID)] if EOS_ID in out else out
        assert g == want, f"{text!r}: ours {tok.decode(g)!r} vs transformers {tok.decode(want)!r}"
    assert tok.decode(got[0]).startswith(" Paris")
    assert len(got[1]) < n_new and "4" in tok.decode(got[1])  # EOS reached: the cut is exercised
    assert len(got[0]) == len(got[2]) == len(got[3]) == n_new


# ----------------------------------------------------------------------------------------------- evaluation

@pytest.mark.parametrize("items,topic", MC_SETS, ids=["bio", "cyber"])
def test_mc_loglikelihoods_match_harness_fp32(ours32, hf32, tok, hf_tok, items, topic):
    """evaluate.mc_loglikelihoods (ours: one forward per question) vs the harness's HF path emulated on
    transformers' model, and vs lm-eval's HFLM itself with transformers' tokenizer: per question and choice,
    log-likelihoods within 1e-4 and the same predictions.
    BOS: SmolLM2's tokenizer adds none, so lm-eval (which leaves BOS to the tokenizer) prepends nothing, and
    evaluate.py's bos=None / False give the same contexts, none starting with BOS; bos=True (lm-eval's
    add_bos_token=True) puts BOS first (tests/test_lm_eval_harness.py checks that against HFLM itself)."""
    reqs = E.mc_requests(tok, items, topic)
    assert all(r["fast"] for r in reqs)  # " A".." D" are one token each after "Answer:"
    assert all(r["ctx"][0] != BOS_ID for r in reqs)
    assert [r["ctx"] for r in E.mc_requests(tok, items, topic, bos=False)] == [r["ctx"] for r in reqs]
    assert [r["ctx"] for r in E.mc_requests(tok, items, topic, bos=True)] == [[BOS_ID] + r["ctx"] for r in reqs]
    # the prompt, written out here as lm-eval's wmdp template renders it (REFERENCE section 4): the emulation and
    # the lm-eval call below both take their contexts from E.mc_prompt, so it is checked on its own
    for it, r in zip(items, reqs):
        c = it["choices"]
        want = (f"The following are multiple choice questions (with answers) about {topic}.\n\n"
                f"{it['question'].strip()}\nA. {c[0]}\nB. {c[1]}\nC. {c[2]}\nD. {c[3]}\nAnswer:")
        assert E.mc_prompt(it["question"], c, topic) == want
        assert r["ctx"] == hf_tok(want)["input_ids"]
        assert r["conts"] == [hf_tok(want + " " + x)["input_ids"][len(r["ctx"]):] for x in "ABCD"]

    ours = E.mc_loglikelihoods(ours32, tok, items, topic, batch_size=8)
    emulated = harness_hf_loglikelihoods(hf32, tok, items, topic, batch_size=8)
    lm_eval = harness_lm_eval_loglikelihoods(hf32, hf_tok, items, topic, batch_size=8)
    for q, (a, b, c) in enumerate(zip(ours, emulated, lm_eval)):
        assert len(a) == len(b) == len(c) == 4
        assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-4, f"question {q}: ours {a} vs emulation {b}"
        assert max(abs(x - y) for x, y in zip(a, c)) <= 1e-4, f"question {q}: ours {a} vs lm-eval {c}"
        assert E.argmax_first(a) == E.argmax_first(b) == E.argmax_first(c)
        assert all(x < 0 for x in a)
    # the scores are not degenerate: the four choices of a question differ
    assert all(len({round(x, 4) for x in a}) == 4 for a in ours)


def test_mc_loglikelihoods_match_harness_bf16(ours16, hf16, tok):
    """bf16: ours (default ll_dtype "model": bf16 log-softmax, as lm-eval with transformers >= 4.46) vs the
    harness emulation on transformers' bf16 model: same predictions, scores within one bf16 step."""
    for items, topic in MC_SETS:
        ours = E.mc_loglikelihoods(ours16, tok, items, topic, batch_size=8)
        ref = harness_hf_loglikelihoods(hf16, tok, items, topic, batch_size=8)
        for a, b in zip(ours, ref):
            assert E.argmax_first(a) == E.argmax_first(b)
            for x, y in zip(a, b):
                assert x == torch.tensor(x, dtype=torch.bfloat16).item()  # bf16 numbers, as the harness reports
                assert abs(x - y) <= 2 ** -7 * max(abs(x), abs(y)), (a, b)


# ----------------------------------------------------------------------------------------------- unlearning

def unlearn_run(ckpt, root, method, extra):
    """unlearn.run in-process on small corpora, short documents, no evaluation; kernels on the PyTorch path.
    extra: flags after (so overriding) the common ones."""
    # 50-80 words, each at least one token: every document fills max_len (48 or 32), so no batch has padding and
    # the step-0 losses can be recomputed below from transformers' activations (whose pad positions differ)
    forget = helpers.write_corpus(root / "forget.jsonl", 6, 1, CORPUS_WORDS, 50, 80)
    retain = helpers.write_corpus(root / "retain.jsonl", 6, 2, CORPUS_WORDS, 50, 80)
    argv = ["--method", method, "--model", str(ckpt), "--forget", forget, "--retain", retain,
            "--out", str(root / "out"), "--no-progress", "--eval-tasks", "none", "--seed", "0", "--device", "cpu",
            "--dtype", "float32", "--batch-size", "2", "--forget-max-len", "48", "--retain-max-len", "48", *extra]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "0")  # the chunked PyTorch path (the interpreter: minutes at V = 49152)
        rec = U.run(methods.resolve(U.overrides_from_argv(argv)))
    return rec, root / "out" / "model", forget, retain


@pytest.fixture(scope="module")
def rmu_run(ckpt, tmp_path_factory):
    return unlearn_run(ckpt, tmp_path_factory.mktemp("rmu"), "rmu",
                       ["--layer-id", "7", "--layer-ids", "5,6,7", "--steps", "3"])


@pytest.fixture(scope="module")
def npo_run(ckpt, tmp_path_factory):
    # a full forward and backward through 30 layers per step, and AdamW over all 135M parameters: keep it small
    return unlearn_run(ckpt, tmp_path_factory.mktemp("npo"), "npo",
                       ["--steps", "2", "--batch-size", "1", "--forget-max-len", "32", "--retain-max-len", "32",
                        "--order", "file"])


def test_real_model_dry_run_records_its_budget(ckpt, tmp_path):
    """A two-step RMU dry run on the real checkpoint, shuffled, on a 4-document coreset of 6: run.json's budget says
    2 steps, one epoch, every selected document seen once; the retain file's coverage too."""
    rec = unlearn_run(ckpt, tmp_path, "rmu", ["--layer-id", "7", "--layer-ids", "5,6,7", "--steps", "2",
                                              "--ratio", "4", "--order", "shuffle", "--no-save"])[0]
    b = rec["budget"]
    assert (b["rule"], b["order"], b["steps"], b["micro_batches"], b["epochs"]) == ("steps", "shuffle", 2, 2, 1.0)
    assert [(f["docs_available"], f["docs_selected"], f["docs_seen"], f["items_drawn"]) for f in b["forget"]] == \
        [(6, 4, 4, 4)]
    assert [(r["docs_available"], r["docs_seen"]) for r in b["retain"]] == [(6, 4)]
    assert rec["steps"] == 2 and len(rec["loss"]) == 2 and rec["memory_estimate_bytes"]["trained_params"] == 3 * 1536 * 576


def test_rmu_pad_positions_equal_transformers_on_the_real_model(ours32, hf32, tok):
    """Left-padded EOS batch of texts of different lengths: the residual stream after layer 7 at EVERY position,
    pads included, equals transformers' under the reference's masking (transformers 4.38.2 sdpa on CUDA: pad rows
    attend to their whole row, position ids 0..T-1), so RMU's unmasked forget term does too."""
    from objectives import RMU
    from test_unlearn import transformers_4_38_sdpa_mask
    texts = ["The capital of France is Paris.", "Hi.", "A much longer sentence about proteins, cells and the way "
             "that they fold into shapes that matter.", "Numbers: 1, 2, 3."]
    ids, mask = tok.pad([tok.encode(t) for t in texts], "left", pad_id=tok.eos_token_id)
    assert (mask == 0).sum() > 20
    with torch.no_grad():
        ours = ours32(ids, mask, until_layer=7, pad_rows="all")
        hf = hf32(input_ids=ids, attention_mask=transformers_4_38_sdpa_mask(mask),
                  position_ids=torch.arange(ids.shape[1])[None].expand_as(ids), output_hidden_states=True)
    ref = hf.hidden_states[8]
    assert torch.allclose(ours, ref, rtol=1e-4, atol=1e-4), (ours - ref).abs().max()
    c = 6.5 * torch.rand(1, 1, 576, generator=torch.Generator().manual_seed(0))
    c = 6.5 * c / c.norm()
    rmu = RMU(ours32, {}, 7, [5, 6, 7], "all")
    with torch.no_grad():
        _, forget, _ = rmu.loss(rmu.trunk(ids, mask), mask, c, rmu.trunk(ids, mask), mask, ours, 1200.0)
    assert forget.item() == pytest.approx(((ref - c) ** 2).mean().item(), rel=1e-5)


def changed_tensors(ckpt, export):
    """Read both safetensors files directly: same keys, shapes, dtypes; -> the keys whose values differ."""
    from safetensors.torch import load_file
    base, new = load_file(str(ckpt / "model.safetensors")), load_file(str(export / "model.safetensors"))
    assert set(new) == set(base), f"keys differ: {sorted(set(new) ^ set(base))[:8]}"
    assert "lm_head.weight" not in new  # tied embeddings: saved once, as the original
    for k in base:
        assert new[k].shape == base[k].shape and new[k].dtype == base[k].dtype == torch.float32, k
    return {k for k in base if not torch.equal(base[k], new[k])}


def test_rmu_changes_exactly_down_proj_of_layers_5_6_7(ckpt, rmu_run):
    rec, export, _, _ = rmu_run
    chosen = {f"model.layers.{i}.mlp.down_proj.weight" for i in (5, 6, 7)}
    assert set(rec["trained_params"]) == chosen
    assert len(rec["loss"]) == 3 and all(torch.isfinite(torch.tensor(rec["loss"])))
    assert rec["loss_parts"][0]["retain"] == 0.0  # step 0: updated == frozen, exactly
    assert changed_tensors(ckpt, export) == chosen  # everything else bit-identical


def first_batch(tok, path, size, max_len):
    """The first training batch of a corpus file, as token ids (B, max_len): every document fills max_len."""
    from data import read_corpus
    seqs = [s[:max_len] for s in tok.encode_batch(read_corpus(path)[:size])]
    assert all(len(s) == max_len for s in seqs)
    return torch.tensor(seqs)


def test_rmu_first_loss_equals_transformers_activations(rmu_run, hf32, tok):
    """Step 0 of RMU on the real model: forget term = mean((h_7(x) - c)^2) with h_7 the residual stream after
    decoder layer 7 (transformers' hidden_states[8]) and c = 6.5 u / ||u||, u ~ U[0, 1)^576 from the run's seed;
    retain term 0 (nothing has moved yet); loss = forget + 1200 * retain."""
    rec = rmu_run[0]
    ids = first_batch(tok, rmu_run[2], 2, 48)
    u = torch.rand(1, 1, 576, generator=torch.Generator().manual_seed(0))
    c = 6.5 * u / u.norm()
    with torch.no_grad():
        h7 = hf32(input_ids=ids, output_hidden_states=True).hidden_states[8]  # [0] is the embedding output
    want = ((h7 - c) ** 2).mean().item()
    assert rec["loss_parts"][0]["forget"] == pytest.approx(want, rel=1e-5)
    assert rec["loss"][0] == pytest.approx(want, rel=1e-5)


def test_npo_first_loss_equals_transformers_cross_entropy(npo_run, hf32, tok):
    """Step 0 of NPO on the real model (fused log-prob kernels, PyTorch path, V = 49152): the policy still equals
    the reference, so the forget term is -(2/beta) logsigmoid(0) = 20 ln 2 (beta 0.1); the retain term is the
    base model's mean token cross-entropy on the first retain batch, recomputed with transformers."""
    rec = npo_run[0]
    assert rec["loss_parts"][0]["forget"] == pytest.approx(20 * math.log(2), rel=1e-5)
    ids = first_batch(tok, npo_run[3], 1, 32)
    with torch.no_grad():
        logits = hf32(input_ids=ids).logits
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 49152), ids[:, 1:].reshape(-1)).item()
    assert rec["loss_parts"][0]["retain"] == pytest.approx(ce, rel=1e-5)
    assert rec["loss"][0] == pytest.approx(20 * math.log(2) + ce, rel=1e-5)


def test_npo_changes_only_its_trained_parameters(ckpt, npo_run, ours32):
    """NPO trains every parameter by default (unlearn.trainable; the tied LM head is the embedding matrix): all of
    them move after two AdamW steps, and nothing else is written."""
    rec, export, _, _ = npo_run
    everything = {n for n, _ in ours32.named_parameters()}  # named_parameters lists a tied tensor once
    assert "lm_head.weight" not in everything
    assert set(rec["trained_params"]) == everything
    assert len(rec["loss"]) == 2 and all(torch.isfinite(torch.tensor(rec["loss"])))
    assert changed_tensors(ckpt, export) == everything


@pytest.mark.parametrize("run", ["rmu_run", "npo_run"])
def test_export_loads_in_transformers(ckpt, hf32, tok, transformers, request, run):
    """The exported checkpoint: transformers loads it (config honoured: RoPE theta, tied LM head) and its logits
    equal model.py's on the same export; both differ from the base model's; the tokenizer files are copied."""
    _, export, _, _ = request.getfixturevalue(run)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (export / name).read_bytes() == (ckpt / name).read_bytes(), name
    cfg, base_cfg = json.loads((export / "config.json").read_text()), json.loads((ckpt / "config.json").read_text())
    for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "rms_norm_eps", "tie_word_embeddings", "bos_token_id",
              "eos_token_id", "max_position_embeddings"):
        assert cfg[k] == base_cfg[k], k
    hf = transformers.AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    assert hf.config.rope_parameters["rope_theta"] == 100000.0 and hf.config.tie_word_embeddings
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    ours = Transformer.from_pretrained(export, dtype=torch.float32)
    ids, mask = tok(TEXTS[:2], "right")
    m = mask.bool()
    with torch.no_grad():
        got = ours(ids, mask)
        ref = hf(input_ids=ids, attention_mask=mask).logits
        base = hf32(input_ids=ids, attention_mask=mask).logits
    assert max_rel_err(got[m], ref[m]) <= 1e-6
    assert not torch.equal(ref[m], base[m])  # the unlearned weights are what was loaded


def test_export_keeps_the_chat_template(ckpt, rmu_run, transformers):
    """The export is a complete checkpoint of the same (instruct) model. Current transformers saves a tokenizer's
    chat template as chat_template.jinja beside tokenizer_config.json (no longer inside it), as in this checkpoint;
    the export must carry it, or apply_chat_template fails on the unlearned model. FAILS at the time of writing:
    hf_tokenizer.TOKENIZER_FILES, the files save_pretrained copies, has no chat_template.jinja."""
    export = rmu_run[1]
    base_tok = transformers.AutoTokenizer.from_pretrained(ckpt)
    assert base_tok.chat_template  # the checkpoint has one (materialised by transformers into chat_template.jinja)
    assert transformers.AutoTokenizer.from_pretrained(export).chat_template == base_tok.chat_template


def test_gcg_starts_and_steps_on_the_real_tokenizer_in_the_letter_prompt(ckpt, monkeypatch):
    """jailbreak.py on SmolLM2's tokenizer: in lm-eval's letter prompt the "\n\n" before the question splits
    differently when the prefix follows it, so the prefix is taken as the tokens it becomes in place; found, scored
    there, and a step never raises the loss."""
    import jailbreak as J
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    model, tok = load(ckpt, "cpu", torch.float32)
    model.requires_grad_(False)
    items = [{"question": "Which organ does the liver toxin attack?", "choices": ["liver", "brain", "lungs", "heart"],
              "answer": 0},
             {"question": "What carries the fever?", "choices": ["ticks", "bats", "water", "shellfish"], "answer": 1}]
    attack = J.Attack(model, tok, items, [0, 1], "biology", "letter")
    start = J.initial_prefix(attack, 6)
    assert attack.rows(start) is not None and len(start) == 6
    loss0 = attack.losses([tuple(start)])[0]
    new, loss1, valid = J.gcg_step(attack, start, 16, 8, torch.Generator().manual_seed(0))
    assert loss1 <= loss0 and valid >= 1 and len(new) == len(start)
