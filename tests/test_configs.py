"""Every YAML under configs/ parses against the current signatures (no instantiation, no download).

Full configs (with `model:`) parse alone; fragments (strategies, ...) parse on top of the base demo."""

from pathlib import Path

import pytest
import yaml
from pytorch_lightning import LightningDataModule

from mm15.base.cli import MM15CLI
from mm15.base.module import MM15Module

ROOT = Path(__file__).resolve().parents[1]
LMMS_EVAL_TASKS = ROOT / "configs" / "eval" / "lmms_eval"  # lmms-eval task configs: tests/test_eval_lmms.py loads them
CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if LMMS_EVAL_TASKS not in p.parents)
DEMO = ROOT / "configs" / "base" / "demo.yaml"


class ParseOnlyCLI(MM15CLI):
    def instantiate_classes(self) -> None:  # parse and type-check only
        pass


def _parse(*paths):
    args = [a for p in paths for a in ("--config", str(p))]
    return ParseOnlyCLI(MM15Module, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                        auto_configure_optimizers=False, run=False, args=args)


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(ROOT)) for p in CONFIGS])
def test_config_parses(path):
    text = path.read_text()
    assert text.startswith("#"), "each config starts with a comment holding its launch command"
    full = "model" in (yaml.safe_load(text) or {})
    cli = _parse(path) if full else _parse(DEMO, path)
    assert cli.config.model.class_path.startswith("mm15.")


def test_print_config_round_trips(tmp_path, capsys):
    with pytest.raises(SystemExit):
        MM15CLI(MM15Module, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                auto_configure_optimizers=False, args=["fit", "--config", str(DEMO), "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    for key in ("ckpt_path", "weights_only"):  # arguments of the `fit` subcommand, not of the config
        printed.pop(key, None)
    (tmp_path / "printed.yaml").write_text("# printed\n" + yaml.safe_dump(printed))
    a, b = _parse(DEMO).config, _parse(tmp_path / "printed.yaml").config
    assert a.model == b.model and a.data == b.data and a.trainer.max_steps == b.trainer.max_steps
