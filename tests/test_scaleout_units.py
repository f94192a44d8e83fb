"""Scale-out building blocks in one process: LoRA/DoRA freezing and merging, QLoRA refusal, the
text-only keep-alive pass, the resumable sampler, atomic checkpoint writes, checkpoint and adapter
refusals, stage configs (freezing contract under align and sft_lora), strategy refusals."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from pytorch_lightning import LightningDataModule, Trainer

from mm15.base.connector import ConnectorSpec
from mm15.base.model import LLMSpec, MM15Model, ModelSpec, VisionSpec, load_tokenizer
from mm15.base.training.adapters import LoraSpec, QuantSpec, apply_lora, check_fingerprint, weight_fingerprint
from mm15.base.training.checkpointing import AtomicCheckpointIO, swap_in_directory
from mm15.base.cli import MM15CLI
from mm15.base.module import Components, MM15Module
from mm15.base.training.resumable import ResumableSampler, accumulation_for
from mm15.base.data.sample import Media, Sample, Turn

from conftest import tiny_preprocessing, tiny_spec

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "i.png"
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (40, 60, 3), dtype=np.uint8)).save(path)
    return str(path)


def _samples(image_path):
    image = Sample("img", [Turn("user", "<image>\nWhat?"), Turn("assistant", "red")], [Media(image_path)])
    text = Sample("txt", [Turn("user", "Count to 3."), Turn("assistant", "1 2 3")], [])
    return image, text


def _batch(module, *samples):
    return module.processor.collate([module.processor(s) for s in samples])


def _module(**kwargs):
    torch.manual_seed(0)
    module = MM15Module(model=tiny_spec(), preprocessing=tiny_preprocessing(), **kwargs)
    module.configure_model()
    return module


# ----- LoRA / DoRA / QLoRA ------------------------------------------------------------------------
@pytest.mark.parametrize("dora", [False, True])
def test_freezing_contract_under_lora(image_path, dora):
    module = _module(lora=LoraSpec(r=4, use_dora=dora, init="random"), freeze=Components(vision=True))
    optimizer = module.optimizer_factory(module.parameter_groups())
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    module(_batch(module, *_samples(image_path))).loss.backward()
    trainable = {n for n, p in module.model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in module.model.named_parameters() if p.grad is not None}
    assert all(n.startswith("connector.") or "lora_" in n for n in trainable)
    assert any("lora_magnitude_vector" in n for n in trainable) == dora
    assert {n.split(".")[0] for n in trainable} == {"connector", "llm"}
    optimizer.step()
    for name, p in module.model.named_parameters():
        assert torch.equal(p, before[name]) != (name in trainable), name  # frozen bit-identical, trainable moved


def test_lora_on_the_tower_and_merge_keeps_outputs(image_path):
    module = _module(lora=LoraSpec(r=4, use_dora=True, init="random", vision_target_modules=["q_proj", "v_proj"]))
    assert any("lora_" in n and p.requires_grad for n, p in module.model.vision.named_parameters())
    batch = _batch(module, *_samples(image_path))
    module.eval()  # LoRA dropout off
    with torch.no_grad():
        adapted = module(copy.deepcopy(batch)).loss
        module.model.llm = module.model.llm.merge_and_unload()
        module.model.vision = module.model.vision.merge_and_unload()
        merged = module(batch).loss
    assert not any("lora_" in n for n, _ in module.model.named_parameters())
    assert torch.allclose(adapted, merged, atol=1e-5), (adapted, merged)


def test_lora_spec_defaults_target_llama_qwen_projections():
    config = LoraSpec().to_peft()
    assert set(config.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert config.task_type == "CAUSAL_LM" and not config.use_dora


def test_qlora_is_refused_on_cpu_with_what_to_change():
    module = MM15Module(model=tiny_spec(), preprocessing=tiny_preprocessing(), lora=LoraSpec(),
                        quantization=QuantSpec(bits=4))
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    module.trainer = trainer
    with pytest.raises(RuntimeError, match="needs a CUDA GPU and bitsandbytes.*Remove `model.init_args.quantization`"):
        module.configure_model()


# ----- mixed-modality batches ----------------------------------------------------------------------
def test_text_only_batch_still_runs_tower_and_connector_contributing_zero(image_path):
    module = _module(freeze=Components(vision=False))
    _, text = _samples(image_path)
    batch = _batch(module, text, text)
    out = module(copy.deepcopy(batch))
    out.loss.backward()
    media_params = [p for part in (module.model.vision, module.model.connector) for p in part.parameters()
                    if p.requires_grad]
    assert media_params and all(p.grad is not None for p in media_params)  # same collectives on every rank
    assert all(float(p.grad.abs().sum()) == 0.0 for p in media_params)  # ... contributing nothing
    with torch.no_grad():
        plain = module.model(batch["input_ids"], batch["attention_mask"], labels=batch["labels"]).loss
    assert torch.equal(out.loss.detach(), plain)


# ----- data position -------------------------------------------------------------------------------
def _dealt(n, micro, world, epoch=0, state=None):
    batches = []
    for rank in range(world):
        s = ResumableSampler(range(n), micro, num_replicas=world, rank=rank, seed=3)
        s.set_epoch(epoch)
        if state:
            s.load_state_dict(state)
        idx = list(s)
        batches.append([idx[i:i + micro] for i in range(0, len(idx), micro)])
    return [b for round_ in zip(*batches) for b in round_]  # micro-batches in global order


def test_sampler_gives_every_world_size_the_same_global_order():
    one, two, four = _dealt(37, 2, 1), _dealt(37, 2, 2), _dealt(37, 2, 4)
    assert one[:16] == two[:16] == four[:16]
    assert len({i for b in one for i in b}) == len([i for b in one for i in b])  # no repeats in an epoch
    assert _dealt(37, 2, 2, epoch=1) != two


def test_sampler_resumes_after_consumed_samples_even_with_another_world_size():
    full = _dealt(40, 2, 1)
    s = ResumableSampler(range(40), 2, num_replicas=2, rank=0, seed=3)
    for _ in range(4):
        s.note_batch()
    state = s.state_dict()
    assert state["consumed_samples"] == 16
    assert _dealt(40, 2, 1, state=state) == full[8:]  # 2 processes -> 1 process, same global batch
    assert _dealt(40, 2, 4, state=state) == full[8:]  # 2 processes -> 4 processes


def test_sampler_refuses_a_state_from_other_data():
    s = ResumableSampler(range(40), 2, seed=3)
    with pytest.raises(ValueError, match="dataset_size=50.*start a new run"):
        s.load_state_dict({**s.state_dict(), "dataset_size": 50})
    with pytest.raises(ValueError, match="not a multiple of micro-batch 4"):
        ResumableSampler(range(40), 4, seed=3).load_state_dict({**s.state_dict(), "consumed_samples": 6})


def test_accumulation_from_global_batch():
    assert accumulation_for(256, 4, 8) == 8
    with pytest.raises(ValueError, match="not a multiple of batch_size 4 x 3 processes"):
        accumulation_for(256, 4, 3)


# ----- atomic writes -------------------------------------------------------------------------------
class _FailingIO(AtomicCheckpointIO):
    def write(self, checkpoint, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")


def test_interrupted_write_leaves_previous_checkpoint_as_last(tmp_path):
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1}, path)
    with pytest.raises(OSError):
        _FailingIO().save_checkpoint({"step": 2}, path)
    assert torch.load(path, weights_only=True) == {"step": 1}
    from pytorch_lightning.callbacks import ModelCheckpoint

    names = {Path(p).name for p in ModelCheckpoint(dirpath=tmp_path)._find_last_checkpoints(None)}
    assert names == {"last.ckpt"}  # `ckpt_path="last"` never picks the partial file


def test_directory_checkpoints_are_swapped_atomically(tmp_path):
    path = tmp_path / "last.ckpt"
    for step in (1, 2):
        written = tmp_path / f".last.ckpt.{step}.d"
        written.mkdir()
        (written / "meta.pt").write_text(str(step))
        swap_in_directory(written, path)
    assert (path / "meta.pt").read_text() == "2" and path.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".last.ckpt.2.d", "last.ckpt"]


# ----- refusals ------------------------------------------------------------------------------------
def test_checkpoint_of_another_config_is_refused_naming_the_difference():
    trained = _module(lora=LoraSpec(r=4))
    checkpoint = {"state_dict": trained.state_dict()}
    trained.on_save_checkpoint(checkpoint)
    assert all("lora_" in k or ".connector." in k or "vision" in k or "rotary" in k
               for k in checkpoint["state_dict"])  # frozen weights are not saved
    _module(lora=LoraSpec(r=4)).check_checkpoint(checkpoint)  # same config: accepted
    with pytest.raises(ValueError, match=r"another configuration:\n  lora.r: 4 -> 8"):
        _module(lora=LoraSpec(r=8)).check_checkpoint(checkpoint)
    other_base = _module(lora=LoraSpec(r=4))
    with torch.no_grad():
        other_base.model.llm.get_base_model().lm_head.weight.mul_(2)
    other_base._frozen_fingerprint = weight_fingerprint(other_base.model)
    with pytest.raises(ValueError, match="frozen base tensors differ"):
        other_base.check_checkpoint(checkpoint)


def test_checkpoint_from_before_a_new_setting_is_accepted_at_its_default():
    """A checkpoint written before a spec field existed ran as its default does: accepted while the
    run keeps the default, refused (naming it) when the run sets it otherwise."""
    trained = _module(lora=LoraSpec(r=4))
    checkpoint = {"state_dict": trained.state_dict()}
    trained.on_save_checkpoint(checkpoint)
    del checkpoint["mm15_run"]["model"]["llm"]["loss_reduction"]  # as written before the field existed
    del checkpoint["mm15_run"]["lora"]["dropout"]
    _module(lora=LoraSpec(r=4)).check_checkpoint(checkpoint)
    changed = _module(lora=LoraSpec(r=4))
    changed.model_spec.llm.loss_reduction = "sample"
    with pytest.raises(ValueError, match=r"model.llm.loss_reduction: None -> 'sample'"):
        changed.check_checkpoint(checkpoint)


def test_fingerprint_tells_bases_apart():
    a, b = _module(), _module()
    check_fingerprint(weight_fingerprint(a.model.llm, False), weight_fingerprint(b.model.llm, False), "x", "fix")
    with torch.no_grad():
        b.model.llm.model.layers[0].mlp.up_proj.weight[0, 0] += 1e-3
    with pytest.raises(ValueError, match="1 of .* differ.*layers.0.mlp.up_proj"):
        check_fingerprint(weight_fingerprint(a.model.llm, False), weight_fingerprint(b.model.llm, False), "x", "fix")


def test_fsdp1_strategy_on_cpu_is_refused_with_what_to_change():
    from pytorch_lightning.strategies import FSDPStrategy

    with pytest.raises(ValueError, match="requires a GPU accelerator.*accelerator='cuda'"):
        Trainer(accelerator="cpu", strategy=FSDPStrategy())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_gpu_devices_where_none_exist_are_refused():
    from lightning_fabric.utilities.exceptions import MisconfigurationException

    with pytest.raises(MisconfigurationException, match="not available"):
        Trainer(accelerator="cuda", devices=2)


# ----- stage configs ---------------------------------------------------------------------------------
def _stage_module(name, tmp_path, **overrides):
    """The stage config as written, with the tiny parts in place of the hub weights."""
    config = yaml.safe_load((ROOT / "configs" / "base" / name).read_text())
    args = config["model"]["init_args"]
    args.update(pretrained=None, model={
        "vision": {"config": tiny_spec().vision.config}, "llm": {"config": tiny_spec().llm.config},
        "connector": {"kind": "c_abstractor", "num_tokens": 4, "hidden_size": 32, "depth": 1}, "tokenizer": "tiny"})
    args["preprocessing"]["split"].update(crop_size=32, grid_min=1, grid_max=2)
    args.update(overrides)
    config["trainer"].update(accelerator="cpu", devices=1, strategy="auto", precision="32-true", logger=False)
    path = tmp_path / name
    path.write_text("# test\n" + yaml.safe_dump(config))
    cli = MM15CLI(MM15Module, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                  auto_configure_optimizers=False, run=False, args=["--config", str(path)])
    cli.model.configure_model()
    return cli.model


@pytest.mark.parametrize("stage, trains", [("align.yaml", {"connector"}), ("sft_lora.yaml", {"connector", "lora"})])
def test_freezing_contract_under_each_stage(stage, trains, tmp_path, image_path):
    module = _stage_module(stage, tmp_path)
    module.model.float()
    optimizer = module.optimizer_factory(module.parameter_groups())
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    module(_batch(module, *_samples(image_path))).loss.backward()
    trainable = {n for n, p in module.model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in module.model.named_parameters() if p.grad is not None}
    assert {"lora" if "lora_" in n else n.split(".")[0] for n in trainable} == trains
    optimizer.step()
    changed = {n for n, p in module.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed <= trainable and changed


def test_global_batch_size_sets_accumulation(tmp_path):
    from mm15.base.data.datamodule import MM15DataModule

    data = MM15DataModule(batch_size=4, global_batch_size=32)
    data.trainer = Trainer(accelerator="cpu", devices=1, logger=False, default_root_dir=str(tmp_path))
    data._derive_accumulation()  # what setup("fit") does first
    assert data.trainer.accumulate_grad_batches == 8
    data.trainer.accumulate_grad_batches = 2
    with pytest.raises(ValueError, match="contradicts data.global_batch_size=32"):
        data._derive_accumulation()


def test_environment_seed_makes_init_identical_on_every_rank(monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "7")
    a = _module(lora=LoraSpec(r=4))
    torch.manual_seed(123)  # whatever the global RNG did before configure_model
    b = MM15Module(model=tiny_spec(), preprocessing=tiny_preprocessing(), lora=LoraSpec(r=4))
    b.configure_model()
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))
    assert os.environ["PL_GLOBAL_SEED"] == "7"


# ----- GPU benchmark ---------------------------------------------------------------------------------
def _benchmark():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_train_step", ROOT / "benchmarks" / "gpu_train_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_benchmark_counts_attention_per_sample():
    """The MFU numerator: with SDPA (whose CPU kernel FlopCounterMode does not see) the count equals
    the counter's on the same model with eager attention (plain matmuls) for unpacked rows; on
    packed rows it charges each sample's square, less than eager's whole-row squares."""
    from torch.utils.flop_counter import FlopCounterMode

    bench = _benchmark()
    args = bench.parse_args(["--smoke"])
    args.crop, args.frames, args.batch, args.text = 32, 2, 2, 64
    models = {}
    for impl in ("sdpa", "eager"):
        spec = ModelSpec(VisionSpec(config={**bench.TINY_VISION, "attn_implementation": impl}),
                         LLMSpec(config=bench.TINY_LLM, attn_implementation=impl),
                         ConnectorSpec(num_tokens=4, hidden_size=32, depth=1), tokenizer="tiny")
        torch.manual_seed(0)
        model = MM15Model.build(spec, load_tokenizer(spec), crop_size=32).requires_grad_(True)
        models[impl] = model, torch.optim.SGD(model.parameters(), lr=0.0)
    cpu = torch.device("cpu")
    uniform = bench.make_batch(models["sdpa"][0], args, 2, cpu)
    packed = bench.mixed_batch(bench.mixed_items(models["sdpa"][0], args, cpu), True, cpu)
    assert bench.sample_lengths(packed) == [24, 36, 52, 72] and packed["input_ids"].shape == (3, 72)
    counted = {}
    for name, batch in (("uniform", uniform), ("packed", packed)):
        counter = FlopCounterMode(display=False)
        with counter:
            bench.train_step(*models["eager"], batch)
        counted[name] = (bench.count_flops(*models["sdpa"], batch), counter.get_total_flops())
    assert counted["uniform"][0] == counted["uniform"][1]
    llm = models["sdpa"][0].llm.config
    rows_minus_samples = 12 * (3 * 72**2 - (24**2 + 36**2 + 52**2 + 72**2)) * llm.hidden_size * llm.num_hidden_layers
    assert counted["packed"][1] - counted["packed"][0] == rows_minus_samples


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on machines without CUDA")
def test_gpu_benchmark_refuses_to_run_without_cuda():
    with pytest.raises(SystemExit, match="none is visible here.*--smoke"):
        _benchmark().main([])


@pytest.mark.slow
def test_gpu_benchmark_smoke_run_on_cpu():
    results = _benchmark().main(["--smoke"])
    assert [r["activation_checkpointing"] for r in results] == [False, True]
    assert all(r["tokens_per_s"] > 0 and r["model_tflops_per_step"] > 0 for r in results)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_benchmark_reports_mfu():
    results = _benchmark().main(["--steps", "2", "--warmup", "1", "--max_frames", "0"])
    assert all(r["mfu"] is not None and 0 < r["mfu"] < 1 for r in results)
