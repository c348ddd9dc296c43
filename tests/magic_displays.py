"""What the magics' tests read in a display: the cards, their badges and texts, a message's size."""

from __future__ import annotations

import re
from typing import Any


def cards(html_text: str) -> list[str]:
    return html_text.split('<div class="nbollama-card"')[1:]


def badge(card: str) -> str:
    match = re.search(r'class="nbollama-badge"[^>]*>([^<]*)<', card)
    assert match
    return match.group(1)


def card_text(card: str) -> str:
    match = re.search(r'class="nbollama-text"[^>]*>(.*?)</div>', card, re.S)
    assert match
    return match.group(1)


def payload(output: dict[str, Any]) -> int:
    return sum(len(v) for v in output["data"].values())
