#!/usr/bin/env bash
# Run a representative part of the suite (the stress, correctness and limiter
# tests) under valgrind memcheck, against a -O1 -g build of rategate._core,
# with the interpreter on the system allocator (PYTHONMALLOC=malloc) and
# tests/valgrind-python.supp for CPython's own reports.  Fails if any error
# context (an invalid access, an uninitialised value, a definite leak) has a
# frame in rategate's extension; CPython's and libraries' own are listed
# but do not fail the run.  Slow (minutes): `make test-valgrind`, not CI's
# `make test`.  Arguments replace the default test selection.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
restore() { RATEGATE_CFLAGS="-Wall -Wextra -Werror" $PY setup.py -q build_ext --inplace --force >/dev/null; }
trap restore EXIT
command -v valgrind >/dev/null || { echo "valgrind is not installed: apt-get install valgrind (make bootstrap does)" >&2; exit 1; }
RATEGATE_CFLAGS="-Wall -Wextra -Werror -O1 -g -fno-omit-frame-pointer" $PY setup.py -q build_ext --inplace --force
logdir=build/valgrind
rm -rf "$logdir" && mkdir -p "$logdir"
tests=("$@")
if ((${#tests[@]} == 0)); then
    tests=(tests/test_stress.py tests/test_correctness.py tests/test_limiter_api.py
           -k "not fork_during_outage")
fi
export PYTHONMALLOC=malloc
export RATEGATE_STRESS_ROUNDS="${RATEGATE_STRESS_ROUNDS:-2}"
export RATEGATE_TEST_TIMEOUT="${RATEGATE_TEST_TIMEOUT:-900}"
status=0
valgrind --tool=memcheck --trace-children=no --suppressions=tests/valgrind-python.supp \
    --leak-check=full --show-leak-kinds=definite --errors-for-leak-kinds=definite \
    --num-callers=40 --log-file="$logdir/memcheck.%p.log" \
    $PY -m pytest -p no:cacheprovider -q "${tests[@]}" || status=$?
$PY scripts/valgrind_check.py "$logdir" || status=1
exit $status
