"""The token view: hand-built logprobs in, HTML out (no model, no browser).

What a reader relies on: the text shown is exactly the text generated
(escaped, whitespace kept, a character split across tokens shown once), each
token carries its alternatives with the chosen one marked, the popups open
by CSS alone (hover or keyboard focus), and the stylesheet touches nothing
outside the view.
"""

from __future__ import annotations

import html
import math
import re
from html.parser import HTMLParser
from itertools import count
from typing import Any

from nbollama._api.outputs import TokenLogprob, TopLogprob
from nbollama._api.tokenview import BANDS, probability_colour, token_view_html

_ids = count(100)


def tok(
    text: str,
    p: float,
    alts: tuple[tuple[str, float], ...] = (),
    *,
    raw: bytes | None = None,
    chosen_in_top: bool = True,
) -> TokenLogprob:
    """A token as an engine gives it: its bytes, logprob, id and top alternatives (itself among them)."""
    data = list(text.encode() if raw is None else raw)
    token_id = next(_ids)
    top: list[TopLogprob] = [
        {"token": t, "logprob": math.log(q), "bytes": list(t.encode()), "id": next(_ids)}
        for t, q in alts
    ]
    if chosen_in_top:
        top.append({"token": text, "logprob": math.log(p), "bytes": data, "id": token_id})
    top.sort(key=lambda a: -a["logprob"])
    return {
        "token": text,
        "logprob": math.log(p),
        "bytes": data,
        "id": token_id,
        "top_logprobs": top,
    }


class _Text(HTMLParser):
    """The text a reader sees in the view's text area, popups (and the stylesheet) left out."""

    def __init__(self) -> None:
        super().__init__()
        self.depth = 0  # inside .nbtv-text
        self.hidden = 0  # inside a popup or <style>
        self.text: list[str] = []
        self.tokens: list[dict[str, str | None]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        classes = (dict(attrs).get("class") or "").split()
        if self.depth:
            self.depth += 1
            if self.hidden:
                self.hidden += 1
            elif "nbtv-alts" in classes:
                self.hidden = 1
            if "nbtv-t" in classes:
                self.tokens.append(dict(attrs))
        elif "nbtv-text" in classes:
            self.depth = 1

    def handle_endtag(self, tag: str) -> None:
        if self.depth:
            self.depth -= 1
            if self.hidden:
                self.hidden -= 1

    def handle_data(self, data: str) -> None:
        if self.depth and not self.hidden:
            self.text.append(data)


def shown(view: str) -> _Text:
    parser = _Text()
    parser.feed(view)
    return parser


def popups(view: str) -> list[str]:
    return re.findall(r'<span class="nbtv-alts".*?</span></span>(?=</span>)', view)


def test_the_text_shown_is_the_text_generated() -> None:
    tokens = [tok("Hello", 0.9), tok(",\n", 0.6), tok("\t<b>&amp;", 0.1), tok("  x ", 0.3)]
    view = token_view_html(tokens)
    seen = shown(view)
    assert "".join(seen.text) == "Hello,\n\t<b>&amp;  x "  # escaped in the HTML, faithful once read
    assert "<b>&amp;" not in view and "&lt;b&gt;&amp;amp;" in view
    assert len(seen.tokens) == 4 and all(t["tabindex"] == "0" for t in seen.tokens)
    assert '<span class="nbtv-nl"></span>\n' in view and '<span class="nbtv-tab"></span>\t' in view


def test_a_character_split_across_tokens_is_shown_once() -> None:
    euro = "€".encode()  # three bytes: e2 82 ac
    tokens = [
        tok("a", 0.9),
        tok("\ufffd", 0.5, raw=euro[:1]),
        tok("\ufffd", 0.8, raw=euro[1:]),
        tok("b", 0.9),
    ]
    view = token_view_html(tokens)
    seen = shown(view)
    assert "".join(seen.text) == "a€b" and "\ufffd" not in "".join(seen.text)
    assert len(seen.tokens) == 3  # the euro sign is one span for its two tokens
    assert "output tokens 2–3: 2 tokens make this text · together 40.0%" in view
    joint = probability_colour(0.4)
    assert re.search(rf'style="background:{joint}">€', view)


def test_bytes_that_never_complete_are_replaced_at_the_end() -> None:
    view = token_view_html([tok("x", 0.9), tok("?", 0.9, raw=b"\xe2\x82")])
    assert "".join(shown(view).text) == "x\ufffd"


def test_alternatives_with_the_chosen_one_marked() -> None:
    token = tok(" blue", 0.62, ((" a", 0.2), (" clear", 0.08)))
    view = token_view_html([token])
    (popup,) = popups(view)
    rows = re.findall(
        r'<span class="nbtv-r( nbtv-c)?">.*?<code>(.*?)</code>.*?<em>(.*?)</em>',
        popup,
    )
    assert rows == [(" nbtv-c", "␣blue", "62.0%"), ("", "␣a", "20.0%"), ("", "␣clear", "8.0%")]
    assert popup.count("✓") == 1 and 'role="tooltip"' in popup and 'style="display:none"' in popup
    assert "output token 1 · 62.0% · logprob -0.478 · id" in popup


def test_a_token_sampled_outside_the_top_k_is_added_and_marked() -> None:
    token = tok(" green", 0.01, ((" blue", 0.6), (" grey", 0.2)), chosen_in_top=False)
    (popup,) = popups(token_view_html([token]))
    assert popup.index("␣grey") < popup.index("␣green")
    assert "outside the top 2" in popup and popup.count("nbtv-c") == 1


def test_popups_open_on_hover_and_focus_without_javascript() -> None:
    view = token_view_html([tok("x", 0.5, (("y", 0.5),))])
    assert "<script" not in view and "onmouse" not in view and "onclick" not in view
    css = re.search(r"<style>(.*?)</style>", view, re.S)
    assert css
    rules = css.group(1)
    assert ".nbtv-t:hover>.nbtv-alts" in rules and ".nbtv-t:focus-within>.nbtv-alts" in rules
    assert "display:block!important" in rules  # beats the inline display:none
    selectors = re.findall(r"(?:^|})\s*([^{}]+)\{", rules)
    assert selectors and all(
        part.strip().startswith(".nbollama-tokenview") for s in selectors for part in s.split(",")
    ), selectors


def test_colours_follow_the_probability_bands_and_a_legend_names_them() -> None:
    assert [probability_colour(p) for p in (0.95, 0.6, 0.3, 0.1, 0.01)] == [b[1] for b in BANDS]
    assert probability_colour(None) != probability_colour(0.95)
    view = token_view_html([tok("a", 0.95), tok("b", 0.01)])
    for _, colour, label in BANDS:
        assert f'background:{colour}">{html.escape(label)}' in view
    assert re.search(rf'background:{BANDS[0][1]}">a', view)
    assert re.search(rf'background:{BANDS[-1][1]}">b', view)
    mean = (math.log(0.95) + math.log(0.01)) / 2
    assert f"output: 2 tokens · mean logprob {mean:.3f} · perplexity {math.exp(-mean):.2f}" in view


def test_prompt_tokens_come_first_and_the_unscored_one_is_grey() -> None:
    prompt: list[TokenLogprob | None] = [None, tok(" sky", 0.01), tok(" is", 0.4)]
    view = token_view_html([tok(" blue", 0.7)], prompt_logprobs=prompt)
    seen = shown(view)
    assert "".join(seen.text) == "… sky is▸ blue"
    assert [t["class"] for t in seen.tokens] == ["nbtv-t nbtv-p"] * 3 + ["nbtv-t"]
    assert "prompt token 1: nothing before it to predict it from" in view
    assert "prompt: 2 scored tokens" in view and "prompt token 2 · 1.0%" in view


def test_tokens_without_bytes_show_their_text_and_special_tokens_their_name() -> None:
    remote: Any = {"token": " hi", "logprob": -0.1, "top_logprobs": []}
    special = tok("<eos>", 0.9, raw=b"")
    view = token_view_html([remote, special])
    assert "".join(shown(view).text) == " hi&lt;eos&gt;".replace("&lt;", "<").replace("&gt;", ">")


def test_control_characters_are_shown_as_symbols() -> None:
    view = token_view_html([tok("a\x00b\x1b", 0.5)])
    assert "\x00" not in view and "\x1b" not in view and "␀" in view and "␛" in view


def test_room_is_kept_under_the_text_for_the_tallest_popup() -> None:
    few = token_view_html([tok("a", 0.5, (("b", 0.3),))])
    many = token_view_html([tok("a", 0.5, tuple((f"b{i}", 0.01) for i in range(8)))])
    room = [int(re.search(r"padding-bottom:(\d+)px", v).group(1)) for v in (few, many)]  # type: ignore[union-attr]
    assert room[0] < room[1]


def test_no_tokens() -> None:
    view = token_view_html([])
    assert "output: 0 tokens" in view and shown(view).tokens == []


def test_a_card_leaves_the_summary_to_its_figures() -> None:
    view = token_view_html([tok("a", 0.5)], summary=False)
    assert "perplexity" not in view and "hover or Tab" in view
