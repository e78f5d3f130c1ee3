"""The project coexists with the packages around it: no top-level name shadows one that our stack imports, nothing
installs our generic names into the venv, transformers works from the repo root, and installs come from the lock."""
import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Names the project card asks for although a PyPI project of that name exists. They are safe only because
# nothing installs them: they resolve from the repo root alone (scripts run there, pytest's pythonpath).
# `evaluate` is also Hugging Face's library, which lm-evaluation-harness imports: run lm_eval through its
# console script (never `python -m lm_eval` from the repo root), as the README says.
CARD_NAMES = {"model", "evaluate", "data", "coreset", "unlearn"}
# PyPI project names the issue found taken, that a kernel package must not use
TAKEN = {"kernels", "ops", "fused", "triton_kernels", "evaluate", "data"}


def project_top_level_names() -> set:
    """Every importable top-level name the repo root provides: modules *.py and packages (dirs with __init__.py)."""
    names = {p.stem for p in ROOT.glob("*.py")}
    names |= {p.parent.name for p in ROOT.glob("*/__init__.py")}
    return names


def installed_top_level_names() -> dict:
    """top-level import name -> distribution, for every distribution installed in this Python."""
    out = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        top = (dist.read_text("top_level.txt") or "").split()
        if not top:  # wheels without top_level.txt: the first component of every file they install
            for f in dist.files or ():
                first = f.parts[0]
                if first.endswith((".dist-info", ".data")) or first in ("..", "__pycache__"):
                    continue
                top.append(first[:-3] if first.endswith(".py") else first)
        for t in top:
            out.setdefault(t, name)
    return out


def test_project_names_are_what_we_think():
    names = project_top_level_names()
    assert {"model", "unlearn", "coreset", "evaluate", "data", "lpkernels"} <= names, names
    assert "kernels" not in names  # renamed: Hugging Face's `kernels` is imported by transformers >= 5.25


def test_no_project_name_shadows_an_installed_package():
    installed = installed_top_level_names()
    clashes = {n: installed[n] for n in project_top_level_names() - CARD_NAMES if n in installed}
    assert not clashes, f"top-level names that an installed distribution also provides: {clashes}"
    assert not (project_top_level_names() - CARD_NAMES) & TAKEN
    # the card's own names: none may be one that transformers, torch or triton import (those load in every
    # test and every user script); `evaluate` is the known exception above, imported only by lm_eval
    for n in CARD_NAMES - {"evaluate"}:
        assert n not in installed, f"{n}: provided by {installed[n]}; shadowing it breaks that package"


def test_the_project_itself_is_not_installed():
    dists = {d.metadata["Name"].lower() for d in importlib.metadata.distributions()}
    assert "coreset-unlearning" not in dists, "the project is installed into the venv: its generic names leak"


def test_project_modules_do_not_resolve_from_another_directory(tmp_path):
    code = ("import importlib.util, json, sys\n"
            "names = sys.argv[1].split(',')\n"
            "print(json.dumps({n: getattr(importlib.util.find_spec(n), 'origin', None) for n in names}))")
    names = sorted(project_top_level_names())
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", code, ",".join(names)], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    import json
    origins = json.loads(r.stdout)
    mine = lambda n: {(ROOT / f"{n}.py").resolve(), (ROOT / n / "__init__.py").resolve()}
    ours = {n: o for n, o in origins.items() if o and Path(o).resolve() in mine(n)}
    if "evaluate" in installed_top_level_names():  # Hugging Face's, an lm_eval dependency: that one resolves
        assert "site-packages" in origins["evaluate"], origins["evaluate"]
    assert not ours, f"importable from another directory, resolving to the repo's files: {ours}"


def test_transformers_loads_toy_model_from_repo_root():
    # what a user types in the project directory: the cwd is on sys.path, so a top-level `kernels/` used to break
    # `import transformers` (transformers >= 5.25 imports Hugging Face's `kernels`)
    pytest.importorskip("transformers")
    code = ("import torch, transformers\n"
            "tok = transformers.AutoTokenizer.from_pretrained('data/toy/model')\n"
            "m = transformers.AutoModelForCausalLM.from_pretrained('data/toy/model', dtype=torch.float32)\n"
            "ids = tok('The agent', return_tensors='pt').input_ids\n"
            "print(type(m).__name__, tuple(m(ids).logits.shape))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("LlamaForCausalLM (1, "), r.stdout


def test_no_sys_path_edits():
    offenders = []
    for f in list(ROOT.glob("*.py")) + list(ROOT.glob("*/*.py")) + list(ROOT.glob("*/*/*.py")):
        if ".venv" in f.parts:
            continue
        for i, line in enumerate(f.read_text().splitlines(), 1):
            if re.search(r"sys\.path\.(insert|append|extend)|sys\.path\s*=", line):
                offenders.append(f"{f.relative_to(ROOT)}:{i}")
    assert not offenders, f"sys.path edits (run scripts inside packages as modules instead): {offenders}"


@pytest.mark.parametrize("target", ["bench", "bench-unlearn", "bench-eval", "wmdp-rmu", "wmdp-npo", "test"])
def test_make_with_own_python_installs_nothing(target):
    # a GPU machine with its own torch/triton and no package index: `make bench PY=python3`
    r = subprocess.run(["make", "-n", target, "PY=python3"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "pip" not in r.stdout and "venv" not in r.stdout, r.stdout
    assert "python3 " in r.stdout
    r = subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert ".venv/bin/python " in r.stdout


def test_make_runs_package_scripts_as_modules():
    out = {t: subprocess.run(["make", "-n", t, "PY=python3"], cwd=ROOT, capture_output=True, text=True,
                             timeout=60).stdout for t in ("bench", "toy", "fetch")}
    assert "python3 -m benches.kernels" in out["bench"]
    assert "python3 make_toy.py" in out["toy"]
    assert "python3 -m data.fetch" in out["fetch"]


def read_lock() -> dict:
    pins = {}
    for i, line in enumerate((ROOT / "requirements.lock").read_text().splitlines(), 1):
        line = line.split("#")[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([A-Za-z0-9_.\-]+)", line)
        assert m, f"requirements.lock:{i}: expected name==version, got {line!r}"
        pins[re.sub(r"[-_.]+", "-", m.group(1)).lower()] = m.group(2)
    return pins


def test_lock_pins_exact_versions_of_requirements_in():
    pins = read_lock()
    assert "+" not in pins["torch"], "torch's local build tag must not be in the lock (CPU and CUDA share it)"
    for i, line in enumerate((ROOT / "requirements.in").read_text().splitlines(), 1):
        line = line.split("#")[0].strip()
        if line:
            name = re.sub(r"[-_.]+", "-", re.split(r"[\[=<>!~; ]", line)[0]).lower()
            assert name in pins, f"requirements.in:{i}: {name} is not pinned in requirements.lock"


def test_venv_matches_the_lock():
    if Path(sys.prefix).resolve() != (ROOT / ".venv").resolve():
        pytest.skip(f"not the project venv ({sys.prefix}): a machine's own Python is not held to the lock")
    pins = read_lock()
    off = []
    for dist in importlib.metadata.distributions():
        name = re.sub(r"[-_.]+", "-", dist.metadata["Name"]).lower()
        if name in ("pip", "setuptools", "wheel"):
            continue
        version = dist.version.split("+")[0]
        if pins.get(name) != version:
            off.append(f"{name} {dist.version} (lock: {pins.get(name)})")
    assert not off, f"installed but not as locked: {off}"
