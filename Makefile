# One command to run Backflow, one to run the tests. Both create .venv and install what
# they need, redis-server (and for the tests promtool) included, from Debian's packages,
# when it is missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
ARGS   ?=

.PHONY: run demo tail top test test-fast test-sanitize sanitize-build fuzz fuzz-build test-tools compiler bench-ingest bench-detection bench-call-graph bench-trend bench-rollouts bench-metrics-in bench-tiers bench-decode bench-memory bench-sink bench-churn bench-soak install redis-server promtool node-deps clean

$(VENV)/.installed: pyproject.toml setup.py processor/receiver/_fastdecode.c | compiler
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

# The compiled decoder (processor/receiver/_fastdecode.c) needs a C compiler and Python's
# headers; without them the install goes on and decodes in Python, 30 times slower, which
# the tests refuse when BACKFLOW_REQUIRE_FASTDECODE=1 (.ci/run sets it).
compiler:
	@command -v $(CC) >/dev/null 2>&1 || \
	  { echo "installing gcc (Debian package)"; \
	    $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq gcc >/dev/null; }
	@$(PYTHON) -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' || \
	  { echo "installing Python's headers (Debian package python3-dev)"; \
	    $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq python3-dev >/dev/null; }

redis-server:
	@command -v redis-server >/dev/null 2>&1 || [ -x /usr/bin/redis-server ] || \
	  { echo "installing redis-server (Debian package)"; \
	    $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq redis-server >/dev/null; }
	@command -v redis-cli >/dev/null 2>&1 || \
	  { echo "installing redis-cli (Debian package redis-tools: tests/rediscluster.py creates clusters with it)"; \
	    $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq redis-tools >/dev/null; }

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

# The events and the table of the Backflow that `make run` started, without activating .venv.
tail: install
	$(VENV)/bin/backflow tail $(ARGS)

top: install
	$(VENV)/bin/backflow top $(ARGS)

# The whole suite (docs/testing.md). test-fast: the tests that start no process and are not
# slow (no redis-server, no `backflow serve`, no receiver processes), in under a minute.
test: install test-tools
	$(PY) -m pytest $(ARGS)

test-fast: install
	$(PY) -m pytest -m "not e2e and not slow" $(ARGS)

# The compiled decoder under the sanitizers, built in copies of the sources under build/ (the
# .so of `make install` stays as it is), with Python's own flags plus the sanitizers'.
# test-sanitize: AddressSanitizer and UndefinedBehaviorSanitizer (gcc's runtimes: libasan is
# preloaded as python is not built with it), then the decoder's tests, the fuzz corpus and
# the Hypothesis loop under them. No leak check: CPython keeps memory until exit by design.
# PYTHONMALLOC=malloc puts every bytes object in a block of its own that ASan guards.
SAN_DIR   := build/sanitize
SAN_FLAGS := -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer
SAN_RUN   := cd $(SAN_DIR) && env LD_PRELOAD="$$($(CC) -print-file-name=libasan.so)" \
  ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
  PYTHONMALLOC=malloc BACKFLOW_REQUIRE_FASTDECODE=1 $(CURDIR)/$(PY)
# fuzz: atheris's libFuzzer with clang's ASan runtime (asan_with_fuzzer.so, which has the
# coverage hooks; gcc's libasan would stub them out), so the decoder is compiled with ASan
# but linked without gcc's runtime; UBSan traps instead of calling its runtime, and
# -fsanitize-coverage=trace-cmp with -use_value_profile=1 lets the C code's comparisons
# guide the search (fuzz/sancov_stubs.c: the float comparisons libFuzzer does not take).
FUZZ_DIR     := build/fuzz
FUZZ_FLAGS   := -fsanitize=address -fsanitize=undefined -fsanitize-undefined-trap-on-error \
  -fsanitize-coverage=trace-cmp -fno-omit-frame-pointer
FUZZ_SECONDS ?= 120
FUZZ_CORPUS  ?= $(CURDIR)/fuzz/corpus
FUZZ_RUN     := cd $(FUZZ_DIR) && env \
  LD_PRELOAD="$$($(CURDIR)/$(PY) -c 'import atheris; print(atheris.path())')/asan_with_fuzzer.so $(CURDIR)/$(FUZZ_DIR)/sancov_stubs.so" \
  ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 PYTHONMALLOC=malloc BACKFLOW_REQUIRE_FASTDECODE=1 $(CURDIR)/$(PY)
# A copy of what the decoder and its tests need, without the built .so.
COPY_SOURCES = rm -rf $(1) && mkdir -p $(1) && \
  tar -c --exclude=__pycache__ --exclude='*.so' --exclude=fuzz/corpus --exclude='crash-*' \
    README.md pyproject.toml setup.py processor tests fuzz | tar -x -C $(1)
# optional=True in setup.py: a build that failed says nothing, so check that it is there
# (the compiler's output is in build.log).
CHECK_BUILT  = ls $(1)/processor/receiver/_fastdecode*.so >/dev/null 2>&1 || { cat $(1)/build.log; false; }

sanitize-build: install
	$(call COPY_SOURCES,$(SAN_DIR))
	cd $(SAN_DIR) && CPPFLAGS="$(SAN_FLAGS)" $(CURDIR)/$(PY) setup.py build_ext --inplace >build.log 2>&1
	$(call CHECK_BUILT,$(SAN_DIR))

test-sanitize: sanitize-build
	$(SAN_RUN) -m pytest -p no:cacheprovider -q tests/test_fastdecode.py $(ARGS)
	$(SAN_RUN) fuzz/decode_fuzz.py --replay $(abspath $(FUZZ_CORPUS))
	$(SAN_RUN) fuzz/decode_fuzz.py --fallback --examples 2000

fuzz-build: install
	@$(PY) -c 'import atheris' 2>/dev/null || $(PY) -m pip install -q 'atheris>=2.3'
	$(call COPY_SOURCES,$(FUZZ_DIR))
	$(CC) -shared -fPIC -O2 -o $(FUZZ_DIR)/sancov_stubs.so fuzz/sancov_stubs.c
	cd $(FUZZ_DIR) && CC="$(CC) $(FUZZ_FLAGS)" \
	  LDSHARED="$$($(CURDIR)/$(PY) -c 'import sysconfig; print(sysconfig.get_config_var("LDSHARED"))')" \
	  $(CURDIR)/$(PY) setup.py build_ext --inplace >build.log 2>&1
	$(call CHECK_BUILT,$(FUZZ_DIR))

# Coverage-guided fuzzing of the two decoders against each other (fuzz/decode_fuzz.py) for
# FUZZ_SECONDS. The corpus grows in fuzz/corpus (make test-sanitize replays it); a finding
# is saved as fuzz/crash-<sha1>: replay it with `make test-sanitize FUZZ_CORPUS=<file>`.
fuzz: fuzz-build
	$(FUZZ_RUN) fuzz/decode_fuzz.py -max_total_time=$(FUZZ_SECONDS) -use_value_profile=1 \
	  -print_final_stats=1 -rss_limit_mb=4096 -artifact_prefix=$(CURDIR)/fuzz/ $(abspath $(FUZZ_CORPUS))

bench-ingest: install redis-server
	$(PY) -m benchmarks.ingest $(ARGS)

bench-detection: install redis-server
	$(PY) -m benchmarks.detection $(ARGS)

bench-memory: install
	$(PY) -m benchmarks.memory $(ARGS)

# What writing a baseline to Redis costs the sink's thread, batched and one call each.
bench-sink: install redis-server
	$(PY) -m benchmarks.sink $(ARGS)

# Service names that come and go: memory and places with and without forgetting.
bench-churn: install
	$(PY) -m benchmarks.churn $(ARGS)

# Ten minutes at a steady load: is memory flat once every code location is known?
bench-soak: install redis-server
	$(PY) -m benchmarks.soak $(ARGS)

bench-decode: install
	$(PY) -m benchmarks.decode $(ARGS)

# Labelled faults in public microservice traces, replayed through a real `backflow serve`
# and scored beside a naive rule: ARGS="--data PATH" (docs/benchmarks.md#real-traces says
# how to get the data, which stays outside the repository).
.PHONY: bench-real-traces
bench-call-graph: install
	$(PY) -m benchmarks.call_graph $(ARGS)

bench-trend: install redis-server
	$(PY) -m benchmarks.trend $(ARGS)

bench-rollouts: install
	$(PY) -m benchmarks.rollouts $(ARGS)

bench-metrics-in: install redis-server
	$(PY) -m benchmarks.metrics_in $(ARGS)

bench-tiers: install redis-server
	$(PY) -m benchmarks.tiers $(ARGS)

bench-real-traces: install redis-server
	$(PY) -m benchmarks.real_traces $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis *.egg-info build
