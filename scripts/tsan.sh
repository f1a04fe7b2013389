#!/usr/bin/env bash
# The race tests (stress, correctness, concurrency) against a ThreadSanitizer
# build of rategate._core, with libtsan preloaded into the uninstrumented
# CPython.  This works usefully: TSan intercepts pthread mutexes and condition
# variables, so it sees the GIL's hand-offs, and reports races in the core's
# own memory (on 237f52a it reports issue 8's #1, a check pushed under a
# destroyed shard mutex, and #2, the eventfd written while the port is
# closed and freed).  Tests that fork are left out: TSan cannot follow a
# multi-threaded process across fork().  Any report fails the run (TSan's
# exit code 66).  The normal build is restored afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
restore() { RATEGATE_CFLAGS="-Wall -Wextra -Werror" $PY setup.py -q build_ext --inplace --force >/dev/null; }
trap restore EXIT
RATEGATE_CFLAGS="-Wall -Wextra -Werror -O1 -g -fno-omit-frame-pointer -fsanitize=thread" \
RATEGATE_LDFLAGS="-fsanitize=thread" \
    $PY setup.py -q build_ext --inplace --force
tests=("$@")
if ((${#tests[@]} == 0)); then
    tests=(tests/test_stress.py tests/test_correctness.py tests/test_limiter_concurrency.py -k "not fork")
fi
export LD_PRELOAD="$(gcc -print-file-name=libtsan.so)"
export TSAN_OPTIONS="halt_on_error=0:exitcode=66:second_deadlock_stack=1"
export RATEGATE_SANITIZED=1
$PY -m pytest -p no:cacheprovider -q "${tests[@]}"
