"""The core demo trained from prepared shards (`configs/base/demo_streaming.yaml`: `mm15 prepare`,
then fit and test streaming the shards) reaches the in-memory demo's held-out accuracy
(`configs/base/demo.yaml`, tests/test_core_learns.py): the training split fits one shuffle window,
so it sees the same samples in the same order. Slow: two demo runs (~3 minutes on one core).

    python -m pytest tests/test_data_streaming_learns.py -m slow -s -n 0
"""

from pathlib import Path

import pytest
from pytorch_lightning import LightningDataModule

from mm15.base.cli import MM15CLI
from mm15.base.data.prepare import main as prepare_main
from mm15.base.module import MM15Module

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "base"
STREAMING = str(CONFIGS / "demo_streaming.yaml")


def train_and_test(config: str) -> dict:
    cli = MM15CLI(MM15Module, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                  auto_configure_optimizers=False, run=False,
                  args=["--config", config, "--trainer.enable_progress_bar=false", "--trainer.logger=false"])
    cli.trainer.fit(cli.model, cli.datamodule)
    cli.trainer.test(cli.model, datamodule=cli.datamodule)
    return {r["task"]: r for r in cli.model.compute_metrics(cli.model.records)}


@pytest.mark.slow
def test_streamed_demo_reaches_the_in_memory_accuracy(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    prepare_main(["--config", STREAMING])
    streamed = train_and_test(STREAMING)
    in_memory = train_and_test(str(CONFIGS / "demo.yaml"))
    with capsys.disabled():
        print({k: (round(streamed[k]["accuracy"], 3), round(in_memory[k]["accuracy"], 3)) for k in streamed})
    assert streamed["all"]["accuracy"] >= 0.75, streamed
    for task in ("colour", "position"):
        assert streamed[task]["accuracy"] >= 2 * streamed[task]["chance"], streamed
    assert abs(streamed["all"]["accuracy"] - in_memory["all"]["accuracy"]) <= 0.02, (streamed, in_memory)
