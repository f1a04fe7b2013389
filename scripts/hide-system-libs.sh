#!/usr/bin/env bash
# Run a command where the system's copies of what rategate's wheel bundles
# are out of reach, to prove the wheel needs nothing from the system beyond
# what manylinux allows (the glibc family).
#
#   scripts/hide-system-libs.sh CMD [ARGS...]
#
# In a private mount namespace (unshare -m; root), nothing outside it sees a
# change:
#   - hiredis and libuv: the runtime libraries, the headers, the static
#     libraries and the pkg-config files;
#   - OpenSSL: the development files (headers, static libraries, pkg-config
#     files).  libssl3's runtime stays, because redis-server links it;
#     make test-wheel checks with ldd that rategate's own libssl, once
#     linked, comes from rategate.libs/;
#   - the C compilers (gcc, cc, c++, clang, cc1): nothing can be built.
# A file is hidden by bind-mounting /dev/null over it (empty, not
# executable), a directory by an empty read-only tmpfs.  A bind mount lands
# on a symlink's target, so OpenSSL's link names (libssl.so -> libssl.so.3)
# are left alone: hiding them would hide the runtime library.
# The hiding is checked before CMD runs.
set -euo pipefail
(($#)) || { echo "usage: $0 CMD [ARGS...]" >&2; exit 2; }

if [ "${RATEGATE_HIDDEN_NS:-}" != "$$" ]; then
    [ "$(id -u)" -eq 0 ] || { echo "hide-system-libs: needs root (unshare -m, mount)" >&2; exit 1; }
    # The inner shell knows it is inside by its own pid, which exec keeps.
    exec unshare --mount --propagation private bash -c \
        'RATEGATE_HIDDEN_NS=$$ exec bash "$0" "$@"' "$0" "$@"
fi

shopt -s nullglob
files=(
    /usr/lib/*/libhiredis* /usr/lib/libhiredis* /usr/lib/*/libuv.* /usr/lib/*/libuv_a.* /usr/lib/libuv.*
    /usr/lib/*/pkgconfig/hiredis*.pc /usr/lib/*/pkgconfig/libuv*.pc /usr/share/pkgconfig/hiredis*.pc
    /usr/lib/*/libssl.a /usr/lib/*/libcrypto.a
    /usr/lib/*/pkgconfig/openssl.pc /usr/lib/*/pkgconfig/libssl.pc /usr/lib/*/pkgconfig/libcrypto.pc
    /usr/bin/*gcc* /usr/bin/*g++* /usr/bin/cc /usr/bin/c++ /usr/bin/c89* /usr/bin/c99* /usr/bin/clang*
    /usr/lib/gcc/*/*/cc1 /usr/lib/gcc/*/*/cc1plus /usr/libexec/gcc/*/*/cc1
)
dirs=(/usr/include/hiredis /usr/include/uv /usr/include/openssl /usr/include/*/openssl)
for f in "${files[@]}"; do
    [ -e "$f" ] && mount --bind /dev/null "$f"
done
for d in "${dirs[@]}" /usr/include/uv.h; do
    if [ -d "$d" ]; then mount -t tmpfs -o ro,size=4k none "$d"; elif [ -e "$d" ]; then mount --bind /dev/null "$d"; fi
done

# Check: nothing of it is found any more.
fail=0
for f in /usr/lib/*/libhiredis.so.* /usr/lib/*/libuv.so.*; do
    [ -s "$f" ] && { echo "hide-system-libs: $f still readable" >&2; fail=1; }
done
for f in /usr/lib/*/libssl.so.3 /usr/lib/*/libcrypto.so.3; do
    [ -s "$f" ] || { echo "hide-system-libs: $f was hidden (redis-server needs it)" >&2; fail=1; }
done
for m in hiredis libuv openssl; do
    pkg-config --exists "$m" 2>/dev/null && { echo "hide-system-libs: pkg-config still finds $m" >&2; fail=1; }
done
probe="$(mktemp -d /tmp/rategate-cc.XXXXXX)"
echo 'int main(void) { return 0; }' > "$probe/t.c"
for cc in cc gcc c99 clang; do
    "$cc" "$probe/t.c" -o "$probe/t" >/dev/null 2>&1 && { echo "hide-system-libs: $cc still compiles" >&2; fail=1; }
done
rm -rf "$probe"
((fail == 0)) || exit 1
echo "hide-system-libs: hiredis, libuv, OpenSSL's headers and the C compilers are hidden (private mount namespace)"
exec "$@"
