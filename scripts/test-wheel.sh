#!/usr/bin/env bash
# make test-wheel: the test suite against the installed wheel, not the
# source tree, with the system's hiredis, libuv, OpenSSL headers and C
# compilers hidden (scripts/hide-system-libs.sh).
#
#   1. build the wheel for this Python (python3, or $PYTHON) from the sdist,
#      repaired by auditwheel (scripts/wheel.sh), into build/wheel/test-dist;
#   2. install it with its [test] extra into a fresh venv outside the checkout;
#   3. copy tests/, examples/ and bench/ (the uvicorn tests run the examples,
#      the benchmark's measurement tests import bench) to a
#      directory of their own, with a pytest.ini made from pyproject.toml's
#      options less `pythonpath` (which would put a checkout on sys.path);
#   4. in the hidden namespace: `import rategate` must come from the venv
#      (conftest.py checks RATEGATE_TEST_INSTALLED too), `ldd` of the
#      installed _core must show only rategate.libs/ and the glibc family,
#      then pytest, then scripts/try-wheel.sh (the README example).
# The tests that need the source tree skip themselves, saying so.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/pythons.sh
TIMEOUT="${RATEGATE_WHEEL_TEST_TIMEOUT:-900}"

if [ "${1:-}" = --inside ]; then
    WORK="$2" VENV="$2/venv" WHEEL="$3"
    cd "$WORK/run"
    # Where rategate comes from, seen from the test directory.
    site="$("$VENV/bin/python" -c 'import os, rategate; print(os.path.dirname(os.path.realpath(rategate.__file__)))')"
    core="$("$VENV/bin/python" -c 'import rategate._core as c; print(c.__file__)')"
    libs="$(dirname "$site")/rategate.libs"
    echo "test-wheel: rategate from $site"
    case "$site/" in "$(realpath "$VENV")"/*) ;; *) echo "test-wheel: rategate is not the venv's" >&2; exit 1 ;; esac
    echo "test-wheel: ldd $core"
    ldd "$core" | tee "$WORK/ldd.txt"
    bad=0
    while read -r name arrow path _; do
        [ "$arrow" = "=>" ] || continue
        path="$(realpath -m "$path")"  # rategate/../rategate.libs/...
        case "$path" in
            "$libs"/*) ;;
            */libc.so.*|*/libm.so.*|*/libpthread.so.*|*/libdl.so.*|*/librt.so.*|*/ld-linux*) ;;
            *) echo "test-wheel: $name comes from $path: neither rategate.libs/ nor glibc" >&2; bad=1 ;;
        esac
    done < "$WORK/ldd.txt"
    grep -q "not found" "$WORK/ldd.txt" && { echo "test-wheel: a library is not found" >&2; bad=1; }
    ((bad == 0)) || exit 1
    if grep -q "libssl" "$WORK/ldd.txt"; then
        # (every resolved library was checked above: one that is not glibc is in rategate.libs/)
        echo "test-wheel: libssl is the bundled one: $(grep -o 'rategate.libs/libssl[^ ]*' "$WORK/ldd.txt")"
    else
        echo "test-wheel: _core does not link libssl (no TLS code uses it in this build)"
    fi
    # Every bundled library has its licence notice (setup.py's index names it), and the
    # distribution carries rategate's own LICENSE.
    for lib in "$libs"/*; do
        base="$(basename "$lib" | sed -E 's/-[0-9a-f]{8}(\.so)/\1/; s/\.so.*//')"  # libuv-c85c14db.so.1.0.0 -> libuv
        notice="$(grep -E "^$base\.so[^:]*: " "$site/_licenses/README" | sed 's/.*notice //')"
        [ -n "$notice" ] && [ -s "$site/_licenses/$notice" ] \
            || { echo "test-wheel: no licence notice for bundled $(basename "$lib")" >&2; exit 1; }
        echo "test-wheel: bundled $(basename "$lib"): notice rategate/_licenses/$notice"
    done
    ls "$(dirname "$site")"/rategate-*.dist-info/licenses/LICENSE >/dev/null
    echo "test-wheel: pytest in $WORK/run (timeout ${TIMEOUT}s)"
    RATEGATE_TEST_INSTALLED="$VENV" timeout --kill-after=30 "$TIMEOUT" \
        "$VENV/bin/python" -m pytest -p no:cacheprovider
    cd - >/dev/null
    bash scripts/try-wheel.sh "$WHEEL"
    exit 0
fi

PY="${PYTHON:-$(python3 -c 'import sys; print(sys.executable)')}"
XY="$(python_xy "$PY")"
OUT=build/wheel/test-dist
DIST="$OUT" bash scripts/wheel.sh "$XY"
wheels=("$OUT"/rategate-*-cp"${XY/./}"-*.whl)
WHEEL="$(realpath "${wheels[0]}")"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/rategate-wheel-test.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
echo "test-wheel: fresh venv in $WORK with $(basename "$WHEEL")[test]"
"$PY" -m venv "$WORK/venv"
"$WORK/venv/bin/python" -m pip install -q --disable-pip-version-check "$WHEEL[test]"
"$WORK/venv/bin/python" -m pip show -q rategate >/dev/null

mkdir "$WORK/run"
cp -r tests examples bench "$WORK/run/"
find "$WORK/run" -name __pycache__ -prune -exec rm -rf {} +
"$PY" - "$WORK/run/pytest.ini" <<'PYEOF'
import sys, tomllib
opts = tomllib.load(open("pyproject.toml", "rb"))["tool"]["pytest"]["ini_options"]
opts.pop("pythonpath", None)  # the point: no checkout on sys.path
out = ["[pytest]", "# made by scripts/test-wheel.sh from pyproject.toml, without pythonpath"]
for key, value in opts.items():
    if isinstance(value, bool):
        value = "true" if value else "false"
    if isinstance(value, list):
        out.append(f"{key} =" + "".join(f"\n    {v}" for v in value))
    else:
        out.append(f"{key} = {value}")
open(sys.argv[1], "w").write("\n".join(out) + "\n")
PYEOF

bash scripts/hide-system-libs.sh bash scripts/test-wheel.sh --inside "$WORK" "$WHEEL"
