# Two commands do all set-up on a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Offline, the demo takes the flower photos from ../shared/datasets when it exists.
MIRROR := $(if $(wildcard ../shared/datasets/flowers),$(abspath ../shared/datasets),)

.PHONY: demo test test-fast install browser

install: $(BIN)/headstart

$(BIN)/headstart: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test,serve,tflite,ray]'
	touch $@

# The report test opens report.html in Debian's headless Chromium.
browser:
	@command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
		|| echo "Could not install chromium: the browser test will be skipped."

demo: $(BIN)/headstart
	HEADSTART_DATA_MIRROR="$${HEADSTART_DATA_MIRROR:-$(MIRROR)}" $(BIN)/headstart demo

test: $(BIN)/headstart browser
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests
	$(BIN)/mypy
	$(BIN)/pytest

# The edit-test loop (3 min on 2 idle cores, the full suite about 13): every test but those marked slow (fine-tuning, reports,
# ONNX-vs-PyTorch checks, fuzzing), kill (kill -9, Ctrl-C), subprocess (CLI processes importing torch) and browser.
test-fast: $(BIN)/headstart
	$(BIN)/pytest -m "not slow and not kill and not subprocess and not browser"
