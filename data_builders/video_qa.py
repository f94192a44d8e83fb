"""Video QA benchmarks -> canonical samples: ActivityNet-QA (open-ended), NExT-QA, EgoSchema and
Video-MME (multiple choice).

Multiple-choice prompt [choice, the lmms-eval / LLaVA-OneVision wording]:

    <image>
    {question}
    A. {option 0}
    B. {option 1}
    ...
    Answer with the option's letter from the given choices directly.

with the letter as the reference answer and `meta = {"choices": [...], "answer_index": k,
"num_choices": n}` for `mm15.video.metrics`. Open-ended questions end with "Answer the question
using a single word or phrase." Each builder documents the layout it reads; bad rows become
`Skip`s with the reason. `task` is the dataset name, so results come one row per dataset.

    source = NExTQASource("nextqa/val.csv", media_root="nextqa/NExTVideo")
"""

from __future__ import annotations

import csv
import re
import string
from pathlib import Path
from functools import partial
from typing import Any, Callable, Iterable, Iterator

from mm15.base.data.sample import IMAGE_TOKEN, Media, Sample, SampleError, Skip, Turn
from mm15.base.data.sources import load_json_file, read_json_records, samples_from_rows

MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."
SHORT_ANSWER = "Answer the question using a single word or phrase."
VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mov")
_OPTION_PREFIX = re.compile(r"^\s*\(?[A-Z][.):]\s*")


def find_video(root: str, stem: str, error: Callable[[str], SampleError],
               extensions: Iterable[str] = VIDEO_EXTENSIONS) -> str:
    """`stem` + the first extension that exists under `root`; `error(reason)` (the record's
    `SampleError`) when none does: a builder never guesses a file name."""
    extensions = list(extensions)
    for ext in extensions:
        if (Path(root) / f"{stem}{ext}").exists():
            return f"{stem}{ext}"
    raise error(f"no video {stem}{'|'.join(extensions)} under {root}")


def multiple_choice_sample(record_id: str, source: str, video: str, question: str, options: list[str],
                           answer_index: int | None, task: str, meta: dict[str, Any] | None = None) -> Sample:
    """One MC sample; without `answer_index` it is a prompt-only sample (prediction)."""
    options = [str(o).strip() for o in options]
    if len(options) < 2 or len(options) > 26 or not all(options):
        raise SampleError(record_id, source, f"needs 2-26 non-empty options, got {options!r}")
    if answer_index is not None and not 0 <= answer_index < len(options):
        raise SampleError(record_id, source, f"answer index {answer_index} outside {len(options)} options")
    letters = string.ascii_uppercase
    text = "\n".join([f"{IMAGE_TOKEN}\n{str(question).strip()}", *(f"{letters[k]}. {o}" for k, o in enumerate(options)),
                      MC_INSTRUCTION])
    turns = [Turn("user", text)] + ([Turn("assistant", letters[answer_index])] if answer_index is not None else [])
    meta = {**(meta or {}), "choices": options, "answer_index": answer_index, "num_choices": len(options)}
    return Sample(record_id, turns, [Media(video, kind="video")], task=task, source=source, meta=meta)


class ActivityNetQASource:
    """ActivityNet-QA (github.com/MILVLG/activitynet-qa), open-ended.

    Layout as published: questions and answers in two JSON arrays joined by `question_id`,

        {split}_q.json: [{"video_name": "Lf_7RurLgp0", "question": "is the man wearing a hat", "question_id": "v_Lf_7RurLgp0_2"}]
        {split}_a.json: [{"answer": "yes", "type": 3, "question_id": "v_Lf_7RurLgp0_2"}]

    and the ActivityNet videos as `v_{video_name}.mp4|.mkv|.webm` under `media_root`
    (`video_pattern` changes the file stem). `type`: 0 motion, 1 spatial, 2 temporal, 3 yes/no,
    4 colour, 5 object, 6 location, 7 number, 8 other (kept in `meta["type"]`).
    """

    def __init__(self, questions: str, answers: str | None = None, media_root: str | None = None,
                 video_pattern: str = "v_{video_name}", task: str = "activitynet_qa", require_answer: bool = True):
        self.questions, self.answers = str(questions), answers
        self.media_root = media_root if media_root is not None else str(Path(questions).parent)
        self.video_pattern, self.task, self.require_answer = video_pattern, task, require_answer

    def to_sample(self, row: dict[str, Any], answers: dict[str, dict]) -> Sample:
        qid = str(row["question_id"])
        question = str(row["question"]).strip()
        question = question[:1].upper() + question[1:] + ("" if question.endswith("?") else "?")
        turns = [Turn("user", f"{IMAGE_TOKEN}\n{question}\n{SHORT_ANSWER}")]
        answer = answers.get(qid)
        if answer is not None:
            turns.append(Turn("assistant", str(answer["answer"])))
        video = find_video(self.media_root, self.video_pattern.format(video_name=row["video_name"]),
                           partial(SampleError, qid, self.questions))
        meta = {"type": answer.get("type")} if answer else {}
        return Sample(qid, turns, [Media(video, kind="video")], task=self.task, source=self.questions, meta=meta)

    def read(self) -> Iterator[Sample | Skip]:
        answers = {str(a["question_id"]): a for a in load_json_file(self.answers)} if self.answers else {}
        rows = ((str(r.get("question_id", f"#{i}")), r) for i, r in enumerate(load_json_file(self.questions)))
        yield from samples_from_rows(rows, self.questions, lambda row, _: self.to_sample(row, answers),
                                     self.require_answer)


class NExTQASource:
    """NExT-QA multiple choice (github.com/doc-doc/NExT-QA).

    Layout as published: `{split}.csv` with columns
    `video,frame_count,width,height,question,answer,qid,type,a0,a1,a2,a3,a4` (`answer` is the index
    of the right option), `map_vid_vidorID.json` mapping a `video` id to its folder path
    (`{"4010069381": "0000/4010069381"}`), and the videos as `NExTVideo/{path}.mp4` (`media_root`).
    Without the map file, `{video}.mp4` is used where it exists under `media_root` (a flattened copy);
    a record whose video the map lacks, or whose flat file is missing, is skipped saying so. Question types (`meta["type"]`): CW, CH (causal),
    TN, TC, TP (temporal), DL, DC, DO (descriptive).
    """

    def __init__(self, path: str, media_root: str | None = None, video_map: str | None = None,
                 task: str = "nextqa", require_answer: bool = True):
        self.path = str(path)
        self.media_root = media_root if media_root is not None else str(Path(path).parent)
        default_map = Path(path).parent / "map_vid_vidorID.json"
        self.video_map = video_map or (str(default_map) if default_map.exists() else None)
        self.task, self.require_answer = task, require_answer

    def video_path(self, video: str, paths: dict[str, str] | None, error: Callable[[str], SampleError]) -> str:
        """The record's file: from the map, or (without one) `{video}.mp4` only if it exists."""
        if paths is not None:
            if video not in paths:
                raise error(f"video id {video!r} is not in the video map {self.video_map}")
            return f"{paths[video]}.mp4"
        if not (Path(self.media_root) / f"{video}.mp4").exists():
            raise error(f"no map_vid_vidorID.json next to {self.path} (pass video_map=) and no {video}.mp4 "
                        f"under {self.media_root}: the published videos lie in folders only the map names")
        return f"{video}.mp4"

    def to_sample(self, row: dict[str, str], paths: dict[str, str] | None) -> Sample:
        video = str(row["video"])
        record_id = f"{video}_{row['qid']}"
        options = [row[f"a{k}"] for k in range(5) if row.get(f"a{k}") not in (None, "")]
        answer = int(row["answer"]) if str(row.get("answer", "")).strip() else None
        path = self.video_path(video, paths, partial(SampleError, record_id, self.path))
        return multiple_choice_sample(record_id, self.path, path,
                                      row["question"].strip().rstrip("?") + "?", options, answer, self.task,
                                      {"type": row.get("type")})

    def read(self) -> Iterator[Sample | Skip]:
        paths = load_json_file(self.video_map) if self.video_map else None
        with open(self.path, newline="", encoding="utf-8") as f:
            rows = [(f"line {k + 2}", row) for k, row in enumerate(csv.DictReader(f))]
        yield from samples_from_rows(rows, self.path, lambda row, _: self.to_sample(row, paths), self.require_answer)


class EgoSchemaSource:
    """EgoSchema multiple choice (github.com/egoschema/EgoSchema).

    Layout as published: `questions.json`, a JSON array of
    `{"q_uid": "...", "google_drive_id": "...", "question": "...", "option 0": "...", ..., "option 4": "..."}`,
    answers for the public subset in `subset_answers.json` (`{"<q_uid>": 3, ...}`; the other
    answers are hidden behind the benchmark server), and the videos as `videos/{q_uid}.mp4`
    (`media_root`). Questions without an answer are skipped when `require_answer`, else become
    prompt-only samples for `mm15 predict`.
    """

    def __init__(self, questions: str, answers: str | None = None, media_root: str | None = None,
                 task: str = "egoschema", require_answer: bool = True):
        self.questions, self.answers = str(questions), answers
        self.media_root = media_root if media_root is not None else str(Path(questions).parent / "videos")
        self.task, self.require_answer = task, require_answer

    def to_sample(self, row: dict[str, Any], answers: dict[str, int]) -> Sample:
        uid = str(row["q_uid"])
        options = [row[f"option {k}"] for k in range(5)]
        answer = answers.get(uid)
        return multiple_choice_sample(uid, self.questions, f"{uid}.mp4", row["question"], options,
                                      None if answer is None else int(answer), self.task)

    def read(self) -> Iterator[Sample | Skip]:
        answers = load_json_file(self.answers) if self.answers else {}
        rows = ((str(r.get("q_uid", f"#{i}")), r) for i, r in enumerate(load_json_file(self.questions)))
        yield from samples_from_rows(rows, self.questions, lambda row, _: self.to_sample(row, answers),
                                     self.require_answer)


class VideoMMESource:
    """Video-MME multiple choice (video-mme.github.io; data on the Hugging Face hub).

    Layout as published: `videomme/test-00000-of-00001.parquet` with one row per question, columns
    `video_id, duration, domain, sub_category, url, videoID, question_id, task_type, question,
    options, answer` (`options` like `["A. ...", "B. ...", "C. ...", "D. ..."]`, `answer` a letter),
    and the videos as `data/{videoID}.mp4` (`media_root`). Rows with only `video_id` ("001", as in
    the evaluation template `output_test_template.json`) name no file: give `video_map` (a dict or
    a JSON file, `video_id` -> file under `media_root`), or they are skipped saying so. Reading parquet needs `pyarrow`; the same
    rows as JSON/JSONL, or the per-video JSON of the official evaluation script
    (`[{"video_id", "videoID", "duration", ..., "questions": [{"question_id", ...}]}]`), work without.
    `meta` keeps duration (short/medium/long), domain and task_type.
    """

    def __init__(self, path: str, media_root: str | None = None, task: str = "videomme", require_answer: bool = True,
                 video_map: str | dict[str, str] | None = None):
        self.path = str(path)
        self.media_root = media_root if media_root is not None else str(Path(path).parent / "data")
        self.task, self.require_answer = task, require_answer
        self.video_map = video_map

    def rows(self) -> list[dict[str, Any] | Skip]:
        if self.path.endswith(".parquet"):
            import pyarrow.parquet as pq  # optional dependency, only for the hub's parquet file

            return pq.read_table(self.path).to_pylist()
        if self.path.endswith(".jsonl"):
            return [row if isinstance(row, Skip) else row[1] for row in read_json_records(self.path)]
        data = load_json_file(self.path)
        return [{**video, **q} for video in data for q in video["questions"]] if data and "questions" in data[0] else data

    def to_sample(self, row: dict[str, Any], files: dict[str, str] | None = None) -> Sample:
        options = [_OPTION_PREFIX.sub("", str(o)) for o in row["options"]]
        letter = str(row.get("answer") or "").strip().upper()[:1]
        answer = string.ascii_uppercase.index(letter) if letter else None
        meta = {k: row.get(k) for k in ("duration", "domain", "task_type")}
        return multiple_choice_sample(str(row["question_id"]), self.path, self.video_file(row, files), row["question"],
                                      options, answer, self.task, meta)

    def video_file(self, row: dict[str, Any], files: dict[str, str] | None) -> str:
        """`video_map[video_id]` when a map is given, else `{videoID}.mp4`; never a file named after `video_id`."""
        error = partial(SampleError, str(row["question_id"]), self.path)
        video_id = str(row.get("video_id"))
        if files is not None:
            if video_id not in files:
                raise error(f"video_id {video_id!r} is not in the video_map")
            return str(files[video_id])
        if not row.get("videoID"):
            raise error(f"row has video_id {video_id!r} but no videoID (the YouTube id the files are named by): "
                        "pass video_map= (video_id -> file)")
        return f"{row['videoID']}.mp4"

    def read(self) -> Iterator[Sample | Skip]:
        rows = (r if isinstance(r, Skip) else (str(r.get("question_id", f"#{i}")), r) for i, r in enumerate(self.rows()))
        files = load_json_file(self.video_map) if isinstance(self.video_map, str) else self.video_map
        yield from samples_from_rows(rows, self.path, lambda row, _: self.to_sample(row, files), self.require_answer)
