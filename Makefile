# Each target sets up its own environment on a fresh machine: a virtualenv in .venv with the CPU build of
# torch 2.13.0 and peft-quant with all extras, under .ci/constraints.txt (pins of development and CI, not of
# the package).
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench

$(STAMP): pyproject.toml .ci/constraints.txt
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -c .ci/constraints.txt torch
	$(VENV)/bin/pip install -q -c .ci/constraints.txt -e '.[bnb,gptq,hqq,torchao,compressed-tensors,diffusers,dev]'
	touch $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/python examples/qoft_minilm.py

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/python -m pytest -q -p no:cacheprovider

# ruff with pyproject.toml's [tool.ruff] settings; `$(VENV)/bin/ruff check --fix .` applies the safe fixes.
lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	for script in bench/*.py; do HF_HUB_OFFLINE=1 $(VENV)/bin/python $$script || exit 1; done
