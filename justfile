# Keel developer recipes. Each one brings the virtual environment up to date first (uv).
set shell := ["bash", "-euo", "pipefail", "-c"]

export UV_NO_PROGRESS := "1"

# List recipes
default:
    @just --list

# Create or refresh .venv with the app and dev tools
_sync:
    @command -v uv >/dev/null || python3 -m pip install --quiet uv
    @uv sync --quiet

# Serve the API (embedded default: SQLite + in-process adapters; docs at /docs)
serve *ARGS: _sync
    uv run --no-sync keel serve {{ARGS}}

# Apply migrations (or: just migrate current | history | check | downgrade REV | revision -m MSG)
migrate *ARGS: _sync
    uv run --no-sync keel migrate {{ARGS}}

# Lint, type-check, architecture contracts, then the whole test suite (up to 4 processes, each with its own servers)
test *ARGS: lint
    uv run --no-sync pytest --numprocesses auto --maxprocesses 4 {{ARGS}}

# ruff (lint + format check), mypy (strict), import-linter contracts, hadolint, yamllint, compose.yaml schema
lint: _sync
    uv run --no-sync ruff check src tests migrations
    uv run --no-sync ruff format --check src tests migrations
    uv run --no-sync mypy
    uv run --no-sync lint-imports
    uv run --no-sync hadolint docker/Dockerfile
    uv run --no-sync yamllint --strict -c docker/yamllint.yaml docker
    uv run --no-sync check-jsonschema --builtin-schema vendor.compose-spec docker/compose.yaml

# Format and auto-fix
fmt: _sync
    uv run --no-sync ruff format src tests migrations
    uv run --no-sync ruff check --fix src tests migrations

# Run an RQ worker with the scheduler (needs KEEL_REDIS_URL; e.g. just worker --queues high --burst)
worker *ARGS: _sync
    uv run --no-sync keel worker {{ARGS}}

# Enqueue periodic jobs on schedule (needs KEEL_REDIS_URL; run one per deployment)
cron *ARGS: _sync
    uv run --no-sync keel cron {{ARGS}}

# Benchmarks (figures, never pass/fail): HTTP load against the framework ceiling, job platform, analytics summary
bench: _sync _wrk
    uv run --no-sync python -m tests.benchmarks.load
    uv run --no-sync python -m tests.benchmarks.jobs
    uv run --no-sync python -m tests.benchmarks.analytics

# One benchmark with its own options, e.g. just bench-one load --runs 1 --soak 300
bench-one NAME *ARGS: _sync _wrk
    uv run --no-sync python -m tests.benchmarks.{{NAME}} {{ARGS}}

# The load generator (Debian's wrk) when it is missing
_wrk:
    @command -v wrk >/dev/null || { if [ "$(id -u)" = 0 ]; then apt-get install -y -qq wrk; else sudo apt-get install -y -qq wrk; fi; }

# Production topology on this machine (throwaway Postgres and Redis, keel migrate, 2 APIs, 2 forking workers, cron) proving no stale reads, shared rate limits, job spread, a killed worker and health; then runs until Ctrl-C (--check: proofs only; --seconds N)
cluster *ARGS: _sync
    uv run --no-sync python -m tests.cluster {{ARGS}}

# Fault injection and schema fuzzing at depth: 500 generated requests per documented operation (KEEL_FUZZ_EXAMPLES overrides)
chaos *ARGS: _sync
    KEEL_FUZZ_EXAMPLES="${KEEL_FUZZ_EXAMPLES:-500}" uv run --no-sync pytest tests/integration/test_fuzz_openapi.py tests/integration/test_faults.py -p no:randomly {{ARGS}}

# Soak: 10 minutes of paced mixed load against the production topology (throwaway Postgres and Redis, 2 API workers, 2 forking workers, cron, a webhook receiver); PASS/FAIL per promise, exit 1 on any failure (e.g. just soak --minutes 1, --simple)
soak *ARGS: _sync _wrk
    uv run --no-sync python -m tests.benchmarks.soak {{ARGS}}
