"""Build rategate._core from csrc/*.c against the system hiredis, libuv and OpenSSL.

The libraries are found with pkg-config.  When one is missing, the build
stops with a message naming it and the command that installs it, instead of
a compiler traceback about a missing header.

The extension exports one symbol, PyInit__core (csrc/rategate.map): a wheel
bundles its own copies of hiredis, libuv and OpenSSL (auditwheel), and none
of their symbols, nor ours, may be seen by uvloop's libuv, hiredis-py or
Python's _ssl loaded in the same process.

A wheel build (not --inplace) also copies the licence notice of every
library the extension links, other than the C runtime, into
rategate/_licenses/: those are the libraries auditwheel bundles.  The
notices come from the distribution's packages (Debian:
/usr/share/doc/<package>/copyright, found with dpkg); nothing is committed.

Environment:
  RATEGATE_CFLAGS   extra compiler flags (CI: "-Wall -Wextra -Werror";
                    the sanitizer build: "-fsanitize=address,undefined ...")
  RATEGATE_LDFLAGS  extra linker flags
  RATEGATE_REQUIRE_NOTICES=1  fail a wheel build whose bundled libraries'
                    notices cannot be found (scripts/wheel.sh sets it)
"""

import os
import re
import shlex
import shutil
import subprocess
import sys
from glob import glob

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
VERSION_SCRIPT = os.path.join("csrc", "rategate.map")

# (name in messages, pkg-config module)
LIBRARIES = (("hiredis", "hiredis"), ("libuv", "libuv"), ("openssl", "openssl"))

INSTALL_HINT = (
    "On Debian/Ubuntu: sudo apt-get install libhiredis-dev libuv1-dev libssl-dev pkg-config\n"
    "On Fedora: sudo dnf install hiredis-devel libuv-devel openssl-devel pkgconf\n"
    "On macOS: brew install hiredis libuv openssl pkg-config"
)

# Packages of the C runtime: manylinux lets a wheel use these from the
# system, so auditwheel does not bundle them and they need no notice.
SYSTEM_PACKAGES = {"libc6", "libgcc-s1", "libstdc++6"}
SYSTEM_SONAMES = re.compile(r"^(libc|libm|libpthread|libdl|librt|libgcc_s|libstdc\+\+|ld-linux[-\w]*)\.so")


def _fail(msg: str) -> "None":
    sys.stderr.write(f"\nrategate: cannot build the C extension: {msg}\n{INSTALL_HINT}\n\n")
    raise SystemExit(1)


def _pkg(*args: str) -> list:
    out = subprocess.run(["pkg-config", *args], capture_output=True, text=True)
    if out.returncode != 0:
        return None
    return shlex.split(out.stdout)


def _flags():
    if shutil.which("pkg-config") is None:
        _fail("pkg-config is not installed (it finds hiredis, libuv and openssl).")
    missing = [lib for lib, pc in LIBRARIES if _pkg("--exists", pc) is None]
    if missing:
        _fail(f"missing system librar{'y' if len(missing) == 1 else 'ies'}: {', '.join(missing)}.")
    ver = (_pkg("--modversion", "hiredis") or ["0"])[0]
    major = int(ver.split(".")[0]) if ver.split(".")[0].isdigit() else 0
    if major < 1 and not ver.startswith("0.14") and not ver.startswith("0.13"):
        _fail(f"hiredis {ver} is too old: 0.13 or newer is needed.")
    modules = [pc for _, pc in LIBRARIES]
    cflags = _pkg("--cflags", *modules) or []
    libs = _pkg("--libs", *modules) or []
    return cflags, libs


def _owner(path: str) -> "str | None":
    """The Debian package that installed ``path`` (merged /usr aware), or None."""
    real = os.path.realpath(path)
    candidates = [real, path]
    for p in (real, path):
        if p.startswith("/lib"):  # /lib -> /usr/lib on merged-/usr systems
            candidates.append("/usr" + p)
    for p in candidates:
        out = subprocess.run(["dpkg-query", "-S", p], capture_output=True, text=True)
        if out.returncode == 0 and ":" in out.stdout:
            return out.stdout.split(":")[0].strip()  # "libuv1:amd64: /usr/lib/..." -> "libuv1"
    return None


def _linked_libraries(ext_path: str) -> list:
    """[(soname, path)] that ``ext_path`` loads, as the dynamic loader resolves them."""
    out = subprocess.run(["ldd", ext_path], capture_output=True, text=True, check=True)
    return re.findall(r"^\s*(\S+) => (/\S+)", out.stdout, flags=re.M)


class build_ext_with_notices(build_ext):
    """build_ext, then the licence notices of the libraries a wheel will bundle."""

    def run(self) -> None:
        super().run()
        if not self.inplace:
            for ext in self.extensions:
                self._copy_notices(self.get_ext_fullpath(ext.name))

    def _copy_notices(self, ext_path: str) -> None:
        dest = os.path.join(self.build_lib, "rategate", "_licenses")
        shutil.rmtree(dest, ignore_errors=True)
        found, missing, index = {}, [], []
        if not (shutil.which("ldd") and shutil.which("dpkg-query")):
            linked = []
            missing.append("every linked library (finding them needs ldd and Debian's dpkg-query)")
        else:
            linked = _linked_libraries(ext_path)
        for soname, path in linked:
            if SYSTEM_SONAMES.match(soname):
                continue
            package = _owner(path)
            if package in SYSTEM_PACKAGES:
                continue
            notice = f"/usr/share/doc/{package}/copyright"
            if package is None or not os.path.isfile(notice):
                missing.append(f"{soname} ({path})")
                continue
            found[package] = notice
            index.append(f"{soname}: {path}, Debian package {package}, notice {package}.copyright")
        if missing:
            msg = ("no licence notice found for " + ", ".join(missing)
                   + ": a wheel would bundle it without one (only Debian's dpkg is supported)")
            if os.environ.get("RATEGATE_REQUIRE_NOTICES") == "1":
                sys.stderr.write(f"\nrategate: {msg}\n\n")
                raise SystemExit(1)
            sys.stderr.write(f"warning: {msg}\n")
        if not found:
            return
        os.makedirs(dest)
        for package, notice in found.items():
            shutil.copyfile(notice, os.path.join(dest, f"{package}.copyright"))
        with open(os.path.join(dest, "README"), "w") as f:
            f.write("rategate._core links these libraries.  A wheel made by `make wheel` carries\n"
                    "them in rategate.libs/ (renamed by auditwheel); a build from source uses the\n"
                    "system's.  Each one's licence notice is the file named, copied from the Debian\n"
                    "package the library comes from.  rategate's own licence is LICENSE (MIT).\n\n")
            f.write("\n".join(index) + "\n")


cflags, libs = _flags()
extra_compile = ["-std=gnu11", "-O2", "-fvisibility=hidden", *cflags]
extra_compile += shlex.split(os.environ.get("RATEGATE_CFLAGS", ""))
extra_link = [*libs, "-lpthread", "-lm", f"-Wl,--version-script={os.path.join(HERE, VERSION_SCRIPT)}",
              *shlex.split(os.environ.get("RATEGATE_LDFLAGS", ""))]

setup(
    ext_modules=[
        Extension(
            "rategate._core",
            sources=sorted(glob("csrc/*.c")),
            depends=sorted(glob("csrc/*.h")) + [VERSION_SCRIPT],
            extra_compile_args=extra_compile,
            extra_link_args=extra_link,
        )
    ],
    cmdclass={"build_ext": build_ext_with_notices},
)
