"""The optimizer of train.py: torch's fused AdamW, with gradient clipping folded into its kernel.

torch.nn.utils.clip_grad_norm_ followed by optimizer.step() passes over every gradient three times: a norm per
tensor, a multiply per tensor, then the update. On the CPU the norm is the slow part (torch's vector_norm is
several times slower than BLAS's dot over the same floats). Here the norm is a sum of per-tensor dot products
on the CPU (torch's multi-tensor norm kernel on CUDA), and the clipping divisor goes to the fused kernel as its
grad_scale, the attribute torch.amp.GradScaler sets to unscale, so the kernel divides each gradient as it reads
it. The update equals clip_grad_norm_(max_norm) then step() up to float32 rounding (tests/test_optim.py); the
gradients are left clipped, as clip_grad_norm_ leaves them.
"""
from __future__ import annotations

import torch


def adamw(model, lr: float, weight_decay: float, betas: tuple[float, float],
          device_type: str = "cpu") -> torch.optim.AdamW:
    """AdamW over model.optim_groups(weight_decay): decoupled weight decay on 2-D weights only. Fused (one
    kernel over all tensors) on CUDA and on the CPU, where it is faster than the foreach default."""
    return torch.optim.AdamW(model.optim_groups(weight_decay), lr=lr, betas=betas,
                             fused=device_type in ("cuda", "cpu"))


def grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of all `grads` together, a float32 scalar tensor on their device."""
    if not grads:
        raise ValueError("grad_norm needs at least one gradient, got none")
    if grads[0].device.type == "cpu":
        squares = [torch.dot(g.reshape(-1), g.reshape(-1)) for g in grads]  # BLAS dot per tensor: (), ...
        return torch.stack(squares).sum().float().sqrt()
    return torch.nn.utils.get_total_norm(grads).float()  # one multi-tensor kernel on CUDA


def clip_and_step(optimizer: torch.optim.Optimizer, max_norm: float) -> torch.Tensor | None:
    """optimizer.step() with the gradients first clipped to total L2 norm `max_norm`, as
    torch.nn.utils.clip_grad_norm_ clips them (factor max_norm / (norm + 1e-6) where that is below 1).

    Returns the norm before clipping as a tensor (no host sync: on CUDA an .item() here would stall the queue),
    or None when max_norm is 0 (no clipping). Optimizers that are not fused get the factor applied to the
    gradients first, by torch.nn.utils.clip_grads_with_norm_.
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
    norm = grad_norm([p.grad for p in params])
    if not optimizer.defaults.get("fused"):
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        optimizer.step()
        return norm
    # the fused kernels divide every gradient by grad_scale as they read it (and store it divided)
    optimizer.grad_scale = torch.clamp((norm + 1e-6) / max_norm, min=1.0)
    try:
        optimizer.step()
    finally:
        del optimizer.grad_scale  # a later step() without clipping must not reuse it
    return norm
