"""The optimizer step of train.py: gradient clipping folded into torch's fused AdamW kernel.

torch.nn.utils.clip_grad_norm_ followed by optimizer.step() passes over every gradient three times: a norm per
tensor, a multiply per tensor, then the update. On the CPU the norm is the slow part: torch's vector_norm takes
142 us over 804K floats where BLAS's dot takes 20 us (recipe (a)'s parameters; README, "What changed for
speed"). Here the norm is a sum of per-tensor dot products on the CPU (torch's multi-tensor norm kernel on
CUDA), and the clipping divisor goes to the fused kernel as its grad_scale, the argument torch.amp.GradScaler
uses to unscale, so the kernel divides each gradient as it reads it. The update equals clip_grad_norm_(max_norm)
then step() up to float32 rounding (tests/test_optim.py); the gradients are left clipped, as clip_grad_norm_
leaves them.

AdamW is torch's fused AdamW with less Python per step: same kernel, same state, same results.
"""
from __future__ import annotations

import torch


class AdamW(torch.optim.AdamW):
    """torch.optim.AdamW(fused=True) whose step() calls the fused kernel (torch._fused_adamw_) itself.

    torch's step() spends about 0.4 ms of Python per step on recipe (a)'s 27 tensors (per-tensor state checks,
    grouping by device and dtype), 1.6% of that step (torch.profiler, BENCHMARKS.md). This one gathers the same
    lists and makes the same kernel call, so its state, state_dict and every update are torch's, bit for bit
    (tests/test_optim.py); step hooks still run. Whatever that call does not cover goes to torch's step(): the
    first step (it creates the state), a parameter without a gradient, a closure, mixed devices or dtypes, and
    the amsgrad, maximize, capturable, differentiable and tensor-lr options.
    """

    @torch.no_grad()
    def step(self, closure=None):
        calls = self._kernel_calls() if closure is None else None
        if calls is None:
            return super().step(closure)
        grad_scale = getattr(self, "grad_scale", None)  # set by clip_and_step, as GradScaler sets it
        for group, params, exp_avgs, exp_avg_sqs, steps in calls:
            beta1, beta2 = group["betas"]
            torch._foreach_add_(steps, 1)
            torch._fused_adamw_(params, [p.grad for p in params], exp_avgs, exp_avg_sqs, [], steps,
                                amsgrad=False, lr=group["lr"], beta1=beta1, beta2=beta2,
                                weight_decay=group["weight_decay"], eps=group["eps"], maximize=False,
                                grad_scale=grad_scale, found_inf=None)
        return None

    def _kernel_calls(self):
        """Per group: (group, params, exp_avgs, exp_avg_sqs, steps), or None where torch's step() is needed."""
        calls, device, dtype = [], None, None
        for group in self.param_groups:
            if (not group["fused"] or group["amsgrad"] or group["maximize"] or group["capturable"]
                    or group["differentiable"] or not isinstance(group["lr"], float)):
                return None
            params = group["params"]
            exp_avgs, exp_avg_sqs, steps = [], [], []
            for p in params:
                state = self.state.get(p)
                if p.grad is None or not state or p.grad.is_sparse:
                    return None
                if device is None:
                    device, dtype = p.device, p.dtype
                elif p.device != device or p.dtype != dtype:
                    return None
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])
                steps.append(state["step"])
            calls.append((group, params, exp_avgs, exp_avg_sqs, steps))
        return calls


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
