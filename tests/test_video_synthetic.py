"""The synthetic video tasks: real video files read back through the sampler, answers that the
middle frame does not hold (first colour) or that no single frame holds (direction)."""

import random

import numpy as np
import pytest

from required_imports import import_required

import_required("decord")  # fails where pyproject.toml requires decord

from mm15.base.data.sample import IMAGE_TOKEN  # noqa: E402
from mm15.data_builders.synthetic_shapes import COLOURS  # noqa: E402
from mm15.data_builders.synthetic_video import (  # noqa: E402
    DIRECTIONS, PALETTE, SyntheticVideoSource, make_clip, make_task_clip, write_video)
from mm15.video.decoding import DecodeSpec, VideoDecoder  # noqa: E402
from mm15.video.sampling import FrameSampling  # noqa: E402


@pytest.mark.parametrize("codec", ["h264", "mp4v"])
def test_clips_are_video_files_read_back_through_the_sampler(tmp_path, codec):
    source = SyntheticVideoSource(str(tmp_path), split="val", num_samples=4, size=32, num_frames=10, codec=codec)
    samples = list(source.read())
    assert [s.answer in PALETTE for s in samples] == [True] * 4 and samples[0].task == "majority_colour"
    assert samples[0].meta == {"choices": ["red", "green", "blue", "yellow"], "num_choices": 4}
    assert samples[0].turns[0].text.endswith(IMAGE_TOKEN) and samples[0].media[0].kind == "video"
    decoder = VideoDecoder(DecodeSpec(), FrameSampling(num_frames=5), 32)
    video = decoder.decode(str(tmp_path / samples[0].media[0].path))
    assert video.frames.shape == (5, 32, 32, 3) and video.indices == [0, 2, 4, 7, 9] and video.backend == "decord"
    assert (tmp_path / "val" / "00000.mp4").read_bytes()[4:8] == b"ftyp"


def test_generation_is_reused_only_with_the_same_parameters(tmp_path):
    SyntheticVideoSource(str(tmp_path), split="val", num_samples=2, size=32, num_frames=10).prepare()
    first = (tmp_path / "val.jsonl").stat().st_mtime_ns
    SyntheticVideoSource(str(tmp_path), split="val", num_samples=2, size=32, num_frames=10).prepare()
    assert (tmp_path / "val.jsonl").stat().st_mtime_ns == first
    assert len(list(SyntheticVideoSource(str(tmp_path), split="val", num_samples=3, size=32, num_frames=10).read())) == 3


@pytest.mark.parametrize("position", ["first", "middle", "last"])
def test_majority_colour_no_single_frame_reaches_twice_chance(position):
    """Whichever frame a one-frame model sees, it shows the answer 2 times in 5 (chance is 1/4)."""
    rng, hits = random.Random(0), 0
    for _ in range(400):
        clip, answer, choices = make_task_clip("majority_colour", rng, 32, 15, 0.0)
        k = {"first": 0, "middle": 7, "last": 14}[position]
        hits += dominant_colour(clip[k]) == answer
        assert len(choices) == 4
    assert 0.3 < hits / 400 < 0.5


def test_majority_colour_every_segment_is_sampled_once_with_five_frames(tmp_path):
    source = SyntheticVideoSource(str(tmp_path), split="val", num_samples=6, size=32, num_frames=15)
    decoder = VideoDecoder(DecodeSpec(), FrameSampling(num_frames=5), 32)
    for sample in source.read():
        frames = decoder.decode(str(tmp_path / sample.media[0].path)).frames
        colours = [dominant_colour(f) for f in frames]
        assert max(set(colours), key=colours.count) == sample.answer and colours.count(sample.answer) == 2


def dominant_colour(frame: np.ndarray) -> str:
    """The palette colour closest to the most saturated pixels of an (r, r, 3) frame."""
    pixels = frame.reshape(-1, 3).astype(int)
    vivid = pixels[np.argsort(pixels.max(1) - pixels.min(1))[-20:]].mean(0)
    return min(PALETTE, key=lambda c: np.abs(np.asarray(COLOURS[c]) - vivid).sum())


def test_the_middle_frame_is_the_same_for_every_direction(tmp_path):
    """So a model seeing only the middle frame is at chance (1/4) by construction."""
    decoder = VideoDecoder(DecodeSpec(), FrameSampling(num_frames=1, method="slowfast"), 32)
    for seed in range(3):
        middles, firsts = [], []
        for direction in DIRECTIONS:
            path = tmp_path / f"{seed}_{direction}.mp4"
            write_video(path, make_clip(random.Random(seed), direction, size=32, num_frames=9), lossless=True)
            video = decoder.decode(str(path))
            assert video.indices == [4]
            middles.append(video.frames[0])
            firsts.append(VideoDecoder(DecodeSpec(), FrameSampling(2), 32).decode(str(path)).frames)
        assert all(np.array_equal(m, middles[0]) for m in middles[1:])
        assert not all(np.array_equal(f, firsts[0]) for f in firsts[1:])  # two frames do differ


def test_any_single_frame_position_is_uniform_whatever_the_direction():
    """Wrapping motion from a uniform middle position: first frames do not reveal the direction."""
    centres = {d: [] for d in DIRECTIONS}
    for seed in range(400):
        direction = list(DIRECTIONS)[seed % 4]
        first = make_clip(random.Random(seed), direction, size=32, num_frames=9)[0].astype(int)
        mask = np.abs(first - first[0, 0]).sum(-1) > 0  # shape pixels (background is uniform)
        centres[direction].append(np.argwhere(mask).mean(0) if mask.any() else np.array([16.0, 16.0]))
    means = np.array([np.mean(c, axis=0) for c in centres.values()])  # (4, 2) mean (row, col) per direction
    assert np.abs(means - 16).max() < 3.0
