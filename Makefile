# Two commands do all set-up on a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Offline, the demo takes the flower photos from ../shared/datasets when it exists.
MIRROR := $(if $(wildcard ../shared/datasets/flowers),$(abspath ../shared/datasets),)

.PHONY: demo test install

install: $(BIN)/headstart

$(BIN)/headstart: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

demo: $(BIN)/headstart
	HEADSTART_DATA_MIRROR="$${HEADSTART_DATA_MIRROR:-$(MIRROR)}" $(BIN)/headstart demo

test: $(BIN)/headstart
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests
	$(BIN)/mypy
	$(BIN)/pytest
