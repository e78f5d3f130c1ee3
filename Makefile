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

bench-eval: $(STAMP)
	$(PY) evaluate.py --bench --model $(MODEL_DIR) --data $(DATA_DIR)
