"""The bottom of the project: what every other module may import, and which imports none of them.

    ProjectError            the one error base class: every module's own error derives from it, so each main()
                            catches one class and prints one line (`cli_main`)
    CheckpointError         a model or tokenizer directory that cannot be read (model.py, hf_tokenizer.py)
    atomic_write_lines/json a temporary file beside the target, then a rename: never a half-written file
    replace_dir             move a finished directory into place as a whole
    check_output            the one output-path policy: never an input, never someone else's files, writable
    staged_dir              a run directory written as one unit (lands complete, or the old one stays)
    run_info                what every run records next to its outputs (arguments, versions, machine, time)
    default_dtype, resolve_device   bf16 on a GPU, fp32 on a CPU; a device name checked before any work
    split_list, per_topic   comma/space lists from flags; one value per topic (the last repeats)
    parse_ratio             a coreset ratio flag: a fraction, or a document count
    progress_bar            tqdm with a rate
    ROOT, TOY_DIR           the project's own paths (the embedded default resolves here, not against the cwd)

No torch at import time: data/ imports this module and promises not to need torch.
"""
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
TOY_DIR = ROOT / "data" / "toy"
TOY_MODEL = TOY_DIR / "model"
TOY_MUSE_MODEL = TOY_DIR / "muse" / "model"      # the toy's MUSE target model (toy_muse.py), as MUSE-News has its own
# general prose about the toy's towns that no toy model trained on: the NPO family's retain corpus there (make_toy.py)
UNSEEN_RETAIN_FILE = "retain_unseen.jsonl"


class ProjectError(ValueError):
    """Bad input or a failed run; the message names the flag or file and what was expected (one line)."""


class CheckpointError(ProjectError):
    """A model or tokenizer directory that cannot be read; the message names the file."""


# ----------------------------------------------------------------------------------------------- atomic outputs

def atomic_write_lines(path, lines) -> int:
    """Write `lines` (each without its newline) to a temporary file beside `path`, then rename: a crash or
    Ctrl-C never leaves a half-written file. Streams, so a multi-GB corpus is never held in memory.
    Returns the number of lines."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    n = 0
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            for line in lines:
                f.write(line + "\n")
                n += 1
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return n


def atomic_write_json(path, obj):
    atomic_write_lines(path, [json.dumps(obj, indent=2, default=str)])


def pyplot(who):
    """matplotlib.pyplot on the Agg backend, or None with one line on stderr when matplotlib is missing (the
    caller's table is written all the same)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        print(f"{who}: matplotlib is not installed, no plot (make setup installs it from the lock); the table is "
              "written", file=sys.stderr)
        return None


def save_figure(fig, path, title=None, axes=()) -> Path:
    """Finish a figure (title; grid and legend on each of `axes`; tight layout), save it atomically (a temporary
    file beside `path`, then renamed) and close it -> path."""
    import matplotlib.pyplot as plt
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    fig.savefig(tmp)
    os.replace(tmp, path)
    plt.close(fig)
    return path


def write_results(out, record, markdown, plot=None, docs=None):
    """An analysis's outputs in `out`: results.json (the record), results.md and, when plot(path) draws one,
    results.png; with docs PREFIX, copies as PREFIX.{json,md,png} (the README's figures)."""
    out = Path(out)
    atomic_write_json(out / "results.json", record)
    atomic_write_lines(out / "results.md", markdown.rstrip("\n").split("\n"))
    png = plot(out / "results.png") if plot is not None else None
    if docs:
        Path(docs).parent.mkdir(parents=True, exist_ok=True)
        for ext, src in (("md", out / "results.md"), ("json", out / "results.json"), ("png", png)):
            if src is not None and Path(src).is_file():
                shutil.copyfile(src, f"{docs}.{ext}")


def is_results_file(path, key) -> bool:
    """A results.json that write_results wrote for an analysis whose record holds `key` (check_output's `ours`)."""
    try:
        return key in json.loads(Path(path).read_text())
    except (OSError, ValueError, TypeError):
        return False


def replace_dir(tmp: Path, target: Path):
    """Move a finished directory into place; an existing target is swapped out, never half-overwritten."""
    tmp, target = Path(tmp), Path(target)
    if target.exists():
        old = target.parent / f".{target.name}.old{os.getpid()}"
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


# ----------------------------------------------------------------------------------------------- output policy

def _resolved(path) -> Path:
    """The absolute path with symlinks resolved as far as it exists (a path that does not exist yet too)."""
    return Path(os.path.realpath(os.path.abspath(os.fspath(path))))


def _within(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


def check_output(out, inputs=(), flag="--out", kind="dir", ours=None, overwrite=False, name="run"):
    """The one output-path policy, applied before any work starts. `out` (a run directory, or a file when kind is
    "file") may not be, lie inside, or contain any of `inputs` (files or directories; symlinks resolved). An
    existing `out` is replaced only when ours(out) says it holds just a previous run's own files, or with
    --overwrite. Its location must be writable. -> True when a previous output will be replaced (said on stderr).
    Raises ProjectError naming the flag."""
    o = _resolved(out)
    for inp in inputs:
        if inp is None:
            continue
        i = _resolved(inp)
        if _within(o, i):
            raise ProjectError(f"{flag} {out}: is {'the input' if o == i else 'inside the input'} {inp}; "
                               "choose an output outside the inputs")
        if kind == "dir" and _within(i, o):
            raise ProjectError(f"{flag} {out}: contains the input {inp}, which replacing it would delete")
    replacing = False
    if os.path.lexists(o):
        if kind == "dir" and not o.is_dir():
            raise ProjectError(f"{flag} {out}: exists and is not a directory (expected an output directory)")
        if kind == "file" and o.is_dir():
            raise ProjectError(f"{flag} {out}: is a directory (expected an output file)")
        mine = ours(o) if ours is not None else False
        if not mine and not overwrite:
            raise ProjectError(f"{flag} {out}: exists and holds files that are not a previous {name}'s own "
                               "(pass --overwrite to replace it)")
        replacing = True
    parent = o.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        probe = parent / f".{o.name}.probe{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ProjectError(f"{flag} {out}: cannot write in {parent} ({e.strerror or e})") from None
    if replacing:
        print(f"{name}: replacing the previous output in {out} (it stays as it is until the new one is complete)",
              file=sys.stderr)
    return replacing


def is_run_dir(path, allowed) -> bool:
    """A directory that holds only what a run of ours writes: a run.json with our run record's fields, and entries
    among `allowed` (name -> None for any file, or a set of allowed file names inside that subdirectory)."""
    path = Path(path)
    try:
        rec = json.loads((path / "run.json").read_text())
        if not (isinstance(rec, dict) and "argv" in rec and "versions" in rec):
            return False
        for entry in path.iterdir():
            if entry.name not in allowed:
                return False
            inner = allowed[entry.name]
            if inner is not None:
                if not entry.is_dir() or any(not inner(x.name) for x in entry.iterdir()):
                    return False
        return True
    except (OSError, ValueError):
        return False


class staged_dir:
    """with staged_dir(out) as tmp: write everything into tmp; on a clean exit tmp replaces out as a whole, on an
    error or Ctrl-C tmp is deleted and out is left byte-identical."""

    def __init__(self, out):
        self.out = Path(out)

    def __enter__(self):
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.out.parent / f".{self.out.name}.tmp{os.getpid()}"
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir()
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            try:
                replace_dir(self.tmp, self.out)
                return False
            except BaseException:
                shutil.rmtree(self.tmp, ignore_errors=True)
                raise
        shutil.rmtree(self.tmp, ignore_errors=True)
        return False


# ----------------------------------------------------------------------------------------------- run records

def _git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=ROOT).stdout.strip() or None
    except Exception:
        return None


def run_info(args=None) -> dict:
    """What every run records next to its outputs: arguments, versions, machine, start time."""
    versions = {}
    for name in ("torch", "triton"):  # optional here: data/fetch.py records runs without needing torch
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    torch = sys.modules.get("torch")
    if hasattr(args, "__dataclass_fields__"):
        from dataclasses import asdict
        args = asdict(args)
    elif args is not None and not isinstance(args, dict):
        args = vars(args)
    return {
        "args": args,
        "argv": sys.argv,
        "versions": {"python": platform.python_version(), **versions, "git_commit": _git_commit()},
        "host": platform.node(),
        "device": torch.cuda.get_device_name() if torch is not None and torch.cuda.is_available()
        else f"cpu ({os.cpu_count()} cores)",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


# ----------------------------------------------------------------------------------------------- devices, dtypes

def default_dtype(device):
    """bf16 on a GPU, fp32 on a CPU (bf16 matmuls are slow and imprecise there)."""
    import torch
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def resolve_dtype(name, device):
    """A --dtype flag (None: the device's default) -> torch.dtype."""
    import torch
    if name is None:
        return default_dtype(device)
    if name not in ("float32", "bfloat16", "float16"):
        raise ProjectError(f"--dtype {name!r}: expected float32, bfloat16 or float16")
    return getattr(torch, name)


def resolve_device(name=None) -> str:
    """A --device flag (None: cuda when available, else cpu), checked before any work starts."""
    import torch
    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise ProjectError(f"--device {name!r}: expected cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ProjectError(f"--device {name}: no CUDA GPU is available on this machine (use --device cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ProjectError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s)")
    elif dev.type != "cpu":
        raise ProjectError(f"--device {name!r}: expected cpu, cuda or cuda:N")
    return str(dev)


def peak_memory(device):
    """Peak bytes: CUDA's allocator peak on a GPU, the process's max resident set on a CPU (Linux: KiB * 1024)."""
    import torch
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated()
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ----------------------------------------------------------------------------------------------- flags

def split_list(s, flag, conv=str, allow_empty=False) -> list:
    """'a,b c' -> [conv(a), conv(b), conv(c)] (commas and/or spaces); a one-line error naming the flag."""
    if isinstance(s, (list, tuple)):
        items = [str(x) for x in s]
    else:
        items = [x for x in re.split(r"[,\s]+", str(s if s is not None else "").strip()) if x]
    if not items and not allow_empty:
        raise ProjectError(f"{flag}: expected at least one value (comma- or space-separated)")
    try:
        return [conv(x) for x in items]
    except ValueError:
        kind = {int: "integers", float: "numbers"}.get(conv, "values")
        raise ProjectError(f"{flag} {s!r}: expected comma-separated {kind}") from None


def parse_ratio(ratio, flag="--ratio") -> float:
    """A coreset ratio flag: a fraction in (0, 1] or a whole document count > 1. -> float"""
    try:
        r = float(ratio)
    except (TypeError, ValueError):
        raise ProjectError(f"{flag} {ratio!r}: expected a number (a fraction in (0, 1] or a document count > 1)") from None
    if not math.isfinite(r) or r <= 0:
        raise ProjectError(f"{flag} {ratio}: expected a fraction in (0, 1] or a document count > 1")
    if r > 1 and r != int(r):
        raise ProjectError(f"{flag} {ratio}: above 1 it is a document count and must be a whole number")
    return r


def per_topic(values, n) -> list:
    """One value per topic from a list of at least one: the last value repeats."""
    return [values[min(i, len(values) - 1)] for i in range(n)]


# ----------------------------------------------------------------------------------------------- progress, mains

def progress_bar(total, desc, unit="step", disable=False):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit=unit, disable=disable, dynamic_ncols=True)


def cli_main(name, fn, *args):
    """Run a script's work: a ProjectError ends in one line `error: ...` (exit 1), so does a failed write (disk
    full, read-only); Ctrl-C in one line (exit 130). Outputs are staged, so none of these leaves a half-written
    file or replaces an earlier output."""
    try:
        return fn(*args)
    except ProjectError as e:
        sys.exit(f"error: {e}")
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        sys.exit(f"error: {where}{e.strerror or e}; earlier outputs were left as they were")
    except KeyboardInterrupt:
        print(f"{name}: interrupted; earlier outputs were left as they were, nothing half-written", file=sys.stderr)
        sys.exit(130)
