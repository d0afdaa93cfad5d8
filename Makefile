# Quickstart targets. `make demo` and `make test` each set up everything they need.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test lint clean bench-gpu

# The virtual environment sees a system-wide torch (e.g. a CUDA build you installed). When
# none is visible, torch==2.13.0 is installed by name: pip takes the build its indexes offer
# for this platform (on this project's machines a CPU build on local disk; from PyPI on Linux
# x86-64, a CUDA build of several GB). For a CPU-only build elsewhere, install it first:
#   pip install torch --index-url https://download.pytorch.org/whl/cpu
$(BIN)/python:
	$(PYTHON) -m venv --system-site-packages $(VENV)

# what `subllm` needs to run (the demo)
$(VENV)/.installed-run: pyproject.toml | $(BIN)/python
	@echo "setup: installing torch (unless one is visible) and subllm with its dependencies into $(VENV)"
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e .
	touch $@

# and what the tests need: pytest, ruff, and peft, lm-eval, accelerate for the HF tests
$(VENV)/.installed-test: $(VENV)/.installed-run
	@echo "setup: installing the test extras (pytest, ruff, peft, lm-eval, accelerate) into $(VENV)"
	$(BIN)/pip install -q -e ".[test]"
	touch $@

setup: $(VENV)/.installed-test

demo: $(VENV)/.installed-run
	$(BIN)/subllm train

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest tests

# one CUDA device: cuda tests, 1.3B SUBLLM/LLaMA, MsT vs peers, the planner. The one bench
# command that writes into the repository (every other writes to ./bench-out/).
bench-gpu: $(VENV)/.installed-test
	$(BIN)/subllm bench gpu --out docs/benchmarks/gpu

lint: $(VENV)/.installed-test
	$(BIN)/ruff check src tests

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
