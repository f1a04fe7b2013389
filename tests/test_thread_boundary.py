"""The loop threads never touch a PyObject: checked on the source.

Everything a loop thread runs lives in the files below (engine.c, conn.c, batch.c,
port.c and what they call).  None of them may include Python.h (directly or
through module.h) or name any Py*/_Py* API outside comments: the only way
for a Python object to reach a loop thread would be through one of them.
The Python-facing code (module.c, pyengine.c) reaches the loop threads only
through the functions declared in engine.h and port.h.
"""

import re
from pathlib import Path

import pytest
from source_tree import ROOT, needs_source

pytestmark = needs_source
CSRC = ROOT / "csrc"
LOOP_THREAD_FILES = ["engine.c", "engine.h", "conn.c", "conn.h", "topology.c", "topology.h", "batch.c", "batch.h", "port.c", "port.h",
                     "check.c", "check.h", "gcra.c", "gcra.h", "cache.c", "cache.h", "lease.c", "lease.h",
                     "memstore.c", "memstore.h", "script.c", "script.h", "shmstore.c", "shmstore.h",
                     "topk.c", "topk.h", "gate.c", "gate.h"]


def _code(path: Path) -> str:
    """The file without comments and string literals."""
    text = path.read_text()
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    text = re.sub(r"//[^\n]*", " ", text)
    return re.sub(r'"(?:\\.|[^"\\])*"', '""', text)


@pytest.mark.parametrize("name", LOOP_THREAD_FILES)
def test_no_python_api_in_loop_thread_code(name: str) -> None:
    code = _code(CSRC / name)
    includes = re.findall(r'#\s*include\s*[<"]([^>"]+)[>"]', code)
    assert not [i for i in includes if i in ("Python.h", "module.h") or i.startswith("py")], includes
    assert not re.findall(r"\b_?Py[A-Z_]\w*", code)


def test_every_c_file_is_classified() -> None:
    # A new .c file must be put on one side of the boundary on purpose.
    python_side = {"module.c", "module.h", "pyengine.c", "pylocal.c", "pygate.c"}
    assert {p.name for p in CSRC.glob("*.[ch]")} == set(LOOP_THREAD_FILES) | python_side
