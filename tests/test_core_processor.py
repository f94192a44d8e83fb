"""Processor contracts: assistant-only labels, media blocks, regions, length skips, batching."""

import numpy as np
import pytest
import torch
from PIL import Image

from mm15.base.data.media import MediaLayout
from mm15.base.model import load_tokenizer
from mm15.base.data.processor import IGNORE_INDEX, MM15Processor
from mm15.base.data.sample import Media, Sample, SampleError, Turn

from conftest import tiny_preprocessing, tiny_spec


@pytest.fixture
def processor():
    return MM15Processor(load_tokenizer(tiny_spec()), tiny_preprocessing(), tokens_per_crop=4)


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "img.png"
    Image.fromarray(np.full((32, 64, 3), 200, np.uint8)).save(path)  # 64 wide, 32 high
    return str(path)


def _sample(image, turns=None):
    turns = turns or [Turn("user", "<image>\nWhat colour?"), Turn("assistant", "grey")]
    return Sample("s1", turns, [Media(image)])


def test_labels_cover_only_assistant_replies(processor, image):
    sample = _sample(image, [Turn("user", "<image>\nQ1"), Turn("assistant", "A1"),
                             Turn("user", "Q2"), Turn("assistant", "A2")])
    item = processor(sample)
    tok = processor.tokenizer
    labelled = item["labels"][item["labels"] != IGNORE_INDEX]
    assert tok.decode(labelled) == "A1<|im_end|>\nA2<|im_end|>\n"
    assert "Q1" in tok.decode(item["input_ids"]) and (item["labels"][item["input_ids"] == processor.image_token_id] == IGNORE_INDEX).all()


def test_media_block_index_indicators_and_counts(processor, image):
    item = processor(_sample(image))
    # 64x32 with grids 1..4 at r=32 -> 1x2 grid + overview = 3 crops, 4 tokens each
    assert item["pixel_values"].shape == (3, 3, 32, 32) and item["pixel_values"].dtype == torch.uint8
    assert int((item["input_ids"] == processor.image_token_id).sum()) == 3 * 4
    text = processor.tokenizer.decode(item["input_ids"])
    assert text.index("(1,1,1)") < text.index("(1,1,2)") < text.index("(1,0,0)")


def test_three_images_are_not_split(processor, image):
    sample = Sample("m", [Turn("user", "<image><image><image> same?"), Turn("assistant", "yes")], [Media(image)] * 3)
    assert processor(sample)["pixel_values"].shape[0] == 3


def test_generate_mode_drops_answer_and_keeps_it_as_reference(processor, image):
    item = processor(_sample(image), generate=True)
    assert item["answer"] == "grey"
    assert processor.tokenizer.decode(item["input_ids"]).endswith("<|im_start|>assistant\n")
    assert (item["labels"] == IGNORE_INDEX).all()


def test_regions_render_on_the_1000_canvas(processor, image):
    sample = _sample(image, [Turn("user", "<image>\nWhat is at <bbox_location0>?", boxes=[[16, 8, 32, 16]]),
                             Turn("assistant", "It is at <bbox_location0>.", boxes=[[16, 8, 32, 16]])])
    processor.spec.boxes.point_ratio = 0.0
    text = processor.tokenizer.decode(processor(sample)["input_ids"])
    assert text.count("[250, 250, 500, 500]") == 2 and "Bounding box" in text


def test_too_long_sample_is_refused_not_truncated(processor, image):
    processor.spec.max_length = 20
    with pytest.raises(SampleError, match=r"record 's1'.*tokens .*12 media tokens in 3 crops.*exceeds max_length 20"):
        processor(_sample(image))


def test_collate_pads_right_for_training_left_for_generation(processor, image):
    a = processor(_sample(image))
    b = processor(_sample(image, [Turn("user", "<image>\nlonger question here"), Turn("assistant", "x")]))
    right = processor.collate([a, b])
    left = processor.collate([a, b], padding_side="left")
    pad = processor.tokenizer.pad_token_id
    assert right["input_ids"].shape == left["input_ids"].shape
    assert right["attention_mask"][0, 0] == 1 and left["attention_mask"][0, 0] == 0
    assert left["input_ids"][0, 0] == pad and right["pixel_values"].shape[0] == 6


def test_grounding_prompt_has_the_same_system_prompt_when_generating(processor, image):
    sample = _sample(image, [Turn("user", "<image>\nWhere is the button?"),
                             Turn("assistant", "<bbox_location0>", boxes=[[0, 0, 10, 10]])])
    train = processor.tokenizer.decode(processor(sample)["input_ids"])
    gen = processor.tokenizer.decode(processor(sample, generate=True)["input_ids"])
    assert "Bounding box" in gen and train.startswith(gen)


def test_media_block_placeholder_counts_override_tokens_per_crop(processor, image):
    from mm15.base.data.processor import MediaBlock

    class Pooled(MM15Processor):
        def load_media(self, sample, index, media):
            block = super().load_media(sample, index, media)
            block.layout.placeholders = [7] * block.text.count("<image>")
            return block

    pooled = Pooled(processor.tokenizer, processor.spec, tokens_per_crop=4)
    item = pooled(_sample(image))
    assert int((item["input_ids"] == pooled.image_token_id).sum()) == 3 * 7
    assert item["layouts"][0].placeholders == [7, 7, 7]
    layout = MediaLayout("image", "x.png", crops=2, placeholders=[4, 4], source_size=(1, 1))
    MediaBlock(np.zeros((2, 1, 1, 3), np.uint8), "<image><image>", layout)
    with pytest.raises(ValueError, match=r"1 markers but its layout says image of 2 crops -> \[4, 4\]"):
        MediaBlock(np.zeros((2, 1, 1, 3), np.uint8), "<image>", layout)


def test_split_image_layout_names_grid_crops_placeholders_and_size(processor, image):
    (layout,) = processor(_sample(image))["layouts"]
    # 64x32 at r=32, grids 1..4: a 1x2 grid + the overview, 4 tokens per crop
    assert layout == MediaLayout("image", image, crops=3, placeholders=[4, 4, 4], source_size=(64, 32), grid=(1, 2))
    assert layout.num_placeholders == 12 and layout.backend is None and layout.frame_indices == []
    unsplit = processor(Sample("m", [Turn("user", "<image><image><image> same?"), Turn("assistant", "yes")],
                               [Media(image)] * 3))["layouts"]
    assert [(x.crops, x.grid, x.placeholders) for x in unsplit] == [(1, None, [4])] * 3


def test_collate_keeps_the_layouts_per_sample_in_crop_order(processor, image, tmp_path):
    tall = str(tmp_path / "tall.png")
    Image.fromarray(np.zeros((96, 32, 3), np.uint8)).save(tall)
    two = Sample("b", [Turn("user", "<image><image> same?"), Turn("assistant", "no")], [Media(tall), Media(image)])
    text_only = Sample("t", [Turn("user", "hi"), Turn("assistant", "hello")])
    batch = processor.collate([processor(_sample(image)), processor(text_only), processor(two)])
    assert [[x.path for x in sample] for sample in batch["layouts"]] == [[image], [], [tall, image]]
    assert [x.grid for x in batch["layouts"][2]] == [(3, 1), (1, 2)]
    assert sum(x.crops for sample in batch["layouts"] for x in sample) == batch["pixel_values"].shape[0] == 3 + 4 + 3
    assert "image_sizes" not in batch and "media_infos" not in batch


def test_pixel_caps_skip_from_the_header_before_decoding(processor, image, monkeypatch):
    from PIL import ImageFile

    decoded = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda im: decoded.append(im.filename) or real_load(im))
    two = Sample("s2", [Turn("user", "<image><image>\nSame?"), Turn("assistant", "yes")], [Media(image), Media(image)])
    processor.spec.max_image_pixels = 2048  # the image is 64 x 32 = 2048 pixels: at the cap, accepted
    processor.spec.max_sample_pixels = 4095  # two of them are not
    processor(_sample(image))
    decoded.clear()
    with pytest.raises(SampleError, match=r"record 's2'.*2 images of 4096 pixels in all.*max_sample_pixels 4095"):
        processor(two)
    processor.spec.max_image_pixels = 2047
    with pytest.raises(SampleError, match=r"record 's1'.*img.png is 64x32 = 2048 pixels.*max_image_pixels 2047"):
        processor(_sample(image))
    assert decoded == []  # refused from the header: no pixel data was decoded
