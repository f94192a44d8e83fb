"""Two processes (gloo) take the same collective steps when their batches differ, so no run hangs:

* a rank whose training or validation batch had every sample skipped (missing image files) still
  runs its step, under DDP and FSDP2: losses, final weights and the synced `val/loss` equal the
  1-process run on the same data, where those samples are skipped too;
* bad data on one rank only spends the error budget of the whole run: both ranks stop with the
  same `DataErrorBudgetExceeded` and one summary;
* `mm15 test` and `mm15 predict` under FSDP2 with one rank decoding fewer tokens and holding a
  text-only and an all-skipped batch: every rank finishes, predictions equal one process's.

A hang fails the test after `HANG_TIMEOUT` seconds (`scaleout_support.run_cli` kills every rank
and reports where each waited).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from pytorch_lightning import LightningDataModule
from pytorch_lightning.cli import instantiate_module

from mm15.base.cli import MM15CLI
from mm15.base.data.datamodule import resolve_media
from mm15.base.data.sample import Media, Sample, Turn
from mm15.base.data.sources import write_jsonl
from mm15.base.module import GenerationSpec, MM15Module
from mm15.base.training.resumable import ResumableSampler
from mm15.data_builders.synthetic_shapes import SyntheticShapesSource

from scaleout_support import ROOT, SGD, read_losses, read_parameters, read_rank_files, run_cli, tiny_run_config
from scaleout_support import write_config

STRATEGIES = ROOT / "configs" / "strategies"
CPU_TWO = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.precision", "32-true"]
HANG_TIMEOUT = 150  # a healthy 2-process run here takes ~20 s
RECORDER = "scaleout_support.{}"


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> tuple[Path, list[Sample]]:
    """8 shape images; JSONL files written beside them resolve their relative paths."""
    root = tmp_path_factory.mktemp("collectives") / "shapes"
    samples = list(SyntheticShapesSource(str(root), "train", 8, min_side=24, max_side=56).prepare().read())
    return root, samples


def missing_image(sample: Sample) -> Sample:
    return dataclasses.replace(sample, id=f"bad-{sample.id}", media=[Media(f"train/missing-{sample.id}.png")])


def text_only(sample: Sample) -> Sample:
    return Sample(f"text-{sample.id}", [Turn("user", "Count to 3."), Turn("assistant", "1 2 3")], [], task="count")


def training_order(n: int, rank: int) -> list[int]:
    """The samples rank `rank` of 2 trains on, micro-batch after micro-batch (batch size 2, seed 0)."""
    return list(ResumableSampler(list(range(n)), micro_batch=2, num_replicas=2, rank=rank, seed=0))


def fit_config(run: Path, root: Path, train: list[Sample], val: list[Sample], **data: Any) -> dict[str, Any]:
    """2 SGD steps on `train` (batch 2, global batch 4), then validation on `val`, no checkpoints."""
    write_jsonl(train, root / f"{run.name}-train.jsonl")
    write_jsonl(val, root / f"{run.name}-val.jsonl")
    config = tiny_run_config(run, root.parent, max_steps=2, optimizer=SGD)
    config["model"]["init_args"]["model"]["llm"]["loss_reduction"] = "sample"  # val/loss: a mean over samples
    trainer = config["trainer"]
    trainer.update(limit_val_batches=1.0, enable_checkpointing=False)
    trainer["callbacks"] = [c for c in trainer["callbacks"] if "ModelCheckpoint" not in c["class_path"]] + [
        {"class_path": RECORDER.format(name), "init_args": {"path": str(run / stem)}}
        for name, stem in (("MetricRecorder", "metrics"), ("ExceptionRecorder", "exception"))]
    source = "mm15.base.data.sources.JsonlSource"
    config["data"]["init_args"].update(
        train=[{"class_path": source, "init_args": {"path": str(root / f"{run.name}-train.jsonl")}}],
        val=[{"class_path": source, "init_args": {"path": str(root / f"{run.name}-val.jsonl")}}],
        **{"max_error_fraction": 1.0, **data})
    return config


def one_process(run: Path, config: dict[str, Any]) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the subprocesses, so float results can be compared exactly
    try:
        MM15CLI(MM15Module, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                auto_configure_optimizers=False, args=["fit", "--config", str(write_config(run / "fit.yaml", config))])
    finally:
        torch.set_num_threads(threads)


def two_processes(command: str, run: Path, config: dict[str, Any], strategy: str, *extra: str):
    path = write_config(run / f"{command}.yaml", config, f"mm15 {command} --config <this file>")
    return run_cli([command, "--config", str(path), "--config", str(STRATEGIES / strategy), *CPU_TWO, *extra], run,
                   timeout=HANG_TIMEOUT)


def failure(proc: Any, run: Path) -> str:
    """What stopped each rank (`ExceptionRecorder`), then the end of the output."""
    return f"{read_rank_files(run / 'exception', '.json')}\n{proc.stderr[-4000:]}"


# ----- a batch whose samples were all skipped --------------------------------------------------------
@pytest.fixture(scope="module")
def skipped_on_rank_1(shapes, tmp_path_factory):
    """Training data whose first micro-batch on rank 1 (of 2) is all missing images, validation data
    whose only batch on rank 1 is too; and the 1-process run on it (the reference)."""
    root, samples = shapes
    train = list(samples)
    for i in training_order(8, rank=1)[:2]:
        train[i] = missing_image(train[i])
    val = [samples[0], missing_image(samples[1]), samples[2], missing_image(samples[3])]  # rank r gets r, r + 2
    run = tmp_path_factory.mktemp("one_process")
    one_process(run, fit_config(run, root, train, val))
    return {"root": root, "train": train, "val": val, "run": run}


@pytest.mark.parametrize("strategy", ["ddp.yaml", "fsdp2.yaml"])
def test_rank_with_an_all_skipped_batch_keeps_step(strategy, skipped_on_rank_1, tmp_path):
    ref = skipped_on_rank_1
    run = tmp_path / "two"
    run.mkdir()
    proc = two_processes("fit", run, fit_config(run, ref["root"], ref["train"], ref["val"]), strategy)
    assert proc.returncode == 0, failure(proc, run)

    rows, expected = read_losses(run / "losses"), read_losses(ref["run"] / "losses")
    by_rank = [[r for r in rows if r["rank"] == rank] for rank in (0, 1)]
    assert by_rank[1][0]["ids"] == [] and len(by_rank[0]) == len(by_rank[1]) == 2  # the empty batch took its step
    for k, pair in enumerate(zip(*by_rank)):
        for rank, row in enumerate(pair):
            reference = expected[2 * k + rank]
            assert row["ids"] == reference["ids"]
            if row["ids"]:
                assert abs(row["loss"] - reference["loss"]) < 1e-5, (k, rank, row, reference)

    params, reference = read_parameters(run / "params.pt"), read_parameters(ref["run"] / "params.pt")
    worst = max(float((params[k] - reference[k]).abs().max()) for k in reference)
    assert worst < 1e-5, f"weights after the last SGD step differ from one process's by {worst:.2e}"

    metrics = read_rank_files(run / "metrics", ".jsonl")
    one = read_rank_files(ref["run"] / "metrics", ".jsonl")[0][-1]["val/loss"]
    assert sorted(metrics) == [0, 1] and metrics[0][-1]["val/loss"] == metrics[1][-1]["val/loss"]
    assert abs(metrics[0][-1]["val/loss"] - one) < 1e-5, (metrics, one)  # rank 1's empty batch weighs nothing


# ----- the error budget ----------------------------------------------------------------------------
def test_bad_data_on_one_rank_stops_both_with_one_summary(shapes, tmp_path):
    root, samples = shapes
    train = list(samples)
    for i in training_order(8, rank=1):
        train[i] = missing_image(train[i])  # every sample rank 1 reads; rank 0's are fine
    run = tmp_path / "budget"
    run.mkdir()
    config = fit_config(run, root, train, samples[:2], max_error_fraction=0.1, min_samples_for_budget=4)
    proc = two_processes("fit", run, config, "ddp.yaml")
    assert proc.returncode != 0
    stopped = read_rank_files(run / "exception", ".json")
    assert sorted(stopped) == [0, 1], (stopped, proc.stderr[-4000:])
    assert {row["type"] for row in stopped.values()} == {"DataErrorBudgetExceeded"}, stopped
    assert stopped[0]["message"] == stopped[1]["message"]  # one summary, counted over both ranks
    assert "image file not found" in stopped[0]["message"]  # rank 0 saw no bad sample itself
    assert read_losses(run / "losses") == []  # the very first batch spent the budget


# ----- generation under FSDP2 ----------------------------------------------------------------------
def generation_config(run: Path, root: Path, samples: list[Sample]) -> dict[str, Any]:
    config = fit_config(run, root, samples, samples[:2])
    write_jsonl(samples, root / f"{run.name}-generate.jsonl")
    source = [{"class_path": "mm15.base.data.sources.JsonlSource",
               "init_args": {"path": str(root / f"{run.name}-generate.jsonl")}}]
    config["data"]["init_args"].update(test=source, predict=source, eval_batch_size=2)
    config["model"]["init_args"]["generation"] = {"max_new_tokens": 4}
    # Wider init than the default 0.02, whose greedy answer is newlines (stripped to ""): distinct answers.
    config["model"]["init_args"]["model"]["llm"]["config"]["initializer_range"] = 0.2
    config["trainer"]["callbacks"] = [{"class_path": RECORDER.format("FewerNewTokensOnRank"),
                                       "init_args": {"rank": 1, "max_new_tokens": 1}}]
    return config


@pytest.mark.parametrize("command", [pytest.param("test", marks=pytest.mark.slow), "predict"])  # one generate path
def test_generation_under_fsdp2_with_unequal_lengths_and_text_only_rank(command, shapes, tmp_path):
    root, images = shapes
    # Rank r decodes samples r, r + 2, ... in batches of 2: rank 0 images, then text only; rank 1 a
    # text-only batch, then a batch of missing images (nothing left to decode), then the sampler's
    # repeat of sample 0 (9 samples on 2 ranks), and it stops after 1 new token.
    samples = [images[0], text_only(images[1]), images[2], text_only(images[3]),
               images[4], missing_image(images[5]), images[6], missing_image(images[7]), text_only(images[0])]
    run = tmp_path / command
    run.mkdir()
    config = generation_config(run, root, samples)
    proc = two_processes(command, run, config, "fsdp2.yaml")
    assert proc.returncode == 0, failure(proc, run)
    name = "test_predictions.jsonl" if command == "test" else "predictions.jsonl"
    lines = [json.loads(line) for line in (run / name).read_text().splitlines()]
    # the repeat is dropped (rank 0's record of sample 0 kept), the rest in dataset order
    assert [r["index"] for r in lines] == [0, 1, 2, 3, 4, 6, 8]  # 5 and 7: missing images, skipped
    records = {r["id"]: r["prediction"] for r in lines}

    module = instantiate_module(MM15Module, {"_class_path": "mm15.base.module.MM15Module",
                                             **config["model"]["init_args"]})
    module.configure_model()  # the same seed-0 weights the two ranks built
    module.eval()
    expected = {}
    for batch, tokens in (([0, 2], 4), ([4, 6], 4), ([8], 4), ([1, 3], 1)):
        chosen = [resolve_media(dataclasses.replace(samples[i], media=[dataclasses.replace(m) for m in samples[i].media]),
                                str(root)) for i in batch]
        items = module.processor.collate([module.processor(s, generate=True) for s in chosen], padding_side="left")
        module.generation = GenerationSpec(max_new_tokens=tokens)
        with torch.no_grad():
            expected.update(zip((s.id for s in chosen), module.generate(items)))
    assert records == expected
    assert all(records[samples[i].id] for i in (0, 2, 4, 6)) and len(set(records.values())) > 1, records
