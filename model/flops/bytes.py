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
