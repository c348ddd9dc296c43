"""What the result store keeps and gives back: keys, values, runs, and when replaying is honest.

* **The key** of a request is a hash of everything that decides its output:
  the engine's identity (the model's bytes or a server's model, the llama.cpp
  build, the KV type, reproducible mode; ``_store_identity`` of each engine),
  the prompt as the model sees it (tokens after the chat template, in the
  kernel; a server gets the text) and every sampling and output parameter.
* **The policy** (``cache=``): ``"auto"`` replays only what a fresh run would
  give anyway (greedy, seeded or scored requests on an engine in reproducible
  mode) and the finished rows of an identical run that never completed;
  ``True`` replays any stored identical request (DSPy's behaviour); ``False``
  neither reads nor writes.
* **A run** is one ``generate()`` call or ``%%generate`` cell: its key is the
  engine's identity, the parameters and every prompt in order. Its finished
  rows are noted as they end, so the same run after a dead kernel resumes.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

from ..exceptions import InvalidParamsError
from .outputs import Choices, Constraint, OutputRequest
from .requests import Result, SamplingParams
from .store import ResultStore

__all__ = [
    "CacheMode",
    "StoreRun",
    "check_cache",
    "request_key",
    "run_key",
    "replayable",
    "result_value",
    "replayed_result",
    "default_store",
    "use_store_directory",
]

CacheMode = Literal["auto"] | bool
_VALUE_SKIP = frozenset({"id", "prompt", "slot", "parsed", "cached"})


@dataclass(frozen=True)
class StoreRun:
    """One call's run in the store: its key, its policy, and the rows an unfinished twin left."""

    key: str
    mode: CacheMode
    resume_keys: frozenset[str]
    resumed_rows: int  # rows an unfinished identical run finished (0: a new run)
    store: ResultStore


def check_cache(value: object) -> CacheMode | StoreRun:
    """``cache=`` checked before anything runs (a feeder passes its ``StoreRun`` as it)."""
    if isinstance(value, StoreRun) or value in ("auto", True, False):
        return value
    raise InvalidParamsError(f"cache={value!r}: must be 'auto', True or False")


def _output_spec(output: OutputRequest) -> object:
    if isinstance(output, Choices):
        return {"choices": list(output.options), "score": output.score}
    if isinstance(output, Constraint):
        return {"format": output.kind, "grammar": output.grammar}
    return None


def _digest(*parts: object) -> str:
    digest = hashlib.sha256()
    for part in parts:
        data = part if isinstance(part, bytes) else json.dumps(part, sort_keys=True, default=str).encode()
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def request_key(identity: str, material: bytes, sampling: SamplingParams, output: OutputRequest) -> str:
    """The key of one request: engine, prompt as the model sees it, every parameter."""
    return _digest(identity, material, asdict(sampling), _output_spec(output))


def run_key(
    identity: str, prompts: list[str], sampling: SamplingParams, options: dict[str, Any]
) -> str:
    """The key of one call's run: engine, parameters, and the prompts in order."""
    shape = {"chat": options.get("chat"), "system": options.get("system")}
    return _digest("run", identity, asdict(sampling), _output_spec(options.get("output")), shape, prompts)


def replayable(
    mode: CacheMode,
    *,
    exact: bool,
    sampling: SamplingParams,
    output: OutputRequest,
    key: str,
    resume_keys: frozenset[str],
) -> bool:
    """Whether a stored result may stand in for this request under the policy."""
    if mode is True:
        return True
    if mode is False:
        return False
    if key in resume_keys:
        return True  # a row an interrupted identical run finished
    fixed = sampling.temperature == 0 or sampling.seed is not None or isinstance(output, Choices)
    return exact and fixed


def result_value(result: Result) -> dict[str, Any]:
    """A ``Result`` as JSON-ready data, its id, prompt and slot aside (they belong to each run)."""
    value = {f.name: getattr(result, f.name) for f in fields(Result) if f.name not in _VALUE_SKIP}
    if value.get("server_timings") is not None:
        value["server_timings"] = dict(value["server_timings"])
    if value.get("choice_probs") is not None:
        value["choice_probs"] = dict(value["choice_probs"])
    return value


def replayed_result(
    value: dict[str, Any], *, request_id: int, prompt: str, output: OutputRequest, model: str
) -> Result:
    """A stored value as this request's ``Result``, marked ``cached``; a format is parsed again."""
    known = {f.name for f in fields(Result)} - _VALUE_SKIP
    given = {k: v for k, v in value.items() if k in known}  # fields a newer nbollama added are dropped
    for name in ("token_ids", "logprobs", "prompt_logprobs"):
        if given.get(name) is not None:
            given[name] = tuple(given[name])
    parsed = None
    if isinstance(output, Constraint) and given.get("parse_error") is None:
        parsed, error = output.parse(str(given.get("text", "")))
        given["parse_error"] = error
    given["model"] = model or given.get("model", "")
    return Result(id=request_id, prompt=prompt, slot=None, parsed=parsed, cached=True, **given)


_store_lock = threading.Lock()
_store: ResultStore | None = None


def default_store() -> ResultStore:
    """This process's store (``$NBOLLAMA_CACHE_DIR``, or the folder ``use_store_directory`` chose)."""
    global _store
    with _store_lock:
        if _store is None:
            _store = ResultStore()
        return _store


def use_store_directory(directory: str | Path | None) -> ResultStore:
    """Move this process's store to ``directory`` (None: back to the default); the new store."""
    global _store
    with _store_lock:
        old, _store = _store, ResultStore(Path(directory).expanduser() if directory is not None else None)
        store = _store
    if old is not None:
        old.close()
    return store
