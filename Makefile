# Every target uses the virtual environment at .venv and installs into it when needed.
# `make install` is idempotent: it re-runs pip only when a pyproject.toml changed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mmedrag-installed
ARTIFACTS ?= artifacts

.PHONY: install test lint format up up-tiny clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml clients/python/pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev,minilm]' -e clients/python
	@touch $(STAMP)

test: install
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# Trained artifacts from nothing on first use (`mmedrag bootstrap`, resumable), then the stack.
up: install
	@grep -qs '"kind": "trained"' $(ARTIFACTS)/manifest.json || $(VENV)/bin/mmedrag bootstrap --out $(ARTIFACTS)
	$(VENV)/bin/mmedrag up --artifacts $(ARTIFACTS)

# The same stack on tiny random-weight models, built in seconds (answers are meaningless).
up-tiny: install
	@test -f $(ARTIFACTS)-tiny/manifest.json || $(VENV)/bin/mmedrag artifacts tiny --out $(ARTIFACTS)-tiny
	$(VENV)/bin/mmedrag up --artifacts $(ARTIFACTS)-tiny

clean-venv:
	rm -rf $(VENV)
