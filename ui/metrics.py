"""UI metrics as Ferret-UI and MM1.5 report them, and the results table.

Per task (and platform), from prediction records (`id`, `task`, `prediction`, `answer`, `meta`,
`media`, as `mm15.base.module.MM15Module` writes them; boxes are decoded in the original pixels of the
first media item, its layout's `source_size`):

* referring (`ocr`, `icon_recognition`, `widget_classification`): normalised exact match
  (`mm15.base.metrics.exact_match`). Baseline: chance, 1 / number of distinct reference answers
  (or `meta["num_choices"]`). Where the data lists the candidate answers present on the screen
  (`meta["on_screen_answers"]`, the synthetic UI task), `on_screen` is the accuracy of naming one of
  them at random: a model that reads the screen but not the referred region scores that much, so
  referring is shown only by a score above it (OCR on a screen with two words: 1/2, not chance).
* grounding (`find_text`, `find_icons`, `find_widget`, `widget_listing`): a single true box is found
  when the first predicted box has IoU > 0.5 with it; with several true boxes (widget listing) the
  score is the number of one-to-one matches at IoU > 0.5 over max(#true, #predicted) [choice].
  True boxes come from `meta["answer_boxes"]` in original pixels; predictions are decoded with the
  run's `BoxCodec`. Baseline: the same score for always predicting the task's average true box.
  Where the data lists the boxes of the screen's elements (`meta["on_screen_boxes"]`, the synthetic
  UI task), `on_screen` is the expected score of answering with one of them at random: a model that
  knows the layout but not which element is asked for scores that much (1/4 on a four-widget screen).
* Spotlight: CIDEr-D for `screen2words` and `widgetcaptions` (`cider_d`), F1 of "tappable" for
  `taperception` (`binary_f1`). Advanced tasks are counted, not scored (Ferret-UI uses a GPT judge).
* Category averages: Ref-i / Ref-A / Grd-i / Grd-A, the mean of the per-task scores of that kind
  on iPhone / Android. Scores are fractions (x100 for the papers' tables); CIDEr as coco-caption.

    rows = ui_results(records, BoxCodec())
    print(format_table(rows, RESULT_COLUMNS))
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from typing import Any

from mm15.base.data.boxes import BoxCodec
from mm15.base.data.media import record_layouts
from mm15.base.metrics import exact_match, normalize_answer
from mm15.data_builders.ferret_ui import TASKS

RESULT_COLUMNS = ["task", "n", "metric", "score", "baseline", "on_screen"]
CATEGORY_NAMES = {("referring", "iphone"): "Ref-i", ("referring", "android"): "Ref-A",
                  ("grounding", "iphone"): "Grd-i", ("grounding", "android"): "Grd-A"}
_WORDS = re.compile(r"[a-z0-9]+")


# ----- boxes -----------------------------------------------------------------------------------
def box_iou(a: list[float], b: list[float]) -> float:
    """Intersection over union of two `[x1, y1, x2, y2]` boxes; 0 for degenerate boxes."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def grounding_score(predicted: list[list[float]], true: list[list[float]], threshold: float = 0.5) -> float:
    """1/0 for one true box (first prediction, IoU > threshold); else greedy one-to-one matches
    over max(#true, #predicted)."""
    if not true:
        return float(not predicted)
    if len(true) == 1:
        return float(bool(predicted) and box_iou(predicted[0], true[0]) > threshold)
    unused, matches = list(predicted), 0
    for box in true:
        best = max(unused, key=lambda p: box_iou(p, box), default=None)
        if best is not None and box_iou(best, box) > threshold:
            unused.remove(best)
            matches += 1
    return matches / max(len(true), len(predicted))


def average_box(boxes: list[list[float]]) -> list[float]:
    return [sum(b[k] for b in boxes) / len(boxes) for k in range(4)]


# ----- text ------------------------------------------------------------------------------------
def caption_tokens(text: str | None) -> list[str]:
    """Lower-case alphanumeric words: our stand-in for coco-caption's Java PTB tokenizer."""
    return _WORDS.findall((text or "").lower())


def tap_label(text: str | None) -> bool | None:
    """Taperception answer -> tappable? (negations first: "not tappable", "no", "untappable")."""
    words = caption_tokens(text)
    if not words:
        return None
    if words[0] == "no" or "not" in words or "untappable" in words or "unclickable" in words:
        return False
    if words[0] == "yes" or "tappable" in words or "clickable" in words:
        return True
    return None


def binary_f1(predicted: list[bool | None], true: list[bool | None]) -> float:
    """F1 of the positive class; an unparseable prediction (None) counts as negative."""
    tp = sum(bool(p) and bool(t) for p, t in zip(predicted, true))
    fp = sum(bool(p) and not t for p, t in zip(predicted, true))
    fn = sum(not p and bool(t) for p, t in zip(predicted, true))
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def cider_d(candidates: list[str], references: list[list[str]]) -> float:
    """Corpus CIDEr-D (n = 1..4, sigma = 6, clipped tf-idf, x10), as coco-caption computes it.

    Uses the maintained `pycocoevalcap` scorer when installed, else `_cider_d` below (the same
    formula, tested against hand-computed values and against pycocoevalcap where available).
    Both see our `caption_tokens`, not the Java tokenizer. 0 for an empty corpus.
    """
    cands = [" ".join(caption_tokens(c)) for c in candidates]
    refs = [[" ".join(caption_tokens(r)) for r in rs] for rs in references]
    if not cands or not any(r for rs in refs for r in rs):
        return 0.0
    try:
        from pycocoevalcap.cider.cider_scorer import CiderScorer
    except ImportError:
        return _cider_d(cands, refs)
    scorer = CiderScorer(n=4, sigma=6.0)
    for cand, rs in zip(cands, refs):
        scorer += (cand, rs)
    return float(scorer.compute_score()[0])


def _ngrams(text: str, n: int = 4) -> Counter:
    words = text.split()
    return Counter(tuple(words[i:i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def _cider_d(cands: list[str], refs: list[list[str]], n: int = 4, sigma: float = 6.0) -> float:
    """Our CIDEr-D: idf from the references' document frequencies, log(#items) as the idf ceiling.
    As in coco-caption, a sentence's "length" for the Gaussian penalty is its bigram count."""
    ref_grams = [[_ngrams(r, n) for r in rs] for rs in refs]
    df = Counter(g for grams in ref_grams for g in set().union(*grams))
    log_n = math.log(len(cands))

    def vector(counts: Counter) -> tuple[list[dict], list[float], int]:
        vec: list[dict] = [{} for _ in range(n)]
        for gram, tf in counts.items():
            vec[len(gram) - 1][gram] = tf * (log_n - math.log(max(1.0, df[gram])))
        norms = [math.sqrt(sum(v * v for v in d.values())) for d in vec]
        return vec, norms, sum(tf for g, tf in counts.items() if len(g) == 2)

    scores = []
    for cand, grams in zip(cands, ref_grams):
        hyp, hyp_norm, hyp_len = vector(_ngrams(cand, n))
        total = 0.0
        for ref_counts in grams:
            ref, ref_norm, ref_len = vector(ref_counts)
            penalty = math.exp(-((hyp_len - ref_len) ** 2) / (2 * sigma ** 2))
            for k in range(n):
                dot = sum(min(v, ref[k].get(g, 0.0)) * ref[k].get(g, 0.0) for g, v in hyp[k].items())
                if hyp_norm[k] and ref_norm[k]:
                    dot /= hyp_norm[k] * ref_norm[k]
                total += dot * penalty / n
        scores.append(10.0 * total / len(grams))
    return sum(scores) / len(scores)


# ----- per-task scoring ------------------------------------------------------------------------
def _size(record: dict[str, Any]) -> tuple[int, int] | None:
    """(width, height) of the record's screenshot; None for a record without media."""
    layouts = record_layouts(record)
    return layouts[0].source_size if layouts else None


def score_referring(records: list[dict[str, Any]]) -> tuple[float, float, float | None]:
    """(accuracy, chance, on-screen baseline or None where the data does not list what is on screen)."""
    hits = [exact_match(r["prediction"], r["answer"], r["meta"].get("answer_aliases")) for r in records]
    choices = [r["meta"].get("num_choices") for r in records]
    distinct = len({normalize_answer(r["answer"]) for r in records})
    chance = sum(1 / c for c in choices) / len(choices) if all(choices) else 1 / max(distinct, 1)
    shown = [{normalize_answer(a) for a in r["meta"].get("on_screen_answers") or []} for r in records]
    on_screen = sum(1 / len(s) for s in shown) / len(shown) if all(shown) else None
    return sum(hits) / len(hits), chance, on_screen


def score_grounding(records: list[dict[str, Any]], codec: BoxCodec) -> tuple[float, float, float | None]:
    """(score, average-box baseline, on-screen baseline or None where the data does not list the boxes)."""
    true = [r["meta"].get("answer_boxes") or [] for r in records]
    scores = [grounding_score(codec.decode_boxes(r["prediction"], _size(r)), t) for r, t in zip(records, true)]
    firsts = [t[0] for t in true if t]
    mean_box = [average_box(firsts)] if firsts else []
    baseline = [grounding_score(mean_box * max(len(t), 1), t) for t in true]
    shown = [r["meta"].get("on_screen_boxes") or [] for r in records]
    on_screen = None
    if all(shown) and all(len(t) == 1 for t in true):  # one asked-for element: pick one box of the screen
        on_screen = sum(sum(grounding_score([b], t) for b in s) / len(s) for s, t in zip(shown, true)) / len(true)
    return sum(scores) / len(scores), sum(baseline) / len(baseline), on_screen


def score_task(task: str, records: list[dict[str, Any]], codec: BoxCodec) -> dict[str, Any]:
    """One results row: the task's metric, its score and baseline (None where none applies)."""
    kind = TASKS.get(task, "other")
    row: dict[str, Any] = {"n": len(records), "metric": None, "score": None, "baseline": None, "on_screen": None}
    if kind == "referring":
        row["metric"] = "exact_match"
        row["score"], row["baseline"], row["on_screen"] = score_referring(records)
    elif kind == "grounding":
        row["metric"] = "iou>0.5"
        row["score"], row["baseline"], row["on_screen"] = score_grounding(records, codec)
    elif kind == "caption":
        row["metric"] = "cider_d"
        row["score"] = cider_d([r["prediction"] for r in records], [[r["answer"]] for r in records])
    elif kind == "tap":
        row["metric"] = "f1"
        row["score"] = binary_f1([tap_label(r["prediction"]) for r in records], [tap_label(r["answer"]) for r in records])
    else:
        row["metric"] = "unscored"
    return row


def ui_results(records: list[dict[str, Any]], codec: BoxCodec) -> list[dict[str, Any]]:
    """Rows `platform/task` for every (platform, task), then the category averages."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        r = dict(r, meta=r.get("meta") or {})
        groups[(r["meta"].get("platform", "unknown"), r["task"])].append(r)
    rows = [{"task": f"{platform}/{task}", **score_task(task, rs, codec)} for (platform, task), rs in sorted(groups.items())]
    return rows + category_averages(rows)


def category_averages(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Ref-i, Ref-A, Grd-i, Grd-A: unweighted means over the tasks of that kind and platform."""
    out = []
    for (kind, platform), name in CATEGORY_NAMES.items():
        chosen = [r for r in rows if r["task"].startswith(platform + "/")
                  and TASKS.get(r["task"].split("/", 1)[1]) == kind]
        if chosen:
            baselines = [r["baseline"] for r in chosen if r["baseline"] is not None]
            shown = [r.get("on_screen") for r in chosen]
            out.append({"task": name, "n": sum(r["n"] for r in chosen), "metric": f"mean of {len(chosen)} tasks",
                        "score": sum(r["score"] for r in chosen) / len(chosen),
                        "baseline": sum(baselines) / len(baselines) if baselines else None,
                        "on_screen": sum(shown) / len(shown) if all(v is not None for v in shown) else None})
    return out
