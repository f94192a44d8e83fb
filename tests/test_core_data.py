"""Bad input: each case gives a message naming the record and file, goes to the quarantine file,
and the run continues until the error budget is spent."""

import json

import numpy as np
import pytest
from PIL import Image

from mm15.base.data.datamodule import DataErrorBudgetExceeded, MM15DataModule, ProcessedDataset
from mm15.base.model import load_tokenizer
from mm15.base.data.processor import MM15Processor
from mm15.base.data.sample import Skip
from mm15.base.data.sources import JsonlSource
from mm15.data_builders.llava import LlavaJsonSource

from conftest import tiny_preprocessing, tiny_spec


def _row(i, image="ok.png", user="<image>\nQ?", answer="A", role="gpt"):
    conv = [{"from": "human", "value": user}]
    if answer is not None:
        conv.append({"from": role, "value": answer})
    return {"id": f"r{i}", "image": image, "conversations": conv}


@pytest.fixture
def media(tmp_path):
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "ok.png")
    good = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(good[: len(good) // 2])
    (tmp_path / "notimage.png").write_text("hello")
    return tmp_path


def _processor(max_length=512):
    return MM15Processor(load_tokenizer(tiny_spec()), tiny_preprocessing(), tokens_per_crop=4)


def _llava_file(path, rows, extra_lines=()):
    lines = [json.dumps(r) for r in rows] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_parse_stage_bad_records_are_named(media):
    rows = [_row(0), _row(1, answer=None), _row(2, role="robot"), _row(3, user="<image><image> two?"),
            _row(4, user="no tag", image=None) | {"image": ["ok.png", "ok.png"]}, _row(5, image="../../etc/passwd")]
    rows[4]["conversations"][0]["value"] = "<image> only one tag"
    path = _llava_file(media / "train.jsonl", rows, ["{not json"])
    dm = MM15DataModule(train=[LlavaJsonSource(path)], max_error_fraction=1.0, quarantine_file=str(media / "q.jsonl"))
    samples = dm.read_split("train")
    assert [s.id for s in samples] == ["r0"]
    reasons = {json.loads(l)["record_id"]: json.loads(l)["reason"] for l in open(media / "q.jsonl")}
    assert "no assistant turn" in reasons["r1"]
    assert "unknown role 'robot'" in reasons["r2"]
    assert "2 <image> markers but 1 media items" in reasons["r3"]
    assert "1 <image> markers but 2 media items" in reasons["r4"]
    assert "escapes the media root" in reasons["r5"]
    assert "malformed JSON line" in reasons["line 7"]
    assert all(json.loads(l)["source"] == path for l in open(media / "q.jsonl"))  # every skip names the file


@pytest.mark.parametrize("image, reason", [("missing.png", "image file not found"),
                                           ("truncated.png", "unreadable image"),
                                           ("notimage.png", "unreadable image")])
def test_load_stage_bad_media_become_skips(media, image, reason):
    path = _llava_file(media / "d.jsonl", [_row(0, image=image)])
    samples = MM15DataModule(train=[LlavaJsonSource(path)]).read_split("train")
    item = ProcessedDataset(samples, _processor(), generate=False)[0]
    assert isinstance(item, Skip) and item.record_id == "r0" and reason in item.reason and image in item.reason


def test_too_long_sample_is_a_counted_skip(media):
    path = _llava_file(media / "d.jsonl", [_row(0, answer="x" * 600)])
    samples = MM15DataModule(train=[LlavaJsonSource(path)]).read_split("train")
    item = ProcessedDataset(samples, _processor(), generate=False)[0]
    assert isinstance(item, Skip) and "exceeds max_length 512" in item.reason


def test_error_budget_stops_with_summary(media):
    rows = [_row(i) for i in range(15)] + [_row(100 + i, answer=None) for i in range(5)]
    path = _llava_file(media / "d.jsonl", rows)
    dm = MM15DataModule(train=[LlavaJsonSource(path)], max_error_fraction=0.1, min_samples_for_budget=10,
                        quarantine_file=str(media / "q.jsonl"))
    with pytest.raises(DataErrorBudgetExceeded, match=r"5 of 20 samples skipped \(25.0% > budget 10.0%\)"):
        dm.read_split("train")
    assert sum(1 for _ in open(media / "q.jsonl")) == 5


def test_loader_skips_are_quarantined_and_the_batch_continues(media):
    path = _llava_file(media / "d.jsonl", [_row(0), _row(1, image="missing.png"), _row(2)])
    dm = MM15DataModule(train=[LlavaJsonSource(path)], batch_size=3, max_error_fraction=0.5, min_samples_for_budget=1,
                        quarantine_file=str(media / "q.jsonl"))
    dm.samples["train"] = dm.read_split("train")
    dm.processor = _processor()
    batch = dm.on_before_batch_transfer(next(iter(dm.train_dataloader())), 0)
    assert batch["size"] == 2 and "skipped" not in batch
    assert json.loads(open(media / "q.jsonl").read())["record_id"] == "r1"


def test_canonical_jsonl_round_trip_and_malformed_lines(media):
    from mm15.base.data.sample import Media, Sample, Turn
    from mm15.base.data.sources import write_jsonl

    s = Sample("c1", [Turn("user", "<image> at <bbox_location0>?", boxes=[[1, 2, 3, 4]]), Turn("assistant", "x")],
               [Media("ok.png")], task="t", meta={"num_choices": 4})
    write_jsonl([s], media / "c.jsonl")
    with open(media / "c.jsonl", "a") as f:
        f.write("[1, 2]\n{\"id\": 7}\n")
    items = list(JsonlSource(str(media / "c.jsonl")).read())
    assert items[0].turns[0].boxes == [[1, 2, 3, 4]] and items[0].meta == {"num_choices": 4}
    assert isinstance(items[1], Skip) and "expected a JSON object" in items[1].reason
    assert isinstance(items[2], Skip) and "malformed canonical record" in items[2].reason


def test_resolve_media_is_lexical_refuses_escapes_and_keeps_symlinks_inside(tmp_path):
    from mm15.base.data.datamodule import resolve_media
    from mm15.base.data.sample import Media, Sample, SampleError, Turn

    root, elsewhere = tmp_path / "root", tmp_path / "disk2"
    root.mkdir(), elsewhere.mkdir()
    (root / "linked").symlink_to(elsewhere, target_is_directory=True)

    def sample(path):
        return Sample("r", [Turn("user", "<image> q"), Turn("assistant", "a")], [Media(path)], "t", "f.json")

    assert resolve_media(sample("a/../b.png"), str(root)).media[0].path == str(root / "b.png")
    assert resolve_media(sample("linked/x.png"), str(root)).media[0].path == str(root / "linked" / "x.png")
    for bad in ("../disk2/x.png", str(elsewhere / "x.png"), "a/../../x.png"):
        with pytest.raises(SampleError, match="escapes the media root"):
            resolve_media(sample(bad), str(root))


def test_non_string_media_paths_are_skips_naming_the_record(media):
    from mm15.data_builders.video_instruct import LlavaVideoJsonSource

    conv = _row(0)["conversations"]
    llava = _llava_file(media / "l.jsonl", [_row(0), _row(1, image=5), _row(2, image=[7]), _row(3, image=[None]),
                                            _row(4, image=[["a.png"]])])
    canonical = media / "c.jsonl"
    turns = [{"role": "user", "text": "<image> q"}, {"role": "assistant", "text": "a"}]
    canonical.write_text("".join(json.dumps({"id": f"c{k}", "turns": turns, "media": [m]}) + "\n"
                                 for k, m in enumerate([{"path": 5}, {"path": None}, {"path": ["x.png"]}, 3])))
    video = _llava_file(media / "v.jsonl", [{"id": f"v{k}", "video": v, "conversations": conv}
                                            for k, v in enumerate([5, [3], {"p": "x.mp4"}])])
    dm = MM15DataModule(train=[LlavaJsonSource(llava), JsonlSource(str(canonical)), LlavaVideoJsonSource(video)],
                        max_error_fraction=1.0, quarantine_file=str(media / "q.jsonl"))
    assert [s.id for s in dm.read_split("train")] == ["r0"]
    skips = {s.record_id: s for s in dm.quarantine.skips}
    assert sorted(skips) == ["c0", "c1", "c2", "c3", "r1", "r2", "r3", "r4", "v0", "v1", "v2"]
    for skip in skips.values():
        assert "media path" in skip.reason and "not a string" in skip.reason, skip


def test_a_processor_bug_propagates_while_a_bad_file_is_still_a_skip(media, monkeypatch):
    from mm15.base.data.datamodule import process_sample

    path = _llava_file(media / "d.jsonl", [_row(0), _row(1, image="truncated.png")])
    good, corrupt = MM15DataModule(train=[LlavaJsonSource(path)]).read_split("train")
    processor = _processor()

    def bug(*args, **kwargs):
        raise TypeError("unsupported operand type(s) for +: 'int' and 'str'")

    monkeypatch.setattr(processor, "build_messages", bug)
    with pytest.raises(TypeError, match="unsupported operand"):  # a code bug is no budgeted "bad sample"
        ProcessedDataset([good], processor, generate=False)[0]
    skip = process_sample(processor, corrupt)
    assert isinstance(skip, Skip) and skip.record_id == "r1" and "unreadable image" in skip.reason
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # ok.png (40 x 40) is now a decompression bomb
    skip = process_sample(_processor(), good)
    assert isinstance(skip, Skip) and "DecompressionBombError" in skip.reason and "ok.png" in skip.reason


def test_region_checks_apply_to_canonical_records_range_against_the_image(media):
    turns = lambda box: [{"role": "user", "text": "<image> at <bbox_location0>?", "boxes": [box]},  # noqa: E731
                         {"role": "assistant", "text": "yes"}]
    boxes = {"ok": [1, 2, 30, 40], "point": [5, 5], "arity": [1, 2, 3], "inverted": [30, 2, 1, 40],
             "flat": [1, 2, 1, 40], "text": [1, "2", 3, 4], "nan": [1, float("nan"), 3, 4], "scalar": 5,
             "outside": [10, 10, 41, 20], "negative": [-1, 0, 5, 5], "far_point": [5, 90]}
    path = media / "c.jsonl"
    path.write_text("".join(json.dumps({"id": k, "turns": turns(b), "media": ["ok.png"]}) + "\n" for k, b in boxes.items()))
    dm = MM15DataModule(train=[JsonlSource(str(path))], max_error_fraction=1.0)
    samples = dm.read_split("train")
    reasons = {s.record_id: s.reason for s in dm.quarantine.skips}
    assert "has 3 coordinates" in reasons["arity"] and "is inverted" in reasons["inverted"]
    assert "zero area" in reasons["flat"] and "non-numeric" in reasons["text"] and "non-numeric" in reasons["nan"]
    assert "coordinates" in reasons["scalar"]
    assert [s.id for s in samples] == ["ok", "point", "outside", "negative", "far_point"]
    processed = {s.id: process_sample_of(s) for s in samples}  # range needs the image: 40 x 40
    assert not isinstance(processed["ok"], Skip) and not isinstance(processed["point"], Skip)
    for name in ("outside", "negative", "far_point"):
        skip = processed[name]
        assert isinstance(skip, Skip) and skip.record_id == name and "outside the 40x40 image" in skip.reason
        assert "ok.png" in skip.reason


def process_sample_of(sample):
    from mm15.base.data.datamodule import process_sample

    return process_sample(_processor(), sample)


def test_a_truncated_image_is_a_skip_even_when_pil_is_told_to_load_truncated_files(media, monkeypatch):
    from PIL import ImageFile

    from mm15.base.data.datamodule import process_sample

    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # what importing lmms-eval does
    path = _llava_file(media / "t.jsonl", [_row(1, image="truncated.png")])
    (corrupt,) = MM15DataModule(train=[LlavaJsonSource(path)]).read_split("train")
    skip = process_sample(_processor(), corrupt)
    assert isinstance(skip, Skip) and "unreadable image" in skip.reason
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the other library's setting is left as it was
