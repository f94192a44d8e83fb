"""Synthetic UI generator (Ferret-UI layout, read back by the same reader) and box overlays."""

import json
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from mm15.base.data.boxes import BoxCodec
from mm15.base.data.media import MediaLayout
from mm15.base.data.sample import Sample
from mm15.data_builders.synthetic_ui import TASK_NAMES, WIDGETS, WORDS, ScreenSpec, SyntheticUISource
from mm15.ui.overlays import draw_overlay, log_overlays, pick_records, save_overlays


def test_generator_writes_ferret_ui_json_read_back_by_the_reader(tmp_path):
    source = SyntheticUISource(str(tmp_path), "train", num_screens=40, seed=3)
    source.prepare()
    files = sorted(p.name for p in (tmp_path / "train").glob("*.json"))
    assert files == sorted(f"{t}_{p}_train.json" for t in TASK_NAMES for p in ("iphone", "android"))
    raw = json.loads((tmp_path / "train" / "ocr_iphone_train.json").read_text())[0]
    assert set(raw) == {"id", "image", "image_h", "image_w", "conversations", "box_x1y1x2y2"}
    assert [c["from"] for c in raw["conversations"]] == ["human", "gpt"] and len(raw["box_x1y1x2y2"]) == 2
    items = list(source.read())
    assert items and all(isinstance(i, Sample) for i in items)  # no skips: every record is valid
    tasks = Counter((s.task, s.meta["platform"]) for s in items)
    assert set(tasks) == {(t, p) for t in TASK_NAMES for p in ("iphone", "android")}
    by_task = {s.task: s for s in items}
    assert by_task["widget_classification"].answer in WIDGETS and by_task["ocr"].answer in WORDS
    assert by_task["find_text"].meta["task_kind"] == "grounding" and len(by_task["find_text"].meta["answer_boxes"]) == 1


def test_screens_are_portrait_and_landscape_and_boxes_inside(tmp_path):
    source = SyntheticUISource(str(tmp_path), "test", num_screens=30, seed=1, screen=ScreenSpec(landscape_ratio=0.5))
    items = list(source.read())  # read() prepares when needed
    sizes = Counter(tuple(s.meta["image_size"]) for s in items)
    assert set(sizes) == {(64, 128), (128, 64)}
    for s in items:
        w, h = s.meta["image_size"]
        for box in s.meta["answer_boxes"] + s.meta["query_boxes"]:
            assert 0 <= box[0] < box[2] <= w and 0 <= box[1] < box[3] <= h


def test_prepare_is_idempotent_and_deterministic(tmp_path):
    a = SyntheticUISource(str(tmp_path / "a"), "val", num_screens=10, seed=5)
    a.prepare()
    stamp = (tmp_path / "a" / "val" / "ocr_iphone_val.json").stat().st_mtime_ns
    a.prepare()
    assert (tmp_path / "a" / "val" / "ocr_iphone_val.json").stat().st_mtime_ns == stamp
    b = SyntheticUISource(str(tmp_path / "b"), "val", num_screens=10, seed=5)
    b.prepare()
    for name in ("ocr_iphone_val.json", "find_widget_android_val.json"):
        assert (tmp_path / "a" / "val" / name).read_text() == (tmp_path / "b" / "val" / name).read_text()
    img_a = np.asarray(Image.open(tmp_path / "a" / "images" / "val_00003.png"))
    assert np.array_equal(img_a, np.asarray(Image.open(tmp_path / "b" / "images" / "val_00003.png")))
    # Splits differ.
    c = SyntheticUISource(str(tmp_path / "a"), "test", num_screens=10, seed=5)
    c.prepare()
    assert (tmp_path / "a" / "test" / "ocr_iphone_test.json").read_text() != (tmp_path / "a" / "val" / "ocr_iphone_val.json").read_text()


def test_widgets_are_drawn_where_their_boxes_say(tmp_path):
    source = SyntheticUISource(str(tmp_path), "train", num_screens=20)
    for s in source.read():
        if s.task != "widget_classification":
            continue
        image = np.asarray(Image.open(Path(source.media_root) / s.media[0].path)).astype(int)
        x1, y1, x2, y2 = (int(v) for v in s.meta["query_boxes"][0])
        inside = image[y1:y2, x1:x2]
        background = image[0, 0]
        assert (np.abs(inside - background).sum(-1) > 30).any(), s.id  # something drawn in the box


def test_overlay_draws_true_and_predicted_boxes(tmp_path):
    image = Image.new("RGB", (64, 128), (250, 250, 250))
    out = draw_overlay(image, [[10, 10, 30, 20]], [[40, 60, 60, 90], [5, 5]], ["find_text", "pred", "true"])
    scale = 4  # 64 px -> 256 px
    pixels = np.asarray(out)
    assert out.width == 256 and out.height > 128 * scale
    assert tuple(pixels[10 * scale, 20 * scale]) == (0, 200, 0)  # top edge of the true box
    assert tuple(pixels[60 * scale, 50 * scale]) == (230, 0, 0)  # top edge of the predicted box


class FakeWriter:
    def __init__(self):
        self.images = []

    def add_image(self, tag, array, step, dataformats):
        self.images.append((tag, array.shape, dataformats))

    def flush(self):
        pass


class FakeLogger:
    def __init__(self):
        self.experiment = FakeWriter()


def test_save_and_log_overlays_for_a_sample_of_records(tmp_path):
    source = SyntheticUISource(str(tmp_path / "data"), "test", num_screens=12)
    items = list(source.read())
    codec = BoxCodec()

    def screenshot(sample, root=source.media_root):  # a record's `media` entry, as MM15Module writes it
        return MediaLayout("image", str(Path(root) / sample.media[0].path), 1, [4], tuple(sample.meta["image_size"])).to_dict()

    records = [{"id": s.id, "task": s.task, "answer": s.answer, "meta": s.meta, "media": [screenshot(s)],
                "prediction": codec.encode(s.meta["answer_boxes"][0], s.meta["image_size"]) if s.meta["answer_boxes"]
                else "Button"} for s in items]
    records.append(dict(records[0], media=[screenshot(items[0], root=str(tmp_path / "missing"))]))
    picked = pick_records(records, 8)
    assert len(picked) == 8 and len({r["task"] for r in picked}) == len(TASK_NAMES)  # spread over tasks
    paths = save_overlays(records, tmp_path / "overlays", codec, limit=8)
    assert 7 <= len(paths) <= 8 and all(p.suffix == ".png" and p.stat().st_size > 0 for p in paths)
    logger = FakeLogger()
    assert log_overlays(logger, paths, step=3) == len(paths)
    assert logger.experiment.images[0][2] == "HWC"
    assert log_overlays(object(), paths) == 0  # non-TensorBoard loggers are left alone


def test_referring_boxes_do_not_give_the_answer_away(tmp_path):
    """A widget's bounds are sized from its cell, not its kind or word: the answer needs the pixels."""
    items = list(SyntheticUISource(str(tmp_path), "train", num_screens=300, tasks=["widget_classification", "ocr"]).read())
    sizes: dict[str, list[tuple[float, float]]] = {}
    for s in items:
        x1, y1, x2, y2 = s.meta["query_boxes"][0]
        sizes.setdefault(s.answer, []).append((x2 - x1, y2 - y1))
    assert set(sizes) == set(WIDGETS) | set(WORDS)
    for dim in (0, 1):
        means = [sum(v[dim] for v in vs) / len(vs) for vs in sizes.values()]
        assert max(means) - min(means) < 1.0, sizes  # within 1 px, whatever the answer


def test_on_screen_answers_list_what_the_screen_shows(tmp_path):
    """`meta["on_screen_answers"]` is what a model that reads the screen but not the referred region
    could name: on the default (distinct) screens all four kinds, and the two words of the Button and
    the Label, so OCR's on-screen baseline is 1/2 where chance is 1/4."""
    items = list(SyntheticUISource(str(tmp_path), "test", num_screens=20, tasks=["widget_classification", "ocr"]).read())
    for s in items:
        shown = s.meta["on_screen_answers"]
        assert s.answer in shown and len(shown) == len(set(shown))
        if s.task == "widget_classification":
            assert sorted(shown) == sorted(WIDGETS)
        else:
            assert len(shown) == 2 and set(shown) <= set(WORDS)


def test_on_screen_boxes_are_every_widget_of_the_screen(tmp_path):
    """Grounding samples carry `meta["on_screen_boxes"]`: the boxes of all widgets of their screen (4 on
    the default screens), the asked-for box among them; the layout prior scores 1/4 on them."""
    items = list(SyntheticUISource(str(tmp_path), "test", num_screens=20, tasks=["find_text", "find_widget", "ocr"]).read())
    grounding = [s for s in items if s.task in ("find_text", "find_widget")]
    assert grounding and all("on_screen_boxes" not in s.meta for s in items if s.task == "ocr")
    for s in grounding:
        assert len(s.meta["on_screen_boxes"]) == 4 and s.meta["answer_boxes"][0] in s.meta["on_screen_boxes"]
