"""Every exception nbollama raises on purpose, in one tree.

::

    NbollamaError
    ├── ModelError
    │   ├── ModelNotFoundError      the path (or the bundled model) is not there
    │   └── ModelLoadError          not a GGUF file, truncated, or llama.cpp refused it
    ├── EngineError
    │   ├── EngineClosedError       the engine was closed; load a new one
    │   ├── ContextError            llama.cpp could not create a context of that size
    │   └── RemoteError             a remote server could not be reached or broke off (URL and reason)
    ├── RequestError
    │   ├── QueueFullError          the queue holds NBOLLAMA_MAX_QUEUE requests ("server busy")
    │   ├── PromptTooLongError      the prompt does not fit in one slot's context
    │   ├── InvalidParamsError      an argument or parameter is out of range  (also a ValueError)
    │   ├── RequestFailedError      the request ended with finish_reason="error"
    │   └── RequestTimeoutError     Handle.result(timeout=...) ran out  (also a TimeoutError)
    └── LlamaServerError            llama-server could not be built or started (nbollama.llama_server)

Requests that fail inside the batch loop never raise there: they end with
``finish_reason="error"`` and a message in ``Result.error`` so the other
slots go on. ``Handle.result()`` and ``await handle`` return such results;
``Handle.exception()`` gives the matching exception (``PromptTooLongError``,
``RequestFailedError``, ...) for code that wants to raise it. A cancelled
request is not an error either: its result has ``finish_reason="cancelled"``.

A remote engine (``nbollama.connect``) fails a request whose connection is
refused, times out or breaks mid-stream with a ``RemoteError`` (its
``exception()``; the result says the same in ``error``); its URL is shown with
credentials redacted. A server that stays busy (Ollama's HTTP 503) ends the
request with ``QueueFullError`` once the retries are spent.
"""

from __future__ import annotations

__all__ = [
    "NbollamaError",
    "ModelError",
    "ModelNotFoundError",
    "ModelLoadError",
    "EngineError",
    "EngineClosedError",
    "ContextError",
    "RemoteError",
    "RequestError",
    "QueueFullError",
    "PromptTooLongError",
    "InvalidParamsError",
    "RequestFailedError",
    "RequestTimeoutError",
    "LlamaServerError",
]


class NbollamaError(Exception):
    """Base class: catch this to catch anything nbollama raises on purpose."""


class ModelError(NbollamaError):
    """The model file could not be found or loaded."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}")


class ModelNotFoundError(ModelError, FileNotFoundError):
    """No file at the given path."""


class ModelLoadError(ModelError):
    """The file exists but is not a usable GGUF model."""


class EngineError(NbollamaError):
    """The engine itself cannot do what was asked."""


class EngineClosedError(EngineError):
    """The engine was closed; its slots and model are gone."""


class ContextError(EngineError):
    """llama.cpp refused to create a context (usually: not enough memory)."""


class RemoteError(EngineError):
    """A remote server could not be reached, timed out, or broke off a stream.

    ``url`` is the server's address with any credentials redacted; ``reason``
    says what happened (``connection refused``, ``no answer within 5 s``, ...).
    """

    def __init__(self, url: str, reason: str) -> None:
        self.url = url
        self.reason = reason
        super().__init__(f"{url}: {reason}")


class RequestError(NbollamaError):
    """A request could not be accepted or did not complete."""


class QueueFullError(RequestError):
    """The waiting queue is full; the engine is busy (Ollama answers HTTP 503 here)."""


class PromptTooLongError(RequestError):
    """The prompt needs more tokens than one slot's context holds."""


class InvalidParamsError(RequestError, ValueError):
    """A sampling parameter is out of its range."""



class RequestFailedError(RequestError):
    """The request ended with ``finish_reason="error"``."""


class RequestTimeoutError(RequestError, TimeoutError):
    """A wait for a request (``Handle.result(timeout=...)``, ``BackgroundGeneration.wait``) ran out."""


class LlamaServerError(NbollamaError):
    """llama-server could not be built, found or started."""
