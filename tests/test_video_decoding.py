"""Decoding: only the chosen frames, at the model's size, decord with PyAV fallback, frame folders,
and every kind of bad input ending in a frame set with notes or a `VideoError` naming file and reason.

Fixtures are written by the tests (lossless H.264 whose frame k has grey level 8k, so the decoded
pixels say which frame was read)."""

import shutil

import cv2
import numpy as np
import pytest

from required_imports import import_required

decord = import_required("decord")  # fails where pyproject.toml requires decord
from decord._ffi.base import DECORDError  # noqa: E402

from mm15.data_builders.synthetic_video import truncated_with_index_first, write_video  # noqa: E402
from mm15.video import decoding  # noqa: E402
from mm15.video.decoding import DecodeSpec, VideoDecoder, VideoError  # noqa: E402
from mm15.video.sampling import FrameSampling  # noqa: E402

PAD = (122, 116, 104)


def _torchcodec_missing() -> str:
    try:
        from torchcodec.decoders import VideoDecoder as _  # noqa: F401
    except Exception as e:  # noqa: BLE001 - an OSError from FFmpeg's shared libraries is the usual one
        return f"torchcodec not importable ({type(e).__name__}); pip install -e '.[torchcodec]' and FFmpeg's shared libraries"
    return ""


NO_TORCHCODEC = _torchcodec_missing()
BACKENDS = ["decord", "pyav", pytest.param("torchcodec", marks=pytest.mark.skipif(bool(NO_TORCHCODEC), reason=NO_TORCHCODEC))]


def grey_ramp(n: int, h: int = 32, w: int = 48) -> np.ndarray:
    return np.stack([np.full((h, w, 3), 8 * k, np.uint8) for k in range(n)])  # (n, h, w, 3)


def frame_ids(frames: np.ndarray, w: int) -> list[int]:
    return [int(round(f[:, :w].mean() / 8)) for f in frames]


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    write_video(root / "ramp.mp4", grey_ramp(30), fps=10, lossless=True, gop=10)
    write_video(root / "short.mp4", grey_ramp(5), fps=10, lossless=True)
    half = np.zeros((32, 64, 3), np.uint8)
    half[:16] = 255  # stored top half white
    write_video(root / "rot90.mp4", np.stack([half] * 6), fps=10, rotation=90, lossless=True)
    times = [0, 0.05, 0.1, 0.15, 0.2, 1.0, 2.0, 3.0, 4.0, 5.0]
    write_video(root / "vfr.mp4", grey_ramp(10), times=times, lossless=True)
    rng = np.random.default_rng(0)
    write_video(root / "noise.mp4", rng.integers(0, 255, (40, 64, 64, 3), dtype=np.uint8), fps=10, gop=10)
    return root


def decoder(n=8, size=32, **spec) -> VideoDecoder:
    return VideoDecoder(DecodeSpec(**spec), FrameSampling(num_frames=n), size, PAD)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reads_the_chosen_frames_resized_and_padded(videos, backend):
    video = decoder(n=4, backends=[backend]).decode(videos / "ramp.mp4")
    assert video.frames.shape == (4, 32, 32, 3) and video.frames.dtype == np.uint8
    assert video.indices == [0, 10, 19, 29] and video.backend == backend
    assert frame_ids(video.frames[:, :21], 32) == [0, 10, 19, 29]  # 48x32 -> 32x21, aspect kept
    assert (video.frames[:, 22:] == PAD).all()  # padded at the bottom with the mean colour
    assert np.allclose(video.timestamps, [0.0, 1.0, 1.9, 2.9])


def test_decord_decodes_only_needed_frames_at_target_size(videos, monkeypatch):
    calls = {}
    real = decord.VideoReader

    class Spy(real):
        def __init__(self, uri, **kw):
            calls["size"] = (kw.get("width"), kw.get("height"))
            super().__init__(uri, **kw)

        def get_batch(self, indices):
            calls["indices"] = list(indices)
            return super().get_batch(indices)

    monkeypatch.setattr(decord, "VideoReader", Spy)
    decoder(n=6, size=24).decode(videos / "ramp.mp4")
    assert calls["size"] == (24, 16)
    assert len(calls["indices"]) == 6


@pytest.mark.parametrize("shape", [(4, 21, 32, 3), (3, 32, 16, 3), (2, 32, 32, 3), (1, 5, 7, 3)])
def test_padding_matches_the_core_rule(shape):
    from mm15.base.data.media import pad_to

    frames = np.random.default_rng(0).integers(0, 255, shape, dtype=np.uint8)
    side = max(shape[1:3])
    assert np.array_equal(decoding._pad_frames(frames, side, PAD), pad_to(frames, (side, side), PAD))


def test_decord_batches_reach_numpy_unchanged_with_or_without_dlpack(videos):
    batch = decord.VideoReader(str(videos / "ramp.mp4"), width=32, height=21).get_batch([0, 10])

    class NoDLPack:  # a decord build without `to_dlpack`
        def asnumpy(self):
            return batch.asnumpy()

    assert np.array_equal(decoding._host_array(batch), batch.asnumpy())
    assert np.array_equal(decoding._host_array(NoDLPack()), batch.asnumpy())


def test_stretch_fills_the_square(videos):
    video = decoder(n=2, resize="stretch").decode(videos / "ramp.mp4")
    assert frame_ids(video.frames, 32) == [0, 29]


def test_decord_failure_falls_back_to_pyav_and_is_counted(videos, monkeypatch):
    def broken(*args, **kwargs):
        raise DECORDError("cannot decode this one")

    monkeypatch.setitem(decoding.READERS, "decord", broken)
    dec = decoder(n=3)
    video = dec.decode(videos / "ramp.mp4")
    assert video.backend == "pyav" and frame_ids(video.frames[:, :21], 32) == [0, 14, 29]
    assert "DECORDError" in video.notes[0] and dec.counts == {"pyav": 1, "fallback": 1}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size", [32, 36])
def test_rotation_metadata_is_applied(videos, backend, size):
    """At r = 32 decord 0.6 refuses to resize the rotated stream (16 px wide) and the frames are
    resized after decoding; at r = 36 (18 px wide) decord resizes them itself."""
    video = decoder(n=2, size=size, backends=[backend]).decode(videos / "rot90.mp4")
    assert video.size == (32, 64)  # displayed portrait
    w = size // 2
    frame = video.frames[0].astype(int)  # w wide x r high, then padding on the right
    assert frame[:, : w // 3].mean() > 200 and frame[:, w - w // 3: w].mean() < 50  # stored top -> displayed left
    assert (video.frames[0][:, w + 1:] == PAD).all()
    resized_after = any("resized after" in n for n in video.notes)  # decord's retry only
    assert resized_after == (backend == "decord" and size == 32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_variable_frame_rate_uses_timestamps(videos, backend):
    video = decoder(n=4, backends=[backend]).decode(videos / "vfr.mp4")
    assert video.indices == [0, 6, 7, 9] and np.allclose(video.timestamps, [0, 2, 3, 5])
    assert any("variable frame rate" in n for n in video.notes)


def test_short_video_repeats_frames(videos):
    video = decoder(n=8).decode(videos / "short.mp4")
    assert len(video.frames) == 8 and set(frame_ids(video.frames[:, :21], 32)) == {0, 1, 2, 3, 4}
    assert any("repeated" in n for n in video.notes)
    assert len(decoder(n=8, backends=["decord"]).decode(videos / "short.mp4").frames) == 8


def test_short_video_take_all(videos):
    dec = VideoDecoder(DecodeSpec(), FrameSampling(num_frames=8, short_video="all"), 32, PAD)
    video = dec.decode(videos / "short.mp4")
    assert frame_ids(video.frames[:, :21], 32) == [0, 1, 2, 3, 4]


def test_clip_window(videos):
    video = decoder(n=3).decode(videos / "ramp.mp4", start=1.0, end=2.0)
    assert video.indices == [10, 14, 19]
    with pytest.raises(VideoError, match=r"ramp.mp4: clip window .* outside the video"):
        decoder().decode(videos / "ramp.mp4", start=5.0, end=9.0)


def test_clip_window_partly_outside_is_clamped(videos):
    video = decoder(n=2).decode(videos / "ramp.mp4", start=2.0, end=60.0)
    assert video.indices == [20, 29] and any("clamped" in n for n in video.notes)


@pytest.mark.parametrize("name,make,reason", [
    ("missing.mp4", None, "file not found"),
    ("empty.mp4", lambda p, src: p.write_bytes(b""), r"empty file \(0 bytes\)"),
    ("text.mp4", lambda p, src: p.write_text("not a video\n" * 50), "not a readable video"),
    ("cut.mp4", lambda p, src: p.write_bytes(src.read_bytes()[: src.stat().st_size // 2]), "not a readable video"),
    ("still.mp4", lambda p, src: cv2.imwrite(str(p.with_suffix(".png")), np.zeros((8, 8, 3), np.uint8))
     and shutil.move(p.with_suffix(".png"), p), "still image"),
])
def test_unusable_files_raise_naming_file_and_reason(videos, tmp_path, name, make, reason):
    path = tmp_path / name
    if make:
        make(path, videos / "noise.mp4")  # noise.mp4 has its index at the end: a cut loses it
    dec = decoder()
    with pytest.raises(VideoError, match=reason) as info:
        dec.decode(path)
    assert name in str(info.value) and dec.counts == {"failed": 1}


def test_truncated_file_with_index_first_is_read_up_to_the_damage(videos, tmp_path):
    src = tmp_path / "fast.mp4"
    write_video(src, grey_ramp(30), fps=10, lossless=True, gop=5)
    cut = tmp_path / "cut_front.mp4"
    truncated_with_index_first(src, cut)
    dec = decoder(n=4)
    video = dec.decode(cut)
    assert video.backend == "pyav" and dec.counts["fallback"] == 1
    assert any("declared frames present" in n for n in video.notes)
    assert max(video.indices) < 30


@pytest.fixture(scope="module")
def corrupt(tmp_path_factory):
    """A lossless clip (top rows: grey level 8k in frame k; below: noise, so packets are large) whose
    packets of frames 15 and 16 are zeroed, NAL length fields included: FFmpeg cannot decode 16 and
    19 (which refer to it); the rest decodes. Damage at fixed packets, found by demuxing."""
    import av

    root = tmp_path_factory.mktemp("corrupt")
    frames = np.random.default_rng(0).integers(0, 255, (30, 64, 64, 3), dtype=np.uint8)
    frames[:, :16] = (8 * np.arange(30, dtype=np.uint8))[:, None, None, None]
    write_video(root / "src.mp4", frames, fps=10, gop=10, lossless=True)
    with av.open(str(root / "src.mp4")) as container:
        packets = sorted((p.pts, p.pos) for p in container.demux(container.streams.video[0]) if p.pts is not None)
    data = bytearray((root / "src.mp4").read_bytes())
    start, stop = packets[15][1] + 10, packets[17][1] + 10
    data[start:stop] = bytes(stop - start)
    (root / "corrupt.mp4").write_bytes(bytes(data))
    return root / "corrupt.mp4"


def test_corrupt_frames_are_replaced_and_counted_below_the_cap(corrupt):
    with pytest.raises(VideoError, match="decord: VideoError: damaged packets among the chosen frames"):
        decoder(n=10, size=64, backends=["decord"]).decode(corrupt)  # decord cannot say which frames it lost
    dec = decoder(n=10, size=64)
    video = dec.decode(corrupt)
    assert video.backend == "pyav" and dec.counts == {"pyav": 1, "fallback": 1}
    assert "damaged packets" in video.notes[0]
    assert video.indices == [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]
    shown = [int(round(f[:16].mean() / 8)) for f in video.frames]
    assert shown[:5] == [0, 3, 6, 10, 13] and shown[7:] == [23, 26, 29]
    assert shown[5] in (13, 23) and shown[6] in (13, 23)  # 16 and 19 show the nearest decoded frame
    assert video.replaced == 2 and any("2 chosen frames undecodable" in n for n in video.notes)


def test_corrupt_video_past_max_replaced_fraction_is_refused(corrupt):
    dec = decoder(n=10, size=64, max_replaced_fraction=0.1)  # 2 of 10 replaced is over 10%
    with pytest.raises(VideoError, match=r"corrupt.mp4: not a readable video .*2 of 10 chosen frames undecodable, "
                                         r"over max_replaced_fraction 0.1") as info:
        dec.decode(corrupt)
    assert "decord: VideoError: damaged packets" in str(info.value)
    assert dec.counts == {"failed": 1}


def test_frame_folder_natural_order_and_rate(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    for k in range(12):  # frame_2 must come before frame_10
        cv2.imwrite(str(folder / f"frame_{k}.jpg"), np.full((60, 80, 3), 8 * k, np.uint8))
    (folder / "notes.txt").write_text("ignored")
    video = decoder(n=4, folder_fps=2.0).decode(folder)
    assert video.backend == "frames" and video.indices == [0, 4, 7, 11]
    assert frame_ids(video.frames[:, :24], 32) == [0, 4, 7, 11]
    assert np.allclose(video.timestamps, [0, 2.0, 3.5, 5.5])
    assert decoder(n=2, folder_fps=2.0).decode(folder, start=3.0, end=4.0).indices == [6, 7]


def test_corrupt_frame_in_a_folder_names_the_frame(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    cv2.imwrite(str(folder / "0001.jpg"), np.zeros((8, 8, 3), np.uint8))
    (folder / "0002.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(VideoError, match="0002.jpg: unreadable frame image"):
        decoder(n=2).decode(folder)


def test_empty_frame_folder_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(VideoError, match="holds no images"):
        decoder().decode(tmp_path / "empty")


def test_sample_table_times_equal_the_demuxed_timestamps(videos):
    """MP4 frame times from `stts` + `ctts` (no demuxing) equal decord's, B-frames and VFR included."""
    from mm15.video.probe import frame_times_mp4

    for name in ("ramp.mp4", "vfr.mp4", "noise.mp4", "rot90.mp4"):
        times, end = frame_times_mp4(str(videos / name))
        reader = decord.VideoReader(str(videos / name))
        stamps = reader.get_frame_timestamp(np.arange(len(reader)))
        assert np.allclose(times, stamps[:, 0] - stamps[0, 0], atol=1e-4), name
        assert end == pytest.approx(stamps[-1, 1] - stamps[0, 0], abs=1e-4)


@pytest.mark.skipif(bool(NO_TORCHCODEC), reason=NO_TORCHCODEC)
def test_torchcodec_backend_refuses_damage_and_pyav_takes_over(videos, tmp_path):
    cut = tmp_path / "cut.mp4"
    truncated_with_index_first(videos / "noise.mp4", cut, keep=0.5)
    dec = decoder(n=8, backends=["torchcodec", "pyav"])
    video = dec.decode(cut)
    assert video.backend == "pyav" and "torchcodec" in video.notes[0]


@pytest.mark.parametrize("suffix", ["mkv", "avi", "mov"])
def test_other_containers_decode_with_the_default_backends(videos, tmp_path, suffix):
    """decord reports no timestamps for AVI (FFmpeg's no-value, -9.2e18 s, for every frame): that
    backend refuses the file and PyAV reads it, instead of an empty clip window failing the video."""
    path = tmp_path / f"ramp.{suffix}"
    write_video(path, grey_ramp(30), fps=10, lossless=True, gop=10)
    video = decoder(n=4).decode(path)
    assert video.indices == [0, 10, 19, 29] and frame_ids(video.frames[:, :21], 32) == [0, 10, 19, 29]
    assert np.allclose(video.timestamps, [0.0, 1.0, 1.9, 2.9])
    assert video.backend == ("pyav" if suffix == "avi" else "decord")
    if suffix == "avi":
        assert "no frame timestamps" in video.notes[0]


@pytest.mark.skipif(bool(NO_TORCHCODEC), reason=NO_TORCHCODEC)
def test_torchcodec_retries_in_exact_mode_where_approximate_seeking_misses(videos, monkeypatch):
    """A header whose frame count is short makes torchcodec's approximate mode raise IndexError
    (seen on a VFR clip opened in that mode); the backend then opens the file in exact mode."""
    import torchcodec.decoders

    class ShortHeader(torchcodec.decoders.VideoDecoder):
        def __init__(self, *args, seek_mode="exact", **kwargs):
            super().__init__(*args, seek_mode=seek_mode, **kwargs)
            self.mode = seek_mode

        def get_frames_at(self, indices):
            if self.mode == "approximate":
                raise IndexError("Invalid frame index=29 for streamIndex=0; must be less than 20")
            return super().get_frames_at(indices)

    monkeypatch.setattr(torchcodec.decoders, "VideoDecoder", ShortHeader)
    video = decoder(n=4, backends=["torchcodec"]).decode(videos / "ramp.mp4")
    assert video.backend == "torchcodec" and frame_ids(video.frames[:, :21], 32) == [0, 10, 19, 29]
    assert any("approximate seek" in n and "exact seek used" in n for n in video.notes)
