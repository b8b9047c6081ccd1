# The README's two commands: `make demo` (the main job) and `make test` (the whole suite).
# Both create the virtual environment and install the project when it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_START := $(shell date +%s)

.PHONY: demo demo-local stack-down tools test test-faults test-learning test-multinode test-fast lint bench-step bench-learning clean-demo

# --no-compile: pip would byte-compile every file of torch, ray and mlflow (~55 s of a ~2 min
# install on 2 cores); Python compiles what is imported, once, on first use.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install --no-compile -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# checkov (tests/infra) pins dependencies older than the project's (boto3, packaging, ...), so
# it gets an environment of its own, inside the project's and removed with it.
TOOLS := $(VENV)/tools
TOOLS_STAMP := $(TOOLS)/.installed
CHECKOV := checkov>=3.2,<4

$(TOOLS_STAMP): | $(STAMP)
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/python -m pip install --quiet --no-compile '$(CHECKOV)'
	touch $(TOOLS_STAMP)

tools: $(TOOLS_STAMP)

# Main job: local stack (S3, MLflow, Ray head on loopback), generated data set prepared
# into the bucket, stand-in pretrained backbone (made once, reused), `ray job submit` of
# the distributed training job, model registered in MLflow. See infra/demo.sh.
# DEMO_START is taken when make starts, before the install: the demo's closing line counts it.
demo: $(STAMP)
	WSDAN_DEMO_START=$(DEMO_START) PY=$(PY) bash infra/demo.sh

# The same training in one process, no services.
demo-local: $(STAMP)
	$(PY) -m jobs.pretrain
	$(PY) -m jobs.train_local --config jobs/configs/synthetic_cpu.yaml

stack-down: $(STAMP)
	$(VENV)/bin/wsdan stack down

# Whole suite, slow and real-service tests included; the multi-node tests run in a
# second session inside a private network namespace (only loopback), where several Ray
# nodes can join one cluster without binding the machine's interfaces.
test: $(STAMP) $(TOOLS_STAMP)
	$(PY) -m pytest -q --timeout=900 --durations=15 -m "not multinode and not faults and not learning"
	PYTHON=$(PY) tests/multinode/netns.sh $(PY) -m pytest -q --timeout=900 -m multinode tests/multinode

# Jobs through real faults (S3 killed for 10 s and MLflow stopped during a job; a training
# worker killed; a job's and a sweep's driver killed, then rerun), and the learning check:
# minutes each on 2 cores, so not part of make test (CI's 30 minutes).
test-faults: $(STAMP)
	$(PY) -m pytest -q --timeout=1200 -m faults

test-learning: $(STAMP)
	$(PY) -m pytest -q --timeout=1200 -m learning

test-multinode: $(STAMP)
	PYTHON=$(PY) tests/multinode/netns.sh $(PY) -m pytest -q --timeout=900 -m multinode tests/multinode

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench-step: $(STAMP)
	$(PY) -m jobs.bench_step

bench-learning: $(STAMP)
	$(PY) -m jobs.bench_learning

clean-demo:
	rm -rf .wsdan
