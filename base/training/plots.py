"""Pictures of a run: the loss curves drawn at the end of `fit`, and images added to TensorBoard.

`LossCurves` is a callback that `MM15Module.configure_callbacks` attaches to every run. It collects
the metrics the module logs (`train/loss` per batch, `val/loss` per validation, `train/lr_<group>`
per batch) as they are logged, so it needs no logger (`logger: false` works), and at the end of
`fit` rank 0 draws `<run dir>/loss.png`: train and val loss against the optimizer step on top, the
learning rates below. Its series go into checkpoints, so a resumed run draws the whole run.

    mm15 fit --config configs/video/demo.yaml       # ... loss curves in runs/video_demo/loss.png
    LossCurves().series["train/loss"]               # [(step, value), ...]
    log_images(trainer.logger, paths, step=trainer.global_step, tag="test/contact_sheets")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytorch_lightning as pl
from PIL import Image
from pytorch_lightning.trainer.states import TrainerFn

TRAIN_LOSS, VAL_LOSS, LR_PREFIX = "train/loss", "val/loss", "train/lr_"
Series = dict[str, list[tuple[int, float]]]


class LossCurves(pl.Callback):
    """Collects `train/loss`, `val/loss` and `train/lr_*` from what the module logs; draws them at fit end.

    Args:
        filename: the picture's name under `trainer.default_root_dir`.
    """

    def __init__(self, filename: str = "loss.png"):
        self.filename = filename
        self.series: Series = {}

    def _collect(self, trainer: pl.Trainer, wanted: Callable[[str], bool]) -> None:
        # `callback_metrics` holds the value just logged, whatever the logger and `log_every_n_steps`
        for key, value in trainer.callback_metrics.items():
            if wanted(key):
                self.series.setdefault(key, []).append((trainer.global_step, float(value)))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if outputs:  # None or empty: the step was skipped and logged nothing new
            self._collect(trainer, lambda key: key == TRAIN_LOSS or key.startswith(LR_PREFIX))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == TrainerFn.FITTING:
            self._collect(trainer, lambda key: key == VAL_LOSS)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero and self.series.get(TRAIN_LOSS):
            path = plot_loss_curves(self.series, Path(trainer.default_root_dir) / self.filename)
            print(f"loss curves in {path}", flush=True)

    def state_dict(self) -> dict[str, Any]:
        return {"series": {k: [list(p) for p in v] for k, v in self.series.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.series = {k: [(int(s), float(v)) for s, v in points] for k, points in state_dict["series"].items()}


def running_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Mean of each `window` consecutive values (len(values) - window + 1 of them)."""
    return np.convolve(values, np.ones(window) / window, mode="valid")


def lr_lines(series: Series) -> list[tuple[str, list[tuple[int, float]]]]:
    """The `train/lr_<group>` series, groups with identical schedules merged into one line, labelled by
    component where a line holds all of a component's groups (`llm` for `llm`, `llm_other`, `llm_no_decay`)."""
    merged: dict[tuple, list[str]] = {}
    for key in sorted(k for k in series if k.startswith(LR_PREFIX)):
        merged.setdefault(tuple(series[key]), []).append(key[len(LR_PREFIX):])
    if len(merged) == 1:
        return [("lr", list(points)) for points in merged]
    groups_of: dict[str, set[str]] = {}
    for name in (n for names in merged.values() for n in names):
        groups_of.setdefault(name.split("_", 1)[0], set()).add(name)
    lines = []
    for points, names in merged.items():
        label = []
        for name in names:
            component = name.split("_", 1)[0]
            label.append(component if groups_of[component] <= set(names) else name)
        lines.append(("lr " + ", ".join(dict.fromkeys(label)), list(points)))
    return lines


def plot_loss_curves(series: Series, path: str | Path) -> Path:
    """Train loss (per batch, with a running mean when long), val loss and learning rates against the
    optimizer step, as a PNG at `path`; returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # Agg: no display, no pyplot state
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    lrs = lr_lines(series)
    fig = Figure(figsize=(8, 6 if lrs else 4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2 if lrs else 1, 1, sharex=True, squeeze=False, height_ratios=[2, 1] if lrs else None)[:, 0]
    loss = axes[0]
    steps, values = (np.asarray(c) for c in zip(*series[TRAIN_LOSS]))
    window = max(1, len(values) // 50)
    loss.plot(steps, values, color="tab:blue", alpha=0.35 if window > 1 else 1.0, lw=1, label="train loss")
    if window > 1:
        loss.plot(steps[window - 1:], running_mean(values, window), color="tab:blue", lw=2,
                  label=f"train loss, mean of {window}")
    if series.get(VAL_LOSS):
        loss.plot(*zip(*series[VAL_LOSS]), color="tab:orange", marker="o", lw=2, label="val loss")
    every = np.concatenate([values, [v for _, v in series.get(VAL_LOSS, [])]])
    if every.min() > 0 and every.max() / every.min() > 30:  # a loss falling by decades reads better on a log axis
        loss.set_yscale("log")
        loss.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
        loss.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))  # 0.2, not 2x10^-1
        loss.yaxis.set_minor_formatter(NullFormatter())
    loss.set_ylabel("loss")
    loss.set_title(str(Path(path).parent))
    loss.legend(loc="best")
    loss.grid(alpha=0.3)
    for label, points in lrs:
        axes[1].plot(*zip(*points), lw=1.5, label=label)
    if lrs:
        axes[1].set_ylabel("learning rate")
        axes[1].legend(loc="best", fontsize="small")
        axes[1].grid(alpha=0.3)
    axes[-1].set_xlabel("optimizer step")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def log_images(logger: Any, paths: list[Path], step: int = 0, tag: str = "images") -> int:
    """Add PNG files to a TensorBoard logger as `<tag>/<k>` (other loggers are left alone); returns how many."""
    writer = getattr(logger, "experiment", None)
    if not hasattr(writer, "add_image"):
        return 0
    for k, path in enumerate(paths):
        with Image.open(path) as im:
            writer.add_image(f"{tag}/{k:03d}", np.asarray(im.convert("RGB")), step, dataformats="HWC")
    writer.flush()
    return len(paths)
