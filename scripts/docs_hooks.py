"""MkDocs hooks of the documentation site (mkdocs.yml ``hooks:``).

- The numbers page is generated at build time from the benchmark's run of
  record, ``bench/results/latest.json``, by the benchmark's own report code
  (``bench.report.markdown``): a page that says ``<!-- numbers -->`` gets the
  tables there, and ``<!-- numbers-summary -->`` the headline figures.
  Nothing in it is copied by hand.  ``bench/results/latest.png`` is added to
  the site as ``numbers.png``.
- Docstrings use reST roles (``:class:`Limiter```); mkdocstrings renders
  them as text, so the role names are dropped from the HTML and the code
  stays (``Limiter``).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "latest.json"
CHART = ROOT / "bench" / "results" / "latest.png"

_ROLE = re.compile(r":(?:class|func|meth|mod|data|attr|exc|obj):(?=<code>)")


def _results() -> dict[str, Any]:
    with open(RESULTS, encoding="utf-8") as f:
        data: dict[str, Any] = json.load(f)
    return data


def _report() -> Any:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from bench import report

    return report


SUMMARY_CASES = ("health", "rategate", "rategate-flood", "python-redis", "slowapi", "fastapi-limiter")


def summary(results: dict[str, Any]) -> str:
    """The headline of a run as one short Markdown table: requests per second
    with as many workers as cores, the ratio to the no-op /health, p99, for
    rategate, its flood of 429s and the usual limiters (the README's table
    too: tests/test_docs.py checks that the README shows this)."""
    report = _report()
    report.compute(results)
    groups = report.groups(results)
    if not groups:
        return "(this run has no HTTP figures)\n"
    workers, group = groups[0]
    rows = {r[0]: r for r in report.http_rows(group)}
    out = ["| case | req/s | × /health | p99 ms |", "|---|---:|---:|---:|"]
    for case in SUMMARY_CASES:
        r = rows.get(case)
        if r is not None:
            out.append(f"| {case} | {r[1]} | {r[2]} | {r[4]} |")
    commit = str((results.get("machine") or {}).get("git_commit") or "")[:7]
    day = str(results.get("started", ""))[:10]
    return (f"`{results.get('command')}` on commit {commit}, {day}, {workers} uvicorn workers "
            f"({(results.get('machine') or {}).get('cores')} cores):\n\n" + "\n".join(out) + "\n")


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if "<!-- numbers" not in markdown:
        return markdown
    results = _results()
    report = _report()
    if "<!-- numbers-summary -->" in markdown:
        markdown = markdown.replace("<!-- numbers-summary -->", summary(results))
    if "<!-- numbers -->" in markdown:
        report.compute(results)
        markdown = markdown.replace("<!-- numbers -->", report.markdown(results))
    return markdown


def on_files(files: Any, config: Any) -> Any:
    from mkdocs.structure.files import File

    if CHART.is_file():
        files.append(File.generated(config, "numbers.png", abs_src_path=str(CHART)))
    return files


def on_page_content(html: str, page: Any, config: Any, files: Any) -> str:
    return _ROLE.sub("", html)
