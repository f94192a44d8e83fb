"""Video instruction data -> canonical samples: ShareGPTVideo / LLaVA-Video JSON and VideoChat2 JSON.

Each builder reads its format as published and yields `Sample`s with one `Media(kind="video")`
referenced by one `<image>` marker; bad records become `Skip`s naming the record and the reason.

    source = LlavaVideoJsonSource("sft/video_240k.jsonl", media_root="frames/")
    source = VideoChat2Source("videochat2/conversation/videochat2/train.json", media_root="videos/")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from mm15.base.data.sample import IMAGE_TOKEN, Media, Sample, SampleError, Skip, Turn
from mm15.base.data.sources import read_json_records, samples_from_rows
from mm15.data_builders.llava import llava_record_to_sample

VIDEO_TAG = "<video>"


def _window(row: dict[str, Any]) -> tuple[float | None, float | None]:
    """Optional clip window: `start`/`end` seconds on the record (VideoChat2's time-bounded clips)."""
    start, end = row.get("start"), row.get("end")
    return (None if start is None else float(start)), (None if end is None else float(end))


class LlavaVideoJsonSource:
    """ShareGPTVideo (LLaVA-Hound) and LLaVA-Video-178K instruction data.

    Layout as published: a JSON array or JSONL of records

        {"id": "v_k9Ij1aTRb1Q_0", "video": "v_k9Ij1aTRb1Q",
         "conversations": [{"from": "human", "value": "<video>\\nWhat is the man doing?"},
                           {"from": "gpt", "value": "He is sharpening a knife."}]}

    `video` is a file (`.mp4`, ...) or a folder of frame images (ShareGPTVideo ships its videos
    as frames) relative to `media_root`. The text marker is `<video>` (ShareGPTVideo) or `<image>`
    (LLaVA-Video); both become the canonical `<image>`. A record without a marker gets one before
    its first human turn. Optional `start`/`end` (seconds) select a clip.

    Args: path: the JSON/JSONL file; media_root: videos folder (default: the file's folder);
    task: task name for metrics; require_answer: False for prediction inputs.
    """

    def __init__(self, path: str, media_root: str | None = None, task: str = "video_sft",
                 require_answer: bool = True):
        self.path = str(path)
        self.media_root = media_root if media_root is not None else str(Path(path).parent)
        self.task, self.require_answer = task, require_answer

    def to_sample(self, row: Any, label: str) -> Sample:
        if isinstance(row, dict) and isinstance(row.get("conversations"), list):
            row = dict(row, conversations=[
                dict(m, value=str(m["value"]).replace(VIDEO_TAG, IMAGE_TOKEN)) if isinstance(m, dict) and "value" in m else m
                for m in row["conversations"]])
        if isinstance(row, dict) and not row.get("video"):
            raise SampleError(str(row.get("id", label)), self.path, "record has no `video`")
        sample = llava_record_to_sample(row, label, self.path, media_key="video", kind="video", task=self.task)
        sample.media[0].start, sample.media[0].end = _window(row)
        return sample

    def read(self) -> Iterator[Sample | Skip]:
        yield from samples_from_rows(read_json_records(self.path), self.path, self.to_sample, self.require_answer)


class VideoChat2Source:
    """VideoChat2 instruction data (VideoChat2-IT).

    Layout as published: a JSON array of records, each with a video and its question-answer list

        [{"video": "1017/1017_1.mp4",
          "QA": [{"i": "Watch the video and answer.", "q": "What does the cat do?", "a": "It jumps."},
                 {"i": "", "q": "And then?", "a": "It sleeps."}]}]

    `i` is the instruction, `q` the question (empty for captioning subsets: the instruction is the
    request), `a` the answer; several QA items form one multi-turn conversation. The first user turn
    is `<image>\\n` + instruction + question. Some subsets annotate clips with `start`/`end` seconds.
    Records have no id: `<file stem>#<index>` names them.

    Args: path: the JSON file; media_root: videos folder (default: the file's folder);
    task: task name for metrics.
    """

    def __init__(self, path: str, media_root: str | None = None, task: str = "videochat2"):
        self.path = str(path)
        self.media_root = media_root if media_root is not None else str(Path(path).parent)
        self.task = task

    def to_sample(self, row: Any, label: str) -> Sample:
        record_id = f"{Path(self.path).stem}{label}"
        if not isinstance(row, dict) or not row.get("video") or not isinstance(row.get("QA"), list) or not row["QA"]:
            raise SampleError(record_id, self.path, "record needs `video` and a non-empty `QA` list")
        turns = []
        for k, qa in enumerate(row["QA"]):
            if not isinstance(qa, dict) or not str(qa.get("a") or "").strip():
                raise SampleError(record_id, self.path, f"QA item {k} has no answer `a`")
            parts = [str(qa.get("i") or "").strip()] if k == 0 else []
            parts.append(str(qa.get("q") or "").strip())
            text = "\n".join(p for p in parts if p)
            turns += [Turn("user", (IMAGE_TOKEN + "\n" if k == 0 else "") + text), Turn("assistant", str(qa["a"]))]
        start, end = _window(row)
        media = [Media(str(row["video"]), kind="video", start=start, end=end)]
        return Sample(record_id, turns, media, task=self.task, source=self.path)

    def read(self) -> Iterator[Sample | Skip]:
        yield from samples_from_rows(read_json_records(self.path), self.path, self.to_sample)
