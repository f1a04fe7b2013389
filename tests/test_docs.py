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
    # a row per case of the headline the run has (in the summary's order), and the separator
    headline = results["http"][str(h._report().groups(results)[0][0])]
    present = [c for c in h.SUMMARY_CASES if c in headline]
    assert summary.count("\n| ") == len(present) + 1
    assert re.findall(r"^\| ([\w-]+) \|", summary, re.M)[1:] == present


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
    return [code + "\n" for _, lg, code in fenced(f"docs/{page}") if lg == lang]


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


# -- the README, and every code block of the docs ------------------------------------------------
_FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w+-]*)[^\n]*$")
#: What a fenced block may be: Python (type-checked by tests/test_typing_docs.py), commands
#: (checked or run below), a TOML sample (loaded above), or text: what a program printed or wrote
#: (pycon: what an interactive Python session printed).
LANGS = {"python", "sh", "toml", "text", "pycon"}


def markdown_files() -> list[str]:
    return ["README.md"] + sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").rglob("*.md"))


def fenced(path: str) -> list[tuple[int, str, str]]:
    """(line, language, code) of every fenced block of a Markdown file of the repo."""
    lines = (ROOT / path).read_text().splitlines()
    out, i = [], 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if m is None:
            i += 1
            continue
        start, indent, body = i, m.group("indent"), []
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i])
            i += 1
        out.append((start + 1, m.group("lang"), "\n".join(body)))
        i += 1
    return out


def test_the_readme_is_short_and_keeps_the_two_commands() -> None:
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    # CI and visitors read the test command from the README's first block.
    first = fenced("README.md")[0]
    assert first[1] == "sh" and [line.split()[:2] for line in first[2].splitlines()] == [["make", "bench"],
                                                                                            ["make", "test"]]
    # The PyPI name is not ours: the warning comes before any command that would install that package.
    assert text.index("`pip install rategate` installs something else") < text.index("pip install dist/")
    assert "pip install rategate\n" not in text and "pip install rategate " not in text
    assert "OpenSSL, once the core uses it" not in text


def test_the_readme_shows_the_numbers_of_record() -> None:
    """The README's table is the run of record's (`make readme-numbers` writes it)."""
    h = hooks()
    text = (ROOT / "README.md").read_text()
    assert h.README_BEGIN in text and h.README_END in text
    assert h.readme_with_numbers(text, h._results()) == text, "run `make readme-numbers`"


def test_the_readme_links_resolve() -> None:
    """Each relative link of the README names a file of the repo, and its #anchor a heading there."""
    text = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert len(links) >= 20
    for link in links:
        if link.startswith("https://"):
            continue
        path, _, anchor = link.partition("#")
        target = ROOT / path
        assert target.exists(), link
        if anchor:
            headings = re.findall(r"^#+ (.+)$", target.read_text(), re.M)
            slugs = {re.sub(r"[^\w\- ]", "", h.lower()).strip().replace(" ", "-") for h in headings}
            assert anchor in slugs, (link, sorted(slugs))


def test_every_fenced_block_says_what_it_is() -> None:
    """Every block is one this suite checks: python, sh, toml, or text (what a program printed)."""
    bad = [(f, line, lang) for f in markdown_files() for line, lang, _ in fenced(f) if lang not in LANGS]
    assert not bad, bad


def _makefile_targets() -> set[str]:
    return set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))


def _apt_packages() -> set[str]:
    text = (ROOT / "scripts" / "bootstrap.sh").read_text()
    return {p for group in re.findall(r"APT_PACKAGES\+?=\(([^)]*)\)", text) for p in group.split()}


#: The pages whose `rategate` and `redis-cli` lines test_the_documented_commands_run runs.
RUN_PAGES = ("docs/cli.md", "docs/unblocking.md", "docs/changing-limits.md")


def check_command(page: str, words: list[str]) -> str:
    """Why the command ``words`` of ``page`` is real (what runs it, or what it was checked
    against); raises AssertionError when it is not."""
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
        words = words[1:]  # VAR=value in front
    cmd, args = words[0], words[1:]
    if cmd == "export":
        return "environment"
    if cmd in ("rategate", "redis-cli"):
        assert page in RUN_PAGES, f"{page}: add it to RUN_PAGES so its {cmd} lines run"
        return "run by test_the_documented_commands_run"
    if cmd == "make":
        assert args and args[0] in _makefile_targets(), f"no Makefile target {args[:1]}"
        assert all("=" in a for a in args[1:]), args
        return "a Makefile target"
    if cmd == "sudo":
        cmd, args = args[0], args[1:]
    if cmd == "apt-get":
        assert args[0] == "install" and set(args[1:]) <= _apt_packages(), args
        return "the packages scripts/bootstrap.sh installs"
    if cmd == "pip":
        import rategate

        assert args[0] == "install", args
        rest = args[1:]
        while rest:
            a = rest.pop(0)
            if a.startswith("dist/"):  # what scripts/wheel.sh builds
                assert re.fullmatch(rf"dist/rategate-{re.escape(rategate.__version__)}-(cp3\d+)-\1-"
                                    r"manylinux_2_34_x86_64\.whl", a), a
            elif a == "-r":
                assert (ROOT / rest.pop(0)).is_file(), args
            else:  # a checkout; never a name PyPI would resolve (`rategate` there is not this)
                assert a in (".", "-e"), f"pip install {a}: not from PyPI"
        return "the wheel's name, a requirements file of the repo, or the checkout"
    if cmd == "uvicorn":
        from uvicorn.main import main as uvicorn_cli

        uvicorn_cli.make_context("uvicorn", list(args))  # its options, as uvicorn parses them
        assert "--lifespan" in args and args[args.index("--lifespan") + 1] == "on", \
            f"run commands use --lifespan on: {words}"
        app = args[0].partition(":")[0]
        assert app == "app" or (ROOT / (app.replace(".", "/") + ".py")).is_file(), app
        return "uvicorn's own option parser"
    if cmd == "bash":
        assert (ROOT / args[0]).is_file(), args[0]
        return "a script of the repo"
    if cmd in ("python", ".venv/bin/python"):
        if args[:2] == ["-m", "pytest"]:
            files = [a.split("::")[0] for a in args[2:] if a.startswith("tests/")]
            assert files and all((ROOT / f).is_file() for f in files), args
            return "tests of the suite"
        if args[:2] == ["-m", "bench.run"]:
            sys.path.insert(0, str(ROOT))
            from bench import run as bench_run

            bench_run.parse_args(args[2:])  # exits on an unknown option or case
            return "the benchmark's own option parser"
        assert args and (ROOT / args[0]).is_file(), args
        return "a script of the repo"
    raise AssertionError(f"{page}: a command this test does not know: {' '.join(words)}")


def test_every_command_in_the_docs_is_real() -> None:
    """Every line of every sh block of the README and the docs is a command that is run by a
    test (rategate, redis-cli, the README's uvicorn lines), or checked against what it names: a
    Makefile target (CI runs them), uvicorn's and the benchmark's own option parsers, a test file,
    a script, the apt packages bootstrap installs, the wheel's name."""
    import shlex

    seen = 0
    for page in markdown_files():
        for line_no, lang, code in fenced(page):
            if lang != "sh":
                continue
            for line in code.splitlines():
                words = shlex.split(line, comments=True)
                if words:
                    try:
                        check_command(page, words)
                    except (AssertionError, SystemExit) as e:
                        raise AssertionError(f"{page}:{line_no}: {line}: {e}") from None
                    seen += 1
    assert seen >= 30


def test_the_command_check_can_fail() -> None:
    import click

    for words in (["make", "tset"], ["uvicorn", "app:app"], ["uvicorn", "app:app", "--lifespan", "on", "--wrokers", "2"],
                  ["python", "-m", "bench.run", "--cases", "nope"], ["pip", "install", "rategate"],
                  ["sudo", "apt-get", "install", "libhiredis-devel"], ["curl", "http://x"]):
        with pytest.raises((AssertionError, SystemExit, click.UsageError)):
            check_command("docs/x.md", words)


def _run_lines(page: str) -> list[list[str]]:
    """The uvicorn lines of a page's sh blocks, as words."""
    import shlex

    return [shlex.split(line, comments=True) for _, lang, code in fenced(page) if lang == "sh"
            for line in code.splitlines() if "uvicorn" in shlex.split(line, comments=True)[:3]]


def test_the_readme_runs_as_written(redis_server: Any, tmp_path: Any) -> None:
    """The README's FastAPI block is a whole app: served by the README's own uvicorn command, the
    101st request is a 429 with Retry-After, /health is never limited; and the example command runs."""
    from test_uvicorn import Uvicorn

    redis_server.flushall()
    (_, _, two_lines), = [b for b in fenced("README.md") if b[1] == "python" and "FastAPI()" in b[2]]
    assert two_lines.count('"redis://127.0.0.1:6379/0"') == 1
    (tmp_path / "app.py").write_text(
        two_lines.replace("redis://127.0.0.1:6379/0", redis_server.url) + "\n\n\n"
        '@app.get("/")\nasync def root() -> dict[str, str]:\n    return {"hello": "world"}\n\n\n'
        '@app.get("/health")\nasync def health() -> dict[str, str]:\n    return {"ok": "yes"}\n')
    runs = _run_lines("README.md")
    assert [w[:2] for w in runs] == [["uvicorn", "app:app"], ["RATEGATE_REDIS_URL=redis://127.0.0.1:6379/0", "uvicorn"]]
    srv = Uvicorn(*runs[0][1:], cwd=str(tmp_path))
    try:
        with srv.client("127.0.0.41") as c:
            codes = [c.get("/").status_code for _ in range(101)]
            assert codes == [200] * 100 + [429]
            r = c.get("/")
            assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
            assert r.headers["ratelimit-policy"] == "100;w=60"
            assert [c.get("/health").status_code for _ in range(5)] == [200] * 5
    finally:
        srv.stop()
    env_word, _, module, *args = runs[1]
    srv = Uvicorn(module, *args, env={env_word.partition("=")[0]: redis_server.url})
    try:
        with srv.client("127.0.0.42") as c:
            assert [c.get("/limited").status_code for _ in range(6)] == [200] * 5 + [429]
            assert c.get("/health").status_code == 200
    finally:
        srv.stop()
