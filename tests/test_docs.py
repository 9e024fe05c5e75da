"""The docs stay true to the repository: links and anchors resolve, the `hub` commands they show exist,
and docs/benchmarks.md shows the figures in bench/results/results.json.

Fast on purpose (no model loads): markdown is parsed here, and each distinct command path runs its `--help` once.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import typer.main

pytestmark = pytest.mark.slow  # runs `hub ... --help` as a process for every command the docs show

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "examples" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^\s*(```|~~~)")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
INLINE_CODE = re.compile(r"`[^`]*`")
COMMAND_WORD = re.compile(r"[a-z][a-z0-9-]*")


def prose_and_code(text: str) -> tuple[list[str], list[str]]:
    """The page's lines outside fenced code blocks, and those inside."""
    prose: list[str] = []
    code: list[str] = []
    fenced = False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        (code if fenced else prose).append(line)
    return prose, code


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every anchor a page's headings make, with GitHub's -1, -2 ... for repeated ones."""
    seen: dict[str, int] = {}
    out: set[str] = set()
    for line in prose_and_code(page.read_text())[0]:
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(page: Path) -> list[str]:
    """Relative link targets in the page's prose (code blocks and inline code are not links)."""
    found: list[str] = []
    for line in prose_and_code(page.read_text())[0]:
        found += LINK.findall(INLINE_CODE.sub("", line))
    return [t for t in found if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]  # http:, https:, mailto: ...


def shown(path: Path) -> Path:
    """A path as a message shows it: relative to the repository when inside it."""
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


def broken_links(page: Path) -> list[str]:
    """The page's relative links whose file or anchor does not exist."""
    broken = []
    for target in links(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target} (no file {shown(dest)})")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target} (no heading makes #{anchor} in {shown(dest)})")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_and_anchors_resolve(page: Path) -> None:
    assert page.is_file()
    assert broken_links(page) == []


def test_anchor_slugs_follow_github() -> None:
    assert slug("The manifest (one per version)") == "the-manifest-one-per-version"
    assert slug("`hub serve` options") == "hub-serve-options"
    assert slug("Into the base: `hub export --merged`") == "into-the-base-hub-export---merged"
    assert slug("The repo's own `registry.json`") == "the-repos-own-registryjson"


def test_a_broken_link_is_reported(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    (tmp_path / "other.md").write_text("# Other page\n")
    page.write_text("# Title\n\n[ok](other.md#other-page) [self](#title) [no file](missing.md) "
                    "[no anchor](other.md#nowhere)\n\n```\n[in code](missing.md)\n```\n")
    assert broken_links(page) == ["missing.md (no file " + str(tmp_path / "missing.md") + ")",
                                  "other.md#nowhere (no heading makes #nowhere in " + str(tmp_path / "other.md") + ")"]


def cli() -> Any:
    """The `hub` command group (typer's click objects) as pyproject.toml's entry point names it."""
    target = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]["hub"]
    module, _, attr = target.partition(":")
    return typer.main.get_command(getattr(importlib.import_module(module), attr))


def hub_mentions(page: Path) -> list[list[str]]:
    """The words after `hub` wherever a page shows a command: code lines (after `$ `, `|`, `&&`) and inline code."""
    prose, code = prose_and_code(page.read_text())
    snippets = [s for line in code for s in re.split(r"\|\||\||&&|;", re.sub(r"^\s*\$\s+", "", line))]
    snippets += [span.strip("`") for line in prose for span in INLINE_CODE.findall(line)]
    return [s.split()[1:] for s in snippets if re.match(r"^\s*hub\s", s.strip() + " ") and s.split()[0] == "hub"]


def command_path(group: Any, words: list[str]) -> tuple[str, ...] | None:
    """The command a mention names (`base prepare`, `list`), or None for output lines such as `hub serve: ...`."""
    path: list[str] = []
    command = group
    for word in words:
        if not COMMAND_WORD.fullmatch(word) or not hasattr(command, "commands"):
            break
        sub = command.commands.get(word)
        if sub is None:
            if command is group:
                return (word,)  # not a command: reported by the test
            break
        path.append(word)
        command = sub
    return tuple(path) or None


def shown_commands() -> dict[tuple[str, ...], set[str]]:
    """Each command path the pages show, with the options (`--name`) shown with it."""
    group = cli()
    found: dict[tuple[str, ...], set[str]] = {}
    for page in PAGES:
        for words in hub_mentions(page):
            path = command_path(group, words)
            if path:
                shown_words = words[:words.index("#")] if "#" in words else words
                options = (w.strip("[]").split("=")[0] for w in shown_words)  # `[--seed S]`, `--weights=-1,1`
                found.setdefault(path, set()).update(o for o in options if re.fullmatch(r"--[a-z][a-z0-9-]*", o))
    return found


def test_readme_shows_commands() -> None:
    readme = {command_path(cli(), words) for words in hub_mentions(ROOT / "README.md")}
    assert {("push",), ("serve",), ("generate",), ("base", "prepare")} <= readme


def test_every_shown_hub_command_and_option_exists() -> None:
    def run(item: tuple[tuple[str, ...], set[str]]) -> tuple[str, str] | None:
        path, options = item
        proc = subprocess.run([sys.executable, "-m", "hub", *path, "--help"], cwd=ROOT, capture_output=True,
                              text=True, timeout=120, env={**os.environ, "COLUMNS": "200"})
        if proc.returncode != 0:
            return " ".join(path), f"exit {proc.returncode}: {proc.stderr.strip()[-300:]}"
        missing = sorted(o for o in options if not re.search(rf"{re.escape(o)}(?![a-z0-9-])", proc.stdout))
        return (" ".join(path), f"options not in --help: {missing}") if missing else None

    with ThreadPoolExecutor(max_workers=4) as pool:
        failed = [r for r in pool.map(run, sorted(shown_commands().items())) if r]
    assert failed == []


def test_benchmarks_page_shows_the_latest_results() -> None:
    spec = importlib.util.spec_from_file_location("bench_report", ROOT / "bench" / "report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    page = report.PAGE.read_text()
    assert report.updated(page, json.loads(report.RESULTS.read_text())) == page, \
        "docs/benchmarks.md is out of date: run python bench/report.py"
