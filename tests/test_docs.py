"""The README and docs/: every relative link resolves, and the README links every page.

Plain text checks (stdlib only): no model, no kernel, no network.

A link is a Markdown link or image, ``[text](target)`` / ``![alt](target)``, a
reference definition ``[label]: target``, or an HTML ``src="..."`` /
``href="..."``. Targets with a scheme (``http:``, ``https:``, ``mailto:``, ...)
are left alone; every other one must name a file or folder in the repository,
resolved against the directory of the file that links to it. A ``#fragment``
into a Markdown file (or a bare ``#anchor`` into the same file) must name a
heading there, by GitHub's slug rule. Fenced code blocks, inline code and HTML
comments are skipped: a link there is not rendered as one.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from urllib.parse import unquote

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
DOCS = REPO / "docs"

_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_ATX = re.compile(r"^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$")
_SETEXT = re.compile(r"^ {0,3}(=+|-+)[ \t]*$")
_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
# A code span stays inside one paragraph: it never crosses a blank line.
_CODE_SPAN = re.compile(r"(`+)(?!`)((?:(?!\n[ \t]*\n).)+?)(?<!`)\1(?!`)", re.DOTALL)
# "](target)" ends every inline link or image, nested ones (a badge inside a link) included.
_INLINE = re.compile(r"\]\(\s*(<[^>]*>|[^)\s]*)(?:\s+(?:\"[^\"]*\"|'[^']*'|\([^)]*\)))?\s*\)")
_REFDEF = re.compile(r"^ {0,3}\[[^\]]+\]:[ \t]*(<[^>]*>|\S+)", re.MULTILINE)
_HTML_ATTR = re.compile(r"""\b(?:src|href)\s*=\s*(?:"([^"]*)"|'([^']*)')""", re.IGNORECASE)
_HTML_ID = re.compile(r"""<[^>]*\b(?:id|name)\s*=\s*(?:"([^"]*)"|'([^']*)')""", re.IGNORECASE)
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def markdown_files() -> list[Path]:
    return [README, *sorted(DOCS.rglob("*.md"))]


def _rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def prose_lines(text: str) -> list[str]:
    """The file's lines with fenced code blocks blanked (line numbers kept)."""
    lines = text.split("\n")
    out: list[str] = []
    fence: str | None = None
    for line in lines:
        match = _FENCE.match(line)
        if fence is None:
            if match:
                fence = match.group(1)
                out.append("")
                continue
            out.append(line)
        else:
            if match and match.group(1)[0] == fence[0] and len(match.group(1)) >= len(fence):
                rest = line.strip()[len(match.group(1)) :]
                if not rest.strip():
                    fence = None
            out.append("")
    return out


def prose(text: str) -> str:
    """Text outside code blocks, code spans and HTML comments."""
    body = "\n".join(prose_lines(text))
    body = _COMMENT.sub(lambda m: "\n" * m.group(0).count("\n"), body)
    return _CODE_SPAN.sub(lambda m: " " * len(m.group(0)), body)


def links(text: str) -> list[str]:
    """Every link target in the Markdown text, in order of appearance."""
    body = prose(text)
    found: list[tuple[int, str]] = []
    for match in _INLINE.finditer(body):
        target = match.group(1)
        if target.startswith("<") and target.endswith(">"):
            target = target[1:-1]
        found.append((match.start(), target))
    for match in _REFDEF.finditer(body):
        target = match.group(1)
        if target.startswith("<") and target.endswith(">"):
            target = target[1:-1]
        found.append((match.start(), target))
    for match in _HTML_ATTR.finditer(body):
        value = match.group(1) if match.group(1) is not None else match.group(2)
        found.append((match.start(), value))
    return [target for _, target in sorted(found)]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's text (before the -1, -2 of duplicates)."""
    text = _CODE_SPAN.sub(lambda m: m.group(2), heading)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link or image: its text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML tags
    text = text.strip().lower()
    # punctuation and symbols go; letters, digits, "_" and "-" stay
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every anchor a link can point at in this Markdown text."""
    lines = prose_lines(_COMMENT.sub(lambda m: "\n" * m.group(0).count("\n"), text))
    headings: list[str] = []
    previous = ""
    for line in lines:
        atx = _ATX.match(line)
        setext = _SETEXT.match(line)
        if atx:
            headings.append(atx.group(2) or "")
            previous = ""
            continue
        underlines = previous.strip() and not previous.lstrip().startswith("|")
        if setext and underlines and not _ATX.match(previous):
            headings.append(previous.strip())
            previous = ""
            continue
        previous = line
    found: set[str] = set()
    seen: Counter[str] = Counter()
    for heading in headings:
        base = slug(heading)
        found.add(f"{base}-{seen[base]}" if seen[base] else base)
        seen[base] += 1
    for match in _HTML_ID.finditer("\n".join(lines)):
        found.add(match.group(1) if match.group(1) is not None else match.group(2))
    return found


def is_relative(target: str) -> bool:
    return bool(target) and not _SCHEME.match(target) and not target.startswith("//")


def resolve(source: Path, target: str) -> tuple[Path, str | None]:
    """The file a relative link points at, and its fragment (None if it has none)."""
    path, _, fragment = target.partition("#")
    path = unquote(path.split("?", 1)[0])
    if not path:
        resolved = source
    elif path.startswith("/"):
        resolved = REPO / path.lstrip("/")
    else:
        resolved = source.parent / path
    return resolved.resolve(), (unquote(fragment) if "#" in target else None)


def broken_links(source: Path) -> list[str]:
    text = source.read_text(encoding="utf-8")
    broken: list[str] = []
    for target in links(text):
        if not is_relative(target):
            continue
        resolved, fragment = resolve(source, target)
        where = f"{_rel(source)}: {target}"
        if not resolved.is_relative_to(REPO):
            broken.append(f"{where} (outside the repository)")
            continue
        if not resolved.exists():
            broken.append(f"{where} (no such file)")
            continue
        if fragment is not None and resolved.suffix.lower() == ".md" and resolved.is_file():
            if fragment not in anchors(resolved.read_text(encoding="utf-8")):
                broken.append(f"{where} (no heading #{fragment} in {_rel(resolved)})")
    return broken


def test_every_relative_link_resolves() -> None:
    files = markdown_files()
    assert README.is_file() and len(files) > 1, "README.md and docs/*.md are missing"
    broken = [line for source in files for line in broken_links(source)]
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_readme_links_every_docs_page() -> None:
    linked = set()
    for target in links(README.read_text(encoding="utf-8")):
        if is_relative(target):
            linked.add(resolve(README, target)[0])
    pages = sorted(DOCS.glob("*.md"))
    assert pages, "docs/ has no pages"
    missing = [_rel(page) for page in pages if page.resolve() not in linked]
    assert not missing, "README.md does not link: " + ", ".join(missing)


def test_the_checker_itself() -> None:
    """The link finder and slug rule on a small sample, so a bug there cannot hide broken links."""
    sample = (
        "# Title: `code` & more\n"
        "## Panel ⇄ kernel protocol (v1)\n"
        "## Repeat\n"
        "## Repeat\n"
        "Setext heading\n"
        "--------------\n"
        "[![badge](https://x.org/b.svg)](https://x.org) [a](docs/a.md#x) ![i](i.png \"t\")\n"
        "`[not](code.md)` <!-- [hidden](gone.md) --> <img src=\"p.png\">\n"
        "[m](mailto:a@b.c) [s](#repeat-1)\n"
        "[ref]: ../up.md\n"
        "```\n[fenced](nope.md)\n```\n"
    )
    assert links(sample) == [
        "https://x.org/b.svg",
        "https://x.org",
        "docs/a.md#x",
        "i.png",
        "p.png",
        "mailto:a@b.c",
        "#repeat-1",
        "../up.md",
    ]
    assert anchors(sample) == {
        "title-code--more",
        "panel--kernel-protocol-v1",
        "repeat",
        "repeat-1",
        "setext-heading",
    }
    relative = [t for t in links(sample) if is_relative(t)]
    assert relative == ["docs/a.md#x", "i.png", "p.png", "#repeat-1", "../up.md"]
