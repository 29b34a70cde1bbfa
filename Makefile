# One command to run Backflow, one to run the tests. Both create .venv and install what
# they need, redis-server (and for the tests promtool) included, from Debian's packages,
# when it is missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
ARGS   ?=

.PHONY: run demo test test-tools bench-ingest bench-detection bench-decode bench-memory bench-soak install redis-server promtool node-deps clean

$(VENV)/.installed: pyproject.toml setup.py processor/receiver/_fastdecode.c
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

redis-server:
	@command -v redis-server >/dev/null 2>&1 || [ -x /usr/bin/redis-server ] || \
	  { echo "installing redis-server (Debian package)"; \
	    $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq redis-server >/dev/null; }

# promtool checks and unit-tests deploy/prometheus/backflow-alerts.yaml (tests/test_deploy.py).
promtool:
	@command -v promtool >/dev/null 2>&1 || \
	  { echo "installing promtool (Debian package prometheus)"; \
	    $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }

# Node.js and the npm packages of tests/js/ (tests/test_js_client.py: a consumer of the
# events in JavaScript, docs/schema.md); Node.js from Debian's packages when it is missing.
node-deps: tests/js/node_modules/.installed

tests/js/node_modules/.installed: tests/js/package.json tests/js/package-lock.json
	@command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1 || \
	  { echo "installing nodejs and npm (Debian packages)"; \
	    $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq nodejs npm >/dev/null; }
	npm ci --prefix tests/js --no-audit --no-fund --loglevel=error
	touch $@

# Programs the tests run besides Python packages.
test-tools: redis-server promtool node-deps

# Runs `backflow serve` with a local redis-server unless BACKFLOW_REDIS_URL is set.
run: install redis-server
	$(PY) -m processor.devtools.redis_server run -- $(VENV)/bin/backflow serve $(ARGS)

# Everything on this machine for under two minutes: Redis, Backflow, an instrumented shop
# and its bad rollout, with the events printed as they arrive.
demo: install redis-server
	$(VENV)/bin/backflow demo $(ARGS)

test: install test-tools
	$(PY) -m pytest $(ARGS)

bench-ingest: install redis-server
	$(PY) -m benchmarks.ingest $(ARGS)

bench-detection: install redis-server
	$(PY) -m benchmarks.detection $(ARGS)

bench-memory: install
	$(PY) -m benchmarks.memory $(ARGS)

# Ten minutes at a steady load: is memory flat once every code location is known?
bench-soak: install redis-server
	$(PY) -m benchmarks.soak $(ARGS)

bench-decode: install
	$(PY) -m benchmarks.decode $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis *.egg-info
