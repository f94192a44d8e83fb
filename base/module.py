"""The shared LightningModule: training, validation loss, test/predict by generation, metrics.

Variants subclass it one level deep and override named hooks only:

* `build_processor(tokenizer, preprocessing, tokens_per_crop)`: the processor (video frames, ...)
* `encode_media(batch)`: crops -> LLM-space media features (SlowFast pooling, ...)
* `compute_metrics(records)`: prediction records -> result rows (UI boxes, video choices, ...)
* `report(rows)`: print and log the result rows
* `media_keepalive(batch)`: the zero-valued media pass of text-only batches (see `forward`)

Scale-out (`configs/strategies/`): under Lightning's `ModelParallelStrategy` the module shards
itself with FSDP2 in `configure_model` (`mm15.base.training.sharding`); LoRA/DoRA/QLoRA come from
`mm15.base.training.adapters`; checkpoints hold only trainable weights when anything is frozen and refuse a
config they were not trained with (`mm15.base.training.checkpointing`).

Every `fit` ends with `<run dir>/loss.png`: train and val loss and the learning rates against the
step (`mm15.base.training.plots.LossCurves`, attached by `configure_callbacks`).

Run it through the CLI (`mm15 fit --config configs/base/demo.yaml`) or directly:

    module = MM15Module(model=ModelSpec(...), preprocessing=PreprocessSpec(...))
    pl.Trainer(max_steps=100).fit(module, MM15DataModule(train=[JsonlSource("train.jsonl")]))
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import pytorch_lightning as pl
import torch
from safetensors.torch import load_file
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from mm15.base.training import checkpointing as ckpt
from mm15.base.training.adapters import LoraSpec, QuantSpec, apply_lora, check_quantization, weight_fingerprint
from mm15.base.training.adapters import load_llm_adapter, read_adapter_meta, read_adapter_spec
from mm15.base.training.plots import LossCurves
from mm15.base.metrics import exact_match_by_task, format_table
from mm15.base.model import MM15Model, ModelSpec, crop_tokens, load_tokenizer, read_saved_spec
from mm15.base.data.processor import MM15Processor, PreprocessSpec
from mm15.base.data.sample import IGNORE_INDEX
from mm15.base.specs import diff_specs, from_dict

log = logging.getLogger(__name__)
COMPONENTS = ("vision", "connector", "llm")
OptimizerFactory = Callable[[Iterable], Optimizer]
SchedulerFactory = Callable[[Optimizer, int], LRScheduler]


@dataclass
class Components:
    """A value per model component (freezing flags, learning rates)."""

    vision: Any = None
    connector: Any = None
    llm: Any = None


@dataclass
class GenerationSpec:
    max_new_tokens: int = 32
    do_sample: bool = False
    num_beams: int = 1


def _default_optimizer(params: Iterable) -> Optimizer:
    return torch.optim.AdamW(params, lr=2e-5, weight_decay=0.0)


class MM15Module(pl.LightningModule):
    """Args:
    model: the parts (ignored when `pretrained` is given).
    preprocessing: how samples become tensors; default: the one saved with `pretrained`, else defaults.
    pretrained: an mm15 model directory (`MM15Model.save_pretrained`) to start from.
    optimizer: factory taking parameter groups (AdamW, Adafactor, ... via `class_path`).
    scheduler: factory taking (optimizer, total_steps), e.g. `mm15.base.training.optim.WarmupCosine`.
    learning_rates: per-component learning rates (None: the optimizer's lr).
    freeze: per-component freezing (True: no gradients, weights untouched).
    generation: decoding settings for test and predict.
    lora: LoRA/DoRA on the LLM (and optionally the tower); the connector trains in full.
    quantization: QLoRA: the frozen LLM loaded in 4 or 8 bits (CUDA + bitsandbytes only).
    adapter: an adapter directory from `mm15 export --kind adapter` to start from (its base LLM
        and tower are used unless `model` names others; a different base is refused).
    activation_checkpointing: recompute tower and LLM blocks in the backward pass.
    init_on_meta: under FSDP2 (`ModelParallelStrategy`), build the model on the `meta` device,
        shard it, and fill each rank's shards from rank 0's one full CPU build
        (`mm15.base.training.sharding.init_sharded_from_rank0`): the same weights as building the
        full model on every rank, in a rank's memory only its shard. None (default): on under
        FSDP2 unless `adapter` is set (its weights load from disk into the built model, which
        the meta build cannot do), where the full model is built on every rank as without it.
    compile: `torch.compile` each transformer block of the tower and the LLM, after sharding and
        activation checkpointing (`mm15.base.training.sharding.compile_blocks`).
    """

    preprocess_class: type[PreprocessSpec] = PreprocessSpec

    def __init__(self, model: ModelSpec | None = None, preprocessing: PreprocessSpec | None = None,
                 pretrained: str | None = None, optimizer: OptimizerFactory = _default_optimizer,
                 scheduler: SchedulerFactory | None = None,
                 learning_rates: Components = Components(),
                 freeze: Components = Components(vision=False, connector=False, llm=False),
                 generation: GenerationSpec = GenerationSpec(), lora: LoraSpec | None = None,
                 quantization: QuantSpec | None = None, adapter: str | None = None,
                 activation_checkpointing: bool = False, init_on_meta: bool | None = None,
                 compile: bool = False):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.pretrained = pretrained
        self.lora, self.quantization, self.adapter = lora, quantization, adapter
        self.activation_checkpointing = activation_checkpointing
        if init_on_meta and adapter:
            raise ValueError("`init_on_meta: true` cannot start from an `adapter` (its weights load into the built "
                             "model); leave `init_on_meta` unset or false")
        self.init_on_meta = (not adapter) if init_on_meta is None else init_on_meta
        self.compile_blocks = compile  # not `self.compile`: that is `nn.Module.compile`
        self.model_spec, crop_size, saved = self._resolve_spec(model, pretrained, adapter)
        preprocessing = self._resolve_preprocessing(preprocessing, saved)
        crop_size = preprocessing.split.crop_size
        tokenizer = load_tokenizer(self.model_spec)
        per_crop = crop_tokens(self.model_spec, crop_size)
        self.processor = self.build_processor(tokenizer, preprocessing, per_crop)
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.learning_rates = learning_rates
        self.freeze = freeze
        self.generation = generation
        self.model: MM15Model | None = None
        self.records: list[dict[str, Any]] = []
        self._last_step_end: float | None = None
        self._frozen_fingerprint: dict[str, list[float]] = {}

    # ----- construction --------------------------------------------------------------------------
    @staticmethod
    def _resolve_spec(model: ModelSpec | None, pretrained: str | None, adapter: str | None = None
                      ) -> tuple[ModelSpec, int, dict]:
        if pretrained:
            return read_saved_spec(pretrained)
        if adapter:
            spec, crop_size, saved = read_adapter_spec(adapter)
            return (model or spec), crop_size, saved
        if model is None:
            raise ValueError("give `model` (the parts) or `pretrained` (an mm15 model directory)")
        return model, 0, {}

    def _resolve_preprocessing(self, preprocessing: PreprocessSpec | None, saved: dict) -> PreprocessSpec:
        if preprocessing is None:
            return from_dict(self.preprocess_class, saved) if saved else self.preprocess_class()
        if saved:
            for line in diff_specs(saved, asdict(preprocessing)):
                log.warning("preprocessing differs from the pretrained model's: %s", line)
        return preprocessing

    def build_processor(self, tokenizer: Any, preprocessing: PreprocessSpec, per_crop: int) -> MM15Processor:
        return MM15Processor(tokenizer, preprocessing, per_crop)

    def configure_model(self) -> None:
        """Build (same random init on every rank and on resume), adapt, freeze, then shard under
        `ModelParallelStrategy` (`self.device_mesh` set) with FSDP2: by default built on `meta` and
        filled from rank 0 (`init_on_meta`); then compile the blocks (`compile`)."""
        if self.model is not None:
            return
        mesh = self._device_mesh
        if self.quantization is not None:
            device = self.trainer.strategy.root_device if self._trainer else torch.device("cuda")
            check_quantization(self.quantization, device, sharded=mesh is not None)

        def build(on_meta: bool = False) -> MM15Model:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(os.environ.get("PL_GLOBAL_SEED", 0)))
                return self.build_model(on_meta)

        precision = str(self.trainer.precision) if self._trainer else "32-true"
        if mesh is not None and self.init_on_meta:
            from mm15.base.training.sharding import init_sharded_from_rank0

            device = self.trainer.strategy.root_device if self._trainer else torch.device("cpu")
            self.model, measured = init_sharded_from_rank0(build, mesh["data_parallel"], device, precision)
            self._frozen_fingerprint = measured["fingerprint"]
        else:
            self.model = build()
            self._frozen_fingerprint = weight_fingerprint(self.model)
            if mesh is not None:
                from mm15.base.training.sharding import shard_model

                shard_model(self.model, mesh["data_parallel"], precision=precision)
        self.strict_loading = not self._frozen_fingerprint  # trainable-only checkpoints when anything is frozen
        if self.compile_blocks:
            from mm15.base.training.sharding import compile_blocks

            compile_blocks(self.model)

    def build_model(self, on_meta: bool = False) -> MM15Model:
        """The adapted, frozen model. `on_meta`: called under `torch.device("meta")`; a
        `pretrained` model is then built from its configs (its weights come from rank 0)."""
        llm_kwargs = {"quantization_config": self.quantization.to_bnb()} if self.quantization else None
        if self.pretrained and on_meta:
            from mm15.base.training.sharding import config_only_spec

            spec, crop_size, _ = read_saved_spec(self.pretrained)
            model = MM15Model.build(config_only_spec(spec), self.processor.tokenizer, crop_size, llm_kwargs)
        elif self.pretrained:
            model = MM15Model.from_pretrained(self.pretrained, llm_kwargs)[0]
        else:
            model = MM15Model.build(self.model_spec, self.processor.tokenizer, self.processor.spec.split.crop_size,
                                    llm_kwargs=llm_kwargs)
        if self.adapter:
            model.connector.load_state_dict(load_file(Path(self.adapter) / "connector.safetensors"))
            model.llm = load_llm_adapter(model.llm, self.adapter, trainable=True)
        elif self.lora is not None:
            apply_lora(model, self.lora)
        for name in COMPONENTS:
            if getattr(self.freeze, name):
                getattr(model, name).requires_grad_(False)
        if self.activation_checkpointing:
            from mm15.base.training.sharding import enable_activation_checkpointing

            enable_activation_checkpointing(model)
        return model

    # ----- hooks for variants --------------------------------------------------------------------
    def encode_media(self, batch: dict[str, Any]) -> torch.Tensor | None:
        """(C, 3, r, r) normalised crops -> (C, M, D) media features; None for text-only batches."""
        pixels = batch.get("pixel_values")
        if pixels is None or not pixels.numel():
            return None
        return self.model.encode_media(pixels)

    def compute_metrics(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return exact_match_by_task(records)

    def report(self, rows: list[dict[str, Any]], stage: str = "test") -> None:
        columns = list(dict.fromkeys(k for r in rows for k in r))
        print(f"\n{stage} results\n" + format_table(rows, columns), flush=True)
        for row in rows:
            for key, value in row.items():
                if isinstance(value, (int, float)) and key not in ("n",) and value is not None:
                    self.log(f"{stage}/{row['task']}/{key}", float(value), rank_zero_only=True, batch_size=1)

    def configure_callbacks(self) -> list[pl.Callback]:
        """Callbacks every run gets: `LossCurves` draws `<run dir>/loss.png` at the end of fit."""
        return [LossCurves()]

    # ----- steps ---------------------------------------------------------------------------------
    def media_features(self, batch: dict[str, Any]) -> torch.Tensor | None:
        """Normalise the uint8 crops on the device (4x less host->device traffic), then encode."""
        pixels = batch.get("pixel_values")
        if pixels is not None and pixels.dtype == torch.uint8:
            batch["pixel_values"] = self.processor.normalize(pixels)
        return self.encode_media(batch)

    def forward(self, batch: dict[str, Any]) -> Any:
        features = self.media_features(batch)
        if features is None:  # text only: still run the tower, so every rank issues the same collectives
            features = self.media_keepalive(batch)
        return self.model(batch["input_ids"], batch["attention_mask"], labels=batch.get("labels"),
                          media_features=features, layouts=batch.get("layouts"),
                          position_ids=batch.get("position_ids"), sample_index=batch.get("sample_index"))

    def media_keepalive(self, batch: dict[str, Any]) -> torch.Tensor:
        """(0, M, D) media features that depend on every media parameter: the tower and connector
        run on one blank crop, of which no token is kept; the model adds them times zero where real
        features would go, so the backward pass visits the same modules in the same order.

        Without it a rank holding a text-only batch would skip the tower's FSDP all-gathers and its
        DDP gradient buckets while another rank runs them, and both would wait forever.
        Variants whose `encode_media` owns extra parameters override this."""
        r = self.processor.spec.split.crop_size
        blank = self.processor.normalize(torch.zeros(1, 3, r, r, dtype=torch.uint8, device=self.device))
        return self.model.encode_media(blank)[:0]

    def keepalive_batch(self) -> dict[str, Any]:
        """One padding token without a target: the stand-in for a batch whose samples were all skipped."""
        ids = torch.full((1, 1), self.processor.tokenizer.pad_token_id, dtype=torch.long, device=self.device)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.full_like(ids, IGNORE_INDEX),
                "size": 0}

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        if not batch.get("size"):
            # Every sample was skipped (see the quarantine), but the other ranks all-reduce gradients
            # (DDP) and gather shards (FSDP2) now: the same modules run on a one-token batch (text only,
            # so with the media keep-alive), and its loss times zero gives every gradient a zero.
            self._log_throughput(0)
            return self(self.keepalive_batch()).loss * 0.0
        out = self(batch)
        n = batch["size"]
        self.log("train/loss", out.loss, prog_bar=True, batch_size=n)
        if out.aux_loss is not None:
            self.log("train/router_aux_loss", out.aux_loss, batch_size=n)
        if out.router_z_loss is not None:
            self.log("train/router_z_loss", out.router_z_loss, batch_size=n)
        self._log_throughput(int(batch["attention_mask"].sum()))
        return out.loss

    def _log_throughput(self, tokens: int) -> None:
        now = time.perf_counter()
        if self._last_step_end is not None:
            self.log("train/tokens_per_s", tokens / max(now - self._last_step_end, 1e-9), batch_size=1)
        self._last_step_end = now
        for group in self.optimizers().param_groups if self._trainer else []:
            self.log(f"train/lr_{group.get('name', 'all')}", group["lr"], batch_size=1)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        # A batch whose samples were all skipped still runs (FSDP2 gathers shards in every forward) and
        # logs with weight 0, so every rank reduces `val/loss` and the mean is over real samples only.
        n = batch.get("size") or 0
        loss = self(batch).loss if n else self(self.keepalive_batch()).loss * 0.0
        self.log("val/loss", loss, prog_bar=True, batch_size=n, sync_dist=True)

    def sharded(self) -> bool:
        """Whether the weights are sharded over ranks (FSDP2, or FSDP1 on CUDA): every forward pass then
        gathers them, so all ranks must run the same number of passes."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return False
        from torch.distributed.fsdp import FullyShardedDataParallel

        try:
            from torch.distributed.fsdp import FSDPModule
        except ImportError:  # torch < 2.6
            from torch.distributed._composable.fsdp import FSDPModule
        return torch.distributed.get_world_size() > 1 and any(
            isinstance(m, (FSDPModule, FullyShardedDataParallel)) for m in self.model.modules())

    def generate(self, batch: dict[str, Any]) -> list[str]:
        """Decode a left-padded batch. Sharded, ranks decode in step: a text-only batch still runs the
        tower (the keep-alive), and `synced_gpus` keeps a rank whose answers ended early running
        forward passes until every rank's have (transformers does not detect FSDP2 by itself)."""
        tok = self.processor.tokenizer
        sharded = self.sharded()
        features = self.media_features(batch)
        if features is None and sharded:
            features = self.media_keepalive(batch)
        out = self.model.generate(
            batch["input_ids"], batch["attention_mask"], media_features=features,
            layouts=batch.get("layouts"), synced_gpus=sharded,
            max_new_tokens=self.generation.max_new_tokens, do_sample=self.generation.do_sample,
            num_beams=self.generation.num_beams, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        )
        return [t.strip() for t in tok.batch_decode(out, skip_special_tokens=True)]

    def _records(self, batch: dict[str, Any]) -> list[dict[str, Any]]:
        """One prediction record per sample; `media` holds its media layouts as dicts
        (`mm15.base.data.media.record_layouts` reads them back)."""
        if not batch.get("size"):
            if self.sharded():  # every sample was skipped, but the other ranks decode now: decode along
                self.generate(self.keepalive_batch())
            return []
        predictions = self.generate(batch)
        indices = batch.get("indices") or [None] * len(predictions)
        keys = zip(batch["ids"], batch["tasks"], batch["answers"], batch["metas"], batch["layouts"], predictions, indices)
        return [dict(id=i, task=t, answer=a, meta=m, media=[x.to_dict() for x in lay], prediction=p,
                     **({} if index is None else {"index": index}))
                for i, t, a, m, lay, p, index in keys]

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.records.extend(self._records(batch))

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        records = self._records(batch)
        self.records.extend(records)
        return records

    def on_test_epoch_start(self) -> None:
        self.records = []

    on_predict_epoch_start = on_test_epoch_start

    def on_test_epoch_end(self) -> None:
        records = self._gather(self.records)
        self.write_records(records, "test_predictions.jsonl")
        self.report(self.compute_metrics(records), "test")
        self.on_test_records(records)

    def on_test_records(self, records: list[dict[str, Any]]) -> None:
        """Hook after the test report, on every rank with all records (UI overlays, ...)."""

    def on_predict_epoch_end(self) -> None:
        self.write_records(self._gather(self.records), "predictions.jsonl")

    def _gather(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Every rank's records, on every rank. The distributed sampler pads the last round with
        repeats of the first samples, so each rank runs the same number of steps (FSDP2 gathers
        in every forward): a record whose dataset `index` was already seen is such a repeat and is
        dropped, and the rest come back in dataset order (records without an index keep theirs)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return records
        parts: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(parts, records)
        gathered = [r for part in parts for r in part]
        unique = {r["index"]: r for r in reversed(gathered) if "index" in r}  # first occurrence wins
        return sorted(unique.values(), key=lambda r: r["index"]) + [r for r in gathered if "index" not in r]

    def write_records(self, records: list[dict[str, Any]], name: str) -> None:
        if self.trainer.is_global_zero:
            path = Path(self.trainer.default_root_dir) / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(r, default=str) + "\n" for r in records))

    # ----- optimisation --------------------------------------------------------------------------
    def hidden_matrices(self) -> set[int]:
        """ids of the hidden weight matrices: the weights of `nn.Linear` layers (LoRA's included), not the
        LLM's output embedding (the `lm_head` Linear, tied to the input `nn.Embedding` or not).
        `MuonAdamW` orthogonalises their updates."""
        out = self.model.llm.get_output_embeddings()
        skip = {id(out.weight)} if out is not None else set()
        return {id(m.weight) for m in self.model.modules()
                if isinstance(m, torch.nn.Linear) and m.weight.ndim == 2 and id(m.weight) not in skip}

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Trainable parameters per component, each with its own lr: `<component>` the hidden matrices
        (`muon: True`), `<component>_other` the other tensors of 2 or more dimensions (embeddings,
        convolution kernels, position tables), `<component>_no_decay` the 1-D ones (no weight decay).
        AdamW treats the first two alike; `MuonAdamW` gives the first to Muon."""
        groups, matrices = [], self.hidden_matrices()
        for name in COMPONENTS:
            params = [p for p in getattr(self.model, name).parameters() if p.requires_grad]
            lr = getattr(self.learning_rates, name)
            for suffix, chosen in (("", [p for p in params if id(p) in matrices]),
                                   ("_other", [p for p in params if p.ndim >= 2 and id(p) not in matrices]),
                                   ("_no_decay", [p for p in params if p.ndim < 2])):
                if chosen:
                    group = {"params": chosen, "name": name + suffix, "muon": suffix == ""}
                    group.update({"weight_decay": 0.0} if suffix == "_no_decay" else {})
                    group.update({} if lr is None else {"lr": lr})
                    groups.append(group)
        if not groups:
            raise ValueError("nothing to train: every component is frozen")
        return groups

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.parameter_groups())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer, int(self.trainer.estimated_stepping_batches))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ----- checkpoints ---------------------------------------------------------------------------
    def run_signature(self) -> dict[str, Any]:
        sig = ckpt.run_signature(self.model_spec, self.lora, self.quantization, self.freeze, self.model)
        return {**sig, "frozen": self._frozen_fingerprint}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Preprocessing, module class and run signature go with the weights; frozen weights do not."""
        checkpoint["mm15_preprocessing"] = asdict(self.processor.spec)
        checkpoint["mm15_module_class"] = f"{type(self).__module__}.{type(self).__qualname__}"
        checkpoint["mm15_run"] = self.run_signature()
        frozen = ckpt.frozen_parameter_names(self)
        if frozen and "state_dict" in checkpoint:
            checkpoint["state_dict"] = ckpt.drop_frozen(checkpoint["state_dict"], frozen)

    def check_checkpoint(self, checkpoint: dict[str, Any], where: str = "the checkpoint") -> None:
        """Refuse a checkpoint written by another configuration, naming what differs."""
        if "mm15_run" in checkpoint and self.model is not None:
            ckpt.check_compatible(checkpoint, self.run_signature(), ckpt.trainable_parameter_names(self), where)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Check the checkpoint fits this config; test/predict reuse its preprocessing."""
        self.check_checkpoint(checkpoint, f"checkpoint {self._trainer.ckpt_path}" if self._trainer else "the checkpoint")
        saved = checkpoint.get("mm15_preprocessing")
        if saved:
            for line in diff_specs(saved, asdict(self.processor.spec)):
                log.warning("using the checkpoint's preprocessing, not the config's: %s", line)
            self.processor.spec = from_dict(type(self.processor.spec), saved)

    def save_model(self, directory: str | Path) -> None:
        """Write the trained model as one mm15 directory (weights, configs, tokenizer, preprocessing)."""
        self.model.save_pretrained(directory, self.processor.tokenizer, asdict(self.processor.spec))
