# Every target builds .venv on first use. With no MODEL and DATA the runs use the embedded default
# (data/toy: a small fictional benchmark and the model trained on it); real runs name local paths:
#   make wmdp-rmu RATIO=0.05 MODEL=/models/zephyr-7b-beta DATA=/data/unlearning
SHELL := /bin/bash
PY    := .venv/bin/python
STAMP := .venv/.installed

# A machine without a GPU takes the CPU build of torch (on this project's machines it lies on local disk);
# a machine with one takes the default CUDA build. An already installed torch is kept.
TORCH ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)

MODEL ?=
DATA  ?=
RATIO ?= 0.05
SEED  ?= 0
SELECT ?= random
STEPS ?=
OUT   ?= runs

ifeq ($(DATA),)
  DATA_DIR    := data/toy
  WMDP_FORGET := data/toy/forget_corpus.jsonl
  WMDP_RETAIN := data/toy/retain_corpus.jsonl
  WMDP_TASKS  := toy_hazard,toy_general
else
  DATA_DIR    := $(DATA)
  WMDP_FORGET := $(DATA)/wmdp/bio-forget-corpus.jsonl,$(DATA)/wmdp/cyber-forget-corpus.jsonl
  WMDP_RETAIN := $(DATA)/wikitext/wikitext-2-raw-v1-test.txt
  WMDP_TASKS  := wmdp_bio,wmdp_cyber,mmlu
endif
MODEL_DIR := $(if $(MODEL),$(MODEL),data/toy/model)
STEPS_FLAG := $(if $(STEPS),--steps $(STEPS),)

.PHONY: setup test toy fetch bench bench-unlearn bench-eval wmdp-rmu wmdp-npo muse-npo sweep sweep-select clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install -q --disable-pip-version-check "$(TORCH)"
	$(PY) -m pip install -q --disable-pip-version-check -e ".[test]"
	touch $@

test: $(STAMP)
	$(PY) -m pytest tests

# ---------------------------------------------------------------------------------------------- data
toy: $(STAMP)
	$(PY) data/make_toy.py

fetch: $(STAMP)
	$(PY) -m pip install -q --disable-pip-version-check -e ".[fetch]"
	$(PY) data/fetch.py --data $(if $(DATA),$(DATA),data/real) $(if $(MODEL),--model $(MODEL),)

# ---------------------------------------------------------------------------------------------- benchmarks (GPU)
bench: $(STAMP)
	$(PY) kernels/bench.py

# questions/s, ours vs the harness's Hugging Face path, same weights and questions (GPU; LIMIT per task/subject)
LIMIT ?= 50
bench-eval: $(STAMP)
	$(PY) evaluate.py --bench --model $(MODEL_DIR) --data $(DATA_DIR) --tasks $(WMDP_TASKS) --limit $(LIMIT)

# --- unlearning (unlearn.py; owner: issue 4) -----------------------------------------------------
# make wmdp-rmu RATIO=0.05 [MODEL=DIR DATA=DIR SELECT=random SEED=0 STEPS=N UNLEARN_FLAGS="--lr 1e-5 ..."]
# SELECT=random draws the coreset inside unlearn.py (--ratio); any other SELECT runs coreset.py first.
# Each run writes $(OUT)/<target>-<select>-r<ratio>-s<seed>/{run.json,model/} and prints the before/after table.
UNLEARN_FLAGS ?=
UNLEARN_RUN    = $(OUT)/$@-$(SELECT)-r$(RATIO)-s$(SEED)
MUSE_FORGET   := $(DATA)/muse/news/raw_forget.jsonl
MUSE_RETAIN   := $(DATA)/muse/news/raw_retain1.jsonl
# $(call unlearn,METHOD,FORGET,RETAIN,TASKS,EXTRA FLAGS)
define unlearn
	@mkdir -p $(UNLEARN_RUN)
	@if [ "$(SELECT)" != "random" ]; then \
	  echo "+ coreset.py --method $(SELECT) --ratio $(RATIO) --seed $(SEED)"; \
	  $(PY) coreset.py --method $(SELECT) --model $(MODEL_DIR) --forget $(2) --ratio $(RATIO) --seed $(SEED) \
	    --out $(UNLEARN_RUN)/coreset.jsonl || exit $$?; fi
	$(PY) unlearn.py --method $(1) --model $(MODEL_DIR) --forget $(2) --retain $(3) \
	  $(if $(filter random,$(SELECT)),--ratio $(RATIO),--coreset $(UNLEARN_RUN)/coreset.jsonl) \
	  --seed $(SEED) $(STEPS_FLAG) --data $(DATA_DIR) --eval-tasks $(4) --out $(UNLEARN_RUN) $(5) $(UNLEARN_FLAGS)
endef

wmdp-rmu: $(STAMP)
	$(call unlearn,rmu,$(WMDP_FORGET),$(WMDP_RETAIN),$(WMDP_TASKS),)

wmdp-npo: $(STAMP)
	$(call unlearn,npo,$(WMDP_FORGET),$(WMDP_RETAIN),$(WMDP_TASKS),--npo-mean-tokens)

muse-npo: $(STAMP)
	@if [ -z "$(DATA)" ]; then echo "muse-npo: needs DATA=DIR holding muse/news (get it with make fetch DATA=DIR) and MODEL=the MUSE News target model; the embedded toy has no MUSE data (try make wmdp-npo)" >&2; exit 2; fi
	$(call unlearn,npo,$(MUSE_FORGET),$(MUSE_RETAIN),muse_news,--chunk-tokens 2048 --forget-max-len 2048 --retain-max-len 2048 --grad-accum 8)

bench-unlearn: $(STAMP)
	$(PY) unlearn.py --bench

# --- coreset sweep (coreset.py sweep: select, unlearn, evaluate per cell; table + plot; reruns skip finished cells)
#   make sweep METHOD=rmu SELECT=random RATIOS="0.01 0.05 0.1 0.2 1.0" SEEDS="0 1 2" [MODEL= DATA= STEPS=]
#     -> $(OUT)/sweep-<method>-<select>/results.{md,json,png}
#   make sweep-select METHOD=rmu RATIO=0.05 SELECTS="random loss zlib mink minkpp grand moderate" SEEDS="0 1 2"
#     -> $(OUT)/sweep-select-<method>-r<ratio>/results.{md,json,png}
# SWEEP_FLAGS adds coreset.py sweep flags (e.g. --docs docs/coreset_sweep, --keep-models, --select-args "...").
METHOD  ?= rmu
RATIOS  ?= 0.01 0.05 0.1 0.2 1.0
SEEDS   ?= 0 1 2
SELECTS ?= random loss zlib mink minkpp grand moderate
SWEEP_FLAGS ?=
SWEEP_UNLEARN = $(strip $(if $(filter npo,$(METHOD)),--npo-mean-tokens,) $(UNLEARN_FLAGS))
SWEEP_COMMON = --method $(METHOD) --model $(MODEL_DIR) --data $(DATA_DIR) --forget $(WMDP_FORGET) \
  --retain $(WMDP_RETAIN) --tasks $(WMDP_TASKS) --seeds "$(SEEDS)" $(STEPS_FLAG) \
  $(if $(SWEEP_UNLEARN),--unlearn-args "$(SWEEP_UNLEARN)",) $(SWEEP_FLAGS)

# the figure needs matplotlib (an optional dependency): installed on first use of a sweep target
PLOT_STAMP := .venv/.installed-plot
$(PLOT_STAMP): $(STAMP)
	$(PY) -m pip install -q --disable-pip-version-check -e ".[plot]"
	touch $@

sweep: $(PLOT_STAMP)
	$(PY) coreset.py sweep $(SWEEP_COMMON) --select $(SELECT) --ratios "$(RATIOS)" --out $(OUT)/sweep-$(METHOD)-$(SELECT)

sweep-select: $(PLOT_STAMP)
	$(PY) coreset.py sweep $(SWEEP_COMMON) --select "$(SELECTS)" --ratios $(RATIO) --out $(OUT)/sweep-select-$(METHOD)-r$(RATIO)
