# Two entry points, each sets up its own environment first (idempotent):
#   make search   run `vitrank search` on the embedded digits workload
#   make test     run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.vitrank-installed
ARGS ?=
PYTEST_ARGS ?=

.PHONY: search test setup lint

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -e '.[dev]'
	@touch $(STAMP)

search: $(STAMP)
	$(VENV)/bin/vitrank search $(ARGS)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check . && $(VENV)/bin/mypy
