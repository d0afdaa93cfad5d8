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

# `bench mst`'s peers, Liger-Kernel and Cut Cross-Entropy (import names liger_kernel,
# cut_cross_entropy), installed when they do not import; from ./wheels as well when that
# folder exists (a GPU machine without a network). --no-deps: all they need is torch and
# triton, which a CUDA build of torch brings, and pip must not swap that torch. When the
# install fails, bench-gpu goes on and bench mst reports the peers unavailable.
PEERS := liger-kernel cut-cross-entropy
PEERS_FROM := $(if $(wildcard wheels),--find-links wheels)

# one CUDA device, in the 540 s of `bench gpu`'s default --budget: cuda tests, the fixed
# cost per step, 1.3B SUBLLM/LLaMA training (batch 1 and the largest batch) and inference,
# MsT vs the peers, the planner. The one bench command that writes into the repository (every other writes to
# ./bench-out/).
bench-gpu: $(VENV)/.installed-test
	@$(BIN)/python -c "import liger_kernel, cut_cross_entropy" 2>/dev/null \
		|| { $(BIN)/pip install -q --no-deps --retries 1 --timeout 10 $(PEERS_FROM) $(PEERS) \
			2>/dev/null && echo "bench-gpu: installed $(PEERS)"; } \
		|| echo "bench-gpu: could not install $(PEERS) (no network? put their wheels in" \
			"./wheels); bench mst will report them unavailable"
	$(BIN)/subllm bench gpu --out docs/benchmarks/gpu

lint: $(VENV)/.installed-test
	$(BIN)/ruff check src tests

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
