"""Which frames of a video to decode: uniform in time (MM1.5), SlowFast-LLaVA segment mid-points,
an optional clip window, and what happens when a video has fewer frames than asked for.

Everything here works on the frame timestamps (presentation order, seconds), before any pixel is
decoded, so each backend decodes only the frames chosen here.

    spec = FrameSampling(num_frames=24)                       # MM1.5: 24 frames over the video
    pick = sample_frame_indices(timestamps, duration, spec)   # FrameSelection(indices=[0, 13, ...])
    pick = sample_frame_indices(ts, dur, spec, start=3.0, end=9.5)   # an annotated clip

Policies (all recorded in `FrameSelection.notes`, so a run can tell what happened):

* `uniform` picks the frame nearest to each of `num_frames` evenly spaced instants between the
  first and the last frame of the range. Uniform in time rather than in frame index, so a variable
  frame rate video is still covered evenly. For a constant frame rate this is
  `round(linspace(first, last, N))`.
* `slowfast` is SlowFast-LLaVA's rule on frame indices (arXiv 2407.15841):
  `seg = (T-1)/N; idx_i = (round(seg*i) + round(seg*(i+1))) // 2`.
* Fewer frames than `num_frames` in range: `repeat` (default) keeps exactly N frames by repeating
  the nearest ones, so every video costs the same number of tokens; `all` takes every frame once
  (fewer tokens for that sample).
* A clip window (`start`/`end` in seconds) is clamped to the video with a note when it sticks out;
  a window entirely outside the video raises `WindowError` (the sample is skipped with the reason).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np


class WindowError(ValueError):
    """The requested clip window does not overlap the video: no frame can be chosen."""


@dataclass
class FrameSampling:
    """How frames are chosen (part of the preprocessing spec saved with checkpoints).

    Args:
        num_frames: N, frames per video (MM1.5: 24).
        method: `uniform` (MM1.5) or `slowfast` (SlowFast-LLaVA segment mid-points).
        short_video: `repeat` (always N frames) or `all` (every frame once) when a video or clip
            has fewer than N frames.
    """

    num_frames: int = 24
    method: Literal["uniform", "slowfast"] = "uniform"
    short_video: Literal["repeat", "all"] = "repeat"


@dataclass
class FrameSelection:
    indices: list[int]  # frame indices into the video, presentation order, may repeat
    notes: list[str] = field(default_factory=list)


def segment_midpoints(count: int, n: int) -> np.ndarray:
    """SlowFast-LLaVA's indices of `n` frames among `count` (0-based offsets)."""
    seg = (count - 1) / n
    i = np.arange(n)
    return ((np.round(seg * i) + np.round(seg * (i + 1))) // 2).astype(np.int64)


def uniform_in_time(timestamps: np.ndarray, n: int) -> np.ndarray:
    """Offsets of the frames nearest to `n` evenly spaced instants from the first to the last frame."""
    targets = np.linspace(timestamps[0], timestamps[-1], n)
    right = np.clip(np.searchsorted(timestamps, targets), 1, len(timestamps) - 1)
    left = right - 1
    # Ties go to the earlier frame; the tolerance absorbs float32 timestamps from some decoders.
    nearer_left = (targets - timestamps[left]) <= (timestamps[right] - targets) + 1e-6
    return np.where(nearer_left, left, right).astype(np.int64) if len(timestamps) > 1 else np.zeros(n, np.int64)


def frames_in_window(timestamps: np.ndarray, duration: float, start: float | None,
                     end: float | None) -> tuple[int, int, list[str]]:
    """First and last frame index (inclusive) starting inside [start, end), with clamping notes."""
    notes: list[str] = []
    lo_t = 0.0 if start is None else float(start)
    hi_t = duration if end is None else float(end)
    if hi_t <= lo_t:
        raise WindowError(f"clip window [{lo_t:.2f}, {hi_t:.2f}] s is empty (end <= start)")
    if lo_t >= duration or hi_t <= 0.0:
        raise WindowError(f"clip window [{lo_t:.2f}, {hi_t:.2f}] s is outside the video (0.00-{duration:.2f} s)")
    if lo_t < 0.0 or hi_t > duration + 1e-6:
        notes.append(f"clip window [{lo_t:.2f}, {hi_t:.2f}] s clamped to the video (0.00-{duration:.2f} s)")
    inside = np.nonzero((timestamps >= lo_t) & (timestamps < hi_t))[0]
    if len(inside) == 0:  # a window shorter than one frame: the frame showing at its middle
        middle = (max(lo_t, 0.0) + min(hi_t, duration)) / 2
        k = int(max(np.searchsorted(timestamps, middle, side="right") - 1, 0))
        return k, k, notes + [f"clip window shorter than a frame: took frame {k}"]
    return int(inside[0]), int(inside[-1]), notes


def frame_rate_note(timestamps: np.ndarray) -> list[str]:
    """A note when frame gaps vary by more than half the typical gap (variable frame rate)."""
    gaps = np.diff(timestamps)
    if len(gaps) < 2:
        return []
    typical = float(np.median(gaps))
    if typical > 0 and float(gaps.max() - gaps.min()) > 0.5 * typical:
        return [f"variable frame rate (frame gaps {gaps.min():.3f}-{gaps.max():.3f} s)"]
    return []


def sample_frame_indices(timestamps: np.ndarray, duration: float, spec: FrameSampling,
                         start: float | None = None, end: float | None = None) -> FrameSelection:
    """Choose the frames to decode. `timestamps` (T,) frame start times in seconds, increasing."""
    timestamps = np.asarray(timestamps, dtype=np.float64)
    if len(timestamps) == 0:
        raise WindowError("the video has no frames")
    lo, hi, notes = frames_in_window(timestamps, duration, start, end)
    notes += frame_rate_note(timestamps[lo: hi + 1])
    count, n = hi - lo + 1, spec.num_frames
    if count < n and spec.short_video == "all":
        notes.append(f"{count} frames in range < {n} requested: took all {count}")
        return FrameSelection(list(range(lo, hi + 1)), notes)
    if count < n:
        notes.append(f"{count} frames in range < {n} requested: frames repeated to {n}")
    if spec.method == "slowfast" and count >= n:
        offsets = segment_midpoints(count, n)
    else:
        offsets = uniform_in_time(timestamps[lo: hi + 1], n)
    return FrameSelection([lo + int(k) for k in offsets], notes)
