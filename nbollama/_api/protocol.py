"""The one engine protocol the views, the magics and the session depend on.

The in-kernel ``Engine`` implements it; so does any other engine that can
queue prompts, stream them through ``Handle`` objects and describe itself as
an ``EngineSnapshot``. Views read only this and the snapshot shape, never an
engine's internals.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol, runtime_checkable

from .monitor import Subscription
from .replay import StoreRun
from .requests import Handle, Result
from .snapshot import EngineSnapshot

__all__ = ["EngineLike"]


@runtime_checkable
class EngineLike(Protocol):
    #: the engine's name in the kernel ("default", ``--as NAME``); "" outside one
    name: str

    @property
    def parallel(self) -> int: ...

    @property
    def closed(self) -> bool: ...

    @property
    def model_name(self) -> str: ...

    @property
    def summary(self) -> str: ...

    @property
    def feed_window(self) -> int:
        """How many of one call's prompts ``generate`` (and a cell) keeps inside the engine."""
        ...

    def submit(self, prompt: str, **params: Any) -> Handle: ...

    def submit_many(self, prompts: Iterable[str], **params: Any) -> list[Handle]: ...

    def generate(self, prompts: str | Iterable[str], **params: Any) -> list[Result]: ...

    async def agenerate(self, prompts: str | Iterable[str], **params: Any) -> list[Result]: ...

    def open_store_run(self, prompts: Sequence[str], params: dict[str, Any]) -> StoreRun | None:
        """The result store's record of one call (a cell): pass it to a ``Feeder`` as ``run=``."""
        ...

    def snapshot(self) -> EngineSnapshot: ...

    def subscribe(
        self, callback: Callable[[EngineSnapshot], object], *, interval: float = 0.25
    ) -> Subscription: ...

    def cancel_slot(self, slot: int) -> int | None: ...

    def cancel_all(self) -> int: ...

    def close(self) -> None: ...
