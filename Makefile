# The targets the README names. Each one sets up .venv from nothing when needed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
BENCH_STAMP := $(VENV)/.installed-bench-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: demo test lint typecheck unit integration e2e faults browser deploy-tools bench bench-compare clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "tasks-platform needs Python 3.11 or newer ($(PYTHON) is older)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	rm -f $(VENV)/.installed-*
	touch $@

## demo: run the main job (a worker and a mixed workload) on the configured broker
demo: $(STAMP)
	$(BIN)/tasks-platform demo

## test: lint, type-check and the whole test suite (unit, integration, e2e)
test: lint typecheck browser deploy-tools
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest tests/unit

integration: $(STAMP)
	$(BIN)/pytest tests/integration

## faults: the fault-injection suite (private servers crashed mid-run); prints the Reliability table
faults: $(STAMP)
	$(BIN)/python tests/faults/report.py --clear
	$(BIN)/pytest tests/faults; status=$$?; $(BIN)/python tests/faults/report.py; exit $$status

e2e: $(STAMP) browser
	$(BIN)/pytest tests/e2e

## bench: what recording the history costs, tenant fairness, the outbox vs delay() (needs Redis,
## RabbitMQ and PostgreSQL); prints tables, writes JSON
bench: $(STAMP)
	$(BIN)/python bench/history_overhead.py --json bench/results/history.json
	$(BIN)/python bench/fairness.py --workers 1 --concurrency 2 --json bench/results/fairness.json
	$(BIN)/python bench/outbox_latency.py --json bench/results/outbox.json

## bench-compare: the platform side by side with bare Celery, Dramatiq and RQ (needs Redis,
## RabbitMQ and PostgreSQL; installs the `bench` extra); prints a table, writes JSON
bench-compare: $(BENCH_STAMP)
	$(BIN)/python bench/compare.py --json bench/results/compare.json $(BENCH_ARGS)

$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[dev,bench]"
	touch $@

## browser: Debian's chromium and chromium-driver, which the dashboard test drives headless
browser:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then \
		exit 0; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing Debian's chromium and chromium-driver for the dashboard test"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
			apt-get install -y -qq --no-install-recommends chromium chromium-driver; \
	else \
		case "$${CI:-}" in \
		""|0|false|no) echo "note: no chromium/chromium-driver and no root apt-get to install" \
			"them: the dashboard test will be skipped";; \
		*) echo "the dashboard test needs Debian's chromium and chromium-driver:" \
			"run 'apt-get install chromium chromium-driver' as root"; exit 1;; \
		esac; \
	fi

## deploy-tools: Debian's docker-compose and systemd-analyze, which validate deploy/
deploy-tools:
	@if command -v docker-compose >/dev/null && command -v systemd-analyze >/dev/null; then \
		exit 0; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing Debian's docker-compose and systemd to validate deploy/"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
			apt-get install -y -qq --no-install-recommends docker-compose systemd; \
	else \
		case "$${CI:-}" in \
		""|0|false|no) echo "note: no docker-compose/systemd-analyze and no root apt-get to" \
			"install them: those deploy/ checks will be skipped";; \
		*) echo "the deploy/ checks need Debian's docker-compose and systemd:" \
			"run 'apt-get install docker-compose systemd' as root"; exit 1;; \
		esac; \
	fi

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
