# Two entry points, each sets up its own environment first (idempotent):
#   make search   run `vitrank search` on the embedded digits workload
#   make test     run the test suite (make test-all: the slow tests too)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.vitrank-installed
ARGS ?=
PYTEST_ARGS ?=

.PHONY: search test test-all setup lint

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -e '.[dev]'
	@touch $(STAMP)

search: $(STAMP)
	$(VENV)/bin/vitrank search $(ARGS)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# every test, the `slow` ones too (what CI runs)
test-all: $(STAMP)
	$(PY) -m pytest -m "slow or not slow" $(PYTEST_ARGS)

# mypy cannot read the build's package-dir map: it checks a tree of links laid out as the
# installed namespace (vitrank/, vitrank/core -> core/, ...).
TYPECHECK := build/typecheck
lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
	rm -rf $(TYPECHECK) && mkdir -p $(TYPECHECK)/vitrank
	for f in vitrank/*; do ln -s ../../../$$f $(TYPECHECK)/vitrank/; done
	for p in core workloads spaces evaluators search reports; do ln -s ../../../$$p $(TYPECHECK)/vitrank/$$p; done
	cd $(TYPECHECK) && ../../$(VENV)/bin/mypy --config-file ../../pyproject.toml -p vitrank
