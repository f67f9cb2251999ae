# Two commands: `make run` starts everything locally, `make test` proves it works.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup run test lint format bench bench-ab clean chromium vendor

$(VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

setup: $(VENV)/.installed node_modules/.installed

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
	$(PY) -m pytest $(PYTEST_ARGS)

lint: setup
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

# Throughput, latency and memory against the peers' harness, then the 200-client load run
# (BENCH_LOAD=0 skips it). Results: bench/results/.
bench: setup
	$(PY) -m bench.run
	[ "$${BENCH_LOAD:-1}" = 0 ] || $(PY) -m bench.load

# A change measured against a commit, in alternating rounds: make bench-ab COMMIT=HEAD~1
bench-ab: setup
	$(PY) -m bench.ab $(COMMIT)

clean:
	rm -rf $(VENV) node_modules .data artifacts .pytest_cache .ruff_cache
