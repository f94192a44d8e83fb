"""MM1.5-UI: the shared LightningModule with UI metrics, box overlays and the n_min check.

Everything but the hooks below is `mm15.base.module.MM15Module`: the model, the processor (regions
through the run's `BoxCodec`, screenshots through the core splitting: MM1.5 dynamic splitting by
default, Ferret-UI anyres as a `SplitSpec` configuration, see `FERRET_UI_ANYRES`), training and
test by generation.

* `compute_metrics`: per-task referring exact match, grounding accuracy at IoU > 0.5, Spotlight
  CIDEr-D / F1, and the Ref-i / Ref-A / Grd-i / Grd-A averages (`mm15.ui.metrics`), printed as the
  results table and logged by the base `report`.
* `on_test_records`: after the base wrote the predictions and the table, overlays of a sample of
  test items as PNG in `<run dir>/overlays/` and in TensorBoard.
* n_min: MM1.5 reports referring/grounding collapsing (74.0 -> 24.5) when the minimum number of
  crops is lowered only at test time; a checkpoint or pretrained model whose `grid_min` differs from
  this config's gets a specific warning (the checkpoint's preprocessing is the one used).

    mm15 fit --config configs/ui/demo.yaml && mm15 test --config configs/ui/demo.yaml --ckpt_path last
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from mm15.base.model import read_saved_spec
from mm15.base.module import MM15Module
from mm15.base.data.splitting import SplitSpec

from .metrics import ui_results
from .overlays import log_overlays, save_overlays

log = logging.getLogger(__name__)

# Ferret-UI's released anyres as a core SplitSpec (docs/reference.md, section 2): grids 1x2, 2x1, 2x2, 3x1,
# 1x3 at 336 px, LLaVA-NeXT selection, stretch, overview first.
FERRET_UI_ANYRES = dict(crop_size=336, mode="dynamic", grids=[(1, 2), (2, 1), (2, 2), (3, 1), (1, 3)],
                        select="llava_next", resize="stretch", overview="first")


def n_min_warning(trained: dict[str, Any] | None, current: SplitSpec) -> str | None:
    """The warning to give when the trained split's n_min differs from the current one, else None."""
    split = (trained or {}).get("split") or {}
    grid_min, mode = split.get("grid_min"), split.get("mode", "dynamic")
    if grid_min is None or mode != current.mode or mode != "dynamic" or grid_min == current.grid_min:
        return None
    return (f"split.grid_min (n_min) is {grid_min} in training but {current.grid_min} in this config; MM1.5 "
            f"reports referring/grounding collapsing when n_min changes at test time: keep it equal "
            f"(only grid_max may widen)")


class MM15UIModule(MM15Module):
    """`MM15Module` for UI data. Args: those of `MM15Module`, plus
    overlays: how many test items to draw with their predicted and true boxes (0: none).
    """

    def __init__(self, *args: Any, overlays: int = 16, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.overlays = overlays
        if self.pretrained:
            self._warn_n_min(read_saved_spec(self.pretrained)[2])

    def _warn_n_min(self, trained: dict[str, Any] | None) -> None:
        message = n_min_warning(trained, self.processor.spec.split)
        if message:
            log.warning(message)

    def compute_metrics(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return ui_results(records, self.processor.spec.boxes)

    def on_test_records(self, records: list[dict[str, Any]]) -> None:
        """After the base wrote predictions and printed the table: overlays of a sample of items."""
        if self.overlays and self.trainer.is_global_zero:
            directory = Path(self.trainer.default_root_dir) / "overlays"
            paths = save_overlays(records, directory, self.processor.spec.boxes, self.overlays)
            log_overlays(self.logger, paths, self.global_step)
            print(f"{len(paths)} overlays in {directory}", flush=True)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._warn_n_min(checkpoint.get("mm15_preprocessing"))
        super().on_load_checkpoint(checkpoint)
