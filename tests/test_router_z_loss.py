"""MoE router z-loss (MM1.5: weight 0.001) beside the load-balancing loss, for the MoE families
transformers ships: the value equals a hand computation from the router logits (the mean over the
non-padding tokens of every MoE layer of logsumexp(logits)^2) and enters the loss at its weight."""

from __future__ import annotations

import math

import pytest
import torch

from mm15.base.connector import ConnectorSpec
from mm15.base.model import LLMSpec, MM15Model, ModelSpec, VisionSpec, load_tokenizer, router_z_loss
from mm15.base.tiny import TINY_VISION

SMALL = {"vocab_size": 262, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512, "tie_word_embeddings": True}
MOE = {
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                  "shared_expert_intermediate_size": 32, "decoder_sparse_step": 1},
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "head_dim": 8,
                  "decoder_sparse_step": 1},
    "olmoe": {"num_experts": 4, "num_experts_per_tok": 2},
}


def moe_model(model_type: str, **llm) -> MM15Model:
    spec = ModelSpec(vision=VisionSpec(config=dict(TINY_VISION)),
                     llm=LLMSpec(config={"model_type": model_type, **SMALL, **MOE[model_type]}, **llm),
                     connector=ConnectorSpec(kind="mlp"), tokenizer="tiny")
    torch.manual_seed(0)
    return MM15Model.build(spec, load_tokenizer(spec), crop_size=32)


@pytest.mark.parametrize("model_type", list(MOE))
def test_z_loss_is_the_mean_squared_logsumexp_of_the_router_logits(model_type):
    model = moe_model(model_type)
    ids = torch.randint(0, 250, (2, 6))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding: those tokens do not count
    out = model(ids, mask, labels=ids)
    embeds = model.llm.get_input_embeddings()(ids)
    with torch.no_grad():
        logits = model.llm.get_decoder()(inputs_embeds=embeds, attention_mask=mask, output_router_logits=True).router_logits
    by_hand = []
    for layer in logits:  # (B * T, E) per MoE layer
        for row, keep in zip(layer, mask.reshape(-1)):
            if keep:
                by_hand.append(math.log(sum(math.exp(x) for x in row.tolist())) ** 2)
    assert len(logits) == 2 and len(by_hand) == 2 * 10
    assert out.router_z_loss.item() == pytest.approx(sum(by_hand) / len(by_hand), rel=1e-5)
    spec = model.spec.llm
    assert spec.router_z_loss_weight == 0.001  # MM1.5's weight by default
    torch.testing.assert_close(out.loss, out.lm_loss + spec.router_aux_loss_weight * out.aux_loss
                               + 0.001 * out.router_z_loss)


def test_z_loss_weight_is_configurable_and_reaches_the_router():
    model = moe_model("mixtral", router_z_loss_weight=1.0, router_aux_loss_weight=0.0)
    ids = torch.randint(0, 250, (1, 5))
    out = model(ids, torch.ones_like(ids), labels=ids)
    torch.testing.assert_close(out.loss, out.lm_loss + out.router_z_loss)
    out.router_z_loss.backward()
    gates = [p for n, p in model.llm.named_parameters() if n.endswith("mlp.gate.weight")]
    assert gates and all(p.grad is not None and p.grad.abs().sum() > 0 for p in gates)


def test_dense_models_have_no_router_losses():
    spec = ModelSpec(vision=VisionSpec(config=dict(TINY_VISION)), llm=LLMSpec(config={"model_type": "llama", **SMALL}),
                     connector=ConnectorSpec(kind="mlp"), tokenizer="tiny")
    model = MM15Model.build(spec, load_tokenizer(spec), crop_size=32)
    ids = torch.randint(0, 250, (1, 5))
    out = model(ids, torch.ones_like(ids), labels=ids)
    assert out.router_z_loss is None and out.aux_loss is None and torch.equal(out.loss, out.lm_loss)
    assert router_z_loss(None) is None and router_z_loss(()) is None
