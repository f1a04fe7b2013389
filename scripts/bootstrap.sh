#!/usr/bin/env bash
# Set up everything rategate needs on a fresh Debian/Ubuntu machine:
# system packages (hiredis, libuv, redis-server, wrk, ...), a virtual
# environment in .venv, and the Python dependencies.  Idempotent and quick
# when everything is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(gcc make pkg-config libhiredis-dev libuv1-dev libssl-dev openssl redis-server redis-tools wrk)

missing=()
for p in "${APT_PACKAGES[@]}"; do
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

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo "bootstrap: creating .venv with $($PYTHON --version)"
    "$PYTHON" -m venv .venv
fi
# test: what the suite needs; bench: that and bench/requirements.txt.
MODE="${1:-test}"
stamp=.venv/.rategate-deps-$MODE
want="$( { cat pyproject.toml; [ "$MODE" = bench ] && cat bench/requirements.txt; true; } | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "bootstrap: installing Python dependencies ($MODE) into .venv"
    .venv/bin/python -m pip install -q --upgrade pip setuptools wheel
    .venv/bin/python -m pip install -q \
        "pytest>=8" "pytest-asyncio>=1.0" "httpx>=0.27" "fastapi>=0.100" "starlette>=0.37" \
        "uvicorn>=0.29" "redis>=5" "mypy>=1.8"
    if [ "$MODE" = bench ]; then
        .venv/bin/python -m pip install -q -r bench/requirements.txt
    fi
    echo "$want" > "$stamp"
fi
