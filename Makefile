# Quick start: `make notebook` (set up, open the tutorial) and `make test` (set up, run every test).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TINY ?= .tiny
NOTEBOOK := blip-diffusion-subject-generation.ipynb

.PHONY: install install-test notebook test test-core test-notebook

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

install: $(BIN)/python
	$(BIN)/pip install -r requirements.txt jupyterlab

install-test: $(BIN)/python
	$(BIN)/pip install -r requirements-test.txt

notebook: install
	$(BIN)/jupyter lab $(NOTEBOOK)

test: install-test
	$(BIN)/python -m pytest
