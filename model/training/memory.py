"""Memory a config needs, estimated before anything is allocated.

A size that cannot fit (a vocabulary of 5e9, a batch of 1e7, a 1e9-token context) is refused with one line
naming the figures, instead of a swap storm, an allocator traceback or the OOM killer. The estimates are
lower bounds: what the tensors themselves take, nothing for the allocator's slack or the framework, so a
refusal is certain and a config that passes can still be tight.

    parameters    the model's weights (model/gpt/memory.py, which GPT.from_pretrained uses too: counted
                  exactly from the GPT built on the meta device, which allocates nothing)
    gradients     one per parameter
    AdamW moments two per parameter (exp_avg, exp_avg_sq)
    activations   what backward keeps per layer: 16 values per token (Korthikanti et al. 2022, "Reducing
                  Activation Recomputation in Large Transformer Models", 34·s·b·h bytes at 2 bytes a value,
                  less the dropout masks), plus the (B, T, V) logits and their gradient
    KV cache      keys and values of every layer for every row and position, twice for beam search (it
                  reorders into a spare pair)
    tokens        the (rows, T + n) int64 buffer of sampled sequences
"""
from __future__ import annotations

from ..config import GPTConfig
from ..gpt.memory import (FLOAT32, InsufficientMemoryError, check_fits, gib, machine_memory,  # noqa: F401
                          weights_bytes)

INT64 = 8


def training_bytes(cfg: GPTConfig, batch_size: int, itemsize: int = FLOAT32) -> dict[str, int]:
    """Lower bound of one training step's memory, per process: weights, gradients, AdamW moments and the
    activations of a (batch_size, block_size) micro-batch."""
    weights = weights_bytes(cfg)["parameters"]
    tokens = batch_size * cfg.block_size
    return {"parameters": weights, "gradients": weights, "AdamW moments": 2 * weights,
            "activations": itemsize * tokens * (16 * cfg.n_layer * cfg.n_embd + 2 * cfg.vocab_size)}


def sampling_bytes(cfg: GPTConfig, rows: int, total_len: int, *, use_cache: bool = True,
                   beams: bool = False, itemsize: int = FLOAT32) -> dict[str, int]:
    """Lower bound of generating `rows` sequences (num_samples x num_beams) of total_len tokens."""
    window = min(cfg.block_size, total_len)
    cache = 2 * cfg.n_layer * rows * window * cfg.n_embd * itemsize if use_cache else 0
    return {"parameters": weights_bytes(cfg, itemsize)["parameters"], "KV cache": cache * (2 if beams else 1),
            "tokens": rows * total_len * INT64, "logits": rows * cfg.vocab_size * itemsize}
