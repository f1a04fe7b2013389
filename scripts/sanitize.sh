#!/usr/bin/env bash
# Run tests against a sanitizer build of rategate._core; the normal build is
# restored afterwards.  CPython itself is not instrumented, so the sanitizer
# runtime is preloaded.
#
#   scripts/sanitize.sh asan [pytest args]   AddressSanitizer + UBSan; default:
#       the whole suite.  Leak detection is off (the interpreter keeps memory
#       until exit by design); rategate's own leaks are caught by the tests of
#       _core._live() instead.
#   scripts/sanitize.sh tsan [pytest args]   ThreadSanitizer; default: the race
#       tests (stress, correctness, concurrency).  This works usefully: TSan
#       intercepts pthread mutexes and condition variables, so it sees the
#       GIL's hand-offs, and reports races in the core's own memory (on
#       237f52a it reports issue 8's #1, a check pushed under a destroyed
#       shard mutex, and #2, the eventfd written while its port is closed and
#       freed).  Tests that fork are left out: TSan cannot follow a
#       multi-threaded process across fork().  Any report fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
mode="${1:?usage: scripts/sanitize.sh asan|tsan [pytest args]}"
shift
tests=("$@")
case "$mode" in
asan)
    cflags="-fsanitize=address,undefined -fno-sanitize-recover=undefined"
    export LD_PRELOAD="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)"
    export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:strict_string_checks=1:detect_stack_use_after_return=1"
    export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
    ;;
tsan)
    cflags="-fsanitize=thread"
    export LD_PRELOAD="$(gcc -print-file-name=libtsan.so)"
    export TSAN_OPTIONS="halt_on_error=0:exitcode=66:second_deadlock_stack=1"
    if ((${#tests[@]} == 0)); then
        tests=(tests/test_stress.py tests/test_correctness.py tests/test_limiter_concurrency.py tests/test_lease.py
               tests/test_shm.py tests/test_shm_procs.py tests/test_uvicorn_shm.py -k "not fork")
    fi
    ;;
*)
    echo "scripts/sanitize.sh: unknown mode $mode (asan or tsan)" >&2
    exit 2
    ;;
esac
restore() { RATEGATE_CFLAGS="-Wall -Wextra -Werror" $PY setup.py -q build_ext --inplace --force >/dev/null; }
trap restore EXIT
# The preload is for the tests, not for the compiler run by setup.py.
LD_PRELOAD= RATEGATE_CFLAGS="-Wall -Wextra -Werror -O1 -g -fno-omit-frame-pointer $cflags" \
RATEGATE_LDFLAGS="$cflags" \
    $PY setup.py -q build_ext --inplace --force
export RATEGATE_SANITIZED=1
$PY -m pytest -p no:cacheprovider "${tests[@]}"
