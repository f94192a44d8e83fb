"""Learning-rate schedules and the Muon optimizer, injected from YAML.

`WarmupCosine(optimizer, total_steps, warmup_ratio=0.03, min_lr_ratio=0.0, stable_ratio=0.0)`: linear
warmup, then cosine decay to `min_lr_ratio` x the peak (MM1.5: cosine to 0). `stable_ratio` holds the
peak for that fraction of the steps after warmup before the decay starts (warmup-stable-decay).
`total_steps` comes from the trainer (`estimated_stepping_batches`), so YAML only names the shape:

    scheduler:
      class_path: mm15.base.training.optim.WarmupCosine
      init_args: {warmup_ratio: 0.03}

`MuonAdamW`: Muon (momentum, then the update orthogonalised by a Newton-Schulz iteration; Jordan et al.
2024, the form `torch.optim.Muon` implements) on the hidden weight matrices, AdamW on everything else.
The module's `parameter_groups()` marks which groups hold hidden matrices (`muon: True`: the weights of
`nn.Linear` layers except the LLM's input and output embeddings); embeddings, convolution kernels,
position tables, norms and biases stay with AdamW, the usual split. One optimizer with ordinary
per-parameter state, so checkpoints, resume and LR schedules work as with AdamW. Under FSDP2 each rank
gathers a sharded matrix's update, orthogonalises the whole of it (the same result on every rank) and
keeps its shard. `adjust_lr_fn: match_rms_adamw` (the default) scales each matrix's step to AdamW's RMS,
so one `lr` serves both halves:

    optimizer:
      class_path: mm15.base.training.optim.MuonAdamW
      init_args: {lr: 0.004, weight_decay: 0.0}
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch.distributed.tensor import DTensor, distribute_tensor
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


# Quintic Newton-Schulz coefficients (Jordan et al., as in `torch.optim.Muon`): X -> aX + (bA + cA^2)X with
# A = X X^T drives every singular value of X towards 1 in a few steps.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalize(update: torch.Tensor, steps: int = 5, coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
                  eps: float = 1e-7, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """About U S' V^T for the SVD U S V^T of `update`, S' near 1 (the iteration's fixed point band),
    computed in `dtype` (bfloat16 as `torch.optim.Muon` on accelerators; float32 here by default)."""
    a, b, c = coefficients
    x = update.to(dtype)
    wide = x.shape[0] <= x.shape[1]
    x = x if wide else x.T
    x = x / x.norm().clamp(min=eps)  # spectral norm <= Frobenius norm <= 1: inside the iteration's basin
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return (x if wide else x.T).to(update.dtype)


class MuonAdamW(Optimizer):
    """Muon on the param groups marked `muon: True`, AdamW on the others (see the module docstring).

    Args:
        lr: the peak learning rate of both halves (groups may set their own).
        weight_decay: decoupled weight decay (groups may override, as the module's no-decay groups do).
        betas, eps: AdamW's.
        momentum, nesterov, ns_steps: Muon's (0.95, Nesterov, 5 Newton-Schulz steps).
        ns_dtype: the Newton-Schulz iteration's precision, `float32` or `bfloat16` (torch's choice, faster
            on GPUs).
        adjust_lr_fn: `match_rms_adamw` (0.2 sqrt(max(rows, cols)) x lr: the update's RMS matches AdamW's,
            so AdamW's lr carries over) or `original` (sqrt(max(1, rows / cols)) x lr, Muon's own scale,
            which wants an lr around 0.02).
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, momentum: float = 0.95,
                 nesterov: bool = True, ns_steps: int = 5, adjust_lr_fn: str = "match_rms_adamw",
                 ns_dtype: str = "float32"):
        if adjust_lr_fn not in ("match_rms_adamw", "original"):
            raise ValueError(f"MuonAdamW: adjust_lr_fn must be 'match_rms_adamw' or 'original', got {adjust_lr_fn!r}")
        if ns_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"MuonAdamW: ns_dtype must be 'float32' or 'bfloat16', got {ns_dtype!r}")
        defaults = dict(lr=lr, weight_decay=weight_decay, betas=betas, eps=eps, momentum=momentum, nesterov=nesterov,
                        ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn, ns_dtype=ns_dtype, muon=False)
        super().__init__(params, defaults)
        for group in self.param_groups:
            bad = [tuple(p.shape) for p in group["params"] if group["muon"] and p.ndim != 2]
            if bad:
                raise ValueError(f"MuonAdamW: group {group.get('name', '?')!r} is marked muon but holds "
                                 f"parameters of shapes {bad}; Muon updates 2-D matrices only")

    def _scale(self, group: dict[str, Any], shape: torch.Size) -> float:
        rows, cols = shape
        if group["adjust_lr_fn"] == "match_rms_adamw":
            return 0.2 * math.sqrt(max(rows, cols))
        return math.sqrt(max(1.0, rows / cols))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, decay = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("MuonAdamW does not support sparse gradients")
                state = self.state[p]
                if group["muon"]:
                    self._muon_update(p, state, group, lr, decay)
                else:
                    self._adamw_update(p, state, group, lr, decay)
        return loss

    def _muon_update(self, p: torch.Tensor, state: dict, group: dict[str, Any], lr: float, decay: float) -> None:
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p)
        buf = state["momentum_buffer"]
        buf.lerp_(p.grad, 1 - group["momentum"])
        update = p.grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf
        dtype = getattr(torch, group["ns_dtype"])
        if isinstance(update, DTensor):  # FSDP2 shards: orthogonalise the whole matrix, keep this rank's shard
            ortho = orthogonalize(update.full_tensor(), group["ns_steps"], dtype=dtype)
            ortho = distribute_tensor(ortho, update.device_mesh, update.placements, src_data_rank=None)
        else:
            ortho = orthogonalize(update, group["ns_steps"], dtype=dtype)
        p.mul_(1 - lr * decay)
        p.add_(ortho, alpha=-lr * self._scale(group, p.shape))

    def _adamw_update(self, p: torch.Tensor, state: dict, group: dict[str, Any], lr: float, decay: float) -> None:
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        beta1, beta2 = group["betas"]
        state["step"] += 1
        t = state["step"].item()
        state["exp_avg"].lerp_(p.grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
        denom = (state["exp_avg_sq"] / (1 - beta2 ** t)).sqrt_().add_(group["eps"])
        p.mul_(1 - lr * decay)
        p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1 ** t))
