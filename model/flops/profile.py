"""Where a training step's time goes, per component: every aten op of forward, backward and the optimizer step
is timed (a TorchDispatchMode; on CUDA each op is synchronized, so its time is its own) and charged to the
component whose module is running (forward and full-backward module hooks), beside the component's exact
FLOPs (model/flops/formulas.py) and exact unfused bytes (model/flops/bytes.py). What no component claims (the
residual adds, the embedding, Python) is the row "other": the step's time, less the timer's own cost, minus
the rest, so the rows add up to the profiled step less the timer's cost.

The timer's cost (Python dispatch of every op, the hooks) does not depend on the tensors' sizes, only on the
ops run, so it is measured on the same model at batch 1 x 2 tokens (the same ops, negligible arithmetic):
profiled minus unprofiled step there. The profile subtracts it from the profiled step and reports both.

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
                     "nll_loss", "cross_entropy_loss", "nll_loss_nd", "_to_copy")  # _to_copy: logits.float()


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
        if op == "copy_":  # the only copy_ in the attention module: new keys and values into the cache
            return "kv_cache"
        if self.fused or any(name in op for name in FUSED):  # everything of a fused attention module
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
    timer.fused = any(getattr(m, "flash", False) for m in model.modules())  # SDPA: attention is one row
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
        (loss / 1).backward()  # as train.py: loss / grad_accum
        if timer is not None:
            timer.phase = "optimizer"
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        sync()
        return time.perf_counter() - start


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def _timed(run: _Run, model: GPT, device: torch.device, steps: int) -> tuple[float, _OpTimer]:
    """Median wall time of `steps` profiled steps and the timer that charged their ops."""
    timer = _OpTimer(device)
    handles = _hook(model, timer)
    try:
        with timer:
            times = [run.step(timer) for _ in range(steps)]
    finally:
        for handle in handles:
            handle.remove()
    return _median(times), timer


def timer_cost(model: GPT, optimizer, device: torch.device, steps: int) -> float:
    """The per-step cost of the op timer and its hooks: profiled minus unprofiled step time of `model` on a
    batch of 1 x 2 tokens, which runs the same ops as any other shape (medians of `steps` each)."""
    x = torch.zeros(1, min(2, model.config.block_size), dtype=torch.long, device=device)
    run = _Run(model, optimizer, x, device)
    run.step()
    plain = _median([run.step() for _ in range(steps)])
    return max(0.0, _timed(run, model, device, steps)[0] - plain)


def profile_step(cfg: GPTConfig, batch: int, seq_len: int, device: torch.device, peak, steps: int = 5,
                 warmup: int = 2, bandwidth=None) -> dict:
    """Profile `steps` training steps (forward, backward, clip + AdamW step) of GPT(cfg) on `device` after
    `warmup` plain ones. `peak` is a peaks.Peak (raised, with a message, if the step beats it).

    rows: component, flops, bytes (unfused), intensity, seconds (per profiled step), flops_per_s, bytes_per_s,
    roof (the one its intensity sits under, with `bandwidth`, a B/s peaks.Peak), flop_share, time_share; their
    seconds add up to step_seconds: the median profiled step less timer_seconds (the timer's measured cost;
    the raw figure is profiled_step_seconds). mfu is the exact matmul FLOPs over the median unprofiled step."""
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
    # unprofiled and profiled steps interleaved in rounds, so a busy moment of the machine hits both alike
    plain, profiled, timers = [], [], []
    for _ in range(steps):
        plain.append(run.step())
        seconds, timer = _timed(run, model, device, 1)
        profiled.append(seconds)
        timers.append(timer)
    plain, profiled_seconds = _median(plain), _median(profiled)
    timer = timers[profiled.index(profiled_seconds)]  # the median profiled step's own op times
    cost = timer_cost(model, optimizer, device, steps)
    # never below what the components' own ops took: the cost is measured on another, noisier, step
    step_seconds = max(profiled_seconds - cost, sum(timer.seconds.values()), 1e-9)
    rows = _rows(cfg, batch, seq_len, timer, step_seconds, peak, bandwidth)
    model_flops = formulas.train_step_flops(cfg, batch, seq_len)
    mfu = peak.mfu(model_flops / plain)
    return {"device": str(device), "batch_size": batch, "seq_len": seq_len, "steps": steps, "rows": rows,
            "step_seconds": step_seconds, "profiled_step_seconds": profiled_seconds, "timer_seconds": cost,
            "unprofiled_step_seconds": plain, "overhead": step_seconds / plain, "model_flops": model_flops,
            "all_flops": sum(r["flops"] for r in rows), "flops_per_s": model_flops / plain, "mfu": mfu,
            "peak_flops": peak.flops, "peak_source": peak.source, "peak_messages": list(peak.messages),
            "bandwidth": bandwidth.flops if bandwidth else None,
            "bandwidth_source": bandwidth.source if bandwidth else None,
            "attention": "fused kernel" if timer.fused else "separate ops"}


def _rows(cfg: GPTConfig, batch: int, seq_len: int, timer: _OpTimer, step_seconds: float, peak,
          bandwidth) -> list[dict]:
    """One row per component: FLOPs, unfused bytes (None with dropout > 0, which the formulas do not cover),
    intensity, time, rates and the roof it sits under (against peak / bandwidth)."""
    from .bytes import unfused_train_step
    flops = component_flops(cfg, batch, seq_len, timer.fused)
    seconds = {c: timer.seconds.get(c, 0.0) for c in flops if c != "other"}
    seconds["other"] = max(0.0, step_seconds - sum(seconds.values()))  # what no component claims
    parts = None if cfg.dropout else unfused_train_step(cfg, batch, seq_len, "float32")  # the profile runs fp32
    if parts is not None and timer.fused:
        parts["attention_fused"] = sum(parts.pop(k, 0) for k in ("attn_scores", "softmax", "attn_values",
                                                                 "attention_fused"))
    ridge = peak.flops / bandwidth.flops if bandwidth else None
    total = sum(flops.values())
    rows = []
    for c in flops:
        b = None if parts is None else parts.get(c, 0)
        intensity = flops[c] / b if b else None
        rows.append({"component": c, "flops": flops[c], "bytes": b, "intensity": intensity, "seconds": seconds[c],
                     "flops_per_s": flops[c] / seconds[c] if seconds[c] > 0 and flops[c] else None,
                     "bytes_per_s": b / seconds[c] if b and seconds[c] > 0 else None,
                     "roof": None if intensity is None or ridge is None else
                     ("memory" if intensity < ridge else "compute"),
                     "flop_share": flops[c] / total, "time_share": seconds[c] / step_seconds})
    return rows


def render_profile(r: dict) -> str:
    """profile_step's result (with flops.py's model and threads) as the --profile table."""
    def num(x, scale=1e9, fmt=",.1f"):
        return "—" if x is None else format(x / scale, fmt)

    lines = [f"profile: {r['model']} on {r['device']}, batch {r['batch_size']} x seq_len {r['seq_len']}, median of {r['steps']} "
             f"profiled training steps (forward + backward + clip + AdamW); attention: {r['attention']}; "
             f"{r['threads']}",
             f"{'component':<17}{'FLOPs':>16}{'MB':>10}{'FLOP/B':>8}{'ms':>9}{'GFLOP/s':>9}{'GB/s':>8}{'roof':>8}"
             f"{'FLOPs %':>9}{'time %':>8}"]
    for row in r["rows"]:
        lines.append(f"{row['component']:<17}{row['flops']:>16,}{num(row['bytes'], 1e6, ',.2f'):>10}"
                     f"{num(row['intensity'], 1, '.3g'):>8}{row['seconds'] * 1e3:>9.2f}{num(row['flops_per_s']):>9}"
                     f"{num(row['bytes_per_s']):>8}{row['roof'] or '—':>8}{row['flop_share']:>9.1%}"
                     f"{row['time_share']:>8.1%}")
    lines += [f"{'step':<17}{r['all_flops']:>16,}{'':>27}{r['step_seconds'] * 1e3:>9.2f}",
              f"profiled step {r['profiled_step_seconds'] * 1e3:.2f} ms, less the timer's cost "
              f"{r['timer_seconds'] * 1e3:.2f} ms (measured at batch 1 x 2, same ops) = {r['step_seconds'] * 1e3:.2f} "
              f"ms = {r['overhead']:.2f}x the unprofiled step",
              f"roof: memory or compute, the component's intensity (unfused bytes) against the ridge "
              f"{r['peak_flops'] / r['bandwidth']:.3g} FLOP/B of {r['bandwidth'] / 1e9:,.1f} GB/s "
              f"({r['bandwidth_source']})" if r["bandwidth"] else "roof: no bandwidth known for this device",
              f"unprofiled step {r['unprofiled_step_seconds'] * 1e3:.2f} ms: {r['model_flops']:,} matmul FLOPs "
              f"(the MFU count) at {r['flops_per_s'] / 1e9:,.1f} GFLOP/s = MFU {r['mfu']:.1%} of "
              f"{r['peak_flops'] / 1e9:,.1f} GFLOP/s ({r['peak_source']})",
              "FLOPs of non-matmul rows follow formulas.py's per-element conventions; 'other' is the step time no "
              "component claims (residual adds, embedding, Python)"]
    return "\n".join(lines + r["peak_messages"])
