"""Model contracts: C-Abstractor structure, placeholder count, MoE aux loss, save/load, freezing."""

import pytest
import torch
from torch import nn

from mm15.base.connector import Bottleneck, CAbstractor, ConnectorSpec, LayerNorm2d, MLPConnector, SqueezeExcite, tokens_per_crop
from mm15.base.model import LLMSpec, MM15Model, ModelSpec, VisionSpec, load_tokenizer
from mm15.base.tiny import TINY_MOE_LLM

from conftest import tiny_spec


def test_c_abstractor_shape_and_structure():
    spec = ConnectorSpec()  # MM1.5 defaults: 144 tokens, hidden 1024, depth 3
    cab = CAbstractor(spec, vision_dim=64, llm_dim=48, num_patches=24 * 24)
    out = cab(torch.randn(2, 24 * 24, 64))
    assert out.shape == (2, 144, 48)
    first, pool, second = cab.net
    assert isinstance(pool, nn.AdaptiveAvgPool2d) and pool.output_size == 12
    assert len(first) == 3 and len(second) == 3 and all(isinstance(b, Bottleneck) for b in [*first, *second])
    block = first[0]
    assert block.conv2[0].groups == block.conv2[0].in_channels  # 3x3 depthwise
    assert block.conv2[0].kernel_size == (3, 3) and block.conv1[0].kernel_size == (1, 1)
    assert isinstance(block.se, SqueezeExcite) and isinstance(block.conv1[1], LayerNorm2d)
    assert isinstance(block.conv1[2], nn.SiLU)
    assert first[0].conv1[0].in_channels == 64 and first[0].conv3[0].out_channels == 1024
    lin1, act, lin2 = cab.readout
    assert (lin1.in_features, lin1.out_features, lin2.out_features) == (1024, 48, 48) and isinstance(act, nn.SiLU)
    assert cab.pos_embed.shape == (1, 576, 64)


def test_vision_tower_truncated_after_feature_layer_and_unused_frozen():
    spec = tiny_spec()  # 2-layer CLIP tower, feature_layer -2
    model = MM15Model.build(spec, load_tokenizer(spec), crop_size=32)
    assert len(model.vision.encoder.layers) == 1 and model.spec.vision.feature_layer == -1
    frozen = [n for n, p in model.vision.named_parameters() if not p.requires_grad]
    assert frozen and all("post_layernorm" in n for n in frozen)


def test_c_abstractor_takes_higher_resolution_crops():
    cab = CAbstractor(ConnectorSpec(hidden_size=32, depth=1), vision_dim=16, llm_dim=8, num_patches=24 * 24)
    assert cab(torch.randn(1, 48 * 48, 16)).shape == (1, 144, 8)  # 672-px crop of a 336-px tower


def test_tokens_per_crop_single_source():
    assert tokens_per_crop(ConnectorSpec(), 672, 14) == 144
    assert tokens_per_crop(ConnectorSpec(kind="mlp"), 336, 14) == 576
    mlp = MLPConnector(ConnectorSpec(kind="mlp"), 16, 8, 4)
    assert mlp(torch.randn(3, 4, 16)).shape == (3, 4, 8)


@pytest.fixture(scope="module")
def tiny_model():
    spec = tiny_spec()
    tok = load_tokenizer(spec)
    torch.manual_seed(0)
    return MM15Model.build(spec, tok, crop_size=32), tok


def _inputs(model, n_crops=2, n_placeholders=None):
    n = model.tokens_per_crop * n_crops if n_placeholders is None else n_placeholders
    ids = torch.tensor([[5, 6] + [model.image_token_id] * n + [7, 8, 9]])
    return ids, torch.ones_like(ids), torch.randn(n_crops, 3, 32, 32)


def test_placeholder_mismatch_names_both_numbers(tiny_model):
    model, _ = tiny_model
    ids, mask, pixels = _inputs(model, n_crops=2, n_placeholders=5)
    with pytest.raises(ValueError, match=r"5 placeholder tokens .* 8 media feature vectors"):
        model(ids, mask, pixel_values=pixels, labels=ids)


def test_placeholder_mismatch_names_the_real_shape_of_pooled_features_and_the_layouts(tiny_model):
    from mm15.base.data.media import MediaLayout

    model, _ = tiny_model
    ids, mask, _ = _inputs(model, n_crops=0, n_placeholders=12)
    d = model.llm.config.hidden_size
    pooled = torch.randn(1, 10, d)  # (1, L, D): SlowFast-pooled video tokens, not crops x tokens_per_crop
    layouts = [[MediaLayout("video", "v.mp4", crops=4, placeholders=[8, 4], source_size=(64, 48))]]
    with pytest.raises(ValueError) as error:
        model(ids, mask, media_features=pooled, layouts=layouts, labels=ids)
    message = str(error.value)
    assert f"12 placeholder tokens in input_ids but 10 media feature vectors (features of shape (1, 10, {d})" in message
    assert "crops x" not in message
    assert "the layouts expect 12 placeholders: video of 4 crops -> [8, 4]" in message


def test_media_changes_the_loss(tiny_model):
    model, _ = tiny_model
    ids, mask, pixels = _inputs(model)
    a = model(ids, mask, pixel_values=pixels, labels=ids).loss
    b = model(ids, mask, pixel_values=pixels * 0, labels=ids).loss
    assert not torch.allclose(a, b)


def test_loss_reduction_token_or_sample_by_hand(tiny_model):
    """`token`: one mean over all target tokens; `sample`: per-sample means, then their mean."""
    model, _ = tiny_model
    ids, mask, pixels = _inputs(model)
    ids, mask, pixels = ids.repeat(2, 1), mask.repeat(2, 1), pixels.repeat(2, 1, 1, 1)
    labels = torch.full_like(ids, -100)
    labels[0, -3:] = ids[0, -3:]  # sample 0: 3 targets
    labels[1, -1] = ids[1, -1]  # sample 1: 1 target
    with torch.no_grad():
        hidden = model.llm.get_decoder()(inputs_embeds=model.embed(ids, pixels), attention_mask=mask).last_hidden_state
        logits = model.llm.get_output_embeddings()(hidden[:, :-1]).float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels[:, 1:], reduction="none")
        first, second = nll[0, -3:], nll[1, -1:]
        token = model(ids, mask, pixel_values=pixels, labels=labels).loss
        model.spec.llm.loss_reduction = "sample"
        sample = model(ids, mask, pixel_values=pixels, labels=labels).loss
        model.spec.llm.loss_reduction = "token"
    torch.testing.assert_close(token, torch.cat([first, second]).mean())
    torch.testing.assert_close(sample, (first.mean() + second.mean()) / 2)


def test_moe_router_aux_loss_is_weighted_into_the_loss():
    spec = ModelSpec(vision=tiny_spec().vision, llm=LLMSpec(config=dict(TINY_MOE_LLM), router_aux_loss_weight=0.5),
                     connector=tiny_spec().connector, tokenizer="tiny")
    model = MM15Model.build(spec, load_tokenizer(spec), crop_size=32)
    ids, mask, pixels = _inputs(model)
    out = model(ids, mask, pixel_values=pixels, labels=ids)
    assert out.aux_loss is not None and out.aux_loss > 0
    torch.testing.assert_close(out.loss, out.lm_loss + 0.5 * out.aux_loss + 0.001 * out.router_z_loss)  # z-loss: MM1.5's 0.001
    out.loss.backward()
    router = [p for n, p in model.llm.named_parameters() if "gate" in n and "proj" not in n]
    assert router and all(p.grad is not None for p in router)


def test_save_load_identical_logits(tiny_parts, tmp_path):
    spec = ModelSpec(vision=VisionSpec(tiny_parts["vision"]), llm=LLMSpec(tiny_parts["llm"]),
                     connector=ConnectorSpec(num_tokens=4, hidden_size=32, depth=2), tokenizer=tiny_parts["tokenizer"])
    tok = load_tokenizer(spec)
    model = MM15Model.build(spec, tok, crop_size=64).eval()  # 64-px crops on a 32-px tower: interpolated
    ids, mask, _ = _inputs(model)
    pixels = torch.randn(2, 3, 64, 64)
    model.save_pretrained(tmp_path / "m", tok, preprocessing={"max_length": 77})
    loaded, tok2, prep = MM15Model.from_pretrained(tmp_path / "m")
    loaded.eval()
    with torch.no_grad():
        a = model.llm(inputs_embeds=model.embed(ids, pixels)).logits
        b = loaded.llm(inputs_embeds=loaded.embed(ids, pixels)).logits
    assert torch.equal(a, b)
    assert prep == {"max_length": 77} and tok2.convert_tokens_to_ids("<image>") == model.image_token_id
    assert (tmp_path / "m" / "llm" / "model.safetensors").exists()


def test_tiny_words_tokenizer_merges_words_never_digits(tmp_path):
    from transformers import AutoTokenizer

    from mm15.base.tiny import TINY_WORDS, tiny_tokenizer

    plain, words = tiny_tokenizer(), tiny_tokenizer(TINY_WORDS)
    messages = [{"role": "system", "content": "Boxes [x1, y1, x2, y2], points [x, y] on a 1000x1000 canvas."},
                {"role": "user", "content": "What's the UI type of the widget [229, 91]? Ünïcode ✓"},
                {"role": "assistant", "content": "Text field"}]
    text = plain.apply_chat_template(messages, tokenize=False)
    assert words.apply_chat_template(messages, tokenize=False) == text
    ids = words(text)["input_ids"]
    assert words.decode(ids) == text and plain.decode(plain(text)["input_ids"]) == text  # lossless
    assert len(ids) < 0.6 * len(plain(text)["input_ids"])
    pieces = words.convert_ids_to_tokens(ids)
    assert "Ġwidget" in pieces and "Text" in pieces and "Ġfield" in pieces
    assert [p for p in pieces if any(c.isdigit() for c in p) and len(p) > 1] == []  # one token per digit
    with pytest.raises(ValueError, match="digits"):
        tiny_tokenizer(("x1",))
    words.save_pretrained(tmp_path / "tok")  # the from_pretrained path users take
    assert AutoTokenizer.from_pretrained(tmp_path / "tok")(text)["input_ids"] == ids
    spec = ModelSpec(vision=VisionSpec(), llm=LLMSpec(), tokenizer="tiny-words")
    assert load_tokenizer(spec)(text)["input_ids"][:5] == ids[:5]


def test_c_abstractor_position_embedding_std_is_configurable():
    """Honeybee's 0.02 by default; a larger init is an option for from-scratch towers (docs/experiments.md)."""
    torch.manual_seed(0)
    default = CAbstractor(ConnectorSpec(hidden_size=16, depth=1), vision_dim=32, llm_dim=8, num_patches=16)
    strong = CAbstractor(ConnectorSpec(hidden_size=16, depth=1, pos_embed_std=1.0), vision_dim=32, llm_dim=8, num_patches=16)
    assert 0.015 < default.pos_embed.std().item() < 0.025
    assert 0.7 < strong.pos_embed.std().item() < 1.0  # truncated at +-2
