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

.PHONY: help venv protos test demo simulate bench bench-rounds clean

help:
	@echo "make demo      a real federation: the aggregator + 3 hospital nodes + the held-out one as processes on loopback"
	@echo "make protos    regenerate shared/proto/ from protos/ (grpcio-tools)"
	@echo "make bench-rounds  per-round time over gRPC vs in-process, bytes per round by codec (bench/results/rounds.md)"
	@echo "make test      run the whole test suite"
	@echo "make simulate  in-process federation, options via ARGS=\"...\" (see python -m shared.simulation --help)"
	@echo "make bench     every method, ablation and codec on the full set, 3 seeds (long; not part of test)"

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

venv: $(STAMP)

protos: $(STAMP)
	$(PY) -m shared.protogen

test: $(STAMP)
	$(PY) -m pytest -q tests

# the services as separate processes (Ctrl-C stops them all); DEMO_ARGS="--per-class 100" for a quick one
DEMO_ARGS ?=
demo: $(STAMP) protos
	$(PY) -m deploy.local_federation --rounds $(DEMO_ROUNDS) --out runs/demo $(DEMO_ARGS)

simulate: $(STAMP)
	$(PY) -m shared.simulation $(ARGS)

bench: $(STAMP)
	$(PY) -m bench.run_bench $(ARGS)

bench-rounds: $(STAMP) protos
	$(PY) -m bench.rounds $(ARGS)

clean:
	rm -rf runs .pytest_cache
