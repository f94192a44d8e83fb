"""Connectors: vision patch features -> LLM token embeddings.

`CAbstractor` follows Honeybee (arXiv 2312.06742, `honeybee/projectors/projectors.py`), as MM1/MM1.5
use it (docs/reference.md, section 1):

    patch features (B, N, C_enc), CLS dropped
      + learnable position embedding (1, N, C_enc)
      -> square map (B, C_enc, s, s)
      -> RegStage(depth, C_enc -> hidden)          # RegNet-Y bottlenecks, LayerNorm2d + SiLU
      -> AdaptiveAvgPool2d(sqrt(M))                # (B, hidden, sqrt(M), sqrt(M))
      -> RegStage(depth, hidden -> hidden)
      -> flatten (B, M, hidden) -> Linear(hidden, d_llm) - SiLU - Linear(d_llm, d_llm)

`MLPConnector` is the LLaVA-1.5 2-layer MLP (one token per patch), the alternative.

`SpatialVisionAggregator` (Cambrian-1, arXiv 2406.16860) reads the feature maps of several towers at
once, and `PerceiverResampler` (AnyMAL, arXiv 2309.16058) gives a fixed number of latents per crop:
both in `mm15.base.aggregators` (docs/reference.md, section 7), built from the same `ConnectorSpec`.

`tokens_per_crop` is the one place that computes how many placeholder tokens an image, crop or frame
gets; the processor writes that many placeholders and the model checks it against the features.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn


@dataclass
class ConnectorSpec:
    """Args:
    kind: `c_abstractor` (MM1.5), `mlp`, `sva` (Cambrian-1's Spatial Vision Aggregator) or
        `resampler` (AnyMAL's Perceiver resampler).
    num_tokens: M, tokens per image or crop for the C-Abstractor (a square: 144 = 12 x 12).
    hidden_size: width of the RegStages (Honeybee/MM1: 1024), of the SVA (Cambrian: 1024) and of the
        resampler [choice: 1024].
    depth: bottleneck blocks per RegStage (3); SVA layers (Cambrian: 3); resampler cross-attention
        layers [choice: 3].
    se_ratio: squeeze-excitation ratio inside each bottleneck (0.25).
    pos_embed_std: init std of the learnable position embedding (Honeybee: 0.02). For from-scratch
        tiny towers 1.0 did well with one crop, but with splitting it gives every crop the same
        strong position pattern and 0.02 (the demo) did better (docs/experiments.md, 2026-11-30).
        The SVA's window position embeddings and queries start with the same std.
    num_heads: attention heads of the SVA and the resampler (Cambrian: 16).
    query_grid: G, the SVA's G x G queries, one per window of every map (Cambrian: 24, 576 tokens).
    num_latents: the resampler's latent queries, its tokens per crop (AnyMAL: 64 to 256).
    """

    kind: Literal["c_abstractor", "mlp", "sva", "resampler"] = "c_abstractor"
    num_tokens: int = 144
    hidden_size: int = 1024
    depth: int = 3
    se_ratio: float = 0.25
    pos_embed_std: float = 0.02
    num_heads: int = 16
    query_grid: int = 24
    num_latents: int = 64


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over channels of a (B, C, H, W) map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduced: int):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, reduced, 1)
        self.act = nn.SiLU()
        self.fc2 = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True))))
        return x * scale.sigmoid()


class Bottleneck(nn.Module):
    """RegNet-Y bottleneck: 1x1 conv -> 3x3 depthwise conv -> SE -> 1x1 conv, residual."""

    def __init__(self, in_ch: int, out_ch: int, se_ratio: float = 0.25):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, bias=False), LayerNorm2d(out_ch), nn.SiLU())
        self.conv2 = nn.Sequential(
            nn.Conv2d(out_ch, out_ch, 3, padding=1, groups=out_ch, bias=False), LayerNorm2d(out_ch), nn.SiLU()
        )
        self.se = SqueezeExcite(out_ch, max(1, int(round(in_ch * se_ratio)))) if se_ratio > 0 else nn.Identity()
        self.conv3 = nn.Sequential(nn.Conv2d(out_ch, out_ch, 1, bias=False), LayerNorm2d(out_ch))
        self.downsample = (
            nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, bias=False), LayerNorm2d(out_ch)) if in_ch != out_ch else nn.Identity()
        )
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv3(self.se(self.conv2(self.conv1(x))))
        return self.act(y + self.downsample(x))


class RegStage(nn.Sequential):
    def __init__(self, depth: int, in_ch: int, out_ch: int, se_ratio: float):
        super().__init__(*[Bottleneck(in_ch if i == 0 else out_ch, out_ch, se_ratio) for i in range(depth)])


class CAbstractor(nn.Module):
    """Convolutional abstractor: (B, N, C_enc) patch features -> (B, M, d_llm) tokens."""

    def __init__(self, spec: ConnectorSpec, vision_dim: int, llm_dim: int, num_patches: int):
        super().__init__()
        side = math.isqrt(num_patches)
        pooled = math.isqrt(spec.num_tokens)
        if side * side != num_patches or pooled * pooled != spec.num_tokens:
            raise ValueError(f"C-Abstractor needs square maps: {num_patches} patches, {spec.num_tokens} tokens")
        self.num_tokens = spec.num_tokens
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, vision_dim))
        nn.init.trunc_normal_(self.pos_embed, std=spec.pos_embed_std)  # truncated at +-2 (absolute), as before
        self.net = nn.Sequential(
            RegStage(spec.depth, vision_dim, spec.hidden_size, spec.se_ratio),
            nn.AdaptiveAvgPool2d(pooled),
            RegStage(spec.depth, spec.hidden_size, spec.hidden_size, spec.se_ratio),
        )
        self.readout = nn.Sequential(nn.Linear(spec.hidden_size, llm_dim), nn.SiLU(), nn.Linear(llm_dim, llm_dim))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        b, n, c = feats.shape  # (B, N, C_enc)
        if n != self.pos_embed.shape[1]:  # crops at another resolution than built for
            pos = _resize_pos(self.pos_embed, n)
        else:
            pos = self.pos_embed
        side = math.isqrt(n)
        x = (feats + pos).transpose(1, 2).reshape(b, c, side, side)  # (B, C_enc, s, s)
        x = self.net(x)  # (B, hidden, sqrt(M), sqrt(M))
        return self.readout(x.flatten(2).transpose(1, 2))  # (B, M, d_llm)


def _resize_pos(pos: torch.Tensor, n: int) -> torch.Tensor:
    side_in, side_out = math.isqrt(pos.shape[1]), math.isqrt(n)
    grid = pos.reshape(1, side_in, side_in, -1).permute(0, 3, 1, 2)
    grid = nn.functional.interpolate(grid, size=(side_out, side_out), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(1, n, -1)


class MLPConnector(nn.Module):
    """LLaVA-1.5 projector: one token per patch, Linear - GELU - Linear."""

    def __init__(self, spec: ConnectorSpec, vision_dim: int, llm_dim: int, num_patches: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(vision_dim, llm_dim), nn.GELU(), nn.Linear(llm_dim, llm_dim))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.net(feats)  # (B, N, d_llm)


def tokens_per_crop(spec: ConnectorSpec, crop_size: int, patch_size: int, grid: int | None = None) -> int:
    """Placeholder tokens for one image, crop or video frame of `crop_size` pixels. `grid`: the side
    of the patch map the connector reads when it is not `crop_size // patch_size` (several towers
    resized to one grid, `mm15.base.towers`)."""
    num_patches = (grid or crop_size // patch_size) ** 2
    fixed = {"c_abstractor": spec.num_tokens, "sva": spec.query_grid**2, "resampler": spec.num_latents}
    return fixed.get(spec.kind, num_patches)


def connector_class(kind: str) -> type[nn.Module]:
    """The connector class of `ConnectorSpec.kind`. A class with `reads_maps = True` takes every tower's
    feature map (a list of (C, N_i, C_i)); the others take one (C, N, C_enc) tensor."""
    from mm15.base.aggregators import PerceiverResampler, SpatialVisionAggregator

    return {"c_abstractor": CAbstractor, "mlp": MLPConnector, "sva": SpatialVisionAggregator,
            "resampler": PerceiverResampler}[kind]


def build_connector(spec: ConnectorSpec, vision_dim: int | list[int], llm_dim: int,
                    num_patches: int | list[int]) -> nn.Module:
    """`vision_dim`, `num_patches`: per tower (lists) for a connector that reads maps, else one each."""
    return connector_class(spec.kind)(spec, vision_dim, llm_dim, num_patches)
