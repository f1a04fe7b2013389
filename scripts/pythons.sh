# Sourced by scripts/wheel.sh, test-wheel.sh and test-pythons.sh.
#
# find_python X.Y: prints the path of a CPython X.Y interpreter, or fails
# with a message saying how to get one.  pyenv's versions are looked up
# directly ($PYENV_ROOT/versions/X.Y.*/bin/python3, the newest patch level):
# `python3.12` on PATH may be a pyenv shim that fails unless that version is
# selected.  RATEGATE_PYTHON_X_Y=/path overrides the search.
find_python() {
    local want="$1" var="RATEGATE_PYTHON_${1//./_}" cand
    local -a cands=()
    [ -n "${!var:-}" ] && cands+=("${!var}")
    local root="${PYENV_ROOT:-$HOME/.pyenv}"
    # newest patch level first (3.12.10 before 3.12.9)
    while IFS= read -r cand; do cands+=("$cand"); done < <(
        ls -d "$root"/versions/"$want".*/bin/python3 2>/dev/null | sort -rV)
    command -v "python$want" >/dev/null && cands+=("$(command -v "python$want")")
    for cand in "${cands[@]}"; do
        if [ -x "$cand" ] && [ "$("$cand" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)" = "$want" ]; then
            echo "$cand"
            return 0
        fi
    done
    echo "rategate: no CPython $want found (looked in $root/versions/$want.*, python$want on PATH);" \
         "install it (pyenv install $want) or set $var=/path/to/python$want" >&2
    return 1
}

# python_xy PYTHON: "3.11" for that interpreter.
python_xy() { "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])'; }
