"""Frame index sampling: uniform in time, SlowFast mid-points, clip windows, short videos, VFR."""

import numpy as np
import pytest

from mm15.video.sampling import FrameSampling, WindowError, sample_frame_indices, segment_midpoints


def cfr(n: int, fps: float = 10.0) -> tuple[np.ndarray, float]:
    return np.arange(n) / fps, n / fps


def test_uniform_constant_rate_is_rounded_linspace():
    times, duration = cfr(100)
    pick = sample_frame_indices(times, duration, FrameSampling(num_frames=24))
    assert pick.indices == np.round(np.linspace(0, 99, 24)).astype(int).tolist()
    assert pick.notes == []


def test_slowfast_midpoints_match_the_published_rule():
    # seg = 9/4 = 2.25: (0+2)//2, (2+4)//2, (4+7)//2, (7+9)//2 (round half to even, as np.round)
    assert segment_midpoints(10, 4).tolist() == [1, 3, 5, 8]
    times, duration = cfr(10)
    pick = sample_frame_indices(times, duration, FrameSampling(num_frames=4, method="slowfast"))
    assert pick.indices == [1, 3, 5, 8]


def test_single_slowfast_frame_is_the_middle_one():
    times, duration = cfr(15)
    assert sample_frame_indices(times, duration, FrameSampling(1, "slowfast")).indices == [7]


def test_window_selects_frames_inside_it():
    times, duration = cfr(100)  # 10 s
    pick = sample_frame_indices(times, duration, FrameSampling(num_frames=5), start=2.0, end=4.0)
    assert pick.indices[0] == 20 and pick.indices[-1] == 39
    assert all(20 <= i <= 39 for i in pick.indices)


def test_window_partly_outside_is_clamped_with_a_note():
    times, duration = cfr(100)
    pick = sample_frame_indices(times, duration, FrameSampling(num_frames=4), start=8.0, end=30.0)
    assert pick.indices[0] == 80 and pick.indices[-1] == 99
    assert any("clamped" in n for n in pick.notes)


@pytest.mark.parametrize("start,end,words", [(12.0, 15.0, "outside"), (-5.0, -1.0, "outside"), (4.0, 3.0, "empty")])
def test_window_outside_or_empty_raises(start, end, words):
    times, duration = cfr(100)
    with pytest.raises(WindowError, match=words):
        sample_frame_indices(times, duration, FrameSampling(), start=start, end=end)


def test_window_shorter_than_a_frame_takes_the_frame_showing():
    times, duration = cfr(10, fps=1.0)
    pick = sample_frame_indices(times, duration, FrameSampling(num_frames=3), start=4.2, end=4.4)
    assert set(pick.indices) == {4}
    assert any("shorter than a frame" in n for n in pick.notes)


def test_short_video_repeat_keeps_n_frames_covering_all():
    times, duration = cfr(5)
    pick = sample_frame_indices(times, duration, FrameSampling(num_frames=12, short_video="repeat"))
    assert len(pick.indices) == 12 and sorted(pick.indices) == pick.indices
    assert set(pick.indices) == set(range(5))
    assert any("repeated" in n for n in pick.notes)


def test_short_video_all_takes_each_frame_once():
    times, duration = cfr(5)
    pick = sample_frame_indices(times, duration, FrameSampling(num_frames=12, short_video="all"))
    assert pick.indices == [0, 1, 2, 3, 4]


def test_variable_frame_rate_is_sampled_evenly_in_time():
    # 40 frames in the first second, then one per second up to 10 s
    times = np.concatenate([np.arange(40) / 40, np.arange(1, 11).astype(float)])
    pick = sample_frame_indices(times, 11.0, FrameSampling(num_frames=6))
    chosen = times[pick.indices]
    assert np.allclose(chosen, [0, 2, 4, 6, 8, 10])  # index-uniform would take ~4 from the first second
    assert any("variable frame rate" in n for n in pick.notes)
