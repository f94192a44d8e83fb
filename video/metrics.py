"""Video QA metrics: multiple-choice accuracy with robust option extraction, open-ended exact match
and token F1, one row per dataset (the record's `task`).

A record is what the module's test step writes: `prediction`, `answer`, `task`, `meta`. It is
multiple choice when `meta["choices"]` lists the option texts in letter order (A, B, ...); the gold
option is `meta["answer_index"]` or, failing that, read from the answer text like a prediction.
Free text becomes an option by, in order: a bare letter ("B", "(B)", "B."), a letter opening the
reply ("B) the cup ..."), a stated answer ("Answer: B", "the answer is (B)", "Best option:(B"),
a parenthesised letter anywhere, and finally the option's own text inside the reply (the longest
one found). A reply matching nothing counts as wrong and lowers `parsed`.

    rows = video_qa_metrics(records)
    print(format_table(rows, VIDEO_COLUMNS))
"""

from __future__ import annotations

import re
import string
from collections import Counter, defaultdict
from typing import Any

from mm15.base.metrics import exact_match, normalize_answer

VIDEO_COLUMNS = ["task", "n", "accuracy", "chance", "parsed", "f1"]


def _letters(n: int) -> str:
    return string.ascii_uppercase[:n]


def _letter_patterns(letters: str) -> list[re.Pattern]:
    L = f"[{letters}]"
    return [
        re.compile(rf"^\W*\(?({L})\)?\W*$", re.I),  # "B", "(B)", "b."
        re.compile(rf"^\s*\(?({L})\s*[).:\]]", re.I),  # "B) the cup", "(B) ...", "B: ..."
        re.compile(rf"(?i:answer|option|choice)\s*(?i:is|would be)?\s*[:(\[]*\s*({L})(?![A-Za-z])"),
        re.compile(rf"\(({L})\)"),  # "... (B) ..."
    ]


def extract_choice(text: str | None, choices: list[str]) -> int | None:
    """Index of the option a free-text reply picks, or None when it picks none."""
    text = (text or "").strip()
    if not text or not choices:
        return None
    letters = _letters(len(choices))
    for pattern in _letter_patterns(letters):
        m = pattern.search(text)
        if m:
            return letters.index(m.group(1).upper())
    return _match_option_text(text, choices)


def _match_option_text(text: str, choices: list[str]) -> int | None:
    reply = f" {normalize_answer(text)} "
    found = [(len(c), k) for k, c in enumerate(map(normalize_answer, choices)) if c and f" {c} " in reply]
    return max(found)[1] if found else None


def gold_choice(record: dict[str, Any]) -> int | None:
    meta = record.get("meta") or {}
    if meta.get("answer_index") is not None:
        return int(meta["answer_index"])
    return extract_choice(record.get("answer"), meta.get("choices") or [])


def token_f1(prediction: str | None, answer: str | None) -> float:
    """SQuAD token F1 after normalisation."""
    pred, gold = normalize_answer(prediction).split(), normalize_answer(answer).split()
    if not pred or not gold:
        return float(pred == gold)
    common = sum((Counter(pred) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def score_record(record: dict[str, Any]) -> dict[str, Any]:
    """hit (bool), parsed (MC: an option was found), f1 (open-ended), chance (MC: 1/options)."""
    meta = record.get("meta") or {}
    choices = meta.get("choices")
    if choices:
        picked = extract_choice(record.get("prediction"), choices)
        gold = gold_choice(record)
        return {"hit": picked is not None and picked == gold, "parsed": picked is not None,
                "f1": None, "chance": 1 / len(choices)}
    hit = exact_match(record.get("prediction"), record.get("answer"), meta.get("answer_aliases"))
    return {"hit": hit, "parsed": None, "f1": token_f1(record.get("prediction"), record.get("answer")),
            "chance": 1 / meta["num_choices"] if meta.get("num_choices") else None}


def _mean(values: list[Any]) -> float | None:
    values = [float(v) for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _row(task: str, scores: list[dict[str, Any]]) -> dict[str, Any]:
    chances = [s["chance"] for s in scores]
    return {"task": task, "n": len(scores), "accuracy": _mean([s["hit"] for s in scores]),
            "chance": _mean(chances) if all(c is not None for c in chances) else None,
            "parsed": _mean([s["parsed"] for s in scores]), "f1": _mean([s["f1"] for s in scores])}


def video_qa_metrics(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per dataset (task), plus `all` when there are several."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        groups[record.get("task", "default")].append(score_record(record))
    rows = [_row(task, scores) for task, scores in sorted(groups.items())]
    if len(groups) > 1:
        rows.append(_row("all", [s for scores in groups.values() for s in scores]))
    return rows
