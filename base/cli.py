"""The `mm15` command: LightningCLI's fit / validate / test / predict, plus `export`, `prepare`
(write sharded sources, `mm15.base.data.prepare`) and `plan` (tokens and skips before training,
`mm15.base.data.plan`).

    mm15 fit --config configs/base/demo.yaml
    mm15 test --config configs/base/demo.yaml --ckpt_path last
    mm15 fit --config configs/base/demo.yaml --print_config     # the full, round-trippable config

Model and data are chosen by `class_path` (`mm15.base.module.MM15Module`,
`mm15.video.module.MM15VideoModule`, `mm15.ui.module.MM15UIModule`; `mm15.base.data.datamodule.MM15DataModule`).
The optimizer and scheduler are init arguments of the module (`optimizer:` / `scheduler:` with
`class_path`), because the module builds per-component parameter groups itself.
"""

from __future__ import annotations

import sys

from pytorch_lightning import LightningDataModule
from pytorch_lightning.cli import LightningCLI

from mm15.base.module import MM15Module


class MM15CLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--save_model", type=str | None, default=None,
                            help="after fit: write the trained model as one mm15 directory here")

    def after_fit(self) -> None:
        target = self.config[self.subcommand].get("save_model")
        if target and self.trainer.is_global_zero:
            self.model.save_model(target)
            print(f"saved model to {target}")


def main(args: list[str] | None = None) -> None:
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["export"]:
        from mm15.base.training.export import main as export_main

        return export_main(argv[1:])
    if argv[:1] == ["prepare"]:
        from mm15.base.data.prepare import main as prepare_main

        return prepare_main(argv[1:])
    if argv[:1] == ["plan"]:
        from mm15.base.data.plan import main as plan_main

        return plan_main(argv[1:])
    MM15CLI(
        MM15Module, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
        auto_configure_optimizers=False, save_config_kwargs={"overwrite": True}, args=args,
    )


if __name__ == "__main__":
    main()
