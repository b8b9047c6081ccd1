# The README's two commands: `make demo` (the main job) and `make test` (the whole suite).
# Both create the virtual environment and install the project when it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint bench-step bench-learning clean-demo

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# Main job (single process until the Ray job lands): generated data set, stand-in
# pretrained backbone (made once, reused), WS-DAN fine-tuning, test-split report.
demo: $(STAMP)
	$(PY) -m jobs.pretrain
	$(PY) -m jobs.train_local --config jobs/configs/synthetic_cpu.yaml

# Whole suite, slow and real-service tests included.
test: $(STAMP)
	$(PY) -m pytest -q --timeout=900

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
