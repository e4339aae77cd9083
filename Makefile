# Quick start: `make notebook` (set up, open the tutorial) and `make test` (set up, run every test).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TINY ?= .tiny
NOTEBOOK := blip-diffusion-subject-generation.ipynb

.PHONY: install install-test notebook test test-unit test-notebook

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

install: $(BIN)/python
	$(BIN)/pip install -r requirements.txt jupyterlab

install-test: $(BIN)/python
	$(BIN)/pip install -r requirements-test.txt

notebook: install
	$(BIN)/jupyter lab $(NOTEBOOK)

test: install-test
	$(MAKE) test-unit test-notebook

test-unit:
	$(BIN)/python -m pytest

# Runs every cell of the notebook on tiny random pipelines (no hub): nbval-lax checks that each cell
# executes without error; the committed notebook has no outputs to compare against.
test-notebook:
	$(BIN)/python tests/pipeline_builder.py $(TINY) tiny
	rm -rf $(TINY)/ir
	BLIP_DIFFUSION_MODEL=$(TINY)/blipdiffusion BLIP_DIFFUSION_CONTROLNET_MODEL=$(TINY)/blipdiffusion-controlnet \
	BLIP_DIFFUSION_IR_DIR=$(TINY)/ir \
	$(BIN)/python -m pytest --nbval-lax --nbval-current-env --nbval-cell-timeout=900 $(NOTEBOOK)
