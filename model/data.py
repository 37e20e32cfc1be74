"""Datasets on disk (train.bin, val.bin, meta.json) and random batches drawn from np.memmap views."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch


def load_meta(dataset_dir: str | Path) -> dict:
    """The dataset's meta.json (tokenizer description, vocab_size, dtype)."""
    path = Path(dataset_dir) / "meta.json"
    if not path.is_file():
        raise FileNotFoundError(f"dataset meta.json not found: {path} (run `python data/prepare.py`)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from None
    for key in ("vocab_size", "dtype", "tokenizer"):
        if key not in meta:
            raise ValueError(f"{path}: missing key {key!r}")
    return meta


def open_split(dataset_dir: str | Path, split: str) -> np.memmap:
    """A read-only memmap of train.bin or val.bin with the dtype meta.json names."""
    meta = load_meta(dataset_dir)
    path = Path(dataset_dir) / f"{split}.bin"
    if not path.is_file():
        raise FileNotFoundError(f"dataset split not found: {path}")
    dtype = np.dtype(meta["dtype"])
    if path.stat().st_size < dtype.itemsize:
        raise ValueError(f"{path}: empty token file")
    return np.memmap(path, dtype=dtype, mode="r")


class Batches:
    """Random (x, y) windows of block_size tokens from one split; y is x shifted by one.

    Draws offsets from its own numpy Generator, so its position in the stream is part of a checkpoint
    (state_dict / load_state_dict) and a resumed run sees the same batches as an uninterrupted one.
    """

    def __init__(self, dataset_dir: str | Path, split: str, block_size: int, batch_size: int,
                 seed: int = 0, device: str | torch.device = "cpu"):
        self.data = open_split(dataset_dir, split)
        if len(self.data) < block_size + 1:
            raise ValueError(f"{Path(dataset_dir) / (split + '.bin')}: {len(self.data)} tokens, fewer than "
                             f"block_size+1={block_size + 1}; use a smaller block_size or more text")
        self.block_size, self.batch_size = block_size, batch_size
        self.device = torch.device(device)
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self._offsets = np.arange(block_size + 1)  # (T+1,) reused every batch

    def _starts(self) -> np.ndarray:
        return self.rng.integers(0, len(self.data) - self.block_size, size=self.batch_size)  # (B,)

    def skip(self) -> None:
        """Advance exactly as next() would, without gathering (another rank trains on that batch)."""
        self._starts()

    def restart(self) -> None:
        """Back to the first batch of the seed (evaluation sees the same batches every time)."""
        self.rng = np.random.default_rng(self.seed)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = self._starts()
        # one fancy-index gather of (B, T+1) tokens, then x and y are views of it
        window = torch.from_numpy(self.data[starts[:, None] + self._offsets].astype(np.int64))  # (B, T+1)
        if self.device.type == "cuda":
            window = window.pin_memory().to(self.device, non_blocking=True)
        return window[:, :-1], window[:, 1:]  # (B, T), (B, T)

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
