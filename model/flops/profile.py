"""Where a training step's time goes, per component: every aten op of forward, backward and the optimizer step
is timed (a TorchDispatchMode; on CUDA each op is synchronized, so its time is its own) and charged to the
component whose module is running (forward and full-backward module hooks), beside the component's exact
FLOPs from model/flops/formulas.py. What no component claims (Python, hooks, the timer itself, the residual
adds, the embedding) is the row "other", measured as the step's time minus the rest, so the rows add up to
the profiled step.

Inside the attention module the ops before the softmax are the scores (q @ kᵀ, scale, mask) and those after
it the values (att @ v); the backward runs the other way round. A fused kernel (scaled_dot_product_attention
on CPU or CUDA) does all three at once: its row is "attention_fused" (pass --attention=manual to split it).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from . import formulas
from ..config import GPTConfig, check
from ..gpt.gpt import GPT
from ..training.optim import adamw

COMPONENTS = ("qkv", "attn_scores", "softmax", "attn_values", "attention_fused", "attn_proj", "mlp_up", "gelu",
              "mlp_down", "layer_norm", "lm_head", "cross_entropy", "optimizer", "other")
# module-name suffix -> component; ".attn" (the attention module itself) is split by the softmax rule
MODULES = ((".attn.c_attn", "qkv"), (".attn.c_proj", "attn_proj"), (".mlp.c_fc", "mlp_up"),
           (".mlp.c_proj", "mlp_down"), (".mlp.gelu", "gelu"), ("lm_head", "lm_head"), (".ln_1", "layer_norm"),
           (".ln_2", "layer_norm"), ("ln_f", "layer_norm"), (".attn", "attention"))
FUSED = ("scaled_dot_product", "flash_attention", "efficient_attention", "cudnn_attention")
SOFTMAX_OPS = ("_softmax", "softmax", "_safe_softmax", "_softmax_backward_data")
CROSS_ENTROPY_OPS = ("_log_softmax", "_log_softmax_backward_data", "nll_loss_forward", "nll_loss_backward",
                     "nll_loss", "cross_entropy_loss", "nll_loss_nd")


def component_flops(cfg: GPTConfig, batch: int, seq_len: int, fused: bool) -> dict[str, int]:
    """Exact FLOPs of one training step per component: matmuls from train_step's matmul count, the other ops
    by the per-element conventions of formulas.py (forward + backward); the optimizer's are not model FLOPs
    (0). With fused attention, scores + softmax + values (+ the scale) are one row."""
    step = formulas.train_step(cfg, batch, seq_len)
    mm, nm = step.matmul, step.non_matmul

    def fwd_bwd(op: str) -> int:
        return nm.get(op, 0) + nm.get(f"{op}_backward", 0)

    rows = {"qkv": mm["qkv"], "attn_scores": mm["attn_scores"] + fwd_bwd("attn_scale"),
            "softmax": fwd_bwd("softmax"), "attn_values": mm["attn_values"], "attention_fused": 0,
            "attn_proj": mm["attn_proj"], "mlp_up": mm["mlp_up"], "gelu": fwd_bwd("gelu"),
            "mlp_down": mm["mlp_down"], "layer_norm": fwd_bwd("layer_norm"), "lm_head": mm["lm_head"],
            "cross_entropy": fwd_bwd("cross_entropy"), "optimizer": 0,
            "other": sum(fwd_bwd(op) for op in ("residual_add", "position_add", "bias_add", "embedding"))}
    if fused:
        rows["attention_fused"] = rows.pop("attn_scores") + rows.pop("softmax") + rows.pop("attn_values")
    else:
        del rows["attention_fused"]
    return rows


class _OpTimer(TorchDispatchMode):
    """Times every aten op and charges it to the component of the innermost module running."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.stack: list[str] = []
        self.phase = "forward"
        self.after_softmax = False
        self.seconds: dict[str, float] = {}
        self.fused = False

    def enter(self, component: str) -> None:
        if component == "attention":
            self.after_softmax = False
        self.stack.append(component)

    def component(self, op: str) -> str:
        if self.phase == "optimizer":
            return "optimizer"
        where = self.stack[-1] if self.stack else None
        if where is None:
            return "cross_entropy" if op in CROSS_ENTROPY_OPS else "other"
        if where != "attention":
            return where
        if any(name in op for name in FUSED):
            self.fused = True
            return "attention_fused"
        if op in SOFTMAX_OPS:
            self.after_softmax = True
            return "softmax"
        first, second = ("attn_scores", "attn_values") if self.phase == "forward" else ("attn_values", "attn_scores")
        return second if self.after_softmax else first

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.sync()
        start = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        self.sync()
        name = self.component(func.overloadpacket.__name__)
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
        return out


def _hook(model: GPT, timer: _OpTimer) -> list:
    """Forward and full-backward hooks that keep timer.stack on the component whose module is running."""
    def pop(*args) -> None:  # a hook that returned a value would replace the module's output
        timer.stack.pop()

    handles = []
    for name, module in model.named_modules():
        component = next((c for suffix, c in MODULES if name.endswith(suffix)), None)
        if component is None:
            continue
        push = (lambda c: lambda *a: timer.enter(c))(component)
        handles += [module.register_forward_pre_hook(push), module.register_forward_hook(pop),
                    module.register_full_backward_pre_hook(push), module.register_full_backward_hook(pop)]
    return handles


@dataclass
class _Run:
    model: GPT
    optimizer: torch.optim.Optimizer
    x: torch.Tensor
    device: torch.device

    def step(self, timer: _OpTimer | None = None) -> float:
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        if timer is not None:
            timer.phase = "forward"
        _, loss = self.model(self.x, self.x)  # (B, T) inputs; the targets' values do not change the cost
        if timer is not None:
            timer.phase = "backward"
        loss.backward()
        if timer is not None:
            timer.phase = "optimizer"
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        sync()
        return time.perf_counter() - start


def profile_step(cfg: GPTConfig, batch: int, seq_len: int, device: torch.device, peak, steps: int = 3,
                 warmup: int = 2) -> dict:
    """Profile `steps` training steps (forward, backward, clip + AdamW step) of GPT(cfg) on `device` after
    `warmup` plain ones. `peak` is a peaks.Peak (raised, with a message, if the step beats it).

    rows: component, flops, seconds (mean per profiled step), flops_per_s, flop_share, time_share; their
    seconds add up to step_seconds (the profiled step). mfu is the exact matmul FLOPs of the step over the
    median unprofiled step (the timer's per-op synchronisation and Python make the profiled step slower)."""
    for name, value in (("batch", batch), ("steps", steps)):
        check(name, value, int, 1)
    if not 0 < seq_len <= cfg.block_size:
        raise ValueError(f"seq_len must be in [1, block_size={cfg.block_size}], got {seq_len!r}")
    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    model.train()
    optimizer = adamw(model, 6e-4, 0.1, (0.9, 0.95), device.type)
    run = _Run(model, optimizer, torch.randint(0, cfg.vocab_size, (batch, seq_len), device=device), device)
    for _ in range(warmup):
        run.step()
    plain = sorted(run.step() for _ in range(steps))[steps // 2]
    timer = _OpTimer(device)
    handles = _hook(model, timer)
    try:
        with timer:
            step_seconds = sum(run.step(timer) for _ in range(steps)) / steps
    finally:
        for handle in handles:
            handle.remove()
    flops = component_flops(cfg, batch, seq_len, timer.fused)
    seconds = {c: timer.seconds.get(c, 0.0) / steps for c in flops if c != "other"}
    seconds["other"] = max(0.0, step_seconds - sum(seconds.values()))  # what no component claims
    model_flops = formulas.train_step_flops(cfg, batch, seq_len)
    mfu = peak.mfu(model_flops / plain)
    total_flops = sum(flops.values())
    rows = [{"component": c, "flops": flops[c], "seconds": seconds[c],
             "flops_per_s": flops[c] / seconds[c] if seconds[c] > 0 and flops[c] else None,
             "flop_share": flops[c] / total_flops, "time_share": seconds[c] / step_seconds} for c in flops]
    return {"device": str(device), "batch_size": batch, "seq_len": seq_len, "steps": steps, "rows": rows,
            "step_seconds": step_seconds, "unprofiled_step_seconds": plain, "model_flops": model_flops,
            "all_flops": total_flops, "flops_per_s": model_flops / plain, "mfu": mfu, "peak_flops": peak.flops,
            "peak_source": peak.source, "peak_messages": list(peak.messages),
            "attention": "fused kernel" if timer.fused else "separate ops"}
