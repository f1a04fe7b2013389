#!/usr/bin/env bash
# A user's first five minutes with the wheel, on a machine with no compiler
# and no hiredis/libuv: a fresh venv, `pip install` of the wheel (binary
# packages only, so nothing can be built), then the README's two-line FastAPI
# example, as written but for the Redis address, served by uvicorn against a
# throwaway redis-server on a free port: 100 requests answer 200, the 101st
# 429 with Retry-After, and the exempt /health still 200.
#
#   scripts/try-wheel.sh [WHEEL]    default: dist/'s wheel for python3
#
# Runs itself under scripts/hide-system-libs.sh (root).  make test-wheel
# (and so CI) runs it.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${RATEGATE_HIDDEN_NS:-}" ]; then
    exec bash scripts/hide-system-libs.sh bash "$0" "$@"
fi
source scripts/pythons.sh
PY="${PYTHON:-$(python3 -c 'import sys; print(sys.executable)')}"
XY="$(python_xy "$PY")"
if (($#)); then WHEEL="$1"; else
    w=(dist/rategate-*-cp"${XY/./}"-*.whl); WHEEL="${w[0]}"
fi
[ -f "$WHEEL" ] || { echo "try-wheel: no wheel $WHEEL (make wheel)" >&2; exit 1; }

WORK="$(mktemp -d "${TMPDIR:-/tmp}/rategate-try.XXXXXX")"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT
free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

echo "try-wheel: fresh venv ($("$PY" --version)), pip install $(basename "$WHEEL") fastapi uvicorn"
"$PY" -m venv "$WORK/venv"
"$WORK/venv/bin/python" -m pip install -q --disable-pip-version-check --only-binary :all: \
    "$WHEEL" fastapi uvicorn
# From outside the checkout: `import rategate` must find the installed one.
(cd "$WORK" && venv/bin/python -c 'import rategate; print("try-wheel: rategate", rategate.__version__, "from", rategate.__file__)') \
    || { echo "try-wheel: the installed wheel does not import" >&2; exit 1; }

# The README's two lines: the block after "FastAPI:" under "## Two lines", a
# whole module (its imports, `app = FastAPI()`, the add_middleware line).
lines="$(awk '/^## Two lines/ {s = 1} s && /^FastAPI:/ {f = 1; next} f && /^```python/ {c = 1; next}
              c && /^```/ {exit} c {print}' README.md)"
grep -q '^app = FastAPI()$' <<<"$lines" && grep -q '^app.add_middleware(rategate.RateLimitMiddleware' <<<"$lines" \
    || { echo "try-wheel: README's two lines not found:"$'\n'"$lines" >&2; exit 1; }
rport="$(free_port)"
grep -q 'redis://127.0.0.1:6379/0' <<<"$lines" || { echo "try-wheel: the README example's Redis URL changed" >&2; exit 1; }
{
    printf '%s\n' "${lines//redis:\/\/127.0.0.1:6379\/0/redis://127.0.0.1:$rport/0}"
    echo '@app.get("/")'
    echo 'def root() -> dict: return {"hello": "world"}'
    echo '@app.get("/health")'
    echo 'def health() -> dict: return {"ok": True}'
} > "$WORK/app.py"
echo "try-wheel: app.py:"; sed 's/^/    /' "$WORK/app.py"

redis-server --port "$rport" --bind 127.0.0.1 --save "" --appendonly no --dir "$WORK" \
    >"$WORK/redis.log" 2>&1 &
pids+=($!)
port="$(free_port)"
(cd "$WORK" && exec venv/bin/python -m uvicorn app:app --host 127.0.0.1 --port "$port" --lifespan on \
    --no-access-log >"$WORK/uvicorn.log" 2>&1) &
pids+=($!)
url="http://127.0.0.1:$port"
for _ in $(seq 150); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' "$url/health")" = 200 ] && break
    sleep 0.2
done
[ "$(curl -s -o /dev/null -w '%{http_code}' "$url/health")" = 200 ] \
    || { echo "try-wheel: uvicorn did not come up:" >&2; cat "$WORK/uvicorn.log" "$WORK/redis.log" >&2; exit 1; }

# 110 requests on one keep-alive connection.  The bucket holds 100 and
# refills one token per 0.6 s, so the first 100 are allowed and then 429s
# come, with at most one extra 200 per 0.6 s the burst took.
start="$(date +%s%N)"
args=()
for _ in $(seq 110); do args+=(-o /dev/null "$url/"); done
mapfile -t codes < <(curl -s -D "$WORK/headers" -w '%{http_code}\n' "${args[@]}")
ms=$(( ($(date +%s%N) - start) / 1000000 ))
health="$(curl -s -o /dev/null -w '%{http_code}' "$url/health")"
n200=0 n429=0 first429=-1
for i in "${!codes[@]}"; do
    case "${codes[$i]}" in
        200) n200=$((n200 + 1)) ;;
        429) n429=$((n429 + 1)); ((first429 >= 0)) || first429=$i ;;
    esac
done
retry="$(grep -i '^retry-after:' "$WORK/headers" | head -1 | tr -d '\r')"
echo "try-wheel: 110 requests in $ms ms: $n200 x 200, $n429 x 429 (the first at #$((first429 + 1))); $retry; /health: $health"
if ((${#codes[@]} != 110 || n200 + n429 != 110 || first429 < 100 || n429 == 0 || n200 > 101 + ms / 600)) \
    || [ "$health" != 200 ] || ! grep -Eqi '^retry-after: [1-9]' <<<"$retry"; then
    echo "try-wheel: FAILED (expected 100 x 200, then 429 with Retry-After; /health 200)" >&2
    cat "$WORK/uvicorn.log" >&2
    exit 1
fi
echo "try-wheel: OK: the wheel works with no compiler and no system hiredis/libuv"
