"""The training budget and the data order (budget.py): the reference's file-order schedule, seeded shuffled epochs,
the step rules, what run.json's "budget" reports (documents seen), and the sweep's budget policies."""
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from data import TASKS

import budget as B
import coreset_sweep as S
import methods
import unlearn as U

from test_unlearn import args_for, tiny  # noqa: F401  (the tiny model and corpora fixture)


def items(plan, topic=0):
    return [i for micro in plan for t, f, _, _ in micro if t == topic for i in f]


def test_file_order_interleaves_topics_and_cycles():
    """The reference's order: micro-batch m takes topic m % n and that topic's batch m // n, in file order; the
    retain batch of the same k (both topics of one k share it); a short topic cycles."""
    plan = B.make_plan(7, 1, 1, [1, 3], [4], [0, 0], "file", 0)
    assert [m[0] for m in plan] == [(0, (0,), 0, (0,)), (1, (0,), 0, (0,)), (0, (0,), 0, (1,)), (1, (1,), 0, (1,)),
                                    (0, (0,), 0, (2,)), (1, (2,), 0, (2,)), (0, (0,), 0, (3,))]
    plan = B.make_plan(2, 3, 2, [3], [5, 5], [0], "file", 0)
    assert [len(m) for m in plan] == [3, 3]
    assert [x[1] for m in plan for x in m] == [(0, 1), (2,), (0, 1), (2,), (0, 1), (2,)]   # a short last batch


def test_shuffle_is_a_seeded_permutation_per_epoch():
    n, bs = 23, 4
    nb = B.n_batches(n, bs)
    plan = B.make_plan(3 * nb, 1, bs, [n], [50], [0], "shuffle", 7)
    drawn = items(plan)
    for e in range(3):   # every epoch is a permutation of all the items, and the epochs differ
        assert sorted(drawn[e * n:(e + 1) * n]) == list(range(n))
    assert drawn[:n] != drawn[n:2 * n] and drawn[:n] != list(range(n))
    assert plan == B.make_plan(3 * nb, 1, bs, [n], [50], [0], "shuffle", 7)          # reproducible
    assert items(B.make_plan(nb, 1, bs, [n], [50], [0], "shuffle", 8)) != drawn[:n]   # the seed matters
    # the retain stream is shuffled on its own
    assert [x[3] for m in plan for x in m][:2] != [(0, 1, 2, 3), (4, 5, 6, 7)]


def test_step_rules():
    cfg = SimpleNamespace(steps=None, epochs=None, batch_size=4, grad_accum=1, max_num_batches=150)
    # the reference: min(150, batches of the smallest FULL forget file, of the smallest retain file)
    assert B.resolve_steps(cfg, [24453, 1000], [1223, 50], [4358]) == (150, "reference")
    assert B.resolve_steps(cfg, [450], [22], [405]) == (102, "reference")
    cfg.epochs = 1
    # two topics alternate: the largest topic's batches, twice
    assert B.resolve_steps(cfg, [24453, 1000], [1223, 50], [4358]) == (2 * 306, "epochs")
    cfg.epochs, cfg.grad_accum = 2.5, 2
    assert B.resolve_steps(cfg, [450], [22], [405]) == (8, "epochs")   # ceil(2.5 * 6) = 15 micro -> 8 steps
    cfg.steps = 11
    assert B.resolve_steps(cfg, [450], [22], [405]) == (11, "steps")


@pytest.mark.parametrize("selected", [22, 700])
def test_one_epoch_sees_the_whole_coreset(selected):
    """Smaller and larger than the reference's 300-documents-per-topic window (150 steps, two topics, batch 4)."""
    cfg = SimpleNamespace(steps=None, epochs=1.0, batch_size=4, grad_accum=1, max_num_batches=150)
    sizes = [selected, selected]
    for order in ("file", "shuffle"):
        steps, rule = B.resolve_steps(cfg, [24453, 1987], sizes, [4358])
        plan = B.make_plan(steps, 1, 4, sizes, [4358], [0, 0], order, 42)
        rec = B.budget_record(plan, rule, order, ["bio", "cyber"], [24453, 1987],
                              [list(range(selected))] * 2, ["wiki"], [list(range(4358))])
        assert [f["docs_seen"] for f in rec["forget"]] == [selected, selected]
        assert rec["epochs"] == 1.0 and not B.coverage_warnings(rec)
    # the reference's own schedule sees 300 of them per topic: said in a warning
    cfg.epochs = None
    steps, rule = B.resolve_steps(cfg, [24453, 1987], sizes, [4358])
    plan = B.make_plan(steps, 1, 4, sizes, [4358], [0, 0], "file", 42)
    rec = B.budget_record(plan, rule, "file", ["bio", "cyber"], [24453, 1987], [list(range(selected))] * 2,
                          ["wiki"], [list(range(4358))])
    assert rec["steps"] == 150 and [f["docs_seen"] for f in rec["forget"]] == [min(selected, 300)] * 2
    assert len(B.coverage_warnings(rec)) == (2 if selected > 300 else 0)


def test_chunked_items_count_documents(tiny):
    """With --chunk-tokens an item is a piece of a document: docs_seen counts the documents behind the pieces."""
    doc_of = [0, 0, 0, 1, 2, 2]
    plan = B.make_plan(1, 1, 4, [6], [5], [0], "file", 0)
    rec = B.budget_record(plan, "steps", "file", ["f"], [10], [doc_of], ["r"], [[0, 0, 1, 1, 2]])
    assert rec["forget"][0] == {"file": "f", "docs_available": 10, "docs_selected": 3, "docs_seen": 2,
                                "items_selected": 6, "items_drawn": 4, "epochs": round(4 / 6, 4)}
    assert rec["retain"] == [{"file": "r", "docs_available": 3, "docs_seen": 2}]   # retain pieces too
    # "E epochs of the full set" counts pieces when documents are chunked
    from data import read_corpus
    from hf_tokenizer import load_tokenizer
    tok, docs = load_tokenizer(tiny["model"]), read_corpus(tiny["forget"])[:5]
    assert B.full_set_items(SimpleNamespace(chunk_tokens=0), [docs, docs[:2]]) == [5, 2]
    pieces = sum(-(-len(ids) // 8) for ids in tok.encode_batch(docs))
    assert B.full_set_items(SimpleNamespace(chunk_tokens=8), [docs], tok) == [pieces] and pieces > 5


def test_run_records_its_budget_and_warns(tiny, tmp_path, capsys):
    """run.json's budget on a real run: the reference rule, then a shuffled epoch of a coreset."""
    rec = U.run(args_for(tiny, tmp_path / "a", "--ratio", "0.5", "--max-num-batches", "3", "--no-save"))
    b = rec["budget"]
    assert (b["rule"], b["order"], b["steps"]) == ("reference", "file", 3)
    assert b["forget"][0]["docs_available"] == 30 and b["forget"][0]["docs_selected"] == 15
    assert b["forget"][0]["docs_seen"] == 12 and "sees 12 of its 15 selected documents" in capsys.readouterr().err
    assert json.loads((tmp_path / "a" / "run.json").read_text())["budget"] == b
    rec = U.run(args_for(tiny, tmp_path / "b", "--ratio", "0.5", "--epochs", "1", "--order", "shuffle", "--no-save"))
    b = rec["budget"]
    assert (b["rule"], b["steps"], b["epochs"], b["forget"][0]["docs_seen"]) == ("epochs", 4, 1.0, 15)
    assert "warning" not in capsys.readouterr().err
    seen = sorted(i for s in rec["coreset"]["indices"] for i in s)
    assert len(seen) == 15


def test_budget_flags_are_checked():
    with pytest.raises(methods.ConfigError, match="--steps and --epochs"):
        methods.resolve({"steps": 3, "epochs": 1})
    with pytest.raises(methods.ConfigError, match="--epochs 0"):
        methods.resolve({"epochs": 0})
    with pytest.raises(methods.ConfigError, match="--order"):
        methods.resolve({"order": "random"})
    # epochs replace the recipe's (or the toy's) step count
    assert methods.resolve({"method": "npo", "epochs": 2}).steps is None
    assert methods.resolve({"method": "npo"}).steps == methods.method_defaults("npo")["steps"]
    assert methods.resolve({}).order == "file" and methods.resolve({"method": "npo"}).order == "shuffle"


def test_sweep_policies_give_the_documented_steps(tmp_path):
    """equal-steps: every ratio gets E epochs of the full set (never the 150-batch cap); equal-epochs: E epochs of
    the cell's own set; --steps N: N."""
    base = ["--out", str(tmp_path / "s")]
    sizes = [["doc"] * 24453, ["doc"] * 1987]
    args = S.build_parser().parse_args(base)
    assert S.cell_budget(args, sizes) == {"steps": 2 * 6114}                     # 1 epoch of the full set
    args = S.build_parser().parse_args(base + ["--epochs", "0.5", "--unlearn-args", "--grad-accum 2"])
    assert S.cell_budget(args, sizes) == {"steps": 3057}                         # ceil(3057 * 2 / 2)
    args = S.build_parser().parse_args(base + ["--budget", "equal-epochs", "--epochs", "2"])
    assert S.cell_budget(args, sizes) == {"epochs": 2.0}
    args = S.build_parser().parse_args(base + ["--budget", "equal-epochs", "--steps", "9"])
    assert S.cell_budget(args, sizes) == {"steps": 9}


def test_sweep_refuses_cells_of_another_budget(tmp_path):
    cell = tmp_path / "c"
    cell.mkdir()
    (cell / "result.json").write_text(json.dumps({"policy": {"steps": 5}}))
    assert S.finished(cell, {"steps": 5}) and not S.finished(tmp_path / "none", {"steps": 5})
    with pytest.raises(S.CoresetError, match="finished under budget"):
        S.finished(cell, {"epochs": 1.0})


def test_finished_runs_are_reused_only_under_the_settings_resolved_now(tiny, tmp_path, monkeypatch):  # noqa: F811
    """A default that changes (the toy's NPO recipe did) changes the run: the sweep refuses a cell, and an analysis
    retrains an arm, whose run.json was resolved otherwise, though its explicit arguments are the same."""
    import arms
    monkeypatch.setenv("TRITON_INTERPRET", "0")   # kernels' PyTorch path on CPU, whatever ran before
    given = {"method": "npo", "model": tiny["model"], "forget": tiny["forget"], "retain": tiny["retain"],
             "eval_tasks": "none", "progress": False, "seed": 0, "steps": 2, "lr": 1e-3}
    rec = U.run(methods.resolve({**given, "out": str(tmp_path / "arms" / "a")}), given={**given,
                                                                                       "out": str(tmp_path / "arms" / "a")})
    cfg = methods.resolve({**given, "out": str(tmp_path / "arms" / "a")})
    assert U.config_changes(rec, cfg) == []
    assert U.config_changes(rec, methods.resolve({**given, "out": str(tmp_path / "arms" / "a"), "beta": 0.2})) == \
        ["beta"]
    assert U.config_changes(rec, methods.resolve({**given, "out": str(tmp_path / "arms" / "a"), "steps": None,
                                                  "epochs": 1})) == ["epochs"]   # resolved steps are not compared
    runs = []
    real = U.run
    monkeypatch.setattr(U, "run", lambda c, given=None: runs.append(c) or real(c, given=given))
    common = {k: v for k, v in given.items() if k not in ("eval_tasks", "progress")}
    arms.train_arms([("a", None, False)], common, tmp_path / "arms", False)
    assert runs == []                                      # the same run: reused
    defaults = methods.method_defaults   # the recipe's default moves under the same arguments
    monkeypatch.setattr(methods, "method_defaults", lambda m, model=None: {**defaults(m, model), "beta": 0.3})
    arms.train_arms([("a", None, False)], common, tmp_path / "arms", False)
    assert len(runs) == 1 and runs[0].beta == 0.3

    cell = tmp_path / "c"
    (cell / "run").mkdir(parents=True)
    (cell / "result.json").write_text(json.dumps({"policy": {"steps": 2}, "coreset": None}))
    (cell / "run" / "run.json").write_text(json.dumps(rec))
    assert S.finished(cell, {"steps": 2}, lambda result: cfg)
    with pytest.raises(S.CoresetError, match=r"finished with other settings \(beta\)"):
        S.finished(cell, {"steps": 2}, lambda result: methods.resolve({**given, "out": str(tmp_path / "arms" / "a"),
                                                                      "beta": 0.2}))


def test_budget_curve_evaluates_inside_both_runs(tiny, tmp_path, monkeypatch):
    """budget_curve.py: the full set and a coreset, the same steps, evaluated at steps 0, K, 2K, ... and the end;
    the step-0 point is the base model and the last equals the run's evaluation after training."""
    import budget_curve
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    data = tmp_path / "data"
    data.mkdir()
    row = {"question": "the quick brown", "choices": ["fox", "dog", "river", "stone"], "answer": 0}
    for name in ("toy_hazard", "toy_general"):
        (data / TASKS[name][0]).write_text(json.dumps(row) + "\n" + json.dumps({**row, "answer": 2}) + "\n")
    out = tmp_path / "curve"
    rec = budget_curve.main(["--model", tiny["model"], "--forget", tiny["forget"], "--retain", tiny["retain"],
                             "--data", str(data), "--ratio", "6", "--steps", "5", "--every", "2", "--out", str(out),
                             "--no-progress", "--unlearn-args", "--layer-id 2 --layer-ids 1,2 --lr 1e-2",
                             "--docs", str(tmp_path / "docs" / "bc")])
    full, core = rec["curves"]
    assert [p["step"] for p in full["points"]] == [0, 2, 4, 5] == [p["step"] for p in core["points"]]
    assert full["budget"]["steps"] == core["budget"]["steps"] == 5
    assert full["budget"]["forget"][0]["docs_selected"] == 30 and core["budget"]["forget"][0]["docs_selected"] == 6
    assert core["budget"]["forget"][0]["docs_seen"] == 6     # 5 steps of 4 = 3.3 epochs of the coreset
    assert full["points"][0]["metrics"] == core["points"][0]["metrics"]   # both start from the base model
    after = json.loads((out / "r6" / "run.json").read_text())["eval"]["after"]
    assert core["points"][-1]["metrics"]["toy_hazard"] == after["toy_hazard"]["acc"]
    assert rec["metrics"] == ["toy_hazard", "toy_hazard/acc_norm", "toy_general", "toy_general/acc_norm"]  # cloze form
    for ext in ("json", "md", "png"):
        assert (out / f"results.{ext}").is_file() and (tmp_path / "docs" / f"bc.{ext}").is_file()
    assert "| 4 |" in (out / "results.md").read_text()


def test_budget_flags_belong_to_the_sweep_and_the_curve(tmp_path):
    args = S.build_parser().parse_args(["--out", str(tmp_path / "s"), "--unlearn-args", "--epochs 2"])
    with pytest.raises(S.CoresetError, match="--unlearn-args: give the budget"):
        S.unlearn_overrides(args, 0, tmp_path)
    import budget_curve
    for extra, msg in ((["--unlearn-args=--steps 3"], "--unlearn-args"), (["--tasks", "none"], "--tasks")):
        with pytest.raises(SystemExit) as e:
            budget_curve.main(["--out", str(tmp_path / "c"), *extra])
        assert msg in str(e.value.code) and "\n" not in str(e.value.code)
    with pytest.raises(methods.ConfigError, match="--eval-every 5"):
        methods.resolve({"eval_every": 5, "eval_tasks": "none"})


def test_bad_raw_topics_and_curve_steps_are_one_line_errors(tmp_path):
    with pytest.raises(methods.ConfigError, match="--raw-json-topics 3: expected forget topic indices in 0..0"):
        methods.resolve({"raw_json_topics": "3"})
    import budget_curve
    with pytest.raises(SystemExit) as e:
        budget_curve.main(["--out", str(tmp_path / "c"), "--steps", "10", "--every", "-1"])
    assert "--every -1" in str(e.value.code) and "\n" not in str(e.value.code)
