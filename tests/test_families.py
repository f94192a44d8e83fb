"""The compatibility matrix: each tower and each LLM family users pick, built at tiny random init
(`mm15.base.families`), fitted for 2 steps with LoRA, exported as an adapter and as a merged model
directory, reloaded both ways and used to generate.

A reload must give the trained module's loss on the same batch (to 1e-5: the merged directory folds
LoRA into the weights), and the adapter must be a plain PEFT adapter of its base LLM. The default run
takes each LLM once, with the towers and connectors rotating so every tower and connector appears;
`-m slow` runs every tower with every LLM.
"""

from __future__ import annotations

import json

import pytest
import pytorch_lightning as pl
import torch

from mm15.base.connector import ConnectorSpec
from mm15.base.data.datamodule import MM15DataModule
from mm15.base.data.processor import PreprocessSpec
from mm15.base.data.splitting import SplitSpec
from mm15.base.families import FAMILIES, TOWERS, family_llm_config
from mm15.base.model import LLMSpec, MM15Model, ModelSpec, TowerSpec, VisionSpec
from mm15.base.module import MM15Module
from mm15.base.training.adapters import LoraSpec
from mm15.base.training.export import export_adapter, export_merged
from mm15.data_builders.synthetic_shapes import SyntheticShapesSource

CONNECTORS = {
    "c_abstractor": ConnectorSpec(kind="c_abstractor", num_tokens=4, hidden_size=32, depth=1),
    "mlp": ConnectorSpec(kind="mlp"),
    "sva": ConnectorSpec(kind="sva", hidden_size=32, depth=1, num_heads=4, query_grid=2),
    "resampler": ConnectorSpec(kind="resampler", hidden_size=32, depth=1, num_heads=4, num_latents=4),
}
TOWER_NAMES = list(TOWERS)
LLM_NAMES = list(FAMILIES)
# Default run: LLM i with tower i mod 4 and connector i mod 4 (9 LLMs: every tower and connector twice or more).
DEFAULT = [(TOWER_NAMES[i % 4], llm, list(CONNECTORS)[i % 4]) for i, llm in enumerate(LLM_NAMES)]


def vision_of(tower: str) -> VisionSpec:
    if tower == "all":  # the four towers at once, each at its own resolution (Cambrian-1)
        return VisionSpec(towers=[TowerSpec(config=TOWERS[t], resolution=r)
                                  for t, r in zip(TOWER_NAMES, (32, 32, 32, 64))])
    return VisionSpec(config=dict(TOWERS[tower]))


def build_module(tower: str, llm: str, connector: str, **kwargs) -> MM15Module:
    llm_spec = LLMSpec(config=family_llm_config(llm), attn_implementation=FAMILIES[llm].attn_implementation)
    spec = ModelSpec(vision=vision_of(tower), llm=llm_spec,
                     connector=CONNECTORS[connector], tokenizer=f"tiny:{llm}")
    # A system prompt, so templates without a system role (Gemma 2, Mistral) fold it into the user turn.
    prep = PreprocessSpec(split=SplitSpec(crop_size=32, mode="dynamic", grid_min=1, grid_max=2), max_length=512,
                          system_prompt="Answer in one or two words.")
    return MM15Module(model=spec, preprocessing=prep, lora=LoraSpec(r=2, alpha=4, dropout=0.0), **kwargs,
                      optimizer=lambda groups: torch.optim.AdamW(groups, lr=1e-3))


def batch_of(module: MM15Module, data: MM15DataModule, generate: bool) -> dict:
    items = [module.processor(s, generate=generate) for s in data.samples["train"][:2]]
    return module.processor.collate(items, padding_side="left" if generate else "right")


def loss_of(module: MM15Module, batch: dict) -> torch.Tensor:
    module.eval()
    with torch.no_grad():
        return module({k: (v.clone() if torch.is_tensor(v) else v) for k, v in batch.items()}).loss


def check_combination(tower: str, llm: str, connector: str, tmp_path, shapes_root) -> None:
    torch.manual_seed(0)
    module = build_module(tower, llm, connector)
    data = MM15DataModule(train=[SyntheticShapesSource(str(shapes_root), "train", num_samples=8, max_side=64)],
                          batch_size=2)
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, data)
    assert trainer.global_step == 2
    batch = batch_of(module, data, generate=False)
    trained = loss_of(module, batch)
    assert torch.isfinite(trained)
    replies = module.generate(batch_of(module, data, generate=True))
    assert len(replies) == 2 and all(isinstance(r, str) for r in replies)

    adapter = export_adapter(module, tmp_path / "adapter")
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 2
    merged = export_merged(module, tmp_path / "merged")
    reloaded = MM15Module(pretrained=str(merged))
    reloaded.configure_model()
    torch.testing.assert_close(loss_of(reloaded, batch), trained, atol=1e-5, rtol=1e-5)
    assert len(reloaded.generate(batch_of(reloaded, data, generate=True))) == 2
    from_adapter = MM15Module(adapter=str(adapter))
    from_adapter.configure_model()
    torch.testing.assert_close(loss_of(from_adapter, batch), trained, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    return tmp_path_factory.mktemp("shapes")


@pytest.mark.parametrize("tower,llm,connector", DEFAULT, ids=[f"{t}-{l}-{c}" for t, l, c in DEFAULT])
def test_family_builds_fits_saves_reloads_generates_exports(tower, llm, connector, tmp_path, shapes_root):
    check_combination(tower, llm, connector, tmp_path, shapes_root)


def test_four_towers_at_once_with_the_sva(tmp_path, shapes_root):
    check_combination("all", "llama3", "sva", tmp_path, shapes_root)


@pytest.mark.slow
@pytest.mark.parametrize("tower", TOWER_NAMES)
@pytest.mark.parametrize("llm", LLM_NAMES)
def test_every_tower_with_every_family(tower, llm, tmp_path, shapes_root):
    check_combination(tower, llm, "c_abstractor", tmp_path, shapes_root)


def test_default_run_takes_every_tower_llm_and_connector():
    assert {t for t, _, _ in DEFAULT} == set(TOWERS) and [l for _, l, _ in DEFAULT] == LLM_NAMES
    assert {c for _, _, c in DEFAULT} == set(CONNECTORS)
    assert any(FAMILIES[l].llm.get("num_experts") for l in LLM_NAMES)  # an MoE family among them


def test_moe_family_trains_its_router_with_both_losses():
    module = build_module("clip", "qwen3_moe", "mlp")
    module.configure_model()
    assert module.model._is_moe
    ids = torch.tensor([[5, 6, 7, 8]])
    out = module.model(ids, torch.ones_like(ids), labels=ids)
    assert out.aux_loss is not None and out.router_z_loss is not None  # also under PEFT's wrapper
    spec = module.model.spec.llm
    torch.testing.assert_close(out.loss, out.lm_loss + spec.router_aux_loss_weight * out.aux_loss
                               + spec.router_z_loss_weight * out.router_z_loss)
