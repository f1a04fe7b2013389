"""The package type-checks under mypy --strict (with the .pyi of the C core)."""

import subprocess
import sys

import pytest
from source_tree import ROOT, needs_source


@needs_source
def test_mypy_strict() -> None:
    pytest.importorskip("mypy", reason="mypy is installed by the test set-up (scripts/bootstrap.sh)")
    r = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--no-incremental", "rategate"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
