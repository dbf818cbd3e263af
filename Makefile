# Two commands on a fresh machine: `make demo` and `make test`. Both run `setup` first, which is idempotent.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch; any other pin pulls a multi-GB CUDA build on machines without GPUs.
TORCH_PIN ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup system demo test clean-cluster lint

setup: system $(VENV)/.installed

system:
	@bash scripts/setup-system.sh

$(VENV)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_PIN)"
	$(BIN)/pip install -q -e ".[test]"
	@touch $@

demo: setup
	$(BIN)/python -m hpc.demo

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean-cluster:
	-$(BIN)/hpc localcluster down
