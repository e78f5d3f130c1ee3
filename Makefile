# Every target builds .venv from requirements.lock on first use. With no MODEL and DATA the runs use the
# embedded default (data/toy: a small fictional benchmark and the model trained on it); real runs name local
# paths:
#   make wmdp-rmu RATIO=0.05 MODEL=/models/zephyr-7b-beta DATA=/data/unlearning
# A machine that brings its own torch/triton (a GPU box, a cluster) and has no package index runs any target
# with that Python instead, installing nothing:  make bench PY=python3
SHELL := /bin/bash
VENV  := .venv
PY    ?= $(VENV)/bin/python
STAMP := $(VENV)/.installed-lock
# the venv is built only when PY is the venv's own python
SETUP := $(if $(filter $(VENV)/bin/python,$(PY)),$(STAMP),)
PIP   := -m pip install -q --disable-pip-version-check

MODEL ?=
DATA  ?=
RATIO ?= 0.05
SEED  ?= 42
SELECT ?= random
STEPS ?=
EPOCHS ?=
OUT   ?= runs

ifeq ($(DATA),)
  DATA_DIR    := data/toy
  WMDP_FORGET := data/toy/forget_corpus.jsonl
  # no --retain: each script takes the toy's retain corpus for its method (methods.toy_data; the NPO family's is
  # prose the model never trained on, data/toy/retain_unseen.jsonl)
  WMDP_RETAIN :=
  WMDP_TASKS  := toy_hazard,toy_general
  # the toy's MUSE-shaped split (toy_muse.py) and its own target model, as MUSE-News has its own
  MUSE_FORGET := data/toy/muse/toy/raw_forget.jsonl
  MUSE_RETAIN := data/toy/muse/toy/raw_retain1.jsonl
  MUSE_TASKS  := muse_toy,toy_general
  MUSE_FLAGS  :=
else
  DATA_DIR    := $(DATA)
  WMDP_FORGET := $(DATA)/wmdp/bio-forget-corpus.jsonl,$(DATA)/wmdp/cyber-forget-corpus.jsonl
  WMDP_RETAIN := $(DATA)/wikitext/wikitext-2-raw-v1-test.txt
  WMDP_TASKS  := wmdp_bio,wmdp_cyber,mmlu
  MUSE_FORGET := $(DATA)/muse/news/raw_forget.jsonl
  MUSE_RETAIN := $(DATA)/muse/news/raw_retain1.jsonl
  MUSE_TASKS  := muse_news
  MUSE_FLAGS  := --no-npo-mean-tokens --chunk-tokens 2048 --forget-max-len 2048 --retain-max-len 2048 --grad-accum 8
endif
MODEL_DIR := $(if $(MODEL),$(MODEL),data/toy/model)
MUSE_MODEL_DIR := $(if $(MODEL),$(MODEL),data/toy/muse/model)
# real MUSE data needs its own target model: the toy's MUSE model does not know MUSE-News
MUSE_CHECK = @if [ -n "$(DATA)" ] && [ -z "$(MODEL)" ]; then echo "$@: DATA=$(DATA) needs MODEL=the MUSE News target model (the embedded toy's MUSE model knows only the toy)" >&2; exit 2; fi
# BENCHMARK=muse points the sweep, the budget curve and connectivity at the MUSE split (default: wmdp)
BENCHMARK ?= wmdp
IS_MUSE   := $(filter muse,$(BENCHMARK))
B_MODEL   := $(if $(IS_MUSE),$(MUSE_MODEL_DIR),$(MODEL_DIR))
B_FORGET  := $(if $(IS_MUSE),$(MUSE_FORGET),$(WMDP_FORGET))
B_RETAIN  := $(if $(IS_MUSE),$(MUSE_RETAIN),$(WMDP_RETAIN))
# none on the WMDP toy: each script takes the toy's retain corpus for its method
B_RETAIN_FLAG := $(if $(B_RETAIN),--retain $(B_RETAIN),)
B_TASKS   := $(if $(IS_MUSE),$(MUSE_TASKS),$(WMDP_TASKS))
B_PREFIX  := $(if $(IS_MUSE),muse-,)
# the budget (budget.py): STEPS=N optimizer steps or EPOCHS=E passes over the run's forget set; neither: the method's
# rule (RMU: the reference's, min(150, batches of the full forget set); NPO family: 500 steps)
STEPS_FLAG := $(if $(STEPS),--steps $(STEPS),)$(if $(EPOCHS), --epochs $(EPOCHS),)

.PHONY: setup test test-slow test-fast lock toy toy-muse fetch bench bench-all bench-unlearn bench-eval wmdp-rmu wmdp-npo muse-npo sweep sweep-select budget-curve connectivity relearn jailbreak

setup: $(SETUP)

# torch==2.13.0 in the lock: the CPU build from local disk on this project's CPU machines, the CUDA build
# from the index elsewhere. A venv made by an older Makefile had the project installed in editable mode (which
# mapped model, data, evaluate, ... as top-level names for every program in the venv): that goes.
$(STAMP): requirements.lock
	python3 -m venv $(VENV)
	$(PY) -m pip uninstall -q -y coreset-unlearning 2>/dev/null || true
	$(PY) $(PIP) -r requirements.lock
	touch $@

# Three tiers (markers in pyproject.toml). CI runs `make test` (.ci/run; REQUIRE_REAL_CHECKPOINT=1 turns the
# skip of the real-checkpoint tests into a failure): everything but the `slow` tests, <= 15 min on 2 cores.
# `make test-slow`: the multi-minute tests (toy targets end to end, sweeps, multi-seed); `make test-fast`: the
# edit loop, < 1 min (no subprocesses of make, no real checkpoint, no harness).
test: $(SETUP)
	$(PY) -m pytest tests -m "not slow"

test-slow: $(SETUP)
	$(PY) -m pytest tests -m slow

test-fast: $(SETUP)
	$(PY) -m pytest tests -m "not slow and not real and not harness and not make and not dist"

# Move the lock forward on purpose: resolve the newest versions of requirements.in in a scratch venv, run the
# test suite against them, and only then write requirements.lock (torch's local build tag dropped, so the
# line fits CPU and CUDA machines alike). Commit the new lock with the tests' result.
LOCK_VENV := .venv-lock
lock:
	rm -rf $(LOCK_VENV) && python3 -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python $(PIP) --upgrade -r requirements.in
	$(MAKE) test PY=$(LOCK_VENV)/bin/python
	{ sed -n '/^#/p' requirements.lock; $(LOCK_VENV)/bin/python -m pip freeze --all | \
	  grep -viE '^(pip|setuptools|wheel)==' | sed -E 's/^(torch==[^+]+)\+.*/\1/'; } > requirements.lock.tmp
	mv requirements.lock.tmp requirements.lock
	@echo "lock: requirements.lock moved forward and tested; git diff requirements.lock shows what changed"

# ---------------------------------------------------------------------------------------------- data
# the WMDP-shaped toy (make_toy.py: data, tokenizer, model, control), then its MUSE-shaped split and MUSE target
# model (toy_muse.py; alone: make toy-muse)
toy: $(SETUP)
	$(PY) make_toy.py
	$(PY) toy_muse.py

toy-muse: $(SETUP)
	$(PY) toy_muse.py

fetch: $(SETUP)
	$(PY) -m data.fetch --data $(if $(DATA),$(DATA),data/real) $(if $(MODEL),--model $(MODEL),)

# ---------------------------------------------------------------------------------------------- benchmarks (GPU)
# BENCH_FLAGS: benches/kernels.py's flags, e.g. "--impls ours,eager --vocab 32000"
BENCH_FLAGS ?=
bench: $(SETUP)
	$(PY) -m benches.kernels $(BENCH_FLAGS)

# questions/s, ours vs the harness's Hugging Face path, same weights and questions (GPU; LIMIT per task/subject).
# SHAPE=zephyr-7b times random weights of that shape instead of MODEL's (MODEL then gives only the tokenizer)
LIMIT ?= 50
SHAPE ?=
bench-eval: $(SETUP)
	$(PY) -m benches.eval_speed --model $(MODEL_DIR) --data $(DATA_DIR) --tasks $(WMDP_TASKS) --limit $(LIMIT) \
	  $(if $(SHAPE),--random-shape $(SHAPE),) --out $(OUT)/bench/bench_eval.json

# every GPU benchmark in one go, with logs and JSON records in $(OUT)/bench (what a lent GPU machine runs):
#   make bench-all PY=python3
bench-all: $(SETUP)
	PY=$(PY) bash benches/run_all.sh $(OUT)

# --- unlearning (unlearn.py; owner: issue 4) -----------------------------------------------------
# make wmdp-rmu RATIO=0.05 [MODEL=DIR DATA=DIR SELECT=random SEED=42 STEPS=N|EPOCHS=E UNLEARN_FLAGS="--lr 1e-5 ..."]
# SELECT=random draws the coreset inside unlearn.py (--ratio); any other SELECT runs coreset.py first (GraNd with
# the loss of the method being run; keywords: the documents reduced to their keywords against the retain corpus,
# trained on under the same budget as the full forget set).
# Each run writes $(OUT)/<target>-<select>-r<ratio>-s<seed>/{run.json,model/} (a rerun replaces it as a whole) and
# prints the before/after table; a selected coreset goes beside it, <run dir>.coreset.jsonl.
UNLEARN_FLAGS ?=
UNLEARN_RUN    = $(OUT)/$@-$(SELECT)-r$(RATIO)-s$(SEED)
# NPROC=N: the run on N processes (torchrun): the NPO family sharded with FSDP2, RMU data parallel (multigpu.py)
NPROC ?= 1
LAUNCH = $(if $(filter-out 1,$(NPROC)),$(PY) -m torch.distributed.run --standalone --nproc-per-node $(NPROC),$(PY))
# the coreset lies beside the run directory, not inside it: an input inside an output would be replaced with it
CORESET_FILE   = $(UNLEARN_RUN).coreset.jsonl
# $(call unlearn,METHOD,FORGET,RETAIN,TASKS,EXTRA FLAGS,MODEL DIR)
define unlearn
	@if [ "$(SELECT)" != "random" ]; then \
	  echo "+ coreset.py --method $(SELECT) --ratio $(RATIO) --seed $(SEED)"; \
	  $(PY) coreset.py --method $(SELECT) --model $(6) --forget $(2) --ratio $(RATIO) --seed $(SEED) \
	    $(if $(filter grand,$(SELECT)),--grand-loss $(if $(filter rmu,$(1)),rmu,npo),) \
	    $(if $(filter keywords,$(SELECT)),$(if $(3),--retain $(3),),) \
	    --out $(CORESET_FILE) || exit $$?; fi
	$(LAUNCH) unlearn.py --method $(1) --model $(6) --forget $(2) $(if $(3),--retain $(3),) \
	  $(if $(filter random,$(SELECT)),--ratio $(RATIO),--coreset $(CORESET_FILE)) \
	  --seed $(SEED) $(STEPS_FLAG) --data $(DATA_DIR) --eval-tasks $(4) --out $(UNLEARN_RUN) $(5) $(UNLEARN_FLAGS)
endef

wmdp-rmu: $(SETUP)
	$(call unlearn,rmu,$(WMDP_FORGET),$(WMDP_RETAIN),$(WMDP_TASKS),,$(MODEL_DIR))

wmdp-npo: $(SETUP)
	$(call unlearn,npo,$(WMDP_FORGET),$(WMDP_RETAIN),$(WMDP_TASKS),,$(MODEL_DIR))

# without DATA: the toy's MUSE split (data/toy/muse/toy) and its target model (data/toy/muse/model)
muse-npo: $(SETUP)
	$(MUSE_CHECK)
	$(call unlearn,npo,$(MUSE_FORGET),$(MUSE_RETAIN),$(MUSE_TASKS),$(MUSE_FLAGS),$(MUSE_MODEL_DIR))

# the RMU step (reference design vs ours), then a full-parameter NPO step sharded with FSDP2 over every GPU present
NGPU = $(shell nvidia-smi -L 2>/dev/null | grep -c '^GPU ')
bench-unlearn: $(SETUP)
	$(PY) -m benches.unlearn_step
	$(PY) -m torch.distributed.run --standalone --nproc-per-node $(if $(filter-out 0,$(NGPU)),$(NGPU),1) -m benches.npo_step

# --- coreset sweep (coreset_sweep.py: select, unlearn, evaluate per cell; table + plot; reruns skip finished cells)
#   make sweep METHOD=rmu SELECT=random RATIOS="0.01 0.05 0.1 0.2 1.0" SEEDS="0 1 2" BUDGET=equal-steps [EPOCHS=1]
#     -> $(OUT)/sweep-<method>-<select>-<budget>/results.{md,json,png}
#   BUDGET=equal-steps: every ratio trains the full set's steps (EPOCHS passes over the full forget set, default 1;
#   small coresets are cycled: the paper's "sufficiently extended"); equal-epochs: every ratio EPOCHS passes over
#   its own set; STEPS=N: N steps for every cell.
#   make sweep-select METHOD=rmu RATIO=0.05 SELECTS="random loss zlib mink minkpp grand moderate" SEEDS="0 1 2"
#     -> $(OUT)/sweep-select-<method>-r<ratio>/results.{md,json,png}
#   BENCHMARK=muse METHOD=npo: either on the MUSE split (VerbMem, KnowMem, PrivLeak) -> $(OUT)/sweep-muse-...
# GPUS=0,1,2,3: one worker process per GPU; the cells are claimed atomically in the sweep directory, so the same
# command on several nodes sharing a file system works on one sweep (sweep_queue.py).
# SWEEP_FLAGS adds coreset_sweep.py flags (e.g. --docs docs/sweep_rmu_equal_steps, --keep-models, --select-args "...").
METHOD  ?= rmu
RATIOS  ?= 0.01 0.05 0.1 0.2 1.0
SEEDS   ?= 0 1 2
SELECTS ?= random loss zlib mink minkpp grand moderate
SWEEP_FLAGS ?=
GPUS ?=
SWEEP_UNLEARN = $(strip $(if $(IS_MUSE),$(MUSE_FLAGS),) $(UNLEARN_FLAGS))
BUDGET  ?= equal-steps
SWEEP_COMMON = --method $(METHOD) --model $(B_MODEL) --data $(DATA_DIR) --forget $(B_FORGET) \
  $(B_RETAIN_FLAG) --tasks $(B_TASKS) --seeds "$(SEEDS)" --budget $(BUDGET) $(STEPS_FLAG) \
  $(if $(SWEEP_UNLEARN),--unlearn-args="$(SWEEP_UNLEARN)",) $(if $(GPUS),--gpus $(GPUS),) $(SWEEP_FLAGS)

sweep: $(SETUP)
	$(if $(IS_MUSE),$(MUSE_CHECK))
	$(PY) coreset_sweep.py $(SWEEP_COMMON) --select $(SELECT) --ratios "$(RATIOS)" --out $(OUT)/sweep-$(B_PREFIX)$(METHOD)-$(SELECT)-$(BUDGET)

sweep-select: $(SETUP)
	$(if $(IS_MUSE),$(MUSE_CHECK))
	$(PY) coreset_sweep.py $(SWEEP_COMMON) --select "$(SELECTS)" --ratios $(RATIO) --out $(OUT)/sweep-select-$(B_PREFIX)$(METHOD)-r$(RATIO)-$(BUDGET)

# --- budget curve (budget_curve.py): forget and utility accuracy against training steps, for the full forget set
# and a RATIO coreset, evaluated every EVERY steps inside one run each; table + plot.
#   make budget-curve METHOD=rmu RATIO=0.05 [STEPS=N | EPOCHS=E (of the full set); neither: the method's own
#   budget on the full set] EVERY=K
#     -> $(OUT)/budget-curve-<method>-r<ratio>/results.{md,json,png}
EVERY ?=
CURVE_FLAGS ?=
budget-curve: $(SETUP)
	$(if $(IS_MUSE),$(MUSE_CHECK))
	$(PY) budget_curve.py --method $(METHOD) --model $(B_MODEL) --data $(DATA_DIR) --forget $(B_FORGET) \
	  $(B_RETAIN_FLAG) --tasks $(B_TASKS) --ratio $(RATIO) --seed $(SEED) $(STEPS_FLAG) \
	  $(if $(EVERY),--every $(EVERY),) $(if $(SWEEP_UNLEARN),--unlearn-args="$(SWEEP_UNLEARN)",) $(CURVE_FLAGS) \
	  --out $(OUT)/budget-curve-$(B_PREFIX)$(METHOD)-r$(RATIO)

# --- mode connectivity (connectivity.py): A = the full forget set, B = a RATIO coreset (same method, seed, budget),
# then the straight paths A <-> B, base <-> A, base <-> B evaluated at POINTS values of t; barrier per metric.
#   make connectivity METHOD=rmu RATIO=0.05 [A=DIR B=DIR (two existing checkpoints)] [STEPS= | EPOCHS=] [BEZIER=1]
#   BEZIER=1 also fits a quadratic Bezier curve A - C - B on the unlearning loss and walks it
#     -> $(OUT)/connectivity-<method>-r<ratio>/results.{md,json,png}
POINTS ?= 11
CONN_FLAGS ?=
CONN_UNLEARN = $(strip $(STEPS_FLAG) $(if $(IS_MUSE),$(MUSE_FLAGS),) $(UNLEARN_FLAGS))
connectivity: $(SETUP)
	$(if $(IS_MUSE),$(MUSE_CHECK))
	$(PY) connectivity.py --method $(METHOD) --base $(B_MODEL) --data $(DATA_DIR) --forget $(B_FORGET) \
	  $(B_RETAIN_FLAG) --tasks $(B_TASKS) --ratio $(RATIO) --seed $(SEED) --points $(POINTS) \
	  $(if $(A),--a $(A),) $(if $(B),--b $(B),) $(if $(BEZIER),--bezier,) $(if $(CONN_UNLEARN),--unlearn-args="$(CONN_UNLEARN)",) $(CONN_FLAGS) \
	  --out $(OUT)/connectivity-$(B_PREFIX)$(METHOD)-r$(RATIO)

# --- relearning attack (relearn.py): unlearn the ARMS (full set, coresets, keyword-only; same METHOD, SEED, budget),
# then fine-tune each on the same forget documents (outside every coreset) for each budget in RELEARN_STEPS and
# re-evaluate; MODELS="name=DIR,..." attacks existing checkpoints instead.
#   make relearn METHOD=rmu [ARMS="full 0.05 0.01 keywords"] [RELEARN_STEPS="0 5 10 15 25 50"] [MODELS=...]
#     -> $(OUT)/relearn-<method>/results.{md,json,png}
ARMS ?= full 0.05 0.01 keywords
RELEARN_STEPS ?= 0 5 10 15 25 50
RELEARN_FLAGS ?=
relearn: $(SETUP)
	$(if $(IS_MUSE),$(MUSE_CHECK))
	$(PY) relearn.py --method $(METHOD) --base $(B_MODEL) --data $(DATA_DIR) --forget $(B_FORGET) \
	  $(B_RETAIN_FLAG) --tasks $(B_TASKS) --seed $(SEED) --arms "$(ARMS)" --steps "$(RELEARN_STEPS)" \
	  $(if $(MODELS),--models $(MODELS),) $(if $(CONN_UNLEARN),--unlearn-args="$(CONN_UNLEARN)",) $(RELEARN_FLAGS) \
	  --out $(OUT)/relearn-$(B_PREFIX)$(METHOD)

# --- jailbreak prefixes (jailbreak.py): unlearn the JB_ARMS (default the full set and a RATIO coreset; same METHOD,
# SEED, budget), then find one GCG prefix per model on 5 questions of the forget task (towards the base model's
# answers) and evaluate the rest with and without it. CPU: 50 steps x 64 candidates; GPU: 500 x 512.
#   make jailbreak METHOD=rmu RATIO=0.05 [MODELS="name=DIR,..."] [JB_FLAGS="--steps 100"]
#     -> $(OUT)/jailbreak-<method>-r<ratio>/results.{md,json,png}
JB_ARMS ?= full $(RATIO)
JB_FLAGS ?=
jailbreak: $(SETUP)
	$(if $(IS_MUSE),@echo "jailbreak: the attack scores multiple-choice answers; BENCHMARK=muse has none (use the WMDP tasks)" >&2; exit 2)
	$(PY) jailbreak.py --method $(METHOD) --base $(B_MODEL) --data $(DATA_DIR) --forget $(B_FORGET) \
	  $(B_RETAIN_FLAG) --tasks $(B_TASKS) --seed $(SEED) --arms "$(JB_ARMS)" \
	  $(if $(MODELS),--models $(MODELS),) $(if $(CONN_UNLEARN),--unlearn-args="$(CONN_UNLEARN)",) $(JB_FLAGS) \
	  --out $(OUT)/jailbreak-$(METHOD)-r$(RATIO)
