# The two commands of the README. Each sets up .venv the first time (scripts/setup.sh).
VENV := .venv
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup quickstart test test-fast lint
setup:
	@bash scripts/setup.sh

quickstart: setup
	$(VENV)/bin/llm2clip quickstart

test: setup
	$(VENV)/bin/python -m pytest -q

test-fast: setup
	$(VENV)/bin/python -m pytest -q -m "not slow"

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks
