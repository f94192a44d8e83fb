"""What an mm15 run leaves behind -> the module that evaluates it, with its saved preprocessing.

Three kinds of artefact, told apart by what they hold:

* a model directory (`mm15_config.json`: `mm15 fit --save_model DIR`, `mm15 export --kind merged`);
* an adapter directory (`mm15_adapter.json`: `mm15 export --kind adapter`), loaded onto its base;
* a Lightning checkpoint (a `.ckpt` file or an FSDP2 checkpoint directory), rebuilt from the config
  it carries (LightningCLI saves the run's model arguments in it), as `mm15 export` does.

The module class follows the saved preprocessing spec: one with a `video` part (saved by
`mm15.video`) becomes `MM15VideoModule`, so frames are sampled and decoded as in training; one
without it is an image model (`MM15Module`), which answers videos only when given `num_frames`
(training-free, as `configs/video/training_free.yaml` does). A checkpoint keeps its own class.

    module = load_module("runs/base_demo/model")                  # MM15Module, eval mode
    module = load_module("runs/base_demo/model", num_frames=5)    # MM15VideoModule, training-free
    module = load_module("runs/sft_lora/export/adapter")
    module = load_module("runs/base_demo/checkpoints/last.ckpt")
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Literal

from mm15.base.model import SPEC_FILE, read_saved_spec
from mm15.base.module import MM15Module
from mm15.base.training.adapters import ADAPTER_META, read_adapter_spec

log = logging.getLogger(__name__)
Artefact = Literal["model", "adapter", "checkpoint"]
CHECKPOINT_METADATA = "meta.pt"  # Lightning's file beside the shards of a distributed checkpoint


class NotAnMM15Model(FileNotFoundError):
    """The path is none of the artefacts mm15 writes."""


def artefact_kind(path: str | Path) -> Artefact:
    p = Path(path)
    if (p / SPEC_FILE).is_file():
        return "model"
    if (p / ADAPTER_META).is_file():
        return "adapter"
    if p.is_file() or (p / CHECKPOINT_METADATA).is_file():
        return "checkpoint"
    what = "does not exist" if not p.exists() else "is a directory without any of them"
    raise NotAnMM15Model(
        f"{p} is not an mm15 model: expected a model directory (with {SPEC_FILE}, from `mm15 fit --save_model DIR` "
        f"or `mm15 export`), an adapter directory (with {ADAPTER_META}, from `mm15 export --kind adapter`) or a "
        f"Lightning checkpoint (a .ckpt file or a sharded checkpoint directory); {p} {what}")


def load_module(path: str | Path, num_frames: int | None = None, max_length: int | None = None) -> MM15Module:
    """The module in eval mode on the CPU. `num_frames` overrides (or, for an image model, adds) the
    frames per video; `max_length` the context length; both are logged when they change the spec."""
    kind = artefact_kind(path)
    if kind == "checkpoint":
        module = _from_checkpoint(path)
    else:
        saved = (read_saved_spec if kind == "model" else read_adapter_spec)(path)[2]
        module = _from_directory(path, kind, has_video="video" in saved, wants_video=num_frames is not None)
    module.processor.spec = overridden_spec(module, num_frames, max_length, str(path))
    return module.eval()


def _from_directory(path: str | Path, kind: Artefact, has_video: bool, wants_video: bool) -> MM15Module:
    source = {"pretrained" if kind == "model" else "adapter": str(path)}
    if has_video or wants_video:
        from mm15.video.module import MM15VideoModule

        module: MM15Module = MM15VideoModule(**source, mode="sft" if has_video else "training_free")
    else:
        module = MM15Module(**source)
    module.configure_model()
    return module


def _from_checkpoint(path: str | Path) -> MM15Module:
    from mm15.base.training.export import module_from_checkpoint, read_checkpoint

    try:
        checkpoint = read_checkpoint(path)
    except Exception as e:  # torch.load of a file that is no checkpoint: unpickling errors of many kinds
        raise NotAnMM15Model(f"{path} is not an mm15 model: reading it as a Lightning checkpoint failed "
                             f"({type(e).__name__}: {e})") from None
    if not isinstance(checkpoint, dict) or "mm15_preprocessing" not in checkpoint:
        raise NotAnMM15Model(f"{path} is not an mm15 checkpoint: it holds no mm15 preprocessing spec "
                             "(mm15 writes one into every checkpoint)")
    return module_from_checkpoint(checkpoint)


def overridden_spec(module: MM15Module, num_frames: int | None, max_length: int | None, where: str):
    """The module's preprocessing spec with the two overrides evaluation may ask for."""
    spec = module.processor.spec
    if num_frames is not None:
        if not hasattr(spec, "video"):
            raise ValueError(f"num_frames={num_frames}: the checkpoint {where} is of an image model "
                             f"({type(module).__name__}); save it as a model directory first "
                             "(`mm15 export --kind merged`) to answer videos training-free")
        sampling = spec.video.sampling
        if getattr(module, "mode", None) == "training_free":
            log.info("%s: an image model answering videos training-free, %d frames each", where, num_frames)
        elif sampling.num_frames != num_frames:
            log.warning("%s: frames per video %d (saved spec: %d)", where, num_frames, sampling.num_frames)
        spec = replace(spec, video=replace(spec.video, sampling=replace(sampling, num_frames=num_frames)))
    if max_length is not None and max_length != spec.max_length:
        log.warning("%s: max_length %d (saved spec: %d)", where, max_length, spec.max_length)
        spec = replace(spec, max_length=max_length)
    return spec
