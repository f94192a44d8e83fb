"""The synthetic UI demo learns: `configs/ui/demo.yaml` (MM1.5 dynamic splitting, 3 crops) trained
on CPU, then `test` prints the UI results table, writes predictions and overlays.

Bars asserted (default suite):
* referring (mean of Ref-i and Ref-A: widget type and OCR at a point) at least twice chance (0.5);
* grounding accuracy (IoU > 0.5, mean of Grd-i and Grd-A) clearly above always predicting the average
  box (0.03), and above the layout prior (`on_screen`: the box of a random widget of the screen, 0.25)
  by 0.1, so it finds which widget is asked for, not only where widgets sit.

The table's `on_screen` column is the shortcut level (naming a random candidate shown on the screen:
1/2 for OCR), so a referring score is read against it as well as chance. The measurements behind the
demo recipe, and the margins these bars leave over several seeds, are in docs/experiments.md.

The slow test also trains `configs/ui/demo_nosplit.yaml` and prints both tables, so the effect of
dynamic splitting on small elements can be read off (`-n 0` so that its print reaches the terminal):

    python -m pytest tests/test_ui_learns.py -m slow -s -n 0
"""

from pathlib import Path

import pytest
from pytorch_lightning import LightningDataModule

from mm15.base.cli import MM15CLI
from mm15.base.metrics import format_table
from mm15.base.module import MM15Module
from mm15.ui.metrics import RESULT_COLUMNS

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "ui" / "demo.yaml")
NOSPLIT = str(ROOT / "configs" / "ui" / "demo_nosplit.yaml")


def train_and_test(config: str, *overrides: str) -> tuple[dict, MM15CLI]:
    cli = MM15CLI(MM15Module, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                  auto_configure_optimizers=False, run=False,
                  args=["--config", config, "--trainer.enable_progress_bar=false", *overrides])
    cli.trainer.fit(cli.model, cli.datamodule)
    cli.trainer.test(cli.model, datamodule=cli.datamodule)
    rows = {r["task"]: r for r in cli.model.compute_metrics(cli.model.records)}
    return rows, cli


def category(rows: dict, kind: str) -> tuple[float, float]:
    """Mean score and mean baseline over the iPhone and Android categories of `kind` (Ref / Grd)."""
    chosen = [rows[f"{kind}-{p}"] for p in ("i", "A")]
    return sum(r["score"] for r in chosen) / 2, sum(r["baseline"] for r in chosen) / 2


def on_screen(rows: dict, kind: str) -> float:
    """Mean on-screen baseline (naming / pointing at a random element of the screen) of `kind`."""
    return sum(rows[f"{kind}-{p}"]["on_screen"] for p in "iA") / 2


@pytest.mark.learns(seconds=300)
def test_ui_demo_learns_referring_and_grounding(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rows, cli = train_and_test(DEMO)
    out = capsys.readouterr().out
    with capsys.disabled():
        print("\nUI demo (dynamic splitting)\n" + format_table(list(rows.values()), RESULT_COLUMNS))
    grounding, average_box = category(rows, "Grd")
    referring, chance = category(rows, "Ref")
    with capsys.disabled():
        print(f"grounding {grounding:.3f} vs average box {average_box:.3f} (on screen {on_screen(rows, 'Grd'):.3f});"
              f" referring {referring:.3f} vs chance {chance:.3f} (on screen {on_screen(rows, 'Ref'):.3f})")
    assert referring >= 2 * chance, rows
    assert grounding >= average_box + 0.15 and grounding >= 2 * average_box, rows
    assert grounding >= on_screen(rows, "Grd") + 0.1, rows
    run = tmp_path / "runs" / "ui_demo"
    assert "test results" in out and "Grd-i" in out and "Ref-A" in out and "on_screen" in out
    assert all(rows[f"{kind}-{p}"]["on_screen"] is not None for kind in ("Ref", "Grd") for p in "iA")
    assert (run / "test_predictions.jsonl").exists()
    assert len(list((run / "overlays").glob("*.png"))) == 16
    assert list((run / "logs").rglob("events.out.tfevents.*"))  # overlays and metrics in TensorBoard


@pytest.mark.slow
def test_splitting_versus_no_splitting(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    tables = {}
    for name, config in (("dynamic splitting (2..4 crops + overview)", DEMO), ("no splitting (1 crop)", NOSPLIT)):
        rows, _ = train_and_test(config)
        tables[name] = rows
    with capsys.disabled():
        for name, rows in tables.items():
            print(f"\nUI demo, {name}\n" + format_table(list(rows.values()), RESULT_COLUMNS))
        for task in sorted(tables[next(iter(tables))]):
            a, b = (tables[n].get(task, {}).get("score") for n in tables)
            print(f"{task:32s} split {a if a is None else round(a, 3)!s:>6}  no split {b if b is None else round(b, 3)!s:>6}")
