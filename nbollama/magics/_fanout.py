"""``--each VAR``: a cell's templates fanned out over a list, tuple, pandas Series or DataFrame.

A list or tuple gives ``{item}``; a Series its values as ``{item}`` and its
labels as ``{index}``; a DataFrame one item per row, its columns as
``{column}`` fields and its row label as ``{index}``. pandas is never imported
here: only a value of an already loaded pandas is recognised.
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from IPython.core.error import UsageError

from ._prompts import interpolate, template_fields

__all__ = ["fan_out"]


@dataclass(frozen=True)
class _Each:
    """What ``--each VAR`` fans out: one mapping of template fields per item, and their labels."""

    fields: list[dict[str, Any]]
    index: list[Any] | None  # pandas row labels; None for a list
    columns: tuple[str, ...] | None  # a DataFrame's columns


def fan_out(
    prog: str,
    name: str,
    templates: list[str],
    namespace: Mapping[str, Any],
    *,
    no_format: bool,
) -> tuple[list[str], tuple[Any, ...] | None]:
    """The prompts of ``--each name``: every template per item, in item order, and each
    prompt's row label (pandas only, else None).

    Fields are filled from the item, then (unless ``no_format``) the notebook's
    variables. A ``{field}`` that is no column of a DataFrame is a UsageError.
    """
    each = _each_items(prog, name, namespace)
    if not no_format:
        _check_columns(prog, name, each, templates, namespace)
    fill_from: Mapping[str, Any] = {} if no_format else namespace
    prompts = [interpolate(t, fill_from, item) for item in each.fields for t in templates]
    if each.index is None:
        return prompts, None
    return prompts, tuple(label for label in each.index for _ in templates)


def _is_pandas(value: object, kind: str) -> bool:
    """``isinstance(value, pandas.<kind>)`` without importing pandas when it is not loaded."""
    module = sys.modules.get("pandas")
    return module is not None and isinstance(value, getattr(module, kind))


def _each_items(prog: str, name: str, namespace: Mapping[str, Any]) -> _Each:
    """The items of ``--each VAR``: a non-empty list, tuple, pandas Series or DataFrame (not a string).

    A DataFrame gives one item per row, its columns as ``{column}`` fields and
    its row label as ``{index}``; a Series its values as ``{item}`` and labels as ``{index}``.
    """
    if name not in namespace:
        raise UsageError(f"{prog}: --each {name}: there is no variable {name!r} in the notebook")
    value = namespace[name]
    if _is_pandas(value, "DataFrame"):
        if value.empty:
            raise UsageError(f"{prog}: --each {name}: the DataFrame {name} has no rows")
        columns = tuple(str(c) for c in value.columns)
        labels = list(value.index)
        rows = value.to_dict("records")
        fields = [
            {"index": label, **{str(k): v for k, v in row.items()}}
            for label, row in zip(labels, rows)
        ]
        return _Each(fields, labels, columns)
    if _is_pandas(value, "Series"):
        if value.empty:
            raise UsageError(f"{prog}: --each {name}: the Series {name} is empty")
        labels = list(value.index)
        return _Each(
            [{"item": v, "index": label} for label, v in zip(labels, value.tolist())],
            labels,
            None,
        )
    wrong_type = UsageError(
        f"{prog}: --each {name}: wants a list of items, but {name} is of type "
        f"{type(value).__name__} (a list, tuple, pandas Series or DataFrame)"
    )
    if isinstance(value, (str, bytes)):
        raise wrong_type
    try:
        items = list(value)
    except TypeError:
        raise wrong_type from None
    if not items:
        raise UsageError(f"{prog}: --each {name}: {name} is empty")
    return _Each([{"item": item} for item in items], None, None)


def _check_columns(
    prog: str, name: str, each: _Each, templates: list[str], namespace: Mapping[str, Any]
) -> None:
    """With a DataFrame, a ``{field}`` that is no column (nor a notebook variable) is a typo: say so now."""
    if each.columns is None:
        return
    known = set(each.columns) | {"index"} | set(namespace)
    for template in templates:
        for field_name in template_fields(template):
            if field_name in known:
                continue
            close = difflib.get_close_matches(field_name, each.columns, n=1)
            hint = f" (did you mean {{{close[0]}}}?)" if close else ""
            raise UsageError(
                f"{prog}: --each {name}: the template uses {{{field_name}}}, which is not a column of "
                f"{name}{hint}; its columns: {', '.join(each.columns)}"
            )
