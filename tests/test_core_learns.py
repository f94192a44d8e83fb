"""The core demo learns: `configs/base/demo.yaml` (C-Abstractor, dynamic splitting, MuonAdamW) trained
through the CLI on CPU, then `test` on held-out images.

Bars: overall held-out accuracy >= 0.75, and each question type (colour, position) at least twice its
chance. The README's table gives the figures for seeds 0-2 at 1 and 2 torch threads.

The same trained model (trained once: it is the suite's longest test) is then saved as `--save_model`
saves it and evaluated by lmms-eval on the shipped task `mm15_shapes` (its first 50 records, in
`mm15 test`'s batches of 50): the predictions are `test_predictions.jsonl`'s strings and the scores
mm15's. That part is skipped when lmms_eval is not installed. The run's Lightning checkpoint, loaded
as lmms-eval's `pretrained=` would load it, gives the same strings too.
"""

import json
from pathlib import Path

import pytest
from pytorch_lightning import LightningDataModule

from mm15.base.cli import MM15CLI
from mm15.base.metrics import exact_match_by_task
from mm15.base.module import MM15Module
from mm15.eval.loading import load_module
from mm15.eval.requests import Request, RequestEncoder
from mm15.eval.tasks import question_text, read_source, visuals

from eval_support import LMMS_EVAL_MISSING, TASKS, run_lmms_eval

DEMO = str(Path(__file__).resolve().parents[1] / "configs" / "base" / "demo.yaml")
PACKED = str(Path(__file__).resolve().parents[1] / "configs" / "base" / "demo_packed.yaml")
COMPARED = 50  # records compared with lmms-eval: the first test batch (data.eval_batch_size)


def train_and_test(*overrides: str, config: str = DEMO) -> tuple[dict, MM15CLI]:
    cli = MM15CLI(MM15Module, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                  auto_configure_optimizers=False, run=False,
                  args=["--config", config, "--trainer.enable_progress_bar=false", "--trainer.logger=false", *overrides])
    cli.trainer.fit(cli.model, cli.datamodule)
    cli.trainer.test(cli.model, datamodule=cli.datamodule)
    return {r["task"]: r for r in cli.model.compute_metrics(cli.model.records)}, cli


@pytest.mark.learns(seconds=100)
def test_core_demo_learns_colour_and_position(tmp_path, monkeypatch, capsys, subtests):
    monkeypatch.chdir(tmp_path)
    rows, cli = train_and_test()
    out = capsys.readouterr().out
    with capsys.disabled():
        print({task: (round(r["accuracy"], 3), round(r["chance"], 3)) for task, r in rows.items()})
    assert rows["all"]["accuracy"] >= 0.75, rows
    for task in ("colour", "position"):
        assert rows[task]["accuracy"] >= 2 * rows[task]["chance"], rows
    assert "test results" in out
    assert (tmp_path / "runs/base_demo/test_predictions.jsonl").exists()
    assert (tmp_path / "runs/base_demo/loss.png").exists()

    cli.model.save_model("runs/base_demo/model")  # what `mm15 fit --save_model runs/base_demo/model` does after fit
    lines = (tmp_path / "runs/base_demo/test_predictions.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines][:COMPARED]
    with subtests.test("lmms-eval gives mm15 test's predictions and scores"):
        if LMMS_EVAL_MISSING:
            pytest.skip(LMMS_EVAL_MISSING)
        predictions, metrics = run_lmms_eval("pretrained=runs/base_demo/model", "mm15_shapes", COMPARED, COMPARED)
        assert predictions == [r["prediction"] for r in records]
        ours = {row["task"]: row["accuracy"] for row in exact_match_by_task(records)}
        assert (metrics["exact_match,none"], metrics["colour,none"], metrics["position,none"]) == (
            ours["all"], ours["colour"], ours["position"])
        with capsys.disabled():
            print(f"lmms-eval mm15_shapes, first {COMPARED}: {metrics['exact_match,none']:.3f}; mm15 test: {ours['all']:.3f}")

    with subtests.test("the Lightning checkpoint answers as the test run did"):
        source = json.loads((TASKS / "mm15_shapes.json").read_text())
        docs = read_source(source["class_path"], source["init_args"])[:COMPARED]
        module = load_module("runs/base_demo/checkpoints/last.ckpt")
        requests = [Request("mm15_shapes", "test", k, question_text(d), visuals(d)) for k, d in enumerate(docs)]
        assert module.generate(RequestEncoder(module.processor, "last.ckpt").batch(requests, generate=True)) == [
            r["prediction"] for r in records]


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_packed_core_demo_learns(tmp_path, monkeypatch, capsys, seed):
    """`configs/base/demo_packed.yaml` (the demo on packed rows) meets the demo's README bar: overall
    >= 0.75 and each question >= 2.5x its chance (the packed loss equals the padded one, so it
    learns as the demo does up to float rounding)."""
    monkeypatch.chdir(tmp_path)
    rows, _ = train_and_test(f"--seed_everything={seed}", config=PACKED)
    with capsys.disabled():
        print(f"packed demo, seed {seed}:", {task: round(r["accuracy"], 3) for task, r in rows.items()})
    assert rows["all"]["accuracy"] >= 0.75, rows
    for task in ("colour", "position"):
        assert rows[task]["accuracy"] >= 2.5 * rows[task]["chance"], rows
