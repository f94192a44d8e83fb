"""Learning-rate schedules injected from YAML.

`WarmupCosine(optimizer, total_steps, warmup_ratio=0.03, min_lr_ratio=0.0, stable_ratio=0.0)`: linear
warmup, then cosine decay to `min_lr_ratio` x the peak (MM1.5: cosine to 0). `stable_ratio` holds the
peak for that fraction of the steps after warmup before the decay starts (warmup-stable-decay).
`total_steps` comes from the trainer (`estimated_stepping_batches`), so YAML only names the shape:

    scheduler:
      class_path: mm15.base.optim.WarmupCosine
      init_args: {warmup_ratio: 0.03}
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


class WarmupCosine(LambdaLR):
    def __init__(self, optimizer: Optimizer, total_steps: int, warmup_ratio: float = 0.03,
                 warmup_steps: int | None = None, min_lr_ratio: float = 0.0, stable_ratio: float = 0.0):
        if not 0.0 <= stable_ratio < 1.0:
            raise ValueError(f"WarmupCosine: stable_ratio must be in [0, 1), got {stable_ratio}")
        self.total_steps = max(1, int(total_steps))
        self.warmup_steps = warmup_steps if warmup_steps is not None else int(warmup_ratio * self.total_steps)
        self.stable_steps = int(stable_ratio * self.total_steps)
        self.min_lr_ratio = min_lr_ratio
        super().__init__(optimizer, self.factor)

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        start = self.warmup_steps + self.stable_steps
        if step < start:
            return 1.0
        progress = min(1.0, (step - start) / max(1, self.total_steps - start))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
