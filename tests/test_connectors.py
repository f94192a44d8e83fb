"""Cambrian-1's Spatial Vision Aggregator, AnyMAL's Perceiver resampler and several towers at once:
parameter counts against formulas derived by hand, shapes, window locality, token counts from the one
count function, save/load, FSDP2 / FSDP1 units, and bad input named with what to change."""

from __future__ import annotations

import socket

import pytest
import torch

from mm15.base.aggregators import PerceiverResampler, ResamplerLayer, SpatialVisionAggregator, SVALayer
from mm15.base.connector import ConnectorSpec, tokens_per_crop
from mm15.base.families import TOWERS
from mm15.base.model import LLMSpec, MM15Model, ModelSpec, TowerSpec, VisionSpec, crop_tokens, load_tokenizer
from mm15.base.tiny import TINY_LLM

SIGLIP_FINE = {**TOWERS["siglip"], "patch_size": 4, "hidden_size": 24}  # 8 x 8 patches at 32 px
DINO_LARGE = {**TOWERS["dinov2"], "image_size": 64, "hidden_size": 16}  # 8 x 8 patches at its native 64 px


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("dims,sides,g,layers", [([32, 24], [4, 8], 2, 3), ([16], [6], 3, 1), ([8, 8, 8], [2, 4, 6], 2, 2)])
def test_sva_parameter_count_matches_the_formula(dims, sides, g, layers):
    w, d_llm, heads = 32, 40, 4
    spec = ConnectorSpec(kind="sva", hidden_size=w, depth=layers, num_heads=heads, query_grid=g)
    sva = SpatialVisionAggregator(spec, dims, d_llm, [s * s for s in sides])
    n, windows = len(dims), [s // g for s in sides]
    per_tower = sum(d * w + w + w * w + w + 2 * w for d in dims)  # Linear(d, W), Linear(W, W), LayerNorm(W)
    per_layer = (w * w + 2 * w * w  # proj_context W->W, proj_in 2W->W (no biases)
                 + sum(k * k * w for k in windows if k > 1)  # window position tables
                 + 2 * w + w * w  # q: LayerNorm + Linear
                 + n * 2 * (2 * w + w * w)  # k and v per tower: LayerNorm + Linear
                 + w * w + 2 * w + 2 * w * w)  # o_proj, norm, MLP W->W->W
    readout = w * d_llm + d_llm + d_llm * d_llm + d_llm
    assert count(sva) == g * g * w + per_tower + layers * per_layer + readout


@pytest.mark.parametrize("latents,layers,vision_dim", [(64, 3, 48), (4, 1, 32)])
def test_resampler_parameter_count_matches_the_formula(latents, layers, vision_dim):
    w, d_llm = 32, 40
    spec = ConnectorSpec(kind="resampler", hidden_size=w, depth=layers, num_heads=4, num_latents=latents)
    per_layer = 2 * w + 2 * w + w * w + 2 * w * w + w * w + 2 * w + 4 * w * w + 4 * w * w  # norms, q, kv, out, FFN
    expected = vision_dim * w + w + latents * w + layers * per_layer + 2 * w + w * d_llm + d_llm
    assert count(PerceiverResampler(spec, vision_dim, d_llm, 16)) == expected


def test_sva_defaults_are_cambrians_and_shapes_follow_the_query_grid():
    spec = ConnectorSpec(kind="sva")
    assert (spec.query_grid, spec.hidden_size, spec.num_heads, spec.depth) == (24, 1024, 16, 3)
    assert tokens_per_crop(spec, 336, 14) == 576
    small = ConnectorSpec(kind="sva", hidden_size=16, depth=2, num_heads=2, query_grid=2)
    sva = SpatialVisionAggregator(small, [8, 12], 10, [16, 64])
    assert sva([torch.randn(3, 16, 8), torch.randn(3, 64, 12)]).shape == (3, 4, 10)


def test_sva_query_reads_only_its_own_window():
    """Query (0, 0) sees rows 0-3 / columns 0-3 of the 8 x 8 map; changing the rest leaves its token
    alone and moves query (1, 1)'s. (The context vector comes from the first tower only.)"""
    torch.manual_seed(0)
    spec = ConnectorSpec(kind="sva", hidden_size=16, depth=2, num_heads=2, query_grid=2)
    sva = SpatialVisionAggregator(spec, [8, 8], 8, [16, 64]).eval()
    first, second = torch.randn(1, 16, 8), torch.randn(1, 64, 8)
    changed = second.clone().reshape(1, 8, 8, 8)
    changed[:, 4:, :] += 1.0
    changed[:, :, 4:] += 1.0
    a, b = sva([first, second]), sva([first, changed.reshape(1, 64, 8)])
    torch.testing.assert_close(a[:, 0], b[:, 0])
    assert not torch.allclose(a[:, 3], b[:, 3])


def test_resampler_gives_its_latents_and_ignores_token_order():
    """No position table of its own: where a patch is must come from the tower's features."""
    torch.manual_seed(0)
    spec = ConnectorSpec(kind="resampler", hidden_size=16, depth=2, num_heads=2, num_latents=5)
    res = PerceiverResampler(spec, 12, 8, 16).eval()
    feats = torch.randn(2, 16, 12)
    out = res(feats)
    assert out.shape == (2, 5, 8) and tokens_per_crop(spec, 32, 8) == 5
    torch.testing.assert_close(res(feats[:, torch.randperm(16)]), out, atol=1e-5, rtol=1e-5)


def several_towers(connector: ConnectorSpec, grid: int | None = None, **tower) -> ModelSpec:
    return ModelSpec(vision=VisionSpec(towers=[TowerSpec(config=TOWERS["clip"]), TowerSpec(config=SIGLIP_FINE, **tower),
                                               TowerSpec(config=DINO_LARGE)], grid=grid),
                     llm=LLMSpec(config=dict(TINY_LLM)), connector=connector, tokenizer="tiny")


@pytest.mark.parametrize("connector,tokens", [
    (ConnectorSpec(kind="sva", hidden_size=16, depth=1, num_heads=2, query_grid=2), 4),
    (ConnectorSpec(kind="mlp"), 16),  # maps resized to the smallest, 4 x 4, and concatenated
    (ConnectorSpec(kind="resampler", hidden_size=16, depth=1, num_heads=2, num_latents=6), 6),
])
def test_several_towers_each_at_its_resolution_save_and_load(connector, tokens, tmp_path):
    spec = several_towers(connector)
    assert crop_tokens(spec, 32) == tokens
    tok = load_tokenizer(spec)
    torch.manual_seed(0)
    model = MM15Model.build(spec, tok, crop_size=32).eval()
    assert model.vision.sides == [4, 8, 8] and model.vision.resolutions == [32, 32, 64]
    assert [len(t.encoder.layer if hasattr(t.encoder, "layer") else t.encoder.layers) for t in model.vision.towers] == [1, 1, 1]
    pixels = torch.randn(3, 3, 32, 32)
    maps = model.vision(pixels)
    assert [m.shape for m in maps] == [(3, 16, 32), (3, 64, 24), (3, 64, 16)]  # CLS dropped (CLIP, DINOv2)
    features = model.encode_media(pixels)
    assert features.shape == (3, tokens, TINY_LLM["hidden_size"])
    model.save_pretrained(tmp_path / "m", tok)
    assert sorted(p.name for p in (tmp_path / "m" / "vision").iterdir()) == ["tower_0", "tower_1", "tower_2"]
    loaded, _, _ = MM15Model.from_pretrained(tmp_path / "m")
    torch.testing.assert_close(loaded.eval().encode_media(pixels), features, rtol=0, atol=0)


def test_concatenation_grid_is_configurable():
    spec = several_towers(ConnectorSpec(kind="c_abstractor", num_tokens=4, hidden_size=16, depth=1), grid=4)
    model = MM15Model.build(spec, load_tokenizer(spec), crop_size=32)
    assert model.connector.pos_embed.shape == (1, 16, 32 + 24 + 16)  # 4 x 4 grid, channels of all three


def test_fsdp2_units_cover_tower_blocks_connector_layers_and_connector(monkeypatch):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule

    from mm15.base.training.sharding import shard_model

    spec = several_towers(ConnectorSpec(kind="sva", hidden_size=16, depth=2, num_heads=2, query_grid=2))
    model = MM15Model.build(spec, load_tokenizer(spec), crop_size=32)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")  # a one-process gloo group, torn down below
    monkeypatch.setenv("MASTER_PORT", str(port))
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    try:
        shard_model(model, init_device_mesh("cpu", (1,)))
        units = {n for n, m in model.named_modules() if isinstance(m, FSDPModule)}
        ids = torch.tensor([[5] + [model.image_token_id] * 4 + [6]])
        features = model.encode_media(torch.randn(1, 3, 32, 32))  # as MM15Module does: before the forward
        out = model(ids, torch.ones_like(ids), media_features=features, labels=ids)
        out.loss.backward()
    finally:
        torch.distributed.destroy_process_group()
    assert {"", "connector", "connector.layers.0", "connector.layers.1"} <= units
    assert {"vision.towers.0.encoder.layers.0", "vision.towers.1.encoder.layers.0", "vision.towers.2.encoder.layer.0"} <= units
    assert {"llm.model.layers.0", "llm.model.layers.1"} <= units
    assert not any(n.startswith("vision") and "layer" not in n for n in units)  # towers are not units
    assert model.connector.queries.grad is not None


def test_fsdp1_policy_wraps_the_attention_connectors_and_their_layers():
    from mm15.base.training.sharding import fsdp1_auto_wrap_policy

    sva = SpatialVisionAggregator(ConnectorSpec(kind="sva", hidden_size=8, depth=1, num_heads=2, query_grid=1), [4], 8, [4])
    res = PerceiverResampler(ConnectorSpec(kind="resampler", hidden_size=8, depth=1, num_heads=2, num_latents=2), 4, 8, 4)
    for module in (sva, sva.layers[0], res, res.layers[0]):
        assert isinstance(module, (SpatialVisionAggregator, SVALayer, PerceiverResampler, ResamplerLayer))
        assert fsdp1_auto_wrap_policy(module, recurse=False, nonwrapped_numel=0)
    assert not fsdp1_auto_wrap_policy(sva.readout, recurse=False, nonwrapped_numel=0)


# ----- bad input, named with what to change ------------------------------------------------------
def test_sva_query_grid_that_does_not_divide_the_maps_is_refused():
    spec = several_towers(ConnectorSpec(kind="sva", hidden_size=16, depth=1, num_heads=2, query_grid=3))
    with pytest.raises(ValueError, match=r"3 x 3 query grid .* tower 0: 4 x 4; tower 1: 8 x 8; tower 2: 8 x 8.*divides 4"):
        MM15Model.build(spec, load_tokenizer(spec), crop_size=32)


def test_towers_whose_maps_cannot_be_aligned_are_refused():
    spec = several_towers(ConnectorSpec(kind="mlp"), grid=8)
    with pytest.raises(ValueError, match=r"cannot be aligned on a 8 x 8 grid .* vision.towers\[0\] gives 4 x 4.*at most 4"):
        crop_tokens(spec, 32)
    off_grid = several_towers(ConnectorSpec(kind="mlp"), resolution=30)
    with pytest.raises(ValueError, match=r"vision.towers\[1\] .* 30 px, not a multiple of its patch size 4.*28 or 32"):
        crop_tokens(off_grid, 32)


def test_resampler_with_more_latents_than_the_context_is_refused():
    spec = ModelSpec(vision=VisionSpec(config=TOWERS["clip"]),
                     llm=LLMSpec(config={**TINY_LLM, "max_position_embeddings": 64}),
                     connector=ConnectorSpec(kind="resampler", hidden_size=16, depth=1, num_heads=2, num_latents=100),
                     tokenizer="tiny")
    with pytest.raises(ValueError, match=r"100 tokens per crop, more than the LLM's context of 64 .*connector.num_latents"):
        MM15Model.build(spec, load_tokenizer(spec), crop_size=32)


def test_processor_refuses_crops_longer_than_max_length():
    from mm15.base.data.processor import MM15Processor, PreprocessSpec

    with pytest.raises(ValueError, match=r"600 placeholder tokens, more than preprocessing.max_length 512"):
        MM15Processor(load_tokenizer(ModelSpec(tokenizer="tiny")), PreprocessSpec(max_length=512), 600)


def test_unknown_family_template_is_refused_with_the_choices():
    with pytest.raises(ValueError, match=r"unknown model family 'gpt9'.*llama3, qwen2, .*tiny:llama3"):
        load_tokenizer(ModelSpec(tokenizer="tiny:gpt9"))


def test_single_tower_specs_and_saved_dicts_still_parse():
    old = {"name_or_path": "vision", "config": None, "feature_layer": -1}  # a model directory written before towers
    spec = VisionSpec(**old)
    assert spec.towers == [] and spec.grid is None
    assert VisionSpec(towers=[{"config": TOWERS["clip"], "resolution": 64}]).towers[0] == TowerSpec(config=TOWERS["clip"], resolution=64)


def test_anymal_alignment_config_trains_only_the_resampler_and_needs_cuda_for_its_4_bit_llm(tmp_path):
    """configs/base/align_resampler.yaml as written (parsed by tests/test_configs.py too), with tiny parts
    in place of the hub weights: on CPU the 4-bit LLM is refused saying what to change; without it only
    the resampler trains."""
    import yaml

    from test_scaleout_units import ROOT, _stage_module

    config = yaml.safe_load((ROOT / "configs" / "base" / "align_resampler.yaml").read_text())["model"]["init_args"]
    assert config["model"]["connector"]["kind"] == "resampler" and 64 <= config["model"]["connector"]["num_latents"] <= 256
    assert config["quantization"]["bits"] in (4, 8) and config["freeze"] == {"vision": True, "connector": False, "llm": True}
    tiny = {"vision": {"config": TOWERS["clip"]}, "llm": {"config": dict(TINY_LLM)}, "tokenizer": "tiny",
            "connector": {"kind": "resampler", "num_latents": 4, "hidden_size": 32, "num_heads": 4, "depth": 1}}
    with pytest.raises(RuntimeError, match=r"quantization \(QLoRA, 4-bit LLM\) needs a CUDA GPU and bitsandbytes"):
        _stage_module("align_resampler.yaml", tmp_path, model=tiny)
    module = _stage_module("align_resampler.yaml", tmp_path, model=tiny, quantization=None)
    assert {n.split(".")[0] for n, p in module.model.named_parameters() if p.requires_grad} == {"connector"}
    assert module.processor.tokens_per_crop == 4


def test_several_towers_take_lora_and_activation_checkpointing(tmp_path):
    from mm15.base.training.adapters import LoraSpec, apply_lora
    from mm15.base.training.sharding import enable_activation_checkpointing

    spec = several_towers(ConnectorSpec(kind="sva", hidden_size=16, depth=1, num_heads=2, query_grid=2))
    tok = load_tokenizer(spec)
    model = apply_lora(MM15Model.build(spec, tok, crop_size=32), LoraSpec(r=2, init="random", vision_target_modules=["q_proj"]))
    enable_activation_checkpointing(model)
    assert all(t.is_gradient_checkpointing for t in model.vision.get_base_model().towers)
    pixels = torch.randn(2, 3, 32, 32)
    model.train()
    model.encode_media(pixels).sum().backward()
    adapted = [n for n, p in model.vision.named_parameters() if "lora_" in n]
    assert adapted and all(p.grad is not None for n, p in model.vision.named_parameters() if "lora_" in n)
    model.eval()
    with torch.no_grad():
        before = model.encode_media(pixels)
        model.vision = model.vision.merge_and_unload()
        torch.testing.assert_close(model.encode_media(pixels), before, atol=1e-5, rtol=1e-5)
    model.vision.save_pretrained(tmp_path / "vision")
    assert (tmp_path / "vision" / "tower_1" / "model.safetensors").exists()
