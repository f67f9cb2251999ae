# Two commands: `make run` starts everything locally, `make test` proves it works.
# Python 3.13: the first version whose Functions worker runtime is on PyPI. A plain python3.13
# first; else a pyenv-installed 3.13 (its shim refuses to run unless that version is selected).
PYTHON ?= $(shell for p in python3.13 $$(pyenv root 2>/dev/null)/versions/3.13*/bin/python3.13; do \
	"$$p" -c 'import sys; assert sys.version_info[:2] == (3, 13)' >/dev/null 2>&1 && { echo "$$p"; break; }; done)
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
# Test worker processes: the tests mostly wait on servers and processes, so more than the cores.
TEST_WORKERS ?= 4

.PHONY: setup run test lint format bench bench-ab clean chromium vendor

$(VENV)/.installed-3.13: requirements.txt requirements-dev.txt requirements-protos.txt pyproject.toml
	@[ -n "$(PYTHON)" ] || { echo "Python 3.13 not found. Install it (pyenv install 3.13, or your system's python3.13 package), or name it: make PYTHON=/path/to/python3.13" >&2; exit 1; }
	@[ ! -x $(PY) ] || $(PY) -c 'import sys; assert sys.version_info[:2] == (3, 13)' 2>/dev/null || rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps -e .
	# The host protocol's generated modules: from a pinned wheel, never installed (local/protos.py).
	$(PY) -m pip download --quiet --no-deps --only-binary=:all: --require-hashes -r requirements-protos.txt -d $(VENV)/wheels
	$(PY) -m local.protos install $(VENV)/wheels
	touch $@

node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

setup: $(VENV)/.installed-3.13 node_modules/.installed

run: setup
	$(PY) -m local.run

# The page tests drive Debian's Chromium: test tools cannot download a browser of their own here.
chromium:
	@command -v chromium >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-liberation fonts-dejavu-core; }

# The pages' libraries ship in pages/vendor; this refreshes them from the versions in package.json.
vendor: node_modules/.installed
	sed '/^\/\/# sourceMappingURL=/d' node_modules/marked/lib/marked.umd.js > pages/vendor/marked.min.js
	cp node_modules/marked/LICENSE pages/vendor/marked.LICENSE.txt
	sed '/^\/\/# sourceMappingURL=/d' node_modules/dompurify/dist/purify.min.js > pages/vendor/purify.min.js
	cp node_modules/dompurify/LICENSE pages/vendor/purify.LICENSE.txt
	cp node_modules/dompurify/LICENSE-MPL pages/vendor/purify.LICENSE-MPL.txt

test: setup chromium
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -n $(TEST_WORKERS) $(PYTEST_ARGS)

lint: setup
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

# Throughput, latency, CPU per request and memory against the peers' harness, through the
# worker beside a bare relay and the in-process figures; the CPU per call of the per-minute
# checks and of the plugin hook points; then the 200-client load run (BENCH_LOAD=0 skips it)
# and the concurrency sweep (BENCH_CONCURRENCY=0); the cold start. Results: bench/results/.
bench: setup
	$(PY) -m bench.run
	$(PY) -m bench.limits
	$(PY) -m bench.journal
	$(PY) -m bench.budgets
	$(PY) -m bench.plugins
	$(PY) -m bench.mcp
	[ "$${BENCH_LOAD:-1}" = 0 ] || $(PY) -m bench.load
	[ "$${BENCH_CONCURRENCY:-1}" = 0 ] || $(PY) -m bench.concurrency
	$(PY) -m bench.coldstart

# A change measured against a commit, in alternating rounds: make bench-ab COMMIT=HEAD~1
bench-ab: setup
	$(PY) -m bench.ab $(COMMIT)

clean:
	rm -rf $(VENV) node_modules .data artifacts .pytest_cache .ruff_cache
