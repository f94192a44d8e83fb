"""MM15UIModule wiring: regions in the original frame under every splitting, Ferret-UI anyres as a
configuration, the n_min warning, the Ferret-UI reader inside the data module's error budget."""

import json
import logging
import re
from dataclasses import asdict
from pathlib import Path

import pytest
import yaml
from PIL import Image

from mm15.base.data.datamodule import DataErrorBudgetExceeded, MM15DataModule
from mm15.base.data.processor import MM15Processor, PreprocessSpec
from mm15.base.data.sample import Media, Sample, Turn
from mm15.base.data.splitting import SplitSpec, plan_split
from mm15.base.model import load_tokenizer
from mm15.data_builders.ferret_ui import FerretUISource
from mm15.ui.module import FERRET_UI_ANYRES, MM15UIModule, n_min_warning

from conftest import tiny_preprocessing, tiny_spec

ROOT = Path(__file__).resolve().parents[1]
UI_CONFIGS = sorted((ROOT / "configs" / "ui").glob("*.yaml"))
SPLITS = {
    "mm15_dynamic": SplitSpec(crop_size=32, grid_min=4, grid_max=9),
    "ferret_anyres": SplitSpec(**{**FERRET_UI_ANYRES, "crop_size": 32}),
    "static": SplitSpec(crop_size=32, mode="static"),
    "none": SplitSpec(crop_size=32, mode="none"),
}


def _screen_sample(tmp_path, size=(70, 150)):
    path = tmp_path / "screen.png"
    Image.new("RGB", size, (200, 200, 200)).save(path)
    return Sample("s", [Turn("user", "<image>\nWhat is <bbox_location0>?", [[10, 20, 40, 35]]),
                        Turn("assistant", "Button"),
                        Turn("user", "Where is the icon?"),
                        Turn("assistant", "<bbox_location0>", [[50, 100, 65, 140]])], [Media(str(path))])


@pytest.mark.parametrize("name", SPLITS)
def test_region_text_is_in_the_original_frame_whatever_the_splitting(tmp_path, name):
    sample = _screen_sample(tmp_path)
    tok = load_tokenizer(tiny_spec())  # the tiny tokenizer with the <image> token
    reference = MM15Processor(tok, PreprocessSpec(split=SplitSpec(crop_size=32, mode="none")), tokens_per_crop=4)
    processor = MM15Processor(tok, PreprocessSpec(split=SPLITS[name]), tokens_per_crop=4)
    texts = []
    for p in (reference, processor):
        ids = [t for t in p(sample)["input_ids"].tolist() if t != p.image_token_id]
        texts.append(re.findall(r"\[[\d, ]+\]", tok.decode(ids)))
    assert texts[0] == texts[1]
    # 70 x 150 screenshot: the grounding answer is int(50*1000/70) ... on the original image.
    assert texts[1][-1] == "[714, 666, 928, 933]"


def test_ferret_ui_anyres_is_a_split_configuration():
    spec = SplitSpec(**{**FERRET_UI_ANYRES, "crop_size": 336})
    portrait = plan_split(1170, 2532, spec)
    assert portrait.grid == (3, 1) and portrait.crop_order[0] == (0, 0)  # tall screen: 3 rows, overview first
    assert portrait.resized == (336, 3 * 336)  # stretched, not padded
    landscape = plan_split(2532, 1170, spec)
    assert landscape.grid == (1, 3) and landscape.num_crops == 4


def test_n_min_warning():
    trained = {"split": asdict(SplitSpec(grid_min=4, grid_max=9))}
    assert n_min_warning(trained, SplitSpec(grid_min=4, grid_max=16)) is None  # widening n_max is fine
    message = n_min_warning(trained, SplitSpec(grid_min=1, grid_max=9))
    assert "grid_min (n_min) is 4 in training but 1" in message
    assert n_min_warning({"split": asdict(SplitSpec(mode="none"))}, SplitSpec(mode="none", grid_min=1)) is None
    assert n_min_warning(None, SplitSpec()) is None


def test_module_warns_when_a_checkpoint_has_another_n_min(caplog):
    module = MM15UIModule(model=tiny_spec(), preprocessing=tiny_preprocessing(grid_min=2))
    trained = asdict(tiny_preprocessing(grid_min=1))
    with caplog.at_level(logging.WARNING):
        module.on_load_checkpoint({"mm15_preprocessing": trained})
    assert "n_min" in caplog.text and module.processor.spec.split.grid_min == 1  # checkpoint's spec wins


def test_ui_configs_keep_n_min_between_fit_and_test():
    assert {p.name for p in UI_CONFIGS} >= {"demo.yaml", "demo_nosplit.yaml", "sft_ferret_ui.yaml"}
    for path in UI_CONFIGS:
        config = yaml.safe_load(path.read_text())
        model = config["model"]
        assert model.get("class_path", "mm15.ui.module.MM15UIModule") == "mm15.ui.module.MM15UIModule"
        split = (model["init_args"].get("preprocessing") or {}).get("split") or {}
        # The same file drives fit and test (so n_min is equal in both). Real-size configs keep MM1.5's
        # n_min 4; the CPU demo's 64x128 screens use 2..4 (its header says why), and it does split.
        if path.name.startswith("demo"):
            assert split["mode"] == "none" if "nosplit" in path.name else split["grid_min"] == 2, path.name
        else:
            assert split.get("mode", "dynamic") == "none" or split.get("grid_min", 4) == 4, path.name


def test_ui_configs_parse_against_the_current_signatures():
    from mm15.base.cli import MM15CLI
    from mm15.base.module import MM15Module
    from pytorch_lightning import LightningDataModule

    class ParseOnly(MM15CLI):
        def instantiate_classes(self):
            pass

    def parse(*paths):
        args = [a for p in paths for a in ("--config", str(p))]
        return ParseOnly(MM15Module, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                         auto_configure_optimizers=False, run=False, args=args).config

    demo, nosplit = (parse(ROOT / "configs" / "ui" / name) for name in ("demo.yaml", "demo_nosplit.yaml"))
    assert nosplit.model.init_args.preprocessing.split.mode == "none"
    # The ablation differs from the demo only in splitting and where it writes.
    nosplit.model.init_args.preprocessing.split = demo.model.init_args.preprocessing.split
    assert nosplit.model == demo.model and nosplit.data == demo.data
    where = ("default_root_dir", "logger", "callbacks")
    same = lambda trainer: {k: v for k, v in trainer.items() if not k.startswith(where)}  # noqa: E731
    assert same(nosplit.trainer) == same(demo.trainer)
    sft = parse(ROOT / "configs" / "ui" / "sft_ferret_ui.yaml")
    assert sft.model.init_args.preprocessing.split.crop_size == 672
    assert sft.data.init_args.train[0].class_path == "mm15.data_builders.ferret_ui.FerretUISource"


def _bad_file(tmp_path, n_good, n_bad):
    Image.new("RGB", (100, 200)).save(tmp_path / "s.png")
    good = {"image": "s.png", "image_w": 100, "image_h": 200,
            "conversations": [{"from": "human", "value": "<image>\nWhere is the OK button?"},
                              {"from": "gpt", "value": "<bbox_location0>"}], "box_x1y1x2y2": [[], [[10, 10, 50, 30]]]}
    bad = dict(good, box_x1y1x2y2=[[], [[50, 10, 10, 30]]])  # inverted
    rows = [dict(good, id=i) for i in range(n_good)] + [dict(bad, id=f"bad{i}") for i in range(n_bad)]
    (tmp_path / "find_widget_iphone_train.json").write_text(json.dumps(rows))
    return FerretUISource(str(tmp_path / "find_widget_iphone_train.json"))


def test_bad_ferret_records_are_quarantined_and_the_run_continues_within_budget(tmp_path):
    quarantine = tmp_path / "quarantine.jsonl"
    data = MM15DataModule(train=[_bad_file(tmp_path, 40, 1)], quarantine_file=str(quarantine))
    samples = data.read_split("train")
    assert len(samples) == 40
    (line,) = quarantine.read_text().splitlines()
    assert json.loads(line)["record_id"] == "bad0" and "inverted" in json.loads(line)["reason"]
    over = MM15DataModule(train=[_bad_file(tmp_path, 20, 5)], quarantine_file=str(tmp_path / "q2.jsonl"))
    with pytest.raises(DataErrorBudgetExceeded, match="inverted"):
        over.read_split("train")
