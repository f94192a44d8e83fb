"""lmms-eval requests through mm15's own preprocessing, without lmms-eval installed: a request is the
record's sample (same token ids and pixels), markers are placed or refused, a video to an image
model, a request past max_length and a path that is no mm15 model each fail naming what is wrong,
an image model answers videos with num_frames, an exported adapter loads, and the likelihood of a
reply is the model's own loss."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from mm15.base.data.datamodule import resolve_media
from mm15.base.module import MM15Module
from mm15.base.training.adapters import LoraSpec
from mm15.base.training.export import export_adapter
from mm15.data_builders.synthetic_shapes import SyntheticShapesSource
from mm15.data_builders.synthetic_video import SyntheticVideoSource
from mm15.eval.likelihood import reply_logprobs
from mm15.eval.loading import NotAnMM15Model, load_module
from mm15.eval.requests import Request, RequestEncoder, RequestError
from mm15.eval.tasks import question_text, read_source

from conftest import tiny_preprocessing, tiny_spec


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random core model saved as `mm15 fit --save_model` saves it (initializer_range 0.3: at
    the default 0.02 the random LLM ends every reply at once, and empty strings compare equal)."""
    module = MM15Module(model=tiny_spec(initializer_range=0.3), preprocessing=tiny_preprocessing())
    module.configure_model()
    directory = tmp_path_factory.mktemp("model") / "model"
    module.save_model(directory)
    return directory


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    source = SyntheticShapesSource(str(tmp_path_factory.mktemp("shapes")), split="test", num_samples=4)
    return [resolve_media(s, source.media_root) for s in source.read()]


def _request(sample, context=None, visuals=None, **kwargs):
    image = Image.open(sample.media[0].path).convert("RGB")
    text = question_text({"text": sample.turns[0].text}) if context is None else context
    return Request("shapes", "test", 0, text, [image] if visuals is None else visuals, **kwargs)


def test_an_image_request_is_the_records_sample(model_dir, shapes, tmp_path):
    module = load_module(model_dir)
    encoder = RequestEncoder(module.processor, str(model_dir))
    for sample in shapes:
        assert "<image>" not in _request(sample).context  # what benchmarks send
        ours = module.processor(sample, generate=True)
        theirs = encoder.item(_request(sample), tmp_path, generate=True)
        assert torch.equal(ours["input_ids"], theirs["input_ids"])
        assert torch.equal(ours["pixel_values"], theirs["pixel_values"])
        assert [x.placeholders for x in ours["layouts"]] == [x.placeholders for x in theirs["layouts"]]
    batch = encoder.batch([_request(s) for s in shapes], generate=True)
    records = module.processor.collate([module.processor(s, generate=True) for s in shapes], padding_side="left")
    replies = module.generate(batch)
    assert replies == module.generate(records) and len(set(replies)) > 1


def test_markers_stay_where_the_context_has_them_or_are_refused(model_dir, shapes, tmp_path):
    module = load_module(model_dir)
    encoder = RequestEncoder(module.processor, str(model_dir))
    sample = encoder.sample(_request(shapes[0], context="Look:\n<image>\nWhat colour?"), tmp_path)
    assert sample.turns[-1].text == "Look:\n<image>\nWhat colour?"
    image = Image.open(shapes[0].media[0].path)
    two = encoder.sample(_request(shapes[0], context="What colour?", visuals=[image, [image]]), tmp_path)
    assert two.turns[-1].text == "<image>\n<image>\nWhat colour?" and len(two.media) == 2
    with pytest.raises(RequestError, match=r"2 <image> markers but the request has 1 visuals"):
        encoder.sample(_request(shapes[0], context="<image> and <image>"), tmp_path)
    with pytest.raises(RequestError, match=r"visual 0 is a dict"):
        encoder.sample(_request(shapes[0], visuals=[{"array": [0.0]}]), tmp_path)


def test_regions_give_the_box_codecs_system_prompt(model_dir, shapes, tmp_path):
    module = load_module(model_dir)
    sample = RequestEncoder(module.processor, "m", regions=True).sample(_request(shapes[0]), tmp_path)
    assert sample.turns[0].role == "system" and "1000x1000" in sample.turns[0].text
    plain = RequestEncoder(module.processor, "m").sample(_request(shapes[0]), tmp_path)
    assert [t.role for t in plain.turns] == ["user"]


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    source = SyntheticVideoSource(str(tmp_path_factory.mktemp("clips")), split="test", num_samples=1, num_frames=15)
    return read_source(f"{SyntheticVideoSource.__module__}.SyntheticVideoSource",
                       {"root": str(source.root), "split": "test", "num_samples": 1, "num_frames": 15})[0]


def test_video_to_an_image_model_is_refused_unless_frames_are_given(model_dir, clip):
    request = Request("colours", "test", 7, clip["text"], clip["media"])
    module = load_module(model_dir)
    with pytest.raises(RequestError, match=r"document 7: visual 0 is a video .* no video part .* num_frames=N"):
        RequestEncoder(module.processor, str(model_dir)).batch([request], generate=True)
    module = load_module(model_dir, num_frames=3)
    assert type(module).__name__ == "MM15VideoModule" and module.mode == "training_free"
    batch = RequestEncoder(module.processor, str(model_dir)).batch([request], generate=True)
    (layout,) = batch["layouts"][0]
    assert layout.kind == "video" and layout.crops == 3 and batch["pixel_values"].shape[0] == 3


def test_a_request_past_max_length_names_it(model_dir, shapes, tmp_path):
    one = RequestEncoder(load_module(model_dir).processor, "m").item(_request(shapes[0]), tmp_path, True)
    module = load_module(model_dir, max_length=len(one["input_ids"]) + 2)
    image = Image.open(shapes[0].media[0].path)
    request = _request(shapes[0], visuals=[image] * 2)  # both split (3+ images are not): twice the crops
    with pytest.raises(RequestError, match=r"shapes.*document 0: .*exceeds max_length .*2 visuals need more .*max_length=N"):
        RequestEncoder(module.processor, "m").batch([request], generate=True)


def test_what_is_no_mm15_model_is_named(tmp_path):
    for path in (tmp_path / "missing", tmp_path):
        with pytest.raises(NotAnMM15Model, match=r"is not an mm15 model: .*mm15_config.json.*mm15_adapter.json"):
            load_module(path)
    junk = tmp_path / "weights.ckpt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(NotAnMM15Model, match=r"weights.ckpt is not an mm15 model: reading it as a Lightning checkpoint"):
        load_module(junk)


def test_reply_likelihood_is_the_models_loss(model_dir, shapes):
    module = load_module(model_dir)
    encoder = RequestEncoder(module.processor, "m")
    requests = [_request(s, continuation=s.answer) for s in shapes]
    batch = encoder.batch(requests, generate=False)
    together = reply_logprobs(module, batch)
    for request, (logp, _) in zip(requests, together):
        alone = encoder.batch([request], generate=False)
        (logp_alone, _), = reply_logprobs(module, alone)
        with torch.no_grad():
            loss = module(alone).loss  # mean over the reply's tokens
        n = int((alone["labels"] != -100).sum())
        assert logp_alone == pytest.approx(-float(loss) * n, rel=1e-5)
        assert logp == pytest.approx(logp_alone, rel=1e-5, abs=1e-5)  # padding changes nothing


def test_an_exported_adapter_scores_as_the_trained_module(tmp_path, shapes):
    module = MM15Module(model=tiny_spec(), preprocessing=tiny_preprocessing(), lora=LoraSpec(r=4, init="random"))
    module.configure_model()
    module.eval()
    requests = [_request(s, continuation=s.answer) for s in shapes]
    expected = reply_logprobs(module, RequestEncoder(module.processor, "m").batch(requests, generate=False))
    export_adapter(module, tmp_path / "adapter")
    loaded = load_module(tmp_path / "adapter")
    got = reply_logprobs(loaded, RequestEncoder(loaded.processor, "m").batch(requests, generate=False))
    assert [g for g, _ in got] == pytest.approx([e for e, _ in expected], rel=1e-5)
