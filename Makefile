# `make run`: install, then a first run: a demo SQLite file of its own synced twice against the sandbox.
# `make test`: install, lint (ruff, the import layers), type-check, smoke-run the benchmark and run the tests (Postgres at 127.0.0.1:5432, MariaDB at :3306).
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/audience-sync: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test]"
	touch $@

.PHONY: run test
run: $(BIN)/audience-sync
	$(BIN)/audience-sync demo

test: $(BIN)/audience-sync
	$(BIN)/ruff check sync tests migrations benchmarks
	$(BIN)/ruff format --check sync tests migrations benchmarks
	$(BIN)/mypy
	$(BIN)/lint-imports  # the layers of docs/architecture.md
	$(BIN)/python benchmarks/bench.py --smoke --backends sqlite  # only checks that it completes
	$(BIN)/python -m pytest -n 4 --dist worksteal  # tests wait on processes and sockets: more workers than cores

# `make lock`: deploy/requirements.lock, the image's dependencies with their hashes, resolved again from pyproject.toml
.PHONY: lock
lock: $(BIN)/audience-sync
	$(BIN)/pip install -q pip-tools
	$(BIN)/pip-compile --quiet --generate-hashes --strip-extras --no-emit-index-url --no-emit-find-links \
		--output-file deploy/requirements.lock pyproject.toml
