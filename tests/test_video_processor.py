"""The video processor (frames as crops, placeholder counts from the core, timestamps), SlowFast
pooling, and bad videos ending in the quarantine while the run continues within the error budget."""

import json
import random

import pytest
import torch

from required_imports import import_required

import_required("decord")  # fails where pyproject.toml requires decord

from mm15.base.connector import ConnectorSpec, tokens_per_crop  # noqa: E402
from mm15.base.data.datamodule import DataErrorBudgetExceeded, MM15DataModule  # noqa: E402
from mm15.base.data.media import MediaLayout  # noqa: E402
from mm15.base.data.sample import Media, Sample, SampleError, Turn  # noqa: E402
from mm15.base.data.sources import write_jsonl, JsonlSource  # noqa: E402
from mm15.base.data.splitting import SplitSpec  # noqa: E402
from mm15.base.tiny import tiny_tokenizer  # noqa: E402
from mm15.data_builders.synthetic_video import make_clip, write_video  # noqa: E402
from mm15.video.pooling import SlowFastSpec, pool_batch, slowfast_pool, slowfast_token_count  # noqa: E402
from mm15.video.processor import VideoPreprocessSpec, VideoProcessor, VideoSpec  # noqa: E402
from mm15.video.sampling import FrameSampling  # noqa: E402


def tokenizer():
    tok = tiny_tokenizer()
    tok.add_tokens(["<image>"], special_tokens=True)
    return tok


def processor(per_crop=4, frames=8, size=32, **video) -> VideoProcessor:
    spec = VideoPreprocessSpec(split=SplitSpec(crop_size=size, mode="none"), max_length=8192,
                               video=VideoSpec(sampling=FrameSampling(frames), **video))
    return VideoProcessor(tokenizer(), spec, per_crop)


def video_sample(path, sample_id="v1", **media) -> Sample:
    return Sample(sample_id, [Turn("user", "<image>\nWhere does it go?"), Turn("assistant", "left")],
                  [Media(str(path), kind="video", **media)], task="direction", source="fixture.jsonl")


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("clips") / "clip.mp4"
    write_video(path, make_clip(random.Random(0), "left", size=64, num_frames=15), fps=8, lossless=True)
    return path


def test_frames_are_crops_with_core_placeholder_count(clip):
    proc = processor(per_crop=4, frames=8)
    item = proc(video_sample(clip))
    assert item["pixel_values"].shape == (8, 3, 32, 32) and item["pixel_values"].dtype == torch.uint8
    assert int((item["input_ids"] == proc.image_token_id).sum()) == 8 * 4
    layout = item["layouts"][0]
    assert layout.kind == "video" and layout.crops == 8 and layout.backend == "decord" and layout.grid is None
    assert layout.placeholders == [4] * 8 and layout.source_size == (64, 64) and layout.path == str(clip)
    assert len(layout.frame_indices) == len(layout.timestamps) == 8


def test_mm15_default_is_24_frames_of_144_tokens(clip):
    per_crop = tokens_per_crop(ConnectorSpec(num_tokens=144), 378, 14)  # the core's count function
    proc = processor(per_crop=per_crop, frames=24, size=56)
    item = proc(video_sample(clip))
    assert per_crop == 144 and int((item["input_ids"] == proc.image_token_id).sum()) == 3456
    assert item["pixel_values"].shape[0] == 24  # 15-frame clip: frames repeated to 24


def test_timestamps_are_off_by_default_and_precede_each_frame(clip):
    plain = processor(frames=4)
    decoded = plain.tokenizer.decode(plain(video_sample(clip))["input_ids"])
    assert "s<image>" not in decoded
    timed = processor(frames=4, timestamps=True)
    text = timed.tokenizer.decode(timed(video_sample(clip))["input_ids"])
    times = [text.split("s<image>")[k][-3:] for k in range(4)]  # frames 0, 5, 9, 14 of a 8 fps clip
    assert times == ["0.0", "0.6", "1.1", "1.8"] and text.count("s<image>") == 4


def test_clip_window_reaches_the_decoder(clip):
    item = processor(frames=2)(video_sample(clip, start=0.5, end=1.0))
    assert item["layouts"][0].frame_indices == [4, 7]


def test_bad_video_raises_sample_error_naming_record_and_file(tmp_path):
    with pytest.raises(SampleError, match=r"fixture.jsonl: record 'v9': .*missing.mp4: file not found"):
        processor()(video_sample(tmp_path / "missing.mp4", "v9"))


def test_slowfast_counts_match_pooled_features(clip):
    spec = SlowFastSpec(slow_frames=3, fast_grid=2)
    proc = processor(per_crop=16, frames=8, slowfast=spec)
    item = proc(video_sample(clip))
    slow, fast = slowfast_token_count(8, 16, spec)
    assert (slow, fast) == (3 * 16, 8 * 4)
    assert int((item["input_ids"] == proc.image_token_id).sum()) == slow + fast
    features = torch.randn(8, 16, 5)  # (N, M, D) connector output of the 8 frames
    assert slowfast_pool(features, spec).shape == (slow + fast, 5)
    assert item["layouts"][0].placeholders == [slow, fast] and item["layouts"][0].crops == 8
    image = MediaLayout("image", "x.png", crops=2, placeholders=[16, 16], source_size=(32, 32))
    pooled = pool_batch(torch.randn(8 + 2, 16, 5), [item["layouts"], [image]], spec)
    assert pooled.shape == (1, slow + fast + 2 * 16, 5)
    with pytest.raises(ValueError, match="the layouts describe 8 crops but the batch has 10"):
        pool_batch(torch.randn(8 + 2, 16, 5), [item["layouts"]], spec)


def test_slowfast_pathways_keep_slow_detail_and_pool_fast():
    features = torch.arange(4 * 16, dtype=torch.float32).view(4, 16, 1)  # frame k: values 16k..16k+15
    out = slowfast_pool(features, SlowFastSpec(slow_frames=2, slow_pool=(1, 2), fast_grid=1))
    slow, fast = out[:16, 0], out[16:, 0]
    assert slow[:8].tolist() == [1, 3, 5, 7, 9, 11, 13, 15]  # frame 0, 1x2 max pooling
    assert slow[8:].tolist() == [49 + 2 * k for k in range(8)]  # frame 3
    assert fast.tolist() == [7.5, 23.5, 39.5, 55.5]  # every frame averaged to one token


def test_timestamps_and_slowfast_are_exclusive():
    with pytest.raises(ValueError, match="timestamps"):
        VideoSpec(timestamps=True, slowfast=SlowFastSpec())


def test_bad_videos_go_to_quarantine_and_the_run_continues(clip, tmp_path):
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "text.mp4").write_text("hello")
    samples = [video_sample(clip, f"good{k}") for k in range(6)]
    samples += [video_sample(tmp_path / "empty.mp4", "empty"), video_sample(tmp_path / "text.mp4", "text"),
                video_sample(tmp_path / "gone.mp4", "gone"), video_sample(clip, "outside", start=30.0, end=40.0)]
    write_jsonl(samples, tmp_path / "mixed.jsonl")
    quarantine = tmp_path / "quarantine.jsonl"

    def run(budget):
        dm = MM15DataModule(train=[JsonlSource(str(tmp_path / "mixed.jsonl"), media_root="/")], batch_size=5,
                            max_error_fraction=budget, min_samples_for_budget=1, quarantine_file=str(quarantine))
        dm.processor = processor(frames=4)
        dm.setup("fit")
        return [dm.on_before_batch_transfer(b, 0)["size"] for b in dm.train_dataloader()]

    assert sum(run(budget=0.5)) == 6
    reasons = {r["record_id"]: r["reason"] for r in map(json.loads, quarantine.read_text().splitlines())}
    assert set(reasons) == {"empty", "text", "gone", "outside"}
    assert "empty file" in reasons["empty"] and "not a readable video" in reasons["text"]
    assert "file not found" in reasons["gone"] and "outside the video" in reasons["outside"]
    with pytest.raises(DataErrorBudgetExceeded):
        run(budget=0.1)
