# tracker-core build and test entry points. `make test` is what CI runs (via .ci/run).

PYTHON      ?= python3
VENV        ?= .venv
VPY         := $(VENV)/bin/python
CONSTRAINTS := requirements/constraints.txt
STAMP       := $(VENV)/.installed

# Backends are separate distributions; install only those that already have a pyproject.toml.
BACKEND_PROJECTS := $(wildcard backends/*/pyproject.toml)
BACKEND_DIRS     := $(patsubst %/pyproject.toml,%,$(BACKEND_PROJECTS))
EDITABLES        := -e . $(foreach d,$(BACKEND_DIRS),-e $(d))
TYPED_SOURCES    := tracker_core $(wildcard backends) chaos benchmarks

PIP_INSTALL := PIP_DISABLE_PIP_VERSION_CHECK=1 $(VPY) -m pip install --no-input -c $(CONSTRAINTS)

# The test command; README quotes it. Extra pytest options: make test PYTEST_ARGS="-k s3 -x".
# Three test processes (pytest-xdist) on two cores: most tests wait on a server, a subprocess or
# a lease, so two processes left the cores idle a third of the time (measured: 711 s of pytest
# with 2, 640 s with 3, same code; on 2026-12-04, 678 s with 4 and 591 s with 3, same code: a
# fourth process costs more CPU than it fills). Modules whose tests share module-scoped servers
# stay in one process (tests/conftest.py). TEST_PROCESSES=0 runs everything in this process.
# `make test` runs the store contracts on every store and the behaviour on two legs
# (tests/conftest.py); `make test-all` runs the behaviour on all six legs of the matrix.
PYTEST_ARGS    ?=
TEST_PROCESSES ?= 3
PYTEST         := -m pytest tests/ --timeout=900 -n $(TEST_PROCESSES) --dist loadgroup $(PYTEST_ARGS)
TEST_CMD       := $(VPY) $(PYTEST)

# Branch coverage of tracker_core and of the backends over `make test` (subprocesses and
# worker processes included; settings in pyproject.toml), one figure each; README quotes them.
# `combine` merges and removes every readable data file; what is left was cut short (a process
# a test killed mid-write; coverage warns and skips it) and is removed so the reports stay quiet.
COVERAGE     := $(VENV)/bin/coverage
COVERAGE_DIR := .coverage-data

.PHONY: venv test test-all coverage lint format demo clean chaos

venv: $(STAMP)

# The stamp holds the list of editables it installed: a backend added since forces a re-install,
# as does any newer pyproject/requirements file. It is dated from the *start* of the install, so a
# file edited while pip runs is picked up next time.
ifneq ($(shell cat $(STAMP) 2>/dev/null),$(strip $(EDITABLES)))
.PHONY: $(STAMP)
endif

$(STAMP): pyproject.toml $(BACKEND_PROJECTS) $(wildcard requirements/*.txt)
	@test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	@echo '$(strip $(EDITABLES))' > $@.new
	$(PIP_INSTALL) $(EDITABLES) -r requirements/dev.txt
	@mv $@.new $@

test: venv
	$(TEST_CMD)

test-all: venv
	$(TEST_CMD) --all-legs

coverage: venv
	rm -rf $(COVERAGE_DIR) && mkdir -p $(COVERAGE_DIR)
	$(COVERAGE) run $(PYTEST) || status=$$?; \
	$(COVERAGE) combine -q && rm -f $(COVERAGE_DIR)/coverage.* && \
	echo "branch coverage, tracker_core: $$($(COVERAGE) report --include='*/tracker_core/*' --format=total)%" && \
	echo "branch coverage, backends:     $$($(COVERAGE) report --include='*/backends/*' --format=total)%" && \
	exit $${status:-0}

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy $(TYPED_SOURCES)

format: venv
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

demo: venv
	$(VPY) examples/finetune_embeddings.py

# The chaos soak (chaos/README.md): 20 seeded trials under kills and 20% network faults, then
# the table. Replay one trial: make chaos CHAOS_ARGS="--seeds 7".
CHAOS_ARGS ?=
chaos: venv
	$(VPY) -m chaos --out chaos-out --table chaos-out/table.md $(CHAOS_ARGS)

clean:
	rm -rf $(VENV) build dist .mypy_cache .ruff_cache .pytest_cache .hypothesis $(COVERAGE_DIR)
	find . -name '*.egg-info' -prune -exec rm -rf {} + -o -name __pycache__ -prune -exec rm -rf {} +
