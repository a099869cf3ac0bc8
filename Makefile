# Two commands do all the set-up on a fresh machine:
#   make run   - create .venv, install, make sure the data is there, run the whole pipeline
#   make test  - the same set-up, plus what the tests use (PostgreSQL, Chromium), then the test suite
#                (all that CI runs)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
MLFLOW_ARGS ?=
# `mlflow run` creates the run before our code starts, so it must be told the experiment
# (pipeline/names.py EXPERIMENT_NAME), unless MLFLOW_EXPERIMENT_NAME / MLFLOW_EXPERIMENT_ID name another
EXPERIMENT_ARGS := $(if $(MLFLOW_EXPERIMENT_NAME)$(MLFLOW_EXPERIMENT_ID),,--experiment-name fashion-mnist-softmax)
# MLproject commands call `python`: make it the one in .venv
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: run test test-fast lint data test-tools ui server serve bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# The data: found locally, else downloaded by torchvision, else (offline) Debian's package.
data: $(STAMP)
	@$(PY) -m pipeline locate-data || { \
	  echo "Installing Debian's $$($(PY) -c 'from pipeline.core.idx import DEBIAN_PACKAGE; print(DEBIAN_PACKAGE)')"; \
	  $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q dataset-fashion-mnist && \
	  $(PY) -m pipeline locate-data; }

# The store and experiment first, made by one command of ours under the store's lock: `mlflow run`
# creates a new store itself before our code runs, and several started at once on one collide.
run: data
	$(PY) -m pipeline create-store
	$(VENV)/bin/mlflow run . --env-manager local $(EXPERIMENT_ARGS) $(MLFLOW_ARGS)

# What the tests use beyond the data, from Debian's packages when missing: PostgreSQL's server (the tests
# start throwaway ones on loopback), Chromium and its driver (the test that opens the UI's links)
TEST_TOOLS := /usr/bin/chromium:chromium /usr/bin/chromedriver:chromium-driver
test-tools:
	@need=""; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need="postgresql"; \
	for tool in $(TEST_TOOLS); do [ -x "$${tool%%:*}" ] || need="$$need $${tool##*:}"; done; \
	if [ -n "$$need" ]; then \
	  echo "Installing Debian's $$need"; \
	  $(SUDO) apt-get update -q && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$need; \
	fi

# The suite in one process per core (pytest-xdist; at most 4: each holds torch and MLflow), a test file's
# tests kept together so that the fixtures it shares are made once
JOBS ?= $(shell n=$$(nproc); echo $$(( n < 4 ? n : 4 )))
PYTEST := $(PY) -m pytest -q -ra -n $(JOBS) --dist loadscope

test: data test-tools lint
	$(PYTEST)

# Style and errors (ruff), the layers of the package (import-linter), declared dependencies (deptry)
lint: $(STAMP)
	$(VENV)/bin/ruff check pipeline tests bench
	$(VENV)/bin/lint-imports
	$(VENV)/bin/deptry .

# A few minutes' check while working: no slow end-to-end test, and none that needs the real data
test-fast: $(STAMP)
	$(PYTEST) -m "not slow and not real_data"

# The MLflow UI on this machine's store (./mlflow.db) at http://127.0.0.1:$(PORT). Its start page opens an
# experiment on MLflow 3's GenAI overview: `ui-url` prints the link to the experiment's runs table instead.
HOST ?= 127.0.0.1
PORT ?= 5000
ui: $(STAMP)
	@$(PY) -m pipeline ui-url --port $(PORT)
	$(VENV)/bin/mlflow ui --port $(PORT)

# A tracking server for this machine: runs in ./mlflow.db, artifacts kept in ./mlartifacts and served
# over HTTP, so commands need only MLFLOW_TRACKING_URI=http://127.0.0.1:5000 (docs/several-machines.md).
# HOST=0.0.0.0 opens it to other machines; BACKEND_STORE=postgresql://... for a database server.
# The link to the runs comes from the server once it answers (`ui-url` beside it, through the server, so
# that an experiment it creates keeps its artifacts on the server); the server runs in the foreground.
BACKEND_STORE ?= sqlite:///mlflow.db
ARTIFACTS ?= ./mlartifacts
server: $(STAMP)
	@MLFLOW_TRACKING_URI=http://$(if $(filter 0.0.0.0,$(HOST)),127.0.0.1,$(HOST)):$(PORT) $(PY) -m pipeline ui-url --host $(HOST) --port $(PORT) --wait 120 &
	$(VENV)/bin/mlflow server --backend-store-uri $(BACKEND_STORE) --serve-artifacts \
	  --artifacts-destination $(ARTIFACTS) --host $(HOST) --port $(PORT) $(SERVER_ARGS)

# The champion over HTTP, with MLflow's scoring-server protocol (/ping, /invocations), on 127.0.0.1 and
# port 5001 (the command's defaults, pipeline/config.py ServeConfig). The model is checked and loaded by
# the project's own loader (pipeline/steps/serve.py), never by `mlflow models serve`.
# MODEL=models:/<name>/<version> serves another model, SERVE_PORT=... listens on another port.
MODEL ?= models:/fashion-mnist-softmax@champion
SERVE_PORT ?=
serve: $(STAMP)
	$(PY) -m pipeline serve --model-uri $(MODEL) $(if $(SERVE_PORT),--port $(SERVE_PORT))

# Training speed, tuning throughput and memory (bench/); results in bench/results/latest.json
bench: data
	$(PY) -m bench $(BENCH_ARGS)

clean:
	rm -rf mlruns mlartifacts mlflow.db optuna.db .pytest_cache
