# Every target uses the virtual environment at .venv and installs into it when needed.
# `make install` is idempotent: it re-runs pip only when a pyproject.toml changed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mmedrag-installed
ARTIFACTS ?= artifacts

.PHONY: install test lint format up clean-venv

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

up: install
	@test -f $(ARTIFACTS)/manifest.json || $(VENV)/bin/mmedrag artifacts tiny --out $(ARTIFACTS)
	$(VENV)/bin/mmedrag up --artifacts $(ARTIFACTS)

clean-venv:
	rm -rf $(VENV)
