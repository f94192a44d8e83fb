"""Vision towers: one Hugging Face tower's patch features, or several towers read at once (Cambrian-1).

Any tower with patch tokens works: CLIP, SigLIP, SigLIP2 (its patchified input is built here), DINOv2
(CLS and register tokens are dropped). With `VisionSpec.towers` the model holds a `VisionTowers`:
each tower reads every crop resized to its own resolution and yields its own map,

    crops (C, 3, r, r) -> tower i at resolution r_i -> (C, s_i * s_i, C_i),  s_i = r_i / patch_i

and the connector takes the list (the SVA, `mm15.base.aggregators`) or the maps resized to one
s x s grid and concatenated along channels, (C, s * s, sum C_i) (Cambrian-1's baseline; any other
connector). docs/reference.md, section 7.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

SIGLIP2 = "siglip2_vision_model"


def native_resolution(config: Any) -> int:
    """The crop size a tower was built for (SigLIP2 configs give a patch count instead)."""
    size = getattr(config, "image_size", None)
    if size:
        return int(size if isinstance(size, int) else size[0])
    return math.isqrt(config.num_patches) * config.patch_size


def tower_hidden_states(tower: nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Hidden states of a tower on (C, 3, r, r) crops; position embeddings are interpolated when r is
    not the tower's native size."""
    cfg = tower.config
    if cfg.model_type == SIGLIP2:  # NaFlex input: (C, n_patches, p * p * 3) patches, channels last
        c, _, r, _ = pixels.shape
        p, side = cfg.patch_size, r // cfg.patch_size
        patches = pixels.reshape(c, 3, side, p, side, p).permute(0, 2, 4, 3, 5, 1).reshape(c, side * side, p * p * 3)
        out = tower(pixel_values=patches, pixel_attention_mask=torch.ones(c, side * side, dtype=torch.long, device=pixels.device),
                    spatial_shapes=torch.tensor([[side, side]] * c, device=pixels.device), output_hidden_states=True)
    else:
        interpolate = pixels.shape[-1] != native_resolution(cfg)
        out = tower(pixel_values=pixels, output_hidden_states=True, interpolate_pos_encoding=interpolate)
    return out.hidden_states


def patch_tokens(hidden: torch.Tensor, side: int) -> torch.Tensor:
    """(C, T, d) hidden state -> (C, side * side, d): the leading CLS / register tokens dropped."""
    extra = hidden.shape[1] - side * side
    if not 0 <= extra <= 16:
        raise ValueError(f"a tower's hidden state has {hidden.shape[1]} tokens, not a {side} x {side} patch map "
                         "plus a few CLS / register tokens: mm15 reads towers with patch tokens (CLIP, SigLIP, "
                         "SigLIP2, DINOv2, ...)")
    return hidden[:, extra:]


def tower_sides(configs: list[Any], resolutions: list[int | None]) -> list[int]:
    """Side of each tower's patch map at its resolution; refuses a resolution off the patch grid."""
    sides = []
    for i, (cfg, res) in enumerate(zip(configs, resolutions)):
        res, p = res or native_resolution(cfg), cfg.patch_size
        if res % p:
            raise ValueError(f"vision.towers[{i}] ({cfg.model_type}) reads crops at {res} px, not a multiple of its "
                             f"patch size {p}, so its patches do not tile a grid: set vision.towers[{i}].resolution "
                             f"to a multiple of {p} (e.g. {res - res % p} or {res - res % p + p})")
        sides.append(res // p)
    return sides


def common_grid(sides: list[int], grid: int | None) -> int:
    """The grid every map is resized to before concatenation: `grid`, or the smallest map. Maps are
    only ever shrunk (a grid finer than a tower's map would invent its tokens)."""
    grid = grid or min(sides)
    small = [f"vision.towers[{i}] gives {s} x {s}" for i, s in enumerate(sides) if s < grid]
    if small:
        raise ValueError(f"the towers' maps cannot be aligned on a {grid} x {grid} grid (vision.grid): "
                         f"{'; '.join(small)}. Lower vision.grid to at most {min(sides)}, or raise those towers' "
                         "resolution (vision.towers[i].resolution)")
    return grid


def concat_on_grid(maps: list[torch.Tensor], grid: int) -> torch.Tensor:
    """[(C, s_i^2, C_i)] -> (C, grid^2, sum C_i): each map resized (antialiased bilinear), then joined."""
    out = []
    for m in maps:
        c, n, d = m.shape
        side = math.isqrt(n)
        if side != grid:
            x = m.transpose(1, 2).reshape(c, d, side, side)
            x = F.interpolate(x, size=(grid, grid), mode="bilinear", align_corners=False, antialias=True)
            m = x.flatten(2).transpose(1, 2)
        out.append(m)
    return torch.cat(out, -1)


class VisionTowers(nn.Module):
    """Several towers: (C, 3, r, r) crops -> [(C, s_i^2, C_i)], tower i at `resolutions[i]` pixels."""

    def __init__(self, towers: list[nn.Module], resolutions: list[int | None], feature_layers: list[int]):
        super().__init__()
        self.towers = nn.ModuleList(towers)
        configs = [t.config for t in towers]
        self.resolutions = [r or native_resolution(c) for r, c in zip(resolutions, configs)]
        self.sides = tower_sides(configs, self.resolutions)
        self.feature_layers = list(feature_layers)

    def forward(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        maps = []
        for tower, res, side, layer in zip(self.towers, self.resolutions, self.sides, self.feature_layers):
            x = pixel_values
            if x.shape[-1] != res:
                x = F.interpolate(x, size=(res, res), mode="bilinear", align_corners=False, antialias=True)
            maps.append(patch_tokens(tower_hidden_states(tower, x)[layer], side))
        return maps

    def save_pretrained(self, directory: str | Path, **kwargs: Any) -> None:
        """One Hugging Face directory per tower: `<directory>/tower_<i>/`."""
        for i, tower in enumerate(self.towers):
            tower.save_pretrained(Path(directory) / f"tower_{i}", **kwargs)

    # Activation checkpointing (`mm15.base.training.sharding.enable_activation_checkpointing`) on every tower.
    @property
    def supports_gradient_checkpointing(self) -> bool:
        return all(getattr(t, "supports_gradient_checkpointing", False) for t in self.towers)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        for tower in self.towers:
            tower.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)
