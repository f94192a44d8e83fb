"""Packed rows train exactly like padded ones: on the same samples (images of different shapes, so
different crop counts, and answers of different lengths) the loss and every gradient of the packed
batch equal the padded batch's, for Llama, Qwen2 and MoE LLMs, with `token` and `sample`
reduction and the MoE load-balancing and z-losses; attention never crosses samples; bin packing
and token-budget micro-batches keep their contracts; generation batches stay padded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mm15.base.connector import ConnectorSpec
from mm15.base.data.packing import (PackSpec, TokenBudget, TokenBudgetSampler, budget_batches, pack_collate,
                                    pack_lengths)
from mm15.base.data.processor import MM15Processor
from mm15.base.data.sample import IGNORE_INDEX, Media, Sample, Skip, Turn
from mm15.base.model import LLMSpec, MM15Model, ModelSpec, VisionSpec, crop_tokens, load_tokenizer
from mm15.base.tiny import TINY_VISION

from conftest import tiny_preprocessing

SMALL = {"vocab_size": 262, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512, "tie_word_embeddings": True}
LLMS = {
    "llama": {},
    "qwen2": {},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                  "shared_expert_intermediate_size": 32, "decoder_sparse_step": 1},
}


def build(model_type: str, reduction: str, attn: str = "sdpa") -> MM15Model:
    spec = ModelSpec(vision=VisionSpec(config=dict(TINY_VISION)),
                     llm=LLMSpec(config={"model_type": model_type, **SMALL, **LLMS[model_type]},
                                 loss_reduction=reduction, router_z_loss_weight=0.01, attn_implementation=attn),
                     connector=ConnectorSpec(kind="c_abstractor", num_tokens=4, hidden_size=32, depth=1),
                     tokenizer="tiny")
    torch.manual_seed(0)
    return MM15Model.build(spec, load_tokenizer(spec), crop_size=32)


@pytest.fixture(scope="module")
def items(tmp_path_factory):
    """Six processed samples: 1 to 3 crops, a text-only one, answers of 1 to ~40 tokens."""
    root = tmp_path_factory.mktemp("packing")
    spec = ModelSpec(vision=VisionSpec(config=dict(TINY_VISION)), llm=LLMSpec(config={"model_type": "llama", **SMALL}),
                     connector=ConnectorSpec(kind="c_abstractor", num_tokens=4, hidden_size=32, depth=1), tokenizer="tiny")
    processor = MM15Processor(load_tokenizer(spec), tiny_preprocessing(), crop_tokens(spec, 32))
    rng = np.random.default_rng(0)
    shapes = [(32, 32), (32, 64), (64, 32), (96, 32), None, (32, 32)]
    answers = ["red", "a blue square at the top left", "green " * 8, "no", "just text here " * 3, "yellow circle"]
    out = []
    for k, (shape, answer) in enumerate(zip(shapes, answers)):
        media, prompt = [], "Describe it."
        if shape is not None:
            path = root / f"{k}.png"
            Image.fromarray(rng.integers(0, 255, (*shape, 3), dtype=np.uint8)).save(path)
            media, prompt = [Media(str(path))], "<image>\nDescribe it."
        out.append(processor(Sample(f"s{k}", [Turn("user", prompt), Turn("assistant", answer)], media)))
    return processor, out


def loss_and_grads(model: MM15Model, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor], object]:
    model.zero_grad()
    pixels = batch["pixel_values"].float().div(255)
    out = model(batch["input_ids"], batch["attention_mask"], pixel_values=pixels, labels=batch["labels"],
                position_ids=batch.get("position_ids"), sample_index=batch.get("sample_index"))
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), grads, out


@pytest.mark.parametrize("attn", ["sdpa", "packed_sdpa"])
@pytest.mark.parametrize("reduction", ["token", "sample"])
@pytest.mark.parametrize("model_type", list(LLMS))
def test_packed_loss_and_gradients_equal_padded(items, model_type, reduction, attn):
    """`sdpa`: transformers' block-diagonal mask over each row; `packed_sdpa`: SDPA per sample."""
    processor, processed = items
    model = build(model_type, reduction, attn)
    padded = processor.collate(processed)
    packed = pack_collate(processed, PackSpec(max_tokens=200), processor.tokenizer.pad_token_id)
    assert packed["rows"] < len(processed)  # several samples share a row
    assert packed["input_ids"].numel() < padded["input_ids"].numel()
    loss_a, grads_a, out_a = loss_and_grads(model, padded)
    loss_b, grads_b, out_b = loss_and_grads(model, packed)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 10
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-6, msg=name)
    if "moe" in model_type or model_type == "mixtral":
        assert out_a.aux_loss is not None and out_a.router_z_loss is not None
        torch.testing.assert_close(out_b.aux_loss, out_a.aux_loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out_b.router_z_loss, out_a.router_z_loss, rtol=1e-5, atol=1e-6)
    assert out_b.num_target_tokens == out_a.num_target_tokens


def test_eager_attention_packs_too(items):
    processor, processed = items
    model = build("llama", "sample", attn="eager")
    packed = pack_collate(processed, PackSpec(max_tokens=200, fit="best"), processor.tokenizer.pad_token_id)
    loss_a, grads_a, _ = loss_and_grads(model, processor.collate(processed))
    loss_b, grads_b, _ = loss_and_grads(model, packed)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("attn", ["sdpa", "packed_sdpa"])
def test_attention_stays_inside_each_sample(items, attn):
    """Changing one sample's tokens changes no other sample's hidden states in the packed row."""
    processor, processed = items
    model = build("llama", "token", attn)
    spec = PackSpec(max_tokens=10_000)  # everything in one row
    batch = pack_collate(processed, spec, processor.tokenizer.pad_token_id)
    assert batch["rows"] == 1
    pixels = batch["pixel_values"].float().div(255)

    def hidden(ids):
        embeds = model.embed(ids, pixels)
        decoder = model.llm.get_decoder()
        return decoder(inputs_embeds=embeds, position_ids=batch["position_ids"], use_cache=False).last_hidden_state

    ids = batch["input_ids"].clone()
    first = batch["sample_index"][0] == 0
    changed = ids.clone()
    changed[0, first.nonzero()[-3:, 0]] = 7  # the last tokens of sample 0 (text, not placeholders)
    a, b = hidden(ids), hidden(changed)
    others = (batch["sample_index"][0] > 0)
    torch.testing.assert_close(a[0, others], b[0, others], rtol=0, atol=0)
    assert not torch.equal(a[0, first], b[0, first])


def test_pack_collate_layout(items):
    processor, processed = items
    batch = pack_collate([*processed, Skip("bad", "f.jsonl", "unreadable", "load")], PackSpec(max_tokens=150),
                         processor.tokenizer.pad_token_id)
    assert batch["size"] == len(processed) and len(batch["skipped"]) == 1
    lengths = {x["id"]: len(x["input_ids"]) for x in processed}
    for r in range(batch["rows"]):
        idx = batch["sample_index"][r]
        real = idx >= 0
        assert int(batch["attention_mask"][r].sum()) == int(real.sum()) <= max(150, max(lengths.values()))
        for k in idx[real].unique().tolist():
            pos = batch["position_ids"][r][idx == k]
            assert pos.tolist() == list(range(lengths[batch["ids"][k]]))  # restarts at every sample
            assert batch["labels"][r][idx == k][0] == IGNORE_INDEX
    # crops in row order: the placeholders of the packed rows, read row-major, meet them in order
    n_crops = sum(len(x["pixel_values"]) for x in processed)
    assert len(batch["pixel_values"]) == n_crops
    order = [batch["ids"].index(x["id"]) for x in processed]
    assert sorted(order) == list(range(len(processed)))


def test_first_and_best_fit():
    lengths = [5, 4, 3, 3, 2, 2, 1]
    for fit in ("first", "best"):
        bins = pack_lengths(lengths, 6, fit)
        assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in b) <= 6 for b in bins)
        assert len(bins) == 4  # 20 tokens in bins of 6: the optimum
    assert pack_lengths([9, 2], 6) == [[0], [1]]  # an over-long sample gets its own row
    with pytest.raises(ValueError, match="max_tokens"):
        PackSpec(max_tokens=0)


def test_token_budget_batches_stay_under_budget():
    rng = np.random.default_rng(0)
    lengths = rng.integers(20, 400, 500).tolist() + [1000]
    budget = TokenBudget(max_tokens=1024, buffer=128)
    batches = budget_batches(lengths, list(range(len(lengths))), budget)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) * max(lengths[i] for i in b) <= 1024
    sizes = {len(b) for b in batches}
    assert len(sizes) > 3  # the number of samples varies with their length
    packed = budget_batches(lengths, list(range(len(lengths))), budget, PackSpec(max_tokens=1024))
    assert len(packed) < len(batches)  # one packed row holds more samples than the padded budget
    for b in packed:
        assert len(b) == 1 or sum(lengths[i] for i in b) <= 1024


def test_token_budget_sampler_ranks_and_resume():
    lengths = np.random.default_rng(1).integers(10, 300, 300).tolist()
    budget = TokenBudget(max_tokens=900, buffer=64)
    one = TokenBudgetSampler(lengths, budget, seed=3)
    ranks = [TokenBudgetSampler(lengths, budget, seed=3, num_replicas=2, rank=r) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == len(one) // 2
    assert sorted(map(tuple, list(ranks[0]) + list(ranks[1]))) == sorted(map(tuple, list(one)[: 2 * len(ranks[0])]))
    seen = list(one)
    resumed = TokenBudgetSampler(lengths, budget, seed=3)
    resumed.consumed_batches = 5
    state = resumed.state_dict()
    again = TokenBudgetSampler(lengths, budget, seed=3)
    again.load_state_dict(state)
    assert list(again) == seen[5:]
    with pytest.raises(ValueError, match="num_replicas"):
        ranks[0].load_state_dict(state)


def test_balanced_rows_keep_the_row_count_and_shorten_rows():
    from mm15.base.data.packing import balanced_rows

    lengths = [300, 280, 250, 120, 90, 60]
    loose = pack_lengths(lengths, 2048)
    rows = balanced_rows(lengths, PackSpec(max_tokens=2048))
    assert len(rows) == len(loose) == 1
    rows = balanced_rows(lengths * 3, PackSpec(max_tokens=1024))
    assert len(rows) == len(pack_lengths(lengths * 3, 1024))
    longest_row = max(sum((lengths * 3)[i] for i in r) for r in rows)
    assert longest_row < 1024 and all(sum((lengths * 3)[i] for i in r) <= longest_row for r in rows)
    assert sorted(i for r in rows for i in r) == list(range(18))


def _cli(tmp_path, *overrides):
    from pytorch_lightning import LightningDataModule

    from mm15.base.cli import MM15CLI
    from mm15.base.module import MM15Module

    config = str(Path(__file__).resolve().parents[1] / "configs" / "base" / "demo_packed.yaml")
    return MM15CLI(MM15Module, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                   auto_configure_optimizers=False, run=False,
                   args=["--config", config, "--trainer.enable_progress_bar=false", "--trainer.logger=false",
                         "--trainer.max_steps=4", "--trainer.val_check_interval=4", *overrides])


def test_packed_demo_config_trains_and_generates_padded(tmp_path, monkeypatch):
    """`configs/base/demo_packed.yaml` through the CLI: packed training and validation batches, a
    finite loss, and padded (left) generation batches at test time."""
    monkeypatch.chdir(tmp_path)
    small = [f"--data.init_args.{split}=[{{class_path: mm15.data_builders.synthetic_shapes.SyntheticShapesSource, "
             f"init_args: {{root: data/shapes, split: {split}, num_samples: {n}}}}}]"
             for split, n in (("train", 64), ("val", 16), ("test", 8))]
    cli = _cli(tmp_path, *small)
    seen = []
    original = cli.model.training_step
    cli.model.training_step = lambda batch, batch_idx: (seen.append(batch), original(batch, batch_idx))[1]
    cli.trainer.fit(cli.model, cli.datamodule)
    assert len(seen) == 4 and all("position_ids" in b and b["rows"] < b["size"] for b in seen)
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    cli.trainer.test(cli.model, datamodule=cli.datamodule)
    assert len(cli.model.records) == 8
    test = next(iter(cli.datamodule.test_dataloader()))
    assert "position_ids" not in test and test["attention_mask"][:, -1].all()  # left-padded prompts


def test_token_budget_through_the_cli(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    small = [f"--data.init_args.{split}=[{{class_path: mm15.data_builders.synthetic_shapes.SyntheticShapesSource, "
             f"init_args: {{root: data/shapes, split: {split}, num_samples: {n}}}}}]"
             for split, n in (("train", 96), ("val", 16))]
    cli = _cli(tmp_path, *small, "--data.init_args.token_budget.max_tokens=1024")
    seen = []
    original = cli.model.training_step
    cli.model.training_step = lambda batch, batch_idx: (seen.append(batch["size"]), original(batch, batch_idx))[1]
    cli.trainer.fit(cli.model, cli.datamodule)
    assert len(seen) == 4 and all(n > 0 for n in seen)
    sampler = cli.datamodule.train_sampler
    assert isinstance(sampler, TokenBudgetSampler) and sampler.consumed_batches == 4
    assert all(sum(sampler.lengths[i] for i in b) <= 1024 for b in sampler.batches())


def test_packed_sdpa_leaves_padded_batches_and_generation_to_sdpa(items):
    """Without restarts in the position ids (padded rows, generation) `packed_sdpa` is SDPA."""
    from mm15.base.attention import segments

    processor, processed = items
    a, b = build("llama", "sample", "sdpa"), build("llama", "sample", "packed_sdpa")
    padded = processor.collate(processed)
    loss_a, _, _ = loss_and_grads(a, padded)
    loss_b, _, _ = loss_and_grads(b, padded)
    assert loss_a == loss_b
    prompts = processor.collate(processed[:2], padding_side="left")
    pixels = prompts["pixel_values"].float().div(255)
    kwargs = dict(pixel_values=pixels, max_new_tokens=5, do_sample=False)
    assert torch.equal(a.generate(prompts["input_ids"], prompts["attention_mask"], **kwargs),
                       b.generate(prompts["input_ids"], prompts["attention_mask"], **kwargs))
    assert segments(torch.arange(6).view(1, 6)) is None
    assert segments(torch.tensor([[0, 1, 2, 0, 1, 0]])) == [[(0, 3), (3, 5), (5, 6)]]
