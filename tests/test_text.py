"""The text stream: incremental UTF-8 and stop strings, without a model."""

from __future__ import annotations

from nbollama._core._text import TextStream, find_stop, held_back


def feed_all(stream: TextStream, pieces: list[bytes]) -> list[str]:
    return [stream.feed(p) for p in pieces]


def test_a_character_split_across_tokens_is_never_broken() -> None:
    snow = "❄".encode()  # three bytes
    stream = TextStream()
    deltas = feed_all(stream, [b"a", snow[:1], snow[1:2], snow[2:], b"b"])
    assert deltas == ["a", "", "", "❄", "b"]
    assert stream.finish() == "" and stream.text == "a❄b"


def test_a_character_cut_off_at_the_end_is_dropped() -> None:
    stream = TextStream()
    assert stream.feed(b"ok" + "é".encode()[:1]) == "ok"
    assert stream.finish() == ""
    assert stream.text == "ok"


def test_a_stop_string_never_leaks_into_the_stream() -> None:
    stream = TextStream(["\n\nQ:"])
    deltas = feed_all(stream, [b"The answer", b" is 4.", b"\n", b"\nQ", b":", b" next"])
    assert "".join(deltas) == "The answer is 4."
    assert deltas[2] == "" and deltas[3] == ""  # held back while they might start the stop
    assert stream.stopped and stream.text == "The answer is 4."
    assert deltas[-1] == "" and stream.finish() == ""


def test_held_back_text_is_released_when_it_turns_out_not_to_be_a_stop() -> None:
    stream = TextStream(["END"])
    assert stream.feed(b"the EN") == "the "
    assert stream.feed(b"D") == ""
    assert stream.stopped and stream.text == "the "
    other = TextStream(["END"])
    assert other.feed(b"the EN") == "the "
    assert other.feed(b"TRY") == "ENTRY"
    assert other.feed(b" E") == " "
    assert other.finish() == "E"  # at the end nothing can follow: the held-back text is shown


def test_a_stop_spanning_many_tokens_is_found() -> None:
    stream = TextStream(["<|end|>"])
    out = "".join(feed_all(stream, [b"x <", b"|", b"en", b"d", b"|>", b"tail"]))
    assert out == "x " and stream.stopped


def test_helpers() -> None:
    assert find_stop("abcSTOPdefEND", ["END", "STOP"], 0) == 3
    assert find_stop("abc", ["x"], 0) == -1
    assert held_back("hello wor", ["world", "or"]) == 3
    assert held_back("hello", ["xyz"]) == 0
