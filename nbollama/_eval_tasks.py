"""Finding lm-eval tasks without the network, and running lm-eval quietly.

lm-evaluation-harness indexes ~15,000 task YAMLs of its own (seconds) and
loads their data from the Hugging Face hub. A notebook's tasks are often a
folder of YAMLs over local JSON: those are looked up first, alone, and
their relative ``data_files`` are read from the YAML's own folder (lm-eval
would read them from the working directory). When every task asked for
reads local files, the hub is switched off for the run, so nothing leaves
the machine; a hub task (``hellaswag``, ``arc_easy``) turns lm-eval's own
index on and lets ``datasets`` download as it normally does.

lm-eval and ``datasets`` print, log and draw tqdm bars (some from
subprocesses, straight to the process's file descriptors). ``quiet()``
captures all of it while a run lasts, so a notebook cell shows only what
nbollama draws; what was captured is kept for when something fails.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .exceptions import InvalidParamsError

__all__ = ["TaskPlan", "plan_tasks", "hub_offline", "quiet", "PACKAGED"]

#: ``dataset_path`` values that read local files through ``datasets``' own builders
PACKAGED = frozenset({"json", "csv", "parquet", "text", "arrow"})
#: The loggers of what an lm-eval run uses (captured by ``quiet``)
_LOGGERS = ("lm_eval", "lm-eval", "datasets", "evaluate", "absl", "filelock", "fsspec", "urllib3")
_KINDS = {
    "multiple_choice": "loglikelihood",
    "loglikelihood": "loglikelihood",
    "loglikelihood_rolling": "loglikelihood_rolling",
    "generate_until": "generate_until",
}


@dataclass
class TaskPlan:
    """The tasks of one run, found: what lm-eval's ``TaskManager.load`` takes, and what they need."""

    manager: Any  # lm_eval.tasks.TaskManager
    specs: list[Any]  # a task's name, or its config with its data files made absolute
    local: bool  # every task reads files on this machine: the hub stays off
    #: request kind -> the generation keywords of each task that asks it (``{}`` for scoring)
    kinds: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


def _load_yaml(path: Path) -> dict[str, Any]:
    from lm_eval.tasks._yaml_loader import load_yaml  # lm-eval's own loader (!function, include)

    return dict(load_yaml(path, resolve_func=True))


def _absolute_files(cfg: dict[str, Any], folder: Path) -> dict[str, Any]:
    """``dataset_kwargs.data_files`` made absolute against the YAML's folder."""
    kwargs = dict(cfg.get("dataset_kwargs") or {})
    files = kwargs.get("data_files")

    def fix(value: Any) -> Any:
        if isinstance(value, str) and "://" not in value and not Path(value).is_absolute():
            return str(folder / value)
        if isinstance(value, list):
            return [fix(v) for v in value]
        if isinstance(value, dict):
            return {k: fix(v) for k, v in value.items()}
        return value

    if files is not None:
        kwargs["data_files"] = fix(files)
        return {**cfg, "dataset_kwargs": kwargs}
    return cfg


def _folders(include_paths: Sequence[str | Path]) -> list[Path]:
    folders = []
    for raw in include_paths:
        folder = Path(raw).expanduser().resolve()
        if not folder.is_dir():
            raise InvalidParamsError(f"include path {str(raw)!r} is not a folder")
        folders.append(folder)
    return folders


def plan_tasks(names: Sequence[str], include_paths: Sequence[str | Path] = ()) -> TaskPlan:
    """Find every task: in ``include_paths`` first (lm-eval's own ~15k only when a name is not
    there). An unknown name raises ``InvalidParamsError`` naming what is there."""
    from lm_eval.tasks import TaskManager

    if not names:
        raise InvalidParamsError("give at least one task name (e.g. nbollama_mc or hellaswag)")
    folders = _folders(include_paths)
    paths = [str(f) for f in folders]
    found: set[str] = set()
    if paths:
        manager = TaskManager(include_path=paths, include_defaults=False)
        found = set(manager.all_tasks)
    local_names = [n for n in names if n in found]
    if len(local_names) < len(names):
        manager = TaskManager(include_path=paths or None)
        unknown = [n for n in names if n not in manager.all_tasks]
        if unknown:
            where = f" under {', '.join(paths)}" if paths else ""
            listed = f" (there: {', '.join(sorted(found))})" if found else ""
            raise InvalidParamsError(
                f"unknown task(s) {', '.join(unknown)}: not a task{where}{listed} nor one of "
                "lm-eval's (python -m lm_eval ls tasks lists them)"
            )
    specs: list[Any] = []
    local = len(local_names) == len(names)
    kinds: dict[str, list[dict[str, Any]]] = {}
    for name in names:
        entry = manager.task_index.get(name)
        yaml_path = getattr(entry, "yaml_path", None)
        is_task = str(getattr(entry, "kind", "")).upper().endswith("TASK")
        cfg = _load_yaml(Path(yaml_path)) if yaml_path is not None and is_task else None
        if yaml_path is None or cfg is None or "task" not in cfg:  # a group or a tag: as named
            specs.append(name)
            local = False
            continue
        if name in local_names:
            cfg = _absolute_files(cfg, Path(yaml_path).parent)
            specs.append(cfg)
            local = local and cfg.get("dataset_path") in PACKAGED
        else:
            specs.append(name)
        kind = _KINDS.get(str(cfg.get("output_type")))
        if kind is not None:
            gen = dict(cfg.get("generation_kwargs") or {}) if kind == "generate_until" else {}
            kinds.setdefault(kind, []).append(gen)
    return TaskPlan(manager, specs, local, kinds)


# -- the hub switched off --------------------------------------------------------------------------------


@contextlib.contextmanager
def hub_offline(offline: bool) -> Iterator[None]:
    """While it lasts, ``datasets`` and ``huggingface_hub`` ask nothing of the hub (``offline``)."""
    if not offline:
        yield
        return
    saved_env = {k: os.environ.get(k) for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")}
    os.environ.update({k: "1" for k in saved_env})
    patched: list[tuple[Any, str, Any]] = []
    for module_name, attrs in (
        ("datasets.config", ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")),
        ("huggingface_hub.constants", ("HF_HUB_OFFLINE",)),
    ):
        module = sys.modules.get(module_name)
        for attr in attrs:
            if module is not None and hasattr(module, attr):
                patched.append((module, attr, getattr(module, attr)))
                setattr(module, attr, True)
    try:
        yield
    finally:
        for module, attr, value in patched:
            setattr(module, attr, value)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# -- quiet ------------------------------------------------------------------------------------------------


class _Capture(logging.Handler):
    def __init__(self, sink: io.StringIO) -> None:
        super().__init__(logging.INFO)
        self.sink = sink
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            self.sink.write(self.format(record) + "\n")


@contextlib.contextmanager
def _fds_to(sink: io.StringIO) -> Iterator[None]:
    """File descriptors 1 and 2 into a temporary file (a subprocess's or C library's output)."""
    try:
        saved = [os.dup(1), os.dup(2)]
    except OSError:  # no such descriptors (an embedded interpreter): nothing to capture
        yield
        return
    with tempfile.TemporaryFile(mode="w+b") as temp:
        for fd in (1, 2):
            os.dup2(temp.fileno(), fd)
        try:
            yield
        finally:
            for fd, copy in zip((1, 2), saved):
                os.dup2(copy, fd)
                os.close(copy)
            temp.seek(0)
            sink.write(temp.read().decode("utf-8", errors="replace"))


@contextlib.contextmanager
def quiet() -> Iterator[io.StringIO]:
    """Everything lm-eval and ``datasets`` print, log or draw goes into the yielded buffer."""
    sink = io.StringIO()
    env = {
        "TQDM_DISABLE": "1",
        "DISABLE_MULTIPROC": "1",
    }  # no bars; bootstrap without a process pool
    saved_env = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    handler = _Capture(sink)
    saved_loggers = []
    for name in _LOGGERS:
        lg = logging.getLogger(name)
        saved_loggers.append((lg, lg.propagate, lg.level, list(lg.handlers)))
        lg.handlers = [handler]
        lg.propagate = False
        lg.setLevel(logging.INFO)
    bars = sys.modules.get("datasets.utils.tqdm")
    bars_were = bars.are_progress_bars_disabled() if bars is not None else None
    if bars is not None:
        bars.disable_progress_bars()
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(contextlib.redirect_stdout(sink))
            stack.enter_context(contextlib.redirect_stderr(sink))
            stack.enter_context(_fds_to(sink))
            yield sink
    finally:
        if bars is not None and bars_were is False:
            bars.enable_progress_bars()
        for lg, propagate, level, handlers in saved_loggers:
            lg.handlers, lg.propagate = handlers, propagate
            lg.setLevel(level)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
