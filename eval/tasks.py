"""What the lmms-eval tasks under `configs/eval/lmms_eval/` call: documents from mm15's synthetic
builders, their prompts and visuals, and mm15's own metrics, so a score there is the score
`mm15 test` prints for the same records.

Each task's data file (`mm15_shapes.json` beside `mm15_shapes.yaml`) is one row naming a source as
our configs do, `{"class_path": ..., "init_args": {...}}`. The task's `process_docs`
(`source_documents`) prepares that source, i.e. generates the split under `init_args.root`
(relative to the working directory, as the demo configs' `data/...`; reused when it exists with the
same parameters, so after `mm15 fit --config configs/base/demo.yaml` it is the demo's own test
split), and turns each record into one document:

    {"id", "task", "text" (the user turn, <image> markers included), "answer",
     "media" (absolute paths), "kinds" ("image" / "video"), "meta" (JSON text: choices, ...)}

Prompts: `question_text` drops the markers (what benchmarks send; the model puts one `<image>`
line per visual in front, which is where the image builders put them); `prompt_text` keeps them
where the record has them (the video builder asks its question before the video).

    lmms-eval --model mm15 --model_args pretrained=runs/base_demo/model --tasks mm15_shapes \
        --include_path configs/eval/lmms_eval
"""

from __future__ import annotations

import importlib
import json
import re
from typing import Any

from PIL import Image

from mm15.base.data.datamodule import resolve_media
from mm15.base.data.sample import IMAGE_TOKEN, Sample, Skip
from mm15.base.metrics import exact_match_by_task

_MARKER_LINE = re.compile(re.escape(IMAGE_TOKEN) + r"\n?")


# ----- documents -----------------------------------------------------------------------------------
def source_documents(dataset: Any) -> Any:
    """`process_docs`: the data file's source rows -> a `datasets.Dataset` of documents."""
    import datasets

    docs = [doc for row in dataset for doc in read_source(row["class_path"], row["init_args"])]
    return datasets.Dataset.from_list(docs)


def read_source(class_path: str, init_args: dict[str, Any]) -> list[dict[str, Any]]:
    """Prepare one source and return its records as documents; a record the source skips is an
    error here (a benchmark that silently lost records would score the rest)."""
    module, name = class_path.rsplit(".", 1)
    source = getattr(importlib.import_module(module), name)(**init_args)
    root = getattr(source, "media_root", None)
    docs = []
    for item in source.read():
        if isinstance(item, Skip):
            raise ValueError(f"{item.source}: record {item.record_id}: {item.reason}")
        docs.append(to_document(resolve_media(item, root)))
    return docs


def to_document(sample: Sample) -> dict[str, Any]:
    """One question and its reference answer (a user turn, then an assistant turn)."""
    roles = [t.role for t in sample.turns]
    if roles != ["user", "assistant"]:
        raise ValueError(f"{sample.source}: record {sample.id}: a document is one user turn and one answer, got {roles}")
    return {"id": sample.id, "task": sample.task, "text": sample.turns[0].text, "answer": sample.turns[1].text,
            "media": [m.path for m in sample.media], "kinds": [m.kind for m in sample.media],
            "meta": json.dumps(sample.meta)}


def visuals(doc: dict[str, Any]) -> list[Any]:
    """`doc_to_visual`: images as PIL images (lmms-eval's convention), videos as paths."""
    out: list[Any] = []
    for path, kind in zip(doc["media"], doc["kinds"]):
        if kind == "video":
            out.append(path)
        else:
            with Image.open(path) as image:
                out.append(image.convert("RGB"))
    return out


def question_text(doc: dict[str, Any], lmms_eval_specific_kwargs: dict | None = None) -> str:
    return _MARKER_LINE.sub("", doc["text"])


def prompt_text(doc: dict[str, Any], lmms_eval_specific_kwargs: dict | None = None) -> str:
    return doc["text"]


def answer(doc: dict[str, Any]) -> str:
    return doc["answer"]


def choices(doc: dict[str, Any]) -> list[str]:
    """`doc_to_choice` of a multiple-choice task: the options the record lists (`meta["choices"]`)."""
    return json.loads(doc["meta"])["choices"]


def answer_index(doc: dict[str, Any]) -> int:
    """`doc_to_target` of a multiple-choice task: the answer's place among `choices`."""
    return choices(doc).index(doc["answer"])


# ----- metrics -------------------------------------------------------------------------------------
def prediction_record(doc: dict[str, Any], results: list[str]) -> dict[str, Any]:
    """The record `mm15 test` writes for the document (less its media layouts)."""
    return {"id": doc["id"], "task": doc["task"], "answer": doc["answer"], "meta": json.loads(doc["meta"]),
            "prediction": results[0] if results else ""}


def shapes_results(doc: dict[str, Any], results: list[str]) -> dict[str, Any]:
    """`process_results` of mm15_shapes: each metric aggregates the records (`exact_match_*`)."""
    record = prediction_record(doc, results)
    return {"exact_match": record, "colour": record, "position": record}


def video_results(doc: dict[str, Any], results: list[str]) -> dict[str, Any]:
    """`process_results` of mm15_colours: multiple-choice accuracy and parse rate (`video_*`)."""
    record = prediction_record(doc, results)
    return {"accuracy": record, "parsed": record}


def _row(rows: list[dict[str, Any]], task: str | None) -> dict[str, Any]:
    """The row of `task`, or the overall one (`all`, or the only row) for None."""
    if task is None:
        return rows[-1]
    return next((r for r in rows if r["task"] == task), {"accuracy": None, "parsed": None})


def exact_match_overall(records: list[dict[str, Any]]) -> float:
    """mm15's exact match (`mm15.base.metrics.exact_match_by_task`), over all records."""
    return _row(exact_match_by_task(records), None)["accuracy"]


def exact_match_colour(records: list[dict[str, Any]]) -> float | None:
    return _row(exact_match_by_task(records), "colour")["accuracy"]


def exact_match_position(records: list[dict[str, Any]]) -> float | None:
    return _row(exact_match_by_task(records), "position")["accuracy"]


def video_accuracy(records: list[dict[str, Any]]) -> float | None:
    """mm15's video QA accuracy (`mm15.video.metrics.video_qa_metrics`: the option read from the reply)."""
    from mm15.video.metrics import video_qa_metrics

    return _row(video_qa_metrics(records), None)["accuracy"]


def video_parsed(records: list[dict[str, Any]]) -> float | None:
    from mm15.video.metrics import video_qa_metrics

    return _row(video_qa_metrics(records), None)["parsed"]
