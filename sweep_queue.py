"""The sweep's work queue, kept in the sweep directory itself: atomic claims, so that several workers (one per GPU,
on one node or on many nodes sharing a file system) run every cell exactly once.

    queue = CellQueue(out / "cells", stale_s=900)
    for cell, claim in queue.claims(grid, name, is_done):   # cells this worker now owns
        with claim:                                          # heartbeat while it runs; failure recorded
            run_cell(...)
    queue.failed_cells(grid, name)                           # cells that failed twice: reported, not retried

A cell's directory holds, besides the cell's own outputs:
  claim            created with O_CREAT | O_EXCL (atomic, NFS included): who runs the cell (host, pid, worker,
                   attempt); its modification time is the heartbeat, renewed every stale_s / 4 while the cell runs.
  attempts.jsonl   one line per start, finish, failure or takeover.
A claim older than stale_s belongs to a worker that died (killed, node lost), and so does a claim by a process of
this host that no longer runs: another worker takes it over by renaming it away (atomic: one taker wins) and
claiming anew; Ctrl-C frees the cell at once. A cell is tried at most twice (a failure or a dead
worker's claim counts as a try), then reported as failed, until a "reset" line (retry_failed) gives it two more.
Cells already done (is_done) are skipped. Each claim carries its worker's token: a worker renews and removes only
its own claim, and a taker that finds it moved a claim fresher than the stale one it saw puts it back.
"""
import json
import os
import socket
import threading
import time
from pathlib import Path

MAX_TRIES = 2


def log(cdir: Path, event: str, **extra):
    with open(cdir / "attempts.jsonl", "a") as f:
        f.write(json.dumps({"event": event, "time": time.time(), "host": socket.gethostname(), "pid": os.getpid(),
                            **extra}) + "\n")


def events(cdir: Path) -> list:
    """The cell's attempts.jsonl since its last "reset" (a line that does not parse, as a torn append on a network
    file system can leave, is skipped)."""
    try:
        text = (cdir / "attempts.jsonl").read_text()
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        try:
            e = json.loads(line)
        except ValueError:
            continue
        out = [] if e.get("event") == "reset" else out + [e]
    return out


def tries(cdir: Path) -> int:
    """Finished-or-abandoned tries of a cell: failures plus claims taken over from dead workers."""
    return sum(e.get("event") in ("failed", "taken-over") for e in events(cdir))


def claim_token(path: Path):
    try:
        return json.loads(path.read_text()).get("token")
    except (OSError, ValueError, AttributeError):
        return None


class Claim:
    """Owning one cell: a heartbeat thread while the block runs; on leaving, "done", or "failed" with the error
    (the exception is swallowed, so the worker goes on with other cells; the cell may be retried once)."""

    def __init__(self, queue, cdir: Path, worker: str):
        self.queue, self.cdir, self.worker = queue, cdir, worker
        self.stop = threading.Event()
        self.error = None

    def _beat(self):
        while not self.stop.wait(self.queue.stale_s / 4):
            if claim_token(self.cdir / "claim") != self.queue.token:
                continue   # not ours (or unreadable for a moment): never renew someone else's claim
            try:
                os.utime(self.cdir / "claim")
            except OSError:
                pass       # a transient error: try again at the next beat

    def __enter__(self):
        log(self.cdir, "start", worker=self.worker)
        self.thread = threading.Thread(target=self._beat, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, kind, err, tb):
        self.stop.set()
        self.thread.join()
        if kind is KeyboardInterrupt:   # Ctrl-C: this worker stops; the cell is free for the next one at once
            log(self.cdir, "interrupted", worker=self.worker)
            self.release()
            return False
        if err is None:
            log(self.cdir, "done", worker=self.worker)
        else:
            self.error = f"{kind.__name__}: {err}"
            log(self.cdir, "failed", worker=self.worker, error=self.error)
            print(f"sweep worker {self.worker}: cell {self.cdir.name} failed ({self.error}); "
                  f"{'it will be retried' if tries(self.cdir) < MAX_TRIES else 'reported, not retried'}", flush=True)
        self.release()
        return True

    def release(self):
        """Remove the claim if it is still this worker's."""
        if claim_token(self.cdir / "claim") == self.queue.token:
            (self.cdir / "claim").unlink(missing_ok=True)


class CellQueue:
    def __init__(self, cells_dir, stale_s=900.0, worker=None, poll_s=None):
        self.dir, self.stale_s = Path(cells_dir), float(stale_s)
        self.worker = worker or f"{socket.gethostname()}:{os.getpid()}"
        self.token = f"{self.worker}:{time.time_ns()}"   # written into every claim of this worker
        self.poll_s = poll_s if poll_s is not None else min(30.0, self.stale_s / 4)

    def try_claim(self, cdir: Path) -> bool:
        """Claim a cell atomically; a stale claim (its worker dead) is taken over first."""
        cdir.mkdir(parents=True, exist_ok=True)
        claim = cdir / "claim"
        try:
            age = time.time() - claim.stat().st_mtime
        except FileNotFoundError:
            age = None
        if age is not None:
            if age < self.stale_s and not self.dead_here(claim):
                return False
            seen = claim_token(claim)
            moved = cdir / f"claim.stale.{self.token.replace(':', '_')}"
            try:   # only one taker can rename the stale claim away
                os.rename(claim, moved)
            except OSError:
                return False
            if claim_token(moved) != seen:   # another worker took it over first: that fresh claim goes back
                try:
                    os.link(moved, claim)
                except OSError:
                    pass
                moved.unlink(missing_ok=True)
                return False
            log(cdir, "taken-over", worker=self.worker, age_s=round(age, 1))
        if tries(cdir) >= MAX_TRIES:
            return False
        try:
            fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps({"worker": self.worker, "host": socket.gethostname(), "pid": os.getpid(),
                                "time": time.time(), "try": tries(cdir) + 1, "token": self.token}))
        return True

    @staticmethod
    def dead_here(claim: Path) -> bool:
        """A claim by a process of this host that no longer runs (a crashed or killed run here): no need to
        wait for it to go stale."""
        try:
            info = json.loads(claim.read_text())
            if info.get("host") != socket.gethostname():
                return False
            os.kill(int(info["pid"]), 0)
        except ProcessLookupError:
            return True
        except (OSError, ValueError, KeyError, TypeError):
            return False
        return False

    def claims(self, grid, name, is_done):
        """Yield (cell, Claim) for each cell of `grid` this worker claims, until every cell is done, failed twice,
        or (while others still run theirs) wait and look again: a dead worker's cells are taken over when its
        claims go stale."""
        while True:
            waiting = ran = False
            for cell in grid:
                cdir = self.dir / name(cell)
                if is_done(cell) or tries(cdir) >= MAX_TRIES:
                    continue
                if self.try_claim(cdir):
                    if is_done(cell):   # finished between the check and the claim
                        (cdir / "claim").unlink(missing_ok=True)
                        continue
                    ran = True
                    yield cell, Claim(self, cdir, self.worker)
                else:
                    waiting = True
            if not waiting and not ran:   # every cell done or given up
                return
            if not ran:
                time.sleep(self.poll_s)

    def failed_cells(self, grid, name, is_done=lambda cell: False) -> dict:
        """name -> the last error of every cell tried MAX_TRIES times without a result."""
        out = {}
        for cell in grid:
            cdir = self.dir / name(cell)
            if not is_done(cell) and tries(cdir) >= MAX_TRIES:
                errs = [e.get("error") or f"worker {e.get('worker')} died" for e in events(cdir)
                        if e.get("event") in ("failed", "taken-over")]
                out[name(cell)] = errs[-1]
        return out

    def retry_failed(self, grid, name, is_done):
        """Give every cell that failed MAX_TRIES times two new tries (a "reset" line; the history stays)."""
        for cell in grid:
            cdir = self.dir / name(cell)
            if not is_done(cell) and tries(cdir) >= MAX_TRIES:
                log(cdir, "reset", worker=self.worker)
