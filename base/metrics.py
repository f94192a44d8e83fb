"""Core evaluation metrics and the results table every variant prints.

A prediction record is a dict with `id`, `task`, `prediction`, `answer`, `meta` and `media` (the
layout of each media item, `mm15.base.data.media.MediaLayout` as a dict).
`exact_match_by_task` scores normalised exact match per task and overall, with the chance level
beside it when the data says how many choices there were (`meta["num_choices"]`).

    rows = exact_match_by_task(records)
    print(format_table(rows, ["task", "n", "accuracy", "chance"]))
"""

from __future__ import annotations

import re
import string
from collections import defaultdict
from typing import Any

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str | None) -> str:
    """Lower-case, drop punctuation and articles, collapse spaces (SQuAD-style)."""
    text = (text or "").lower().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str | None, answer: str | None, aliases: list[str] | None = None) -> bool:
    target = {normalize_answer(a) for a in [answer, *(aliases or [])] if a is not None}
    return normalize_answer(prediction) in target


def exact_match_by_task(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per task plus `all`: n, accuracy, chance (None when unknown)."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[r["task"]].append(r)
    rows = [_em_row(task, rs) for task, rs in sorted(groups.items())]
    if len(groups) > 1:
        rows.append(_em_row("all", records))
    return rows


def _em_row(task: str, records: list[dict[str, Any]]) -> dict[str, Any]:
    hits = [exact_match(r["prediction"], r["answer"], (r.get("meta") or {}).get("answer_aliases")) for r in records]
    choices = [(r.get("meta") or {}).get("num_choices") for r in records]
    chance = sum(1 / c for c in choices) / len(choices) if all(choices) else None
    return {"task": task, "n": len(records), "accuracy": sum(hits) / max(len(hits), 1), "chance": chance}


def format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """Plain-text table; floats with 3 decimals, missing values as '-'."""
    def cell(v: Any) -> str:
        return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths))  # noqa: E731
    return "\n".join([line(columns), line(["-" * w for w in widths]), *(line(r) for r in cells)])
