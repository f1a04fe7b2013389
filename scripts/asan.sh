#!/usr/bin/env bash
# Run the test suite against an AddressSanitizer + UndefinedBehaviorSanitizer
# build of rategate._core.  CPython itself is not instrumented, so the ASan
# runtime is preloaded; leak detection is off (the interpreter keeps memory
# until exit by design) and rategate's own leaks are caught by the tests of
# _core._live() instead.  The normal build is restored afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
restore() { RATEGATE_CFLAGS="-Wall -Wextra -Werror" $PY setup.py -q build_ext --inplace --force >/dev/null; }
trap restore EXIT
RATEGATE_CFLAGS="-Wall -Wextra -Werror -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=undefined" \
RATEGATE_LDFLAGS="-fsanitize=address,undefined" \
    $PY setup.py -q build_ext --inplace --force
export LD_PRELOAD="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:strict_string_checks=1:detect_stack_use_after_return=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
export RATEGATE_SANITIZED=1
$PY -m pytest -p no:cacheprovider "$@"
