"""The unlearned models an analysis compares ("arms"), trained here from one base or given as checkpoints, and what
each one trained on. Used by connectivity.py, relearn.py and jailbreak.py.

    arms = parse_arms("full,0.05,keywords")   # [("full", None, False), ("r0.05", 0.05, False), ("keywords", None, True)]
    dirs = train_arms(arms, shared_settings(args), out)   # {name: checkpoint dir}: unlearn.run per arm
    dirs = given_models("full=RUN/model,...") # existing checkpoints
    seen = seen_documents(dir, forget_files)  # the forget documents a checkpoint trained on (its run.json)

An arm: full (the whole forget set), a ratio in (0, 1) (a seeded random coreset, the same draw as unlearn.py
--ratio), or keywords (the keyword-only forget set of every document, coreset.py --method keywords). All arms of one
call share the method, seed, budget and every other unlearn.py setting. An arm whose run.json records exactly the
same settings, with its checkpoint beside it, is kept, so a rerun of an analysis only re-analyses.
"""
import json
import shlex
from pathlib import Path

import coreset
import methods
import unlearn
from infra import ProjectError, split_list


def parse_arms(spec, flag="--arms") -> list:
    """'full,0.05,keywords' -> [(name, ratio or None, keywords?)]; names full, r<ratio>, keywords."""
    arms = []
    for a in split_list(spec, flag):
        if a in ("full", "keywords"):
            arms.append((a, None, a == "keywords"))
            continue
        try:
            r = float(a)
        except ValueError:
            raise ProjectError(f"{flag}: {a!r}: expected full, keywords or a coreset ratio such as 0.05") from None
        if not 0 < r < 1:
            raise ProjectError(f"{flag}: {a}: expected a ratio in (0, 1) (the whole set is 'full')")
        arms.append((f"r{a}", r, False))
    if len({n for n, _, _ in arms}) != len(arms):
        raise ProjectError(f"{flag} {spec}: an arm is named twice")
    return arms


def shared_settings(args) -> dict:
    """The unlearn settings every arm of an analysis shares, from the analysis's flags: --method, --base, --forget,
    --retain, --seed, --device, --dtype, then its --unlearn-args (as methods.resolve takes them)."""
    common = {"method": args.method, "model": args.base, "forget": args.forget, "retain": args.retain,
              "seed": args.seed, "device": args.device, "dtype": args.dtype}
    common = {k: v for k, v in common.items() if v is not None}
    common.update(unlearn.overrides_from_argv(shlex.split(args.unlearn_args)))
    return common


def train_arms(arms, common: dict, out, progress=True) -> dict:
    """Unlearn each arm into out/NAME (unlearn.run; `common`: the unlearn settings every arm shares, as
    methods.resolve takes them, with model, forget, retain and seed) -> {name: checkpoint dir}."""
    dirs = {}
    for name, ratio, keywords in arms:
        adir = Path(out) / name
        given = {**common, "out": str(adir), "eval_tasks": "none", "progress": progress}
        if ratio is not None:
            given["ratio"] = ratio
        if keywords:
            forget = common["forget"] if isinstance(common["forget"], str) else ",".join(common["forget"])
            retain = common["retain"] if isinstance(common["retain"], str) else ",".join(common["retain"])
            scfg = coreset.SelectConfig(method="keywords", forget=forget, retain=retain, seed=common["seed"],
                                        out=str(Path(out) / "keywords.coreset.jsonl"), progress=progress,
                                        overwrite=True)
            coreset.select(scfg)
            given["coreset"] = scfg.out
        given = {k: v for k, v in given.items() if v is not None}
        cfg = methods.resolve(given)
        try:   # the same explicit arguments and the same resolved settings: a changed default retrains the arm
            rec = json.loads((adir / "run.json").read_text())
            done = rec["args"] == json.loads(json.dumps(given)) and not unlearn.config_changes(rec, cfg)
        except (OSError, ValueError, KeyError):
            done = False
        if not done or not (adir / "model" / "config.json").is_file():
            unlearn.run(cfg, given=given)
        dirs[name] = str(adir / "model")
    return dirs


def given_models(spec, flag="--models") -> dict:
    """'NAME=DIR,...' -> {name: checkpoint dir}, each checked to hold a config.json."""
    out = {}
    for item in split_list(spec, flag):
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ProjectError(f"{flag}: {item!r}: expected NAME=CHECKPOINT_DIR")
        if name in out:
            raise ProjectError(f"{flag}: {name} is named twice")
        if not (Path(path) / "config.json").is_file():
            raise ProjectError(f"{flag}: {path}: no config.json (expected a checkpoint directory)")
        out[name] = path
    return out


def seen_documents(model_dir, forget_files) -> dict | None:
    """What an unlearned checkpoint trained on, from the run.json beside it (unlearn.py writes RUN/model and
    RUN/run.json): {"indices": per forget file, "keywords": bool, "n_docs": per file}; None when there is no
    such record or it names other forget files."""
    try:
        rec = json.loads((Path(model_dir).parent / "run.json").read_text())
        cs = rec["coreset"]
        files = [str(Path(f).resolve()) for f in cs["files"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if files != [str(Path(f).resolve()) for f in forget_files]:
        return None
    return {"indices": cs["indices"], "keywords": bool(cs.get("texts_from_coreset")), "n_docs": cs["n_docs"]}
