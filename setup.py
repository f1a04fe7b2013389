"""Build rategate._core from csrc/*.c against the system hiredis and libuv.

Both libraries are found with pkg-config.  When one is missing, the build
stops with a message naming it and the command that installs it, instead of
a compiler traceback about a missing header.

Environment:
  RATEGATE_CFLAGS   extra compiler flags (CI: "-Wall -Wextra -Werror";
                    the sanitizer build: "-fsanitize=address,undefined ...")
  RATEGATE_LDFLAGS  extra linker flags
"""

import os
import shlex
import shutil
import subprocess
import sys
from glob import glob

from setuptools import Extension, setup

INSTALL_HINT = (
    "On Debian/Ubuntu: sudo apt-get install libhiredis-dev libuv1-dev pkg-config\n"
    "On Fedora: sudo dnf install hiredis-devel libuv-devel pkgconf\n"
    "On macOS: brew install hiredis libuv pkg-config"
)


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
        _fail("pkg-config is not installed (it finds hiredis and libuv).")
    missing = [lib for lib, pc in (("hiredis", "hiredis"), ("libuv", "libuv")) if _pkg("--exists", pc) is None]
    if missing:
        _fail(f"missing system librar{'y' if len(missing) == 1 else 'ies'}: {', '.join(missing)}.")
    ver = (_pkg("--modversion", "hiredis") or ["0"])[0]
    major = int(ver.split(".")[0]) if ver.split(".")[0].isdigit() else 0
    if major < 1 and not ver.startswith("0.14") and not ver.startswith("0.13"):
        _fail(f"hiredis {ver} is too old: 0.13 or newer is needed.")
    cflags = _pkg("--cflags", "hiredis", "libuv") or []
    libs = _pkg("--libs", "hiredis", "libuv") or []
    return cflags, libs


cflags, libs = _flags()
extra_compile = ["-std=gnu11", "-O2", "-fvisibility=hidden", *cflags]
extra_compile += shlex.split(os.environ.get("RATEGATE_CFLAGS", ""))
extra_link = [*libs, "-lssl", "-lcrypto", "-lpthread", "-lm", *shlex.split(os.environ.get("RATEGATE_LDFLAGS", ""))]

setup(
    ext_modules=[
        Extension(
            "rategate._core",
            sources=sorted(glob("csrc/*.c")),
            depends=sorted(glob("csrc/*.h")),
            extra_compile_args=extra_compile,
            extra_link_args=extra_link,
        )
    ],
)
