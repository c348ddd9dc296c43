"""nbollama as an lm-evaluation-harness backend: any engine, local or remote, as lm-eval's ``LM``.

::

    import lm_eval, nbollama.eval                      # registers the model "nbollama"
    lm_eval.simple_evaluate(model="nbollama", model_args="engine=default", tasks=["arc_easy"])
    nbollama.eval.evaluate(["nbollama_mc"], include_path="examples/data", limit=20)   # an EvalResults

Every request of a task goes into the engine's queue at once (fed as it
drains, so the slots stay full) instead of lm-eval's one at a time:

* ``loglikelihood``: the continuations of one context are scored as
  ``choices`` from ONE prefill of it; ``is_greedy`` comes from each token's
  top log-probability (see ``nbollama._eval_requests``);
* ``loglikelihood_rolling``: ``prompt_logprobs``, in lm-eval's rolling
  windows when a text is longer than a slot holds;
* ``generate_until``: ``generate`` with lm-eval's ``until``, ``max_gen_toks``,
  ``temperature`` and ``do_sample``.

A server that cannot answer a request kind (llama-server and Ollama return
no prompt log-probabilities) is refused in one line before anything is
sent. lm-eval's own CLI finds the model once this module is imported:
``python -m nbollama.eval run --model nbollama --model_args path=M.gguf,parallel=8 --tasks ...``.
Needs the ``eval`` extra: ``pip install 'nbollama[eval]'``.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol

from ._api.feed import Feeder, window_of
from ._api.requests import Handle, Result
from ._eval_requests import (
    CHOICE_PARAMS,
    SCORE_PARAMS,
    Ask,
    Window,
    generation_params,
    plan_loglikelihood,
    read_loglikelihood,
    read_rolling,
    rolling_windows,
)
from ._eval_results import EvalResults
from ._eval_tasks import TaskPlan, hub_offline, plan_tasks, quiet
from .engine import Engine, EngineLike
from .exceptions import InvalidParamsError, QueueFullError, RequestFailedError

INSTALL_HINT = "nbollama.eval needs lm-evaluation-harness: pip install 'nbollama[eval]'"

try:
    import lm_eval
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as exc:  # the optional extra is not installed
    raise ImportError(INSTALL_HINT) from exc

__all__ = [
    "NbollamaLM",
    "EvalObserver",
    "EvalResults",
    "evaluate",
    "INSTALL_HINT",
    "REFRESH_SECONDS",
]

#: Seconds between two calls of an observer's ``tick`` (and of the default progress view).
REFRESH_SECONDS = 0.25
#: lm-eval adds these to ``model_args`` (``--batch_size``...); the engine's queue decides instead
_LM_EVAL_KEYS = ("batch_size", "max_batch_size", "device")
#: ``model_args`` that go to ``nbollama.connect`` with ``url=``
_CONNECT_KEYS = ("kind", "model", "api_key_env", "max_inflight", "timeout", "ca_bundle")


class EvalObserver(Protocol):
    """What a view of an evaluation is told: each engine's run, each request kind as it
    starts, ticks, its end (all on the thread that runs the evaluation)."""

    def begin(self, engine: str, tasks: Sequence[str]) -> None:
        """An engine's run starts (its tasks load; requests follow)."""

    def end(self, results: EvalResults) -> None:
        """An engine's run ended: its metrics."""

    def started(self, kind: str, feeder: Feeder, tasks: Sequence[str]) -> None:
        """``kind``'s requests are being fed; ``tasks[i]`` is the task of the feeder's prompt i."""

    def tick(self) -> None:
        """(Every ``REFRESH_SECONDS`` on the feeding thread) time to update."""

    def finished(self) -> None:
        """Every request of the kind ended."""


class _Sender:
    """``submit_many`` for a ``Feeder`` whose requests each carry their own parameters: the
    feeder hands over consecutive slices of the prompts, and each run of equal parameters
    goes to the engine as one ``submit_many``."""

    def __init__(self, engine: EngineLike, asks: Sequence[Ask]) -> None:
        self.engine = engine
        self.asks = asks
        self.cursor = 0

    def __call__(self, prompts: Sequence[str], **_: Any) -> list[Handle]:
        batch = self.asks[self.cursor : self.cursor + len(prompts)]
        handles: list[Handle] = []
        try:
            for _key, run in itertools.groupby(batch, key=lambda a: a.params):
                group = list(run)
                handles += self.engine.submit_many([a.prompt for a in group], **group[0].params)
        except QueueFullError:  # none of this slice is in flight: the feeder retries it whole
            for handle in handles:
                handle.cancel()
            raise
        self.cursor += len(prompts)
        return handles


def _windows(
    tokens: list[int], prefix: int, max_tokens: int
) -> Iterator[tuple[list[int], list[int]]]:
    """lm-eval's rolling windows (one token of context, as its own models ask), made disjoint."""
    for window in get_rolling_token_windows(tokens, prefix, max_tokens, 1):
        yield make_disjoint_window(window)


def _split_options(options: dict[str, Any]) -> dict[str, Any]:
    for key in _LM_EVAL_KEYS:
        options.pop(key, None)
    return options


@register_model("nbollama")
class NbollamaLM(LM):  # lm-eval is untyped: LM is Any to mypy
    """lm-eval's model over an nbollama engine.

    ``engine``: an engine, or the name of one in the kernel (``%nbollama load --as NAME``);
    ``path=``: a model to load (with load options: ``parallel``, ``ctx``, ``kv_type``...);
    ``url=``: a server to connect to (``kind``, ``model``, ``max_inflight``...). With none,
    the kernel's engine, else the bundled model. ``observer`` is told how feeding goes
    (``%nbollama eval``'s live view); without one, ``progress=True`` shows
    ``generate(progress=True)``'s view.
    """

    def __init__(
        self,
        engine: EngineLike | str | None = None,
        path: str | None = None,
        url: str | None = None,
        *,
        observer: EvalObserver | None = None,
        progress: bool = True,
        max_gen_toks: int = 256,
        **options: Any,
    ) -> None:
        super().__init__()
        from . import session

        options = _split_options(dict(options))
        given = [n for n, v in (("engine", engine), ("path", path), ("url", url)) if v is not None]
        if len(given) > 1:
            raise InvalidParamsError(
                f"nbollama: give one of engine=, path= or url=, not {' and '.join(given)}"
            )
        self._owned = False
        if url is not None:
            from .remote import connect

            unknown = sorted(set(options) - set(_CONNECT_KEYS))
            if unknown:
                raise InvalidParamsError(
                    f"nbollama url=: unknown option(s) {unknown}; known: {list(_CONNECT_KEYS)}"
                )
            self._engine: EngineLike = connect(url, **options)
            self._owned = True
        elif path is not None or (engine is None and session.current_engine() is None):
            self._engine = Engine.load(path, **options)
            self._owned = True
        elif options:
            raise InvalidParamsError(
                f"nbollama: {sorted(options)} apply to path= or url=, not to a loaded engine"
            )
        elif isinstance(engine, str) or engine is None:
            self._engine = session.engine_named(engine)
        else:
            self._engine = engine
        self.observer = observer
        self.progress = progress
        self.max_gen_toks = int(max_gen_toks)
        self._route: str | None = None
        self.requests_sent = 0

    @property
    def engine(self) -> EngineLike:
        return self._engine

    def close(self) -> None:
        """Close the engine if this model loaded or connected it (never the kernel's)."""
        if self._owned:
            self._engine.close()

    @property
    def tokenizer_name(self) -> str:
        return self._engine.model_name

    def get_model_info(self) -> dict[str, Any]:
        """What lm-eval writes into its results' ``config``."""
        snap = self._engine.snapshot()
        return {
            "model_name": self._engine.model_name,
            "engine": snap.get("name") or "",
            "parallel": self._engine.parallel,
        }

    # -- what a kind of request needs of the engine, asked before anything is sent ----------------

    def _refused(self, what: str, params: Mapping[str, Any]) -> InvalidParamsError | None:
        try:
            self._engine.submit_many([], **params)  # checks everything, queues nothing
        except InvalidParamsError as exc:
            return InvalidParamsError(f"{what}: not possible on this engine: {exc}")
        return None

    def score_route(self) -> str:
        """How continuations are scored here: "choices" (one prefill per context) or "prompt"
        (prompt log-probabilities); ``InvalidParamsError`` when neither."""
        if self._route is None:
            if self._refused("choices", {**CHOICE_PARAMS, "choices": [" a", " b"]}) is None:
                self._route = "choices"
            else:
                refusal = self._refused("loglikelihood", SCORE_PARAMS)
                if refusal is not None:
                    raise refusal
                self._route = "prompt"
        return self._route

    def check(self, kind: str, gen_kwargs: Sequence[Mapping[str, Any]] = ()) -> None:
        """Raise, before anything is sent, if the engine cannot answer ``kind`` requests."""
        if kind == "loglikelihood":
            self.score_route()
        elif kind == "loglikelihood_rolling":
            refusal = self._refused(kind, SCORE_PARAMS)
            if refusal is not None:
                raise refusal
        elif kind == "generate_until":
            for kwargs in gen_kwargs or ({},):
                refusal = self._refused(kind, generation_params(kwargs, self.max_gen_toks))
                if refusal is not None:
                    raise refusal

    # -- feeding -------------------------------------------------------------------------------------

    def _run(self, kind: str, asks: Sequence[Ask]) -> list[Result]:
        """Every ask through the engine's queue (fed as it drains); results in order."""
        if not asks:
            return []
        feeder = Feeder(
            [a.prompt for a in asks], _Sender(self._engine, asks), window=window_of(self._engine)
        )
        feeder.feed()  # a refusal raises here, with nothing queued
        tick: Callable[[], object] | None = None
        reporter = None
        if self.observer is not None:
            self.observer.started(kind, feeder, [a.task for a in asks])
            tick = self.observer.tick
        elif self.progress:
            from ._api.progress import progress_reporter

            reporter = progress_reporter(feeder)
            tick = reporter.update
        try:
            results = feeder.run(tick, REFRESH_SECONDS)
        except BaseException:
            feeder.stop()
            raise
        finally:
            if reporter is not None:
                reporter.close()
        if self.observer is not None:
            self.observer.finished()
        self.requests_sent += len(asks)
        failed = [r for r in results if not r.ok]
        if failed:
            raise RequestFailedError(
                f"{kind}: {len(failed)} of {len(results)} requests failed; the first: {failed[0].error}"
            )
        return results

    # -- lm-eval's three methods ----------------------------------------------------------------------

    def loglikelihood(
        self, requests: list[Any], disable_tqdm: bool = False
    ) -> list[tuple[float, bool]]:
        """``(logprob, is_greedy)`` of each ``(context, continuation)``; a context's continuations
        from one prefill."""
        if not requests:
            return []
        pairs = [(str(r.args[0]), str(r.args[1])) for r in requests]
        asks, reads = plan_loglikelihood(
            pairs, [r.task_name or "" for r in requests], choices=self.score_route() == "choices"
        )
        answers = read_loglikelihood(reads, self._run("loglikelihood", asks))
        for pair, answer in zip(pairs, answers):
            self.cache_hook.add_partial("loglikelihood", pair, answer)
        return answers

    def _tokenizer(self) -> tuple[Callable[[str], list[int]] | None, int | None]:
        """How texts are cut into windows: the engine's tokenizer and what a slot holds (BOS,
        and lm-eval's one extra token, and the one generated, aside). A server: none."""
        if isinstance(self._engine, Engine):
            engine = self._engine
            return (lambda text: engine.tokenize(text, add_special=False)), engine.ctx - 3
        return None, None

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Each text's total log-probability, over lm-eval's rolling windows when it is long."""
        if not requests:
            return []
        self.check("loglikelihood_rolling")
        tokenize, max_tokens = self._tokenizer()
        plans: list[list[Window]] = [
            rolling_windows(str(r.args[0]), tokenize, max_tokens, _windows) for r in requests
        ]
        asks = [
            Ask(w.text, SCORE_PARAMS, r.task_name or "")
            for r, plan in zip(requests, plans)
            for w in plan
        ]
        results = self._run("loglikelihood_rolling", asks)
        totals, at = [], 0
        for request, plan in zip(requests, plans):
            total = read_rolling(plan, results[at : at + len(plan)])
            at += len(plan)
            self.cache_hook.add_partial("loglikelihood_rolling", (request.args[0],), total)
            totals.append(total)
        return totals

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Each context's continuation, stopped at lm-eval's ``until`` strings."""
        if not requests:
            return []
        params = [generation_params(r.args[1], self.max_gen_toks) for r in requests]
        distinct: list[dict[str, Any]] = []
        for p in params:
            if p not in distinct:
                distinct.append(p)
        for p in distinct:
            refusal = self._refused("generate_until", p)
            if refusal is not None:
                raise refusal
        asks = [Ask(str(r.args[0]), p, r.task_name or "") for r, p in zip(requests, params)]
        texts = [result.text for result in self._run("generate_until", asks)]
        for request, text in zip(requests, texts):
            self.cache_hook.add_partial("generate_until", request.args, text)
        return texts


def _key(engine: EngineLike, taken: Sequence[str]) -> str:
    """An engine's column in the results: its kernel name, else its model's (made unique)."""
    base = engine.name or engine.model_name
    key, n = base, 2
    while key in taken:
        key, n = f"{base} ({n})", n + 1
    return key


def evaluate(
    tasks: str | Sequence[str],
    *,
    engine: EngineLike | str | None | Sequence[EngineLike | str] = None,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    include_path: str | Sequence[str] = (),
    observer: EvalObserver | None = None,
    bootstrap_iters: int = 1000,
) -> EvalResults:
    """Run lm-eval's tasks on an engine (the kernel's by default), or on each of several in turn
    (``engine=["small", "lab"]``: one table compares them), and return an ``EvalResults``.

    Tasks are looked for in ``include_path`` first (relative ``data_files`` read beside their
    YAML); when all of them read local files the hub is off for the run. Whether every
    engine can answer each request kind is asked before anything is sent. lm-eval's own
    output (logs, prints, bars) is captured into ``EvalResults.log``.
    """
    names = [tasks] if isinstance(tasks, str) else list(tasks)
    paths = [include_path] if isinstance(include_path, str) else list(include_path)
    plan = plan_tasks(names, paths)
    targets: list[EngineLike | str | None] = (
        list(engine) if isinstance(engine, (list, tuple)) else [engine]  # type: ignore[list-item]
    )
    lms: list[NbollamaLM] = []
    try:
        for target in targets:
            lms.append(NbollamaLM(target, observer=observer, progress=observer is None))
        for lm in lms:
            for kind, gen_kwargs in plan.kinds.items():
                lm.check(kind, gen_kwargs)
        parts: list[EvalResults] = []
        for lm in lms:
            parts.append(
                _evaluate_one(
                    lm,
                    plan,
                    names,
                    [k for p in parts for k in p.engines],
                    limit=limit,
                    num_fewshot=num_fewshot,
                    bootstrap_iters=bootstrap_iters,
                )
            )
    finally:
        for lm in lms:
            lm.close()
    return EvalResults.merge(parts)


def _evaluate_one(
    lm: NbollamaLM,
    plan: TaskPlan,
    names: Sequence[str],
    taken: Sequence[str],
    **options: Any,
) -> EvalResults:
    key = _key(lm.engine, taken)
    if lm.observer is not None:
        lm.observer.begin(key, names)
    started = time.perf_counter()
    with quiet() as log, hub_offline(plan.local):
        out = lm_eval.simple_evaluate(
            model=lm, tasks=plan.specs, task_manager=plan.manager, log_samples=True, **options
        )
    part = EvalResults(
        {key: out},
        seconds={key: time.perf_counter() - started},
        requests={key: lm.requests_sent},
        log=log.getvalue(),
    )
    if lm.observer is not None:
        lm.observer.end(part)
    return part


if __name__ == "__main__":  # lm-eval's own CLI, with "nbollama" registered
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
