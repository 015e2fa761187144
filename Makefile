# The two commands of the README, and their parts. Everything installs into ./.venv.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.splitserve-installed

.PHONY: run test test-fast setup clean

## run: set up, then run the main job on the embedded default model (SmolLM2-135M, CPU)
run: setup
	$(BIN)/splitserve generate --chat --max-tokens 48 \
	  --prompt "What is the capital of France?" \
	  --prompt "Write a haiku about the sea." \
	  --prompt "Explain in one sentence what a KV cache is."

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
