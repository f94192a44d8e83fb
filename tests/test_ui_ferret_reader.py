"""Ferret-UI reader: fixtures written exactly in the published layout, and every kind of bad input."""

import json

import pytest
from PIL import Image

from mm15.base.data.sample import Sample, Skip
from mm15.data_builders.ferret_ui import TASKS, FerretUISource, infer_platform, infer_task

# Records as in apple/ml-ferret ferretui/playground/sample_data/train_data_example.json.
PUBLISHED_TRAIN = [
    {"id": 0, "image": "appstore_reminders.png", "image_h": 2532, "image_w": 1170,
     "conversations": [{"from": "human", "value": "<image>\nWhat's the UI type of the widget <bbox_location0>?"},
                       {"from": "gpt", "value": "Button"}],
     "box_x1y1x2y2": [[[445, 524, 692, 632]], []]},
    {"id": 1, "image": "appstore_reminders.png", "image_h": 2532, "image_w": 1170,
     "conversations": [{"from": "human", "value": "<image>\nIdentify the icon type of the widget <bbox_location0>?"},
                       {"from": "gpt", "value": "launch"}],
     "box_x1y1x2y2": [[[1035, 540, 1114, 622]], []]},
    {"id": 2, "image": "appstore_reminders.png", "image_h": 2532, "image_w": 1170,
     "conversations": [{"from": "human", "value": "<image>\nWhat text is displayed in the element <bbox_location0>?"},
                       {"from": "gpt", "value": "Reminders, Don't forget. User Reminders"}],
     "box_x1y1x2y2": [[[447, 273, 1054, 425]], []]},
]
PUBLISHED_EVAL_NO_BOX = [
    {"id": 0, "image": "appstore_reminders.png", "image_h": 2532, "image_w": 1170,
     "conversations": [{"from": "human", "value": "<image>\nWhere is the Games Tab located?"}]},
]


def write(tmp_path, name, records, images=(("appstore_reminders.png", (1170, 2532)),)):
    for image, size in images:
        (tmp_path / image).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, (240, 240, 240)).save(tmp_path / image)
    path = tmp_path / name
    path.write_text(json.dumps(records, indent=4))
    return path


def grounding_record(id_=0, boxes=([100, 200, 300, 260],), text="Where is <bbox_location0>?", answer=None, **kw):
    record = {"id": id_, "image": "appstore_reminders.png", "image_h": 2532, "image_w": 1170,
              "conversations": [{"from": "human", "value": "<image>\nWhere is the Games Tab?"},
                                {"from": "gpt", "value": answer or text}],
              "box_x1y1x2y2": [[], [list(b) for b in boxes]]}
    record.update(kw)
    return record


def read(path, **kw):
    items = list(FerretUISource(str(path), **kw).read())
    return [i for i in items if isinstance(i, Sample)], [i for i in items if isinstance(i, Skip)]


def test_published_train_example_parses_exactly(tmp_path):
    path = write(tmp_path, "widget_classification_iphone_train.json", PUBLISHED_TRAIN)
    samples, skips = read(path)
    assert skips == [] and len(samples) == 3
    first = samples[0]
    assert first.task == "widget_classification" and first.meta["task_kind"] == "referring"
    assert first.meta["platform"] == "iphone" and first.meta["image_size"] == [1170, 2532]
    assert first.meta["raw_id"] == 0 and first.id == "widget_classification_iphone_train:0"
    assert [t.role for t in first.turns] == ["user", "assistant"]
    assert first.turns[0].text == "<image>\nWhat's the UI type of the widget <bbox_location0>?"
    assert first.turns[0].boxes == [[445, 524, 692, 632]] and first.turns[1].boxes == []
    assert first.answer == "Button" and first.media[0].path == "appstore_reminders.png"
    assert samples[2].answer == "Reminders, Don't forget. User Reminders"


def test_eval_files_without_answer_turn(tmp_path):
    eval_rows = [{k: v for k, v in r.items()} for r in PUBLISHED_TRAIN]
    for r in eval_rows:
        r["conversations"], r["box_x1y1x2y2"] = r["conversations"][:1], r["box_x1y1x2y2"][:1]
    path = write(tmp_path, "ocr_android_test.json", eval_rows)
    samples, skips = read(path, require_answer=False)
    assert len(samples) == 3 and all(s.answer is None for s in samples) and samples[0].meta["platform"] == "android"
    samples, skips = read(path)
    assert samples == [] and len(skips) == 3 and "no assistant turn" in skips[0].reason
    path = write(tmp_path, "find_text_iphone_test.json", PUBLISHED_EVAL_NO_BOX)
    (sample,), _ = read(path, require_answer=False)
    assert sample.task == "find_text" and sample.turns[0].boxes == []
    # Ferret-UI's eval script also accepts a `label` field as the reference.
    path = write(tmp_path, "icon_recognition_test.json", [dict(eval_rows[1], label="launch")])
    (sample,), _ = read(path)
    assert sample.answer == "launch"


@pytest.mark.parametrize("name, task", [
    ("ocr_iphone_train.json", "ocr"), ("find_text_android_test.json", "find_text"),
    ("widget_listing_train.json", "widget_listing"), ("find_icons_test.json", "find_icons"),
    ("screen2words_train.json", "screen2words"), ("widgetcaptions_test.json", "widgetcaptions"),
    ("taperception_test.json", "taperception"), ("conversation_interaction_train.json", "conversation_interaction"),
    ("function_iphone_train.json", "function"), ("/data/ocr/find_widget_test.json", "find_widget"),
])
def test_task_from_file_name_as_ferret_ui_does(name, task):
    assert infer_task(name) == task


def test_unknown_task_is_a_clear_error_naming_the_file(tmp_path):
    path = write(tmp_path, "mystery_train.json", PUBLISHED_TRAIN)
    with pytest.raises(ValueError, match="mystery_train.json.*cannot infer the Ferret-UI task"):
        FerretUISource(str(path))
    with pytest.raises(ValueError, match="unknown Ferret-UI task 'ocrr'"):
        FerretUISource(str(path), task="ocrr")
    assert read(path, task="ocr")[0][0].task == "ocr"


def test_platform_from_record_paths_argument_or_spotlight():
    assert infer_platform("ocr_iphone_train.json") == "iphone"
    assert infer_platform("x.json", "rico/android-screens/1.png") == "android"
    assert infer_platform("ocr_train.json", "images/1.png") is None


def test_platform_sources_and_directory_input(tmp_path):
    write(tmp_path, "ocr_train.json", [dict(PUBLISHED_TRAIN[2], platform="Android")])
    write(tmp_path, "taperception_train.json", [PUBLISHED_TRAIN[0]])
    write(tmp_path, "find_text_train.json", [grounding_record()])
    samples, skips = read(tmp_path, platform="iphone")
    by_task = {s.task: s.meta["platform"] for s in samples}
    assert by_task == {"ocr": "android", "taperception": "iphone", "find_text": "iphone"}
    samples, _ = read(tmp_path)
    assert {s.task: s.meta["platform"] for s in samples}["taperception"] == "android"  # Spotlight = Rico
    assert {s.task: s.meta["platform"] for s in samples}["find_text"] == "unknown"


def test_masks_are_accepted_and_kept_on_request(tmp_path):
    rle = {"size": [2532, 1170], "counts": "abc"}
    path = write(tmp_path, "ocr_train.json", [dict(PUBLISHED_TRAIN[2], masks=[[rle], []])])
    (sample,), _ = read(path)
    assert "masks" not in sample.meta
    (sample,), _ = read(path, keep_masks=True)
    assert sample.meta["masks"] == [[rle], []]


def test_size_disagreement_trusts_the_file_and_is_counted(tmp_path):
    path = write(tmp_path, "find_text_train.json", [grounding_record()], images=[("appstore_reminders.png", (585, 1266))])
    source = FerretUISource(str(path))
    (sample,) = list(source.read())
    assert sample.meta["image_size"] == [585, 1266]
    assert sample.turns[1].boxes == [[50, 100, 150, 130]]  # declared 1170x2532 frame -> file frame
    assert source.counts["size_mismatch"] == 1
    (skip,) = list(FerretUISource(str(path), size_mismatch="skip").read())
    assert isinstance(skip, Skip) and "disagrees with the file (585x1266)" in skip.reason


def test_missing_declared_size_uses_the_file(tmp_path):
    record = grounding_record()
    del record["image_w"], record["image_h"]
    (sample,), _ = read(write(tmp_path, "find_text_train.json", [record]))
    assert sample.turns[1].boxes == [[100, 200, 300, 260]]


@pytest.mark.parametrize("record, reason", [
    (grounding_record(7, boxes=[[2000, 3000, 2100, 3100]]), "lies outside the 1170x2532 screenshot"),
    (grounding_record(7, boxes=[[300, 200, 100, 260]]), "is inverted"),
    (grounding_record(7, boxes=[[100, 200, 100, 260]]), "zero area"),
    (grounding_record(7, boxes=[[100, 200, 300]]), "has 3 coordinates"),
    (grounding_record(7, boxes=[[100, 200, 300, 260, 5]]), "has 5 coordinates"),
    (grounding_record(7, boxes=[[1, 2, "x", 4]]), "non-numeric"),
    (grounding_record(7, boxes=[[1, 2, 3, 4], [5, 6, 7, 8]]), "2 boxes for 1 <bbox_location> placeholders"),
    (grounding_record(7, boxes=[], text="Here <bbox_location0>"), "0 boxes for 1 <bbox_location> placeholders"),
    (grounding_record(7, image="nowhere.png"), "screenshot not found"),
    (grounding_record(7, conversations=[{"from": "robot", "value": "hi"}], box_x1y1x2y2=[]), "turn 0: expected"),
    (grounding_record(7, conversations=[]), "missing or empty 'conversations'"),
    (grounding_record(7, box_x1y1x2y2=[[], [[1, 2, 3, 4]], [[1, 2, 3, 4]]]), "boxes for 3 turns but there are 2"),
    ({"id": 7, "conversations": []}, "missing 'image'"),
])
def test_bad_records_become_skips_naming_the_record(tmp_path, record, reason):
    path = write(tmp_path, "find_text_train.json", [record, grounding_record(8)])
    samples, skips = read(path)
    assert [s.meta["raw_id"] for s in samples] == [8]  # the run goes on with the good record
    (skip,) = skips
    assert skip.record_id == "7" and skip.source == str(path) and reason in skip.reason


def test_box_partly_outside_is_clipped_and_counted(tmp_path):
    path = write(tmp_path, "find_text_train.json", [grounding_record(boxes=[[1100, 2500, 1300, 2600]])])
    source = FerretUISource(str(path))
    (sample,) = list(source.read())
    assert sample.turns[1].boxes == [[1100, 2500, 1170, 2532]] and source.counts["clipped_boxes"] == 1


def test_extreme_aspect_ratio_and_unreadable_screenshot(tmp_path):
    record = grounding_record(3, image="tall.png", boxes=[[0, 0, 1, 5]], image_w=1, image_h=10000)
    path = write(tmp_path, "find_text_train.json", [record], images=[("tall.png", (1, 10000))])
    (skip,) = list(FerretUISource(str(path)).read())
    assert skip.record_id == "3" and "1x10000: aspect ratio beyond 20:1" in skip.reason
    (tmp_path / "broken.png").write_bytes(b"not a png")
    path.write_text(json.dumps([grounding_record(4, image="broken.png")]))
    (skip,) = list(FerretUISource(str(path)).read())
    assert skip.record_id == "4" and "cannot be opened" in skip.reason


def test_bad_files_fail_loudly(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope_ocr.json"):
        FerretUISource(str(tmp_path / "nope_ocr.json"))
    (tmp_path / "ocr_train.json").write_text("{not json")
    with pytest.raises(ValueError, match="ocr_train.json: not valid JSON"):
        list(FerretUISource(str(tmp_path / "ocr_train.json")).read())
    (tmp_path / "ocr_train.json").write_text(json.dumps({"id": 0}))
    with pytest.raises(ValueError, match="JSON list of records"):
        list(FerretUISource(str(tmp_path / "ocr_train.json")).read())


def test_task_table_covers_every_published_task():
    published = ["ocr", "find_text", "icon_recognition", "find_icons", "widget_classification", "find_widget",
                 "widget_listing", "screen2words", "widgetcaptions", "taperception", "detailed_description",
                 "conversation_perception", "conversation_interaction", "function"]
    assert sorted(TASKS) == sorted(published)


def test_paths_escaping_the_media_root_are_skipped_before_the_file_is_opened(tmp_path, monkeypatch):
    from mm15.data_builders import ferret_ui

    outside = tmp_path / "secret.png"
    Image.new("RGB", (1170, 2532)).save(outside)
    root = tmp_path / "data"
    root.mkdir()
    records = [grounding_record(1, image="../secret.png"), grounding_record(2, image=str(outside)),
               grounding_record(3, image="sub/../../secret.png"), grounding_record(4)]
    path = write(root, "find_text_train.json", records)
    opened = []
    real_open = ferret_ui.Image.open
    monkeypatch.setattr(ferret_ui.Image, "open", lambda fp, *a, **k: opened.append(str(fp)) or real_open(fp, *a, **k))
    samples, skips = read(path)
    assert [s.meta["raw_id"] for s in samples] == [4]
    assert [s.record_id for s in skips] == ["1", "2", "3"]
    assert all("escapes the media root" in s.reason for s in skips)
    assert opened == [str(root / "appstore_reminders.png")]  # the file outside was never opened
