"""MM1.5-Video: the shared LightningModule with video frames, SlowFast pooling and video QA metrics.

Everything but the hooks below is `mm15.base.module.MM15Module` (model, freezing, LoRA, per-module
learning rates, checkpoints, test by generation):

* `build_processor`: `mm15.video.processor.VideoProcessor` (frames sampled and decoded as crops).
* `encode_media`: SlowFast pooling of each video's connector tokens when `video.slowfast` is set.
* `compute_metrics`: multiple-choice accuracy, exact match and token F1 per dataset.
* batch hooks: count which decoder served each video (`video/backend_*` in the logs, a line after
  each test) and the undecodable frames replaced by a neighbour (`video/replaced_frames`), and append every video with notes (fallback, clamped window, repeated frames, ...)
  to `<run dir>/video_notes.jsonl`.
* `on_test_records`: contact sheets of a seeded sample of test videos (the frames as the model saw
  them, the question, the reference and the prediction) in `<run dir>/contact_sheets/` and in
  TensorBoard (`mm15.video.contact_sheets`).

`mode`:
* `sft`: fine-tune on video instruction data (`mm15 fit`), then test.
* `training_free`: a core model answers video questions as is; `validate`, `test` and `predict`
  run, `fit` stops at once with the reason.

    mm15 fit --config configs/video/demo.yaml && mm15 test --config configs/video/demo.yaml --ckpt_path last
    mm15 test --config configs/video/training_free.yaml
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Literal

import torch
from pytorch_lightning.trainer.states import TrainerFn

from mm15.base.module import MM15Module
from mm15.base.data.processor import PreprocessSpec
from mm15.base.specs import from_dict
from mm15.base.training.plots import log_images

from .contact_sheets import FrameCapture, save_contact_sheets
from .metrics import video_qa_metrics
from .pooling import pool_batch
from .processor import VideoPreprocessSpec, VideoProcessor, VideoSpec


class TrainingFreeFitError(RuntimeError):
    pass


class MM15VideoModule(MM15Module):
    """`MM15Module` for video. Args: those of `MM15Module`, with `preprocessing` a
    `VideoPreprocessSpec` (its `video` part: sampling, decoding, timestamps, SlowFast), plus
    mode: `sft` (train) or `training_free` (evaluate a core model as is; `fit` refuses).
    video: the video part of the preprocessing, put on top of `preprocessing` or, without it, of the
        pretrained model's saved preprocessing (training-free runs keep the core model's resolution
        and template and only say how to sample frames).
    contact_sheets: how many test videos to draw as contact sheets (0: none).
    """

    preprocess_class = VideoPreprocessSpec

    def __init__(self, *args: Any, mode: Literal["training_free", "sft"] = "sft",
                 preprocessing: VideoPreprocessSpec | None = None, video: VideoSpec | None = None,
                 contact_sheets: int = 8, **kwargs: Any):
        super().__init__(*args, preprocessing=preprocessing, **kwargs)
        if video is not None:
            self.processor.spec = replace(self.processor.spec, video=video)
        self.mode = mode
        self.backend_counts: Counter[str] = Counter()
        self.replaced_frames = 0  # chosen frames shown as a neighbour because they could not be decoded
        self.contact_sheets = contact_sheets
        self.frame_capture = FrameCapture(contact_sheets)

    def build_processor(self, tokenizer: Any, preprocessing: PreprocessSpec, per_crop: int) -> VideoProcessor:
        if not isinstance(preprocessing, VideoPreprocessSpec):  # a core spec: video fields at defaults
            preprocessing = from_dict(VideoPreprocessSpec, asdict(preprocessing))
        return VideoProcessor(tokenizer, preprocessing, per_crop)

    def configure_callbacks(self) -> list:
        """The first hook `Trainer.fit` calls (before any data is prepared): refuse training-free fits."""
        if self.mode == "training_free" and self._trainer and self.trainer.state.fn == TrainerFn.FITTING:
            raise TrainingFreeFitError(
                "mode is training_free: the core model answers video questions as is, so there is nothing to "
                "fit; run `mm15 validate|test|predict` with this config, or set `model.init_args.mode: sft` "
                "to fine-tune on video data")
        return super().configure_callbacks()

    # ----- hooks ---------------------------------------------------------------------------------
    def encode_media(self, batch: dict[str, Any]) -> torch.Tensor | None:
        features = super().encode_media(batch)  # (C, M, D)
        slowfast = self.processor.spec.video.slowfast
        if features is None or slowfast is None:
            return features
        return pool_batch(features, batch["layouts"], slowfast)  # (1, L, D)

    def compute_metrics(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return video_qa_metrics(records)

    def report(self, rows: list[dict[str, Any]], stage: str = "test") -> None:
        super().report(rows, stage)
        counts = ", ".join(f"{k}: {v}" for k, v in sorted(self.backend_counts.items()))
        print(f"videos decoded by backend: {counts or 'none'}; undecodable frames replaced: {self.replaced_frames}",
              flush=True)

    # ----- which decoder served each video -------------------------------------------------------
    def record_videos(self, batch: dict[str, Any]) -> None:
        noted = []
        for sample_id, layouts in zip(batch.get("ids", []), batch.get("layouts", [])):
            for layout in layouts:
                if layout.kind != "video":
                    continue
                self.backend_counts[layout.backend] += 1
                self.backend_counts["fallback"] += int(any(n.startswith("fallback") for n in layout.notes))
                self.replaced_frames += layout.replaced_frames
                if layout.notes:
                    noted.append({"id": sample_id, "path": layout.path, "backend": layout.backend, "notes": layout.notes})
        self._write_notes(noted)

    def _write_notes(self, noted: list[dict[str, Any]]) -> None:
        if not noted or not self._trainer:
            return
        path = Path(self.trainer.default_root_dir) / "video_notes.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.writelines(json.dumps(n) + "\n" for n in noted)

    def on_train_batch_start(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.record_videos(batch)
        for name, count in self.backend_counts.items():
            self.log(f"video/backend_{name}", float(count), batch_size=1)
        self.log("video/replaced_frames", float(self.replaced_frames), batch_size=1)

    def on_validation_batch_start(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self.record_videos(batch)

    on_predict_batch_start = on_validation_batch_start

    # ----- contact sheets of test videos ---------------------------------------------------------
    def on_test_epoch_start(self) -> None:
        super().on_test_epoch_start()
        self.frame_capture = FrameCapture(self.contact_sheets)

    def on_test_batch_start(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self.record_videos(batch)
        self.frame_capture.add(batch, self.processor)  # uint8 still: `media_features` normalises in the step

    def on_test_records(self, records: list[dict[str, Any]]) -> None:
        """After the report: a sheet per captured video (rank 0's share of the test set)."""
        if self.contact_sheets and self.trainer.is_global_zero:
            directory = Path(self.trainer.default_root_dir) / "contact_sheets"
            paths = save_contact_sheets(self.frame_capture.items, records, directory)
            log_images(self.logger, paths, self.global_step, tag="test/contact_sheets")
            print(f"{len(paths)} contact sheets in {directory}", flush=True)
