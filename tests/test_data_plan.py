"""`mm15 plan` agrees with the processor: for every sample of the demo datasets (core shapes, video,
UI; and video with every frame and timestamps, so the frame count and times come from the
container), the planned tokens equal `len(input_ids)`. `mm15 prepare` and `mm15 plan` end to end
on a config with a missing image and an over-long sample: the quarantine names both, the plan
counts them, the JSON and the histogram are written."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import yaml

from mm15.base.data.plan import TokenCounter, main as plan_main
from mm15.base.data.prepare import load_run, main as prepare_main
from mm15.data_builders.synthetic_shapes import SyntheticShapesSource
from mm15.data_builders.synthetic_ui import SyntheticUISource
from mm15.data_builders.synthetic_video import SyntheticVideoSource

ROOT = Path(__file__).resolve().parents[1]


def _processor(config: str):
    return load_run(["--config", str(ROOT / "configs" / config), "--trainer.logger", "false"]).model.processor


def _agree(processor, source, root):
    from mm15.base.data.datamodule import MM15DataModule

    counter = TokenCounter(processor)
    samples, skips = MM15DataModule(media_root=root).read_source(source)
    assert samples and not skips
    for sample in samples:
        item = processor(sample)
        planned, media, crops = counter(sample)
        assert planned == len(item["input_ids"]), sample.id
        assert crops == len(item["pixel_values"]) and media == sum(x.num_placeholders for x in item["layouts"])
    return len(samples)


def test_plan_counts_equal_the_processor_on_the_demo_datasets(tmp_path):
    shapes = SyntheticShapesSource(str(tmp_path / "shapes"), "test", 40)
    shapes.prepare()
    assert _agree(_processor("base/demo.yaml"), shapes, None) == 40
    ui = SyntheticUISource(str(tmp_path / "ui"), "test", 12, tasks=["widget_classification", "ocr", "find_text",
                                                                    "find_widget"])
    ui.prepare()
    assert _agree(_processor("ui/demo.yaml"), ui, None) >= 12
    video = SyntheticVideoSource(str(tmp_path / "colours"), "test", 6, size=64, num_frames=15)
    video.prepare()
    processor = _processor("video/demo.yaml")
    assert _agree(processor, video, None) == 6
    every = processor.spec.video
    processor.spec = replace(processor.spec, video=replace(every, timestamps=True,
                                                           sampling=replace(every.sampling, num_frames=24,
                                                                            short_video="all")))
    assert _agree(processor, video, None) == 6  # 15 frames each, their times written before them


def test_prepare_and_plan_commands(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    SyntheticShapesSource("shapes", "train", 6).prepare()
    rows = [json.loads(line) for line in Path("shapes/train.jsonl").read_text().splitlines()]
    rows[1]["media"] = ["train/missing.png"]
    rows[2]["turns"][0]["text"] += " Please." * 80  # longer than max_length 512
    Path("data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = yaml.safe_load((ROOT / "configs/base/demo.yaml").read_text())
    config["trainer"].update(logger=False, default_root_dir="run", callbacks=[])
    jsonl = {"class_path": "mm15.base.data.sources.JsonlSource", "init_args": {"path": "data.jsonl", "media_root": "shapes"}}
    config["data"]["init_args"] = {"batch_size": 2, "global_batch_size": 4, "train": [
        {"class_path": "mm15.base.data.streams.ShardedSource", "init_args": {"shards": "shards", "source": jsonl}}]}
    Path("run.yaml").write_text("# mm15 prepare --config run.yaml\n" + yaml.safe_dump(config))
    prepare_main(["--config", "run.yaml"])
    assert "train: 4 records in 1 shards at shards; 2 skipped" in capsys.readouterr().out
    quarantined = [json.loads(line) for line in Path("run/quarantine.jsonl").read_text().splitlines()]
    assert [q["record_id"] for q in quarantined] == ["train-00001", "train-00002"]
    assert "image file not found" in quarantined[0]["reason"] and "exceeds max_length 512" in quarantined[1]["reason"]
    plan_main(["--config", "run.yaml"])
    out = capsys.readouterr().out
    assert "global batch 4: " in out and "1 steps per epoch of 4 samples" in out
    assert "micro-batch 2: padding is " in out and "packed into rows of up to 4096: " in out
    report = json.loads(Path("run/plan_train.json").read_text())
    (source,) = report["sources"]
    assert source["records"] == 4 and source["share"] == 1.0 and source["repetition"] == 1.0
    assert source["p50"] > 100 and source["over_max_length"] == 0 and report["steps"]["steps_per_epoch"] == 1
    assert Path("run/plan_train.png").stat().st_size > 1000
    # plan before prepare, on the origin with its problems: counted, not fatal
    config["data"]["init_args"]["train"] = [jsonl]
    Path("raw.yaml").write_text("# mm15 plan --config raw.yaml\n" + yaml.safe_dump(config))
    plan_main(["--config", "raw.yaml", "--out", "raw"])
    (source,) = json.loads(Path("raw/plan_train.json").read_text())["sources"]
    assert source["records"] == 6 and source["skip_reasons"] == {"image file not found": 1}
    assert source["over_max_length"] == 1 and source["max"] > 512


def test_padding_estimate_against_a_hand_count():
    from mm15.base.data.packing import PackSpec
    from mm15.base.data.plan import padding_estimate

    est = padding_estimate(np.array([100, 100, 100, 100]), 2, PackSpec(max_tokens=300))
    assert est["padding_padded"] == 0 and est["padding_packed"] == 0
    est = padding_estimate(np.array([10, 90, 10, 90, 10, 90, 10, 90]), 8, PackSpec(max_tokens=200), seed=1)
    assert est["padding_padded"] == 1 - 400 / 720  # 8 rows of 90
    assert est["padding_packed"] == 0  # 2 rows of exactly 200: 90+90+10+10 each
