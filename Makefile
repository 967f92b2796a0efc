# One-command entry points. `make run` and `make test` each set everything up on a fresh machine first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup run test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU build of torch first, so the dependency resolution below does not pull a CUDA build.
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

run: setup
	$(PY) train/run.py

# --durations=15: every run lists its 15 slowest tests, so the cost of the suite stays visible
test: setup
	$(PY) -m pytest -q --durations=15

clean:
	rm -rf $(VENV) outputs multirun
