"""Every video data builder parses a small fixture written in its published layout, bad rows included."""

import csv
import json

import pytest

from mm15.base.data.sample import IMAGE_TOKEN, Sample, Skip
from mm15.data_builders.video_instruct import LlavaVideoJsonSource, VideoChat2Source
from mm15.data_builders.video_qa import ActivityNetQASource, EgoSchemaSource, NExTQASource, VideoMMESource


def split(items):
    items = list(items)
    samples = [x for x in items if isinstance(x, Sample)]
    skips = [x for x in items if isinstance(x, Skip)]
    return samples, skips


def write_json(path, data):
    path.write_text(json.dumps(data))
    return str(path)


def test_sharegptvideo_jsonl_with_video_tag_and_frame_folder(tmp_path):
    rows = [
        {"id": "v_k9Ij1aTRb1Q_0", "video": "v_k9Ij1aTRb1Q",
         "conversations": [{"from": "human", "value": "<video>\nWhat is the man doing?"},
                           {"from": "gpt", "value": "He is sharpening a knife."}]},
        {"id": "llava_video_1", "video": "ytb/abc.mp4", "data_source": "liwei_youtube",
         "conversations": [{"from": "human", "value": "Describe it."}, {"from": "gpt", "value": "A cat."}]},
        {"id": "no_video", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
        {"id": "two_tags", "video": "x.mp4", "conversations": [{"from": "human", "value": "<video><video>?"},
                                                               {"from": "gpt", "value": "no"}]},
    ]
    path = tmp_path / "sft.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken\n")
    samples, skips = split(LlavaVideoJsonSource(str(path)).read())
    assert [s.id for s in samples] == ["v_k9Ij1aTRb1Q_0", "llava_video_1"]
    first = samples[0]
    assert first.turns[0].text == f"{IMAGE_TOKEN}\nWhat is the man doing?" and first.answer == "He is sharpening a knife."
    assert first.media[0].kind == "video" and first.media[0].path == "v_k9Ij1aTRb1Q"
    assert samples[1].turns[0].text.startswith(IMAGE_TOKEN)  # marker added before the first human turn
    reasons = " | ".join(s.reason for s in skips)
    assert len(skips) == 3 and "no `video`" in reasons and "2 <image> markers" in reasons and "malformed JSON" in reasons


def test_videochat2_instruction_json(tmp_path):
    rows = [
        {"video": "1017/1017_1.mp4", "QA": [{"i": "Watch the video and answer.", "q": "What does the cat do?", "a": "It jumps."},
                                            {"i": "", "q": "And then?", "a": "It sleeps."}]},
        {"video": "clip.mp4", "start": 3.5, "end": 9.0, "QA": [{"i": "Describe the clip in detail.", "q": "", "a": "A man runs."}]},
        {"video": "bad.mp4", "QA": []},
        {"video": "noans.mp4", "QA": [{"i": "", "q": "what?", "a": ""}]},
    ]
    samples, skips = split(VideoChat2Source(write_json(tmp_path / "train.json", rows)).read())
    assert [s.id for s in samples] == ["train#0", "train#1"]
    conv = samples[0]
    assert [t.role for t in conv.turns] == ["user", "assistant", "user", "assistant"]
    assert conv.turns[0].text == f"{IMAGE_TOKEN}\nWatch the video and answer.\nWhat does the cat do?"
    assert conv.turns[2].text == "And then?"
    clip = samples[1].media[0]
    assert (clip.start, clip.end) == (3.5, 9.0) and samples[1].turns[0].text.endswith("Describe the clip in detail.")
    assert len(skips) == 2 and "non-empty `QA`" in skips[0].reason and "no answer" in skips[1].reason


def test_activitynet_qa_joins_questions_and_answers(tmp_path):
    for name in ("v_Lf_7RurLgp0.mkv", "v_abc.mp4", "v_zzz.webm"):
        (tmp_path / name).write_bytes(b"")
    q = [{"video_name": "Lf_7RurLgp0", "question": "is the man wearing a hat", "question_id": "v_Lf_7RurLgp0_2"},
         {"video_name": "abc", "question": "what color is the car", "question_id": "v_abc_0"},
         {"video_name": "zzz", "question": "where is he", "question_id": "v_zzz_1"}]
    a = [{"answer": "yes", "type": 3, "question_id": "v_Lf_7RurLgp0_2"},
         {"answer": "red", "type": 4, "question_id": "v_abc_0"}]
    source = ActivityNetQASource(write_json(tmp_path / "test_q.json", q), write_json(tmp_path / "test_a.json", a))
    samples, skips = split(source.read())
    assert [s.id for s in samples] == ["v_Lf_7RurLgp0_2", "v_abc_0"]
    hat = samples[0]
    assert hat.media[0].path == "v_Lf_7RurLgp0.mkv"  # the extension that exists
    assert samples[1].media[0].path == "v_abc.mp4" and skips[0].record_id == "v_zzz_1"
    assert hat.turns[0].text.startswith(f"{IMAGE_TOKEN}\nIs the man wearing a hat?\n")
    assert hat.answer == "yes" and hat.meta["type"] == 3 and hat.task == "activitynet_qa"
    assert len(skips) == 1 and skips[0].record_id == "v_zzz_1" and "no assistant turn" in skips[0].reason


def test_nextqa_csv_with_video_map(tmp_path):
    header = ["video", "frame_count", "width", "height", "question", "answer", "qid", "type", "a0", "a1", "a2", "a3", "a4"]
    rows = [["4010069381", "1041", "640", "480", "why did the boy pick up the ball", "2", "6", "CW",
             "to throw it", "to eat", "to give it to the dog", "to hide", "to clean it"],
            ["4010069381", "1041", "640", "480", "what happens after", "9", "7", "TN", "a", "b", "c", "d", "e"]]
    with open(tmp_path / "val.csv", "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    write_json(tmp_path / "map_vid_vidorID.json", {"4010069381": "0000/4010069381"})
    samples, skips = split(NExTQASource(str(tmp_path / "val.csv"), media_root=str(tmp_path / "NExTVideo")).read())
    (s,) = samples
    assert s.id == "4010069381_6" and s.media[0].path == "0000/4010069381.mp4" and s.task == "nextqa"
    assert s.turns[0].text.splitlines()[1:4] == ["why did the boy pick up the ball?", "A. to throw it", "B. to eat"]
    assert s.answer == "C" and s.meta["answer_index"] == 2 and s.meta["num_choices"] == 5 and s.meta["type"] == "CW"
    assert len(skips) == 1 and skips[0].record_id == "4010069381_7" and "outside 5 options" in skips[0].reason


def test_egoschema_questions_and_subset_answers(tmp_path):
    def q(uid):
        return {"q_uid": uid, "google_drive_id": "x", "question": "What is c doing overall?",
                **{f"option {k}": f"option text {k}" for k in range(5)}}

    questions = write_json(tmp_path / "questions.json", [q("u1"), q("u2"), {"q_uid": "u3", "question": "?"}])
    answers = write_json(tmp_path / "subset_answers.json", {"u1": 4, "u3": 0})
    samples, skips = split(EgoSchemaSource(questions, answers).read())
    assert [s.id for s in samples] == ["u1"] and samples[0].answer == "E" and samples[0].media[0].path == "u1.mp4"
    assert {s.record_id for s in skips} == {"u2", "u3"}
    prompts, _ = split(EgoSchemaSource(questions, answers, require_answer=False).read())
    assert [s.id for s in prompts] == ["u1", "u2"] and prompts[1].answer is None


def test_videomme_flat_rows_and_grouped_json(tmp_path):
    row = {"video_id": "001", "duration": "short", "domain": "Knowledge", "sub_category": "Humanity & History",
           "url": "https://www.youtube.com/watch?v=fFjv93ACGo8", "videoID": "fFjv93ACGo8", "question_id": "001-1",
           "task_type": "Counting Problem", "question": "How many people appear?",
           "options": ["A. One.", "B. Two.", "C. Three.", "D. Four."], "answer": "C"}
    bad = dict(row, question_id="001-2", answer="Z")
    path = tmp_path / "videomme.jsonl"
    path.write_text(json.dumps(row) + "\n" + json.dumps(bad) + "\n")
    samples, skips = split(VideoMMESource(str(path)).read())
    (s,) = samples
    assert s.id == "001-1" and s.media[0].path == "fFjv93ACGo8.mp4" and s.answer == "C"
    assert s.meta["choices"] == ["One.", "Two.", "Three.", "Four."] and s.meta["duration"] == "short"
    assert len(skips) == 1 and skips[0].record_id == "001-2"
    grouped = [{k: row[k] for k in ("video_id", "duration", "domain", "sub_category", "url", "videoID")}
               | {"questions": [{k: row[k] for k in ("question_id", "task_type", "question", "options", "answer")}]}]
    again, _ = split(VideoMMESource(write_json(tmp_path / "videomme.json", grouped)).read())
    assert again[0].to_dict() | {"source": ""} == s.to_dict() | {"source": ""}


def test_videomme_parquet_when_pyarrow_is_installed(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [{"video_id": "002", "videoID": "abc", "question_id": "002-1", "question": "Q?", "task_type": "t",
             "duration": "long", "domain": "d", "options": ["A. x", "B. y", "C. z", "D. w"], "answer": "B"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "test-00000-of-00001.parquet")
    samples, _ = split(VideoMMESource(str(tmp_path / "test-00000-of-00001.parquet")).read())
    assert samples[0].answer == "B" and samples[0].meta["choices"] == ["x", "y", "z", "w"]


def test_every_builder_names_file_line_and_column_of_invalid_json(tmp_path):
    from mm15.base.data.sources import DataFileError

    bad = tmp_path / "output_test_template.json"  # Video-MME's published template has trailing commas
    bad.write_text('[\n  {"video_id": "001", "questions": [\n    {"question_id": "001-1",},\n  ]}\n]\n')
    good = write_json(tmp_path / "good.json", [])
    sources = [VideoMMESource(str(bad)), ActivityNetQASource(str(bad)), ActivityNetQASource(good, str(bad)),
               EgoSchemaSource(str(bad)), EgoSchemaSource(good, str(bad)),
               LlavaVideoJsonSource(str(bad)), VideoChat2Source(str(bad))]
    for source in sources:
        with pytest.raises(DataFileError, match=r"output_test_template.json: not valid JSON: .* at line 3, column 29"):
            list(source.read())


def test_builders_skip_what_they_cannot_name_a_file_for_and_say_why(tmp_path):
    template = [{"video_id": "001", "duration": "short", "domain": "Knowledge", "sub_category": "History",
                 "questions": [{"question_id": "001-1", "task_type": "Counting", "question": "How many?",
                                "options": ["A. 1", "B. 2", "C. 3", "D. 4"], "answer": "B"}]}]
    path = write_json(tmp_path / "output_test_template.json", template)  # Video-MME's template: no videoID
    _, (skip,) = split(VideoMMESource(path).read())
    assert skip.record_id == "001-1" and "video_id '001'" in skip.reason and "video_map" in skip.reason
    video_map = write_json(tmp_path / "ids.json", {"001": "fFjv93ACGo8.mp4"})
    for given in (video_map, {"001": "fFjv93ACGo8.mp4"}):
        (s,) = split(VideoMMESource(path, video_map=given).read())[0]
        assert s.media[0].path == "fFjv93ACGo8.mp4"
    _, (skip,) = split(VideoMMESource(path, video_map={"002": "x.mp4"}).read())
    assert "video_id '001' is not in the video_map" in skip.reason

    q = [{"video_name": "gone", "question": "is it", "question_id": "v_gone_0"}]
    a = [{"answer": "yes", "type": 3, "question_id": "v_gone_0"}]
    source = ActivityNetQASource(write_json(tmp_path / "q.json", q), write_json(tmp_path / "a.json", a))
    _, (skip,) = split(source.read())  # no v_gone.* file: a skip naming what was looked for, not 'v_gone.mp4'
    assert skip.record_id == "v_gone_0" and "no video v_gone.mp4|.mkv|.webm" in skip.reason

    header = ["video", "question", "answer", "qid", "type", "a0", "a1", "a2", "a3", "a4"]
    nextqa = tmp_path / "nextqa"
    nextqa.mkdir()
    with open(nextqa / "val.csv", "w", newline="") as f:
        csv.writer(f).writerows([header, ["4010069381", "why", "0", "6", "CW", "a", "b", "c", "d", "e"],
                                 ["555", "why", "0", "7", "CW", "a", "b", "c", "d", "e"]])
    (nextqa / "555.mp4").write_bytes(b"")
    samples, (skip,) = split(NExTQASource(str(nextqa / "val.csv")).read())  # no map_vid_vidorID.json
    assert [s.media[0].path for s in samples] == ["555.mp4"]
    assert skip.record_id == "4010069381_6" and "map_vid_vidorID.json" in skip.reason
    write_json(nextqa / "map_vid_vidorID.json", {"555": "0000/555"})
    samples, (skip,) = split(NExTQASource(str(nextqa / "val.csv")).read())
    assert [s.media[0].path for s in samples] == ["0000/555.mp4"] and "not in the video map" in skip.reason
