# rategate: the two commands of the README are `make bench` and `make test`.
# Each installs what it needs on a fresh Debian machine (scripts/bootstrap.sh).
PY      ?= .venv/bin/python
CFLAGS_CI = -Wall -Wextra -Werror

.PHONY: bootstrap build test test-asan bench bench-quick clean

bootstrap:
	bash scripts/bootstrap.sh

# Build the extension in place with warnings as errors.
build:
	RATEGATE_CFLAGS="$(CFLAGS_CI)" $(PY) setup.py -q build_ext --inplace

test: bootstrap
	RATEGATE_CFLAGS="$(CFLAGS_CI)" $(PY) setup.py -q build_ext --inplace --force
	$(PY) -m pytest

# The test suite against an ASan + UBSan build of the extension.
test-asan: bootstrap
	bash scripts/asan.sh

bench: bootstrap build
	$(PY) -m bench.run

bench-quick: bootstrap build
	$(PY) -m bench.run --quick

clean:
	rm -rf build rategate/*.so .pytest_cache
