"""Analytic byte counts of the model in model/gpt/gpt.py, as pure functions of (config, batch, lengths, dtype).

Two conventions (docs/flops.md, "Roofline"):
- `minimum`: the bytes no implementation can avoid moving between memory and the chip in one step: every
  parameter the step needs read once, the KV cache read once and the new keys and values written once, the
  inputs read and the outputs written. The denominator of MBU (model bandwidth utilization), as gpt-fast
  (Meta, 2023: "bandwidth achieved" = model size x tokens/s) and Databricks' MBU definition (Agrawal et al.
  2023, "LLM Inference Performance Engineering": (model bytes + KV cache bytes) / time / peak bandwidth) use it.
- `unfused`: every aten op reads each of its tensor inputs and writes each of its tensor outputs once.
"""
from __future__ import annotations

import torch

from ..config import GPTConfig, check
from .formulas import params_total

INDEX_BYTES = 8  # token ids are int64
LOGIT_BYTES = 4  # logits handed to sampling are counted as fp32, whatever the model's dtype


def element_size(dtype) -> int:
    """Bytes per element of a torch dtype or its name ("float32", "bfloat16", ...)."""
    if isinstance(dtype, str):
        name = dtype
        dtype = getattr(torch, dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"dtype must be a torch dtype or its name (float32, bfloat16, ...), got {name!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch dtype or its name, got {dtype!r}")
    return dtype.itemsize


def decode_minimum_bytes(config: GPTConfig, batch_size: int, context: int, dtype) -> dict[str, int]:
    """Minimum bytes of one cached decode step -> {"weights", "kv_cache", "other", "total"}.

    The step feeds one new token per row at position context-1, after context-1 cached positions, so each
    row attends over `context` keys (1 <= context <= block_size). Convention (gpt-fast, and the MBU of
    Agrawal et al. 2023): what a perfect kernel must move between memory and the chip, e the bytes per
    element of `dtype` (the weights' and the cache's dtype):
    - weights: every parameter the step needs, read once per step whatever the batch size: all of them, the
      tied wte/lm_head matrix once (the head reads all V·d of it; the B looked-up rows are part of it), and
      of the position table only the one row this step reads (wpe with learned positions, the fixed
      sinusoidal table otherwise, both d elements). (params_total - wpe + d)·e.
    - kv_cache: the context-1 cached keys and values of every layer and row read once, and the new key and
      value written once: 2·L·B·(context-1)·d·e + 2·L·B·d·e = 2·L·B·context·d·e.
    - other: the B input ids read (int64, 8 bytes) and the B·V logits written (counted as fp32, 4 bytes).
    """
    if not isinstance(config, GPTConfig):
        raise ValueError(f"config must be a GPTConfig, got {type(config).__name__}")
    check("batch_size", batch_size, int, 1)
    check("context", context, int, 1, config.block_size)
    e = element_size(dtype)
    d, L, B = config.n_embd, config.n_layer, batch_size
    wpe = config.block_size * d if config.pos_encoding == "learned" else 0
    weights = (params_total(config) - wpe + d) * e
    kv_cache = 2 * L * B * context * d * e
    other = B * INDEX_BYTES + B * config.vocab_size * LOGIT_BYTES
    return {"weights": weights, "kv_cache": kv_cache, "other": other, "total": weights + kv_cache + other}


# ----------------------------------------------------------------------------------------------------
# `unfused`: every aten op's tensor inputs read and tensor outputs written once (model/flops/byte_counter.py
# counts exactly this). Each formula below is one op of the model, in the order it runs, with its read and
# written elements; the components are those of the profile (model/flops/profile.py) plus the KV cache.

def _ln_count(cfg: GPTConfig) -> int:
    return 2 * cfg.n_layer + 1


def _linears(cfg: GPTConfig) -> tuple[tuple[str, int, int], ...]:
    """(component, in, out) of the four Linear layers of a block."""
    d = cfg.n_embd
    return (("qkv", d, 3 * d), ("attn_proj", d, d), ("mlp_up", d, 4 * d), ("mlp_down", 4 * d, d))


class _Tally:
    """Bytes per component, added op by op (elements x bytes per element)."""

    def __init__(self):
        self.parts: dict[str, int] = {}

    def add(self, component: str, nbytes: int) -> None:
        self.parts[component] = self.parts.get(component, 0) + nbytes


def _forward_ops(t: _Tally, cfg: GPTConfig, B: int, T: int, past: int, e: int, last_only: bool,
                 loss: bool) -> None:
    """The forward call's ops: B rows of T new tokens after `past` cached positions (S = past + T keys)."""
    d, L, V, nh = cfg.n_embd, cfg.n_layer, cfg.vocab_size, cfg.n_head
    N, S, b = B * T, past + T, int(cfg.bias)
    # embedding: wte gather (ids + rows read, rows written); arange writes T positions; wpe gather; the add
    t.add("other", (N * 8 + 2 * N * d * e))
    if cfg.pos_encoding == "learned":
        t.add("other", T * 8 + T * 8 + 2 * T * d * e)
    t.add("other", (N * d + T * d + N * d) * e)
    # layer norms: x, weight (+ bias) read; y, mean and rstd written
    t.add("layer_norm", _ln_count(cfg) * ((N * d + d + b * d) + (N * d + 2 * N)) * e)
    for comp, k, n in _linears(cfg):  # addmm (bias, x, W) or mm (x, W); y written
        t.add(comp, L * (b * n + N * k + k * n + N * n) * e)
    t.add("gelu", L * 2 * 4 * N * d * e)  # (N, 4d) read and written
    t.add("other", L * 2 * 3 * N * d * e)  # two residual adds per block: 2 read, 1 written
    _attention_forward(t, cfg, B, T, past, e)
    rows = B if last_only else N
    t.add("lm_head", (rows * d + V * d + rows * V) * e)
    if loss:
        if e != 4:  # logits.float(): a cast to fp32
            t.add("cross_entropy", rows * V * (e + 4))
        # log_softmax (logits read, written); nll_loss (log-probs, targets read; loss, total weight written)
        t.add("cross_entropy", 2 * rows * V * 4 + rows * V * 4 + rows * 8 + 2 * 4)


def _attention_forward(t: _Tally, cfg: GPTConfig, B: int, T: int, past: int, e: int) -> None:
    d, L, nh = cfg.n_embd, cfg.n_layer, cfg.n_head
    N, S = B * T, past + T
    scores = B * nh * T * S
    if past:  # the cache update: k and v copied into the cache (source read, destination written)
        t.add("kv_cache", L * 2 * 2 * N * d * e)
    fused = cfg.attention == "sdpa"
    if T > 1:  # the causal mask: ones (written), tril (read, written), 1 byte per entry
        t.add("attention_fused" if fused else "attn_scores", L * 3 * T * S)
    if fused:
        # q, k, v read; the output and the fp32 log-sum-exp per query written
        t.add("attention_fused", L * ((N * d + 2 * B * S * d + N * d) * e + B * nh * T * 4))
        return
    merge = B > 1 and nh > 1  # (B, nh, ., .) views of q and kᵀ cannot merge into one batch dim: a copy each
    if merge:
        t.add("attn_scores", L * 2 * (N * d + (B * S * d if past == 0 else 0)) * e)
    t.add("attn_scores", L * (N * d + B * S * d + scores) * e)  # q @ kᵀ: bmm
    t.add("attn_scores", L * 2 * scores * e)  # the scale: mul
    if T > 1:  # ~mask (read, written), masked_fill_ (scores and mask read, scores written)
        t.add("attn_scores", L * (2 * T * S + T * S + 2 * scores * e))
    t.add("softmax", L * 2 * scores * e)
    if merge and past == 0:  # v copied for the batched matmul
        t.add("attn_values", L * 2 * B * S * d * e)
    t.add("attn_values", L * (scores + B * S * d + N * d) * e)  # att @ v: bmm
    if nh > 1 and T > 1:  # y.transpose(1, 2).contiguous()
        t.add("attn_values", L * 2 * N * d * e)


def unfused_forward(cfg: GPTConfig, batch: int, seq_len: int, dtype, *, last_only: bool = False) -> dict[str, int]:
    """Unfused bytes of one forward call over (batch, seq_len) tokens, no cache, per component."""
    _check_shape(cfg, batch, seq_len, 0)
    t = _Tally()
    _forward_ops(t, cfg, batch, seq_len, 0, element_size(dtype), last_only, loss=False)
    return t.parts


def unfused_decode(cfg: GPTConfig, batch_size: int, context: int, dtype) -> dict[str, int]:
    """Unfused bytes of one cached decode step (one token per row attending over `context` keys), per component."""
    check("context", context, int, 1, cfg.block_size)
    _check_shape(cfg, batch_size, 1, context - 1)
    t = _Tally()
    _forward_ops(t, cfg, batch_size, 1, context - 1, element_size(dtype), True, loss=False)
    return t.parts


def _check_shape(cfg: GPTConfig, batch: int, seq_len: int, past: int) -> None:
    if not isinstance(cfg, GPTConfig):
        raise ValueError(f"config must be a GPTConfig, got {type(cfg).__name__}")
    check("batch", batch, int, 1)
    check("seq_len", seq_len, int, 1)
    if past + seq_len > cfg.block_size:
        raise ValueError(f"{past + seq_len} positions exceed block_size={cfg.block_size}")


def _backward_ops(t: _Tally, cfg: GPTConfig, B: int, T: int, e: int) -> None:
    """The backward of a training forward (no cache, loss over every position), op by op."""
    d, L, V, nh = cfg.n_embd, cfg.n_layer, cfg.vocab_size, cfg.n_head
    N, S, b = B * T, T, int(cfg.bias)
    scores = B * nh * T * S
    t.add("other", 4 + 2 * 4)  # the seed gradient (ones_like, written) and the division by grad_accum's
    # nll_loss_backward (grad, log-probs, targets, total weight read; grad written); log_softmax's backward
    t.add("cross_entropy", (4 + N * V * 4 + N * 8 + 4 + N * V * 4) + 3 * N * V * 4)
    if e != 4:
        t.add("cross_entropy", N * V * (4 + e))  # the fp32 cast's backward
    t.add("lm_head", (2 * N * V + N * d + V * d + V * d + N * d) * e)  # dW = gᵀx, dX = g W
    # layer norm backward: grad, x, mean, rstd, weight (+ bias) read; dx, dweight (+ dbias) written
    t.add("layer_norm", _ln_count(cfg) * ((2 * N * d + 2 * N + d + b * d) + (N * d + d + b * d)) * e)
    for comp, k, n in _linears(cfg):  # dX = g Wᵀ, dW = gᵀ x, db = sum(g)
        t.add(comp, L * ((N * n + k * n + N * k) + (N * n + N * k + k * n) + b * (N * n + n)) * e)
    t.add("gelu", L * 3 * 4 * N * d * e)  # grad and input read, grad written
    t.add("other", L * 2 * 3 * N * d * e)  # each residual branch's gradient summed with the skip's
    _attention_backward(t, cfg, B, T, e)
    # embedding: wpe's gradient summed over the batch, then scattered; wte's scattered; the tied head's added
    if cfg.pos_encoding == "learned":
        t.add("other", (N * d + T * d) * e + (T * d * e + T * 8 + cfg.block_size * d * e))
    t.add("other", (N * d * e + N * 8 + V * d * e) + 3 * V * d * e)


def _attention_backward(t: _Tally, cfg: GPTConfig, B: int, T: int, e: int) -> None:
    d, L, nh = cfg.n_embd, cfg.n_layer, cfg.n_head
    N, S = B * T, T
    scores = B * nh * T * S
    if cfg.attention == "sdpa":
        # grad, q, k, v, output and log-sum-exp read; dq, dk, dv written; split's backward: cat of the three
        t.add("attention_fused", L * ((5 * N * d) * e + B * nh * T * 4 + 3 * N * d * e + 6 * N * d * e))
        return
    if B > 1 and nh > 1 and T > 1:
        t.add("attn_values", L * 2 * N * d * e)
    t.add("attn_values", L * ((scores + 2 * N * d) + (2 * N * d + scores)) * e)  # dv = attᵀ g, datt = g vᵀ
    t.add("softmax", L * 3 * scores * e)
    if T > 1:  # masked_fill's backward: grad and mask read, grad written
        t.add("attn_scores", L * (2 * scores * e + T * S))
    t.add("attn_scores", L * 2 * scores * e)  # the scale's backward
    t.add("attn_scores", L * 2 * (scores + 2 * N * d) * e)  # dq = g k, dkᵀ = qᵀ g
    if nh > 1 and T > 1 and cfg.head_dim > 1:  # dq, dk back to (B, T, C): (nh, hs) views cannot merge
        t.add("attn_scores", L * 2 * 2 * N * d * e)
    t.add("attn_scores", L * 6 * N * d * e)  # split's backward: cat of dq, dk, dv


def param_tensors(cfg: GPTConfig) -> int:
    """Parameter tensors (the tied head once): wte, wpe, 6 weights (+ 6 biases) per block, ln_f (+ bias)."""
    b = int(cfg.bias)
    return 1 + int(cfg.pos_encoding == "learned") + cfg.n_layer * 6 * (1 + b) + 1 + b


def _optimizer_ops(t: _Tally, cfg: GPTConfig, e: int, clip: bool) -> None:
    """clip_grad_norm_ (foreach norms, their norm, the clip coefficient, the foreach scaling) and the fused
    AdamW step of each parameter group (its fp32 step counters advanced, then params, grads, exp_avg and
    exp_avg_sq read and written: the kernel's schema marks the grads written too)."""
    P, n = params_total(cfg), param_tensors(cfg)
    if clip:
        t.add("optimizer", (P + n) * e + 2 * n * e + (n + 1) * e + 4 * 2 * e + (P + 1 + P) * e)
    t.add("optimizer", 2 * n * 4 + n * 4 + 8 * P * e)


def unfused_train_step(cfg: GPTConfig, batch: int, seq_len: int, dtype, *, clip: bool = True) -> dict[str, int]:
    """Unfused bytes of one training step per component: forward with the loss, loss / grad_accum, backward,
    clip_grad_norm_ (clip=True) and the fused AdamW step, all in `dtype` (the parameters' dtype; the loss in
    fp32), with the optimizer state already there (every step after the first). Dropout must be 0."""
    _check_shape(cfg, batch, seq_len, 0)
    if cfg.dropout:
        raise ValueError(f"the unfused training-step bytes are exact for dropout=0 only, got dropout={cfg.dropout}")
    e = element_size(dtype)
    t = _Tally()
    _forward_ops(t, cfg, batch, seq_len, 0, e, False, loss=True)
    t.add("other", 2 * 4)  # loss / grad_accum
    _backward_ops(t, cfg, batch, seq_len, e)
    _optimizer_ops(t, cfg, e, clip)
    return t.parts


# ----------------------------------------------------------------------------------------------------
# `minimum` for the forward pass and the training step (decode_minimum_bytes above for decoding)

def forward_minimum_bytes(config: GPTConfig, batch_size: int, seq_len: int, dtype, last_only: bool = False
                          ) -> dict[str, int]:
    """Minimum bytes of one forward pass over (batch_size, seq_len) tokens -> {"weights", "other", "total"}.

    weights: every parameter read once, the tied wte/lm_head once, seq_len rows of the position table
    ((params_total - wpe + seq_len·d)·e). other: the B·T input ids (int64) read and the B·T·V logits written
    (B·V with last_only; fp32, as for decoding). Activations stay on chip in a perfect kernel: 0.
    """
    _check_shape(config, batch_size, seq_len, 0)
    e, d = element_size(dtype), config.n_embd
    wpe = config.block_size * d if config.pos_encoding == "learned" else 0
    weights = (params_total(config) - wpe + seq_len * d) * e
    tokens = batch_size * seq_len
    other = tokens * INDEX_BYTES + (batch_size if last_only else tokens) * config.vocab_size * LOGIT_BYTES
    return {"weights": weights, "other": other, "total": weights + other}


def train_minimum_bytes(config: GPTConfig, batch_size: int, seq_len: int, dtype, grad_accum: int = 1
                        ) -> dict[str, int]:
    """Minimum bytes of one optimizer step of grad_accum micro-batches -> {"weights", "optimizer_state",
    "other", "total"}.

    weights: every parameter (all of wpe: the optimizer updates it whole) read once per micro-batch and
    written once by the update, (grad_accum + 1)·P·e. optimizer_state: AdamW's exp_avg and exp_avg_sq (in
    the parameters' dtype, as torch keeps them) read and written once: 4·P·e. other: the input ids and the
    targets (int64) of every micro-batch read and the fp32 loss written. Gradients and activations never
    leave the chip in a perfect kernel: 0. `dtype` is the parameters' dtype (fp32 under bf16 autocast).
    """
    _check_shape(config, batch_size, seq_len, 0)
    check("grad_accum", grad_accum, int, 1)
    e, P = element_size(dtype), params_total(config)
    weights = (grad_accum + 1) * P * e
    state = 4 * P * e
    other = grad_accum * 2 * batch_size * seq_len * INDEX_BYTES + 4
    return {"weights": weights, "optimizer_state": state, "other": other, "total": weights + state + other}


# ----------------------------------------------------------------------------------------------------
# The report of flops.py: analytic and counted, both conventions

def bytes_report(cfg: GPTConfig, batch: int, seq_len: int, context: int, dtype) -> dict:
    """flops.py's `bytes` section: for forward (batch x seq_len), train_step (the same, clip + AdamW) and
    decode_step (batch rows, `context` keys): {"unfused": {"analytic", "counted", "components"}, "minimum",
    "dtype"}; decode_step also gives its minimum's parts and its batch and context."""
    from .byte_counter import count_steps
    check("context", context, int, 1, cfg.block_size)
    name = str(dtype).replace("torch.", "")
    element_size(dtype)
    counted = count_steps(cfg, batch, seq_len, context, dtype)
    train_analytic = None
    if not cfg.dropout:
        train_analytic = unfused_train_step(cfg, batch, seq_len, dtype)
    analytic = {"forward": unfused_forward(cfg, batch, seq_len, dtype), "train_step": train_analytic,
                "decode_step": unfused_decode(cfg, batch, context, dtype)}
    minimum = {"forward": forward_minimum_bytes(cfg, batch, seq_len, dtype),
               "train_step": train_minimum_bytes(cfg, batch, seq_len, dtype),
               "decode_step": decode_minimum_bytes(cfg, batch, context, dtype)}
    out = {}
    for step, parts in analytic.items():
        comps = parts if parts is not None else counted[step]
        out[step] = {"unfused": {"analytic": None if parts is None else sum(parts.values()),
                                 "counted": sum(counted[step].values()),
                                 "components": {k: {"analytic": None if parts is None else parts.get(k, 0),
                                                    "counted": counted[step].get(k, 0)} for k in comps}},
                     "minimum": minimum[step]["total"], "dtype": name}
        if parts is None:
            out[step]["unfused"]["note"] = "dropout > 0: the analytic formulas cover dropout=0 only"
    out["decode_step"].update(minimum_components={k: v for k, v in minimum["decode_step"].items() if k != "total"},
                              batch_size=batch, context=context)
    out["train_step"]["minimum_components"] = {k: v for k, v in minimum["train_step"].items() if k != "total"}
    return out
