"""Where the source tree is, and a mark for the tests that need it.

The suite runs two ways: from a checkout against the extension built in place
(``make test``), and from a copy of tests/ against an installed wheel
(``make test-wheel``), where there is no csrc/, setup.py or rategate/ beside
it.  The tests that read or build the source skip themselves in the second.
"""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

HAVE_SOURCE = (ROOT / "setup.py").is_file() and (ROOT / "csrc").is_dir() and (ROOT / "rategate").is_dir()

needs_source = pytest.mark.skipif(
    not HAVE_SOURCE,
    reason=f"needs the source tree (setup.py, csrc/, rategate/) beside tests/, not found in {ROOT}: "
    "this run tests an installed package",
)
