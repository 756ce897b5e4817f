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

.PHONY: help venv system-deps protos lint format test test-fast demo simulate bench bench-layouts bench-protocol bench-training bench-rounds bench-encode bench-load bench-hostile bench-privacy bench-secagg bench-secagg-accuracy provision deploy-check clean

help:
	@echo "make demo      a real federation: the aggregator + 3 hospital nodes + the held-out one as processes on loopback"
	@echo "make testbed   the federation in containers (Docker engine, registry-free images); make testbed-down"
	@echo "make testbed-check the container testbed's end-to-end test alone (part of make test; root)"
	@echo "make protos    regenerate shared/wire/proto/ from protos/ (grpcio-tools)"
	@echo "make bench-encode  encoding speed: decode, preprocessing, forward apart; PyTorch vs ONNX Runtime (bench/results/encode.md)"
	@echo "make bench-rounds  per-round time over gRPC vs in-process, bytes per round by codec (bench/results/rounds.md)"
	@echo "make test      run the whole test suite (lint first)"
	@echo "make test-fast the unit tests alone (under a minute)"
	@echo "make lint      ruff check + ruff format --check"
	@echo "make provision certificates and configs for a federation: NODES=hospital_1,hospital_2 PKI=pki"
	@echo "make bench-training a round of 4 hospitals and the protocol's accuracy, before and after (bench/results/training.md)"
	@echo "make bench-protocol the full protocol from cold (no feature cache) to the report, timed (bench/results/protocol.md)"
	@echo "make bench-load    one aggregator against 10, 50, 200, 500, 1000 light nodes, aggregator and nodes on separate cores (bench/results/load.md)"
	@echo "make bench-hostile the hostile-input suite, its tally in bench/results/hostile.md"
	@echo "make bench-privacy the accuracy price of differential privacy, epsilon 1/3/8/inf, 3 seeds (bench/results/privacy.md)"
	@echo "make bench-secagg  what secure aggregation costs vs plain: 4, 20, 100 light nodes, time, bytes, RPCs (bench/results/secagg.md)"
	@echo "make bench-secagg-accuracy the protocol with and without secure aggregation, 3 seeds (bench/results/secagg_accuracy.md)"
	@echo "make simulate  in-process federation, options via ARGS=\"...\" (see fedmedclip simulate --help)"
	@echo "make deploy-check  the deployment checks alone: compose, promtool, Kubernetes schemas, a live Prometheus"
	@echo "make bench     every method, ablation and codec on the full set, 3 seeds (long; not part of test)"
	@echo "make bench-layouts Dirichlet and natural sites: imbalance handling, the two contrastive terms (long)"

# the pinned dependencies, then the project itself (editable: the `fedmedclip` command runs this checkout)
$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $@

venv: $(STAMP)

protos: $(STAMP)
	$(PY) -m shared.wire.protogen

# promtool, prometheus and docker-compose for the deployment checks (Debian packages; installed if missing)
system-deps:
	bash deploy/install-system-deps.sh

test: $(STAMP) system-deps lint
	$(PY) -m pytest -q tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -m unit tests

# the services as separate processes (Ctrl-C stops them all); DEMO_ARGS="--per-class 100" for a quick one
DEMO_ARGS ?=
demo: $(STAMP) protos
	$(PY) -m deploy.local_federation --rounds $(DEMO_ROUNDS) --out runs/demo $(DEMO_ARGS)

simulate: $(STAMP)
	$(VENV)/bin/fedmedclip simulate $(ARGS)

bench: $(STAMP)
	$(PY) -m bench.run_bench $(ARGS)

bench-layouts: $(STAMP)
	$(PY) -m bench.layouts $(ARGS)

bench-rounds: $(STAMP) protos
	$(PY) -m bench.rounds $(ARGS)

# encoding speed (issue 13): stages apart, forward-only vs end to end, runtimes' cosines on the whole set
bench-encode: $(STAMP)
	$(PY) -m bench.encode $(ARGS)

# local training before and after (a git revision in a temporary worktree): bench/results/training.md
bench-training: $(STAMP)
	$(PY) -m bench.training $(ARGS)

# the full protocol under differential privacy at epsilon 1, 3, 8 and without: bench/results/privacy.md (long)
bench-privacy: $(STAMP)
	$(PY) -m bench.privacy $(ARGS)

# secure aggregation against the plain mode, 4 / 20 / 100 light nodes on loopback: bench/results/secagg.md
bench-secagg: $(STAMP)
	$(PY) -m bench.secagg $(ARGS)

# the brain tumor protocol with and without secure aggregation, fp32 and int8, 3 seeds: bench/results/secagg_accuracy.md
bench-secagg-accuracy: $(STAMP)
	$(PY) -m bench.secagg_accuracy $(ARGS)

# the whole brain tumor protocol from cold (empty feature cache) to the report: bench/results/protocol.md
bench-protocol: $(STAMP)
	$(PY) -m bench.protocol $(ARGS)

bench-load: $(STAMP) protos
	$(PY) -m bench.load $(ARGS)

bench-hostile: $(STAMP)
	FEDMEDCLIP_HOSTILE_REPORT=bench/results/hostile.md $(PY) -m pytest -q tests/test_hostile_input.py

# mTLS for a federation: a CA, a certificate and key per party, ready configs (fedmedclip provision)
NODES ?= hospital_1,hospital_2,hospital_3,global
PKI ?= pki
provision: $(STAMP)
	$(VENV)/bin/fedmedclip provision --nodes $(NODES) --out $(PKI)

# the deployment checks alone (part of make test too); .ci/run installs promtool, prometheus, docker-compose
deploy-check: $(STAMP) system-deps
	$(PY) -m pytest -q tests/test_deploy.py tests/test_deploy_prometheus.py

clean:
	rm -rf runs .pytest_cache

# ---- the compose testbed on this project's own Docker engine (deploy/engine; README, "The testbed"). Root only.
# make testbed TESTBED_ARGS="--per-class 50"   a quick run; TESTBED_ARGS="--rounds 10 --data DIR" as well
TESTBED_ARGS ?=
.PHONY: testbed-engine testbed-engine-down testbed testbed-down testbed-check

testbed-engine:
	$(PYTHON) -m deploy.engine up

testbed-engine-down:
	$(PYTHON) -m deploy.engine down

# engine up if needed, images (cached), docker-compose up, the round table live until the run ends
testbed: $(STAMP)
	$(PY) -m deploy.engine testbed $(TESTBED_ARGS)

testbed-down:
	$(PYTHON) -m deploy.engine testbed-down

# the testbed test alone (make test runs it too)
testbed-check: $(STAMP) system-deps
	$(PY) -m pytest -q -s --durations=0 tests/test_testbed.py
