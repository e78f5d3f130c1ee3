"""Nothing lost, nothing wrong with exit 0: every bad input or fault below ends in one line (or a refusal) and leaves
the inputs and any earlier outputs byte-identical. Runs on the embedded toy model with a step or two."""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import coreset
import evaluate
import model as model_io
import unlearn
from infra import ROOT, TOY_DIR, TOY_MODEL

FORGET, RETAIN = TOY_DIR / "forget_corpus.jsonl", TOY_DIR / "retain_corpus.jsonl"
QUICK = ["--steps", "1", "--ratio", "4", "--eval-tasks", "none", "--no-progress", "--seed", "0"]


@pytest.fixture(autouse=True)
def reference_kernels(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # kernels' fast chunked PyTorch path on CPU


def snapshot(*paths):
    """Every file under the paths -> its bytes (the check that nothing was touched)."""
    out = {}
    for p in map(Path, paths):
        for f in ([p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file())):
            out[str(f)] = f.read_bytes()
    return out


def one_line_error(fn, *args):
    with pytest.raises(SystemExit) as e:
        fn(*args)
    text = str(e.value.code)
    assert text.startswith("error: ") and "\n" not in text, text
    return text


@pytest.fixture(scope="module")
def toy_inputs():
    return snapshot(TOY_DIR)


@pytest.fixture(scope="module")
def previous_run(tmp_path_factory):
    """A finished unlearn.py run directory (checkpoint included), as a rerun would find it."""
    out = tmp_path_factory.mktemp("prev") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "0")
        unlearn.main(QUICK + ["--out", str(out)])
    return out


# ----------------------------------------------------------------------------------------------- outputs vs inputs

@pytest.mark.parametrize("case", ["coreset_out_is_forget", "eval_out_in_model", "eval_out_is_tasks",
                                  "unlearn_out_is_model"])
def test_an_output_may_not_be_an_input(case, tmp_path, toy_inputs):
    questions = tmp_path / "q.jsonl"
    shutil.copy(TOY_DIR / "toy_hazard.cloze.jsonl", questions)
    before = snapshot(questions)
    if case == "coreset_out_is_forget":
        msg = one_line_error(coreset.main, ["--ratio", "0.05", "--out", str(FORGET)])
    elif case == "eval_out_in_model":
        msg = one_line_error(evaluate.main, ["--model", str(TOY_MODEL), "--out", str(TOY_MODEL / "config.json")])
    elif case == "eval_out_is_tasks":
        msg = one_line_error(evaluate.main, ["--tasks", str(questions), "--out", str(questions)])
    else:
        msg = one_line_error(unlearn.main, QUICK + ["--out", str(TOY_MODEL), "--no-save"])
    assert "--out" in msg and "input" in msg
    assert snapshot(TOY_DIR) == toy_inputs and snapshot(questions) == before


def test_a_question_file_outside_data_is_an_input_and_a_task(tmp_path):
    """An evaluation task given as a path outside --data: evaluated (reported under its stem) and protected."""
    questions = tmp_path / "myq.jsonl"
    shutil.copy(TOY_DIR / "toy_hazard.cloze.jsonl", questions)
    rec = unlearn.main(QUICK[:4] + ["--eval-tasks", str(questions), "--eval-limit", "2", "--no-progress",
                                    "--out", str(tmp_path / "run")])
    assert rec["eval"]["after"]["myq"]["n"] == 2
    msg = one_line_error(unlearn.main, QUICK + ["--eval-tasks", str(questions), "--out", str(questions)])
    assert "is the input" in msg


def test_an_output_containing_an_input_is_refused(tmp_path):
    cs = tmp_path / "run" / "coreset.jsonl"  # the old Makefile layout: the coreset inside the run directory
    coreset.main(["--ratio", "0.05", "--out", str(cs), "--no-progress"])
    before = snapshot(tmp_path)
    msg = one_line_error(unlearn.main, QUICK[:2] + ["--coreset", str(cs), "--eval-tasks", "none",
                                                    "--out", str(tmp_path / "run")])
    assert "contains the input" in msg and snapshot(tmp_path) == before


def test_someone_elses_directory_is_refused_unless_overwrite(previous_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(previous_run, out)
    (out / "model" / "keep.txt").write_text("mine")
    before = snapshot(out)
    msg = one_line_error(unlearn.main, QUICK + ["--out", str(out)])
    assert "--overwrite" in msg and snapshot(out) == before
    unlearn.main(QUICK + ["--out", str(out), "--overwrite"])
    assert not (out / "model" / "keep.txt").exists() and (out / "run.json").is_file()


def test_a_previous_run_is_replaced_whole_with_a_line(previous_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(previous_run, out)
    old = json.loads((out / "run.json").read_text())
    unlearn.main(QUICK + ["--out", str(out), "--seed", "1"])
    assert "replacing the previous output" in capsys.readouterr().err
    new = json.loads((out / "run.json").read_text())
    assert new["seed"] == 1 and old["seed"] == 0 and sorted(p.name for p in out.iterdir()) == ["model", "run.json"]
    assert not list(tmp_path.glob(".run.*"))  # no staging or swap directory left behind


def test_an_existing_file_that_is_not_ours_is_refused(tmp_path):
    out = tmp_path / "notes.json"
    out.write_text('{"mine": true}')
    one_line_error(evaluate.main, ["--limit", "2", "--no-progress", "--out", str(out)])
    assert out.read_text() == '{"mine": true}'
    assert evaluate.main(["--limit", "2", "--no-progress", "--out", str(out), "--overwrite"])["results"]
    assert evaluate.main(["--limit", "2", "--no-progress", "--out", str(out)])  # now ours: replaced silently


@pytest.mark.parametrize("where", ["under_a_file", "dir_for_a_file"])
def test_bad_output_locations_fail_before_any_work(tmp_path, where, monkeypatch):
    calls = []
    monkeypatch.setattr(unlearn, "train_rmu", lambda *a, **k: calls.append(1))
    (tmp_path / "f").write_text("x")
    if where == "under_a_file":
        msg = one_line_error(unlearn.main, QUICK + ["--out", str(tmp_path / "f" / "run")])
        assert "cannot write" in msg
    else:
        msg = one_line_error(evaluate.main, ["--limit", "2", "--out", str(tmp_path)])
        assert "is a directory" in msg
    assert not calls


# ----------------------------------------------------------------------------------------------- faults mid-run

def test_interrupt_during_the_evaluation_after_training_keeps_the_previous_run(previous_run, tmp_path, monkeypatch):
    out = tmp_path / "run"
    shutil.copytree(previous_run, out)
    before = snapshot(out)
    real = unlearn.evaluate_model

    def interrupted(cfg, model, tok, dtype, settings, base):
        if not base:  # the evaluation after training: Ctrl-C arrives here
            signal.raise_signal(signal.SIGINT)
        return real(cfg, model, tok, dtype, settings, base)
    monkeypatch.setattr(unlearn, "evaluate_model", interrupted)
    with pytest.raises(SystemExit) as e:
        unlearn.main(["--steps", "1", "--ratio", "4", "--eval-limit", "2", "--no-progress", "--out", str(out)])
    assert e.value.code == 130
    assert snapshot(out) == before and not list(tmp_path.glob(".run.*"))


def test_disk_full_while_saving_keeps_the_previous_run(previous_run, tmp_path, monkeypatch):
    out = tmp_path / "run"
    shutil.copytree(previous_run, out)
    before = snapshot(out)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", "model.safetensors")
    monkeypatch.setattr(model_io, "save_file", full)
    msg = one_line_error(unlearn.main, QUICK + ["--out", str(out)])
    assert "No space left" in msg and snapshot(out) == before and not list(tmp_path.glob(".run.*"))


@pytest.mark.parametrize("script", ["coreset", "evaluate"])
def test_ctrl_c_is_one_line_and_exit_130(script, tmp_path, monkeypatch, capsys):
    def interrupted(*a, **k):
        raise KeyboardInterrupt
    if script == "coreset":
        monkeypatch.setattr(coreset, "token_scores", interrupted)
        argv = ["--method", "loss", "--ratio", "0.05", "--out", str(tmp_path / "cs.jsonl")]
    else:
        monkeypatch.setattr(evaluate, "evaluate_tasks", interrupted)
        argv = ["--out", str(tmp_path / "r.json")]
    with pytest.raises(SystemExit) as e:
        getattr(sys.modules[script], "main")(argv)
    assert e.value.code == 130
    err = capsys.readouterr().err.strip()
    assert "interrupted" in err and len(err.splitlines()) == 1 and not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------------------------- bad inputs

@pytest.mark.parametrize("argv,msg", [
    (["--min-chars", "100000"], "--min-chars 100000"),
    (["--max-grad-norm", "-1"], "--max-grad-norm -1"),
    (["--eval-limit", "-3"], "--eval-limit -3"),
    (["--layer-id", "99"], "--layer-id 99"),
    (["--device", "tpu9"], "--device 'tpu9'"),
])
def test_bad_flags_are_one_line_errors(argv, msg, tmp_path):
    text = one_line_error(unlearn.main, QUICK + ["--out", str(tmp_path / "o")] + argv)
    assert msg in text and not (tmp_path / "o").exists()


@pytest.mark.parametrize("which", ["corpus_jsonl", "corpus_txt", "coreset"])
def test_binary_files_are_one_line_errors(which, tmp_path):
    blob = tmp_path / ("b.txt" if which == "corpus_txt" else "b.jsonl")
    blob.write_bytes(b"\xff\xfe\x00\x9c binary\n" * 64)
    if which == "coreset":
        argv = QUICK[:2] + ["--coreset", str(blob), "--eval-tasks", "none"]
    else:
        argv = QUICK + ["--forget", str(blob)]
    text = one_line_error(unlearn.main, argv + ["--out", str(tmp_path / "o")])
    assert str(blob) in text and "UTF-8" in text


def test_model_smoke_test_refuses_negative_tokens():
    assert "--max-new-tokens -3" in one_line_error(model_io.main, ["--max-new-tokens", "-3"])


def test_real_task_without_data_says_so():
    text = one_line_error(evaluate.main, ["--tasks", "wmdp_bio", "--out", "/tmp/unused.json"])
    assert "--data" in text and "make toy" not in text


def test_toy_paths_resolve_against_the_project_not_the_cwd(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--limit", "2", "--no-progress", "--out",
                        str(tmp_path / "r.json")], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-1500:]
    r = subprocess.run([sys.executable, str(ROOT / "coreset.py"), "--ratio", "0.05", "--out", str(tmp_path / "c.jsonl")],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-1500:]


def test_fetch_offline_is_one_line(tmp_path, monkeypatch):
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from data import fetch
    with pytest.raises(SystemExit) as e:
        fetch.main(["--data", str(tmp_path / "D"), "--parts", "wmdp", "--model", ""])
    text = str(e.value.code)
    assert "download failed" in text and "\n" not in text


# ----------------------------------------------------------------------------------------------- weights

@pytest.fixture
def nan_checkpoint(tmp_path):
    m = model_io.Transformer.from_pretrained(TOY_MODEL)
    with torch.no_grad():
        m.model.layers[3].mlp.down_proj.weight[0, 0] = float("nan")
    return m.save_pretrained(tmp_path / "nan", tokenizer_dir=TOY_MODEL)


def test_non_finite_checkpoints_are_refused_with_an_escape(nan_checkpoint, tmp_path):
    for fn, argv in ((evaluate.main, ["--limit", "2", "--out", str(tmp_path / "r.json")]),
                     (model_io.main, ["--max-new-tokens", "2"])):
        text = one_line_error(fn, ["--model", str(nan_checkpoint)] + argv)
        assert "model.layers.3.mlp.down_proj.weight" in text and "--allow-nonfinite" in text
    model_io.main(["--model", str(nan_checkpoint), "--max-new-tokens", "2", "--allow-nonfinite"])


def test_saved_files_share_one_mode(previous_run):
    modes = {f.name: f.stat().st_mode & 0o777 for f in (previous_run / "model").iterdir()}
    assert len(set(modes.values())) == 1, modes
    assert modes["model.safetensors"] == (0o666 & ~_umask())


def _umask():
    u = os.umask(0)
    os.umask(u)
    return u


def test_ctrl_c_in_make_toy_and_fetch_is_exit_130(tmp_path, monkeypatch, capsys):
    import make_toy
    from data import fetch

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(make_toy, "write_data", interrupted)
    with pytest.raises(SystemExit) as e:
        make_toy.main(["--data-only", "--out", str(tmp_path / "toy")])
    assert e.value.code == 130
    with pytest.raises(SystemExit) as e:
        fetch.main(["--data", str(tmp_path / "D"), "--parts", "wmdp", "--model", ""], download=interrupted)
    assert e.value.code == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all("interrupted" in line for line in err)
