"""More than one process (multigpu.py): torchrun with 2 gloo ranks on the CPU against one process on the same data.
FSDP2 for the NPO family (fp32 parameters here; bf16 compute is for GPUs), data parallelism for RMU; the losses and
the gathered checkpoints agree within 1e-5 relative (reduction order rules out bitwise equality), token-mean losses
normalised by the global count with ranks that hold unequal rows and tokens, and a rank with an empty share."""
import json
import os
import subprocess
import sys

import pytest
import torch

import multigpu
from infra import ROOT
from model import Transformer
from losses import count_targets

from test_unlearn import tiny  # noqa: F401  (the tiny model and corpora fixture)

pytestmark = pytest.mark.dist


def unlearn(tiny, out, nproc, *extra):  # noqa: F811
    args = ["unlearn.py", "--model", tiny["model"], "--forget", tiny["forget"], "--retain", tiny["retain"],
            "--seed", "0", "--steps", "3", "--eval-tasks", "none", "--no-progress", "--device", "cpu",
            "--out", str(out), *extra]
    cmd = [sys.executable, *(["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
                             if nproc > 1 else []), *args]
    env = dict(os.environ, TRITON_INTERPRET="0", OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads((out / "run.json").read_text())


# Adam's eps is raised in these runs. With the default 1e-8, Adam's first steps move every weight by about +-lr
# whatever the size of its gradient, so a gradient of 1e-9 that rounds differently in another summation order
# moves its weight by an lr-sized different amount (measured: 2e-4 of the weights' scale on the toy). With eps 1e-3
# the update is proportional to the gradient, and the checkpoints compare what sharding computes.
CASES = {
    "npo": ["--method", "npo", "--batch-size", "5", "--lr", "1e-2"],
    "graddiff": ["--method", "graddiff", "--batch-size", "5", "--lr", "1e-2"],
    "simnpo-kl": ["--method", "simnpo", "--retain-loss", "kl", "--batch-size", "4", "--grad-accum", "2", "--lr", "1e-2"],
    "npo-empty-rank": ["--method", "npo", "--batch-size", "1", "--lr", "1e-2"],
    "npo-checkpointing": ["--method", "npo", "--batch-size", "5", "--lr", "1e-2", "--activation-checkpointing"],
    "npo-params": ["--method", "npo", "--batch-size", "5", "--lr", "1e-2", "--train-scope", "params", "--layer-ids",
                   "0,1"],   # frozen and trained tensors in one sharded block
    "rmu": ["--method", "rmu", "--layer-id", "2", "--layer-ids", "1,2", "--batch-size", "5", "--lr", "1e-2"],
    "rmu-empty-rank": ["--method", "rmu", "--layer-id", "2", "--layer-ids", "1,2", "--batch-size", "1", "--lr", "1e-2",
                       "--no-masked-loss"],
}


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_compute_what_one_process_computes(tiny, tmp_path, case):  # noqa: F811
    extra = CASES[case] + ["--adam-eps", "1e-3"]
    one = unlearn(tiny, tmp_path / "one", 1, *extra)
    two = unlearn(tiny, tmp_path / "two", 2, *extra)
    assert two["world"]["size"] == 2 and len(two["world"]["peak_memory_bytes_per_rank"]) == 2
    assert two["world"]["parallel"] == ("data" if case.startswith("rmu") else "fsdp2") and one["world"]["size"] == 1
    assert len(one["loss"]) == len(two["loss"]) == 3
    for a, b, p in zip(one["loss"], two["loss"], one["loss_parts"]):
        # GradDiff's total is a difference of two terms: relative to their size, not to what is left of it
        assert b == pytest.approx(a, rel=1e-5, abs=1e-5 * (abs(p["forget"]) + abs(p["retain"]))), (one["loss"], two["loss"])
    for a, b in zip(one["loss_parts"], two["loss_parts"]):
        assert b["forget"] == pytest.approx(a["forget"], rel=1e-5, abs=1e-7)
        assert b["retain"] == pytest.approx(a["retain"], rel=1e-5, abs=1e-7)
    base = Transformer.from_pretrained(tiny["model"]).state_dict()
    A = Transformer.from_pretrained(tmp_path / "one" / "model").state_dict()
    B = Transformer.from_pretrained(tmp_path / "two" / "model").state_dict()
    moved = 0
    for k in A:
        moved += not torch.equal(A[k], base[k])
        assert torch.allclose(B[k], A[k], rtol=1e-5, atol=1e-5 * A[k].abs().max().item()), k
    assert moved == len(one["trained_params"]) or (not case.startswith("rmu") and moved > 10)
    assert two["checkpoint"] and (tmp_path / "two" / "model" / "tokenizer.json").is_file()


class Rank(multigpu.World):
    """A world of 2 seen from one rank, without processes (for the arithmetic of shares)."""


def test_shares_weigh_each_ranks_mean_into_the_global_mean():
    torch.manual_seed(0)
    ids = torch.randint(5, 50, (5, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    mask[4, 8:] = 0                                                                     # unequal lengths
    per_token = torch.rand(5, 9)
    keep = torch.zeros(5, 9, dtype=torch.bool)
    keep[:, :-1] = mask[:, 1:].bool()                                                   # next-token targets
    global_mean = per_token[keep].mean()
    parts = []
    for r in range(2):
        rows, i, m, share = Rank(rank=r, size=2).take(ids, mask, count_targets)
        k = keep[rows]
        parts.append(share * per_token[rows][k].mean())
        assert rows == list(range(r, 5, 2)) and torch.equal(i, ids[rows])
    assert sum(parts) / 2 == pytest.approx(global_mean.item(), rel=1e-6)   # FSDP2 averages: sum / W
    assert count_targets(ids, mask) == int(keep.sum())
    # a rank with no rows runs row 0 with weight 0; one process takes everything with weight 1
    rows, i, _, share = Rank(rank=1, size=2).take(ids[:1], mask[:1], count_targets)
    assert rows == [0] and share == 0.0
    assert multigpu.World().take(ids, mask, count_targets)[3] == 1.0


# ----------------------------------------------------------------------------------------------- sweep workers

@pytest.mark.skipif(not (ROOT / "data/toy/model/model.safetensors").is_file(), reason="the embedded toy is not built")
def test_sweep_workers_run_every_cell_once_even_when_one_is_killed(tmp_path):
    """2 worker processes, 4 toy cells: one worker is killed (SIGKILL) in its first cell; the other takes the cell
    over, and every cell finishes exactly once."""
    import signal
    import time
    out = tmp_path / "sweep"
    cmd = [sys.executable, "coreset_sweep.py", "--method", "rmu", "--ratios", "0.05 1.0", "--seeds", "0 1", "--steps",
           "40", "--eval-limit", "8", "--workers", "2", "--claim-stale-s", "3", "--no-progress", "--device", "cpu",
           "--out", str(out)]
    env = dict(os.environ, TRITON_INTERPRET="0", OMP_NUM_THREADS="1")
    main = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed, deadline = None, time.time() + 120
    while killed is None and time.time() < deadline and main.poll() is None:
        for claim in out.glob("cells/*/claim"):
            try:
                pid = json.loads(claim.read_text())["pid"]
            except (OSError, ValueError, KeyError):
                continue
            if pid != main.pid:
                os.kill(pid, signal.SIGKILL)
                killed = claim.parent.name
                break
        time.sleep(0.02)
    stdout, stderr = main.communicate(timeout=600)
    assert killed is not None, "no worker claim seen"
    assert main.returncode == 0, stderr[-3000:]
    cells = sorted(p.name for p in (out / "cells").iterdir() if p.is_dir() and not p.name.startswith("."))
    assert len(cells) == 4
    for c in cells:
        events = [json.loads(x)["event"] for x in (out / "cells" / c / "attempts.jsonl").read_text().splitlines()]
        assert events.count("done") == 1 and (out / "cells" / c / "result.json").is_file(), (c, events)
        assert not (out / "cells" / c / "claim").exists()
    events = [json.loads(x) for x in (out / "cells" / killed / "attempts.jsonl").read_text().splitlines()]
    # (the kill may land before the killed worker logged its start: then the log shows only the taker)
    assert "taken-over" in [e["event"] for e in events] and [e["event"] for e in events][-1] == "done"
    rec = json.loads((out / "results.json").read_text())
    assert rec["cells_done"] == 4 and rec["failed_cells"] == {} and sorted(w["returncode"] for w in rec["workers"]) == [-9, 0]


def test_a_cell_that_fails_is_retried_once_then_reported(tmp_path):
    from sweep_queue import CellQueue
    q = CellQueue(tmp_path, stale_s=60, poll_s=0.01)
    runs = []
    for cell, claim in q.claims(["a", "b"], str, lambda c: c == "b" and runs.count("b") > 0):
        with claim:
            runs.append(cell)
            if cell == "a":
                raise RuntimeError("out of memory")
    assert runs == ["a", "b", "a"]   # a: tried, retried once; b: done
    assert q.failed_cells(["a", "b"], str) == {"a": "RuntimeError: out of memory"}
    # --retry-failed: two more tries (the history stays); a torn line in the log is skipped
    q.retry_failed(["a", "b"], str, lambda c: c == "b")
    assert q.failed_cells(["a", "b"], str) == {}
    with open(tmp_path / "a" / "attempts.jsonl", "a") as f:
        f.write('{"event": "fai\n')
    from sweep_queue import tries
    assert tries(tmp_path / "a") == 0 and q.try_claim(tmp_path / "a")
    (tmp_path / "a" / "claim").unlink()
    # a claim held by a live worker elsewhere is waited for, not taken; a stale one is taken over
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "claim").write_text(json.dumps({"host": "elsewhere", "pid": 1}))
    assert not q.try_claim(tmp_path / "c")
    os.utime(tmp_path / "c" / "claim", (0, 0))
    assert q.try_claim(tmp_path / "c")


def test_activation_checkpointing_changes_no_number(tiny, tmp_path):  # noqa: F811
    plain = unlearn(tiny, tmp_path / "plain", 1, "--method", "npo", "--batch-size", "5", "--lr", "1e-2")
    ckpt = unlearn(tiny, tmp_path / "ckpt", 1, "--method", "npo", "--batch-size", "5", "--lr", "1e-2",
                   "--activation-checkpointing")
    assert ckpt["config"]["activation_checkpointing"] and not plain["config"]["activation_checkpointing"]
    assert ckpt["loss"] == pytest.approx(plain["loss"], rel=1e-6)


def test_the_fsdp2_npo_bench_runs_on_two_cpu_ranks():
    """make bench-unlearn's FSDP2 NPO step, its code path on a tiny shape with 2 gloo ranks: one JSON line with a
    time, the peak memory of both ranks and finite losses."""
    env = dict(os.environ, TRITON_INTERPRET="0", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
                        "benches.npo_step", "--shape", "tiny", "--device", "cpu", "--seq", "32", "--steps", "2",
                        "--warmup", "1"], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rec = json.loads(r.stdout.strip().splitlines()[-1])
    assert rec["world_size"] == 2 and len(rec["peak_gib_per_rank"]) == 2 and rec["ms_per_step"] > 0
    assert len(rec["losses"]) == 3 and all(torch.isfinite(torch.tensor(rec["losses"])))


@pytest.mark.skipif(not (ROOT / "data/toy/model/model.safetensors").is_file(), reason="the embedded toy is not built")
def test_a_sweep_cell_can_run_on_its_own_torchrun_group(tmp_path):
    """--procs-per-cell 2: each cell's unlearning runs under torchrun on 2 ranks (here gloo), from the settings the
    sweep wrote; its accuracies are those of the in-process cell."""
    common = ["--method", "rmu", "--ratios", "0.05", "--seeds", "0", "--steps", "20", "--eval-limit", "12",
              "--no-progress", "--device", "cpu"]
    env = dict(os.environ, TRITON_INTERPRET="0", OMP_NUM_THREADS="1")
    for name, extra in (("one", []), ("group", ["--procs-per-cell", "2"])):
        r = subprocess.run([sys.executable, "coreset_sweep.py", *common, *extra, "--out", str(tmp_path / name)],
                           cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
    cell = "cells/random_r0.05_s0"
    one, group = (json.loads((tmp_path / n / cell / "result.json").read_text()) for n in ("one", "group"))
    run = json.loads((tmp_path / "group" / cell / "run" / "run.json").read_text())
    assert run["world"] == {**run["world"], "size": 2, "parallel": "data"}
    assert json.loads((tmp_path / "group" / cell / "unlearn_settings.json").read_text())["seed"] == 0
    assert group["after"] == pytest.approx(one["after"], abs=0.5 / 12) and group["steps"] == one["steps"] == 20


def test_bad_settings_files_and_gpu_groups_are_refused_in_one_line(tmp_path):
    import coreset_sweep
    import unlearn
    with pytest.raises(SystemExit) as e:
        unlearn.main(["--settings-file", str(tmp_path / "missing.json")])
    assert "--settings-file" in str(e.value.code) and "\n" not in str(e.value.code)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(SystemExit) as e:
        unlearn.main(["--settings-file", str(tmp_path / "bad.json")])
    assert "--settings-file" in str(e.value.code)
    with pytest.raises(SystemExit) as e:
        coreset_sweep.main(["--gpus", "0,1,2", "--procs-per-cell", "2", "--steps", "3", "--out", str(tmp_path / "s")])
    assert "expected a multiple of --procs-per-cell 2" in str(e.value.code)


def test_a_takeover_race_puts_the_winners_fresh_claim_back(tmp_path, monkeypatch):
    """Workers A and B both see a dead worker's stale claim; A's whole takeover lands between B's look and B's
    rename: B moves A's fresh claim away, sees it is not the one it judged stale, and puts it back."""
    import sweep_queue as Q
    cdir = tmp_path / "c"
    cdir.mkdir()
    (cdir / "claim").write_text(json.dumps({"token": "dead", "host": "elsewhere", "pid": 1}))
    os.utime(cdir / "claim", (0, 0))
    a, b = Q.CellQueue(tmp_path, stale_s=60, worker="A"), Q.CellQueue(tmp_path, stale_s=60, worker="B")
    real = os.rename

    def racing(src, dst):
        monkeypatch.setattr(Q.os, "rename", real)
        assert a.try_claim(cdir)
        real(src, dst)
    monkeypatch.setattr(Q.os, "rename", racing)
    assert not b.try_claim(cdir)
    assert Q.claim_token(cdir / "claim") == a.token and Q.tries(cdir) == 1
    assert not list(cdir.glob("claim.stale.*B*"))
