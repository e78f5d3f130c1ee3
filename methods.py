"""What an unlearning run is configured with, and the one function that resolves it.

    cfg = resolve({"method": "rmu", "ratio": 0.05})   # -> RMUConfig: every default filled in, every value checked
    cfg = resolve({"method": "npo", "model": "/models/zephyr", "forget": "bio.jsonl", "retain": "wiki.txt"})

One dataclass per method family. Their field defaults ARE the reference recipes: RMUConfig is WMDP's Zephyr run
(REFERENCE section 2), NPOConfig the coreset paper's WMDP NPO runs (section 3: token-mean log-probs, beta 0.1,
lr 1e-5, retain CE, warmup 10 %, 500 steps). Resolution, in order, later wins:
    1. the dataclass defaults (the reference values);
    2. the embedded toy's own values (data/toy/defaults.json) when --model is the toy model;
    3. what the caller set explicitly (command-line flags, or a sweep's dict); a default tied to a setting the
       caller changed gives way (_give_way: another --train-scope drops the toy NPO's layers; a run that can only
       be one run trains one retain order, unscaled).
Then every value is checked against its math (beta > 0, layer ids inside the model, ...) before any model loads:
a bad value is a one-line ConfigError naming the flag. `python unlearn.py --print-config [flags]` prints the
result; unlearn.run records it in run.json.

The budget (--steps / --epochs / the reference's rule) and the data order are budget.py's; the optimizer and the
learning-rate schedule are optimizer.py's. Also here: memory_estimate (what a run needs, checked before the model
loads).
"""
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from budget import ORDERS
from infra import (TOY_DIR, TOY_MODEL, TOY_MUSE_MODEL, UNSEEN_RETAIN_FILE, ProjectError, parse_ratio, resolve_device,
                   resolve_dtype, split_list)
from loglik import eval_settings

METHODS = ("rmu", "npo", "graddiff", "simnpo")
MATRICES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
            "mlp.up_proj", "mlp.down_proj")   # the linear layers of a decoder layer: what --params may name
MLP_MATRICES = MATRICES[4:]           # the NPO family's --params under --train-scope params, unless given
TOY_TASKS = ["toy_hazard", "toy_general"]


class ConfigError(ProjectError):
    """A flag or config value outside what the method allows; the message names the flag."""


@dataclass
class UnlearnConfig:
    """Fields of every method. Paths are as given; lists hold one value per forget topic where noted."""
    method: str = "rmu"
    model: str = str(TOY_MODEL)           # Hugging Face Llama/Mistral checkpoint dir
    forget: list = None                   # forget corpora, one per topic (toy: data/toy/forget_corpus.jsonl)
    retain: list = None                   # retain corpora, one per topic or one for all
    coreset: str | None = None            # coreset JSONL written by coreset.py
    ratio: float | None = None            # random coreset: fraction (<= 1) or count (> 1) per forget file
    seed: int = 42                        # the reference's seed
    out: str = "runs/unlearn"
    steps: int | None = None              # optimizer steps (None: --epochs, else the method's rule; budget.py)
    epochs: float | None = None           # passes over the run's forget set (coreset or full); excludes --steps
    order: str = "shuffle"                # shuffle: a seeded permutation per epoch | file: file order (reference)
    data: str | None = None               # DATA dir of the evaluation tasks (toy: data/toy)
    eval_tasks: list = None               # tasks evaluated before and after ([] skips; toy: toy_hazard, toy_general)
    eval_limit: int | None = None         # questions per task (None: all)
    eval_batch_size: int = 32
    eval_preset: str = "current"          # evaluator settings (loglik.EVAL_PRESETS): current | wmdp-published
    eval_bos: str | None = None           # config | yes | no | lm-eval-0.4.2 (None: the preset's)
    eval_ll_dtype: str | None = None      # model | float32 (None: the preset's)
    eval_every: int = 0                   # also evaluate every N steps during training (budget curve); 0: off
    min_chars: int = 0                    # documents with len(text) > min_chars (reference min_len 0)
    raw_json_topics: list = field(default_factory=list)   # forget topics read as raw JSON lines (the reference
                                          # reads cyber-forget-corpus so: --raw-json-topics 1); [] parses the text
    device: str | None = None             # None: cuda when available
    dtype: str | None = None              # None: bf16 on CUDA (as the reference), fp32 on CPU
    save: bool = True                     # write the checkpoint (run.json is always written)
    eval_cache: bool = True               # reuse the base model's cached evaluation
    eval_cache_dir: str | None = None     # where it is cached (None: <out>/../.eval_cache)
    overwrite: bool = False               # replace an --out holding anything but a previous run's own files
    progress: bool = True
    # optimization
    lr: float = 5e-5
    adam_eps: float = 1e-6
    hf_adam_eps: bool = True              # eps added to the uncorrected sqrt(v) (transformers.AdamW)
    weight_decay: float = 0.0
    batch_size: int = 4
    grad_accum: int = 1
    warmup: float = 0.0                   # steps (>= 1) or a fraction of the steps (< 1)
    lr_schedule: str = "constant"         # constant | linear | cosine
    max_grad_norm: float = 0.0            # 0: no clipping
    fp32_optimizer_state: bool = False    # fp32 Adam moments and master weights for bf16/fp16 parameters
    memory_check: bool = True             # refuse, before loading, a run whose estimate exceeds the GPU's memory
    forget_max_len: list = field(default_factory=lambda: [512])   # tokens per forget document, per topic
    retain_max_len: int = 512
    update_scale: float = 1.0             # after the last step theta = theta_base + s (theta - theta_base) on the
                                          # trained tensors (task arithmetic's coefficient); 1: the run as trained
    retain_orders: int = 1                # K > 1: K runs that differ only in the order of the retain batches (the
                                          # first is the K = 1 run), and the average of their weights is the model


@dataclass
class RMUConfig(UnlearnConfig):
    """RMU, WMDP's reference run on Zephyr-7B (rmu/unlearn.py)."""
    forget_max_len: list = field(default_factory=lambda: [512, 768])   # bio, cyber
    order: str = "file"                   # the reference's data order (with steps None: its 150-batch rule)
    max_num_batches: int = 150
    steering_coeffs: list = field(default_factory=lambda: [6.5])     # control-vector norm per topic
    alpha: list = field(default_factory=lambda: [1200.0])              # retain weight per topic
    layer_id: int = 7                     # steering layer: the residual stream after this decoder layer
    layer_ids: list = field(default_factory=lambda: [5, 6, 7])         # layers whose `params` are trained
    params: list = field(default_factory=lambda: ["mlp.down_proj"])   # trained matrices inside each layer
    masked_loss: bool = False             # MSE over real tokens but BOS (reference: every position)
    pad_attention: str = "all"            # left-pad query rows attend to every position of their row, as the
                                          # reference's transformers 4.38.2 (sdpa, CUDA) did; "self": only itself
    cache_gib: float = 2.0                # cache of recurring trunk activations / frozen targets (0: off)


@dataclass
class NPOConfig(UnlearnConfig):
    """NPO, GradDiff, SimNPO as the coreset paper's WMDP runs."""
    lr: float = 1e-5
    adam_eps: float = 1e-8
    hf_adam_eps: bool = False
    warmup: float = 0.1
    lr_schedule: str = "linear"
    max_grad_norm: float = 1.0
    steps: int | None = 500
    fp32_optimizer_state: bool = True     # fp32 master weights and Adam state for bf16 weights (as HF Trainer's
                                          # mixed precision); --no-fp32-optimizer-state: pure bf16
    beta: float = 0.1
    gamma: float = 1.0                    # retain term weight
    delta: float = 0.0                    # SimNPO margin
    retain_loss: str = "gd"               # gd (CE) | kl (KL(ref || current)) | none
    npo_mean_tokens: bool = True          # token-mean log-probs (the WMDP runs); False: summed (NPO paper, MUSE)
    chunk_tokens: int = 0                 # split documents into pieces of N tokens (MUSE); 0: truncate
    activation_checkpointing: bool = False  # keep each decoder block's input only, recompute it in the backward
    train_scope: str = "all"              # all: every parameter (the reference) | layers: the decoder layers only
                                          # (embeddings, lm_head and the final norm frozen) | params: --params of
                                          # --layer-ids only (as RMU trains; an MLP subset moves less of the rest)
    layer_ids: list = field(default_factory=list)                     # --train-scope params: layers trained
    params: list = field(default_factory=lambda: list(MLP_MATRICES))


TRAIN_SCOPES = ("all", "layers", "params")
LIST_FIELDS = {"forget": str, "retain": str, "eval_tasks": str, "forget_max_len": int, "steering_coeffs": float,
               "alpha": float, "layer_ids": int, "params": str, "raw_json_topics": int}
# data/toy/defaults.json may spell a few keys as the reference's flags do
TOY_KEY_ALIASES = {"steering_coeff": "steering_coeffs", "max_len": "forget_max_len", "retain_len": "retain_max_len",
                   "eps": "adam_eps", "max_num_steps": "max_num_batches", "retain_coeff": "gamma"}


def config_class(method):
    if method not in METHODS:
        raise ConfigError(f"--method: unknown method {method!r} (expected one of {', '.join(METHODS)})")
    return RMUConfig if method == "rmu" else NPOConfig


def toy_models():
    """The embedded toy's models: the WMDP-shaped one, and the MUSE split's target model. Each has its own data
    (toy_data) and its own tuned values in data/toy/defaults.json (the MUSE model's under "muse")."""
    return {"wmdp": TOY_MODEL, "muse": TOY_MUSE_MODEL}


def toy_data(kind, method):
    """The forget and retain files and the evaluation tasks a toy model is unlearned and evaluated on by default.
    On the WMDP-shaped toy the NPO family's retain corpus is prose the model never trained on: its retain term is
    cross-entropy, about 0 on the memorised retain corpus (holding nothing), while RMU's matches activations to
    the frozen model's, for which memorised text is as good as any (data/toy/README.md)."""
    if kind == "muse":
        d = TOY_DIR / "muse" / "toy"
        return {"forget": [str(d / "raw_forget.jsonl")], "retain": [str(d / "raw_retain1.jsonl")],
                "eval_tasks": ["muse_toy", "toy_general"]}
    retain = TOY_DIR / ("retain_corpus.jsonl" if method == "rmu" else UNSEEN_RETAIN_FILE)
    return {"forget": [str(TOY_DIR / "forget_corpus.jsonl")], "retain": [str(retain)], "eval_tasks": list(TOY_TASKS)}


def default_retain(method) -> str:
    """--retain's default in the scripts that take one: the WMDP-shaped toy's retain corpus for `method`."""
    return ",".join(toy_data("wmdp", method)["retain"])


def toy_kind(model_dir):
    """"wmdp" or "muse" when model_dir is one of the embedded toy's models, else None."""
    for kind, path in toy_models().items():
        try:
            if Path(model_dir).resolve() == path.resolve():
                return kind
        except OSError:
            pass
    return None


def is_toy(model_dir) -> bool:
    return toy_kind(model_dir) is not None


def toy_values(kind="wmdp") -> dict:
    """data/toy/defaults.json as a dict: the WMDP toy model's tuned values, or (kind "muse") its "muse" section.
    The one reader of that file: the unlearning methods' sections (toy_defaults) and the analyses' own ("relearn",
    "jailbreak") come from here."""
    path = TOY_DIR / "defaults.json"
    if not path.is_file():  # the reference's 7B values do nothing useful on an 8-layer toy: refuse, do not guess
        raise ConfigError(f"{path}: missing; it holds the toy model's tuned hyperparameters (restore it with git)")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if kind == "muse":
        if not isinstance(raw.get("muse"), dict):
            raise ConfigError(f"{path}: no \"muse\" section (the MUSE toy model's tuned values)")
        raw = raw["muse"]
    return raw


def toy_defaults(method, kind="wmdp") -> dict:
    """toy_values' section for this method: {"rmu": {...}, "npo": {...}, "npo_family": {...}} (or a flat dict, RMU;
    "npo_family" holds GradDiff's and SimNPO's, else they take NPO's). Keys as the config's fields (reference spellings accepted); notes and results in the file are skipped."""
    raw = toy_values(kind)
    if any(k in raw for k in METHODS + ("npo_family",)):   # the family's other members: "npo_family", else "npo"
        sect = raw.get(method) or (method != "rmu" and (raw.get("npo_family") or raw.get("npo"))) or {}
    else:
        sect = raw if method == "rmu" else {}
    known = {f.name for f in fields(config_class(method))}
    out = {}
    for k, v in sect.items():
        k = k.replace("-", "_")
        k = TOY_KEY_ALIASES.get(k, k)
        if k in known:
            out[k] = v
    return out


def method_defaults(method, model=None) -> dict:
    """The defaults of `method` for `model`: the reference recipe (the dataclass), then the toy's own values when
    `model` is the embedded toy. Lists parsed. This is what every caller that needs a method's settings without a
    run (GraNd-RMU scoring its control vectors, the sweep) reads."""
    cls = config_class(method)
    values = {f.name: getattr(cls(), f.name) for f in fields(cls)}
    kind = toy_kind(model or TOY_MODEL)
    if kind:
        values.update(toy_defaults(method, kind))
    return _parse_lists(values)


def _parse_lists(values: dict) -> dict:
    for k, conv in LIST_FIELDS.items():
        v = values.get(k)
        if v is None:
            continue
        if isinstance(v, (list, tuple)):
            values[k] = [conv(x) for x in v]
        elif k == "eval_tasks" and str(v).strip().lower() in ("", "none"):
            values[k] = []
        else:
            values[k] = split_list(v, f"--{k.replace('_', '-')}", conv)
    return values


def resolve(overrides: dict):
    """The one place a run's configuration is decided: method_defaults, then `overrides`; then checked.
    -> RMUConfig or NPOConfig with every field set (steps may stay None: RMU's rule needs the corpora)."""
    method = overrides.get("method") or "rmu"
    cls = config_class(method)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        every = {f.name for f in fields(RMUConfig)} | {f.name for f in fields(NPOConfig)}
        other = [k for k in unknown if k in every]
        if other:
            raise ConfigError(f"--{other[0].replace('_', '-')}: not a setting of --method {method}")
        raise ConfigError(f"unknown setting(s) {', '.join(unknown)}")
    model = str(overrides.get("model") or TOY_MODEL)
    toy = toy_kind(model)
    if toy and not (toy_models()[toy] / "config.json").is_file():
        raise ConfigError(f"{toy_models()[toy]}: the embedded toy model is not built; run `make toy`")
    values = method_defaults(method, model)
    defaults = dict(values)
    given = _parse_lists({k: v for k, v in overrides.items() if v is not None})
    if given.get("epochs") is not None:   # a budget in epochs replaces the recipe's step count
        if given.get("steps") is not None:
            raise ConfigError("--steps and --epochs: give one of them (the run's budget)")
        values["steps"] = None
    values.update(given)
    _give_way(values, given, defaults, cls())
    values["method"], values["model"] = method, model
    toy_paths = dict(toy_data(toy or "wmdp", method), data=str(TOY_DIR))
    for k, v in toy_paths.items():
        if values.get(k) is None:
            if toy:
                values[k] = v
            elif k in ("forget", "retain"):
                raise ConfigError(f"--{k}: required unless --model is the embedded toy ({TOY_MODEL})")
            else:
                values[k] = "." if k == "data" else []
    cfg = cls(**values)
    check(cfg)
    return cfg


def _give_way(values: dict, given: dict, defaults: dict, reference) -> None:
    """A default that only makes sense beside another default gives way when the caller changes that one: the
    toy's NPO trains --params of --layer-ids under --train-scope params, averages --retain-orders 3 and scales the
    average by 1.2, so another --train-scope drops those layers, a run that cannot have several retain orders
    (--order file, --eval-every, no retain term) trains one, and a run of one order keeps its weights as trained
    (the scale was tuned for the average). What the caller gave is kept, and checked."""
    if "train_scope" in given and given["train_scope"] != "params":
        for k in ("layer_ids", "params"):
            if k not in given:
                values[k] = getattr(reference, k)
    one_run = values.get("order") == "file" or values.get("eval_every") or values.get("retain_loss") == "none" or \
        values.get("gamma") == 0
    if "retain_orders" not in given and one_run and \
            {"order", "eval_every", "retain_loss", "gamma"} & set(given):
        values["retain_orders"] = 1
    if values["retain_orders"] == 1 and defaults["retain_orders"] > 1 and "update_scale" not in given:
        values["update_scale"] = reference.update_scale


def _fail(flag, value, expected):
    raise ConfigError(f"--{flag.replace('_', '-')} {value}: expected {expected}")


def check(cfg):
    """Every numeric and list setting against its math; the model's own shape for layer ids. Raises ConfigError."""
    if cfg.ratio is not None:
        parse_ratio(cfg.ratio)
    if cfg.coreset is not None and cfg.ratio is not None:
        raise ConfigError("--coreset and --ratio: give one of them")
    for k in ("batch_size", "grad_accum", "eval_batch_size"):
        if int(getattr(cfg, k)) < 1:
            _fail(k, getattr(cfg, k), "an integer >= 1")
    if cfg.retain_max_len < 2:
        _fail("retain_max_len", cfg.retain_max_len, "at least 2 tokens (one input, one target)")
    if any(n < 2 for n in cfg.forget_max_len):
        _fail("forget_max_len", ",".join(map(str, cfg.forget_max_len)), "at least 2 tokens per document (one target)")
    if cfg.steps is not None and int(cfg.steps) < 1:
        _fail("steps", cfg.steps, "an integer >= 1")
    if cfg.epochs is not None and not (math.isfinite(cfg.epochs) and cfg.epochs > 0):
        _fail("epochs", cfg.epochs, "a number > 0 (passes over the run's forget set)")
    if cfg.steps is not None and cfg.epochs is not None:
        raise ConfigError("--steps and --epochs: give one of them (the run's budget)")
    if cfg.order not in ORDERS:
        _fail("order", cfg.order, " or ".join(ORDERS))
    if cfg.eval_every < 0:
        _fail("eval_every", cfg.eval_every, "an integer >= 0 (0: no evaluation during training)")
    if cfg.eval_every and not cfg.eval_tasks:
        _fail("eval_every", cfg.eval_every, "0 when --eval-tasks is none (nothing to evaluate during training)")
    try:
        eval_settings(cfg.eval_preset, cfg.eval_bos, cfg.eval_ll_dtype)
    except ProjectError as e:
        raise ConfigError(str(e)) from None
    if cfg.eval_limit is not None and int(cfg.eval_limit) < 1:
        _fail("eval_limit", cfg.eval_limit, "an integer >= 1 (leave it out to evaluate every question)")
    if cfg.min_chars < 0:
        _fail("min_chars", cfg.min_chars, "an integer >= 0")
    if not (math.isfinite(cfg.lr) and cfg.lr > 0):
        _fail("lr", cfg.lr, "a number > 0")
    if not cfg.adam_eps > 0:
        _fail("adam_eps", cfg.adam_eps, "a number > 0")
    if cfg.weight_decay < 0:
        _fail("weight_decay", cfg.weight_decay, "a number >= 0")
    if cfg.warmup < 0:
        _fail("warmup", cfg.warmup, "steps >= 1, a fraction in [0, 1), or 0")
    if cfg.lr_schedule not in ("constant", "linear", "cosine"):
        _fail("lr_schedule", cfg.lr_schedule, "constant, linear or cosine")
    if not cfg.max_grad_norm >= 0:
        _fail("max_grad_norm", cfg.max_grad_norm, "a number > 0, or 0 for no clipping")
    if not (math.isfinite(cfg.update_scale) and cfg.update_scale > 0):
        _fail("update_scale", cfg.update_scale, "a number > 0 (1: the weights as trained; < 1 towards the base)")
    if int(cfg.retain_orders) != cfg.retain_orders or cfg.retain_orders < 1:
        _fail("retain_orders", cfg.retain_orders, "an integer >= 1 (1: one run)")
    if cfg.retain_orders > 1 and cfg.order != "shuffle":
        _fail("retain_orders", cfg.retain_orders, "1 with --order file (every retain order is the file's)")
    if cfg.retain_orders > 1 and cfg.eval_every:
        _fail("retain_orders", cfg.retain_orders, "1 with --eval-every (the budget curve follows one run)")
    resolve_dtype(cfg.dtype, "cpu")  # the one dtype-name check (infra)
    if any(not 0 <= t < len(cfg.forget) for t in cfg.raw_json_topics):
        _fail("raw_json_topics", ",".join(map(str, cfg.raw_json_topics)), f"forget topic indices in 0..{len(cfg.forget) - 1}")
    if len(cfg.retain) not in (1, len(cfg.forget)):
        raise ConfigError(f"--retain: expected one file or one per forget file ({len(cfg.forget)}), "
                          f"got {len(cfg.retain)}")
    cfg.device = resolve_device(cfg.device)
    if isinstance(cfg, RMUConfig):
        _check_rmu(cfg)
    else:
        _check_npo(cfg)


def model_layers(model_dir) -> int | None:
    """num_hidden_layers from config.json (None when it cannot be read: loading the model reports that)."""
    try:
        return int(json.loads((Path(model_dir) / "config.json").read_text())["num_hidden_layers"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _check_rmu(cfg):
    if cfg.max_num_batches < 1:
        _fail("max_num_batches", cfg.max_num_batches, "an integer >= 1")
    if not cfg.layer_ids:
        _fail("layer_ids", "''", "at least one layer")
    if not cfg.params:
        _fail("params", "''", "at least one trained matrix, e.g. mlp.down_proj")
    if any(a < 0 or not math.isfinite(a) for a in cfg.alpha):
        _fail("alpha", ",".join(map(str, cfg.alpha)), "numbers >= 0")
    if any(c <= 0 or not math.isfinite(c) for c in cfg.steering_coeffs):
        _fail("steering_coeffs", ",".join(map(str, cfg.steering_coeffs)), "numbers > 0")
    if cfg.cache_gib < 0:
        _fail("cache_gib", cfg.cache_gib, "a number >= 0")
    if cfg.pad_attention not in ("all", "self"):
        _fail("pad_attention", cfg.pad_attention, "all (the reference's) or self")
    n = model_layers(cfg.model)
    if n is not None and not 0 <= cfg.layer_id < n:
        _fail("layer_id", cfg.layer_id, f"a layer of the model (0..{n - 1})")
    if max(cfg.layer_ids) > cfg.layer_id or min(cfg.layer_ids) < 0:
        raise ConfigError(f"--layer-ids {','.join(map(str, cfg.layer_ids))}: expected layers in 0..--layer-id "
                          f"({cfg.layer_id}); later layers cannot change the steered activation")
    check_matrices(cfg.layer_ids, cfg.params)


def check_matrices(layer_ids, params, n_layers=None):
    """--params names linear layers of a decoder layer, and --layer-ids names each layer once, each a layer of the
    model when n_layers is known (what a run trains, and what GraNd's hooks treat as linear layers, once each)."""
    if any(p not in MATRICES for p in params):
        _fail("params", ",".join(params), "names among " + ", ".join(MATRICES))
    if len(set(layer_ids)) != len(layer_ids):
        _fail("layer_ids", ",".join(map(str, layer_ids)), "each layer once")
    if layer_ids and (min(layer_ids) < 0 or (n_layers is not None and max(layer_ids) >= n_layers)):
        _fail("layer_ids", ",".join(map(str, layer_ids)), "layers of the model (0.." +
              (f"{n_layers - 1})" if n_layers is not None else "the last)"))


def _check_npo(cfg):
    if not (cfg.beta > 0 and math.isfinite(cfg.beta)):
        _fail("beta", cfg.beta, "a number > 0")
    if cfg.gamma < 0:
        _fail("gamma", cfg.gamma, "a number >= 0")
    if cfg.retain_loss not in ("gd", "kl", "none"):
        _fail("retain_loss", cfg.retain_loss, "gd, kl or none")
    if cfg.train_scope not in TRAIN_SCOPES:
        _fail("train_scope", cfg.train_scope, ", ".join(TRAIN_SCOPES[:-1]) + " or " + TRAIN_SCOPES[-1])
    if cfg.train_scope == "params":
        if not cfg.layer_ids or not cfg.params:
            _fail("layer_ids" if not cfg.layer_ids else "params", "''", "at least one, with --train-scope params")
        check_matrices(cfg.layer_ids, cfg.params, model_layers(cfg.model))
    elif cfg.layer_ids or cfg.params != list(MLP_MATRICES):
        flag = "layer_ids" if cfg.layer_ids else "params"
        _fail(flag, ",".join(map(str, getattr(cfg, flag))), f"none with --train-scope {cfg.train_scope} (the NPO "
              "family's --layer-ids and --params pick what trains with --train-scope params)")
    if cfg.chunk_tokens < 0 or cfg.chunk_tokens == 1:
        _fail("chunk_tokens", cfg.chunk_tokens, "0 (truncate) or a piece length >= 2")
    if cfg.retain_orders > 1 and (cfg.retain_loss == "none" or not cfg.gamma):
        _fail("retain_orders", cfg.retain_orders, "1 when the run has no retain term (--retain-loss none or --gamma 0)")
    if cfg.steps is None and cfg.epochs is None:
        raise ConfigError(f"--steps / --epochs: --method {cfg.method} needs a budget (the recipe's is 500 steps)")


# ----------------------------------------------------------------------------------------------- memory

GIB = 2 ** 30


def param_counts(mc: dict, cfg=None) -> tuple:
    """(all parameters, trained parameters) from a config.json dict: RMU (and --train-scope params) trains --params
    of --layer-ids, the NPO family its --train-scope (and cfg None: full fine-tuning) everything."""
    d, f, L, V = mc["hidden_size"], mc["intermediate_size"], mc["num_hidden_layers"], mc["vocab_size"]
    H = mc["num_attention_heads"]
    kv, hd = mc.get("num_key_value_heads") or H, mc.get("head_dim") or d // H
    matrix = dict(zip(MATRICES, (d * H * hd, d * kv * hd, d * kv * hd, H * hd * d, d * f, d * f, f * d)))
    layer = sum(matrix.values()) + 2 * d
    total = L * layer + V * d * (1 if mc.get("tie_word_embeddings") else 2) + d
    if cfg is None or (cfg.method != "rmu" and cfg.train_scope == "all"):
        return total, total
    if cfg.method != "rmu" and cfg.train_scope == "layers":   # the decoder layers
        return total, L * layer
    return total, len(cfg.layer_ids) * sum(matrix.get(pn, 0) for pn in cfg.params)


def memory_estimate(cfg, mc: dict, dtype_bytes: int, shards: int = 1) -> dict:
    """Bytes a run needs on its device, estimated before anything loads (mc: the model's config.json). Weights,
    the trained parameters' gradients, their fp32 master copy and Adam moments (fp32_optimizer_state: 4 + 8 bytes
    per trained parameter, so the NPO family on bf16 weights needs about 16 bytes per parameter, about 112 GB for
    a 7B model), and the activations kept for backward: per layer with gradients and per token about
    (8 d + 4 f) values (attention and MLP inputs and outputs; the fused log-prob kernels keep no (N, V) logits),
    for a forget and a retain batch. RMU keeps layers min(layer_ids)..layer_id only.
    shards > 1 (FSDP2, the NPO family, per GPU): fp32 master weights, fp32 gradients and Adam moments split over
    the shards (16 bytes per parameter / shards), plus two decoder blocks gathered whole in dtype (the one in use
    and the next, prefetched) and the embeddings with the LM head; activations of batch / shards rows."""
    total, trained = param_counts(mc, cfg)
    if shards > 1 and cfg.method != "rmu":
        d, f, L, V = mc["hidden_size"], mc["intermediate_size"], mc["num_hidden_layers"], mc["vocab_size"]
        block = (total - V * d * (1 if mc.get("tie_word_embeddings") else 2)) / L
        gathered = (2 * block + V * d * (1 if mc.get("tie_word_embeddings") else 2)) * dtype_bytes
        tokens = -(-cfg.batch_size // shards) * max(max(cfg.forget_max_len), cfg.retain_max_len)
        per_token = L * d + (8 * d + 4 * f) if getattr(cfg, "activation_checkpointing", False) else L * (8 * d + 4 * f)
        acts = 2 * tokens * per_token * dtype_bytes
        parts = {"weights": total * 4 / shards + gathered, "gradients": trained * 4 / shards,
                 "optimizer": trained * 8 / shards, "activations": acts}
        return {**parts, "total": sum(parts.values()), "trained_params": trained, "params": total,
                "fp32_master": True, "shards": shards}
    d, f = mc["hidden_size"], mc["intermediate_size"]
    master = cfg.fp32_optimizer_state and dtype_bytes < 4
    optimizer = trained * (12 if master else 2 * dtype_bytes)
    layers = cfg.layer_id - min(cfg.layer_ids) + 1 if cfg.method == "rmu" else mc["num_hidden_layers"]
    tokens = cfg.batch_size * max(max(cfg.forget_max_len), cfg.retain_max_len)
    acts = 2 * tokens * layers * (8 * d + 4 * f) * dtype_bytes
    parts = {"weights": total * dtype_bytes, "gradients": trained * dtype_bytes, "optimizer": optimizer,
             "activations": acts}
    return {**parts, "total": sum(parts.values()), "trained_params": trained, "params": total,
            "fp32_master": master}


def check_memory(est: dict, device_bytes: int, device: str, cfg):
    """Stop before loading when the estimate exceeds the device: one line with both numbers and the options."""
    if est["total"] <= device_bytes:
        return
    opts = ["a smaller --batch-size or --forget-max-len / --retain-max-len"]
    if est["fp32_master"]:
        pure = est["total"] - est["optimizer"] + est["trained_params"] * 4   # bf16 moments instead
        opts.insert(0, f"pure bf16 (--no-fp32-optimizer-state: about {pure / GIB:.0f} GiB)")
    if cfg.method != "rmu":
        opts.append("several GPUs: torchrun --nproc-per-node N unlearn.py ... (FSDP2; make ... NPROC=N)")
    raise ConfigError(f"memory: this run needs about {est['total'] / GIB:.0f} GiB (weights {est['weights'] / GIB:.0f}, "
                      f"gradients {est['gradients'] / GIB:.0f}, optimizer {est['optimizer'] / GIB:.0f}, activations "
                      f"{est['activations'] / GIB:.0f}) but {device} has {device_bytes / GIB:.0f} GiB; options: "
                      + "; ".join(opts) + " (--no-memory-check runs anyway)")


def check_device_memory(cfg, device, dtype, shards=1) -> dict | None:
    """memory_estimate for this run (None when config.json cannot be read: loading reports it); on a GPU a run
    that cannot fit stops here, before loading. shards: FSDP2 ranks the NPO family's state is split over."""
    try:
        mc = json.loads((Path(cfg.model) / "config.json").read_text())
        est = memory_estimate(cfg, mc, torch.finfo(dtype).bits // 8, shards)
    except (OSError, ValueError, KeyError, TypeError):
        return None   # an unreadable config.json: loading reports it
    if device.type == "cuda" and cfg.memory_check:
        total = torch.cuda.get_device_properties(device).total_memory
        check_memory(est, total, str(device), cfg)
    return est


def describe(cfg) -> str:
    """The resolved configuration as JSON (what --print-config shows)."""
    from dataclasses import asdict
    return json.dumps({"config": type(cfg).__name__, **asdict(cfg)}, indent=2)


__all__ = ["METHODS", "ConfigError", "UnlearnConfig", "RMUConfig", "NPOConfig", "resolve", "check", "check_matrices",
           "method_defaults", "toy_defaults", "is_toy", "toy_kind", "describe", "memory_estimate", "check_memory",
           "check_device_memory"]
