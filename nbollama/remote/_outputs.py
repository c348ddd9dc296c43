"""Log-probabilities and output formats on a server: the fields each kind takes, and what comes back.

``logprobs=K``, ``prompt_logprobs=True`` and ``json_schema=``/``regex=``/
``grammar=`` become each server's own fields (the table in docs/remote.md).
What a kind of server cannot do is refused in one line before anything is
sent: a field a server does not know is silently ignored by most of them, and
an unconstrained answer that looks constrained is worse than an error.

The streamed log-probabilities come in four shapes, all read into
``TokenLogprob`` dicts: llama-server's ``completion_probabilities`` (with
token ids), OpenAI chat's ``logprobs.content`` (llama-server, vLLM), the
legacy completions' ``tokens``/``token_logprobs``/``top_logprobs`` (vLLM's
``/v1/completions``) and Ollama's ``logprobs`` list. A server that gives no
token id gets ``id=-1``; one that gives no bytes gets the token's UTF-8.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

from .._api.outputs import OUTPUT_FIELDS, Constraint, OutputRequest, TokenLogprob, TopLogprob
from .._api.requests import SamplingParams
from ..exceptions import InvalidParamsError

__all__ = [
    "OUTPUT_PARAMS",
    "OutputBooks",
    "check_outputs",
    "output_fields",
    "read_choice",
    "read_entries",
    "read_llama",
    "version_tuple",
]

#: ``submit`` keywords that are not sampling parameters a server's ``check`` knows
OUTPUT_PARAMS = OUTPUT_FIELDS | {"logprobs", "prompt_logprobs"}
#: Ollama returns log-probabilities since 0.12.11, and takes a JSON schema as ``format`` since 0.5.0
OLLAMA_LOGPROBS = (0, 12, 11)
OLLAMA_SCHEMA = (0, 5, 0)
#: vLLM takes ``structured_outputs`` since 0.10.2; 0.12 dropped ``guided_*`` (ignored there, unconstrained)
VLLM_STRUCTURED = (0, 10, 2)

_FORMATS = ("json_schema", "response_format", "regex", "grammar")
_TAKES = {
    "llama-server": ("json_schema", "grammar"),
    "ollama": ("json_schema",),
    "vllm": ("json_schema", "regex", "grammar"),
    "openai": ("json_schema",),
}
_NO_FORMAT = {
    "llama-server": "llama-server has no regex field (its /completion takes json_schema and a GBNF grammar): "
    "write the pattern as grammar='root ::= ...'",
    "ollama": "Ollama's format takes a JSON schema only: use json_schema=",
    "openai": "an OpenAI-compatible server's response_format takes a JSON schema only: use json_schema=, "
    "or connect with kind='vllm' or kind='llama-server' if that is what serves",
}


def version_tuple(text: str | None) -> tuple[int, ...] | None:
    """(0, 12, 6) from "0.12.6" or "v0.12.6-rc1"; None when there is no such version."""
    match = re.match(r"v?(\d+)\.(\d+)(?:\.(\d+))?", (text or "").strip())
    return tuple(int(part or 0) for part in match.groups()) if match else None


def _older(version: str | None, than: tuple[int, ...]) -> bool:
    """Only a version known to be older: an unknown one is given the benefit of the doubt."""
    found = version_tuple(version)
    return found is not None and found < than


def check_outputs(kind: str, version: str | None, params: Mapping[str, Any]) -> None:
    """Refuse, in one line and before anything is sent, what this kind of server cannot do."""
    server = {
        "ollama": f"Ollama {version}" if version else "Ollama",
        "vllm": "vLLM",
        "openai": "an OpenAI-compatible server",
    }.get(kind, kind)
    if params.get("choices") is not None:
        raise InvalidParamsError(
            f"choices=: {server} cannot score options by likelihood (that needs each option's "
            "log-probabilities after the prompt); use json_schema={'enum': [...]} to have it pick one "
            "by generating, or the in-kernel engine (nbollama.load) for choice_probs"
        )
    if params.get("logprobs") is not None and kind == "ollama" and _older(version, OLLAMA_LOGPROBS):
        raise InvalidParamsError(
            f"logprobs=: {server} returns no log-probabilities (Ollama has them since 0.12.11); "
            "upgrade Ollama, or leave logprobs out"
        )
    if params.get("prompt_logprobs"):
        if kind != "vllm":
            raise InvalidParamsError(
                f"prompt_logprobs=True: {server} returns log-probabilities for generated tokens only "
                "(logprobs=K); vLLM and the in-kernel engine also score the prompt"
            )
        if params.get("chat"):
            raise InvalidParamsError(
                "prompt_logprobs=True with chat=True: vLLM streams no prompt log-probabilities from "
                "/v1/chat/completions; use chat=False (its /v1/completions gives them with echo)"
            )
    name = next((n for n in _FORMATS if params.get(n) is not None), None)
    if name is None:
        return
    what = "json_schema" if name == "response_format" else name
    if what not in _TAKES[kind]:
        raise InvalidParamsError(f"{name}=: {_NO_FORMAT[kind]}")
    if kind == "llama-server" and what == "grammar" and "::=" not in str(params[name]):
        raise InvalidParamsError(
            "grammar=: llama-server takes GBNF (root ::= ...), and this grammar is Lark; "
            "write it in GBNF, or use json_schema="
        )
    if kind == "ollama" and _older(version, OLLAMA_SCHEMA):
        raise InvalidParamsError(
            f"{name}=: {server} takes only format='json' (JSON schemas came in Ollama 0.5.0); upgrade Ollama"
        )


# -- requests ---------------------------------------------------------------------------------


def _schema(constraint: Constraint) -> dict[str, Any]:
    if constraint.schema is not None:
        return constraint.schema
    loaded = json.loads(constraint.source)
    return loaded if isinstance(loaded, dict) else {}


def _schema_name(constraint: Constraint, schema: Mapping[str, Any]) -> str:
    """OpenAI's ``json_schema.name``: letters, digits, _ and -, at most 64."""
    raw = constraint.model.__name__ if constraint.model is not None else str(schema.get("title") or "output")
    return re.sub(r"[^A-Za-z0-9_-]", "_", raw)[:64] or "output"


def _format_fields(kind: str, version: str | None, constraint: Constraint) -> dict[str, Any]:
    json_schema = constraint.kind == "json_schema"
    schema = _schema(constraint) if json_schema else None
    if kind == "llama-server":
        return {"json_schema": schema} if json_schema else {"grammar": constraint.source}
    if kind == "ollama":
        return {"format": schema}
    if kind == "vllm":
        value: Any = schema if json_schema else constraint.source
        key = {"json_schema": "json", "regex": "regex", "grammar": "grammar"}[constraint.kind]
        if _older(version, VLLM_STRUCTURED):
            return {f"guided_{key}": value}
        return {"structured_outputs": {key: value}}
    assert schema is not None  # check_outputs refused the rest
    return {
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": _schema_name(constraint, schema), "schema": schema},
        }
    }


def output_fields(
    kind: str, version: str | None, path: str, sampling: SamplingParams, output: OutputRequest
) -> dict[str, Any]:
    """The body fields that ask ``path`` for log-probabilities and a format (none when not asked)."""
    body: dict[str, Any] = {}
    if sampling.logprobs is not None or sampling.prompt_logprobs:
        k = sampling.logprobs or 0
        if path == "/completion":
            # n_probs=0 returns nothing: ask for one and keep K; pre-sampling values, as vLLM's
            body.update(n_probs=max(k, 1), post_sampling_probs=False)
        elif path in ("/api/generate", "/api/chat"):
            body.update(logprobs=True, top_logprobs=k)
        elif path == "/v1/chat/completions":
            # llama-server turns top_logprobs=0 into none at all
            body.update(logprobs=True, top_logprobs=max(k, 1) if kind == "llama-server" else k)
        else:
            body["logprobs"] = k
            if sampling.prompt_logprobs:  # vLLM streams them only echoed ahead of the output
                body.update(echo=True, prompt_logprobs=k)
    if isinstance(output, Constraint):
        body.update(_format_fields(kind, version, output))
    return body


# -- streams ----------------------------------------------------------------------------------


def _float(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _value(item: Mapping[str, Any]) -> float | None:
    """A logprob, or the log of a probability (llama-server's post_sampling_probs shape)."""
    logprob = _float(item.get("logprob"))
    if logprob is not None:
        return logprob
    prob = _float(item.get("prob"))
    if prob is None:
        return None
    return math.log(prob) if prob > 0 else -math.inf


def _bytes(item: Mapping[str, Any], token: str) -> list[int]:
    given = item.get("bytes")
    if isinstance(given, list) and all(isinstance(b, int) for b in given):
        return list(given)
    return list(token.encode("utf-8"))


def _id(item: Mapping[str, Any]) -> int:
    value = item.get("id")
    return value if isinstance(value, int) and not isinstance(value, bool) else -1


def _alternative(item: Any) -> TopLogprob | None:
    if not isinstance(item, dict) or not isinstance(item.get("token"), str):
        return None
    value = _value(item)
    if value is None:
        return None
    token = item["token"]
    return TopLogprob(token=token, logprob=value, bytes=_bytes(item, token), id=_id(item))


def read_entry(item: Any) -> TokenLogprob | None:
    """One token in the shape llama-server, OpenAI chat and Ollama share (``top_probs`` too)."""
    chosen = _alternative(item)
    if chosen is None:
        return None
    tops = item.get("top_logprobs", item.get("top_probs"))
    alternatives = [a for a in map(_alternative, tops if isinstance(tops, list) else []) if a is not None]
    return TokenLogprob(**chosen, top_logprobs=alternatives)


def read_entries(items: Any) -> list[TokenLogprob | None]:
    """A list of tokens in that shared shape (llama-server's, chat's ``content``, Ollama's)."""
    return [read_entry(item) for item in items] if isinstance(items, list) else []


def _read_legacy(logprobs: Mapping[str, Any]) -> list[TokenLogprob | None]:
    """The legacy completions shape; a token without a value (the prompt's first) is None."""
    tokens = logprobs.get("tokens")
    values = logprobs.get("token_logprobs")
    tops = logprobs.get("top_logprobs")
    values = values if isinstance(values, list) else []
    tops = tops if isinstance(tops, list) else []
    entries: list[TokenLogprob | None] = []
    for i, token in enumerate(tokens if isinstance(tokens, list) else []):
        value = _float(values[i]) if i < len(values) else None
        if not isinstance(token, str) or value is None:
            entries.append(None)
            continue
        top = tops[i] if i < len(tops) and isinstance(tops[i], dict) else {}
        ranked = sorted(((t, v) for t, v in top.items() if _float(v) is not None), key=lambda tv: -tv[1])
        alternatives = [
            TopLogprob(token=t, logprob=float(v), bytes=list(t.encode("utf-8")), id=-1) for t, v in ranked
        ]
        entries.append(
            TokenLogprob(
                token=token,
                logprob=value,
                bytes=list(token.encode("utf-8")),
                id=-1,
                top_logprobs=alternatives,
            )
        )
    return entries


def read_choice(choice: Mapping[str, Any]) -> list[TokenLogprob | None] | None:
    """The log-probabilities of one OpenAI-style choice: chat's ``content`` or the legacy shape."""
    logprobs = choice.get("logprobs")
    if not isinstance(logprobs, dict):
        return None
    if isinstance(logprobs.get("content"), list):
        return read_entries(logprobs["content"])
    if "tokens" in logprobs:
        return _read_legacy(logprobs)
    return None


def read_llama(data: Mapping[str, Any]) -> list[TokenLogprob | None] | None:
    """llama-server ``/completion``'s per-chunk probabilities (the stop chunk's repeat is skipped)."""
    if data.get("stop") or "completion_probabilities" not in data:
        return None
    return read_entries(data["completion_probabilities"])


# -- one request's books ---------------------------------------------------------------------


class OutputBooks:
    """What one request asked beyond text, gathered from its stream for its ``Result``."""

    def __init__(self, sampling: SamplingParams, output: OutputRequest, *, echo: str | None) -> None:
        self.k = sampling.logprobs
        self.prompt = sampling.prompt_logprobs
        self.constraint = output if isinstance(output, Constraint) else None
        self.echo = echo  # vLLM's echo: the prompt ahead of the first text, to take off
        self.entries: list[TokenLogprob | None] = []
        self.text: list[str] = []

    @classmethod
    def wanted(
        cls, sampling: SamplingParams, output: OutputRequest, body: Mapping[str, Any], prompt: str
    ) -> OutputBooks | None:
        """Books for a request that asked for any of it; None for plain text."""
        if sampling.logprobs is None and not sampling.prompt_logprobs and output is None:
            return None
        return cls(sampling, output, echo=prompt if body.get("echo") else None)

    def take(self, text: str, logprobs: list[TokenLogprob | None] | None) -> str:
        """Keep one stream item's log-probabilities and text; the text without an echoed prompt."""
        if self.echo is not None and text:
            text = text[len(self.echo) :] if text.startswith(self.echo) else text
            self.echo = None
        keep = self.k or 0
        for entry in logprobs or ():
            if entry is not None and len(entry["top_logprobs"]) > keep:
                entry["top_logprobs"] = entry["top_logprobs"][:keep]
            self.entries.append(entry)
        if text:
            self.text.append(text)
        return text

    def outputs(
        self, reason: str, *, prompt_tokens: int | None, completion_tokens: int, max_tokens: int
    ) -> dict[str, Any]:
        """The ``Result`` fields: logprobs, prompt_logprobs, parsed and parse_error, as asked."""
        fields: dict[str, Any] = {}
        entries = self.entries
        if self.prompt:
            n = prompt_tokens if prompt_tokens is not None else max(0, len(entries) - completion_tokens)
            fields["prompt_logprobs"] = tuple(entries[:n])
            entries = entries[n:]
        if self.k is not None:
            fields["logprobs"] = tuple(e for e in entries if e is not None)
        if self.constraint is not None:
            if reason == "stop":
                fields["parsed"], fields["parse_error"] = self.constraint.parse("".join(self.text))
            else:
                why = {
                    "length": f"cut short by max_tokens={max_tokens}",
                    "cancelled": "cancelled",
                }.get(reason, "the request failed")
                fields["parse_error"] = f"{why} before the {self.constraint.kind} output was complete"
        return fields
