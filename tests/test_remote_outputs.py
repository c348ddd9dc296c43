"""Remote engines map logprobs and output formats onto each server's own fields, and read them back.

Against the fakes of ``remote_fakes`` (llama-server, Ollama, vLLM, a plain
OpenAI-compatible server), which stream log-probabilities in each server's
documented shape (``remote_wire``): one test per kind for the fields sent and
the ``TokenLogprob`` dicts that come back, then the one-line refusals of what a
kind cannot do, each before any request reaches the server.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import BaseModel
from remote_fakes import Fake
from remote_wire import logprob_of

from nbollama.exceptions import InvalidParamsError
from nbollama.remote import RemoteEngine, ServerInfo, connect
from nbollama.remote._adapters import LlamaServerAdapter

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
ANSWER = ['{"name"', ': "Ada', '"}']  # what a fake streams for a format test
GBNF = 'root ::= "yes" | "no"'


class Person(BaseModel):
    name: str


def _open(engines: list[RemoteEngine], fake: Fake, **options: Any) -> RemoteEngine:
    engine = connect(fake.url, **options)
    engines.append(engine)
    return engine


def _sent(fake: Fake) -> dict[str, Any]:
    request = fake.books.requests[-1]
    return {"path": request["path"], **request["body"]}


def _check_logprobs(result: Any, k: int, *, ids: bool) -> None:
    """The fake's token i is its word with logprob_of(i); alternatives: itself, " alt1"... one nat apart."""
    assert result.ok and result.logprobs is not None
    assert [t["token"] for t in result.logprobs] == result.text.replace(" ", "\x00 ").split("\x00")
    for i, token in enumerate(result.logprobs):
        assert token["logprob"] == pytest.approx(logprob_of(i))
        assert token["bytes"] == list(token["token"].encode())
        assert token["id"] == (1000 + i if ids else -1)
        tops = token["top_logprobs"]
        assert [a["token"] for a in tops] == [token["token"], *(f" alt{j}" for j in range(1, k))][:k]
        assert [a["logprob"] for a in tops] == pytest.approx([logprob_of(i) - j for j in range(k)])
        assert [a["id"] for a in tops] == ([1000 + i, *(2000 + j for j in range(1, k))][:k] if ids else [-1] * k)
    assert result.perplexity == pytest.approx(math.exp(-sum(map(logprob_of, range(len(result.logprobs)))) / len(result.logprobs)))


@pytest.fixture
def llama() -> Iterator[Fake]:
    with Fake("llama-server") as fake:
        yield fake


# -- llama-server ------------------------------------------------------------------------------


def test_llama_server_logprobs_are_n_probs_before_sampling(llama: Fake, engines: list[RemoteEngine]) -> None:
    engine = _open(engines, llama)
    assert engine.kind == "llama-server"
    result = engine.generate("a b", max_tokens=3, logprobs=2)[0]
    sent = _sent(llama)
    assert sent["path"] == "/completion" and (sent["n_probs"], sent["post_sampling_probs"]) == (2, False)
    _check_logprobs(result, 2, ids=True)
    assert len(result.logprobs or ()) == 3  # the stop chunk adds none
    zero = engine.generate("a b", max_tokens=2, logprobs=0)[0]
    assert _sent(llama)["n_probs"] == 1  # n_probs=0 would return nothing: one is asked, none kept
    _check_logprobs(zero, 0, ids=True)
    chat = engine.generate("Hi", max_tokens=2, chat=True, logprobs=0)[0]
    sent = _sent(llama)
    assert sent["path"] == "/v1/chat/completions" and (sent["logprobs"], sent["top_logprobs"]) == (True, 1)
    _check_logprobs(chat, 0, ids=True)
    plain = engine.generate("a b", max_tokens=2)[0]
    assert plain.logprobs is None and "n_probs" not in _sent(llama)


def test_llama_server_post_sampling_probabilities_read_as_logs() -> None:
    """A server that answers with probabilities (post_sampling_probs) still gives logprobs."""
    chunk = {
        "content": " x",
        "stop": False,
        "completion_probabilities": [
            {"id": 7, "token": " x", "bytes": [32, 120], "prob": 0.5,
             "top_probs": [{"id": 7, "token": " x", "bytes": [32, 120], "prob": 0.5}, {"id": 9, "token": " y", "prob": 0.0}]}
        ],
    }
    adapter = LlamaServerAdapter(ServerInfo(kind="llama-server", url="http://127.0.0.1:1", model="m"))
    entries = adapter.parse(chunk).logprobs
    assert entries is not None and entries[0] is not None
    assert entries[0]["logprob"] == pytest.approx(math.log(0.5)) and entries[0]["id"] == 7
    assert entries[0]["top_logprobs"][1] == {"token": " y", "logprob": -math.inf, "bytes": [32, 121], "id": 9}
    assert adapter.parse({**chunk, "stop": True}).logprobs is None


def test_llama_server_json_schema_and_gbnf(engines: list[RemoteEngine]) -> None:
    with Fake("llama-server", words=ANSWER) as fake:
        engine = _open(engines, fake)
        result = engine.generate("A person:", max_tokens=10, json_schema=SCHEMA)[0]
        assert _sent(fake)["json_schema"] == SCHEMA and "grammar" not in _sent(fake)
        assert result.finish_reason == "stop" and result.parsed == {"name": "Ada"} and result.parse_error is None
        chat = engine.generate("A person:", max_tokens=10, chat=True, json_schema=SCHEMA)[0]
        assert _sent(fake)["json_schema"] == SCHEMA and chat.parsed == {"name": "Ada"}
        grammar = engine.generate("Yes?", max_tokens=10, grammar=GBNF)[0]
        assert _sent(fake)["grammar"] == GBNF and grammar.parsed == grammar.text


# -- Ollama --------------------------------------------------------------------------------------


def test_ollama_logprobs_and_format(engines: list[RemoteEngine]) -> None:
    with Fake("ollama", version="0.13.0") as fake:
        engine = _open(engines, fake)
        result = engine.generate("a b", max_tokens=3, logprobs=3)[0]
        sent = _sent(fake)
        assert sent["path"] == "/api/generate" and (sent["logprobs"], sent["top_logprobs"]) == (True, 3)
        assert "logprobs" not in sent["options"]  # top-level fields, not options
        _check_logprobs(result, 3, ids=False)
        chat = engine.generate("Hi", max_tokens=2, chat=True, logprobs=0)[0]
        assert _sent(fake)["path"] == "/api/chat" and _sent(fake)["top_logprobs"] == 0
        _check_logprobs(chat, 0, ids=False)
    with Fake("ollama", version="0.13.0", words=ANSWER) as fake:
        engine = _open(engines, fake)
        result = engine.generate("A person:", max_tokens=10, json_schema=SCHEMA)[0]
        assert _sent(fake)["format"] == SCHEMA and result.parsed == {"name": "Ada"}


def test_ollama_before_0_12_11_refuses_logprobs_before_sending(engines: list[RemoteEngine]) -> None:
    with Fake("ollama") as fake:  # 0.12.6
        engine = _open(engines, fake)
        with pytest.raises(InvalidParamsError, match=r"^logprobs=: Ollama 0\.12\.6 returns no log-probabilities \(Ollama has them since 0\.12\.11\)"):
            engine.submit("x", logprobs=2)
        assert fake.books.requests == []


# -- vLLM ---------------------------------------------------------------------------------------


def test_vllm_logprobs_in_completions_and_chat(engines: list[RemoteEngine]) -> None:
    with Fake("vllm") as fake:
        engine = _open(engines, fake)
        result = engine.generate("a b", max_tokens=3, logprobs=2)[0]
        sent = _sent(fake)
        assert sent["path"] == "/v1/completions" and sent["logprobs"] == 2 and "echo" not in sent
        _check_logprobs(result, 2, ids=False)  # the legacy dict, ranked
        zero = engine.generate("a b", max_tokens=2, logprobs=0)[0]
        _check_logprobs(zero, 0, ids=False)  # vLLM's dict holds the sampled token: not kept for K=0
        chat = engine.generate("Hi", max_tokens=2, chat=True, logprobs=4)[0]
        sent = _sent(fake)
        assert sent["path"] == "/v1/chat/completions" and (sent["logprobs"], sent["top_logprobs"]) == (True, 4)
        _check_logprobs(chat, 4, ids=False)


def test_vllm_prompt_logprobs_come_echoed_and_are_split_off(engines: list[RemoteEngine]) -> None:
    with Fake("vllm") as fake:
        engine = _open(engines, fake)
        result = engine.generate("one two three", max_tokens=2, prompt_logprobs=True, logprobs=1)[0]
        sent = _sent(fake)
        assert (sent["echo"], sent["prompt_logprobs"], sent["logprobs"]) == (True, 1, 1)
        assert result.text == "alpha beta" and result.prompt_tokens == 3  # the echoed prompt taken off
        prompt = result.prompt_logprobs
        assert prompt is not None and len(prompt) == 3 and prompt[0] is None
        assert [t["token"] for t in prompt[1:] if t] == [" two", " three"]
        assert [t["logprob"] for t in prompt[1:] if t] == pytest.approx([-1.1, -1.2])
        assert [[a["token"] for a in t["top_logprobs"]] for t in prompt[1:] if t] == [[" two"], [" three"]]
        _check_logprobs(result, 1, ids=False)
        assert result.prompt_perplexity == pytest.approx(math.exp(1.15))
        alone = engine.generate("one two", max_tokens=2, prompt_logprobs=True)[0]
        assert _sent(fake)["logprobs"] == 0 and alone.logprobs is None  # only what was asked
        assert alone.prompt_logprobs is not None and len(alone.prompt_logprobs) == 2
        assert alone.text == "alpha beta"


@pytest.mark.parametrize(
    ("version", "field"),
    [("0.11.0", "structured_outputs"), ("0.9.2", "guided")],  # structured_outputs since 0.10.2
)
def test_vllm_structured_outputs_by_version(version: str, field: str, engines: list[RemoteEngine]) -> None:
    def sent_format(fake: Fake) -> Any:
        body = _sent(fake)
        if field == "structured_outputs":
            assert not any(k.startswith("guided_") for k in body)
            return body["structured_outputs"]
        assert "structured_outputs" not in body
        return {k.removeprefix("guided_"): v for k, v in body.items() if k.startswith("guided_")}

    with Fake("vllm", version=version, words=ANSWER) as fake:
        engine = _open(engines, fake)
        result = engine.generate("A person:", max_tokens=10, json_schema=Person)[0]
        assert sent_format(fake) == {"json": Person.model_json_schema()}
        assert result.parsed == Person(name="Ada") and result.parse_error is None
        engine.generate("A number:", max_tokens=10, regex="[0-9]+")
        assert sent_format(fake) == {"regex": "[0-9]+"}
        chat = engine.generate("Yes?", max_tokens=10, chat=True, grammar=GBNF)[0]
        assert sent_format(fake) == {"grammar": GBNF} and chat.parsed == chat.text


# -- a plain OpenAI-compatible server ------------------------------------------------------------


def test_openai_logprobs_and_response_format(engines: list[RemoteEngine]) -> None:
    with Fake("openai") as fake:
        engine = _open(engines, fake)
        result = engine.generate("a b", max_tokens=2, logprobs=3)[0]
        assert _sent(fake)["logprobs"] == 3
        _check_logprobs(result, 3, ids=False)
        chat = engine.generate("Hi", max_tokens=2, chat=True, logprobs=2)[0]
        assert (_sent(fake)["logprobs"], _sent(fake)["top_logprobs"]) == (True, 2)
        _check_logprobs(chat, 2, ids=False)
    with Fake("openai", words=ANSWER) as fake:
        engine = _open(engines, fake)
        result = engine.generate("A person:", max_tokens=10, chat=True, response_format=Person)[0]
        assert _sent(fake)["response_format"] == {
            "type": "json_schema",
            "json_schema": {"name": "Person", "schema": Person.model_json_schema()},
        }
        assert result.parsed == Person(name="Ada")
        engine.generate("A person:", max_tokens=10, json_schema=json.dumps(SCHEMA))
        assert _sent(fake)["response_format"]["json_schema"] == {"name": "output", "schema": SCHEMA}


# -- a format cut short, or not followed ---------------------------------------------------------


def test_parse_error_when_cut_short_or_invalid(engines: list[RemoteEngine]) -> None:
    with Fake("ollama", version="0.13.0", words=ANSWER) as fake:
        engine = _open(engines, fake)
        cut = engine.generate("A person:", max_tokens=2, json_schema=SCHEMA)[0]
        assert cut.finish_reason == "length" and cut.text == '{"name": "Ada'
        assert cut.parsed is None
        assert cut.parse_error == "cut short by max_tokens=2 before the json_schema output was complete"
    with Fake("vllm", words=['{"name":', " 1}"]) as fake:  # a server that did not follow the schema
        engine = _open(engines, fake)
        bad = engine.generate("A person:", max_tokens=10, json_schema=Person)[0]
        assert bad.finish_reason == "stop" and bad.parsed is None
        assert bad.parse_error is not None and bad.parse_error.startswith("ValidationError")


# -- one-line refusals, before anything is sent ---------------------------------------------------


REFUSALS = [
    ("llama-server", {"prompt_logprobs": True}, r"prompt_logprobs=True: llama-server returns log-probabilities for generated tokens only"),
    ("llama-server", {"regex": "[0-9]+"}, r"regex=: llama-server has no regex field .*grammar='root ::= \.\.\.'"),
    ("llama-server", {"grammar": 'start: "yes"'}, r"grammar=: llama-server takes GBNF \(root ::= \.\.\.\), and this grammar is Lark"),
    ("ollama", {"prompt_logprobs": True}, r"prompt_logprobs=True: Ollama 0\.13\.0 returns log-probabilities for generated tokens only"),
    ("ollama", {"regex": "[0-9]+"}, r"regex=: Ollama's format takes a JSON schema only"),
    ("ollama", {"grammar": GBNF}, r"grammar=: Ollama's format takes a JSON schema only"),
    ("vllm", {"prompt_logprobs": True, "chat": True}, r"prompt_logprobs=True with chat=True: vLLM streams no prompt log-probabilities"),
    ("openai", {"prompt_logprobs": True}, r"prompt_logprobs=True: an OpenAI-compatible server returns log-probabilities for generated tokens only"),
    ("openai", {"regex": "[0-9]+"}, r"regex=: an OpenAI-compatible server's response_format takes a JSON schema only"),
    ("openai", {"grammar": GBNF}, r"grammar=: an OpenAI-compatible server's response_format takes a JSON schema only"),
    *(
        (kind, {"choices": ["yes", "no"]}, r"choices=: .* cannot score options by likelihood .*json_schema=\{'enum': \[\.\.\.\]\}")
        for kind in ("llama-server", "ollama", "vllm", "openai")
    ),
]


@pytest.mark.parametrize(("kind", "params", "message"), REFUSALS)
def test_what_a_server_cannot_do_is_refused_in_one_line_before_sending(
    kind: str, params: dict[str, Any], message: str, engines: list[RemoteEngine]
) -> None:
    with Fake(kind, version="0.13.0" if kind == "ollama" else None) as fake:
        engine = _open(engines, fake)
        with pytest.raises(InvalidParamsError, match=f"^{message}") as info:
            engine.submit_many(["x", "y"], max_tokens=2, **params)
        assert "\n" not in str(info.value)
        assert fake.books.requests == [] and engine.snapshot()["queue"]["length"] == 0
