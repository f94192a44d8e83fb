"""Attention connectors: Cambrian-1's Spatial Vision Aggregator and AnyMAL's Perceiver resampler.

Both are built from `mm15.base.connector.ConnectorSpec` (`kind: sva | resampler`) and give a fixed
number of tokens per crop (`tokens_per_crop`: G x G for the SVA, `num_latents` for the resampler).
The paper facts they follow are in docs/reference.md, section 7.

`SpatialVisionAggregator` (Cambrian-1, arXiv 2406.16860; layout of the authors' released code):

    maps_i (C, s_i * s_i, C_i), one per tower, s_i a multiple of G (window side k_i = s_i / G)
      -> per tower Linear(C_i, W) - GELU - Linear(W, W) - LayerNorm(W)        # (C, s_i^2, W)
      context = mean over the first tower's tokens                           # (C, W)
      windows_i: query (a, b) sees rows a*k_i .. (a+1)*k_i - 1 (and columns) # (C*G*G, k_i^2, W)
      queries (G*G, W), learnable, one per window
      L x [ q <- proj_in(cat(q, proj_context(context)))                     # 2W -> W
            q <- q + attention(q, keys and values of every tower's window concatenated)
            q <- residual + MLP(LayerNorm(q)) ]
      -> Linear(W, d_llm) - GELU - Linear(d_llm, d_llm)                      # (C, G*G, d_llm)

`PerceiverResampler` (AnyMAL's image projector, after Flamingo's resampler):

    patch features (C, N, C_enc) -> Linear(C_enc, W)
    latents (M, W), learnable
    L x [ latents += attention(q: latents, k/v: cat(features, latents))      # pre-LayerNorm each
          latents += FFN(latents) ]                                          # W -> 4W -> W
    -> LayerNorm(W) -> Linear(W, d_llm)                                      # (C, M, d_llm)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mm15.base.connector import ConnectorSpec


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head attention of (B, Tq, W) queries over (B, Tk, W) keys and values -> (B, Tq, W)."""
    b, tq, w = q.shape
    split = lambda x: x.reshape(b, x.shape[1], heads, w // heads).transpose(1, 2)  # (B, H, T, W/H)
    out = F.scaled_dot_product_attention(split(q), split(k), split(v))
    return out.transpose(1, 2).reshape(b, tq, w)


def _check_heads(spec: ConnectorSpec) -> None:
    if spec.hidden_size % spec.num_heads:
        raise ValueError(f"connector.hidden_size {spec.hidden_size} is not divisible by connector.num_heads "
                         f"{spec.num_heads}: choose a width that is a multiple of the head count")


def _layer_norm_linear(width: int) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width, bias=False))


class SVALayer(nn.Module):
    """One aggregation layer: every query attends to its own window of every tower's map."""

    def __init__(self, width: int, heads: int, windows: list[int], pos_std: float):
        super().__init__()
        self.heads = heads
        self.proj_context = nn.Linear(width, width, bias=False)
        self.proj_in = nn.Linear(2 * width, width, bias=False)
        # One position table per tower over the k x k cells of a window (none for 1-cell windows).
        self.pos_embeds = nn.ParameterDict({
            str(i): nn.Parameter(nn.init.trunc_normal_(torch.empty(k * k, width), std=pos_std))
            for i, k in enumerate(windows) if k > 1})
        self.q_proj = _layer_norm_linear(width)
        self.k_projs = nn.ModuleList(_layer_norm_linear(width) for _ in windows)
        self.v_projs = nn.ModuleList(_layer_norm_linear(width) for _ in windows)
        self.o_proj = nn.Linear(width, width, bias=False)
        self.norm = nn.LayerNorm(width)
        self.proj_out = nn.Sequential(nn.Linear(width, width, bias=False), nn.GELU(), nn.Linear(width, width, bias=False))

    def forward(self, queries: torch.Tensor, context: torch.Tensor, windows: list[torch.Tensor]) -> torch.Tensor:
        """queries, context (B', 1, W); windows[i] (B', k_i^2, W) with B' = crops x G x G."""
        q = self.proj_in(torch.cat([queries, self.proj_context(context)], -1))  # (B', 1, W)
        placed = [w + self.pos_embeds[str(i)] if str(i) in self.pos_embeds else w for i, w in enumerate(windows)]
        keys = torch.cat([proj(w) for proj, w in zip(self.k_projs, placed)], 1)  # (B', sum k_i^2, W)
        values = torch.cat([proj(w) for proj, w in zip(self.v_projs, placed)], 1)
        q = q + self.o_proj(_attend(self.q_proj(q), keys, values, self.heads))
        return queries + self.proj_out(self.norm(q))


class SpatialVisionAggregator(nn.Module):
    """Cambrian-1's SVA: [(C, s_i^2, C_i) per tower] -> (C, G*G, d_llm)."""

    reads_maps = True

    def __init__(self, spec: ConnectorSpec, vision_dim: list[int], llm_dim: int, num_patches: list[int]):
        super().__init__()
        _check_heads(spec)
        g, width = spec.query_grid, spec.hidden_size
        self.grid, self.sides = g, [math.isqrt(n) for n in num_patches]
        bad = [f"tower {i}: {s} x {s}" for i, s in enumerate(self.sides) if s * s != num_patches[i] or s % g]
        if bad:
            raise ValueError(
                f"the SVA's {g} x {g} query grid (connector.query_grid) must divide every tower's square feature "
                f"map, but {'; '.join(bad)}: choose a query_grid that divides {math.gcd(*self.sides)}, or give "
                "each tower a resolution (vision.towers[i].resolution) whose patch grid is a multiple of it")
        windows = [s // g for s in self.sides]
        self.projs = nn.ModuleList(
            nn.Sequential(nn.Linear(d, width), nn.GELU(), nn.Linear(width, width), nn.LayerNorm(width)) for d in vision_dim)
        self.queries = nn.Parameter(nn.init.trunc_normal_(torch.empty(g * g, width), std=spec.pos_embed_std))
        self.layers = nn.ModuleList(SVALayer(width, spec.num_heads, windows, spec.pos_embed_std)
                                    for _ in range(spec.depth))
        self.readout = nn.Sequential(nn.Linear(width, llm_dim), nn.GELU(), nn.Linear(llm_dim, llm_dim))

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        g = self.grid
        shapes = [m.shape[1] for m in maps]
        if shapes != [s * s for s in self.sides]:
            raise ValueError(f"the SVA was built for maps of {[s * s for s in self.sides]} tokens, got {shapes}")
        projected = [proj(m) for proj, m in zip(self.projs, maps)]  # (C, s_i^2, W)
        c, width = projected[0].shape[0], projected[0].shape[-1]
        windows = [_windows(p, s, g) for p, s in zip(projected, self.sides)]  # (C*G*G, k_i^2, W)
        context = projected[0].mean(1).repeat_interleave(g * g, 0).unsqueeze(1)  # (C*G*G, 1, W)
        q = self.queries.unsqueeze(1).repeat(c, 1, 1)  # (C*G*G, 1, W), crop-major like the windows
        for layer in self.layers:
            q = layer(q, context, windows)
        return self.readout(q.reshape(c, g * g, width))  # (C, G*G, d_llm)


def _windows(x: torch.Tensor, side: int, g: int) -> torch.Tensor:
    """(C, s*s, W) map -> (C*G*G, k*k, W): the k x k window under each query, queries row-major."""
    c, _, w = x.shape
    k = side // g
    x = x.reshape(c, g, k, g, k, w).permute(0, 1, 3, 2, 4, 5)  # (C, G, G, k, k, W)
    return x.reshape(c * g * g, k * k, w)


class ResamplerLayer(nn.Module):
    """Latents attend to the features and themselves, then a feed-forward block; both residual."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm_media = nn.LayerNorm(width)
        self.norm_latents = nn.LayerNorm(width)
        self.to_q = nn.Linear(width, width, bias=False)
        self.to_kv = nn.Linear(width, 2 * width, bias=False)
        self.to_out = nn.Linear(width, width, bias=False)
        self.ff = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 4 * width, bias=False), nn.GELU(),
                                nn.Linear(4 * width, width, bias=False))

    def forward(self, feats: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        media, lat = self.norm_media(feats), self.norm_latents(latents)  # (C, N, W), (C, M, W)
        keys, values = self.to_kv(torch.cat([media, lat], 1)).chunk(2, -1)  # (C, N + M, W) each
        latents = latents + self.to_out(_attend(self.to_q(lat), keys, values, self.heads))
        return latents + self.ff(latents)


class PerceiverResampler(nn.Module):
    """AnyMAL's projector: (C, N, C_enc) patch features -> (C, num_latents, d_llm) tokens."""

    def __init__(self, spec: ConnectorSpec, vision_dim: int, llm_dim: int, num_patches: int):
        super().__init__()
        _check_heads(spec)
        width = spec.hidden_size
        self.proj_in = nn.Linear(vision_dim, width)
        self.latents = nn.Parameter(nn.init.trunc_normal_(torch.empty(spec.num_latents, width), std=spec.pos_embed_std))
        self.layers = nn.ModuleList(ResamplerLayer(width, spec.num_heads) for _ in range(spec.depth))
        self.norm = nn.LayerNorm(width)
        self.proj_out = nn.Linear(width, llm_dim)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        x = self.proj_in(feats)  # (C, N, W)
        latents = self.latents.unsqueeze(0).expand(x.shape[0], -1, -1)  # (C, M, W)
        for layer in self.layers:
            latents = layer(x, latents)
        return self.proj_out(self.norm(latents))  # (C, M, d_llm)
