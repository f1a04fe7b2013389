"""The documentation site: its configuration, the generated numbers page, the project URLs.

`make docs` (CI) builds the site with --strict; the test below builds it too
when MkDocs is installed (the `docs` extra).  The code blocks of the docs are
type-checked by the docs harness.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import tomllib
from typing import Any

import pytest
from source_tree import ROOT, needs_source

pytestmark = needs_source


def hooks() -> Any:
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "scripts" / "docs_hooks.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def mkdocs_config() -> dict[str, Any]:
    text = (ROOT / "mkdocs.yml").read_text()
    # the few keys read here, without a YAML parser in the test extra
    out: dict[str, Any] = {"repo_url": re.search(r"^repo_url: (\S+)", text, re.M).group(1)}  # type: ignore[union-attr]
    out["pages"] = re.findall(r"^\s+- (?:[^:\n]+: |\"[^\"]+\": )?([\w./-]+\.md)\s*$", text, re.M)
    return out


def test_the_project_urls_agree() -> None:
    with open(ROOT / "pyproject.toml", "rb") as f:
        project = tomllib.load(f)["project"]
    urls = project["urls"]
    repo = mkdocs_config()["repo_url"]
    assert urls["Source"] == urls["Homepage"] == repo
    assert urls["Issues"] == repo + "/issues"
    assert urls["Changelog"].startswith(repo + "/")
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert f"]: {repo}/compare/" in changelog and f"]: {repo}/releases/tag/" in changelog


def test_every_page_is_in_the_nav_and_exists() -> None:
    pages = mkdocs_config()["pages"]
    on_disk = sorted(p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md"))
    assert sorted(pages) == on_disk
    assert len(pages) == len(set(pages))


def test_the_changelog_keeps_a_changelog() -> None:
    text = (ROOT / "CHANGELOG.md").read_text()
    versions = re.findall(r"^## \[([^\]]+)\]", text, re.M)
    assert versions[0] == "Unreleased" and "0.1.0" in versions
    import rategate

    assert rategate.__version__ in versions
    for v in versions:
        assert re.search(rf"^\[{re.escape(v)}\]: https://", text, re.M), v


def test_the_numbers_come_from_the_run_of_record() -> None:
    h = hooks()
    with open(ROOT / "bench" / "results" / "latest.json", encoding="utf-8") as f:
        results = json.load(f)
    page = h.on_page_markdown("# x\n\n<!-- numbers-summary -->\n\n<!-- numbers -->\n", None, None, None)
    assert "<!-- numbers" not in page
    # the figures of the JSON, not copies: health's requests per second, as the report formats them
    for workers, cases in results["http"].items():
        for case in ("health", "rategate", "rategate-flood"):
            assert f"| {case} | {cases[case]['rps']:,.0f} |" in page, (workers, case)
    commit = results["machine"]["git_commit"][:7]
    assert f"on commit {commit}" in page
    summary = h.summary(results)
    assert summary in page
    assert summary.count("\n| ") == len(h.SUMMARY_CASES) + 1  # a row per case, and the separator


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None, reason="MkDocs (the docs extra) is not installed")
def test_the_site_builds_strict(tmp_path: Any) -> None:
    p = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={"NO_MKDOCS_2_WARNING": "1", "PATH": "/usr/bin:/bin"})
    assert p.returncode == 0, p.stdout + p.stderr
    index = (tmp_path / "site" / "index.html").read_text()
    assert "× /health" in index and "rategate-flood" in index
    ref = (tmp_path / "site" / "reference" / "index.html").read_text()
    assert "deny_cache_ttl" in ref and ":class:" not in ref
    assert (tmp_path / "site" / "numbers.png").is_file()


def blocks(page: str, lang: str) -> list[str]:
    """The ```lang blocks of docs/<page>."""
    text = (ROOT / "docs" / page).read_text()
    return re.findall(rf"^```{lang}\n(.*?)^```", text, re.S | re.M)


def test_the_documented_commands_run(redis_server: Any, redis_url: str) -> None:
    """Every `rategate ...` and `redis-cli ...` line of the docs' sh blocks,
    run against a real Redis (the URL in RATEGATE_URL): exit status 0."""
    import shlex

    env = {k: v for k, v in os.environ.items() if k != "RATEGATE_URL"}
    env.update(RATEGATE_URL=redis_url, PYTHONPATH=str(ROOT))
    ran = []
    for page in ("cli.md", "unblocking.md", "changing-limits.md"):
        for block in blocks(page, "sh"):
            for line in block.splitlines():
                words = shlex.split(line, comments=True)
                if not words or words[0] == "export":
                    continue
                if words[0] == "redis-cli":
                    redis_server.client().execute_command(*words[1:])
                elif words[0] == "rategate":
                    p = subprocess.run([sys.executable, "-m", "rategate", *words[1:]], env=env, cwd=ROOT,
                                       capture_output=True, text=True, timeout=60)
                    assert p.returncode == 0, (line, p.stdout, p.stderr)
                else:
                    raise AssertionError(f"{page}: a command this test does not know how to run: {line!r}")
                ran.append(words[0])
    assert ran.count("rategate") >= 8 and "redis-cli" in ran


def test_the_toml_sample_is_taken(tmp_path: Any) -> None:
    import rategate

    (sample,) = blocks("changing-limits.md", "toml")
    path = tmp_path / "limits.toml"
    path.write_text(sample)
    live = rategate.LiveLimits.from_file(path)
    assert live.values == {"default": "100/minute", "chat": "20/minute; 500/day", "export": None}


def test_the_denial_log_sample_is_what_it_writes() -> None:
    import logging

    import rategate
    from rategate.denials import DenialLog

    (sample,) = blocks("denial-log.md", "text")
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    logger = logging.getLogger("test.docs.denials")
    logger.addHandler(Keep())
    logger.propagate = False
    t = [0.0]
    log = DenialLog(logger=logger, clock=lambda: t[0])
    key = rategate.header("x-api-key")
    log.note("api", "api|203.0.113.9", "/api/search", 12.0)
    log.note("api", b"api|x-api-key=k-live-7Hq", "/api/chat", 0.5, key.redact)
    for _ in range(41):
        t[0] += 1.0
        log.note("api", b"api|x-api-key=k-live-7Hq", "/api/chat", 0.5, key.redact)
    t[0] += 60.0
    log.note("api", b"api|x-api-key=k-live-7Hq", "/api/chat", 0.5, key.redact)
    assert [lines[0], lines[2]] == sample.splitlines()
