# CRC-MedAI: `make demo` runs the main job, `make test` runs the whole test suite.
# Both create the virtual environment and provision the local stack on first use.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test test-unit stack-up stack-down stack-status lint schemas validate clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q -e '.[test]'
	touch $@

demo: setup
	$(BIN)/crc-medai demo

test: setup stack-up
	$(BIN)/python -m pytest -ra

test-unit: setup
	$(BIN)/python -m pytest -ra -m "not integration"

stack-up: setup
	$(BIN)/crc-medai stack up

stack-down: setup
	$(BIN)/crc-medai stack down

stack-status: setup
	$(BIN)/crc-medai stack status

lint: setup
	$(BIN)/ruff check .

validate: setup
	$(if $(FILE),,$(error usage: make validate FILE=path/to/resource.json))
	$(BIN)/crc-medai validate $(FILE)

schemas: setup
	$(BIN)/crc-medai schemas

clean:
	rm -rf $(VENV) out
