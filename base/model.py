"""The MM1.5 model as a plain `nn.Module`: vision tower -> connector -> decoder LLM.

Usable without Lightning:

    spec = ModelSpec(vision=PartSpec("openai/clip-vit-large-patch14-336"),
                     llm=LLMSpec("Qwen/Qwen2.5-1.5B-Instruct"))
    tokenizer = load_tokenizer(spec)
    model = MM15Model.build(spec, tokenizer, crop_size=672)
    out = model(input_ids, attention_mask, pixel_values=crops, labels=labels)   # out.loss
    model.save_pretrained("run/model", tokenizer, preprocessing={...})
    model, tokenizer, preprocessing = MM15Model.from_pretrained("run/model")

Shapes: `input_ids`, `attention_mask`, `labels` (B, T); `pixel_values` (C, 3, r, r) holding every
crop / frame of the batch in order of appearance; `media_features` (K, M, D) fill the placeholder
positions (`image_token_id`) of `input_ids` in order, K x M vectors: (C, tokens_per_crop, D) from
`encode_media`, or (1, L, D) when a variant pools them (video SlowFast). `layouts` (per sample, one
`mm15.base.data.media.MediaLayout` per media item) are optional; given, a placeholder mismatch
names what each item expected.

Several towers at once (Cambrian-1, docs/reference.md, section 7) are `vision.towers`, each read at its
own resolution (`mm15.base.towers.VisionTowers`):

    vision=VisionSpec(towers=[TowerSpec("google/siglip-so400m-patch14-384"), TowerSpec("facebook/dinov2-large")])
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from mm15.base.attention import register as register_attention
from mm15.base.connector import ConnectorSpec, build_connector, connector_class, tokens_per_crop
from mm15.base.data.sample import IGNORE_INDEX, IMAGE_TOKEN
from mm15.base.towers import VisionTowers, common_grid, concat_on_grid, patch_tokens, tower_hidden_states, tower_sides

if TYPE_CHECKING:
    from mm15.base.data.media import MediaLayout

SPEC_FILE = "mm15_config.json"
register_attention()  # `llm.attn_implementation: packed_sdpa` (mm15.base.attention)


@dataclass
class PartSpec:
    """One pretrained part: `name_or_path` (local dir or hub name, loaded with `from_pretrained`) or
    `config` (a config dict with `model_type`, built at random init with `from_config`)."""

    name_or_path: str | None = None
    config: dict[str, Any] | None = None


@dataclass
class TowerSpec(PartSpec):
    """One of several towers (`VisionSpec.towers`). Args: feature_layer: as `VisionSpec`'s.
    resolution: pixels each crop is resized to for this tower (None: the tower's native size, as
    Cambrian-1 feeds each encoder)."""

    feature_layer: int = -2
    resolution: int | None = None


@dataclass
class VisionSpec(PartSpec):
    """Args: feature_layer: hidden state the connector reads (-2: second to last, as LLaVA/MM1).
    towers: several towers at once instead of one (Cambrian-1): the connector gets every tower's map
        (`connector.kind: sva`) or the maps resized to one `grid` and concatenated along channels (any
        other kind). With `towers`, `name_or_path` may name a directory written by `save_pretrained`
        (one `tower_<i>/` each), which then replaces each tower's own `name_or_path` / `config`.
    grid: side of the common token grid of concatenated maps (None: the smallest tower map).
    """

    feature_layer: int = -2
    towers: list[TowerSpec] = field(default_factory=list)
    grid: int | None = None

    def __post_init__(self) -> None:  # saved specs hold plain dicts
        self.towers = [t if isinstance(t, TowerSpec) else TowerSpec(**t) for t in self.towers]


@dataclass
class LLMSpec(PartSpec):
    """Args: router_aux_loss_weight: weight of the MoE load-balancing loss (MM1.5: 0.01); ignored
    for dense models. router_z_loss_weight: weight of the MoE router z-loss (MM1.5: 0.001; `router_z_loss`,
    docs/reference.md, section 1). attn_implementation: passed to transformers (`sdpa`, `eager`, ...).
    loss_reduction: `token` (default: the mean over every target token of the batch, so a sample
    weighs by its answer length) or `sample` (the mean over each sample's target tokens, then over
    samples: a one-word answer weighs as much as a 15-token box) [choice; MM1.5 does not say].
    fused_loss: compute the target-position loss with liger-kernel's fused linear cross-entropy
    (`LigerFusedLinearCrossEntropyLoss`: from the hidden states and the output-embedding weight, in
    chunks, never the (N, V) logits: with a 150k vocabulary those are the largest activation of a
    step). Needs a CUDA GPU and `pip install liger-kernel` (the `liger` extra); refused at build time
    without them. Same reductions as without it."""

    router_aux_loss_weight: float = 0.01
    router_z_loss_weight: float = 0.001
    attn_implementation: str = "sdpa"
    loss_reduction: Literal["token", "sample"] = "token"
    fused_loss: bool = False


@dataclass
class ModelSpec:
    """The three parts plus the tokenizer (`tokenizer`: dir or hub name; default the LLM's; the
    word `tiny` builds `mm15.base.tiny.tiny_tokenizer`, `tiny-words` the same with word merges, `tiny:<family>`
    one with that family's special tokens and chat template, `mm15.base.families`)."""

    vision: VisionSpec = field(default_factory=VisionSpec)
    llm: LLMSpec = field(default_factory=LLMSpec)
    connector: ConnectorSpec = field(default_factory=ConnectorSpec)
    tokenizer: str | None = None


@dataclass
class MM15Output:
    loss: torch.Tensor | None
    lm_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    num_target_tokens: int = 0
    router_z_loss: torch.Tensor | None = None


def _config(part: PartSpec) -> Any:
    if part.name_or_path:
        return AutoConfig.from_pretrained(part.name_or_path)
    if part.config:
        return AutoConfig.for_model(**part.config)
    raise ValueError("a model part needs `name_or_path` or `config`")


def vision_config(part: VisionSpec) -> Any:
    """The vision sub-config (a full CLIP/SigLIP config holds it under `vision_config`)."""
    cfg = _config(part)
    return getattr(cfg, "vision_config", None) or cfg


def load_tokenizer(spec: ModelSpec) -> PreTrainedTokenizerBase:
    """Tokenizer with the media placeholder token added and a pad token set."""
    if spec.tokenizer in ("tiny", "tiny-words"):
        from mm15.base.tiny import TINY_WORDS, tiny_tokenizer

        tok = tiny_tokenizer(TINY_WORDS if spec.tokenizer == "tiny-words" else ())
    elif spec.tokenizer and spec.tokenizer.startswith("tiny:"):
        from mm15.base.families import family_tokenizer

        tok = family_tokenizer(spec.tokenizer.removeprefix("tiny:"))
    else:
        source = spec.tokenizer or spec.llm.name_or_path
        if not source:
            raise ValueError("model.tokenizer is required when the LLM is built from a config")
        tok = AutoTokenizer.from_pretrained(source)
    if IMAGE_TOKEN not in tok.get_vocab():
        tok.add_tokens([IMAGE_TOKEN], special_tokens=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def safetensors_kwargs(name_or_path: str) -> dict[str, Any]:
    """`use_safetensors=True` for a local part directory with safetensors weights (every `save_pretrained`
    writes them): its weights never come from a pickle, even one placed beside them. transformers 5
    prefers safetensors by default too; forcing it everywhere would break hub parts and older
    directories that have only `pytorch_model.bin` (read with `torch.load(weights_only=True)`)."""
    local = Path(name_or_path)
    return {"use_safetensors": True} if local.is_dir() and any(local.glob("*.safetensors*")) else {}


def _load_vision(spec: VisionSpec) -> nn.Module:
    cfg = vision_config(spec)
    if spec.name_or_path:
        return AutoModel.from_pretrained(spec.name_or_path, config=cfg, **safetensors_kwargs(spec.name_or_path))
    return AutoModel.from_config(cfg)


def tower_parts(spec: VisionSpec) -> list[TowerSpec]:
    """The towers of a several-tower spec, each read from `<spec.name_or_path>/tower_<i>` when set."""
    if not spec.name_or_path:
        return list(spec.towers)
    return [dataclasses.replace(t, name_or_path=str(Path(spec.name_or_path) / f"tower_{i}"), config=None)
            for i, t in enumerate(spec.towers)]


def _load_towers(spec: VisionSpec) -> VisionTowers:
    parts = tower_parts(spec)
    return VisionTowers([_load_vision(t) for t in parts], [t.resolution for t in parts], [t.feature_layer for t in parts])


def truncate_vision(vision: nn.Module, spec: VisionSpec | TowerSpec) -> VisionSpec | TowerSpec:
    """Drop the encoder layers after `feature_layer` (they would run and never get a gradient).

    Returns the spec to save: the truncated tower's last hidden state is the feature layer (-1).
    Towers without an `encoder.layers` (DINOv2: `encoder.layer`) list are left whole.
    """
    if isinstance(vision, VisionTowers):
        towers = [truncate_vision(t, s) for t, s in zip(vision.towers, spec.towers)]
        vision.feature_layers = [t.feature_layer for t in towers]
        return dataclasses.replace(spec, towers=towers)
    encoder = getattr(getattr(vision, "vision_model", vision), "encoder", None)
    name = "layers" if isinstance(getattr(encoder, "layers", None), nn.ModuleList) else "layer"
    layers = getattr(encoder, name, None)
    if spec.feature_layer >= -1 or not isinstance(layers, nn.ModuleList):
        return spec
    keep = len(layers) + 1 + spec.feature_layer
    setattr(encoder, name, layers[:keep])
    vision.config.num_hidden_layers = keep
    if hasattr(vision.config, "stage_names"):  # a backbone config (DINOv2): its stages follow the layers
        vision.config.stage_names = ["stem"] + [f"stage{i}" for i in range(1, keep + 1)]
        vision.config.set_output_features_output_indices(out_features=None, out_indices=None)
    return dataclasses.replace(spec, config=spec.config and {**spec.config, "num_hidden_layers": keep}, feature_layer=-1)


def freeze_unused_vision(vision: nn.Module, feature_layer: int) -> list[str]:
    """Probe the tower with a 2x2-patch input; parameters that get no gradient (a CLIP
    `post_layernorm`, a SigLIP pooling `head`, a DINOv2 `layernorm`) are frozen so DDP/FSDP never
    wait on them. Several towers: each at its own feature layer."""
    if isinstance(vision, VisionTowers):
        return [n for t, layer in zip(vision.towers, vision.feature_layers) for n in freeze_unused_vision(t, layer)]
    size = 2 * vision.config.patch_size
    with torch.enable_grad():  # also when the model is built for inference under `torch.no_grad()`
        tower_hidden_states(vision, torch.zeros(1, 3, size, size))[feature_layer].sum().backward()
    unused = [n for n, p in vision.named_parameters() if p.requires_grad and p.grad is None]
    for n, p in vision.named_parameters():
        p.grad = None
        if n in unused:
            p.requires_grad_(False)
    return unused


def _load_llm(spec: LLMSpec, llm_kwargs: dict[str, Any] | None = None) -> nn.Module:
    """`llm_kwargs` go to `from_pretrained` (e.g. `quantization_config` for QLoRA)."""
    kwargs = {"attn_implementation": spec.attn_implementation}
    if spec.name_or_path:
        kwargs.update(safetensors_kwargs(spec.name_or_path))
        return AutoModelForCausalLM.from_pretrained(spec.name_or_path, **kwargs, **(llm_kwargs or {}))
    if llm_kwargs:
        raise ValueError(f"{sorted(llm_kwargs)} need a pretrained LLM (`llm.name_or_path`), not a config")
    return AutoModelForCausalLM.from_config(_config(spec), **kwargs)


class MM15Model(nn.Module):
    def __init__(self, spec: ModelSpec, vision: nn.Module, connector: nn.Module, llm: nn.Module,
                 image_token_id: int, crop_size: int):
        super().__init__()
        self.spec = spec
        self.vision = vision
        self.connector = connector
        self.llm = llm
        self.image_token_id = image_token_id
        self.crop_size = crop_size
        towers = vision.towers if isinstance(vision, VisionTowers) else [vision]
        self.patch_size = towers[0].config.patch_size
        self.grid = connector_grid(spec, [t.config for t in towers], crop_size)
        self.tokens_per_crop = tokens_per_crop(spec.connector, crop_size, self.patch_size, self.grid)
        check_context(spec.connector, self.tokens_per_crop, getattr(llm.config, "max_position_embeddings", None))
        self._is_moe = hasattr(llm.config, "router_aux_loss_coef") or hasattr(llm.config, "output_router_logits")

    @classmethod
    def build(cls, spec: ModelSpec, tokenizer: PreTrainedTokenizerBase, crop_size: int,
              llm_kwargs: dict[str, Any] | None = None) -> "MM15Model":
        check_fused_loss(spec.llm)
        vision = _load_towers(spec.vision) if spec.vision.towers else _load_vision(spec.vision)
        spec = ModelSpec(truncate_vision(vision, spec.vision), spec.llm, spec.connector, spec.tokenizer)
        freeze_unused_vision(vision, spec.vision.feature_layer)
        llm = _load_llm(spec.llm, llm_kwargs)
        if len(tokenizer) > llm.get_input_embeddings().num_embeddings:
            llm.resize_token_embeddings(len(tokenizer))
        towers = vision.towers if isinstance(vision, VisionTowers) else [vision]
        dims = [t.config.hidden_size for t in towers]
        sides = vision.sides if isinstance(vision, VisionTowers) else [crop_size // vision.config.patch_size]
        if getattr(connector_class(spec.connector.kind), "reads_maps", False):
            connector = build_connector(spec.connector, dims, llm.config.hidden_size, [s * s for s in sides])
        else:
            grid = connector_grid(spec, [t.config for t in towers], crop_size)
            connector = build_connector(spec.connector, sum(dims), llm.config.hidden_size, grid * grid)
        return cls(spec, vision, connector, llm, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), crop_size)

    # ----- media -----------------------------------------------------------------------------
    def encode_media(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(C, 3, r, r) crops -> (C, tokens_per_crop, d_llm) LLM-space tokens."""
        if self.spec.vision.towers:
            maps = self.vision(pixel_values)  # [(C, s_i^2, C_i)], each tower at its own resolution
        else:
            hidden = tower_hidden_states(self.vision, pixel_values)[self.spec.vision.feature_layer]  # (C, N[+1], C_enc)
            maps = [patch_tokens(hidden, pixel_values.shape[-1] // self.patch_size)]  # CLS dropped
        if getattr(self.connector, "reads_maps", False):
            return self.connector(maps)
        return self.connector(maps[0] if len(maps) == 1 else concat_on_grid(maps, self.grid))

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
              media_features: torch.Tensor | None = None,
              layouts: list[list[MediaLayout]] | None = None) -> torch.Tensor:
        """Token embeddings with media features (K, M, D) spliced in at the placeholder positions."""
        mask = input_ids == self.image_token_id  # (B, T)
        safe_ids = input_ids.masked_fill(mask, 0)
        embeds = self.llm.get_input_embeddings()(safe_ids)  # (B, T, D)
        if media_features is None and pixel_values is not None and pixel_values.numel():
            media_features = self.encode_media(pixel_values.to(embeds.dtype))
        n_placeholders = int(mask.sum())
        n_features = 0 if media_features is None else media_features.shape[0] * media_features.shape[1]
        if n_placeholders != n_features:
            raise ValueError(placeholder_mismatch(n_placeholders, media_features, layouts))
        if n_features:
            embeds = embeds.masked_scatter(mask.unsqueeze(-1), media_features.to(embeds.dtype).reshape(-1, embeds.shape[-1]))
        elif media_features is not None:  # (0, M, D) keep-alive features of a text-only batch (MM15Module.forward):
            embeds = embeds + media_features.sum().to(embeds.dtype) * 0  # joined where real ones would be
        return embeds

    # ----- training forward --------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, media_features: torch.Tensor | None = None,
                layouts: list[list[MediaLayout]] | None = None, position_ids: torch.Tensor | None = None,
                sample_index: torch.Tensor | None = None, **_: Any) -> MM15Output:
        """Padded rows (`attention_mask` marks the real tokens), or packed rows
        (`mm15.base.data.packing`): then `position_ids` restart at each sample, the LLM gets no 2-D
        mask (its packed-sequence masking keeps attention inside each sample), `sample_index` says
        which sample each token is, and `attention_mask` still marks the real tokens for the MoE
        losses."""
        embeds = self.embed(input_ids, pixel_values, media_features, layouts)
        kwargs = {"output_router_logits": True} if self._is_moe else {}
        decoder = self.llm.get_decoder()
        if position_ids is None:
            out = decoder(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False, **kwargs)
        else:
            out = decoder(inputs_embeds=embeds, attention_mask=None, position_ids=position_ids, use_cache=False, **kwargs)
        if labels is None:
            return MM15Output(loss=None)
        # Project only positions that have a target: (N, D) -> (N, V), never the full (B, T, V);
        # with `fused_loss`, not even (N, V): liger's kernel goes from (N, D) to the loss in chunks.
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        hidden = out.last_hidden_state[:, :-1][keep]
        head = self.llm.get_output_embeddings()
        by_sample = self.spec.llm.loss_reduction == "sample"
        if not keep.any():  # (0, V) logits: every head parameter still gets a (zero) gradient
            lm_loss = head(hidden).float().sum() * 0.0
        elif self.spec.llm.fused_loss:
            lm_loss = fused_linear_cross_entropy(hidden, head, targets[keep], "none" if by_sample else "mean")
        else:
            logits = head(hidden)
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 -> fp32 for the loss
            lm_loss = F.cross_entropy(logits, targets[keep], reduction="none" if by_sample else "mean")
        if keep.any() and by_sample:
            per_token = lm_loss.float()
            if sample_index is None:
                row = keep.nonzero()[:, 0]  # the sample of each kept position
                counts = keep.sum(1)
            else:  # packed rows: the sample of each kept position, from the collate
                row = sample_index[:, 1:][keep]
                counts = torch.bincount(row, minlength=int(sample_index.max()) + 1)
            per_sample = torch.zeros(len(counts), device=per_token.device, dtype=per_token.dtype).index_add_(0, row, per_token)
            has = counts > 0
            lm_loss = (per_sample[has] / counts[has]).mean()
        aux = self._router_aux_loss(out, attention_mask) if self._is_moe else None
        z_loss = router_z_loss(getattr(out, "router_logits", None), attention_mask) if self._is_moe else None
        loss = lm_loss if aux is None else lm_loss + self.spec.llm.router_aux_loss_weight * aux
        loss = loss if z_loss is None else loss + self.spec.llm.router_z_loss_weight * z_loss
        return MM15Output(loss=loss, lm_loss=lm_loss, aux_loss=aux, num_target_tokens=int(keep.sum()),
                          router_z_loss=z_loss)

    def _router_aux_loss(self, out: Any, attention_mask: torch.Tensor) -> torch.Tensor | None:
        router_logits = getattr(out, "router_logits", None)
        hf = self.llm.get_base_model() if hasattr(self.llm, "get_base_model") else self.llm  # under PEFT
        balance = getattr(sys.modules[type(hf).__module__], "load_balancing_loss_func", None)
        if not router_logits or balance is None:
            return None
        cfg = self.llm.config
        n_experts = getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts")
        return balance(router_logits, n_experts, cfg.num_experts_per_tok, attention_mask)

    # ----- generation ----------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor | None = None,
                 media_features: torch.Tensor | None = None, layouts: list[list[MediaLayout]] | None = None,
                 **generate_kwargs: Any) -> torch.Tensor:
        """Greedy/sampled continuation of left-padded prompts; returns only the new tokens (B, T_new)."""
        embeds = self.embed(input_ids, pixel_values, media_features, layouts)
        return self.llm.generate(inputs_embeds=embeds, attention_mask=attention_mask, **generate_kwargs)

    # ----- one directory on disk ----------------------------------------------------------------
    def save_pretrained(self, directory: str | Path, tokenizer: PreTrainedTokenizerBase,
                        preprocessing: dict[str, Any] | None = None) -> None:
        """`vision/`, `llm/`, `tokenizer/` (HF layouts), `connector.safetensors`, `mm15_config.json`."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.vision.save_pretrained(d / "vision")
        self.llm.save_pretrained(d / "llm")
        tokenizer.save_pretrained(d / "tokenizer")
        save_file({k: v.detach().contiguous().cpu() for k, v in self.connector.state_dict().items()}, d / "connector.safetensors")
        spec = asdict(self.spec)
        spec["vision"].update(name_or_path="vision", config=None)
        spec["llm"].update(name_or_path="llm", config=None)
        spec["tokenizer"] = "tokenizer"
        meta = {"model": spec, "crop_size": self.crop_size, "preprocessing": preprocessing or {}}
        (d / SPEC_FILE).write_text(json.dumps(meta, indent=2))

    @classmethod
    def from_pretrained(cls, directory: str | Path, llm_kwargs: dict[str, Any] | None = None
                        ) -> tuple["MM15Model", PreTrainedTokenizerBase, dict[str, Any]]:
        """Load a directory written by `save_pretrained`: (model, tokenizer, preprocessing dict)."""
        spec, crop_size, preprocessing = read_saved_spec(directory)
        tokenizer = load_tokenizer(spec)
        model = cls.build(spec, tokenizer, crop_size, llm_kwargs)
        model.connector.load_state_dict(load_file(Path(directory) / "connector.safetensors"))
        return model, tokenizer, preprocessing


FUSED_LOSS_NEEDS = ("`llm.fused_loss: true` computes the loss with liger-kernel's fused linear cross-entropy, "
                    "which runs on CUDA GPUs only: install it with `pip install liger-kernel` (or `pip install "
                    "\"mm15[liger]\"`) on a machine with a CUDA GPU, or set `llm.fused_loss: false`")


def check_fused_loss(spec: LLMSpec) -> None:
    """Refuse `fused_loss` where liger-kernel cannot run (not installed, or no CUDA device), at
    build time rather than at the first loss."""
    if not spec.fused_loss:
        return
    try:
        import liger_kernel.transformers  # noqa: F401
    except ImportError as e:
        raise RuntimeError(f"{FUSED_LOSS_NEEDS} (liger_kernel is not installed: {e})") from e
    if not torch.cuda.is_available():
        raise RuntimeError(f"{FUSED_LOSS_NEEDS} (no CUDA device is visible)")


def fused_linear_cross_entropy(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor,
                               reduction: Literal["mean", "none"]) -> torch.Tensor:
    """Cross-entropy of `head(hidden)` against `targets` without materialising the logits
    (liger-kernel, imported here: it is optional). `reduction="none"`: one loss per position."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    if not isinstance(head, nn.Linear):  # an adapter-wrapped head: its weight alone is not the projection
        raise ValueError(f"`llm.fused_loss` needs a plain linear output embedding, not {type(head).__name__}")
    out = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction=reduction)(
        head.weight, hidden.contiguous(), targets, head.bias)
    out = out[0] if isinstance(out, tuple) else out  # (loss, z_loss) in versions that may add the z-loss
    return getattr(out, "loss", out)  # newer versions can return an output record


def router_z_loss(router_logits: Any, attention_mask: torch.Tensor | None = None) -> torch.Tensor | None:
    """ST-MoE's router z-loss, as MM1.5 adds it (docs/reference.md, section 1): the mean over tokens,
    of every MoE layer, of logsumexp(router logits)^2; padding left out. `router_logits`: one
    (B * T, E) tensor per MoE layer (transformers' `output_router_logits`)."""
    if not router_logits:
        return None
    logits = torch.cat([r.float() for r in router_logits], 0)  # (layers * B * T, E)
    z = torch.logsumexp(logits, -1).square()
    if attention_mask is not None:
        z = z[attention_mask.reshape(-1).bool().repeat(len(router_logits))]
    return z.mean()


def connector_grid(spec: ModelSpec, tower_configs: list[Any], crop_size: int) -> int | None:
    """Side of the patch map a one-map connector reads: the tower's at `crop_size`, or for several
    towers the common grid they are resized to; None for a connector that reads every map (SVA)."""
    if getattr(connector_class(spec.connector.kind), "reads_maps", False):
        if spec.vision.towers:
            tower_sides(tower_configs, [t.resolution for t in spec.vision.towers])  # refuse off-grid resolutions
        return None
    if not spec.vision.towers:
        return crop_size // tower_configs[0].patch_size
    return common_grid(tower_sides(tower_configs, [t.resolution for t in spec.vision.towers]), spec.vision.grid)


def crop_tokens(spec: ModelSpec, crop_size: int) -> int:
    """`tokens_per_crop` of a model spec, from the part configs alone (no weights loaded)."""
    configs = [vision_config(t) for t in tower_parts(spec.vision)] if spec.vision.towers else [vision_config(spec.vision)]
    return tokens_per_crop(spec.connector, crop_size, configs[0].patch_size, connector_grid(spec, configs, crop_size))


CONTEXT_FIELDS = {"c_abstractor": "connector.num_tokens", "sva": "connector.query_grid",
                  "resampler": "connector.num_latents", "mlp": "the crop size (or take a fixed-count connector)"}


def check_context(spec: ConnectorSpec, per_crop: int, context: int | None) -> None:
    """Refuse a connector whose tokens for one crop do not fit in the LLM's context."""
    if context and per_crop > context:
        raise ValueError(f"the {spec.kind} connector gives {per_crop} tokens per crop, more than the LLM's context of "
                         f"{context} positions (max_position_embeddings): lower {CONTEXT_FIELDS[spec.kind]}")


def placeholder_mismatch(n_placeholders: int, media_features: torch.Tensor | None,
                         layouts: list[list[MediaLayout]] | None = None) -> str:
    """The error message when placeholders and media features disagree: both numbers, the features'
    real shape, and what each media item's layout expected when the layouts are known."""
    if media_features is None:
        features = "no media features"
    else:
        k, m, d = media_features.shape
        features = f"{k * m} media feature vectors (features of shape ({k}, {m}, {d}): {k} x {m} vectors of size {d})"
    message = f"media placeholder mismatch: {n_placeholders} placeholder tokens in input_ids but {features}"
    if layouts is not None:
        items = [layout for sample in layouts for layout in sample]
        expected = sum(layout.num_placeholders for layout in items)
        message += (f"; the layouts expect {expected} placeholders: "
                    + ("; ".join(layout.describe() for layout in items) or "no media"))
    return message


def read_saved_spec(directory: str | Path) -> tuple[ModelSpec, int, dict[str, Any]]:
    """The `ModelSpec` (part paths made absolute), crop size and preprocessing of a saved model."""
    d = Path(directory)
    if not (d / SPEC_FILE).exists():
        raise FileNotFoundError(f"{d} is not an mm15 model directory (no {SPEC_FILE})")
    meta = json.loads((d / SPEC_FILE).read_text())
    m = meta["model"]
    spec = ModelSpec(
        vision=VisionSpec(**{**m["vision"], "name_or_path": str(d / m["vision"]["name_or_path"])}),
        llm=LLMSpec(**{**m["llm"], "name_or_path": str(d / m["llm"]["name_or_path"])}),
        connector=ConnectorSpec(**m["connector"]),
        tokenizer=str(d / m["tokenizer"]),
    )
    return spec, int(meta["crop_size"]), meta.get("preprocessing", {})
