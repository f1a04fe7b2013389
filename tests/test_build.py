"""The build's own error messages: a user without hiredis/libuv headers gets
told which library is missing and how to install it, not a compiler error."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _build(env_extra, tmp_path):
    env = dict(os.environ, **env_extra)
    return subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "--build-temp", str(tmp_path / "t"),
         "--build-lib", str(tmp_path / "l")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )


def test_missing_libraries_named_with_install_command(tmp_path):
    # An empty pkg-config search path: neither hiredis nor libuv is found.
    empty = tmp_path / "pc"
    empty.mkdir()
    r = _build({"PKG_CONFIG_LIBDIR": str(empty), "PKG_CONFIG_PATH": ""}, tmp_path)
    assert r.returncode != 0
    assert "missing system libraries: hiredis, libuv" in r.stderr
    assert "apt-get install libhiredis-dev libuv1-dev" in r.stderr
    assert "Traceback" not in r.stderr


def test_one_missing_library_is_named(tmp_path):
    # Only libuv visible: the message names hiredis alone.
    pc = tmp_path / "pc"
    pc.mkdir()
    libuv_pc = subprocess.run(["pkg-config", "--variable=pcfiledir", "libuv"],
                              capture_output=True, text=True).stdout.strip()
    (pc / "libuv.pc").write_text(Path(libuv_pc, "libuv.pc").read_text())
    r = _build({"PKG_CONFIG_LIBDIR": str(pc), "PKG_CONFIG_PATH": ""}, tmp_path)
    assert r.returncode != 0
    assert "missing system library: hiredis." in r.stderr
    assert "libuv" not in r.stderr.split("missing system library:")[1].split("\n")[0]
