"""Whether values read back from JSON (saved device state, the VMM's records, a worker's
messages) have the types the code that uses them expects: such data comes from a file or
another process, and a value of the wrong type must be refused where it is read, not
fail later wherever it is used."""

from __future__ import annotations

import types
from typing import Any, Union, get_args, get_origin


def has_type(value: Any, hint: Any) -> bool:
    """``value`` fits the type ``hint`` exactly: ``int`` takes no bool, ``float`` no int,
    ``list[int]`` only ints, ``dict`` any object, unions either arm."""
    origin = get_origin(hint)
    if origin is list:
        (item,) = get_args(hint)
        return type(value) is list and all(has_type(v, item) for v in value)
    if origin in (Union, types.UnionType):
        return any(has_type(value, arm) for arm in get_args(hint))
    if hint is None or hint is type(None):
        return value is None
    return type(value) is hint


def wrong_field(data: dict[str, Any], hints: dict[str, Any]) -> str | None:
    """The first field of ``data`` named in ``hints`` whose value does not fit, described
    in a few words; None if they all do (fields ``data`` lacks are not checked)."""
    for name, hint in hints.items():
        if name in data and not has_type(data[name], hint):
            return f"{name!r} is {data[name]!r:.40}"
    return None
