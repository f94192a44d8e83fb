"""Checkpoints that are small, atomic and refuse to resume into the wrong run.

* Small: when some parameters are frozen (LLM frozen in `align`, LLM under LoRA, frozen tower),
  a checkpoint holds only the trainable parameters (plus buffers and optimizer state). Frozen
  weights come back from the base model; a fingerprint of them is stored and checked on load.
* Atomic: `AtomicCheckpointIO` writes `<name>.partial`, fsyncs, then `os.replace`s it over the
  target, so a crash never leaves a half-written `last.ckpt`. Sharded (FSDP2) checkpoints are
  directories: `swap_in_directory` writes a fresh directory and atomically re-points a symlink.
* Refusing: `run_signature` records the model spec, adapters, freezing and the trainable set;
  `check_compatible` names what changed when a resumed or tested config does not match.
* Safe to read: `load_checkpoint_file` unpickles tensors, plain values and mm15's own spec
  dataclasses only (`torch.load(weights_only=True)`); a checkpoint pickling anything else is refused.

Enable the atomic writer in YAML (`configs/base/align.yaml` and `sft_lora.yaml` do):

    trainer:
      plugins: [mm15.base.training.checkpointing.AtomicCheckpointIO]
"""

from __future__ import annotations

import hashlib
import importlib
import os
import shutil
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import IO, Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from torch import nn

PARTIAL_SUFFIX = ".partial"  # not `.ckpt`, so Lightning's `ckpt_path="last"` lookup never picks it


class AtomicCheckpointIO(TorchCheckpointIO):
    """`TorchCheckpointIO` whose local writes are atomic (write, fsync, rename in the same folder).

    Why not the default: Lightning's `_atomic_save` relies on an fsspec transaction that writes a
    temporary file in the system temp dir and *moves* it; across file systems that move is a copy,
    and a kill during it leaves a truncated checkpoint under the final name."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if "://" in str(path):  # remote storage: the object store's own write semantics
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + PARTIAL_SUFFIX)
        with open(tmp, "wb") as f:
            self.write(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)

    def write(self, checkpoint: dict[str, Any], f: IO[bytes]) -> None:
        torch.save(checkpoint, f)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        """Local files through `load_checkpoint_file` (weights only, mm15 spec dataclasses allowed), so a
        run resumes from a checkpoint whose hyper-parameters hold our specs (a module built in Python)."""
        if "://" in str(path) or weights_only is False:
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        if not Path(path).is_file():
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        return load_checkpoint_file(path, map_location=map_location or "cpu")


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ----- reading without running pickled code -------------------------------------------------------
class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file pickles objects other than tensors, plain values and mm15 spec dataclasses."""


def spec_type(qualified_name: str) -> type | None:
    """The class `mm15.<module>.<Name>` when it is one of our dataclasses (ModelSpec, LoraSpec, ...),
    else None. Only `mm15.` modules are imported."""
    module, _, name = qualified_name.rpartition(".")
    if not module.startswith("mm15."):
        return None
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None
    return cls if isinstance(cls, type) and is_dataclass(cls) else None


def load_checkpoint_file(path: str | Path, map_location: Any = "cpu") -> Any:
    """`torch.load(path, weights_only=True)`, also accepting our spec dataclasses: the hyper-parameters
    of a module built in Python (not through the CLI, which saves plain dicts) hold them. Any other
    pickled global (a function, a foreign class) is refused with its name before anything is unpickled."""
    needed = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    ours = {name: spec_type(name) for name in needed}
    foreign = sorted(name for name, cls in ours.items() if cls is None)
    if foreign:
        raise UnsafeCheckpointError(
            f"{path} pickles {', '.join(foreign)}: not tensors, plain values or mm15 spec dataclasses, so loading "
            "it could run code; refusing. Load only checkpoints written by mm15 runs."
        )
    with torch.serialization.safe_globals(list(ours.values())):
        return torch.load(path, map_location=map_location, weights_only=True)


# ----- sharded checkpoint directories --------------------------------------------------------------
def fresh_directory_for(path: Path, tag: str) -> Path:
    """Where to write a new sharded checkpoint that will become `path`: `.<name>.<tag>.d` beside it."""
    target = path.with_name(f".{path.name}.{tag}.d")
    if target.exists():
        shutil.rmtree(target)
    return target


def swap_in_directory(written: Path, path: Path) -> None:
    """Make `path` point at the completely written directory `written`, atomically.

    `path` is a symlink; the new one is created beside it and renamed over it (atomic on POSIX),
    then the previous target is deleted. A crash at any point leaves `path` at the old or the new
    complete checkpoint."""
    link = path.with_name(path.name + PARTIAL_SUFFIX)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(written.name)
    previous = path.resolve() if path.is_symlink() else None
    if path.exists() and not path.is_symlink():  # a plain directory or file from another writer
        aside = path.with_name(path.name + ".old")
        remove_checkpoint_path(aside)
        os.replace(path, aside)
        previous = aside
    os.replace(link, path)
    _fsync_dir(path.parent)
    if previous is not None and previous != written.resolve() and previous.exists():
        remove_checkpoint_path(previous)


def remove_checkpoint_path(path: Path) -> None:
    """Delete a checkpoint file, directory, or symlink and the directory it points to."""
    if path.is_symlink():
        target = path.resolve()
        path.unlink()
        path = target
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


# ----- trainable-only state dicts ----------------------------------------------------------------
def frozen_parameter_names(module: nn.Module) -> set[str]:
    """Names (every alias of tied weights) of parameters that do not require gradients."""
    return {n for n, p in module.named_parameters(remove_duplicate=False) if not p.requires_grad}


def trainable_parameter_names(module: nn.Module) -> set[str]:
    return {n for n, p in module.named_parameters(remove_duplicate=False) if p.requires_grad}


def drop_frozen(state_dict: dict[str, Any], frozen: set[str]) -> dict[str, Any]:
    """The state dict without frozen parameters (buffers and trainable parameters stay)."""
    return {k: v for k, v in state_dict.items() if k not in frozen}


# ----- run signatures ------------------------------------------------------------------------------
def _plain(value: Any) -> Any:
    return asdict(value) if is_dataclass(value) else value


def run_signature(model_spec: Any, lora: Any, quantization: Any, freeze: Any, module: nn.Module) -> dict[str, Any]:
    """What a checkpoint's weights depend on. Paths are left out (a moved model directory is still
    the same model); the frozen-weight fingerprint (`adapters.weight_fingerprint`) covers content."""
    spec = _plain(model_spec)
    for part in ("vision", "llm"):
        spec[part] = {k: v for k, v in spec[part].items() if k != "name_or_path"}
    spec.pop("tokenizer", None)
    trainable = sorted(f"{n}:{tuple(p.shape)}" for n, p in module.named_parameters() if p.requires_grad)
    digest = hashlib.sha1("\n".join(trainable).encode()).hexdigest()[:16]
    return {"model": spec, "lora": _plain(lora), "quantization": _plain(quantization), "freeze": _plain(freeze),
            "trainable": {"count": len(trainable), "digest": digest},
            "defaults": {"model": _plain(type(model_spec)()), "lora": _default(lora), "quantization": _default(quantization),
                         "freeze": _default(freeze)}}


def _default(value: Any) -> Any:
    return _plain(type(value)()) if is_dataclass(value) else None


def _settings_added_since(saved: dict[str, Any], current: dict[str, Any], defaults: dict[str, Any]) -> set[str]:
    """Flattened keys the saved signature lacks while the current run holds them at their default:
    settings added to the specs after the checkpoint was written, which it ran without, i.e. as
    their default does (an older checkpoint stays usable when a new option appears)."""
    from mm15.base.specs import _flatten

    old, new, default = _flatten(saved), _flatten(current), _flatten(defaults)
    return {k for k in set(new) - set(old) if k in default and default[k] == new[k]}


def check_compatible(checkpoint: dict[str, Any], current: dict[str, Any], trainable: set[str], where: str) -> None:
    """Raise, saying what to change, when `checkpoint` was not written by a run like this one:
    another signature, other frozen weights, or trainable tensors missing from its state dict."""
    from mm15.base.training.adapters import check_fingerprint
    from mm15.base.specs import diff_specs

    saved = checkpoint["mm15_run"]
    compared = [{k: v for k, v in sig.items() if k not in ("frozen", "defaults")} for sig in (saved, current)]
    added = _settings_added_since(*compared, current.get("defaults") or {})
    diffs = [d for d in diff_specs(*compared) if d.split(":")[0] not in added]
    if diffs:
        raise ValueError(
            f"{where} was written by another configuration:\n  " + "\n  ".join(diffs[:20])
            + "\nUse the config it was trained with (config.yaml beside its logs), or start a new run without "
            "--ckpt_path."
        )
    check_fingerprint(saved["frozen"], current["frozen"], where,
                      "Frozen weights come from the base model, not the checkpoint: use the same `model` / "
                      "`pretrained` (and `seed_everything` for random-init parts) as the run that wrote it.")
    state = checkpoint.get("state_dict") or {}
    missing = trainable - set(state)
    if state and missing:
        raise ValueError(f"{where} lacks {len(missing)} trainable tensors (e.g. {sorted(missing)[:3]})")
