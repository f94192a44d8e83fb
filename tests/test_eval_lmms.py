"""The model `mm15` inside lmms-eval (skipped when lmms_eval is not installed): it is registered
through the entry point, the shipped task YAMLs load, and on the video task a tiny random video
model gives in lmms-eval the strings and the score `mm15 test` gives on the same records (the
frame count read from the saved spec). The image task against `mm15 test` on the trained demo is
in tests/test_core_learns.py."""

from __future__ import annotations

import json

import pytest
from pytorch_lightning import Trainer

from mm15.base.data.datamodule import MM15DataModule
from mm15.base.data.splitting import SplitSpec
from mm15.base.module import GenerationSpec
from mm15.data_builders.synthetic_video import SyntheticVideoSource
from mm15.video.metrics import video_qa_metrics
from mm15.video.module import MM15VideoModule
from mm15.video.processor import VideoPreprocessSpec, VideoSpec
from mm15.video.sampling import FrameSampling

from conftest import tiny_spec
from eval_support import LMMS_EVAL_MISSING, TASKS, run_lmms_eval

pytestmark = pytest.mark.skipif(LMMS_EVAL_MISSING is not None, reason=LMMS_EVAL_MISSING or "")


def test_mm15_is_an_lmms_eval_model():
    from lmms_eval.models import get_model

    from mm15.eval.lmms_model import MM15LMM

    assert get_model("mm15") is MM15LMM


def test_the_shipped_tasks_load_in_lmms_eval():
    from lmms_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(TASKS), include_defaults=False)
    names = sorted(p.stem for p in TASKS.glob("*.yaml"))
    assert names == ["mm15_colours", "mm15_shapes", "mm15_shapes_choice"]
    assert set(names) <= set(manager.all_tasks)
    for path in TASKS.glob("*.yaml"):
        assert path.read_text().startswith("#   lmms-eval --model mm15 "), path  # the launch command first


def test_video_task_gives_mm15_tests_strings_and_score(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the task generates data/colours here, as `mm15 test` does
    spec = VideoPreprocessSpec(split=SplitSpec(crop_size=32, mode="none"), max_length=512,
                               video=VideoSpec(sampling=FrameSampling(num_frames=5)))
    # initializer_range 0.3: at the default 0.02 the random LLM ends every reply at once (all "")
    trained = MM15VideoModule(model=tiny_spec(initializer_range=0.3), preprocessing=spec)
    trained.configure_model()
    trained.save_model(tmp_path / "model")

    # `mm15 test` on the task's records: the model directory as `pretrained`, the demo's test split
    with open(TASKS / "mm15_colours.json") as f:
        source = json.load(f)["init_args"]
    module = MM15VideoModule(pretrained=str(tmp_path / "model"), contact_sheets=0, generation=GenerationSpec(max_new_tokens=8))
    data = MM15DataModule(test=[SyntheticVideoSource(**source)], eval_batch_size=25)
    Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
            default_root_dir=str(tmp_path / "run")).test(module, datamodule=data)
    records = [json.loads(line) for line in (tmp_path / "run" / "test_predictions.jsonl").read_text().splitlines()]
    assert {r["media"][0]["crops"] for r in records} == {5}

    predictions, metrics = run_lmms_eval(f"pretrained={tmp_path / 'model'}", "mm15_colours", limit=50, batch_size=25)
    assert predictions == [r["prediction"] for r in records[:50]]
    assert len(set(predictions)) > 1  # a random model's replies differ per clip: the frames reach it
    ours = video_qa_metrics(records[:50])[-1]
    assert metrics["accuracy,none"] == ours["accuracy"] and metrics["parsed,none"] == ours["parsed"]
