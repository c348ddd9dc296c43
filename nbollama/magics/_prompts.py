"""Prompt templating: a ``%%generate`` cell split into prompts, ``{name}`` filled from the notebook.

Only a plain identifier in single braces is a field, so ``{{doubled}}`` braces,
JSON and code in a prompt survive as written.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

__all__ = ["split_prompts", "interpolate", "template_fields"]

# `{name}` with a plain identifier, not part of a doubled `{{name}}` (templates keep theirs).
_FIELD = re.compile(r"(?<!\{)\{([^\W\d]\w*)\}(?!\})")
_LEADING_BLANK_LINES = re.compile(r"\A(?:[ \t]*\n)+")


def split_prompts(body: str, *, lines: bool = False) -> list[str]:
    """The prompts of a ``%%generate`` cell: blocks between lines holding only ``---``
    (or, with ``lines=True``, every non-empty line). Empty blocks are dropped."""
    if lines:
        return [s for s in (line.strip() for line in body.splitlines()) if s and s != "---"]
    blocks: list[list[str]] = [[]]
    for line in body.splitlines():
        if line.strip() == "---":
            blocks.append([])
        else:
            blocks[-1].append(line)
    prompts = (_LEADING_BLANK_LINES.sub("", "\n".join(block)).rstrip() for block in blocks)
    return [p for p in prompts if p]


def interpolate(
    template: str, namespace: Mapping[str, Any], extra: Mapping[str, Any] | None = None
) -> str:
    """Fill ``{name}`` from ``extra`` then ``namespace``; leave everything else byte-identical.

    Only a plain identifier in single braces is a field, and only when the name
    exists: unknown names, ``{{doubled}}`` braces, JSON and code survive as written.
    """

    def fill(match: re.Match[str]) -> str:
        name = match.group(1)
        if extra is not None and name in extra:
            return str(extra[name])
        if name in namespace:
            return str(namespace[name])
        return match.group(0)

    return _FIELD.sub(fill, template)


def template_fields(template: str) -> Iterator[str]:
    """The names of the ``{name}`` fields of ``template``, in order (repeats included)."""
    for match in _FIELD.finditer(template):
        yield match.group(1)
