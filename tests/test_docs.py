"""The links of README.md and docs/*.md lead somewhere.

Every relative link (``[text](target)``, images and reference definitions too) must
name a file or folder of the repository, relative to the page it is on, and every
``#anchor`` into a markdown page (``#anchor`` alone: the page itself) must be the
anchor of one of that page's headings as GitHub writes it: the heading's text
lowercased, punctuation dropped except ``-`` and ``_``, each space turned into ``-``,
and ``-1``, ``-2``, ... appended to the second, third, ... heading of the same text.
Links with a scheme (``https:``, ``mailto:``) are not followed. Code, fenced or
inline, holds no links.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import pytest

from devtools.gateway_server import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r" {0,3}(`{3,}|~{3,})")
HEADING = re.compile(r" {0,3}(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$")
INLINE_CODE = re.compile(r"(`+)(?!`)(.+?)(?<!`)\1(?!`)", re.S)
# [text](target) or [text](target "title"); the text may hold code and brackets.
INLINE_LINK = re.compile(r"\]\(\s*(<[^>\n]*>|[^\s)]+)(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)")
# [label]: target, at the start of a line (links() numbers lines as "N\0line").
REFERENCE = re.compile(r"^\d+\x00 {0,3}\[[^\]]+\]:[ \t]*(<[^>\n]*>|\S+)", re.M)
SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:")


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(1-based line number, line) of every line outside fenced code blocks."""
    kept: list[tuple[int, str]] = []
    fence: str | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        opening = FENCE.match(line)
        if fence is None:
            if opening:
                fence = opening.group(1)
            else:
                kept.append((number, line))
        elif opening and set(line.strip()) == {fence[0]} and len(line.strip()) >= len(fence):
            fence = None
    return kept


def slug(heading: str) -> str:
    """GitHub's anchor of a heading (before the -1, -2 of repeated headings)."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links: their text
    # Emphasis marks go (not the underscores of snake_case); code keeps its text.
    parts = re.split(r"(`+[^`]*`+)", text)
    text = "".join(
        part.strip("`") if part.startswith("`") else re.sub(r"\*+|\b_+|_+\b", "", part)
        for part in parts
    )
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


@cache
def anchors(page: Path) -> frozenset[str]:
    seen: dict[str, int] = {}
    found: set[str] = set()
    for _, line in prose_lines(page.read_text(encoding="utf-8")):
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return frozenset(found)


def links(page: Path) -> list[tuple[int, str]]:
    """(line, target) of every link of the page, outside code."""
    lines = prose_lines(page.read_text(encoding="utf-8"))
    # Blank out inline code, keeping line breaks, so line numbers stay right.
    numbered = "\n".join(f"{number}\x00{line}" for number, line in lines)
    numbered = INLINE_CODE.sub(
        lambda m: "code" + "".join(re.findall(r"\n\d+\x00", m.group(0))), numbered
    )
    found: list[tuple[int, str]] = []
    for pattern in (INLINE_LINK, REFERENCE):
        for match in pattern.finditer(numbered):
            start = numbered.rfind("\n", 0, match.start()) + 1
            line_number = re.match(r"\d*", numbered[start:]).group(0)
            found.append((int(line_number or 0), match.group(1).strip("<>")))
    return sorted(found)


def broken(page: Path, target: str) -> str | None:
    """Why a link's target leads nowhere, or None."""
    if SCHEME.match(target):
        return None
    path_part, _, anchor = target.partition("#")
    destination = (page.parent / path_part).resolve() if path_part else page
    if REPO.resolve() not in (destination, *destination.parents):
        return "points outside the repository"
    if not destination.exists():
        return f"{destination.relative_to(REPO.resolve())} does not exist"
    if anchor:
        if destination.suffix != ".md":
            return "an anchor into a file that is not a markdown page"
        if anchor not in anchors(destination):
            return f"no heading of {destination.name} has the anchor #{anchor}"
    return None


def test_the_slug_rules():
    assert slug("Quick start") == "quick-start"
    assert slug("POST /v1/audio/speech (OpenAI compatible)") == (
        "post-v1audiospeech-openai-compatible"
    )
    assert slug("Python, WebSocket (`websockets`)") == "python-websocket-websockets"
    assert slug("JavaScript, Node 18+ (built-in `fetch`, streamed body)") == (
        "javascript-node-18-built-in-fetch-streamed-body"
    )
    assert slug("What to expect: measured") == "what-to-expect-measured"
    assert slug("`MAX_TEXT_CHARS` and **limits**") == "max_text_chars-and-limits"
    assert slug("`__main__.py`, _emphasis_") == "__main__py-emphasis"


def test_links_are_found_outside_code(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        '# Title\n\nSee [a](a.md#x) and `[not](a link)`, [`code`](b/ "title").\n\n'
        "```text\n[not](c.md)\n```\n\n[ref]: d.md\n",
        encoding="utf-8",
    )
    assert links(page) == [(3, "a.md#x"), (3, "b/"), (9, "d.md")]


@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(REPO).as_posix() for p in PAGES])
def test_every_link_leads_somewhere(page: Path):
    problems = [
        f"{page.relative_to(REPO)} line {line}: ({target}) {why}"
        for line, target in links(page)
        if (why := broken(page, target))
    ]
    assert not problems, "\n".join(problems)


def test_every_docs_page_is_linked_from_the_readme():
    targets = {target.partition("#")[0] for _, target in links(PAGES[0])}
    for page in PAGES[1:]:
        assert f"docs/{page.name}" in targets, f"README.md does not link docs/{page.name}"


def test_broken_links_are_reported():
    readme = PAGES[0]
    assert broken(readme, "docs/api.md#errors") is None
    assert broken(readme, "https://example.com/nowhere") is None
    assert "does not exist" in broken(readme, "docs/nowhere.md")
    assert "no heading" in broken(readme, "docs/api.md#nowhere")
    assert "no heading" in broken(readme, "#nowhere")
    assert "not a markdown page" in broken(readme, "compose.yaml#L1")
    assert "outside the repository" in broken(readme, "../elsewhere.md")
