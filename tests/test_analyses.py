"""The faithfulness analyses: mode connectivity (connectivity.py) on a tiny model, against hand-built endpoints."""
import json

import pytest
import torch

import connectivity as C
from data import TASKS
import evaluate
from model import Transformer, load_tokenizer

from test_unlearn import tiny  # noqa: F401  (the tiny model and corpora fixture)

QUESTIONS = [{"question": "the quick brown", "choices": ["fox", "dog", "river", "stone"], "answer": 0},
             {"question": "lazy dog over", "choices": ["alpha", "beta", "gamma", "delta"], "answer": 2},
             {"question": "river stone answer", "choices": ["the", "quick", "jumps", "over"], "answer": 3}]


def test_barrier_of_a_hand_series():
    ts = [0.0, 0.25, 0.5, 0.75, 1.0]
    b = C.barrier(ts, [0.2, 0.5, 0.6, 0.3, 0.4])   # the line: 0.2, 0.25, 0.3, 0.35, 0.4
    assert b["barrier"] == pytest.approx(0.3) and b["barrier_t"] == 0.5
    assert b["dip"] == pytest.approx(-0.05) and b["dip_t"] == 0.75
    assert C.barrier([0.0, 1.0], [0.3, 0.7]) == {"barrier": 0.0, "barrier_t": 0.0, "dip": 0.0, "dip_t": 0.0}


def test_linear_path_interpolates_only_what_differs(tiny, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    data = tmp_path / "data"
    data.mkdir()
    for name in ("toy_hazard", "toy_general"):
        (data / TASKS[name][0]).write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    base = Transformer.from_pretrained(tiny["model"])
    moved = {"a": ["model.layers.1.mlp.down_proj.weight", "model.layers.2.mlp.down_proj.weight"],
             "b": ["model.layers.2.mlp.down_proj.weight", "model.layers.3.self_attn.o_proj.weight"]}
    g = torch.Generator().manual_seed(3)
    ends = {}
    for end, names in moved.items():
        m = Transformer.from_pretrained(tiny["model"])
        with torch.no_grad():
            for n in names:
                dict(m.named_parameters())[n].add_(0.5 * torch.randn(dict(m.named_parameters())[n].shape, generator=g))
        m.save_pretrained(tmp_path / end, tokenizer_dir=tiny["model"])
        ends[end] = m
    seen = []   # the weights each evaluation saw
    real = evaluate.evaluate_tasks

    def spy(model, *args, **kw):
        seen.append({n: p.detach().clone() for n, p in model.named_parameters()})
        return real(model, *args, **kw)
    monkeypatch.setattr(evaluate, "evaluate_tasks", spy)
    rec = C.main(["--a", str(tmp_path / "a"), "--b", str(tmp_path / "b"), "--base", tiny["model"], "--data",
                  str(data), "--points", "3", "--out", str(tmp_path / "out"), "--no-progress", "--device", "cpu"])
    monkeypatch.setattr(evaluate, "evaluate_tasks", real)
    pa, pb = dict(ends["a"].named_parameters()), dict(ends["b"].named_parameters())
    for t, w in zip((0.0, 0.5, 1.0), seen[:3]):   # the A <-> B path: every tensor at (1 - t) A + t B
        for n in w:
            assert torch.allclose(w[n], (1 - t) * pa[n] + t * pb[n], atol=1e-6), (t, n)
    ab, base_a, base_b = rec["paths"]
    assert ab["tensors"] == sorted(set(moved["a"]) | set(moved["b"]))
    assert base_a["tensors"] == sorted(moved["a"]) and base_b["tensors"] == sorted(moved["b"])
    assert [p["t"] for p in ab["points"]] == [0.0, 0.5, 1.0]

    tok = load_tokenizer(tiny["model"])

    def metrics(model):
        res = evaluate.evaluate_tasks(model, tok, data, ["toy_hazard", "toy_general"], progress=False)
        return evaluate.task_metrics(evaluate.summarize(res))
    mid = Transformer.from_pretrained(tiny["model"])
    with torch.no_grad():
        pa, pb, pm = (dict(x.named_parameters()) for x in (ends["a"], ends["b"], mid))
        for n in pm:
            pm[n].copy_((0.5 * pa[n].double() + 0.5 * pb[n].double()).float())
    assert ab["points"][0]["metrics"] == metrics(ends["a"]) and ab["points"][2]["metrics"] == metrics(ends["b"])
    assert ab["points"][1]["metrics"] == metrics(mid)
    assert base_a["points"][0]["metrics"] == metrics(base)
    for p in rec["paths"]:
        for m, b in p["barriers"].items():
            vals = [q["metrics"][m] for q in p["points"]]
            assert b == C.barrier([0.0, 0.5, 1.0], vals)
    for ext in ("json", "md", "png"):
        assert (tmp_path / "out" / f"results.{ext}").is_file()
    assert "| barrier (t) |" in (tmp_path / "out" / "results.md").read_text()
    # one end only, or too few points: one-line errors before any work
    for argv, msg in ((["--a", str(tmp_path / "a")], "--a and --b"), (["--points", "1"], "--points 1")):
        with pytest.raises(SystemExit) as e:
            C.main(argv + ["--out", str(tmp_path / "o2")])
        assert msg in str(e.value.code) and "\n" not in str(e.value.code)
