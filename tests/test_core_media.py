"""The media layout contract: `MediaLayout` written under `media` in test_predictions.jsonl and read
back, and the one resize-then-pad rule of images and video frames. (What the processor and
`collate` put in a layout: tests/test_core_processor.py.)"""

import json

import numpy as np
import pytest
import pytorch_lightning as pl
from PIL import Image

from mm15.base.data.datamodule import MM15DataModule
from mm15.base.data.media import MEAN_COLOR, MediaLayout, fit_into, fit_size, pad_to, record_layouts
from mm15.base.data.splitting import SplitSpec, overview_crop
from mm15.base.module import GenerationSpec, MM15Module
from mm15.data_builders.synthetic_shapes import SyntheticShapesSource

from conftest import tiny_preprocessing, tiny_spec


def test_layout_round_trips_through_json():
    layout = MediaLayout("video", "/v.mp4", 2, [8, 2], (640, 360), backend="pyav", notes=["fallback after decord"],
                         frame_indices=[0, 9], timestamps=[0.0, 0.3])
    record = json.loads(json.dumps({"media": [layout.to_dict()]}))
    assert record_layouts(record) == [layout] and record_layouts({"id": "text only"}) == []


def test_test_predictions_carry_each_sample_media_layout(tmp_path):
    source = SyntheticShapesSource(str(tmp_path / "shapes"), split="test", num_samples=3, min_side=40, max_side=70)
    module = MM15Module(model=tiny_spec(), preprocessing=tiny_preprocessing(),
                        generation=GenerationSpec(max_new_tokens=1))
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.test(module, MM15DataModule(test=[source], batch_size=2), verbose=False)
    records = [json.loads(line) for line in (tmp_path / "test_predictions.jsonl").read_text().splitlines()]
    assert len(records) == 3 and all("image_size" not in r for r in records)
    for record in records:
        (layout,) = record_layouts(record)
        with Image.open(layout.path) as im:
            size = im.size
        assert layout.kind == "image" and layout.source_size == size and layout.path.startswith(str(tmp_path))
        assert layout.placeholders == [module.processor.tokens_per_crop] * layout.crops
        assert layout.crops == layout.grid[0] * layout.grid[1] + 1  # grid crops + the overview


def test_one_fit_rule_pad_or_stretch():
    assert fit_size(1170, 2532, (672, 672), "pad") == (311, 672)
    assert fit_size(1170, 2532, (672, 672), "stretch") == (672, 672)
    assert fit_size(100, 10, (2 * 32, 1 * 32), "pad") == (64, 6)
    frames = np.full((2, 3, 4, 3), 9, np.uint8)  # (N, h, w, 3)
    padded = pad_to(frames, (5, 6), MEAN_COLOR)
    assert padded.shape == (2, 6, 5, 3) and (padded[:, :3, :4] == 9).all()
    assert (padded[:, 3:] == MEAN_COLOR).all() and (padded[:, :3, 4:] == MEAN_COLOR).all()
    with pytest.raises(ValueError, match="do not fit"):
        pad_to(frames, (3, 3), MEAN_COLOR)


def test_mean_colour_is_derived_from_clip_mean_once():
    from mm15.video.decoding import VideoDecoder

    assert MEAN_COLOR == (122, 116, 104)  # int(255 * CLIP_MEAN), as LLaVA pads
    assert SplitSpec().pad_color == MEAN_COLOR and VideoDecoder.__init__.__defaults__[-1] == MEAN_COLOR


@pytest.mark.parametrize("resize", ["pad", "stretch"])
def test_image_overview_and_video_frames_share_the_rule(resize, tmp_path):
    from mm15.video.decoding import DecodeSpec, VideoDecoder
    from mm15.video.sampling import FrameSampling

    image = np.repeat(np.linspace(0, 255, 40, dtype=np.uint8)[None, :, None], 20, 0).repeat(3, 2)  # (20, 40, 3) ramp
    overview = overview_crop(image, SplitSpec(crop_size=16, resize=resize))
    assert np.array_equal(overview, fit_into(image, (16, 16), resize, MEAN_COLOR))
    (tmp_path / "frames").mkdir()
    Image.fromarray(image).save(tmp_path / "frames" / "0001.png")
    decoder = VideoDecoder(DecodeSpec(resize=resize), FrameSampling(num_frames=1), 16)
    frame = decoder.decode(tmp_path / "frames").frames[0]
    padded = (overview == MEAN_COLOR).all(-1)
    assert padded[8:].all() == (resize == "pad") and np.array_equal((frame == MEAN_COLOR).all(-1), padded)
    assert np.abs(frame.astype(int) - overview).max() <= 16  # other resamplers, same placement
