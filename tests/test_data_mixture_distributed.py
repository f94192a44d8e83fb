"""A 3-source mixture under `mm15 fit`, as users launch it (gloo, CPU; slow: four runs of ~20 s):

* 1 process with accumulation 2 (the reference): each epoch of 24 draws holds the shares
  (images 1/2, text a 1/4, text b 1/4, b capped at 6 records with a prompt), within one draw;
* 2 processes with DDP: micro-batch k of rank r is micro-batch 2k + r of the reference, so every
  step sees the same samples;
* 1 process SIGKILLed while writing its second checkpoint, resumed with `--ckpt_path last`: the
  resumed run continues the reference's sequence, nothing read twice or skipped. (A resume keeps
  the process count: Lightning counts an epoch's batches per process; another count is refused,
  tests/test_data_mixtures.py.)

    python -m pytest tests/test_data_mixture_distributed.py -m slow -s -n 0
"""

from __future__ import annotations

import collections
from pathlib import Path

import pytest

from mm15.data_builders.synthetic_shapes import SyntheticShapesSource

from scaleout_support import ROOT, read_losses, run_cli, tiny_run_config, write_config, write_text_only

pytestmark = pytest.mark.slow
DDP = ["--config", str(ROOT / "configs/strategies/ddp.yaml"), "--trainer.accelerator", "cpu",
       "--trainer.devices", "2", "--trainer.precision", "32-true"]
SHARES = {"train": 0.5, "text": 0.25, "more": 0.25}  # id prefixes: shapes "train-", text "text-", "more-"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("mixture_data")
    write_text_only(d / "text.jsonl", 8)
    write_text_only(d / "tmp.jsonl", 12)
    (d / "more.jsonl").write_text((d / "tmp.jsonl").read_text().replace('"text-', '"more-'))
    SyntheticShapesSource(str(d / "shapes"), "train", 8, min_side=24, max_side=56).prepare()
    return d


def mixture_config(run: Path, data: Path, plugins: list | None = None) -> dict:
    config = tiny_run_config(run, data, max_steps=12, plugins=plugins)
    shapes, text = config["data"]["init_args"]["train"]
    more = {"class_path": "mm15.base.data.sources.JsonlSource", "init_args": {"path": str(data / "more.jsonl")}}
    config["data"]["init_args"]["train"] = {"class_path": "mm15.base.data.mixtures.Mixture", "init_args": {
        "epoch_samples": 24,
        "groups": [{"name": "images", "weight": 1.0, "sources": [{"name": "shapes", "source": shapes}]},
                   {"name": "text", "weight": 1.0, "sources": [
                       {"name": "text", "source": text},
                       {"name": "more", "source": more, "cap": 6, "prompt": "Answer briefly."}]}]}}
    return config


def _fit(run: Path, data: Path, *args: str, plugins: list | None = None):
    run.mkdir(exist_ok=True)
    config = write_config(run / "fit.yaml", mixture_config(run, data, plugins))
    return run_cli(["fit", "--config", str(config), *args], run)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
    run = tmp_path_factory.mktemp("mixture_reference")
    proc = _fit(run, data_dir)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return read_losses(run / "losses")


def _interleave(rows: list[dict]) -> list[list[str]]:
    ranks = [[r["ids"] for r in rows if r["rank"] == rank] for rank in (0, 1)]
    assert len(ranks[0]) == len(ranks[1])
    return [ids for pair in zip(*ranks) for ids in pair]


def test_reference_draws_hold_the_shares(reference):
    assert len(reference) == 24  # 12 steps x 2 micro-batches of 2: two epochs of 24 draws
    for epoch in (0, 1):
        ids = [i for row in reference[12 * epoch: 12 * (epoch + 1)] for i in row["ids"]]
        counts = collections.Counter(i.split("-")[0] for i in ids)
        print(f"epoch {epoch}: draws per source {dict(counts)} of 24, expected {[24 * s for s in SHARES.values()]}")
        for prefix, share in SHARES.items():
            assert abs(counts[prefix] - 24 * share) <= 1, counts
        assert len({i for i in ids if i.startswith("more-")}) <= 6  # the cap


def test_two_processes_draw_the_same_sequence(reference, data_dir, tmp_path):
    proc = _fit(tmp_path, data_dir, *DDP)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert _interleave(read_losses(tmp_path / "losses")) == [r["ids"] for r in reference]


def test_killed_then_resumed_continues_the_sequence(reference, data_dir, tmp_path):
    dying = [{"class_path": "scaleout_support.DyingCheckpointIO", "init_args": {"die_on_save": 2}}]
    proc = _fit(tmp_path, data_dir, plugins=dying)
    assert proc.returncode == -9, proc.stderr[-3000:]  # killed writing the step-4 checkpoint
    plugins = ["mm15.base.training.checkpointing.AtomicCheckpointIO"]
    killed = len(read_losses(tmp_path / "losses"))
    proc = _fit(tmp_path, data_dir, "--ckpt_path", "last", plugins=plugins)
    assert proc.returncode == 0, proc.stderr[-4000:]
    resumed = [r["ids"] for r in read_losses(tmp_path / "losses")[killed:]]
    assert resumed == [r["ids"] for r in reference[4:]]  # resumed from step 2: micro-batches 5.. of the reference
    print(f"resumed from step 2: {len(resumed)} micro-batches over the epoch boundary, the reference's sequence")
