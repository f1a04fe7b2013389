# rategate: the two commands of the README are `make bench` and `make test`.
# Each installs what it needs on a fresh Debian machine (scripts/bootstrap.sh).
PY      ?= .venv/bin/python
CFLAGS_CI = -Wall -Wextra -Werror

BENCH_ARGS ?=

.PHONY: bootstrap bootstrap-bench build test test-asan bench bench-quick clean

bootstrap:
	bash scripts/bootstrap.sh test

bootstrap-bench:
	bash scripts/bootstrap.sh bench

# Build the extension in place with warnings as errors.
build:
	RATEGATE_CFLAGS="$(CFLAGS_CI)" $(PY) setup.py -q build_ext --inplace

test: bootstrap
	RATEGATE_CFLAGS="$(CFLAGS_CI)" $(PY) setup.py -q build_ext --inplace --force
	$(PY) -m pytest

# The test suite against an ASan + UBSan build of the extension.
test-asan: bootstrap
	bash scripts/asan.sh

# The main job: starts its own redis-server, runs every case at workers = cores
# and at one worker, prints the tables, writes bench/results/latest.{json,md,png}
# (about 15 minutes on 2 cores; bench-quick about 3).
# BENCH_ARGS="--cases health,rategate --workers 2" etc.
bench: bootstrap-bench build
	$(PY) -m bench.run $(BENCH_ARGS)

bench-quick: bootstrap-bench build
	$(PY) -m bench.run --quick $(BENCH_ARGS)

clean:
	rm -rf build rategate/*.so .pytest_cache
