"""Parameter-efficient fine-tuning: LoRA / DoRA through PEFT, QLoRA (4/8-bit frozen LLM) on CUDA.

Our own small dataclasses wrap the third-party configs (jsonargparse cannot bind `peft.LoraConfig`
or `transformers.BitsAndBytesConfig`, and the wrappers document what mm15 supports):

    lora = LoraSpec(r=16, alpha=32)                      # LoRA on the LLM's attention + MLP
    lora = LoraSpec(use_dora=True, vision_target_modules=["q_proj", "v_proj"])  # DoRA, LoRA on the tower too
    model = apply_lora(model, lora)                      # model.llm becomes a peft.PeftModel

In YAML (`model.init_args.lora: {r: 16, alpha: 32}`), see `configs/base/sft_lora.yaml`. The connector
is never adapted: it trains in full (freeze it with `freeze.connector`).

The LLM's frozen base weights are fingerprinted (`weight_fingerprint`), so an adapter loaded onto a
different base model is refused with a message instead of producing garbage (`check_fingerprint`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

# Names of the linear layers in Llama / Qwen2 / Mistral / Mixtral-attention style decoders.
LLM_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoraSpec:
    """LoRA / DoRA settings (wrapped into `peft.LoraConfig` by `to_peft`).

    Args:
        r: rank. alpha: scaling numerator (scale = alpha / r). dropout: on the LoRA input.
        target_modules: LLM module names to adapt (default: attention and MLP projections of
            Llama/Qwen-style models; `all-linear` lets PEFT pick every linear layer but the head).
        use_dora: weight-decomposed LoRA (DoRA) instead of plain LoRA.
        vision_target_modules: tower module names to adapt (CLIP/SigLIP: `q_proj`, `k_proj`,
            `v_proj`, `out_proj`, `fc1`, `fc2`); empty: the tower gets no adapter.
        init: `gaussian`/`true` are PEFT's initialisations (B = 0: the adapted model starts equal
            to the base, so lora_A has an exactly zero gradient on the first step); `random` makes
            B non-zero too (tests of merge/export equality only).
    """

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] | str = field(default_factory=lambda: list(LLM_TARGETS))
    use_dora: bool = False
    vision_target_modules: list[str] = field(default_factory=list)
    init: Literal["true", "gaussian", "random"] = "true"

    def to_peft(self, part: Literal["llm", "vision"] = "llm") -> Any:
        from peft import LoraConfig

        targets = self.target_modules if part == "llm" else list(self.vision_target_modules)
        init: Any = {"true": True, "random": False}.get(self.init, self.init)
        return LoraConfig(
            r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=targets,
            use_dora=self.use_dora, bias="none", init_lora_weights=init,
            task_type="CAUSAL_LM" if part == "llm" else None,
        )


@dataclass
class QuantSpec:
    """QLoRA: load the frozen LLM quantized with bitsandbytes (CUDA only; `pip install bitsandbytes`).

    Args:
        bits: 4 (NF4/FP4) or 8 (LLM.int8).
        quant_type: 4-bit data type, `nf4` (QLoRA's) or `fp4`.
        double_quant: quantize the quantization constants too (QLoRA's default).
        compute_dtype: dtype of the de-quantized matmuls.
    """

    bits: Literal[4, 8] = 4
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"

    def to_bnb(self) -> Any:
        from transformers import BitsAndBytesConfig

        if self.bits == 8:
            return BitsAndBytesConfig(load_in_8bit=True)
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=self.quant_type, bnb_4bit_use_double_quant=self.double_quant,
            bnb_4bit_compute_dtype=getattr(torch, self.compute_dtype),
        )


def check_quantization(spec: QuantSpec, device: torch.device, sharded: bool) -> None:
    """Refuse QLoRA where it cannot run, saying what to change."""
    if device.type != "cuda" or not torch.cuda.is_available():
        raise RuntimeError(
            f"quantization (QLoRA, {spec.bits}-bit LLM) needs a CUDA GPU and bitsandbytes, but this run is on "
            f"{device.type!r}. Remove `model.init_args.quantization` to train LoRA on the full-precision LLM on CPU, "
            "or run with `trainer.accelerator: cuda` on a machine with a GPU. (bitsandbytes CPU kernels are not "
            "supported by mm15; LoRA training on them is not validated.)"
        )
    if sharded:
        raise RuntimeError(
            "quantization (QLoRA) cannot be combined with FSDP2 sharding in mm15: use `strategy: ddp` or a single "
            "GPU (QLoRA exists to fit a large frozen LLM on one GPU), or drop `quantization` to shard a bf16 LLM."
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise RuntimeError("quantization needs bitsandbytes: `pip install bitsandbytes` (CUDA machines)") from None


def apply_lora(model: nn.Module, spec: LoraSpec) -> nn.Module:
    """Wrap `model.llm` (and `model.vision` when `vision_target_modules` is set) with PEFT LoRA.

    PEFT freezes the wrapped base weights and injects trainable LoRA weights in place; the
    connector is left untouched (trained in full unless frozen by the caller)."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    llm = model.llm
    if getattr(llm, "is_quantized", False):
        llm = prepare_model_for_kbit_training(llm, use_gradient_checkpointing=False)
    model.llm = get_peft_model(llm, spec.to_peft("llm"))
    if spec.vision_target_modules:
        model.vision = get_peft_model(model.vision, spec.to_peft("vision"))
    return model


def is_peft(module: nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(module, PeftModel)


def base_of(module: nn.Module) -> nn.Module:
    """The plain HF model under a PEFT wrapper (the module itself otherwise)."""
    return module.get_base_model() if is_peft(module) else module


# ----- fingerprints of frozen weights --------------------------------------------------------------
def weight_fingerprint(module: nn.Module, only_frozen: bool = True) -> dict[str, list[float]]:
    """{name: [sum, sum of squares]} of the base (non-LoRA) weights, in float64.

    Cheap (one pass), insensitive to sharding (computed before it) and precise enough to tell two
    different checkpoints of the same architecture apart."""
    out = {}
    for name, p in module.named_parameters():
        if "lora_" in name or (only_frozen and p.requires_grad):
            continue
        t = p.detach()
        t = t.full_tensor() if hasattr(t, "full_tensor") else t
        t = t.double() if t.is_floating_point() else t.to(torch.float64)
        out[_base_name(name)] = [float(t.sum()), float((t * t).sum())]
    return out


def _base_name(name: str) -> str:
    """`base_model.model.model.layers.0.q_proj.base_layer.weight` -> `model.layers.0.q_proj.weight`."""
    name = name.removeprefix("base_model.model.")
    while ".base_layer." in name:  # nested: PEFT wraps each fused MoE expert parameter in turn
        name = name.replace(".base_layer.", ".")
    return name


def fingerprint_mismatches(expected: dict[str, list[float]], actual: dict[str, list[float]]) -> list[str]:
    """Names whose fingerprint differs (missing on either side counts), relative tolerance 1e-6."""
    bad = []
    for name in sorted(set(expected) | set(actual)):
        a, b = expected.get(name), actual.get(name)
        if a is None or b is None or not all(math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-6) for x, y in zip(a, b)):
            bad.append(name)
    return bad


def check_fingerprint(expected: dict[str, list[float]], actual: dict[str, list[float]], what: str, fix: str) -> None:
    bad = fingerprint_mismatches(expected, actual)
    if bad:
        raise ValueError(
            f"{what}: {len(bad)} of {len(expected)} frozen base tensors differ from the ones it was trained on "
            f"(first: {', '.join(bad[:3])}). {fix}"
        )


# ----- adapter directories (written by `mm15 export`) ----------------------------------------------
ADAPTER_META = "mm15_adapter.json"


def read_adapter_meta(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / ADAPTER_META
    if not path.exists():
        raise FileNotFoundError(f"{directory} is not an mm15 adapter directory (no {ADAPTER_META}; write one with "
                                "`mm15 export --kind adapter`)")
    return json.loads(path.read_text())


def load_llm_adapter(llm: nn.Module, directory: str | Path, trainable: bool) -> nn.Module:
    """Plain `PeftModel.from_pretrained` onto `llm`, after checking it is the adapter's base model."""
    from peft import PeftModel

    meta = read_adapter_meta(directory)
    check_fingerprint(
        meta["base_fingerprint"], weight_fingerprint(llm, only_frozen=False),
        f"adapter {directory} was exported from a different base LLM",
        f"Load it onto the base it was trained on ({meta.get('base_model_name_or_path')}): remove `model.llm` from "
        "the config so the adapter's own base is used, or point `model.llm.name_or_path` there.",
    )
    return PeftModel.from_pretrained(llm, str(directory), is_trainable=trainable)


def read_adapter_spec(directory: str | Path) -> tuple[Any, int, dict[str, Any]]:
    """(ModelSpec, crop size, preprocessing) of an adapter directory; relative part paths resolved."""
    from mm15.base.connector import ConnectorSpec
    from mm15.base.model import LLMSpec, ModelSpec, VisionSpec

    d = Path(directory)
    meta = read_adapter_meta(d)
    m = meta["model"]

    def resolve(p: str | None) -> str | None:
        return str(d / p) if p is not None and (d / p).exists() else p

    spec = ModelSpec(
        vision=VisionSpec(**{**m["vision"], "name_or_path": resolve(m["vision"]["name_or_path"])}),
        llm=LLMSpec(**{**m["llm"], "name_or_path": resolve(m["llm"]["name_or_path"])}),
        connector=ConnectorSpec(**m["connector"]),
        tokenizer=resolve(m["tokenizer"]),
    )
    return spec, int(meta["crop_size"]), meta.get("preprocessing", {})
