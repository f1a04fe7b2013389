"""The build and what it produces.

From the source tree: a user without the hiredis/libuv/OpenSSL headers gets
told which library is missing and how to install it, not a compiler error.
Against any build (in place or an installed wheel): the extension exports
only its init function, and reports the package's version.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from source_tree import ROOT, needs_source

import rategate
from rategate import _core

# pkg-config module -> the name the message uses, and its .pc files.
PC_FILES = {"hiredis": ["hiredis.pc"], "libuv": ["libuv.pc"],
            "openssl": ["openssl.pc", "libssl.pc", "libcrypto.pc"]}


def _build(env_extra, tmp_path):
    env = dict(os.environ, **env_extra)
    return subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "--build-temp", str(tmp_path / "t"),
         "--build-lib", str(tmp_path / "l")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )


@needs_source
def test_missing_libraries_named_with_install_command(tmp_path):
    # An empty pkg-config search path: none of the libraries is found.
    empty = tmp_path / "pc"
    empty.mkdir()
    r = _build({"PKG_CONFIG_LIBDIR": str(empty), "PKG_CONFIG_PATH": ""}, tmp_path)
    assert r.returncode != 0
    assert "missing system libraries: hiredis, libuv, openssl." in r.stderr
    assert "apt-get install libhiredis-dev libuv1-dev libssl-dev pkg-config" in r.stderr
    assert "Traceback" not in r.stderr


@needs_source
@pytest.mark.parametrize("missing", sorted(PC_FILES))
def test_one_missing_library_is_named(missing, tmp_path):
    # Every library visible but one: the message names that one alone.
    pc = tmp_path / "pc"
    pc.mkdir()
    for module, files in PC_FILES.items():
        if module == missing:
            continue
        pcdir = subprocess.run(["pkg-config", "--variable=pcfiledir", module],
                               capture_output=True, text=True, check=True).stdout.strip()
        for name in files:
            (pc / name).write_text(Path(pcdir, name).read_text())
    r = _build({"PKG_CONFIG_LIBDIR": str(pc), "PKG_CONFIG_PATH": ""}, tmp_path)
    assert r.returncode != 0
    assert f"missing system library: {missing}.\n" in r.stderr
    assert "Traceback" not in r.stderr


def test_extension_exports_only_its_init_function():
    # csrc/rategate.map: nothing of ours, nor of the libraries a wheel
    # bundles, may interpose on the same names loaded by another extension
    # (uvloop's libuv, hiredis-py, Python's _ssl).
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm (binutils) is not installed")
    out = subprocess.run([nm, "-D", "--defined-only", _core.__file__],
                         capture_output=True, text=True, check=True).stdout
    assert re.findall(r"^\S+ [A-Za-z] (\S+)$", out, flags=re.M) == ["PyInit__core"], out


def test_version_is_the_distributions():
    # One source of truth: pyproject.toml reads rategate.__version__; the
    # installed distribution (make test-wheel) reports the same.
    from importlib import metadata

    assert re.fullmatch(r"\d+\.\d+\.\d+", rategate.__version__)
    if Path(rategate.__file__).resolve().is_relative_to(ROOT):
        pytest.skip("rategate is imported from the source tree (in-place build), not an installed distribution")
    assert metadata.version("rategate") == rategate.__version__
