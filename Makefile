# The two commands: `make run` and `make test`. Both create .venv from the pinned lock
# file when it is missing or older than the lock (no dependency resolution at install).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.evit-installed
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DO_NOT_TRACK ?= 1
export MLFLOW_ENABLE_TELEMETRY ?= false

.PHONY: setup litert-env run test test-fast bench results lock clean

setup: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	set -o pipefail; $(PY) -m pip install --quiet --no-deps --disable-pip-version-check -r requirements.lock 2>&1 \
	  | { grep -v "^WARNING: Location" || true; }
	$(PY) -m pip install --quiet --no-deps --no-build-isolation --disable-pip-version-check -e .
	@touch $(STAMP)

# The LiteRT converter's own venv (.venv-litert from requirements-litert.lock). Optional:
# the first .tflite export creates it on demand (evit/formats/litert_env.py).
litert-env: setup
	$(PY) -c "from evit.formats.litert_env import ensure_env; print(ensure_env())"

run: setup
	$(VENV)/bin/evit pipeline

# Two pytest workers (pytest-xdist), one test file each at a time (module fixtures are built
# once): much of a test's time is servers starting and subprocesses waiting, so two files
# share two cores well. TEST_WORKERS=0 runs them in one process.
TEST_WORKERS ?= 2
test: setup
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile

test-fast: setup
	$(PY) -m pytest -m "not slow"

bench: setup
	$(PY) bench/run_all.py

# The evidence on real photos (../shared/data/flowers32; skipped when absent) -> docs/results.md.
results: setup
	$(PY) bench/photos.py $(RESULTS_ARGS)

# Refresh the lock: resolve requirements.in from scratch in a throw-away venv (about 8 min).
lock:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install --quiet -r requirements.in
	.venv-lock/bin/pip freeze --exclude-editable | grep -v '^evit' > requirements.lock
	rm -rf .venv-lock

clean:
	rm -rf $(VENV) .venv-litert
