# The two commands of the README, and their parts. Everything installs into ./.venv.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.splitserve-installed

.PHONY: run test test-fast setup clean

## run: set up, then run the main job: a local Ray cluster (1 prefill + 1 decode worker) on the
## embedded SmolLM2-135M, a few chat requests streamed through the gRPC API with their timings
run: setup
	$(BIN)/splitserve demo --max-tokens 48

## test: set up, then run the whole test suite (slow end-to-end tests included)
test: setup
	$(BIN)/python -m pytest -q

## test-fast: unit tests only
test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch CPU build first (a local file on the project's machines), so the extras do not pull a CUDA build
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[cluster,test]"
	touch $(STAMP)

clean:
	rm -rf $(VENV) build *.egg-info
