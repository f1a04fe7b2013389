"""MkDocs hooks of the documentation site (mkdocs.yml ``hooks:``).

- The numbers page is generated at build time from the benchmark's run of
  record, ``bench/results/latest.json``, by the benchmark's own report code
  (``bench.report.markdown``): a page that says ``<!-- numbers -->`` gets the
  tables there, and ``<!-- numbers-summary -->`` the headline figures.
  Nothing in it is copied by hand.  ``bench/results/latest.png`` is added to
  the site as ``numbers.png``.
- The README is no page of the site, so its copy of the headline table is
  written into it by ``python scripts/docs_hooks.py --readme`` (``make
  readme-numbers``), between :data:`README_BEGIN` and :data:`README_END`;
  tests/test_docs.py fails while it is not latest.json's.
- Docstrings use reST roles (``:class:`Limiter```); mkdocstrings renders
  them as text, so the role names are dropped from the HTML and the code
  stays (``Limiter``).
"""

from __future__ import annotations

import json
import re
import sys
import textwrap
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


#: The headline's rows, those the run has, in this order: the baseline, rategate (Redis, its flood
#: of 429s, shm://), then the other limiters.
SUMMARY_CASES = ("health", "rategate", "rategate-flood", "shm", "python-redis", "slowapi", "fastapi-limiter",
                 "traffik", "throttled-py", "limits")
README = ROOT / "README.md"
README_BEGIN = "<!-- numbers-summary: written by `make readme-numbers` from bench/results/latest.json -->"
README_END = "<!-- /numbers-summary -->"


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
    command = str(results.get("command") or "").strip()
    return (f"`{command}` on commit {commit}, {day}, {workers} uvicorn workers "
            f"({(results.get('machine') or {}).get('cores')} cores):\n\n" + "\n".join(out) + "\n"
            + _request_path(results))


def _request_path(results: dict[str, Any]) -> str:
    """One sentence on the middleware's own cost (issue 20's first two figures,
    bench/middleware_cost.py), when the run measured it; else nothing."""
    figs = {t.get("name"): t for t in results.get("targets_20") or []}
    allowed, denied = figs.get("middleware CPU, allowed"), figs.get("middleware CPU, denied")
    if not allowed or not denied or allowed.get("value") is None or denied.get("value") is None:
        return ""

    def said(t: dict[str, Any]) -> str:
        other = re.search(r"Python path ([0-9.]+)", str(t.get("compare") or ""))
        return f"{t['value']:.2f} µs" + (f" (the Python path: {float(other[1]):.2f})" if other else "")

    n = (allowed.get("spread") or {}).get("n", 1)
    text = ("The middleware's own event-loop CPU per request over the bare app "
            f"(`bench/middleware_cost.py`, median of {n} round{'s' if n != 1 else ''}): "
            f"{said(allowed)} for an allowed request, {said(denied)} for one denied from the local cache.")
    return "\n" + textwrap.fill(text, 100) + "\n"


def readme_with_numbers(text: str, results: dict[str, Any]) -> str:
    """``text`` (the README) with the headline table of ``results`` between its markers."""
    begin, end = text.find(README_BEGIN), text.find(README_END)
    if begin < 0 or end < begin:
        raise ValueError(f"README.md has no {README_BEGIN!r} ... {README_END!r} block")
    return text[:begin] + README_BEGIN + "\n" + summary(results) + "\n" + text[end:]


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


def main(argv: list[str]) -> int:
    if argv != ["--readme"]:
        print("usage: python scripts/docs_hooks.py --readme   "
              "(the README's headline table from bench/results/latest.json)", file=sys.stderr)
        return 2
    text = README.read_text(encoding="utf-8")
    new = readme_with_numbers(text, _results())
    if new != text:
        README.write_text(new, encoding="utf-8")
    print(f"README.md: the numbers of {RESULTS.relative_to(ROOT)} ({'rewritten' if new != text else 'unchanged'})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
