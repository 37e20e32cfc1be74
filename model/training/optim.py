"""The optimizer of train.py: torch's AdamW, fused, with decoupled weight decay on 2-D weights only, the
clipped step, and the learning-rate schedule."""
from __future__ import annotations

import math

import torch


def lr_at(step: int, cfg) -> float:
    """Linear warmup from 0 to lr over warmup_iters, then decay to min_lr at lr_decay_iters: a half cosine
    (cfg.lr_schedule == "cosine") or a straight line ("linear")."""
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    if step < cfg.warmup_iters:
        return cfg.lr * (step + 1) / cfg.warmup_iters
    if step >= decay_iters:
        return cfg.min_lr
    progress = (step - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters)
    if getattr(cfg, "lr_schedule", "cosine") == "linear":
        return cfg.lr + progress * (cfg.min_lr - cfg.lr)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def adamw(model, lr: float, weight_decay: float, betas: tuple[float, float],
          device_type: str = "cpu") -> torch.optim.AdamW:
    """AdamW over model.optim_groups(weight_decay): decoupled weight decay on 2-D weights only. Fused (one
    kernel over all tensors) on CUDA and on the CPU, where it is faster than the foreach default
    (docs/performance.md)."""
    return torch.optim.AdamW(model.optim_groups(weight_decay), lr=lr, betas=betas,
                             fused=device_type in ("cuda", "cpu"))


def clip_and_step(optimizer: torch.optim.Optimizer, max_norm: float) -> torch.Tensor | None:
    """optimizer.step() with the gradients first clipped to total L2 norm `max_norm` by
    torch.nn.utils.clip_grad_norm_ (factor max_norm / (norm + 1e-6) where that is below 1).

    Returns the norm before clipping as a tensor (no host sync: on CUDA an .item() here would stall the queue),
    or None when max_norm is 0 (no clipping).
    """
    if max_norm < 0:
        raise ValueError(f"max_norm must be >= 0 (0: no clipping), got {max_norm}")
    if max_norm == 0:
        optimizer.step()
        return None
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if not params:
        optimizer.step()  # nothing to clip or update; step() still runs its hooks
        return None
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    optimizer.step()
    return norm
