"""Support code for the scale-out tests, importable by the `mm15 fit` subprocesses (PYTHONPATH=tests).

* `LossRecorder`: every rank appends one JSON line per micro-batch (step, loss, crops, sample ids).
* `ParameterRecorder`: rank 0 saves the trainable parameters (gathered from FSDP2 shards) after the
  last update, to compare runs weight for weight.
* `MetricRecorder`, `ExceptionRecorder`: every rank writes the synced `val/loss`, or the exception
  that stopped it, to compare ranks.
* `FewerNewTokensOnRank`: one rank decodes fewer tokens, as a rank whose answers all end early.
* `DyingCheckpointIO`: the atomic writer that SIGKILLs its own process half-way through the N-th
  checkpoint write, the worst moment for a crash.
* `tiny_run_config`: a complete `mm15 fit` config of a tiny LoRA model on mixed image and text-only
  data, written as YAML like a user's.
"""

from __future__ import annotations

import dataclasses
import faulthandler
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

import pytorch_lightning as pl
import yaml

from mm15.base.training.checkpointing import AtomicCheckpointIO
from mm15.base.tiny import TINY_LLM, TINY_VISION

ROOT = Path(__file__).resolve().parents[1]
faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 <pid>` prints where a hung run waits


class LossRecorder(pl.Callback):
    def __init__(self, path: str):
        self.path = path

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        loss = float(outputs["loss"]) * trainer.accumulate_grad_batches if outputs else None  # Lightning divides by accumulation
        crops = batch["pixel_values"].shape[0] if "pixel_values" in batch else 0  # none: every sample skipped
        row = {"step": trainer.global_step, "rank": trainer.global_rank, "loss": loss, "world": trainer.world_size,
               "crops": int(crops), "ids": list(batch.get("ids", []))}
        with open(f"{self.path}.rank{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")


class ParameterRecorder(pl.Callback):
    def __init__(self, path: str):
        self.path = path

    def on_train_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        import torch

        params = {}
        for name, p in pl_module.named_parameters():
            if p.requires_grad:  # every rank gathers every shard, in the same order
                full = p.full_tensor() if hasattr(p, "full_tensor") else p
                params[name] = full.detach().cpu().clone()
        if trainer.is_global_zero:
            torch.save(params, self.path)


def read_parameters(path: Path) -> dict[str, Any]:
    import torch

    return torch.load(path, weights_only=True)


class MetricRecorder(pl.Callback):
    def __init__(self, path: str):
        self.path = path

    def on_validation_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        with open(f"{self.path}.rank{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps({"step": trainer.global_step, **metrics}) + "\n")


class ExceptionRecorder(pl.Callback):
    def __init__(self, path: str):
        self.path = path

    def on_exception(self, trainer: pl.Trainer, pl_module: Any, exception: BaseException) -> None:
        row = {"rank": trainer.global_rank, "type": type(exception).__name__, "message": str(exception)}
        Path(f"{self.path}.rank{trainer.global_rank}.json").write_text(json.dumps(row))


class FewerNewTokensOnRank(pl.Callback):
    """Rank `rank` generates at most `max_new_tokens`: its decoding loop ends before the others'."""

    def __init__(self, rank: int = 1, max_new_tokens: int = 1):
        self.rank, self.max_new_tokens = rank, max_new_tokens

    def setup(self, trainer: pl.Trainer, pl_module: Any, stage: str) -> None:
        if trainer.global_rank == self.rank:
            pl_module.generation = dataclasses.replace(pl_module.generation, max_new_tokens=self.max_new_tokens)


def read_rank_files(prefix: Path, suffix: str) -> dict[int, Any]:
    """{rank: content} of `<prefix>.rank<r><suffix>` (JSON, or JSON lines for `.jsonl`)."""
    out = {}
    for path in sorted(prefix.parent.glob(f"{prefix.name}.rank*{suffix}")):
        rank = int(path.name[len(prefix.name) + len(".rank"):-len(suffix)])
        text = path.read_text()
        out[rank] = [json.loads(line) for line in text.splitlines()] if suffix == ".jsonl" else json.loads(text)
    return out


class DyingCheckpointIO(AtomicCheckpointIO):
    def __init__(self, die_on_save: int = 2):
        super().__init__()
        self.die_on_save = die_on_save
        self.saves = 0

    def write(self, checkpoint: dict[str, Any], f: IO[bytes]) -> None:
        self.saves += 1
        if self.saves < self.die_on_save:
            return super().write(checkpoint, f)
        import io

        import torch

        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        data = buffer.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)


def read_losses(prefix: Path) -> list[dict[str, Any]]:
    rows = []
    for path in sorted(prefix.parent.glob(prefix.name + ".rank*.jsonl")):
        rows += [json.loads(line) for line in path.read_text().splitlines()]
    return rows


def write_text_only(path: Path, n: int) -> None:
    with open(path, "w") as f:
        for i in range(n):
            turns = [{"role": "user", "text": f"Count to {i % 5 + 1}."},
                     {"role": "assistant", "text": " ".join(str(k) for k in range(1, i % 5 + 2))}]
            f.write(json.dumps({"id": f"text-{i}", "turns": turns, "media": [], "task": "count"}) + "\n")


ADAMW = {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.01, "weight_decay": 0.0}}
# Plain SGD: unlike AdamW and Muon its step scales with the gradient, so a gradient reduced with the
# wrong scale (summed over ranks instead of averaged) shows in the weights and the losses.
SGD = {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.5, "weight_decay": 0.0}}


def tiny_run_config(run_dir: Path, data_dir: Path, max_steps: int = 6, every_n_steps: int = 2,
                    plugins: list[Any] | None = None, lora: bool = True,
                    optimizer: dict[str, Any] | None = None) -> dict[str, Any]:
    model_args: dict[str, Any] = {
        "model": {
            "vision": {"config": dict(TINY_VISION)},
            "llm": {"config": dict(TINY_LLM)},
            "connector": {"kind": "c_abstractor", "num_tokens": 4, "hidden_size": 32, "depth": 1},
            "tokenizer": "tiny",
        },
        "preprocessing": {"split": {"crop_size": 32, "grid_min": 1, "grid_max": 2}, "max_length": 512},
        "optimizer": optimizer or ADAMW,
        "scheduler": {"class_path": "mm15.base.training.optim.WarmupCosine", "init_args": {"warmup_steps": 1}},
        "freeze": {"vision": True, "connector": False, "llm": False},
    }
    if lora:
        model_args["lora"] = {"r": 4, "alpha": 8, "dropout": 0.0}
    return {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_steps": max_steps, "limit_val_batches": 0,
            "num_sanity_val_steps": 0, "logger": False, "enable_progress_bar": False,
            "enable_model_summary": False, "default_root_dir": str(run_dir), "plugins": plugins or [],
            "callbacks": [
                {"class_path": "pytorch_lightning.callbacks.ModelCheckpoint",
                 "init_args": {"dirpath": str(run_dir / "checkpoints"), "every_n_train_steps": every_n_steps,
                               "save_last": True, "save_top_k": 0}},
                {"class_path": "scaleout_support.LossRecorder", "init_args": {"path": str(run_dir / "losses")}},
                {"class_path": "scaleout_support.ParameterRecorder", "init_args": {"path": str(run_dir / "params.pt")}},
            ],
        },
        "model": {"class_path": "mm15.base.module.MM15Module", "init_args": model_args},
        "data": {"class_path": "mm15.base.data.datamodule.MM15DataModule", "init_args": {
            "batch_size": 2, "global_batch_size": 4, "seed": 0,
            "train": [
                {"class_path": "mm15.data_builders.synthetic_shapes.SyntheticShapesSource",
                 "init_args": {"root": str(data_dir / "shapes"), "split": "train", "num_samples": 8,
                               "min_side": 24, "max_side": 56}},
                {"class_path": "mm15.base.data.sources.JsonlSource", "init_args": {"path": str(data_dir / "text.jsonl")}},
            ]}},
    }


def write_config(path: Path, config: dict[str, Any], command: str = "mm15 fit --config <this file>") -> Path:
    path.write_text(f"# {command}\n" + yaml.safe_dump(config, sort_keys=False))
    return path


class RunHung(AssertionError):
    """A run outlived its timeout: some rank waits in a collective another rank never reaches."""


def run_cli(args: list[str], cwd: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    """`python -m mm15.base.cli ...` in a fresh process, tests/ importable for the callbacks above.

    The run gets its own process group (rank 0 and the ranks Lightning starts): past `timeout` every
    rank prints its stack (SIGUSR1, registered above), all are killed, and `RunHung` carries the stacks."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "mm15.base.cli", *args]
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for sig in (signal.SIGUSR1, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:  # every process of the group already gone
                pass
            time.sleep(3 if sig == signal.SIGUSR1 else 0)
        out, err = proc.communicate()
        raise RunHung(f"`mm15 {args[0]}` still running after {timeout} s; stacks of its processes:\n{err[-8000:]}")
    return subprocess.CompletedProcess(command, proc.returncode, out, err)
