PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: venv demo test test-slow lint clean-venv

# The venv is (re)built whenever it is missing. PIP_CONSTRAINT reaches pip's isolated build
# environments too, which `-c` alone does not (see constraints.txt for why we need it).
$(BIN)/python: requirements.txt constraints.txt
	$(PY) -m venv $(VENV)
	PIP_CONSTRAINT=$(CURDIR)/constraints.txt $(BIN)/pip install -q -r requirements.txt -c constraints.txt
	touch $(BIN)/python

venv: $(BIN)/python
