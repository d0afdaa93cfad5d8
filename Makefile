# Quickstart targets. `make demo` and `make test` each set up everything they need.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test lint clean bench-gpu

# A virtual environment that still sees a system-wide torch (a user's CUDA build);
# when no torch is visible at all we install the pinned CPU build, never a bare `torch`
# (which would pull gigabytes of CUDA packages).
$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[test]"
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/subllm train

test: setup
	$(BIN)/python -m pytest tests

# one CUDA device: cuda tests, 1.3B SUBLLM/LLaMA, MsT vs peers, the planner (docs/benchmarks/gpu)
bench-gpu: setup
	$(BIN)/subllm bench gpu --out docs/benchmarks/gpu

lint: setup
	$(BIN)/ruff check src tests

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
