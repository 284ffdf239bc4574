# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

export MLFLOW_DISABLE_TELEMETRY := true
export PYTHONUNBUFFERED := 1

.PHONY: install demo test test-fast lint clean-generated

$(PY):
	$(PYTHON) -m venv $(VENV)

# Reinstall only when requirements.txt changed: a second `make` is fast. pip compiles the bytecode of what it
# installs on one core (about 70 CPU-s for torch, MLflow and the rest); compileall does it on every core. A file
# that is not Python 3 (a template or test data that some packages ship) fails there and is skipped, as pip skips it.
$(STAMP): requirements.txt | $(PY)
	$(PY) -m pip install -q --no-compile -r requirements.txt
	$(PY) -m compileall -q -j 0 $(VENV)/lib > /dev/null || true
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) -m research demo

lint: install
	$(VENV)/bin/ruff check .

# Two pytest workers (pytest-xdist), one per core: most tests wait on one thread (a step at 32 px, a subprocess's
# imports, a server). A module's tests stay on one worker (its module fixtures are built once); the session's
# dataset version and trained runs are built once for both (tests/conftest.py: built_once). Modules start in the
# order tests/conftest.py gives (the longest first), not xdist's (the most tests first).
XDIST := -n 2 --dist loadscope --no-loadscope-reorder

test: install lint
	$(PY) -m pytest -q $(XDIST)

# The default suite skips nothing it can run here; `slow` marks every test that takes seconds (training, studies,
# processes, servers), so test-fast is the rest.
test-fast: install
	$(PY) -m pytest -q $(XDIST) -m "not slow"

clean-generated:
	rm -rf data/raw data/clean data/versions data/cache reports mlruns/mlflow.db mlruns/artifacts mlruns/*.journal
