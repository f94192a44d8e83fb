"""SlowFast token pooling on the connector output (SlowFast-LLaVA, arXiv 2407.15841), for
training-free video use: fewer visual tokens per video, both detail and motion kept.

* slow pathway: `slow_frames` of the N frames (evenly spread), tokens at full resolution, or
  max-pooled by `slow_pool` (SlowFast-LLaVA: 1x2 on its 24x24 grid);
* fast pathway: all N frames, each pooled to `fast_grid` x `fast_grid` tokens (SlowFast-LLaVA: 4x4)
  with adaptive average pooling [choice: the paper says "pooled", not how];
* the video's tokens are slow then fast, no separators.

Token counts derive from the core's `tokens_per_crop` (a square grid of g x g tokens per frame),
so the processor's placeholders and these features agree by construction; the model still checks.

    spec = SlowFastSpec(slow_frames=6, fast_grid=4)
    slowfast_token_count(24, 144, spec)        # (864, 384): 6 x 144 slow + 24 x 16 fast = 1248
    tokens = slowfast_pool(features, spec)     # (N, M, D) -> (1248, D)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from mm15.base.data.media import MediaLayout


@dataclass
class SlowFastSpec:
    """Args:
    slow_frames: frames kept at full detail (SlowFast-LLaVA: 10 of 50) [choice: 6 of 24].
    slow_pool: (rows, cols) max-pooling kernel on the slow frames' token grid ((1, 1): none).
    fast_grid: side of each frame's token grid in the fast pathway.
    """

    slow_frames: int = 6
    slow_pool: tuple[int, int] = (1, 1)
    fast_grid: int = 4


def token_grid(tokens_per_crop: int) -> int:
    """g for a g x g token grid; the connectors produce square grids."""
    g = math.isqrt(tokens_per_crop)
    if g * g != tokens_per_crop:
        raise ValueError(f"SlowFast pooling needs a square token grid per frame, got {tokens_per_crop} tokens")
    return g


def slow_frame_indices(num_frames: int, slow_frames: int) -> list[int]:
    """The slow pathway's frames: `slow_frames` evenly spread over the N sampled ones."""
    if slow_frames >= num_frames:
        return list(range(num_frames))
    return np.round(np.linspace(0, num_frames - 1, slow_frames)).astype(int).tolist()


def slowfast_token_count(num_frames: int, tokens_per_crop: int, spec: SlowFastSpec) -> tuple[int, int]:
    """(slow tokens, fast tokens) for one video of `num_frames` frames."""
    g = token_grid(tokens_per_crop)
    ph, pw = spec.slow_pool
    slow = len(slow_frame_indices(num_frames, spec.slow_frames)) * (g // ph) * (g // pw)
    fast = num_frames * min(spec.fast_grid, g) ** 2
    return slow, fast


def slowfast_pool(features: torch.Tensor, spec: SlowFastSpec) -> torch.Tensor:
    """(N, M, D) connector features of one video -> (L, D) slow-then-fast tokens."""
    n, m, d = features.shape
    g = token_grid(m)
    grid = features.transpose(1, 2).reshape(n, d, g, g)  # (N, D, g, g)
    slow = grid[slow_frame_indices(n, spec.slow_frames)]  # (S, D, g, g)
    if tuple(spec.slow_pool) != (1, 1):
        slow = F.max_pool2d(slow, kernel_size=tuple(spec.slow_pool))  # (S, D, g/ph, g/pw)
    fast = F.adaptive_avg_pool2d(grid, min(spec.fast_grid, g))  # (N, D, f, f)
    as_tokens = lambda x: x.flatten(2).transpose(1, 2).reshape(-1, d)  # noqa: E731  (K, D, h, w) -> (K*h*w, D)
    return torch.cat([as_tokens(slow), as_tokens(fast)])  # (L, D)


def pool_batch(features: torch.Tensor, layouts: list[list[MediaLayout]], spec: SlowFastSpec) -> torch.Tensor:
    """(C, M, D) features of all crops of a batch -> (1, L, D): each video pooled, images kept.

    `layouts` (the batch's `layouts`: per sample, per media item) say how many crops each item has
    and whether it is a video, in the order the crops were concatenated.
    """
    parts, start = [], 0
    for sample_layouts in layouts:
        for layout in sample_layouts:
            chunk = features[start: start + layout.crops]  # (n, M, D)
            parts.append(slowfast_pool(chunk, spec) if layout.kind == "video" else chunk.reshape(-1, chunk.shape[-1]))
            start += layout.crops
    if start != features.shape[0]:
        raise ValueError(f"the layouts describe {start} crops but the batch has {features.shape[0]}")
    return torch.cat(parts).unsqueeze(0)  # (1, L, D)
