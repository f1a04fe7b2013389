"""What users paste type-checks: every ```python block of README.md and
docs/*.md, and every example, under ``mypy --strict`` and basedpyright
(pyright's checker, from PyPI; "standard" mode, pyright's default), as a user's
strict project would check them (issue 16 #7: ``Depends(rategate.RateLimit(...))``
was ``"object" not callable``).

A block is checked as the body of an ``async def`` (so ``await`` at its top
level is fine), after a prelude that defines what the docs use without
defining it (``app``, ``limiter``, ``routes``...: :data:`PRELUDE`).  A block
that ends in decorators (``@app.get(...)`` shown alone) gets a stub endpoint
under them.  A block that is not meant to be checked (pseudo-code, output)
is fenced as something other than ``python``.  Pages other helpers write are
covered as they land: the files are found by glob.

    python tests/test_typing_docs.py [FILE.md ...]    # the report, by block, without pytest
"""

from __future__ import annotations

import ast
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass

import pytest
from source_tree import ROOT as _ROOT_PATH
from source_tree import needs_source

ROOT = str(_ROOT_PATH)

#: Names the documentation uses without defining them, typed as a user's app would have them.
PRELUDE = '''\
from __future__ import annotations

import asyncio
import os
import re
from typing import Any

import rategate
from fastapi import APIRouter, Depends, FastAPI, Request, Response
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import Mount, Route
from starlette.types import Scope

app = FastAPI()
limiter = rategate.Limiter("memory://")
routes: list[Route] = []
uid = 42


async def call_the_model(*args: Any, **kwargs: Any) -> Any: ...
'''

#: Blocks of the README as it stands that fail for a reason in their text,
#: not in rategate's types; the README is being rewritten into docs/ (issue
#: 19), which fixes them.  Keyed by the first 12 hex digits of the SHA-1 of
#: the block's code: each is asserted to still fail (an xfail that passes is
#: an error), and an entry that matches no block any more fails too, so the
#: list cannot go stale.  Delete an entry when its block is fixed.
KNOWN_BAD: dict[str, str] = {
    "7e2a7676a58c": "README 'Limits that depend on the request': def plan_limits(scope) has no annotations "
                    "(mypy --strict: no-untyped-def); write (scope: Scope) -> str | None",
    "a9212475cfc1": "README 'Charging the real cost': estimate(scope) and completions(request) have no "
                    "annotations (no-untyped-def)",
    "af4703f9c5aa": "README 'Metrics': app.add_route() takes a request -> response endpoint, and "
                    "metrics.asgi_app() is an ASGI app; mount it (app.routes.append(Route('/metrics', "
                    "metrics.asgi_app()))) instead",
}

_FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w+-]*)[^\n]*$")


@dataclass
class Block:
    source: str  # "README.md:23"
    code: str

    @property
    def digest(self) -> str:
        return hashlib.sha1(self.code.encode()).hexdigest()[:12]


def blocks_of(path: str) -> list[Block]:
    """The ```python blocks of a Markdown file (a block indented under a list item is dedented)."""
    out: list[Block] = []
    rel = os.path.relpath(path, ROOT)
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if m is None:
            i += 1
            continue
        start, lang, indent = i, m.group("lang"), m.group("indent")
        i += 1
        body = []
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i])
            i += 1
        i += 1
        if lang in ("python", "py"):
            out.append(Block(f"{rel}:{start + 1}", textwrap.dedent("\n".join(body))))
    return out


def doc_blocks() -> list[Block]:
    files = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "**", "*.md"),
                                                                 recursive=True))
    return [b for f in files if os.path.exists(f) for b in blocks_of(f)]


def as_module(block: Block) -> str:
    """The module that type-checks ``block``: the prelude, then the block as an async function's body."""
    code = "\n".join(line for line in block.code.splitlines() if line.strip() != "from __future__ import annotations")
    try:
        ast.parse(code)
    except SyntaxError:
        if any(line.lstrip().startswith("@") for line in code.splitlines()):
            code += "\nasync def _endpoint() -> None: ...\n"
    body = textwrap.indent(code, "    ") if code.strip() else "    pass"
    return f"{PRELUDE}\n\n# {block.source}\nasync def _snippet() -> None:\n{body}\n    return None\n"


def _modname(source: str) -> str:
    return "doc_" + re.sub(r"\W", "_", source)


def check(blocks: list[Block], examples: list[str], tmp: str) -> dict[str, list[str]]:
    """{source: [error lines]} from mypy --strict and basedpyright over ``blocks`` and ``examples``."""
    files: dict[str, str] = {}
    for b in blocks:
        path = os.path.join(tmp, _modname(b.source) + ".py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(as_module(b))
        files[path] = b.source
    for e in examples:
        path = os.path.join(tmp, "example_" + os.path.basename(e))
        shutil.copy(e, path)
        files[path] = os.path.relpath(e, ROOT)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               MYPYPATH=ROOT)
    errors: dict[str, list[str]] = {}
    r = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--cache-dir", os.path.join(tmp, ".mypy"),
                        "--no-error-summary", "--show-error-codes", *files], cwd=tmp, env=env,
                       capture_output=True, text=True, timeout=600)
    for line in r.stdout.splitlines():
        path = line.split(":", 1)[0]
        full = os.path.join(tmp, path) if not os.path.isabs(path) else path
        if ": error:" in line and full in files:
            errors.setdefault(files[full], []).append("mypy: " + line.split(":", 1)[1])
    if r.returncode not in (0, 1) or (r.returncode == 1 and not errors):
        raise RuntimeError(f"mypy did not run:\n{r.stdout}\n{r.stderr}")
    config = {"typeCheckingMode": "standard", "pythonVersion": f"{sys.version_info[0]}.{sys.version_info[1]}",
              "extraPaths": [ROOT], "include": list(files)}
    with open(os.path.join(tmp, "pyrightconfig.json"), "w") as f:
        json.dump(config, f)
    r = subprocess.run([sys.executable, "-m", "basedpyright", "--outputjson", "--pythonpath", sys.executable,
                        "--project", tmp], cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    try:
        report = json.loads(r.stdout)
    except json.JSONDecodeError:
        raise RuntimeError(f"basedpyright did not run:\n{r.stdout}\n{r.stderr}") from None
    for d in report.get("generalDiagnostics", []):
        if d.get("severity") == "error" and d.get("file") in files:
            line = d["range"]["start"]["line"] + 1
            errors.setdefault(files[d["file"]], []).append(
                f"pyright: {line}: {d['message'].splitlines()[0]} [{d.get('rule', '')}]")
    return errors


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    pytest.importorskip("mypy", reason="mypy is in the test extra (pyproject.toml)")
    pytest.importorskip("basedpyright", reason="basedpyright is in the test extra (pyproject.toml)")
    examples = sorted(glob.glob(os.path.join(ROOT, "examples", "*.py")))
    examples = [e for e in examples if not e.endswith("__init__.py")]
    return check(doc_blocks(), examples, str(tmp_path_factory.mktemp("typing-docs")))


def _ids() -> list[str]:
    return [b.source for b in doc_blocks()]


@needs_source
@pytest.mark.parametrize("source", _ids())
def test_doc_block_type_checks(source: str, results: dict[str, list[str]]) -> None:
    block = next(b for b in doc_blocks() if b.source == source)
    errs = results.get(source, [])
    why = KNOWN_BAD.get(block.digest)
    if why is not None:
        assert errs, f"{source} now type-checks: remove it from KNOWN_BAD ({why})"
        pytest.xfail(why)
    assert not errs, f"{source}:\n{block.code}\n\n" + "\n".join(errs)


@needs_source
def test_known_bad_blocks_still_exist() -> None:
    digests = {b.digest for b in doc_blocks()}
    stale = {k: v for k, v in KNOWN_BAD.items() if k not in digests}
    assert not stale, f"KNOWN_BAD entries that match no block any more (fixed or moved): delete them: {stale}"


@needs_source
def test_examples_type_check(results: dict[str, list[str]]) -> None:
    bad = {k: v for k, v in results.items() if k.startswith("examples")}
    assert not bad, bad


@needs_source
def test_the_checkers_catch_a_wrong_call(tmp_path: pytest.TempPathFactory) -> None:
    """The harness fails a block that misuses the API (it is not a test that cannot fail)."""
    pytest.importorskip("basedpyright")
    bad = Block("bad.md:1", 'x: int = rategate.RateLimit("1/s", limiter=limiter)\n')
    # Limiter.submit is typed (it was Any): its result is no str.
    submit = Block("bad.md:2", 'y: str = limiter.submit("k", limiter.compile("1/s"), 1)\n')
    errs = check([bad, submit], [], str(tmp_path))
    for source in ("bad.md:1", "bad.md:2"):
        assert any(e.startswith("mypy") for e in errs[source]), errs
        assert any(e.startswith("pyright") for e in errs[source]), errs


def main(argv: list[str]) -> int:
    files = argv or [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
    blocks = [b for f in files for b in blocks_of(f)]
    examples = sorted(e for e in glob.glob(os.path.join(ROOT, "examples", "*.py")) if not e.endswith("__init__.py"))
    with tempfile.TemporaryDirectory() as tmp:
        errors = check(blocks, examples, tmp)
    for source, errs in sorted(errors.items()):
        print(source)
        for e in errs:
            print("   ", e)
    print(f"{len(blocks)} blocks, {len(examples)} examples: {len(errors)} with errors")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.exit(main(sys.argv[1:]))
