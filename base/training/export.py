"""`mm15 export`: turn a training checkpoint into a PEFT adapter directory and/or a merged model.

    mm15 export --ckpt_path runs/sft_lora/checkpoints/last.ckpt --output runs/sft_lora/export
    mm15 export --ckpt_path ... --output ... --kind merged       # adapter | merged | both (default)

Writes (under `--output`):

* `adapter/`: what plain PEFT loads, without mm15 installed:
      base = AutoModelForCausalLM.from_pretrained(<base>)          # adapter_config.json names it
      llm = peft.PeftModel.from_pretrained(base, "adapter")
  plus `connector.safetensors`, the tower (`vision/`, LoRA merged if it had one), the tokenizer and
  `mm15_adapter.json` (model spec, preprocessing spec, fingerprint of the base LLM). When the base
  LLM has no path (built from a config) or `--save_base` is given, it is written to `base_llm/`.
  `MM15Module(adapter="adapter")` (or `model.init_args.adapter` in YAML) starts from it again.
* `merged/`: one mm15 model directory (`MM15Model.from_pretrained`), LoRA merged into the
  weights; `merged/llm` is a plain transformers checkpoint.

Checkpoints are single files or FSDP2 sharded directories (consolidated here on CPU). They are
loaded with `weights_only=True` (`checkpointing.load_checkpoint_file`: tensors, plain values and
mm15's spec dataclasses), and only mm15 LightningModule classes are built from them: a checkpoint
that pickles anything else, or names another module class, is refused.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib
import inspect
import json
import tempfile
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from mm15.base.training.adapters import ADAPTER_META, is_peft, weight_fingerprint
from mm15.base.training.checkpointing import load_checkpoint_file
from mm15.base.module import MM15Module


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A Lightning checkpoint as one dict; sharded (DCP) directories are consolidated on CPU."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if not path.is_dir():
        return load_checkpoint_file(path)
    from lightning_fabric.utilities.load import _METADATA_FILENAME
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    checkpoint = load_checkpoint_file(path / _METADATA_FILENAME)
    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(path, Path(tmp) / "full.pt")
        shards = load_checkpoint_file(Path(tmp) / "full.pt")
    checkpoint["state_dict"] = shards["state_dict"]
    return checkpoint


def module_class(name: str) -> type[MM15Module]:
    """The LightningModule class a checkpoint names, imported only when it is one of mm15's own."""
    module_path, _, cls_name = name.rpartition(".")
    if not module_path.startswith("mm15."):
        raise ValueError(f"the checkpoint names module class {name!r}, which is not an mm15 class: refusing to "
                         "import it (export builds only mm15.* LightningModules)")
    cls = getattr(importlib.import_module(module_path), cls_name, None)
    if not (isinstance(cls, type) and issubclass(cls, MM15Module)):
        raise ValueError(f"the checkpoint names module class {name!r}: {name!r} is not an MM15Module subclass")
    return cls


def module_from_checkpoint(checkpoint: dict[str, Any]) -> MM15Module:
    """Rebuild the LightningModule (its own class, its own init arguments) and load the weights."""
    hparams = dict(checkpoint.get("hyper_parameters", {}))
    hparams.pop("_instantiator", None)
    # Export neither trains nor resolves optimizer or scheduler class paths (the module never saves them).
    for key in ("optimizer", "scheduler"):
        hparams.pop(key, None)
    if "_class_path" in hparams:  # written through LightningCLI: a config dict, parsed as the CLI does
        from pytorch_lightning.cli import instantiate_module

        module_class(hparams["_class_path"])
        module = instantiate_module(MM15Module, hparams)
    else:
        cls = module_class(checkpoint.get("mm15_module_class", "mm15.base.module.MM15Module"))
        accepted = inspect.signature(cls.__init__).parameters
        module = cls(**{k: v for k, v in hparams.items() if k in accepted})
    module.configure_model()
    module.on_load_checkpoint(checkpoint)  # refuses another config; restores the preprocessing spec
    module.load_state_dict(checkpoint["state_dict"], strict=False)
    return module.eval()


def _spec_dict(module: MM15Module, llm_ref: str) -> dict[str, Any]:
    spec = dataclasses.asdict(module.model.spec)
    spec["vision"].update(name_or_path="vision", config=None)
    spec["llm"].update(name_or_path=llm_ref, config=None)
    spec["tokenizer"] = "."
    return spec


def export_adapter(module: MM15Module, out: Path, save_base: bool = False) -> Path:
    """Write `out` as described in the module docstring. Merges a tower LoRA in place."""
    model = module.model
    if not is_peft(model.llm):
        raise ValueError("this checkpoint trained the LLM without LoRA, so there is no adapter: use --kind merged")
    out.mkdir(parents=True, exist_ok=True)
    base_ref = module.model_spec.llm.name_or_path
    if save_base or not base_ref:
        base = copy.deepcopy(model.llm).unload()  # the frozen base weights, LoRA layers removed
        base.save_pretrained(out / "base_llm")
        base_ref = "base_llm"
    base_path = str((out / base_ref).resolve()) if (out / base_ref).exists() else base_ref
    model.llm.peft_config["default"].base_model_name_or_path = base_path
    model.llm.save_pretrained(str(out), save_embedding_layers=False)
    if is_peft(model.vision):
        model.vision = model.vision.merge_and_unload()
    model.vision.save_pretrained(out / "vision")
    module.processor.tokenizer.save_pretrained(out)
    save_file({k: v.detach().contiguous().cpu() for k, v in model.connector.state_dict().items()},
              out / "connector.safetensors")
    meta = {
        "model": _spec_dict(module, base_ref), "crop_size": model.crop_size,
        "preprocessing": dataclasses.asdict(module.processor.spec),
        "base_model_name_or_path": base_path,
        "base_fingerprint": weight_fingerprint(model.llm, only_frozen=False),
        "lora": dataclasses.asdict(module.lora) if module.lora else None,
    }
    (out / ADAPTER_META).write_text(json.dumps(meta, indent=2))
    return out


def export_merged(module: MM15Module, out: Path) -> Path:
    """LoRA (LLM and tower) merged into the weights; one mm15 model directory. Modifies the module."""
    model = module.model
    for part in ("llm", "vision"):
        if is_peft(getattr(model, part)):
            setattr(model, part, getattr(model, part).merge_and_unload())
    module.save_model(out)
    return out


def export(ckpt_path: str, output: str, kind: str = "both", save_base: bool = False) -> dict[str, str]:
    module = module_from_checkpoint(read_checkpoint(ckpt_path))
    out, written = Path(output), {}
    if kind in ("adapter", "both"):
        if kind == "both" and not is_peft(module.model.llm):
            print("no LoRA on the LLM: exporting the merged model only")
        else:
            written["adapter"] = str(export_adapter(module, out / "adapter", save_base))
    if kind in ("merged", "both"):
        written["merged"] = str(export_merged(module, out / "merged"))
    return written


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mm15 export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt_path", required=True, help="a checkpoint file or FSDP2 checkpoint directory")
    parser.add_argument("--output", required=True, help="folder for adapter/ and merged/")
    parser.add_argument("--kind", choices=("adapter", "merged", "both"), default="both")
    parser.add_argument("--save_base", action="store_true", help="also write the base LLM into adapter/base_llm")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(list(argv or []))
    for kind, path in export(args.ckpt_path, args.output, args.kind, args.save_base).items():
        print(f"wrote {kind}: {path}")
