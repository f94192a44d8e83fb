"""Functions for our config dataclasses: rebuild them from saved dicts and diff two of them.

The preprocessing spec is saved as a plain dict with every checkpoint and export; `from_dict` turns
it back into the (possibly variant-specific) dataclass, ignoring keys the class does not know, so a
core model's spec loads into the video variant's spec with the video fields at their defaults.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, TypeVar

T = TypeVar("T")


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build dataclass `cls` from a nested dict (nested dataclass fields rebuilt recursively)."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value, kind = data[f.name], _dataclass_in(hints.get(f.name))
        kwargs[f.name] = from_dict(kind, value) if kind is not None and isinstance(value, dict) else value
    return cls(**kwargs)


def _dataclass_in(hint: Any) -> type | None:
    if dataclasses.is_dataclass(hint):
        return hint
    for arg in typing.get_args(hint):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: list(data) if isinstance(data, tuple) else data}


def diff_specs(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human-readable differences between two spec dicts: `split.grid_min: 4 -> 1`."""
    a, b = _flatten(old), _flatten(new)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
