"""The key/value cache that generation and beam search feed the GPT through."""
from __future__ import annotations

from collections import Counter

import torch

from ..config import GPTConfig


class KVCache:
    """Keys and values of every layer for positions [0, pos), preallocated up to max_len positions.

    Layout (n_layer, B, n_head, max_len, head_dim). The model writes each layer's new keys/values with
    `update` and advances `pos` once per forward; beam search permutes rows with `reorder`.
    """

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int | None = None,
                 device=None, dtype=torch.float32):
        max_len = config.block_size if max_len is None else max_len
        if not 0 < max_len <= config.block_size:
            raise ValueError(f"max_len must be in [1, block_size={config.block_size}], got {max_len}")
        shape = (config.n_layer, batch_size, config.n_head, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.pos = 0
        self._spare = None  # second (k, v) pair that reorder gathers into, made on the first reorder

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, nh, T, hs) at positions [pos, pos+T); return all keys/values so far."""
        end = self.pos + k.size(2)
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]  # (B, nh, pos+T, hs)

    def reorder(self, index: torch.Tensor, shared: list[int] | None = None) -> None:
        """Keep batch rows `index` (beam search: each new beam continues an old one). Row i's positions
        [0, shared[i]) must already equal its source's, as they do where the two rows hold the same tokens
        (the prompt; the history two beams still share): they are not copied. None: copy every position."""
        # the batch size changes (prompts -> beams), or autograd tracks the cache: fresh buffers
        if index.numel() != self.k.size(1) or self.k.requires_grad:
            self.k = self.k.index_select(1, index)
            self.v = self.v.index_select(1, index)
            self._spare = None
            return
        # same batch size (every beam-search step): copy only the rows that change, each read before it is
        # overwritten; rows that trade places (a cycle) need the spare pair. Allocating a fresh cache per step
        # would cost more than the copies (page faults).
        moves = {dst: src for dst, src in enumerate(index.tolist()) if dst != src}
        order = _copy_order(moves)
        if order is not None:
            for dst in order:
                start = min(shared[dst], self.pos) if shared is not None else 0
                self.k[:, dst, :, start:self.pos].copy_(self.k[:, moves[dst], :, start:self.pos])
                self.v[:, dst, :, start:self.pos].copy_(self.v[:, moves[dst], :, start:self.pos])
            return
        if self._spare is None:
            self._spare = (torch.empty_like(self.k), torch.empty_like(self.v))
        k, v = self._spare
        torch.index_select(self.k[:, :, :, :self.pos], 1, index, out=k[:, :, :, :self.pos])
        torch.index_select(self.v[:, :, :, :self.pos], 1, index, out=v[:, :, :, :self.pos])
        self._spare = (self.k, self.v)
        self.k, self.v = k, v

    def reset(self) -> None:
        self.pos = 0


def _copy_order(moves: dict[int, int]) -> list[int] | None:
    """An order for the row copies dst <- moves[dst] in which no row is overwritten while a copy still has to
    read it; None when the moves contain a cycle (rows trading places), which no order of copies can do."""
    readers = Counter(src for src in moves.values() if src in moves)  # pending reads of rows to be overwritten
    ready = [dst for dst in moves if readers[dst] == 0]
    order = []
    while ready:
        dst = ready.pop()
        order.append(dst)
        src = moves[dst]
        if src in moves:
            readers[src] -= 1
            if readers[src] == 0:
                ready.append(src)
    return order if len(order) == len(moves) else None
