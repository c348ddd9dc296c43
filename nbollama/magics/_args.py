"""The magics' argparse pieces: a parser that answers with UsageError, option types, shell splitting.

Shared by both grammars (``_parse_nbollama`` and ``_parse_generate``), so a bad
value reads the same whichever magic it was given to, and never exits the kernel.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import keyword
import re
import shlex
from collections.abc import Iterable
from pathlib import Path
from typing import Literal, NoReturn

from IPython.core.error import UsageError

from .._api.kvcache import KV_TYPES

__all__ = [
    "Parser",
    "usage_line",
    "positive_int",
    "int_or_auto",
    "parallel_arg",
    "positive_number",
    "parallel_list",
    "positive_seconds",
    "variable",
    "shell_split",
    "first_token",
    "in_option_words",
    "duration",
    "eval_limit",
    "non_negative_int",
    "folder",
    "engine_list",
    "widgets_available",
]


class Parser(argparse.ArgumentParser):
    """argparse that answers with a short UsageError instead of exiting the kernel."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}")

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        raise UsageError(message.strip() if message else f"{self.prog}: stopped")


def usage_line(parser: argparse.ArgumentParser) -> str:
    """The parser's usage on one line, without its ``usage:`` prefix."""
    return " ".join(parser.format_usage().split()).removeprefix("usage: ")


# -- option types -------------------------------------------------------------------------------


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def int_or_auto(text: str) -> int | Literal["auto"]:
    if text == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not 'auto' or a whole number") from None


def parallel_arg(text: str) -> int | Literal["auto", "adaptive"]:
    if text == "adaptive":
        return "adaptive"
    try:
        value = int_or_auto(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not 'auto', 'adaptive' or a whole number"
        ) from None
    if value != "auto" and value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be 'auto', 'adaptive' or >= 1")
    return value


def parallel_list(text: str) -> list[int]:
    values = [part.strip() for part in text.split(",") if part.strip()]
    if not values:
        raise argparse.ArgumentTypeError("give parallel values as N,N,... (e.g. 1,2,4,8)")
    return [positive_int(v) for v in values]


def flash_attn_arg(text: str) -> bool | Literal["auto"]:
    """``--flash-attn on|off|auto``, as llama-server's ``-fa`` spells it."""
    choices: dict[str, bool | Literal["auto"]] = {"on": True, "off": False, "auto": "auto"}
    if text.lower() not in choices:
        raise argparse.ArgumentTypeError(f"{text!r} is not on, off or auto")
    return choices[text.lower()]


def engine_name(text: str) -> str:
    """An engine's name (``--as small``): no spaces or commas, so ``--models a,b`` can list names."""
    if not text or any(c in text for c in ", \t") or text.startswith("-"):
        raise argparse.ArgumentTypeError(f"{text!r} is not an engine name: use letters, digits, - or _ (e.g. small)")
    return text


def engine_names(text: str) -> tuple[str, ...]:
    """``--models small,lab``: two or more engine names."""
    names = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    for name in names:
        engine_name(name)
    if len(names) < 2:
        raise argparse.ArgumentTypeError(f"{text!r}: give two or more engine names, e.g. small,lab (one: --model NAME)")
    return names


def kv_type_list(text: str) -> tuple[str, ...]:
    """``--kv-type f16,q8_0,q4_0`` for a sweep, each name checked."""
    values = tuple(dict.fromkeys(part.strip().lower() for part in text.split(",") if part.strip()))
    bad = [v for v in values if v not in KV_TYPES]
    if not values or bad:
        raise argparse.ArgumentTypeError(
            f"{', '.join(bad) or repr(text)} is not a KV type: give some of {', '.join(KV_TYPES)}"
        )
    return values


def positive_number(text: str) -> float:
    return _positive_float(text, "")


def positive_seconds(text: str) -> float:
    return _positive_float(text, "seconds")


def _positive_float(text: str, unit: str) -> float:
    """A number > 0; ``unit`` (if any) named in the messages."""
    try:
        value = float(text)
    except ValueError:
        of = f" of {unit}" if unit else ""
        raise argparse.ArgumentTypeError(f"{text!r} is not a number{of}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{value:g} must be > 0{' ' + unit if unit else ''}")
    return value


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def duration(text: str) -> float:
    """``7d``, ``12h``, ``30m``, ``90s``, ``2w`` (or plain seconds) -> seconds."""
    cleaned = text.strip().lower()
    unit = cleaned[-1:] if cleaned[-1:] in _UNITS else "s"
    number = cleaned[:-1] if cleaned[-1:] in _UNITS else cleaned
    try:
        value = float(number) * _UNITS[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an age: write 7d, 12h, 30m or 90s") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: an age must be more than 0")
    return value


def eval_limit(text: str) -> int | float:
    """``--limit``: questions per task, or a fraction of them below 1 (lm-eval's meaning)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of questions") from None
    if value >= 1 and value.is_integer():
        return int(value)
    if 0 < value < 1:
        return value
    raise argparse.ArgumentTypeError(f"{text!r}: give a whole number >= 1, or a fraction between 0 and 1")


def non_negative_int(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 0")
    return int(text)


def folder(text: str) -> str:
    if not Path(text).expanduser().is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is not a folder")
    return text


def engine_list(text: str) -> tuple[str, ...]:
    """``--engine a`` or ``--engine a,b``: engine names (loaded with ``--as NAME``)."""
    names = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    if not names:
        raise argparse.ArgumentTypeError(f"{text!r}: give engine names, e.g. small or small,lab")
    return tuple(engine_name(name) for name in names)


def variable(text: str) -> str:
    if not text.isidentifier() or keyword.iskeyword(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a Python variable name")
    return text


def in_option_words(message: str, names: Iterable[str], switches: Iterable[str] = ()) -> str:
    """An engine's message in the words a magic's user typed: ``choice_score='x'`` reads
    ``--choice-score 'x'`` and ``choices=`` reads ``--choices`` (Python keeps the keywords);
    a switch's ``flash_attn=True`` reads ``--flash-attn on``, as the magic spells it."""
    for name in switches:
        option = "--" + name.replace("_", "-")
        message = re.sub(rf"(?<![\w-]){name}=True\b", option + " on", message)
        message = re.sub(rf"(?<![\w-]){name}=False\b", option + " off", message)
    for name in sorted(names, key=len, reverse=True):
        option = "--" + name.replace("_", "-")
        message = re.sub(rf"(?<![\w-]){name}=(?=[^\s,;:)])", option + " ", message)
        message = re.sub(rf"(?<![\w-]){name}=", option, message)
        message = re.sub(rf"(?<![\w.-]){name}\b(?!\()", option, message) if "_" in name else message
    return message


# -- splitting what was typed -------------------------------------------------------------------


def shell_split(line: str, prog: str) -> list[str]:
    try:
        return shlex.split(line, comments=False, posix=True)
    except ValueError as exc:  # "No closing quotation"
        raise UsageError(f"{prog}: {exc}") from None


def first_token(text: str, prog: str) -> tuple[str, str]:
    """One shell-quoted token from the start of ``text`` and what follows it."""
    stream = io.StringIO(text)  # what shlex makes of a str, kept to read its position
    lexer = shlex.shlex(stream, posix=True)
    lexer.whitespace_split = True
    lexer.commenters = ""
    try:
        token = lexer.get_token()
    except ValueError as exc:
        raise UsageError(f"{prog}: {exc}") from None
    consumed = stream.tell()
    return token or "", text[consumed:]


def widgets_available() -> bool:
    """``nbollama.widgets`` is optional here: without it, ``dashboard`` and ``--watch`` do not exist."""
    try:
        return importlib.util.find_spec("nbollama.widgets") is not None
    except (ImportError, ValueError):
        return False
