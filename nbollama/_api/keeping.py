"""How an engine keeps its results: through the result store at submit, and a run per call.

``EngineBase`` mixes this in. At ``submit_many``, each prepared request gets its
key; what the policy lets the store replay finishes at once from it (and never
reaches the engine), the rest are written as they end. A call (``generate``, a
cell) opens a run, so that the same call after a dead kernel resumes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import partial
from typing import Any, Protocol

from .._logging import logger
from .outputs import OutputRequest
from .replay import (
    CacheMode,
    StoreRun,
    check_cache,
    default_store,
    replayable,
    replayed_result,
    request_key,
    result_value,
    run_key,
)
from .requests import Handle, SamplingParams, check_request_params
from .store import ResultStore

__all__ = ["KeepsResults"]


class _Prepared(Protocol):
    @property
    def handle(self) -> Handle: ...


def _keep(store: ResultStore, key: str, label: str, handle: Handle) -> None:
    """(The engine's thread.) Queue a finished request for the store; the writer encodes it."""
    result = handle.result()
    if result.ok and not result.cached:
        store.put(key, label, partial(result_value, result))


class KeepsResults:
    """The result store's half of an engine: hooks each engine fills, and the store's use of them."""

    name: str

    def _store_identity(self) -> str | None:
        """Everything about this engine that decides an output, as text; None: it keeps nothing."""
        return None

    def _store_material(self, request: Any) -> bytes:
        """The prompt as the model sees it (tokens in the kernel, the text for a server)."""
        prompt: str = request.handle.prompt
        return prompt.encode()

    def _replay_is_exact(self) -> bool:
        """Whether a rerun gives the same output as the stored one (reproducible mode)."""
        return False

    def _store_label(self) -> str:
        """The model's name in ``%nbollama cache``."""
        return self.name

    def _usable_store(self) -> tuple[ResultStore, str] | None:
        """The store and this engine's identity, or None; a store that went off says so once, here."""
        store = default_store()
        enabled = store.enabled
        problem = store.take_problem()
        if problem is not None:
            logger.warning("nbollama: %s", problem)  # the caller's thread: one line in its cell
        identity = self._store_identity() if enabled else None
        return (store, identity) if identity is not None else None

    def _through_store(
        self, requests: Sequence[_Prepared], sampling: SamplingParams, output: OutputRequest, cache: CacheMode | StoreRun
    ) -> int:
        """Finish from the store what it may replay; have the rest written as they end. How many replayed."""
        run = cache if isinstance(cache, StoreRun) else None
        mode: CacheMode = run.mode if run is not None else cache  # type: ignore[assignment]  # not a run here
        if mode is False:
            return 0
        usable = self._usable_store()
        if usable is None:
            return 0
        store, identity = usable
        exact = self._replay_is_exact()
        resume = run.resume_keys if run is not None else frozenset()
        keyed = [
            (r, request_key(identity, self._store_material(r), sampling, output))
            for r in requests
            if not r.handle.done()
        ]
        wanted = [
            key for _, key in keyed
            if replayable(mode, exact=exact, sampling=sampling, output=output, key=key, resume_keys=resume)
        ]  # fmt: skip
        found = store.get_many(wanted)
        label = self._store_label()
        for request, key in keyed:
            handle = request.handle
            handle.store_key = key
            if key in found:
                handle._replay(
                    replayed_result(found[key], request_id=handle.id, prompt=handle.prompt, output=output,
                                    model=handle.model)
                )
            else:
                handle.add_done_callback(partial(_keep, store, key, label))
        return sum(1 for _, key in keyed if key in found)

    def open_store_run(self, prompts: Sequence[str], params: dict[str, Any]) -> StoreRun | None:
        """The result store's record of one call's run (``generate``, a cell): a feeder passes it
        as ``cache=`` so that an identical run that never completed resumes. None: no store."""
        sampling, options = check_request_params(params)
        mode = check_cache(options["cache"])
        if mode is False or isinstance(mode, StoreRun):
            return None
        usable = self._usable_store()
        if usable is None:
            return None
        store, identity = usable
        key = run_key(identity, list(prompts), sampling, options)
        rows = store.run_rows(key) or {}
        store.start_run(key, len(prompts), resume=bool(rows))
        return StoreRun(key, mode, frozenset(rows.values()), len(rows), store)

    def _run_for(self, prompts: str | Iterable[str], params: dict[str, Any]) -> StoreRun | None:
        listed = [prompts] if isinstance(prompts, str) else prompts
        if not isinstance(listed, Sequence):
            return None  # a one-pass iterable: fed as it comes, no run to resume
        return self.open_store_run(listed, params)

