"""Measured bytes, `unfused` convention: a TorchDispatchMode that sees every aten op the model runs (forward,
backward and optimizer step, as FlopCounterMode sees them) and counts, per op,

    reads  = the bytes of each tensor argument (numel x element size, each tensor once per op)
    writes = the bytes of each tensor the op returns or mutates in place (each tensor once per op)

Zero bytes: ops that return views (view, transpose, slice, split, expand, t, detach, alias, ...: the schema
says the output aliases an input and nothing is written) and metadata or allocation ops (`_unsafe_view`, which
only rewraps a fresh result; empty, empty_like, empty_strided, new_empty_strided: uninitialized memory). One
exception to "every input is read": the destination of copy_, fill_ and zero_ is written, not read; the
tensor that zeros_like, ones_like, ... take for its shape is not read; and a gather (embedding) reads the rows
it gathers and its indices, not its whole table.
Nothing here knows about caches or fusion: this is the traffic if nothing stayed in cache and every op were a
kernel of its own (model/flops/bytes.py's formulas give the same integers analytically).
"""
from __future__ import annotations

from collections import Counter

import torch
from torch.utils._pytree import tree_flatten
from torch.utils._python_dispatch import TorchDispatchMode

FREE_OPS = frozenset({"_unsafe_view", "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided",
                      "empty_permuted", "lift_fresh", "_local_scalar_dense", "set_", "resize_"})
WRITE_ONLY = frozenset({"copy_", "fill_", "zero_", "_foreach_zero_"})  # their destination is not read
# factories that take a tensor for its shape and dtype only: nothing read
LIKE_OPS = frozenset({"zeros_like", "ones_like", "full_like", "rand_like", "randn_like", "randint_like"})
GATHERS = frozenset({"embedding"})  # reads the rows it gathers (as many bytes as it writes), not its table


def _tensors(values) -> list[torch.Tensor]:
    """Distinct tensors among (nested) values, in order: one tensor passed twice is read once."""
    seen, out = set(), []
    for v in tree_flatten(values)[0]:
        if isinstance(v, torch.Tensor) and id(v) not in seen:
            seen.add(id(v))
            out.append(v)
    return out


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _mutated(func, args, kwargs) -> list:
    """The arguments the schema marks as written (Tensor(a!)): in-place self, out=, foreach lists."""
    out = []
    for i, arg in enumerate(func._schema.arguments):
        info = arg.alias_info
        if info is None or not info.is_write:
            continue
        value = kwargs.get(arg.name) if arg.kwarg_only or i >= len(args) else args[i]
        if value is not None:
            out.append(value)
    return out


def op_bytes(func, args, kwargs, result) -> tuple[int, int]:
    """(read, written) bytes of one aten op under the unfused convention."""
    name = func.overloadpacket.__name__
    if func.is_view or name in FREE_OPS or func.namespace == "prim":  # prim::device, prim::layout: metadata
        return 0, 0
    mutated = _tensors(_mutated(func, args, kwargs))
    written = _tensors((result, mutated))
    if name in LIKE_OPS:
        return 0, sum(map(_nbytes, written))
    if name in GATHERS:  # embedding(weight, indices): the gathered rows and the indices
        return _nbytes(result) + _nbytes(args[1]), _nbytes(result)
    read = _tensors((args, kwargs))
    if name in WRITE_ONLY:
        skip = {id(t) for t in mutated}
        read = [t for t in read if id(t) not in skip]
    return sum(map(_nbytes, read)), sum(map(_nbytes, written))


class ByteCounterMode(TorchDispatchMode):
    """Counts the unfused bytes of every aten op run inside it: `total`, `read`, `written`, `by_op`, and
    `by_component`: op bytes charged to tracker.component(op name) when a tracker is given (profile.py's, which
    follows the module running), else to `self.component`, which callers may set as the step goes on."""

    def __init__(self, tracker=None):
        super().__init__()
        self.tracker = tracker
        self.read = 0
        self.written = 0
        self.by_op: Counter = Counter()
        self.by_component: Counter = Counter()
        self.component = "other"
        self.log: list | None = None  # set to [] to record (op, component, read, written)

    @property
    def total(self) -> int:
        return self.read + self.written

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        r, w = op_bytes(func, args, kwargs, result)
        if r or w:
            self.read += r
            self.written += w
            self.by_op[func.overloadpacket.__name__] += r + w
            name = func.overloadpacket.__name__
            component = self.component if self.tracker is None else self.tracker.component(name)
            self.by_component[component] += r + w
            if self.log is not None:
                self.log.append((name, component, r, w))
        return result


def count_forward(model, idx, past: int = 0, last_only: bool = False, tracker=None):
    """ByteCounterMode over one no-grad forward call of `model` on idx (B, T), after a cache of `past`
    positions (filled before counting). Returns the counter."""
    from .profile import _hook
    was = model.training
    model.eval()
    cache = None
    handles = _hook(model, tracker) if tracker is not None else []
    try:
        with torch.no_grad():
            if past:
                cache = model.new_cache(idx.size(0), past + idx.size(1))
                model(torch.zeros(idx.size(0), past, dtype=torch.long, device=idx.device), kv_cache=cache)
            counter = ByteCounterMode(tracker)
            with counter:
                model(idx, kv_cache=cache, last_only=last_only)
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    return counter


def count_train_step(model, idx, optimizer, clip: float = 1.0, tracker=None):
    """ByteCounterMode over one training step as train.py runs it (forward with targets = idx, loss / 1,
    backward, clip_and_step, zero_grad), after one uncounted step that creates the optimizer state."""
    from ..training.optim import clip_and_step
    from .profile import _hook

    fake = _is_fake(idx)

    def step(phase=lambda p: None):
        phase("forward")
        _, loss = model(idx, idx)
        phase("backward")
        (loss / 1).backward()
        phase("optimizer")
        if fake and clip > 0:  # clip_grad_norm_ takes its per-tensor path on fake tensors: its foreach one here
            _clip_foreach(optimizer, clip)
            optimizer.step()
        else:
            clip_and_step(optimizer, clip)
        optimizer.zero_grad(set_to_none=True)

    was = model.training
    model.train()
    step()
    handles = _hook(model, tracker) if tracker is not None else []
    counter = ByteCounterMode(tracker)
    try:
        with counter:
            step(lambda p: setattr(tracker, "phase", p) if tracker is not None else None)
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    return counter


def _is_fake(t: torch.Tensor) -> bool:
    return type(t).__name__ == "FakeTensor"


def _clip_foreach(optimizer, max_norm: float) -> None:
    """torch.nn.utils.clip_grad_norm_'s foreach path on CPU tensors, op for op (norms, their norm, the
    clamped coefficient, one foreach multiply), for fake tensors, where torch would loop over the tensors."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0)), 2.0)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    torch._foreach_mul_(grads, coef)


def fake_model(cfg, dtype=torch.float32):
    """(GPT(cfg) with fake CPU tensors in `dtype`, its FakeTensorMode): shapes, strides and CPU kernels'
    choices without memory or arithmetic, so GPT-2-sized steps are counted in seconds. Run the count inside
    `with mode:`; tests check that it equals the count on real tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from ..gpt.gpt import GPT
    mode = FakeTensorMode()
    with mode:
        model = GPT(cfg)
        for module in model.modules():  # Module.to cannot swap fake parameters: convert in place
            for p in module._parameters.values():
                if p is not None and p.dtype != dtype:
                    p.data = p.data.to(dtype)
            for key, b in module._buffers.items():
                if b is not None and b.is_floating_point():
                    module._buffers[key] = b.to(dtype)
    return model, mode


def count_steps(cfg, batch: int, seq_len: int, context: int, dtype) -> dict[str, dict[str, int]]:
    """Counted unfused bytes per component of a forward pass (batch x seq_len, logits on every position), a
    training step (the same tokens) and a decode step (batch rows, `context` keys), on fake CPU tensors."""
    from ..training.optim import adamw
    from .profile import _OpTimer
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    model, mode = fake_model(cfg, dtype)
    out = {}
    with mode:
        idx = torch.zeros(batch, seq_len, dtype=torch.long)
        tracker = _OpTimer(torch.device("cpu"))
        out["forward"] = count_forward(model, idx, tracker=tracker).by_component
        tracker = _OpTimer(torch.device("cpu"))
        out["decode_step"] = count_forward(model, torch.zeros(batch, 1, dtype=torch.long), past=context - 1,
                                           last_only=True, tracker=tracker).by_component
        tracker = _OpTimer(torch.device("cpu"))
        optimizer = adamw(model, 1e-3, 0.1, (0.9, 0.95), "cpu")
        out["train_step"] = count_train_step(model, idx, optimizer, 1.0, tracker=tracker).by_component
    return {step: {k: v for k, v in parts.items() if v} for step, parts in out.items()}
