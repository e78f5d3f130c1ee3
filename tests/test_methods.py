"""methods.py: the one function that resolves a run's settings (reference recipe, then the toy's, then the caller's),
its checks, and --print-config."""
import json

import pytest

import methods
import unlearn
from infra import TOY_MODEL, ProjectError


@pytest.fixture
def fake_toy(tmp_path, monkeypatch):
    """A toy directory with its own defaults.json, standing in for data/toy."""
    toy = tmp_path / "toy"
    (toy / "model").mkdir(parents=True)
    (toy / "model" / "config.json").write_text(json.dumps({"num_hidden_layers": 8}))
    (toy / "defaults.json").write_text(json.dumps({
        "note": "x", "rmu": {"layer_id": 4, "layer_ids": [2, 3, 4], "steering_coeff": 20.0, "alpha": 100.0, "lr": 0.001,
                             "steps": 100, "batch_size": 4, "max_len": 128, "masked_loss": True},
        "npo": {"beta": 0.1, "lr": 0.0001, "steps": 100, "max_len": 128, "retain_coeff": 2.0}}))
    monkeypatch.setattr(methods, "TOY_DIR", toy)
    monkeypatch.setattr(methods, "TOY_MODEL", toy / "model")
    return toy


def test_toy_defaults_file_is_honoured(fake_toy, tmp_path):
    toy = fake_toy
    a = methods.resolve({"model": str(toy / "model")})
    assert (type(a), a.layer_id, a.layer_ids, a.steering_coeffs, a.alpha, a.lr, a.steps, a.forget_max_len) == \
        (methods.RMUConfig, 4, [2, 3, 4], [20.0], [100.0], 1e-3, 100, [128])
    assert a.forget == [str(toy / "forget_corpus.jsonl")] and a.eval_tasks == ["toy_hazard", "toy_general"]
    assert a.masked_loss is True and a.fp32_optimizer_state is False
    assert methods.resolve({"model": str(toy / "model"), "masked_loss": False}).masked_loss is False  # --no-x wins
    a = methods.resolve({"model": str(toy / "model"), "method": "npo", "lr": 5e-5})
    assert (type(a), a.gamma, a.lr, a.steps, a.beta) == (methods.NPOConfig, 2.0, 5e-5, 100, 0.1)  # explicit wins
    # the retain corpus follows the method: RMU holds activations (memorised text will do), the NPO family's
    # cross-entropy needs prose the model never trained on; a given --retain wins
    assert a.retain == [str(toy / "retain_unseen.jsonl")] == methods.default_retain("npo").split(",")
    assert methods.resolve({"model": str(toy / "model")}).retain == [str(toy / "retain_corpus.jsonl")]
    assert methods.resolve({"model": str(toy / "model"), "method": "simnpo", "retain": "r.txt"}).retain == ["r.txt"]
    (tmp_path / "m").mkdir()
    a = methods.resolve({"model": str(tmp_path / "m"), "forget": "f", "retain": "r"})
    assert (a.layer_id, a.steering_coeffs, a.alpha, a.lr, a.eval_tasks, a.steps) == (7, [6.5], [1200.0], 5e-5, [], None)
    assert a.masked_loss is False and a.hf_adam_eps is True  # the reference's unmasked loss, transformers' AdamW eps
    (toy / "defaults.json").unlink()  # no silent fallback to the 7B values on the toy
    with pytest.raises(methods.ConfigError, match="defaults.json: missing"):
        methods.resolve({"model": str(toy / "model")})


def test_the_toy_npo_recipe_gives_way_to_what_excludes_it():
    """The toy's NPO trains the MLPs of layers 0-3 and averages three retain orders, scaled 1.2 (data/toy/defaults.json).
    Another --train-scope drops those layers, and a run that can only be one run (--order file, --eval-every, no
    retain term) trains one, unscaled; what the caller gave is kept and checked. GradDiff and SimNPO keep their own
    section."""
    a = methods.resolve({"method": "npo"})
    assert (a.train_scope, a.layer_ids, a.params, a.retain_orders, a.update_scale) == \
        ("params", [0, 1, 2, 3], list(methods.MLP_MATRICES), 3, 1.2)
    a = methods.resolve({"method": "npo", "train_scope": "layers"})
    assert (a.train_scope, a.layer_ids, a.params, a.retain_orders) == ("layers", [], list(methods.MLP_MATRICES), 3)
    for k, v in (("order", "file"), ("eval_every", 20), ("retain_loss", "none"), ("gamma", 0), ("retain_orders", 1)):
        a = methods.resolve({"method": "npo", k: v})   # one order: the scale tuned for the average goes too
        assert (a.retain_orders, a.train_scope, a.update_scale) == (1, "params", 1.0), k
    assert methods.resolve({"method": "npo", "retain_orders": 1, "update_scale": 1.2}).update_scale == 1.2
    assert methods.resolve({"method": "npo", "gamma": 2}).retain_orders == 3
    for m in ("simnpo", "graddiff"):
        a = methods.resolve({"method": m})
        assert (a.train_scope, a.layer_ids, a.retain_orders, a.update_scale, a.lr) == ("all", [], 1, 1.0, 1e-3), m


def test_npo_defaults_are_the_coreset_papers_wmdp_recipe():
    """The script alone gives what `make wmdp-npo` gives: token-mean log-probs are NPOConfig's default."""
    d = methods.method_defaults("npo", "/some/real/model")
    assert (d["npo_mean_tokens"], d["beta"], d["lr"], d["steps"], d["warmup"], d["retain_loss"]) == \
        (True, 0.1, 1e-5, 500, 0.1, "gd")
    assert methods.resolve({"method": "npo"}).npo_mean_tokens is True


def test_print_config_shows_the_resolved_settings(capsys):
    cfg = unlearn.main(["--print-config", "--method", "npo", "--ratio", "0.05", "--lr", "2e-3"])
    shown = json.loads(capsys.readouterr().out)
    assert shown["config"] == "NPOConfig" and shown["lr"] == 2e-3 and shown["ratio"] == 0.05
    assert shown["model"] == str(TOY_MODEL) and shown["steps"] == cfg.steps


def test_grand_reads_the_same_defaults_as_training():
    from coreset import SelectConfig, grand_rmu_settings
    cfg = methods.resolve({})
    assert grand_rmu_settings(SelectConfig(model=str(TOY_MODEL))) == (cfg.layer_id, cfg.layer_ids, cfg.steering_coeffs)


@pytest.mark.parametrize("overrides,msg", [
    ({"method": "ga"}, "--method: unknown method 'ga'"),
    ({"ratio": 0}, "--ratio 0: expected"),
    ({"ratio": 2.5}, "whole number"),
    ({"max_grad_norm": -1}, "--max-grad-norm -1"),
    ({"method": "npo", "beta": -1}, "--beta -1"),
    ({"method": "npo", "beta": 0}, "--beta 0"),
    ({"alpha": "-30"}, "--alpha -30"),
    ({"warmup": -5}, "--warmup -5"),
    ({"forget_max_len": "0"}, "--forget-max-len 0"),
    ({"eval_limit": 0}, "--eval-limit 0"),
    ({"eval_limit": -3}, "--eval-limit -3"),
    ({"layer_id": 99}, "--layer-id 99: expected a layer of the model (0..9)"),
    ({"layer_ids": ""}, "--layer-ids: expected at least one value"),
    ({"params": ""}, "--params: expected at least one value"),
    ({"layer_ids": "1,x"}, "--layer-ids '1,x': expected comma-separated integers"),
    ({"method": "npo", "chunk_tokens": -5}, "--chunk-tokens -5"),
    ({"device": "tpu9"}, "--device 'tpu9'"),
    ({"method": "npo", "layer_id": 3}, "--layer-id: not a setting of --method npo"),
    ({"batch_size": 0}, "--batch-size 0"),
    ({"update_scale": 0}, "--update-scale 0: expected a number > 0"),
    ({"update_scale": float("nan")}, "--update-scale nan"),
    ({"method": "npo", "train_scope": "mlp"}, "--train-scope mlp: expected all, layers or params"),
    ({"method": "npo", "train_scope": "all", "layer_ids": "1,2"}, "--layer-ids 1,2: expected none with --train-scope "
                                                                  "all"),
    ({"method": "npo", "train_scope": "layers", "params": "mlp.up_proj"}, "--params mlp.up_proj: expected none with "
                                                                          "--train-scope layers"),
    ({"method": "npo", "train_scope": "params", "layer_ids": "1", "params": "mlp.nope"},
     "--params mlp.nope: expected names among self_attn.q_proj"),
    ({"method": "npo", "train_scope": "params", "layer_ids": "1,1"}, "--layer-ids 1,1: expected each layer once"),
    ({"method": "npo", "train_scope": "params", "layer_ids": "-1,0"}, "--layer-ids -1,0: expected layers of the model"),
    ({"layer_ids": "2,2"}, "--layer-ids 2,2: expected each layer once"),
    ({"params": "input_layernorm"}, "--params input_layernorm: expected names among"),
    ({"method": "npo", "train_scope": "params", "layer_ids": "0,10"}, "--layer-ids 0,10: expected layers of the "
                                                                       "model (0..9)"),
    ({"train_scope": "layers"}, "--train-scope: not a setting of --method rmu"),
    ({"method": "npo", "retain_orders": 2, "retain_loss": "none"}, "--retain-orders 2: expected 1 when the run has no "
                                                                  "retain term"),
    ({"method": "npo", "retain_orders": 3, "gamma": 0}, "--retain-orders 3: expected 1 when"),
    ({"method": "npo", "retain_orders": 1.5}, "--retain-orders 1.5: expected an integer >= 1"),
    ({"method": "npo", "retain_orders": 3, "order": "file"}, "--retain-orders 3: expected 1 with --order file"),
    ({"method": "npo", "model": "{real}", "forget": "f", "retain": "r", "train_scope": "params"},
     "--layer-ids '': expected at least one, with --train-scope params"),
])
def test_bad_settings_are_one_line_errors_before_any_work(overrides, msg, tmp_path):
    if overrides.get("model") == "{real}":   # a model that is not the toy: no toy values
        (tmp_path / "config.json").write_text(json.dumps({"num_hidden_layers": 8}))
        overrides = dict(overrides, model=str(tmp_path))
    with pytest.raises(ProjectError) as e:
        methods.resolve(overrides)
    assert msg in str(e.value) and "\n" not in str(e.value)


def test_cuda_device_without_gpu_is_refused():
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ProjectError, match="--device cuda: no CUDA GPU"):
        methods.resolve({"device": "cuda"})
