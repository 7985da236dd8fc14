# Two commands: `make run` and `make test` (README, "Quick start").
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MANAGE := $(BIN)/python manage.py
# make run is a local demo: its settings come from .env (DEBUG=1 and a SECRET_KEY generated
# once, git-ignored, mode 0600), which the settings read for every manage.py command and
# process; variables set in the real environment win.
ENV_FILE := .env
METRICS_DIR := $(CURDIR)/var/metrics
PG_FLAGS := $(if $(filter true,$(CI)),--required,)

.PHONY: run test lint test-sqlite test-postgres test-rabbitmq test-cluster test-cluster-short bench bench-pop bench-tick bench-worker install install-bench migrate clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The benches' peers (procrastinate, pgqueuer): only `make bench-*` installs them.
BENCH_STAMP := $(VENV)/.installed-bench
$(BENCH_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	touch $(BENCH_STAMP)

install-bench: $(BENCH_STAMP)

# Order-only on the install: a reinstall must not replace the key (it would end every session).
$(ENV_FILE): | $(STAMP)
	$(BIN)/python -m scheduler_site.env $(ENV_FILE)

migrate: install $(ENV_FILE)
	mkdir -p var
	$(MANAGE) migrate --no-input
	$(MANAGE) create_api_user operator --role operator --operator-login --quiet-if-exists
	$(MANAGE) setup_periodic_tasks
	$(MANAGE) setup_demo

# Web, a Celery worker, beat (the clock) and a demo pull runner, on SQLite and the filesystem
# broker: no server to install.
run: migrate
	@echo "Web: http://127.0.0.1:8000/  (admin at /admin/, API at /api/, docs at /api/docs/)"
	@# -e /dev/null: the processes read .env through the settings, where the real environment
	@# wins; honcho's own loading of .env would put the file over it.
	@# Histograms are recorded where the work happens (web, each worker child, beat, runner):
	@# prometheus-client's multiprocess mode keeps them in files of one folder, which /metrics
	@# sums. The folder must start empty (files of an earlier run would be counted again);
	@# a PROMETHEUS_MULTIPROC_DIR of your own wins, and is yours to empty.
	rm -rf "$(METRICS_DIR)" && mkdir -p "$(METRICS_DIR)"
	PROMETHEUS_MULTIPROC_DIR="$${PROMETHEUS_MULTIPROC_DIR:-$(METRICS_DIR)}" \
	  PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/honcho start -e /dev/null -f Procfile

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

test-sqlite: install
	$(BIN)/pytest -q -p no:cacheprovider

test-postgres: install
	scripts/with-postgres.sh $(PG_FLAGS) --tuned -- \
	  scripts/with-redis.sh $(PG_FLAGS) -- $(BIN)/pytest -q -p no:cacheprovider

# The third leg: only the end-to-end worker tests, on PostgreSQL + RabbitMQ (the rest of the
# suite does not touch the broker, and runs in the two legs above).
test-rabbitmq: install
	scripts/with-postgres.sh $(PG_FLAGS) --tuned -- \
	  scripts/with-rabbitmq.sh $(PG_FLAGS) -- \
	  $(BIN)/pytest -q -p no:cacheprovider tests/e2e/test_worker.py tests/e2e/test_queues.py

# Three hosts in network namespaces (root): PostgreSQL + Redis on one, gunicorn, a worker, beat
# and a pull runner on each of two others; one app host is SIGKILLed whole while work is pushed.
# make test runs the short version (20 s of pushing), make test-cluster the longer one.
test-cluster: install
	CLUSTER_TEST_SECONDS=60 scripts/with-cluster.sh $(PG_FLAGS) -- \
	  $(BIN)/pytest -q -p no:cacheprovider -s tests/cluster

test-cluster-short: install
	CLUSTER_TEST_SECONDS=20 scripts/with-cluster.sh $(PG_FLAGS) -- \
	  $(BIN)/pytest -q -p no:cacheprovider -s tests/cluster

test: lint test-sqlite test-postgres test-rabbitmq test-cluster-short

bench: bench-pop bench-tick bench-worker

# Production database settings (no --tuned: fsync and synchronous_commit on). Sizes: see
# `python -m bench.pop_bench --help` (BENCH_TASKS, BENCH_ROUNDS, ... in the environment).
bench-pop: install-bench
	scripts/with-postgres.sh --required -- $(BIN)/python -m bench.pop_bench

bench-tick: install-bench
	scripts/with-postgres.sh --required -- $(BIN)/python -m bench.tick_bench

bench-worker: install-bench
	scripts/with-postgres.sh --required -- \
	  scripts/with-redis.sh --required -- $(BIN)/python -m bench.worker_bench

clean:
	rm -rf $(VENV) var
