"""Scale-out: FSDP2 sharding of the MM1.5 model, activation checkpointing, and the FSDP2 strategy.

FSDP2 (`torch.distributed.fsdp.fully_shard`) runs through Lightning's `ModelParallelStrategy`; the
module shards itself in `configure_model` (see `MM15Module.configure_model`). Units, innermost
first: every transformer block of the tower(s) and of the LLM, each layer of an attention connector
(SVA, resampler: its `layers`), the connector, and the root `MM15Model`
(token embeddings, LM head, final norm, the tower's patch embedding and norms). Frozen and trainable parameters
may share a unit (FSDP2 reduces gradients only for parameters that require them), which is what
LoRA needs: the frozen base weight and its adapter live in the same block.

    trainer:
      strategy: {class_path: mm15.base.training.sharding.FSDP2Strategy}   # configs/strategies/fsdp2.yaml

`FSDP2Strategy` is `ModelParallelStrategy` with every process in the data-parallel dimension
(no tensor parallelism), trainable-only sharded checkpoints and atomic checkpoint directories.
`fsdp1_auto_wrap_policy` is the matching wrap policy for Lightning's `FSDPStrategy` (CUDA only).

Meta-device initialisation (`init_sharded_from_rank0`, the module's `init_on_meta`): every rank
builds the model on the `meta` device (no memory), shards it, and allocates only its own shards;
rank 0 alone builds the full model on CPU once and broadcasts it, so the weights are exactly the
ones the plain path (every rank building the full model) gives. `compile_blocks` compiles each
transformer block after sharding and activation checkpointing are in place.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from dataclasses import replace
from typing import Any, Callable

import torch
from lightning_fabric.strategies.model_parallel import _distributed_checkpoint_load, _is_sharded_checkpoint
from lightning_fabric.utilities.load import _METADATA_FILENAME
from pytorch_lightning.strategies import ModelParallelStrategy
from torch import nn

from mm15.base.training.adapters import base_of
from mm15.base.training.checkpointing import fresh_directory_for, frozen_parameter_names, load_checkpoint_file
from mm15.base.training.checkpointing import remove_checkpoint_path, swap_in_directory


def transformer_blocks(module: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a HF tower or LLM: its `GradientCheckpointingLayer`s (every modern HF
    decoder/encoder layer), else the children of its longest `nn.ModuleList`."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    blocks = [m for m in module.modules() if isinstance(m, GradientCheckpointingLayer)]
    if blocks:
        return blocks
    lists = [m for m in module.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def mixed_precision_policy(precision: str) -> Any:
    """FSDP2 policy matching Lightning's `precision` flag: `bf16-mixed` all-gathers and computes in
    bf16 and reduces gradients in fp32 (parameters and optimizer state stay fp32)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(str(precision))
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype else None


def shard_model(model: nn.Module, mesh: Any, precision: str = "32-true", reshard_after_forward: bool = True) -> None:
    """Apply `fully_shard` to an `MM15Model` in place (blocks, tower, connector, root)."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    kwargs: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    policy = mixed_precision_policy(precision)
    if policy is not None:
        kwargs["mp_policy"] = policy
    for part in (model.vision, model.llm):
        for block in transformer_blocks(part):
            fully_shard(block, **kwargs)
    # The tower itself is not a unit: `fully_shard` changes a module's class, and transformers v5
    # looks up which outputs a model can record (`output_hidden_states`) by class name, so a sharded
    # `CLIPVisionModel` returns no hidden states. Its embeddings and norms join the root instead.
    for layer in connector_layers(model.connector):
        fully_shard(layer, **kwargs)
    fully_shard(model.connector, **kwargs)
    fully_shard(model, **kwargs)
    # The module encodes media before calling the model, and generates through `generate`: both
    # must run the root's all-gather (and lazy init) first, as `forward` does.
    for method in ("encode_media", "generate"):
        register_fsdp_forward_method(model, method)


def connector_layers(connector: nn.Module) -> list[nn.Module]:
    """The repeated layers of an attention connector (`mm15.base.aggregators`), each its own unit."""
    layers = getattr(connector, "layers", None)
    return list(layers) if isinstance(layers, nn.ModuleList) else []


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute every transformer block of the tower and the LLM in the backward pass (HF's own
    mechanism, non-reentrant, so parameter names and FSDP2 hooks are unchanged)."""
    for part in (model.vision, model.llm):
        hf = base_of(part)
        if not getattr(hf, "supports_gradient_checkpointing", False):
            raise ValueError(f"{type(hf).__name__} does not support activation checkpointing; set "
                             "`activation_checkpointing: false`")
        enable = getattr(hf, "activation_checkpointing_enable", None)
        if enable is not None:
            enable({"use_reentrant": False})
        else:  # transformers < 5
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def compile_blocks(model: nn.Module) -> list[nn.Module]:
    """`torch.compile` the `forward` of every transformer block of the tower and the LLM, in place.

    Per block, as torchtitan does with FSDP2: each block's graph is small, compiles once and is
    reused by every block of the same class. The module's `__call__` stays eager, so the FSDP2
    all-gather/reshard hooks and HF's activation checkpointing wrap the compiled code unchanged,
    and parameter names (checkpoints) do not move. Returns the compiled blocks."""
    blocks = [block for part in (model.vision, model.llm) for block in transformer_blocks(part)]
    for block in blocks:
        block.forward = torch.compile(block.forward)
    return blocks


def config_only_spec(spec: Any) -> Any:
    """The same `ModelSpec` with every part given by its config instead of its weights (a saved
    mm15 directory or hub names): what a meta-device build needs, since `from_pretrained` refuses
    to run on `meta` and the weights come from rank 0 anyway."""
    from mm15.base.model import _config, tower_parts, vision_config

    vision = spec.vision
    if vision.towers:
        towers = [replace(t, name_or_path=None, config=vision_config(t).to_dict()) for t in tower_parts(vision)]
        vision = replace(vision, name_or_path=None, towers=towers)
    elif vision.name_or_path:
        vision = replace(vision, name_or_path=None, config=vision_config(vision).to_dict())
    llm = replace(spec.llm, name_or_path=None, config=_config(spec.llm).to_dict()) if spec.llm.name_or_path else spec.llm
    return replace(spec, vision=vision, llm=llm)


def _cast_like(model: nn.Module, dtypes: dict[str, torch.dtype]) -> None:
    """Give every parameter and buffer of a meta-device model the dtype rank 0's full model has
    (a checkpoint saved in bf16 loads in bf16, a config build is fp32)."""
    for name, p in list(model.named_parameters()):
        if name in dtypes and p.dtype != dtypes[name]:
            owner, leaf = model.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2]
            setattr(owner, leaf, nn.Parameter(p.detach().to(dtypes[name]), requires_grad=p.requires_grad))
    for name, b in list(model.named_buffers()):
        if name in dtypes and b.dtype != dtypes[name]:
            owner, leaf = model.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2]
            owner._buffers[leaf] = b.to(dtypes[name])


def init_sharded_from_rank0(build: Callable[[bool], nn.Module], mesh: Any, device: torch.device,
                            precision: str = "32-true") -> tuple[nn.Module, dict[str, Any]]:
    """Build, shard and fill an `MM15Model` without any rank but 0 holding the full model.

    `build(on_meta)` returns the adapted, frozen model; it is called once with `on_meta=True` on
    every rank (under `torch.device("meta")`) and once with `False` on rank 0, whose full CPU model
    is the source of every weight: the parameters and persistent buffers travel with
    `set_model_state_dict(full_state_dict=True, broadcast_from_rank0=True)` (each rank keeps its
    shard), the non-persistent buffers (rotary `inv_freq`, position ids), which `to_empty` leaves
    uninitialised and no state dict holds, are broadcast one by one. The result therefore equals
    the plain path's bit for bit, random init or `from_pretrained` alike.

    Returns the sharded model and what rank 0 measured on the full model: `fingerprint`
    (`weight_fingerprint` of the frozen weights, for checkpoint compatibility checks)."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from mm15.base.training.adapters import weight_fingerprint

    full = build(False) if dist.get_rank() == 0 else None
    info: list[Any] = [None]
    if full is not None:
        dtypes = {n: t.dtype for n, t in [*full.named_parameters(), *full.named_buffers()]}
        info = [{"spec": getattr(full, "spec", None), "dtypes": dtypes, "fingerprint": weight_fingerprint(full)}]
    dist.broadcast_object_list(info, src=0)
    info = info[0]
    with torch.device("meta"):
        model = build(True)
    if info["spec"] is not None:
        model.spec = info["spec"]  # rank 0's (truncated tower, part paths), not the config-only one
    _cast_like(model, info["dtypes"])
    allocated = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if not t.is_meta]
    if allocated:
        raise RuntimeError(f"the meta-device build allocated memory: {allocated[:5]} are not on `meta`")
    shard_model(model, mesh, precision=precision)
    model.to_empty(device=device)
    state = full.state_dict() if full is not None else {}
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for name, buffer in model.named_buffers():  # the same order on every rank
        with torch.no_grad():
            if full is not None:
                buffer.copy_(full.get_buffer(name))
            dist.broadcast(buffer, src=0)
    del full, state
    return model, {"fingerprint": info["fingerprint"]}


def fsdp1_auto_wrap_policy(module: nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
    """`auto_wrap_policy` for Lightning's `FSDPStrategy` (FSDP1, CUDA): one unit per transformer
    block, one per attention-connector layer and one for the connector, the rest in the root unit, as
    `shard_model` does for FSDP2."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    from mm15.base.aggregators import PerceiverResampler, ResamplerLayer, SpatialVisionAggregator, SVALayer
    from mm15.base.connector import CAbstractor, MLPConnector

    if recurse:
        return True
    return isinstance(module, (GradientCheckpointingLayer, CAbstractor, MLPConnector, SpatialVisionAggregator,
                               PerceiverResampler, SVALayer, ResamplerLayer))


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 over all processes (data-parallel size = world size, no tensor parallelism).

    Args:
        save_distributed_checkpoint: True: each rank writes its shard (a checkpoint directory);
            False: the full state is gathered on rank 0 and written as one file.
        process_group_backend: default `nccl` on CUDA, `gloo` on CPU.
    """

    def __init__(self, save_distributed_checkpoint: bool = True, process_group_backend: str | None = None,
                 timeout: Any = None) -> None:
        kwargs = {} if timeout is None else {"timeout": timeout}
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend, **kwargs)

    def setup_environment(self) -> None:
        # The world size is known only now; every process shards the data-parallel dimension.
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(str(filepath)))
        tag = self.broadcast(f"step{checkpoint.get('global_step', 0)}-{uuid.uuid4().hex[:8]}")
        written = path.with_name(f".{path.name}.{tag}.d")
        if self.global_rank == 0:
            written = fresh_directory_for(path, tag)
        self.barrier()
        super().save_checkpoint(checkpoint, written)
        self.barrier()
        if self.global_rank == 0:
            swap_in_directory(written, path)
        self.barrier()

    def remove_checkpoint(self, filepath: Any) -> None:
        if self.is_global_zero:
            remove_checkpoint_path(Path(filepath))

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        path = Path(self.broadcast(str(checkpoint_path)))
        if not _is_sharded_checkpoint(path):
            return super().load_checkpoint(path, weights_only)
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_optimizer_state_dict)

        metadata = load_checkpoint_file(path / _METADATA_FILENAME)  # refuses pickled code
        module = self.lightning_module
        if hasattr(module, "check_checkpoint"):
            module.check_checkpoint(metadata, str(path))  # a clear message before any shape error
        frozen = frozen_parameter_names(self.model)
        state = {k: v for k, v in get_model_state_dict(self.model).items() if k not in frozen}
        _distributed_checkpoint_load({"state_dict": state}, path)
        self.model.load_state_dict(state, strict=False)
        for idx, optimizer in enumerate(self.optimizers):
            key = f"optimizer_{idx}"
            optim_state = {key: get_optimizer_state_dict(self.model, optimizer)}
            _distributed_checkpoint_load(optim_state, path)
            set_optimizer_state_dict(self.model, optimizer, optim_state_dict=optim_state[key],
                                     options=StateDictOptions(cpu_offload=True))
        return metadata
