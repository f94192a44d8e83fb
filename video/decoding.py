"""Video files and frame folders -> the chosen frames as square uint8 crops, with a fallback decoder.

Backends, tried in order (`DecodeSpec.backends`):

* `decord`: opens the file at the size the model needs (FFmpeg resizes while decoding) and decodes
  only the chosen frames (`VideoReader.get_batch` seeks to the nearest keyframe before each one).
  decord ships x86-64 Linux wheels only and raises `DECORDError` (not a `RuntimeError`) or
  `RuntimeError` depending on where it fails; any failure moves on to the next backend. The
  maintained fork decord2 installs under the same module name and can replace decord 0.6 in an
  environment (it cannot sit next to it, so it is no dependency); with decord2 3.4.0 this backend
  refuses the tests' lossless clips (a buffer size check), which then go to PyAV.
* `pyav`: demuxes packet timestamps (no decoding), then seeks and decodes up to each chosen frame,
  converting at the target size in swscale. Reads truncated files up to the damage. Measured by
  `benchmarks/video_sampler.py` at 0.9-1.3x decord's speed (faster with frequent keyframes and on
  rotated streams, slower with sparse ones); decord stays first because the shipped config and the
  recorded results name it, and a switch changes which library's resize produces the frames.
* `torchcodec`: PyTorch's decoder (optional: `pip install -e ".[torchcodec]"`, FFmpeg's shared
  libraries); timestamps from the MP4 sample table (`frame_times_mp4`) or PyAV's demuxer, the chosen
  frames by index, resized in FFmpeg, rotation applied by torchcodec. Measured as fast as decord.
* a directory is a video stored as frame images (ShareGPTVideo ships frames); they are sorted in
  natural order and read at `DecodeSpec.folder_fps` frames per second; JPEGs are decoded at reduced
  scale (PIL draft mode) when much larger than needed.

Every decoded video says which backend served it and what happened on the way
(`DecodedVideo.backend`, `.notes`); `VideoDecoder.counts` counts backends, fallbacks and failures.
Frames are fitted into the r x r crop by the core's rule (`mm15.base.data.media`: the backends
resize while decoding to `fit_size`, the decoder pads as `pad_to` does), set by `DecodeSpec.resize`.
A file no backend can read raises `VideoError` naming the file and each backend's reason.

Rotation: decord applies an MP4 display matrix itself, and resizes rotated streams correctly, except
at some target widths where its buffer size check refuses the batch (seen with decord 0.6.0 at widths
8, 12, 16, 24 and 48 of a 360x640 portrait stream: `DECORDError: ... The size must exactly match`);
those are decoded again at native size and resized after. PyAV frames are rotated with `np.rot90`.

    decoder = VideoDecoder(DecodeSpec(), FrameSampling(num_frames=24), size=378)
    video = decoder.decode("clip.mp4", start=2.0, end=9.0)    # video.frames (24, 378, 378, 3) uint8
"""

from __future__ import annotations

import os
import re
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from mm15.base.data.media import MEAN_COLOR, ResizeMode, fit_size, resize_pixels

from .probe import VideoInfo, frame_times_mp4, probe_video
from .sampling import FrameSampling, WindowError, sample_frame_indices

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
Backend = Literal["decord", "pyav", "torchcodec"]


class VideoError(ValueError):
    """A video that cannot be used; the message names the file and the reason."""


@dataclass
class DecodeSpec:
    """How videos are decoded (part of the preprocessing spec saved with checkpoints).

    Args:
        backends: decoders tried in order for video files (`decord`, `pyav`, `torchcodec`).
        resize: `pad` (resize keeping aspect, pad right/bottom with the encoder's mean colour, as the
            core does for a one-crop image) or `stretch` (resize to r x r) [choice: pad]; the same
            setting as the image splitting's `SplitSpec.resize`.
        folder_fps: frame rate assumed for videos stored as frame folders (for clip windows and
            timestamps).
        threads: decoder threads per video (1: parallelism comes from the loader workers; 0: FFmpeg
            decides).
        max_replaced_fraction: chosen frames a backend could not decode are replaced by the nearest
            decoded one (counted in `DecodedVideo.replaced`); past this fraction of the chosen
            frames the backend refuses the video (`VideoError`; the next backend is tried).
    """

    backends: list[Backend] = field(default_factory=lambda: ["decord", "pyav"])
    resize: ResizeMode = "pad"
    folder_fps: float = 1.0
    threads: int = 1
    max_replaced_fraction: float = 0.25


@dataclass
class DecodedVideo:
    frames: np.ndarray  # (N, r, r, 3) uint8
    indices: list[int]  # frame index of each row (repeats allowed)
    timestamps: list[float]  # seconds from the start of the video, per row
    backend: str  # decord | pyav | frames
    notes: list[str] = field(default_factory=list)
    size: tuple[int, int] = (0, 0)  # displayed (width, height) of the source
    replaced: int = 0  # chosen frames that could not be decoded and show the nearest decoded one


# ----- decord ------------------------------------------------------------------------------------
class ProbeError(RuntimeError):
    """The container header could not be read (before any decoder was asked)."""


def _probe(path: str) -> VideoInfo:
    try:
        return probe_video(path)
    except Exception as e:  # noqa: BLE001 - whatever FFmpeg says, the reason is kept
        raise ProbeError(f"unreadable container ({type(e).__name__}: {_first_line(e)})") from None


def read_decord(path: str, sampling: FrameSampling, r: int, spec: DecodeSpec,
                start: float | None, end: float | None) -> DecodedVideo:
    import decord
    from decord._ffi.base import DECORDError

    info = _probe(path)
    if info.rotation and info.container != "mp4":
        raise RuntimeError(f"rotation {info.rotation} in a {info.container} container (decord's handling unverified)")
    size = fit_size(info.width, info.height, (r, r), spec.resize)
    reader = decord.VideoReader(path, width=size[0], height=size[1], num_threads=spec.threads)
    times = reader.get_frame_timestamp(np.arange(len(reader)))  # (T, 2) start, end seconds
    if (times < 0).any() or not np.isfinite(times).all() or times[-1, 1] <= 0:
        # e.g. AVI: decord 0.6 reports FFmpeg's "no timestamp" value (-9.2e18 s) for every frame
        raise RuntimeError(f"decord reports no frame timestamps for this {info.container} file")
    pick = sample_frame_indices(times[:, 0], float(times[-1, 1]), sampling, start, end)
    notes = list(pick.notes)
    try:
        frames = _decord_frames(reader, pick.indices)  # (N, h, w, 3)
    except DECORDError as e:
        if not info.rotation or "size must exactly match" not in str(e):
            raise
        # see the module docstring: decord's own resize of a rotated stream fails at some sizes
        notes.append(f"rotation {info.rotation}: decord cannot resize this stream to {size[0]}x{size[1]}; "
                     "decoded at native size, resized after")
        reader = decord.VideoReader(path, num_threads=spec.threads)
        frames = resize_pixels(_decord_frames(reader, pick.indices), size)
    if frames.shape[1:] != (size[1], size[0], 3):
        raise RuntimeError(f"decord returned frames of shape {frames.shape[1:]}, expected {(size[1], size[0], 3)}")
    return DecodedVideo(frames, pick.indices, times[pick.indices, 0].tolist(), "decord", notes, (info.width, info.height))


def _decord_frames(reader, indices: list[int]) -> np.ndarray:
    """The frames at `indices`. decord 0.6 fails the whole batch on a packet it cannot decode
    (`DECORDError`) without saying which frames it lost, and retrying frame by frame is not
    reliable (its decoder thread reports the error on later calls, fresh readers included; seen
    with 0.6.0). So damage refuses the decord backend, and the next one (PyAV, which decodes frame
    by frame and knows what it lost) counts the replaced frames. decord reports no timestamp per
    returned frame, so a frame FFmpeg silently skipped past cannot be seen here."""
    from decord._ffi.base import DECORDError

    try:
        return _host_array(reader.get_batch(indices))
    except DECORDError as e:
        # damaged data: the packet error itself, or, when decord's decoder thread stopped on it
        # before the next frame was pushed (a race, seen under load), the thread's `run_` check
        message = str(e).lower()
        if "packet" not in message and "run_.load()" not in message:  # e.g. a buffer size check
            raise
        raise VideoError(f"damaged packets among the chosen frames ({_first_line(e)}); decord cannot tell "
                         "which frames are lost") from None


def _host_array(batch) -> np.ndarray:
    """A decord `NDArray` as numpy without copying: through DLPack into torch (a dependency
    already), whose CPU tensors share memory with numpy. `asnumpy()` copies the whole batch, and
    the padding to r x r copies it once more anyway. Falls back to `asnumpy()` where DLPack is
    missing."""
    try:
        import torch.utils.dlpack

        return torch.utils.dlpack.from_dlpack(batch.to_dlpack()).numpy()
    except (AttributeError, ImportError, RuntimeError, TypeError):
        return batch.asnumpy()


def _pad_frames(frames: np.ndarray, r: int, color: tuple[int, int, int]) -> np.ndarray:
    """(N, h, w, 3) uint8 -> (N, r, r, 3), frames top-left and margins in `color`: the result of
    `pad_to`, written as flat rows of w*3 and r*3 bytes. numpy broadcasting a 3-value colour loops
    over 3-byte runs, which made padding a 24-frame batch cost about a tenth of its decoding."""
    n, h, w = frames.shape[:3]
    if (h, w) == (r, r):
        return frames
    if h > r or w > r:
        raise ValueError(f"pixels of {w}x{h} do not fit a {r}x{r} canvas")
    out = np.empty((n, r, r * 3), np.uint8)
    row = np.tile(np.asarray(color, np.uint8), r)  # one padded row, (r*3,)
    out[:, :h, : w * 3] = frames.reshape(n, h, w * 3)
    out[:, :h, w * 3:] = row[w * 3:]
    out[:, h:] = row
    return out.reshape(n, r, r, 3)


def _check_replaced(replaced: int, chosen: int, spec: DecodeSpec) -> None:
    if replaced > spec.max_replaced_fraction * chosen:
        raise VideoError(f"{replaced} of {chosen} chosen frames undecodable, over max_replaced_fraction "
                         f"{spec.max_replaced_fraction:g}")


# ----- PyAV --------------------------------------------------------------------------------------
def _packet_times(container, stream) -> tuple[np.ndarray, np.ndarray, float, list[str]]:
    """Presentation timestamps (pts units, sorted) and keyframe pts, by demuxing without decoding."""
    import av

    pts, keys, notes, last_duration = [], [], [], 0
    try:
        for packet in container.demux(stream):
            if packet.pts is None:
                continue
            pts.append(packet.pts)
            last_duration = packet.duration or last_duration
            if packet.is_keyframe:
                keys.append(packet.pts)
    except av.FFmpegError as e:
        notes.append(f"demuxing stopped after {len(pts)} packets ({type(e).__name__}): file truncated or damaged")
    if stream.frames and len(pts) < stream.frames:
        notes.append(f"only {len(pts)} of {stream.frames} declared frames present")
    return np.sort(np.asarray(pts, np.int64)), np.sort(np.asarray(keys, np.int64)), float(last_duration), notes


def _stream_times(container, stream) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, list[str]]:
    """`_packet_times` plus each frame's start in seconds from the first and the end of the last
    (its packet duration, else the median frame gap)."""
    pts, keys, step, notes = _packet_times(container, stream)
    if len(pts) == 0:
        raise ValueError("no video frames")
    times = (pts - pts[0]) * float(stream.time_base)
    step = step * float(stream.time_base) or (float(np.median(np.diff(times))) if len(times) > 1 else 0.04)
    return pts, keys, times, float(times[-1] + step), notes


def displayed_size(frame) -> tuple[int, int]:
    """(width, height) of a PyAV frame once its rotation is applied."""
    rot = int(frame.rotation) % 360
    return (frame.height, frame.width) if rot in (90, 270) else (frame.width, frame.height)


def _frame_array(frame, r: int, resize: ResizeMode) -> np.ndarray:
    """One PyAV frame -> (h, w, 3) uint8 at the target size, upright."""
    rot = int(frame.rotation) % 360
    w, h = displayed_size(frame)
    tw, th = fit_size(w, h, (r, r), resize)
    pre = (th, tw) if rot in (90, 270) else (tw, th)
    array = frame.reformat(width=pre[0], height=pre[1], format="rgb24").to_ndarray()
    return np.ascontiguousarray(np.rot90(array, k=rot // 90)) if rot else array


def _decode_targets(container, stream, targets: np.ndarray, keys: np.ndarray, r: int,
                    resize: ResizeMode) -> tuple[dict[int, np.ndarray], tuple[int, int]]:
    """pts -> frame for each target pts, and the displayed source size; seeks only when a keyframe lies between here and the target.
    Damaged data loses the target being decoded; the next one starts again from a fresh seek."""
    import av

    out: dict[int, np.ndarray] = {}
    frames, position, size = None, None, (0, 0)
    for target in targets:
        key = keys[max(np.searchsorted(keys, target, side="right") - 1, 0)] if len(keys) else target
        try:
            if frames is None or position is None or key > position:
                container.seek(int(key), stream=stream, backward=True)
                frames = container.decode(stream)
            for frame in frames:
                position = frame.pts
                if frame.pts is not None and frame.pts >= target:
                    out[int(target)], size = _frame_array(frame, r, resize), displayed_size(frame)
                    break
        except av.FFmpegError:
            frames = None
    return out, size


def read_pyav(path: str, sampling: FrameSampling, r: int, spec: DecodeSpec,
              start: float | None, end: float | None) -> DecodedVideo:
    import av

    with av.open(path) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        if container.format.name.endswith("_pipe") or container.format.name == "image2":
            raise ValueError(f"a still image ({container.format.name}), not a video")
        stream = container.streams.video[0]
        stream.thread_count = spec.threads
        pts, keys, times, stream_end, notes = _stream_times(container, stream)
        pick = sample_frame_indices(times, stream_end, sampling, start, end)
        wanted = np.unique(pts[pick.indices])
        decoded, size = _decode_targets(container, stream, wanted, keys, r, spec.resize)
    _check_replaced(len(wanted) - len(decoded), len(wanted), spec)
    frames, replaced = _fill_missing([int(pts[i]) for i in pick.indices], decoded, notes)
    return DecodedVideo(frames, pick.indices, times[pick.indices].tolist(), "pyav", pick.notes + notes, size, replaced)


def _fill_missing(order: list[int], decoded: dict[int, np.ndarray], notes: list[str]) -> tuple[np.ndarray, int]:
    """Stack frames in `order` (frame indices or pts); one that failed to decode takes the nearest
    decoded frame. Returns the frames and how many distinct chosen frames were replaced."""
    if not decoded:
        raise VideoError("none of the chosen frames could be decoded")
    have = np.asarray(sorted(decoded))
    missing = {p for p in order if p not in decoded}
    if missing:
        notes.append(f"{len(missing)} chosen frames undecodable: replaced by the nearest decoded frame")
    nearest = {p: int(have[np.abs(have - p).argmin()]) for p in missing}
    return np.stack([decoded[nearest.get(p, p)] for p in order]), len(missing)


# ----- torchcodec -------------------------------------------------------------------------------
def _frame_times(path: str) -> tuple[np.ndarray, float, list[str]]:
    """Start time of every frame (seconds from the first, sorted) and the end of the last: MP4/MOV
    from the sample table, other containers by demuxing packet timestamps with PyAV."""
    try:
        table = frame_times_mp4(path)
    except (struct.error, IndexError, KeyError, ValueError, OSError):
        table = None  # a damaged MP4 header: let FFmpeg judge it
    if table is not None:
        return table[0], table[1], []
    import av

    with av.open(path) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        _, _, times, stream_end, notes = _stream_times(container, container.streams.video[0])
        return times, stream_end, notes


def read_torchcodec(path: str, sampling: FrameSampling, r: int, spec: DecodeSpec,
                    start: float | None, end: float | None) -> DecodedVideo:
    """torchcodec (PyTorch's decoder on FFmpeg's shared libraries): the chosen frames by index,
    resized in FFmpeg and rotated by torchcodec. A constant-rate stream is opened in torchcodec's
    approximate seek mode (frame index -> time from the frame rate, no scan of the file); a
    variable-rate one in its exact mode, which scans the packets once. The timestamps it returns are
    checked against the chosen frames' (from the sample table); where the approximate mode misses
    them (a header whose rate or frame count is off), the exact one is tried, with a note."""
    from torchcodec.decoders import VideoDecoder as TorchcodecDecoder
    from torchcodec.transforms import Resize

    info = _probe(path)
    size = fit_size(info.width, info.height, (r, r), spec.resize)
    times, stream_end, notes = _frame_times(path)
    pick = sample_frame_indices(times, stream_end, sampling, start, end)
    gaps = np.diff(np.append(times, stream_end))
    constant = len(gaps) > 0 and float(gaps.max() - gaps.min()) <= 0.01 * float(np.median(gaps))
    chosen = np.asarray(pick.indices)
    failures = []
    for mode in ("approximate", "exact") if constant else ("exact",):
        decoder = TorchcodecDecoder(path, dimension_order="NHWC", num_ffmpeg_threads=spec.threads, seek_mode=mode,
                                    transforms=[Resize((size[1], size[0]))])
        try:
            batch = decoder.get_frames_at(pick.indices)
        except IndexError as e:  # approximate mode: the header counts fewer frames than the file holds
            failures.append(f"{mode} seek: {_first_line(e)}")
            continue
        got = batch.pts_seconds.numpy() - (decoder.metadata.begin_stream_seconds or 0.0)
        if np.allclose(got, times[chosen], atol=0.25 * float(gaps.min())):
            break
        worst = int(np.abs(got - times[chosen]).argmax())
        failures.append(f"{mode} seek returned the frame at {got[worst]:.3f} s for frame {chosen[worst]} "
                        f"at {times[chosen][worst]:.3f} s")
    else:
        raise RuntimeError("torchcodec: " + "; ".join(failures))
    if failures:
        notes.append(f"torchcodec {failures[0]}: exact seek used")
    frames = batch.data.numpy()
    if frames.shape[1:] != (size[1], size[0], 3):
        raise RuntimeError(f"torchcodec returned frames of shape {frames.shape[1:]}, expected {(size[1], size[0], 3)}")
    return DecodedVideo(frames, pick.indices, times[chosen].tolist(), "torchcodec", pick.notes + notes,
                        (info.width, info.height))


# ----- frame folders -----------------------------------------------------------------------------
def _natural_key(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _load_frame(path: Path, r: int, resize: ResizeMode) -> np.ndarray:
    try:
        with Image.open(path) as im:
            size = fit_size(im.width, im.height, (r, r), resize)
            im.draft("RGB", size)  # JPEG: decode at 1/2, 1/4 or 1/8 scale when that still covers `size`
            return np.asarray(im.convert("RGB").resize(size, Image.BILINEAR))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:  # UnidentifiedImageError is an OSError
        raise VideoError(f"{path}: unreadable frame image ({type(e).__name__}: {e})") from None


def read_frame_folder(path: str, sampling: FrameSampling, r: int, spec: DecodeSpec,
                      start: float | None, end: float | None) -> DecodedVideo:
    fps = spec.folder_fps
    files = sorted((p for p in Path(path).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), key=lambda p: _natural_key(p.name))
    if not files:
        raise VideoError(f"{path}: frame folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
    times = np.arange(len(files)) / fps
    pick = sample_frame_indices(times, len(files) / fps, sampling, start, end)
    loaded = {i: _load_frame(files[i], r, spec.resize) for i in sorted(set(pick.indices))}
    shapes = {a.shape for a in loaded.values()}
    if len(shapes) > 1:  # frames of different sizes: bring them to the first one's
        first = loaded[pick.indices[0]].shape[1::-1]
        loaded = {i: resize_pixels(a, first) for i, a in loaded.items()}
    frames = np.stack([loaded[i] for i in pick.indices])
    with Image.open(files[0]) as im:
        size = im.size
    return DecodedVideo(frames, pick.indices, times[pick.indices].tolist(), "frames", pick.notes, size)


READERS = {"decord": read_decord, "pyav": read_pyav, "torchcodec": read_torchcodec}


# ----- front door ----------------------------------------------------------------------------------
class VideoDecoder:
    """Decode the chosen frames of one video, falling back across backends; counts what served.

    Args:
        spec: backends, resize rule and frame-folder rate.
        sampling: which frames (see `mm15.video.sampling`).
        size: r, the side of the square crop each frame becomes.
        pad_color: fill for `resize="pad"` (the encoder's mean colour, 0..255).
    """

    def __init__(self, spec: DecodeSpec, sampling: FrameSampling, size: int,
                 pad_color: tuple[int, int, int] = MEAN_COLOR):
        self.spec, self.sampling, self.size, self.pad_color = spec, sampling, size, tuple(pad_color)
        self.counts: Counter[str] = Counter()

    def decode(self, path: str, start: float | None = None, end: float | None = None) -> DecodedVideo:
        """Raises `VideoError` naming the file and the reason when no backend can use it."""
        try:
            video = self._decode(str(path), start, end)
        except (VideoError, WindowError) as e:
            self.counts["failed"] += 1
            raise VideoError(str(e) if isinstance(e, VideoError) else f"{path}: {e}") from None
        self.counts[video.backend] += 1
        video.frames = _pad_frames(video.frames, self.size, self.pad_color)
        return video

    def _decode(self, path: str, start: float | None, end: float | None) -> DecodedVideo:
        if os.path.isdir(path):
            return read_frame_folder(path, self.sampling, self.size, self.spec, start, end)
        if not os.path.exists(path):
            raise VideoError(f"{path}: file not found")
        if os.path.getsize(path) == 0:
            raise VideoError(f"{path}: empty file (0 bytes)")
        return self._with_fallback(path, start, end)

    def _with_fallback(self, path: str, start: float | None, end: float | None) -> DecodedVideo:
        failures: list[str] = []
        for name in self.spec.backends:
            try:
                read = READERS[name]
                video = read(path, self.sampling, self.size, self.spec, start, end)
            except WindowError:
                raise
            except Exception as e:  # noqa: BLE001 - decord raises DECORDError, RuntimeError, IndexError...
                failures.append(f"{name}: {type(e).__name__}: {_first_line(e)}")
                continue
            if failures:
                self.counts["fallback"] += 1
                video.notes.insert(0, "fallback after " + "; ".join(failures))
            return video
        raise VideoError(f"{path}: not a readable video ({'; '.join(failures)})")


_LOG_PREFIX = re.compile(r"\[\d\d:\d\d:\d\d\] \S+:\d+: ")


def _first_line(error: Exception) -> str:
    """The useful part of an error message (decord prefixes every level with time and source line)."""
    text = _LOG_PREFIX.sub("", str(error)).strip().splitlines()
    return text[0][:200] if text else ""
