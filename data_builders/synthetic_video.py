"""Learnable synthetic video tasks whose answer needs more than one frame, written as real video files.

* `majority_colour` (default, the demo's): the clip is cut in five equal segments; in each, a shape
  (new form, new place) has one of four palette colours (red, green, blue, yellow): one colour in
  two segments placed at random, the three others once. "Which colour does the shape have most
  often?" Whatever frame one picks (first, middle, last, ...), it shows the answer 2 times in 5,
  so a model seeing one frame is right at most 40% of the time, below twice chance (2 x 1/4); it
  takes frames from the segments, i.e. over time, to count.
* `direction`: one shape glides at constant speed, wrapping around the edges; "which way does it
  move?". Its position in any single frame is uniform over the picture whatever the direction, and
  for a given appearance the middle frame is the same pixel for pixel for the four directions, so
  only the change between frames tells. (Harder: the tiny demo model did not learn it on CPU.)

Clips are written as real video files (H.264 through PyAV, lossless by default so identical frames
stay identical; or `mp4v` through OpenCV) and read back through the normal sampler.

    source = SyntheticVideoSource("data/colours", split="train", num_samples=1200)
    source.prepare()        # writes data/colours/train.jsonl and data/colours/train/*.mp4, once per
                            # set of parameters (`mm15.base.data.sources.build_once`)

`write_video` is also what the tests and benchmarks use to make fixtures (rotation, variable
frame rate, sparse keyframes).
"""

from __future__ import annotations

import itertools
import random
from fractions import Fraction
from pathlib import Path
from typing import Iterable, Iterator, Literal

import cv2
import numpy as np

from mm15.base.data.sample import IMAGE_TOKEN, Media, Sample, Skip
from mm15.base.data.sources import JsonlSource, generated_jsonl
from mm15.data_builders.synthetic_shapes import COLOURS, SHAPES, draw_shape, question_sample

DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
PALETTE = ("red", "green", "blue", "yellow")
QUESTIONS = {"direction": "Which way does the shape move?", "majority_colour": "Which colour is the shape most often?"}
Task = Literal["majority_colour", "direction"]
SPLIT_SEEDS = {"train": 10, "val": 11, "test": 12}
Codec = Literal["h264", "mp4v"]


def write_video(path: str | Path, frames: Iterable[np.ndarray], fps: float = 8.0, codec: Codec = "h264",
                lossless: bool = False, gop: int | None = None, rotation: int = 0,
                times: list[float] | None = None) -> None:
    """Write RGB frames, each (H, W, 3) uint8 (H, W even for H.264), as an MP4. Any iterable works,
    so long clips can be generated frame by frame.

    gop: keyframe interval (H.264). rotation: display-matrix rotation in degrees counter-clockwise
    (H.264). times: per-frame presentation times in seconds, for variable frame rate (H.264).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = iter(frames)
    first = next(frames)
    frames = itertools.chain([first], frames)
    if codec == "mp4v":
        if rotation or times is not None:
            raise ValueError("rotation and variable frame rate need codec='h264'")
        writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, first.shape[1::-1])
        for frame in frames:
            writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
        writer.release()
        return
    _write_h264(path, frames, first.shape[:2], fps, lossless, gop, rotation, times)



def truncated_with_index_first(src: str | Path, dst: str | Path, keep: float = 0.6) -> None:
    """`src` remuxed with its index at the front (as `ffmpeg -movflags faststart` writes it), then
    cut to `keep` of its bytes: a download that stopped early, whose frames up to the cut can
    still be found (with the index at the end, as `write_video` leaves it, a cut loses them all)."""
    import av

    dst = Path(dst)
    full = dst.with_name(dst.stem + "_full.mp4")
    with av.open(str(src)) as inp, av.open(str(full), "w", options={"movflags": "faststart"}) as out:
        stream = out.add_stream_from_template(inp.streams.video[0])
        for packet in inp.demux(inp.streams.video[0]):
            if packet.dts is not None:  # the demuxer's final flush packet
                packet.stream = stream
                out.mux(packet)
    data = full.read_bytes()
    dst.write_bytes(data[: int(len(data) * keep)])

def _write_h264(path: Path, frames: Iterable[np.ndarray], shape: tuple[int, int], fps: float, lossless: bool,
                gop: int | None, rotation: int, times: list[float] | None) -> None:
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
        stream.height, stream.width = shape
        stream.pix_fmt = "yuv420p"
        stream.options = {"preset": "ultrafast", **({"qp": "0"} if lossless else {"crf": "20"})}
        if gop:
            stream.options.update({"g": str(gop), "keyint_min": str(gop), "sc_threshold": "0"})
        if rotation:
            stream.set_display_rotation(rotation)
        if times is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        for k, array in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format="rgb24")
            if times is not None:
                frame.pts, frame.time_base = int(round(times[k] * 1000)), Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def make_clip(rng: random.Random, direction: str, size: int = 64, num_frames: int = 15,
              speed: float = 0.125) -> np.ndarray:
    """(T, size, size, 3) uint8 frames of one clip, moving `speed` x `size` pixels per frame. The
    appearance and the middle frame depend on `rng` only; `direction` changes the other frames."""
    step = speed * size  # pixels per frame
    grey = rng.randint(20, 80)
    colour, shape = COLOURS[rng.choice(list(COLOURS))], rng.choice(SHAPES)
    radius = rng.randint(size // 8, size // 6)
    mid_x, mid_y = rng.uniform(0, size), rng.uniform(0, size)
    dx, dy = DIRECTIONS[direction]
    middle = num_frames // 2
    frames = np.full((num_frames, size, size, 3), grey, np.uint8)
    for k in range(num_frames):
        x = (mid_x + dx * step * (k - middle)) % size
        y = (mid_y + dy * step * (k - middle)) % size
        for ox in (-size, 0, size):  # wrapped copies, so the shape re-enters smoothly
            for oy in (-size, 0, size):
                draw_shape(frames[k], shape, colour, int(round(x + ox)), int(round(y + oy)), radius)
    return frames


def make_colour_clip(rng: random.Random, order: list[str], size: int = 64, num_frames: int = 15) -> np.ndarray:
    """(T, size, size, 3) frames: the clip cut in `len(order)` equal segments, segment k showing a
    shape in colour `order[k]`, with a new place and form each segment."""
    segments = len(order)
    frames = np.full((num_frames, size, size, 3), rng.randint(20, 80), np.uint8)
    for segment, colour in enumerate(order):
        radius = rng.randint(size // 4, size // 3)  # large: the colour is the signal
        x, y, shape = rng.randint(radius, size - radius), rng.randint(radius, size - radius), rng.choice(SHAPES)
        for k in range(segment * num_frames // segments, (segment + 1) * num_frames // segments):
            draw_shape(frames[k], shape, COLOURS[colour], x, y, radius)
    return frames


def make_task_clip(task: Task, rng: random.Random, size: int, num_frames: int, speed: float) -> tuple[np.ndarray, str, list[str]]:
    """(frames, answer, choices) of one clip of `task`."""
    if task == "direction":
        direction = rng.choice(list(DIRECTIONS))
        return make_clip(random.Random(rng.random()), direction, size, num_frames, speed), direction, list(DIRECTIONS)
    majority = rng.choice(PALETTE)
    order = [majority, *PALETTE]  # the majority colour in two of the five segments
    rng.shuffle(order)
    return make_colour_clip(random.Random(rng.random()), order, size, num_frames), majority, list(PALETTE)


def build_split(root: Path, split: str, num_samples: int, seed: int, task: Task, size: int, num_frames: int,
                speed: float, fps: float, codec: Codec) -> list[Sample]:
    rng = random.Random(seed)
    samples = []
    for n in range(num_samples):
        clip, answer, choices = make_task_clip(task, rng, size, num_frames, speed)
        rel = f"{split}/{n:05d}.mp4"
        write_video(root / rel, clip, fps, codec, lossless=True)
        samples.append(question_sample(split, n, f"{QUESTIONS[task]}\n{IMAGE_TOKEN}", answer, choices,
                                       Media(rel, kind="video"), task))
    return samples


class SyntheticVideoSource:
    """A video task as a source: `<root>/<split>.jsonl` and the clips `<root>/<split>/*.mp4`, written
    once per set of parameters (`mm15.base.data.sources.generated_jsonl`).

    Args:
        root, split, num_samples, seed: as `SyntheticShapesSource` (held-out clips are unseen).
        task: `majority_colour` or `direction` (see the module docstring).
        size: frame side in pixels (even).
        num_frames: frames per clip (`majority_colour`: a multiple of 5, sampled 5 or 10 frames at a
            time so each segment counts the same; `direction`: odd, so there is one middle frame,
            e.g. 15 = 1 + 7 * 2 lets 8 uniform samples land every second frame).
        speed: motion per frame as a fraction of the frame side (keep it under 1/2 per *sampled*
            frame, or wrapping around makes the direction ambiguous).
        fps: clip rate.
        codec: `h264` (PyAV, lossless) or `mp4v` (OpenCV).
    """

    def __init__(self, root: str, split: str = "train", num_samples: int = 800, task: Task = "majority_colour",
                 size: int = 64, num_frames: int = 15, speed: float = 0.125, fps: float = 8.0,
                 codec: Codec = "h264", seed: int | None = None):
        self.root = Path(root)
        self.split, self.num_samples, self.task = split, num_samples, task
        self.size, self.num_frames, self.speed, self.fps, self.codec = size, num_frames, speed, fps, codec
        self.seed = SPLIT_SEEDS.get(split, 13) if seed is None else seed
        self.media_root = str(self.root)

    def params(self) -> dict:
        return {"num_samples": self.num_samples, "seed": self.seed, "task": self.task, "size": self.size,
                "num_frames": self.num_frames, "speed": self.speed, "fps": self.fps, "codec": self.codec}

    def prepare(self) -> JsonlSource:
        """Generate the split unless it exists with the same parameters; the source that reads it."""
        return generated_jsonl(self.root, self.split, self.params(), lambda: build_split(
            self.root, self.split, self.num_samples, self.seed, self.task, self.size, self.num_frames, self.speed,
            self.fps, self.codec))

    def read(self) -> Iterator[Sample | Skip]:
        yield from self.prepare().read()
