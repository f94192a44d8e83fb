"""MM1.5-Video processor: a video becomes its sampled frames, each one crop (no splitting).

Everything else (chat template, labels, images, batching) is `mm15.base.data.processor.MM15Processor`;
only the `load_media` hook differs. A video's text block is one `<image>` per frame, each expanded
to `tokens_per_crop` placeholders (the core's single count function): 24 frames x 144 = 3456
tokens. With `timestamps` on, each frame's marker is preceded by its time ("2.5s<image>").
With SlowFast pooling the block is two markers, slow and fast, whose counts come from
`mm15.video.pooling.slowfast_token_count`.

    spec = VideoPreprocessSpec(split=SplitSpec(crop_size=378, mode="none"))
    processor = VideoProcessor(tokenizer, spec, tokens_per_crop=144)
    item = processor(sample)   # item["pixel_values"]: (24, 3, 378, 378) uint8
    item["layouts"][0]         # MediaLayout(kind="video", crops=24, placeholders=[144] * 24,
                               #             backend="decord", notes=[...], frame_indices=[...], ...)

A video that cannot be used raises `SampleError` naming the record, the file and the reason; the
data module turns it into a quarantine entry. Which backend served it, and any fallback or
clamping, is in its `mm15.base.data.media.MediaLayout` (counted and logged by `mm15.video.module`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mm15.base.data.media import MediaLayout
from mm15.base.data.processor import MediaBlock, MM15Processor, PreprocessSpec
from mm15.base.data.sample import IMAGE_TOKEN, Media, Sample

from .decoding import IMAGE_SUFFIXES, DecodedVideo, DecodeSpec, VideoDecoder, VideoError
from .pooling import SlowFastSpec, slowfast_token_count
from .sampling import FrameSampling


@dataclass
class VideoSpec:
    """How videos become frames and text (saved with checkpoints as part of the preprocessing).

    Args:
        sampling: which frames (N = 24 uniform by default).
        decode: backends, resize rule, frame-folder rate. Frames are `split.crop_size` pixels square:
            set it to the vision encoder's base resolution for video runs [choice, MM1.5 does not
            publish the frame resolution].
        timestamps: write each frame's time before its marker [off by default].
        timestamp_format: the text of a time, `{t}` in seconds [choice].
        slowfast: SlowFast token pooling on the connector output (training-free use); None: off.
    """

    sampling: FrameSampling = field(default_factory=FrameSampling)
    decode: DecodeSpec = field(default_factory=DecodeSpec)
    timestamps: bool = False
    timestamp_format: str = "{t:.1f}s"
    slowfast: SlowFastSpec | None = None

    def __post_init__(self) -> None:
        if self.timestamps and self.slowfast is not None:
            raise ValueError("video.timestamps needs one marker per frame; it cannot be combined with video.slowfast")


@dataclass
class VideoPreprocessSpec(PreprocessSpec):
    """The core preprocessing spec plus `video` (a core checkpoint's spec loads with video defaults)."""

    video: VideoSpec = field(default_factory=VideoSpec)


class VideoProcessor(MM15Processor):
    def __init__(self, tokenizer: Any, spec: VideoPreprocessSpec, tokens_per_crop: int):
        super().__init__(tokenizer, spec, tokens_per_crop)
        self._decoder: VideoDecoder | None = None
        self._decoder_spec: VideoPreprocessSpec | None = None

    @property
    def decoder(self) -> VideoDecoder:
        """Rebuilt when the spec object is replaced (a checkpoint's spec is loaded)."""
        if self._decoder is None or self._decoder_spec is not self.spec:
            v, split = self.spec.video, self.spec.split
            self._decoder = VideoDecoder(v.decode, v.sampling, split.crop_size, split.pad_color)
            self._decoder_spec = self.spec
        return self._decoder

    def load_media(self, sample: Sample, index: int, media: Media) -> MediaBlock:
        if media.kind != "video":
            return super().load_media(sample, index, media)
        try:
            video = self.decoder.decode(media.path, media.start, media.end)
        except VideoError as e:
            raise sample.error(str(e)) from None
        text, counts = self.video_text(video)
        layout = MediaLayout("video", media.path, len(video.frames), counts, video.size, backend=video.backend,
                             notes=video.notes, frame_indices=video.indices, timestamps=video.timestamps,
                             replaced_frames=video.replaced)
        return MediaBlock(video.frames, text, layout)

    def measure_media(self, sample: Sample, index: int, media: Media) -> MediaBlock:
        """The block of a video without decoding it (`mm15 plan`): frames chosen from the frame count
        and duration in the container (`mm15.video.probe.probe_timing`; a folder's files at
        `folder_fps`), as if the frame rate were constant; crops are an empty (n, 0, 0, 3) array."""
        import os

        import numpy as np

        from .probe import probe_timing
        from .sampling import sample_frame_indices

        v = self.spec.video
        try:
            if os.path.isdir(media.path):
                count = sum(1 for p in os.listdir(media.path) if p.lower().endswith(IMAGE_SUFFIXES))
                duration = count / v.decode.folder_fps
            else:
                timing = probe_timing(media.path)
                count, duration = timing.frames, timing.duration
            times = np.arange(count) * (duration / max(count, 1))
            pick = sample_frame_indices(times, duration, v.sampling, media.start, media.end)
        except Exception as e:  # noqa: BLE001 - FFmpeg's errors, a damaged header, a window outside the video
            raise sample.error(f"{media.path}: {type(e).__name__}: {e}") from None
        frames = np.empty((len(pick.indices), 0, 0, 3), np.uint8)
        video = DecodedVideo(frames, pick.indices, times[pick.indices].tolist(), "probe", pick.notes)
        text, counts = self.video_text(video)
        return MediaBlock(frames, text, MediaLayout("video", media.path, len(frames), counts, (0, 0)))

    def video_text(self, video: DecodedVideo) -> tuple[str, list[int]]:
        """The text block of one video and the placeholder count of each of its markers."""
        n, v = len(video.frames), self.spec.video
        if v.slowfast is not None:
            return IMAGE_TOKEN * 2, list(slowfast_token_count(n, self.tokens_per_crop, v.slowfast))
        if v.timestamps:
            return "".join(v.timestamp_format.format(t=t) + IMAGE_TOKEN for t in video.timestamps), [self.tokens_per_crop] * n
        return IMAGE_TOKEN * n, [self.tokens_per_crop] * n
