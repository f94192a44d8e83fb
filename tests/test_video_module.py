"""MM15VideoModule: training-free evaluation of a saved core model, `fit` refused in that mode,
SFT with the core's freezing / LoRA, SlowFast pooling through generation, backend counting."""

import json
import logging

import pytest
import pytorch_lightning as pl
import torch

from required_imports import import_required

import_required("decord")  # fails where pyproject.toml requires decord

from mm15.base.training.adapters import LoraSpec  # noqa: E402
from mm15.base.data.datamodule import MM15DataModule  # noqa: E402
from mm15.base.module import Components, GenerationSpec, MM15Module  # noqa: E402
from mm15.base.data.splitting import SplitSpec  # noqa: E402
from mm15.data_builders.synthetic_video import SyntheticVideoSource  # noqa: E402
from mm15.video.module import MM15VideoModule, TrainingFreeFitError  # noqa: E402
from mm15.video.pooling import SlowFastSpec  # noqa: E402
from mm15.video.processor import VideoPreprocessSpec, VideoSpec  # noqa: E402
from mm15.video.sampling import FrameSampling  # noqa: E402

from conftest import tiny_preprocessing, tiny_spec  # noqa: E402


def video_preprocessing(frames=4, **video) -> VideoPreprocessSpec:
    return VideoPreprocessSpec(split=SplitSpec(crop_size=32, mode="none"), max_length=512,
                               video=VideoSpec(sampling=FrameSampling(frames), **video))


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("moving")
    source = SyntheticVideoSource(str(root), split="test", num_samples=6, size=32, num_frames=10)
    source.prepare()
    return root


def trainer(tmp_path, **kw) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=str(tmp_path), **kw)


def data(clips, **kw) -> MM15DataModule:
    source = SyntheticVideoSource(str(clips), split="test", num_samples=6, size=32, num_frames=10)
    return MM15DataModule(train=[source], val=[source], test=[source], batch_size=3, **kw)


@pytest.fixture(scope="module")
def core_model(tmp_path_factory):
    """A saved core (image) model directory, as `mm15 fit --save_model` writes it."""
    torch.manual_seed(0)
    core = MM15Module(model=tiny_spec(), preprocessing=tiny_preprocessing())
    core.configure_model()
    directory = tmp_path_factory.mktemp("core") / "model"
    core.save_model(directory)
    return str(directory)


def test_training_free_test_on_a_saved_core_model(core_model, clips, tmp_path, capsys):
    module = MM15VideoModule(pretrained=core_model, mode="training_free", preprocessing=video_preprocessing(),
                             generation=GenerationSpec(max_new_tokens=3))
    trainer(tmp_path).test(module, data(clips), verbose=False)
    out = capsys.readouterr().out
    assert "test results" in out and "majority_colour" in out and "videos decoded by backend: decord: 6" in out
    records = [json.loads(line) for line in (tmp_path / "test_predictions.jsonl").read_text().splitlines()]
    assert len(records) == 6 and all(r["meta"]["choices"] == ["red", "green", "blue", "yellow"] for r in records)


def test_core_preprocessing_loads_with_video_defaults_or_the_given_video_part(core_model):
    module = MM15VideoModule(pretrained=core_model, mode="training_free")
    spec = module.processor.spec
    assert isinstance(spec, VideoPreprocessSpec) and spec.video.sampling.num_frames == 24
    assert spec.split.crop_size == 32  # the core model's, kept
    module = MM15VideoModule(pretrained=core_model, mode="training_free", video=VideoSpec(sampling=FrameSampling(6)))
    assert module.processor.spec.video.sampling.num_frames == 6 and module.processor.spec.split.crop_size == 32


def test_fit_in_training_free_mode_stops_before_any_data_work(core_model, clips, tmp_path):
    prepared = []
    dm = data(clips)
    dm.prepare_data = lambda: prepared.append(True)
    module = MM15VideoModule(pretrained=core_model, mode="training_free", preprocessing=video_preprocessing())
    with pytest.raises(TrainingFreeFitError, match="training_free.*nothing to fit"):
        trainer(tmp_path, max_steps=1).fit(module, dm)
    assert prepared == []


def test_sft_trains_with_core_freezing_and_learning_rates(clips, tmp_path):
    torch.manual_seed(0)
    module = MM15VideoModule(model=tiny_spec(), preprocessing=video_preprocessing(), mode="sft",
                             freeze=Components(vision=True, connector=False, llm=False),
                             learning_rates=Components(connector=1e-3))
    module.configure_model()
    vision = {n: p.detach().clone() for n, p in module.model.vision.named_parameters()}
    llm = {n: p.detach().clone() for n, p in module.model.llm.named_parameters()}
    connector = {n: p.detach().clone() for n, p in module.model.connector.named_parameters()}
    fit = trainer(tmp_path, max_steps=2, limit_val_batches=0)
    fit.fit(module, data(clips))
    assert all(torch.equal(p, vision[n]) for n, p in module.model.vision.named_parameters())
    assert any(not torch.equal(p, llm[n]) for n, p in module.model.llm.named_parameters())
    assert module.backend_counts["decord"] >= 6
    rates = {g["name"]: g["lr"] for g in fit.optimizers[0].param_groups}
    assert {name.split("_")[0] for name in rates} == {"connector", "llm"}  # the frozen tower has no group
    assert all(lr == (1e-3 if name.startswith("connector") else 2e-5) for name, lr in rates.items()), rates
    # Over two AdamW steps each weight moves by about 2 x lr: the connector's steps are 1e-3, the LLM's 2e-5.
    moved = {part: max(float((p.detach() - start[n]).abs().max()) for n, p in getattr(module.model, part).named_parameters())
             for part, start in (("connector", connector), ("llm", llm))}
    assert 1e-3 < moved["connector"] <= 2.1e-3 and 0 < moved["llm"] <= 4.2e-5, moved


def test_sft_with_lora_trains_adapters_only(clips, tmp_path):
    module = MM15VideoModule(model=tiny_spec(), preprocessing=video_preprocessing(), lora=LoraSpec(r=4, alpha=8),
                             freeze=Components(vision=True, connector=False, llm=False))
    module.configure_model()
    trainable = {n.split(".")[0] for n, p in module.model.named_parameters() if p.requires_grad}
    lora_only = all("lora_" in n for n, p in module.model.llm.named_parameters() if p.requires_grad)
    assert trainable == {"connector", "llm"} and lora_only
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    trainer(tmp_path, max_steps=2, limit_val_batches=0).fit(module, data(clips))  # lora_A moves from step 2 (B = 0 before)
    after = dict(module.model.named_parameters())
    changed = {n for n, p in after.items() if not torch.equal(p, before[n])}
    assert changed == {n for n, p in after.items() if p.requires_grad}  # adapters and connector moved, nothing else


def test_slowfast_generation_runs_with_matching_placeholders(core_model, clips, tmp_path, caplog):
    slowfast = SlowFastSpec(slow_frames=2, fast_grid=1)
    module = MM15VideoModule(pretrained=core_model, mode="training_free", generation=GenerationSpec(max_new_tokens=2),
                             preprocessing=video_preprocessing(frames=6, slowfast=slowfast))
    with caplog.at_level(logging.WARNING):
        trainer(tmp_path).test(module, data(clips), verbose=False)
    records = (tmp_path / "test_predictions.jsonl").read_text().splitlines()
    assert len(records) == 6  # no sample skipped: 2 x 4 slow + 6 x 1 fast placeholders = features
    skips = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped ")]
    assert not skips and not (tmp_path / "quarantine.jsonl").exists(), skips  # nothing quarantined
    (layout,) = json.loads(records[0])["media"]
    assert layout["kind"] == "video" and layout["crops"] == 6 and layout["placeholders"] == [2 * 4, 6 * 1]
    assert layout["backend"] == "decord" and len(layout["frame_indices"]) == 6 and layout["grid"] is None


def test_fallback_and_notes_are_recorded(clips, tmp_path, monkeypatch):
    from mm15.video import decoding

    def broken(*args, **kwargs):
        raise RuntimeError("decord cannot open this")

    monkeypatch.setitem(decoding.READERS, "decord", broken)
    module = MM15VideoModule(model=tiny_spec(), preprocessing=video_preprocessing(),
                             generation=GenerationSpec(max_new_tokens=1))
    trainer(tmp_path).test(module, data(clips), verbose=False)
    assert module.backend_counts == {"pyav": 6, "fallback": 6}
    notes = [json.loads(line) for line in (tmp_path / "video_notes.jsonl").read_text().splitlines()]
    assert len(notes) == 6 and "decord cannot open this" in notes[0]["notes"][0]


def test_replaced_frames_are_counted_next_to_the_backends(tmp_path):
    from mm15.base.data.media import MediaLayout

    module = MM15VideoModule(model=tiny_spec(), preprocessing=video_preprocessing())
    layouts = [[MediaLayout("video", "a.mp4", 4, [4] * 4, (8, 8), backend="pyav", replaced_frames=2,
                            notes=["2 chosen frames undecodable: replaced by the nearest decoded frame"])],
               [MediaLayout("video", "b.mp4", 4, [4] * 4, (8, 8), backend="decord")]]
    module.record_videos({"ids": ["x", "y"], "layouts": layouts})
    assert module.replaced_frames == 2 and module.backend_counts == {"pyav": 1, "decord": 1, "fallback": 0}
    logged = {}
    module.log = lambda name, value, **kw: logged.update({name: value})
    module.on_train_batch_start({"ids": [], "layouts": []}, 0)
    assert logged["video/replaced_frames"] == 2.0 and logged["video/backend_pyav"] == 1.0
