"""Frames per second of the mm15 video sampler and of each decoding library it can use, on generated H.264 clips.

    python benchmarks/video_sampler.py                 # every clip kind, every importable library
    python benchmarks/video_sampler.py --long-seconds 120 --repeats 5 --size 378 --baseline pyav

It measures whichever libraries the running environment has and says which it found: the `decord`
module is either decord 0.6 or the maintained decord2 fork (same module name, told apart by its
version and distribution), `torchcodec` is measured when it imports (it needs FFmpeg's shared
libraries and a matching torch build), PyAV (`av`, its own FFmpeg) always is. Running the script
from environments with different decoders installed compares them on identical clips.

Each method delivers the same frames (the indices our sampler chooses):

* `raw <lib>`: the library alone, as a caller would use it: `decord.VideoReader(width, height)
  .get_batch(indices)`; PyAV decoding the stream in order and converting only the chosen frames at
  the target size in swscale; torchcodec's `VideoDecoder(transforms=[Resize]).get_frames_at(indices)`
  in its default (exact) seek mode. Same decoder thread count everywhere.
* `mm15 <backend>`: our decoder with `DecodeSpec.backends=[backend]` (container probe, timestamps,
  index choice, decoding resized, padding to r x r): what the loader workers do. Target: >= 0.95x
  `raw <lib>` of the same library on every clip kind. (Our torchcodec backend opens constant-rate
  streams in the approximate seek mode, which a caller of the raw library could do too.)
* `mm15 + norm.`: the default decoder and the core's `normalize` to float on the CPU (training does
  that last step on the accelerator).
* `decode-all`: the naive way, `cv2.VideoCapture` reading every frame at native size and resizing
  the chosen ones. Target on long clips: mm15 >= 3x.

Speed clips: `short` (--short-seconds, 10 s) and `long` (--long-seconds, 60 s) at 30 fps and
640x360, frequent (every 0.5 s) or sparse (every 10 s) keyframes; `rot90` (short, 90-degree display
matrix, so displayed 360x640) and `vfr` (short, frame gaps from 1/30 s to 1/5 s). Ratios are
against `--baseline` (a raw library, measured in the same run). With sparse keyframes any decoder
decodes from the keyframe up to each chosen frame, so the gain over decoding everything comes
mostly from not converting and resizing every frame.

Correctness, after the speed table: per library, what comes back for the rotated clip (upright or
not), the VFR clip and a truncated file (the short clip with its index moved to the front, cut at
60 %): frames, an error, or wrong output, judged against PyAV's frames of the intact file.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from mm15.base.data.media import fit_size, resize_pixels
from mm15.base.data.sample import IMAGE_TOKEN
from mm15.base.data.splitting import SplitSpec
from mm15.base.tiny import tiny_tokenizer
from mm15.data_builders.synthetic_video import truncated_with_index_first, write_video
from mm15.video.decoding import DecodeSpec, VideoDecoder
from mm15.video.processor import VideoPreprocessSpec, VideoProcessor, VideoSpec
from mm15.video.sampling import FrameSampling

FPS, WIDTH, HEIGHT = 30, 640, 360


# ----- which libraries this environment has --------------------------------------------------------
def found_libraries() -> dict[str, str]:
    """name -> 'distribution version' for each importable decoder; a missing one maps to '' and its
    reason is printed by `describe_libraries`."""
    found = {}
    try:
        import decord

        version = getattr(decord, "__version__", "?")
        dists = [d.metadata["Name"] for d in importlib.metadata.distributions()
                 if (d.metadata["Name"] or "").lower() in ("decord", "decord2") and d.version == version]
        found["decord"] = f"{(dists or ['decord'])[0]} {version}"  # decord2 keeps the module name
    except ImportError:
        pass
    try:
        import torchcodec

        found["torchcodec"] = f"torchcodec {torchcodec.__version__}"
    except Exception:  # noqa: BLE001 - an OSError from its shared libraries is the common case
        pass
    import av

    found["pyav"] = f"av {av.__version__} (libavcodec {'.'.join(map(str, av.library_versions['libavcodec']))})"
    return found


def describe_libraries(found: dict[str, str]) -> str:
    lines = [f"  {name:<11} {found[name]}" for name in found]
    if "torchcodec" not in found:
        try:
            import torchcodec  # noqa: F401
        except Exception as e:  # noqa: BLE001
            lines.append(f"  torchcodec  not measured: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
    return "\n".join(lines)


# ----- clips ---------------------------------------------------------------------------------------
def clip_frames(seconds: float, width: int = WIDTH, height: int = HEIGHT):
    """A moving textured pattern (so P-frames carry real work), frame by frame."""
    rng = np.random.default_rng(0)
    texture = cv2.resize(rng.integers(0, 255, (height // 8, width // 4, 3), dtype=np.uint8), (2 * width, height))
    for k in range(int(seconds * FPS)):
        shift = (k * 7) % width
        yield np.ascontiguousarray(texture[:, shift: shift + width])


def vfr_times(seconds: float) -> list[float]:
    """Presentation times whose gaps cycle through 1/30, 1/15, 1/10 and 1/5 s."""
    gaps, times, t = (1 / 30, 1 / 15, 1 / 10, 1 / 5), [], 0.0
    while t < seconds:
        times.append(round(t, 3))
        t += gaps[len(times) % 4]
    return times


def make_clips(workdir: Path, args: argparse.Namespace) -> list[tuple[str, Path]]:
    clips = []
    for name, seconds in (("short", args.short_seconds), ("long", args.long_seconds)):
        for keys, gop in (("frequent", FPS // 2), ("sparse", FPS * 10)):
            kind = dict(frames=clip_frames(seconds), gop=gop)
            clips.append((f"{name} {keys}", workdir / f"{name}_{gop}.mp4", kind))
    rotated = dict(frames=clip_frames(args.short_seconds), gop=FPS // 2, rotation=90)
    clips.append(("rot90", workdir / "rot90.mp4", rotated))
    times = vfr_times(args.short_seconds)
    clips.append(("vfr", workdir / "vfr.mp4", dict(frames=clip_frames(len(times) / FPS), gop=FPS // 2, times=times)))
    for _, path, kw in clips:
        if not path.exists():
            write_video(path, kw.pop("frames"), fps=FPS, **kw)
    cut = workdir / "truncated.mp4"
    if not cut.exists():
        truncated_with_index_first(workdir / f"short_{FPS * 10}.mp4", cut)
    return [(name, path) for name, path, _ in clips] + [("truncated", cut)]


# ----- the methods ---------------------------------------------------------------------------------
def video_processor(size: int, frames: int, threads: int, backends: list[str] | None = None) -> VideoProcessor:
    tokenizer = tiny_tokenizer()
    tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    decode = DecodeSpec(threads=threads, **({"backends": backends} if backends else {}))
    video = VideoSpec(sampling=FrameSampling(num_frames=frames), decode=decode)
    return VideoProcessor(tokenizer, VideoPreprocessSpec(split=SplitSpec(crop_size=size, mode="none"), video=video), 144)


def run_mm15(processor: VideoProcessor, path: str, normalise: bool = True):
    video = processor.decoder.decode(path)  # (N, r, r, 3) uint8
    if normalise:
        processor.normalize(torch.from_numpy(video.frames).permute(0, 3, 1, 2))  # (N, 3, r, r) float32
    return video


def raw_decord(path: str, indices: list[int], size: tuple[int, int], threads: int) -> np.ndarray:
    import decord

    reader = decord.VideoReader(path, width=size[0], height=size[1], num_threads=threads)
    return reader.get_batch(indices).asnumpy()


def raw_pyav(path: str, indices: list[int], size: tuple[int, int], threads: int) -> np.ndarray:
    import av

    wanted, kept = set(indices), {}
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_count = threads
        for k, frame in enumerate(container.decode(stream)):
            if k in wanted:
                kept[k] = frame.reformat(width=size[0], height=size[1], format="rgb24").to_ndarray()
            if k >= max(indices):
                break
    return np.stack([kept[i] for i in indices])


def raw_torchcodec(path: str, indices: list[int], size: tuple[int, int], threads: int) -> np.ndarray:
    from torchcodec.decoders import VideoDecoder as TorchcodecDecoder
    from torchcodec.transforms import Resize

    decoder = TorchcodecDecoder(path, dimension_order="NHWC", num_ffmpeg_threads=threads,
                                transforms=[Resize((size[1], size[0]))])
    return decoder.get_frames_at(indices).data.numpy()


RAW = {"decord": raw_decord, "pyav": raw_pyav, "torchcodec": raw_torchcodec}
BACKENDS = ("decord", "pyav", "torchcodec")  # the libraries `DecodeSpec.backends` can name


def run_decode_all(path: str, indices: list[int], size: tuple[int, int], threads: int) -> None:
    wanted, kept, k = set(indices), {}, 0
    capture = cv2.VideoCapture(path, cv2.CAP_FFMPEG, [cv2.CAP_PROP_N_THREADS, threads])
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        if k in wanted:
            kept[k] = cv2.resize(frame, size, interpolation=cv2.INTER_AREA)
        k += 1
    capture.release()
    np.stack([kept[i] for i in indices])


def timed(methods: dict, repeats: int) -> dict[str, list[float]]:
    """Wall times of every repeat per method, after a warm-up run of each. The methods take turns
    within every repeat, so load from other processes on a shared machine falls on all of them
    alike, in forward order on even repeats and reversed on odd ones: a decoder run right after
    another one of the same library measured up to 12 % slower than when run first (decord 0.6,
    short clips), so a fixed order would favour whichever comes first. A method that raises gets
    no times (the correctness part says what it raised)."""
    times = {}
    for name, fn in methods.items():
        try:
            fn()  # warm the page cache and the libraries
            times[name] = []
        except Exception:  # noqa: BLE001
            times[name] = None
    for repeat in range(repeats):
        order = list(methods.items())
        for name, fn in order if repeat % 2 == 0 else order[::-1]:
            if times[name] is not None:
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return times


def bench_clip(path: str, libs: list[str], args: argparse.Namespace) -> tuple[dict[str, float], dict[str, float]]:
    """fps of every method on one clip (best of the repeats: load only ever adds time), and per
    backend our decoder against its raw library as the median of the ratios within each repeat
    (paired, so a slow moment shared by both cancels). Sampler indices from the default decoder."""
    default = video_processor(args.size, args.frames, args.threads)
    video = run_mm15(default, path, normalise=False)
    indices, size = video.indices, fit_size(*video.size, (args.size, args.size), "pad")
    methods = {}
    for lib in libs:
        methods[f"raw {lib}"] = lambda lib=lib: RAW[lib](path, indices, size, args.threads)
        if lib in BACKENDS:
            processor = video_processor(args.size, args.frames, args.threads, [lib])
            methods[f"mm15 {lib}"] = lambda p=processor: run_mm15(p, path, normalise=False)
    methods["mm15 + norm."] = lambda: run_mm15(default, path)
    methods["decode-all"] = lambda: run_decode_all(path, indices, size, args.threads)
    times = timed(methods, args.repeats)
    fps = {name: len(indices) / min(t) if t else float("nan") for name, t in times.items()}
    own = {}
    for lib in BACKENDS:
        raw, ours = times.get(f"raw {lib}"), times.get(f"mm15 {lib}")
        if raw and ours:
            own[lib] = float(np.median(np.asarray(raw) / np.asarray(ours)))
    return fps, own


# ----- correctness -----------------------------------------------------------------------------------
def reference_frames(path: Path, indices: list[int], size: tuple[int, int]) -> np.ndarray:
    """Upright frames of an intact clip at `indices`, at `size`, through PyAV (rotation applied)."""
    import av

    wanted, kept = set(indices), {}
    with av.open(str(path)) as container:
        for k, frame in enumerate(container.decode(container.streams.video[0])):
            if k in wanted:
                array = frame.to_ndarray(format="rgb24")
                kept[k] = np.rot90(array, k=int(frame.rotation) % 360 // 90)
    return np.stack([resize_pixels(np.ascontiguousarray(kept[i]), size) for i in indices])


def verdict(frames: np.ndarray, reference: np.ndarray) -> str:
    """'correct' when every frame is within 8 grey levels (mean abs.) of the reference: resizing
    filters differ by a few levels, a wrong or rotated frame by tens."""
    if frames.shape != reference.shape:
        return f"wrong output: shape {tuple(frames.shape[1:])}, expected {tuple(reference.shape[1:])}"
    errors = np.abs(frames.astype(np.int16) - reference).mean(axis=(1, 2, 3))
    good = int((errors < 8).sum())
    if good == len(frames):
        return f"{len(frames)} frames, correct (mean abs. error <= {errors.max():.1f})"
    return f"wrong output: {good} of {len(frames)} frames match the intact file (worst error {errors.max():.1f})"


def attempt(fn) -> tuple[np.ndarray | None, str]:
    try:
        return fn(), ""
    except Exception as e:  # noqa: BLE001 - what each library raises is the finding
        return None, f"error: {type(e).__name__}: {str(e).strip().splitlines()[0][:90] if str(e).strip() else ''}"


def correctness(clips: dict[str, Path], libs: list[str], args: argparse.Namespace) -> list[str]:
    """One line per (clip, library): raw library and our backend, against PyAV on the intact file."""
    lines = []
    for clip, intact in (("rot90", clips["rot90"]), ("vfr", clips["vfr"]), ("truncated", clips["short sparse"])):
        path = str(clips[clip])
        probe = VideoDecoder(DecodeSpec(backends=["pyav"]), FrameSampling(num_frames=args.frames), args.size)
        chosen = probe.decode(str(intact)).indices
        size = fit_size(*probe.decode(str(intact)).size, (args.size, args.size), "pad")
        reference = reference_frames(intact, chosen, size)
        for lib in libs:
            frames, error = attempt(lambda: RAW[lib](path, chosen, size, args.threads))
            lines.append(f"{clip:<10} raw {lib:<11} {error or verdict(frames, reference)}")
            if lib not in BACKENDS:
                continue
            decoder = VideoDecoder(DecodeSpec(backends=[lib]), FrameSampling(num_frames=args.frames), args.size)
            video, error = attempt(lambda: decoder.decode(path))
            if video is None:
                lines.append(f"{clip:<10} mm15 {lib:<10} {error}")
                continue
            shown = verdict(video.frames[:, : size[1], : size[0]], reference_frames(intact, video.indices, size))
            notes = "; ".join(n for n in video.notes if "fallback" not in n)[:110]
            lines.append(f"{clip:<10} mm15 {lib:<10} indices up to {max(video.indices)}, {video.replaced} replaced: "
                         f"{shown}" + (f" [{notes}]" if notes else ""))
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--long-seconds", type=float, default=60.0)
    parser.add_argument("--short-seconds", type=float, default=10.0)
    parser.add_argument("--frames", type=int, default=24)
    parser.add_argument("--size", type=int, default=378, help="frame side r (MM1.5 encoder base resolution)")
    parser.add_argument("--threads", type=int, default=1, help="decoder threads (same for every method)")
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--baseline", default="decord", choices=sorted(RAW),
                        help="raw library the ratios are against (measured in the same run)")
    parser.add_argument("--libraries", nargs="*", default=None, choices=sorted(RAW),
                        help="raw libraries to measure (default: every importable one)")
    parser.add_argument("--workdir", default=None, help="where clips are written (default: a temp dir)")
    args = parser.parse_args(argv)
    found = found_libraries()
    libs = [lib for lib in (args.libraries or RAW) if lib in found]
    if args.baseline not in libs:
        parser.error(f"baseline {args.baseline} is not importable here ({', '.join(libs)} are)")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="mm15_video_bench_"))
    print("decoders found:\n" + describe_libraries(found))
    print(f"default DecodeSpec.backends: {DecodeSpec().backends}")
    print(f"{args.frames} frames at {args.size} px from {WIDTH}x{HEIGHT} H.264 at {FPS} fps, {args.threads} decoder "
          f"thread(s), best of {args.repeats}; ratios against raw {args.baseline} ({found[args.baseline]})\n")
    clips = dict(make_clips(workdir, args))
    base = f"raw {args.baseline}"
    header = None
    for name, path in clips.items():
        if name == "truncated":
            continue
        r, own = bench_clip(str(path), libs, args)
        if header is None:
            header = f"{'clip':<15}" + "".join(f"{k:>16}" for k in r) + "".join(
                f"{'mm15/raw ' + b:>21}" for b in BACKENDS if f"mm15 {b}" in r)
            print("fps (and x raw " + args.baseline + "); mm15/raw: our decoder against its library, median paired ratio\n"
                  + header + "\n" + "-" * len(header))
        cells = "".join(f"{v:9.1f} ({v / r[base]:4.2f}x)" for v in r.values())
        print(f"{name:<15}{cells}" + "".join(f"{own[b]:20.2f}x" for b in BACKENDS if b in own), flush=True)
    print("\nwhat comes back (raw library, and our decoder with that backend alone):")
    for line in correctness(clips, libs, args):
        print("  " + line, flush=True)


if __name__ == "__main__":
    sys.exit(main())
