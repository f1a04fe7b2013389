#!/usr/bin/env bash
# Set up everything rategate needs on a fresh Debian/Ubuntu machine:
# system packages (hiredis, libuv, OpenSSL, redis-server, wrk, ...), a
# virtual environment in .venv, and the Python dependencies.  Idempotent and
# quick when everything is already there.
#
#   PYTHON=/path/to/python3 VENV=.venv313 scripts/bootstrap.sh test
#
# makes the venv from another interpreter (make test-pythons does).
#
# Modes: test (the default: everything the suite needs), bench (that and
# bench/requirements.txt), docs (a venv with the docs extra only: the site
# needs no compiler and no Redis), wheel (only the system packages a wheel
# build needs: scripts/wheel.sh makes its own build venvs).
set -euo pipefail
cd "$(dirname "$0")/.."

MODE="${1:-test}"
APT_PACKAGES=(gcc make pkg-config libhiredis-dev libuv1-dev libssl-dev)
case "$MODE" in
    test|bench) APT_PACKAGES+=(openssl redis-server redis-tools wrk curl valgrind) ;;
    docs) APT_PACKAGES=() ;;
    wheel) ;;
    *) echo "bootstrap: unknown mode '$MODE' (test, bench, docs or wheel)" >&2; exit 2 ;;
esac

missing=()
for p in "${APT_PACKAGES[@]+"${APT_PACKAGES[@]}"}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "bootstrap: installing system packages: ${missing[*]}"
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null; then SUDO="sudo"; else
            echo "bootstrap: need root (or sudo) to run: apt-get install ${missing[*]}" >&2; exit 1
        fi
    fi
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    # Debian starts a redis-server service on 6379; ours use private ports.
fi

[ "$MODE" = wheel ] && exit 0

PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    echo "bootstrap: creating $VENV with $("$PYTHON" --version)"
    "$PYTHON" -m venv "$VENV"
fi
# test: what the suite needs; bench: that and bench/requirements.txt; docs:
# the docs extra of pyproject.toml.
stamp="$VENV/.rategate-deps-$MODE"
want="$( { cat pyproject.toml; [ "$MODE" = bench ] && cat bench/requirements.txt; true; } | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "bootstrap: installing Python dependencies ($MODE) into $VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip setuptools wheel
    # The test extra of pyproject.toml, the one list of the suite's needs
    # (read with tomllib, so nothing here repeats it; rategate itself is
    # built in place, not installed).
    extra=test
    [ "$MODE" = docs ] && extra=docs
    mapfile -t test_deps < <("$VENV/bin/python" -c \
        'import sys, tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"][sys.argv[1]]))' "$extra")
    "$VENV/bin/python" -m pip install -q "${test_deps[@]}"
    if [ "$MODE" = bench ]; then
        "$VENV/bin/python" -m pip install -q -r bench/requirements.txt
    fi
    echo "$want" > "$stamp"
fi
