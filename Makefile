# FedMedCLIP: every target sets up what it needs (a virtual environment in .venv).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

# Simulation knobs: make simulate ARGS="--method fedclip --rounds 10"
ARGS ?=
DEMO_ROUNDS ?= 30

.PHONY: help venv test demo simulate bench clean

help:
	@echo "make demo      run a federation of 4 hospitals + 1 held-out on the brain tumor MRI set"
	@echo "make test      run the whole test suite"
	@echo "make simulate  in-process federation, options via ARGS=\"...\" (see python -m shared.simulation --help)"
	@echo "make bench     every method, ablation and codec on the full set, 3 seeds (long; not part of test)"

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(PY) -m shared.simulation --rounds $(DEMO_ROUNDS) --out runs/demo $(ARGS)

simulate: $(STAMP)
	$(PY) -m shared.simulation $(ARGS)

bench: $(STAMP)
	$(PY) -m bench.run_bench $(ARGS)

clean:
	rm -rf runs .pytest_cache
