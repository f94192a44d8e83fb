"""What a video looks like before decoding it: displayed width, height and rotation.

The decoders need the displayed size (to resize while decoding, aspect kept) and the rotation
(a phone video stored landscape with a 90-degree display matrix). For MP4/MOV files both come
from the first video track's `tkhd` box, read here without any decoder (microseconds, even for
long files, as only box headers and the `moov` box are read). Other containers are probed with
PyAV, which reports rotation only on decoded frames, so one frame is decoded there.

    info = probe_video("clip.mp4")     # VideoInfo(width=1080, height=1920, rotation=90, container='mp4')
    probe_timing("clip.mp4")           # VideoTiming(frames=300, duration=10.0): what `mm15 plan` counts
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import BinaryIO, Iterator

import numpy as np

MP4_BRANDS = (b"ftyp",)
_CONTAINERS = {b"moov", b"trak", b"mdia"}


@dataclass
class VideoInfo:
    width: int  # displayed, i.e. after rotation
    height: int
    rotation: int  # counter-clockwise degrees to display upright: 0, 90, 180 or 270
    container: str  # "mp4" (MP4/MOV family) or the PyAV format name


def _boxes(data: bytes) -> Iterator[tuple[bytes, bytes]]:
    """(type, payload) of the ISO-BMFF boxes laid end to end in `data`."""
    pos = 0
    while pos + 8 <= len(data):
        size, kind = struct.unpack(">I4s", data[pos: pos + 8])
        header = 8
        if size == 1:
            size, header = struct.unpack(">Q", data[pos + 8: pos + 16])[0], 16
        elif size == 0:
            size = len(data) - pos
        if size < header:
            return
        yield kind, data[pos + header: pos + size]
        pos += size


def _read_moov(f: BinaryIO) -> bytes | None:
    """Walk the top-level boxes by seeking; return the `moov` payload."""
    while True:
        head = f.read(8)
        if len(head) < 8:
            return None
        size, kind = struct.unpack(">I4s", head)
        header = 8
        if size == 1:
            size, header = struct.unpack(">Q", f.read(8))[0], 16
        if kind == b"moov":
            return f.read(size - header) if size else f.read()
        if size == 0 or size < header:
            return None
        f.seek(size - header, 1)


def _tkhd_geometry(payload: bytes) -> tuple[float, float, int]:
    """(width, height, rotation) from a `tkhd` payload: the stored size and the display matrix."""
    offset = 4 + (32 if payload[0] == 1 else 20) + 8 + 8  # version/flags, times+ids, reserved, layer..volume
    matrix = struct.unpack(">9i", payload[offset: offset + 36])
    width, height = struct.unpack(">II", payload[offset + 36: offset + 44])
    # FFmpeg's av_display_rotation_get: -atan2(b, a) on the 16.16 entries, counter-clockwise.
    degrees = -math.degrees(math.atan2(matrix[1], matrix[0]))
    return width / 65536, height / 65536, int(round(degrees / 90.0)) * 90 % 360


def _mp4_moov(path: str) -> bytes | None:
    """The `moov` box of an MP4/MOV file; None when `path` is not one or has none."""
    with open(path, "rb") as f:
        if f.read(8)[4:8] not in MP4_BRANDS:
            return None
        f.seek(0)
        return _read_moov(f)


def probe_mp4(path: str) -> VideoInfo | None:
    """Geometry of the first video track of an MP4/MOV file; None when `path` is not one."""
    moov = _mp4_moov(path)
    if moov is None:
        return None
    for kind, trak in _boxes(moov):
        if kind != b"trak":
            continue
        parts = dict(_boxes(trak))
        handler = dict(_boxes(parts.get(b"mdia", b""))).get(b"hdlr", b"")
        if handler[8:12] == b"vide" and b"tkhd" in parts:
            w, h, rot = _tkhd_geometry(parts[b"tkhd"])
            w, h = (h, w) if rot in (90, 270) else (w, h)
            return VideoInfo(max(1, round(w)), max(1, round(h)), rot, "mp4")
    return None


def probe_pyav(path: str) -> VideoInfo:
    """Any container FFmpeg reads; decodes the first frame, the only place PyAV reports rotation."""
    import av

    with av.open(path) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        frame = next(container.decode(container.streams.video[0]))
        rot = int(frame.rotation) % 360
        w, h = (frame.height, frame.width) if rot in (90, 270) else (frame.width, frame.height)
        return VideoInfo(w, h, rot, container.format.name)


@dataclass
class VideoTiming:
    frames: int  # frames (samples) of the first video track
    duration: float  # seconds


def _video_track(moov: bytes | None) -> tuple[int, int, dict[bytes, bytes]] | None:
    """(timescale, duration in timescale units, sample-table boxes) of the first video track."""
    for kind, trak in _boxes(moov or b""):
        mdia = dict(_boxes(dict(_boxes(trak)).get(b"mdia", b"")))
        if kind != b"trak" or mdia.get(b"hdlr", b"")[8:12] != b"vide":
            continue
        mdhd = mdia[b"mdhd"]
        scale, length = (struct.unpack(">IQ", mdhd[20:32]) if mdhd[0] == 1 else struct.unpack(">II", mdhd[12:20]))
        return scale, length, dict(_boxes(dict(_boxes(mdia.get(b"minf", b""))).get(b"stbl", b"")))
    return None


def _runs(box: bytes) -> np.ndarray:
    """(count, value) runs of an `stts` or `ctts` payload as an (entries, 2) int64 array; values
    read as signed 32-bit (as FFmpeg reads `ctts` of either version)."""
    if len(box) < 8:
        return np.zeros((0, 2), np.int64)
    entries = struct.unpack(">I", box[4:8])[0]
    runs = np.frombuffer(box, ">i4", count=2 * entries, offset=8).reshape(entries, 2).astype(np.int64)
    runs[:, 0] &= 0xFFFFFFFF  # counts are unsigned
    return runs


def timing_mp4(path: str) -> VideoTiming | None:
    """Frame count (`stts`) and duration (`mdhd`) of the first video track; None if not MP4/MOV."""
    track = _video_track(_mp4_moov(path))
    if track is None:
        return None
    scale, length, stbl = track
    return VideoTiming(int(_runs(stbl.get(b"stts", b""))[:, 0].sum()), length / scale if scale else 0.0)


def frame_times_mp4(path: str) -> tuple[np.ndarray, float] | None:
    """Presentation start time of every frame of the first video track, in seconds from the first
    frame and sorted (the order decoders index frames in), and the end of the last frame; from the
    sample table (`stts` decode deltas plus `ctts` composition offsets), without demuxing. None when
    `path` is not MP4/MOV or has no samples. Edit lists are not applied: times are relative."""
    track = _video_track(_mp4_moov(path))
    if track is None or not track[0]:
        return None
    scale, _, stbl = track
    stts = _runs(stbl.get(b"stts", b""))
    deltas = np.repeat(stts[:, 1], stts[:, 0])
    if len(deltas) == 0:
        return None
    ctts = _runs(stbl.get(b"ctts", b""))
    offsets = np.repeat(ctts[:, 1], ctts[:, 0])[: len(deltas)] if len(ctts) else np.zeros(0, np.int64)
    pts = np.concatenate([[0], np.cumsum(deltas[:-1])])
    pts[: len(offsets)] += offsets
    order = np.sort(pts)
    end = float((pts + deltas).max() - order[0]) / scale
    return (order - order[0]) / scale, end


def probe_timing(path: str) -> VideoTiming:
    """Frames and duration without decoding: MP4/MOV from the sample table, the rest from PyAV's
    stream header (or, where it has none, by counting demuxed packets)."""
    try:
        timing = timing_mp4(path)
    except (struct.error, IndexError, KeyError, OSError):
        timing = None
    if timing is not None and timing.frames:
        return timing
    import av

    with av.open(path) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
        frames = stream.frames or sum(1 for p in container.demux(stream) if p.pts is not None)
        seconds = float(stream.duration * stream.time_base) if stream.duration else (container.duration or 0) / 1e6
        return VideoTiming(int(frames), seconds)


def probe_video(path: str) -> VideoInfo:
    """Displayed geometry of a video file (MP4/MOV by box parsing, the rest through PyAV)."""
    try:
        info = probe_mp4(path)
    except (struct.error, IndexError, OSError):
        info = None  # a damaged MP4 header: let FFmpeg judge it
    return info if info is not None else probe_pyav(path)
