"""Frames per second of the mm15 video sampler against two baselines, on generated H.264 clips.

    python benchmarks/video_sampler.py                 # short + long clips, sparse + frequent keyframes
    python benchmarks/video_sampler.py --long-seconds 60 --repeats 5 --size 378

Each method delivers the same 24 frames (the indices our sampler chooses):

* `mm15`: the video processor's decoder (container probe, timestamps, index choice, decord decoding
  only those frames resized while decoding, padding to r x r) and the core's `normalize` to float,
  on the CPU (training does that last step on the accelerator).
* `mm15 (no norm.)`: the same without the normalisation, i.e. what the loader workers do.
* `decord`: raw `decord.VideoReader(width, height).get_batch(indices)` on the same indices, same
  decoder thread count: the floor our wrapper adds overhead to. Target: mm15 >= 0.9x.
* `decode-all`: the naive way, `cv2.VideoCapture` reading every frame at native size, keeping the
  chosen ones and resizing them (same decoder thread count). Target on long clips: mm15 >= 3x.

Clips: `short` (10 s) and `long` (--long-seconds, default 120 s) at 30 fps and 640x360, with
frequent (every 0.5 s) or sparse (every 10 s) keyframes. With sparse keyframes any decoder must
decode the frames from the keyframe up to each chosen frame, so there the gain over decoding
everything comes mostly from not converting and resizing every frame.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from mm15.base.data.media import fit_size
from mm15.base.data.sample import IMAGE_TOKEN
from mm15.base.data.splitting import SplitSpec
from mm15.base.tiny import tiny_tokenizer
from mm15.data_builders.synthetic_video import write_video
from mm15.video.decoding import DecodeSpec
from mm15.video.processor import VideoPreprocessSpec, VideoProcessor, VideoSpec
from mm15.video.sampling import FrameSampling

FPS, WIDTH, HEIGHT = 30, 640, 360


def clip_frames(seconds: float):
    """A moving textured pattern (so P-frames carry real work), frame by frame."""
    rng = np.random.default_rng(0)
    texture = cv2.resize(rng.integers(0, 255, (HEIGHT // 8, WIDTH // 4, 3), dtype=np.uint8), (2 * WIDTH, HEIGHT))
    for k in range(int(seconds * FPS)):
        shift = (k * 7) % WIDTH
        yield np.ascontiguousarray(texture[:, shift: shift + WIDTH])


def video_processor(size: int, frames: int, threads: int) -> VideoProcessor:
    tokenizer = tiny_tokenizer()
    tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    video = VideoSpec(sampling=FrameSampling(num_frames=frames), decode=DecodeSpec(backends=["decord"], threads=threads))
    return VideoProcessor(tokenizer, VideoPreprocessSpec(split=SplitSpec(crop_size=size, mode="none"), video=video), 144)


def run_mm15(processor: VideoProcessor, path: str, normalise: bool = True) -> list[int]:
    video = processor.decoder.decode(path)  # (N, r, r, 3) uint8
    if normalise:
        processor.normalize(torch.from_numpy(video.frames).permute(0, 3, 1, 2))  # (N, 3, r, r) float32
    return video.indices


def run_decord(path: str, indices: list[int], size: tuple[int, int], threads: int) -> None:
    import decord

    reader = decord.VideoReader(path, width=size[0], height=size[1], num_threads=threads)
    reader.get_batch(indices).asnumpy()


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


def timed(fn, repeats: int) -> float:
    """Best of `repeats` wall times (after a warm-up run): other load on a shared machine only
    ever adds time, so the minimum is the most repeatable figure."""
    fn()  # warm the page cache and the libraries
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_clip(path: str, args: argparse.Namespace) -> dict[str, float]:
    processor = video_processor(args.size, args.frames, args.threads)
    indices = run_mm15(processor, path)
    size = fit_size(WIDTH, HEIGHT, (args.size, args.size), processor.spec.video.decode.resize)
    n = len(indices)
    return {
        "mm15": n / timed(lambda: run_mm15(processor, path), args.repeats),
        "mm15-decode": n / timed(lambda: run_mm15(processor, path, normalise=False), args.repeats),
        "decord": n / timed(lambda: run_decord(path, indices, size, args.threads), args.repeats),
        "decode-all": n / timed(lambda: run_decode_all(path, indices, size, args.threads), max(1, args.repeats // 2)),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--long-seconds", type=float, default=120.0)
    parser.add_argument("--short-seconds", type=float, default=10.0)
    parser.add_argument("--frames", type=int, default=24)
    parser.add_argument("--size", type=int, default=378, help="frame side r (MM1.5 encoder base resolution)")
    parser.add_argument("--threads", type=int, default=1, help="decoder threads (same for mm15 and raw decord)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workdir", default=None, help="where clips are written (default: a temp dir)")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="mm15_video_bench_"))
    header = (f"{'clip':<6} {'keyframes':<16} {'mm15 fps':>9} {'(no norm.)':>10} {'decord fps':>11} {'all fps':>8} "
              f"{'vs decord':>10} {'(no norm.)':>10} {'vs all':>7}")
    print(f"{args.frames} frames at {args.size} px from {WIDTH}x{HEIGHT} H.264 at {FPS} fps, {args.threads} decoder thread(s)")
    print(header + "\n" + "-" * len(header))
    for name, seconds in (("short", args.short_seconds), ("long", args.long_seconds)):
        for keys, gop in (("frequent (0.5s)", FPS // 2), ("sparse (10s)", FPS * 10)):
            path = workdir / f"{name}_{gop}.mp4"
            if not path.exists():
                write_video(path, clip_frames(seconds), fps=FPS, gop=gop)
            r = bench_clip(str(path), args)
            print(f"{name:<6} {keys:<16} {r['mm15']:9.1f} {r['mm15-decode']:10.1f} {r['decord']:11.1f} "
                  f"{r['decode-all']:8.1f} {r['mm15'] / r['decord']:9.2f}x {r['mm15-decode'] / r['decord']:9.2f}x "
                  f"{r['mm15'] / r['decode-all']:6.1f}x", flush=True)


if __name__ == "__main__":
    sys.exit(main())
