"""Evaluation: train.py's loss on the same sampled batches at every evaluation, and the deterministic loss
over a whole split (scaling.py's records, bench/tilt.py's curves)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .data import open_split
from .distributed import Distributed


def evaluate(model, loaders, eval_iters: int, autocast, dist: Distributed, device,
             stop=lambda: False) -> dict[str, float] | None:
    """Mean loss over the same eval_iters batches per split every time (their sampler restarts from its seed).
    None when stop() turns true before a batch (a signal): the evaluation is abandoned, to run again on resume."""
    out = {}
    model.eval()
    with torch.inference_mode():
        for split, batches in loaders.items():
            batches.restart()
            total, count = 0.0, 0
            for i in range(eval_iters):
                if stop():
                    model.train()
                    return None
                if i % dist.world != dist.rank:
                    batches.skip()
                    continue
                x, y = batches.next()
                with autocast:
                    _, loss = model(x, y)
                total += loss.item()
                count += 1
            out[split] = dist.mean(total, device) * dist.world / eval_iters if dist.enabled else total / count
    model.train()
    return out


def full_split_loss(model, data, block_size: int | None = None, batch_rows: int = 64) -> float:
    """Mean next-token cross-entropy over every consecutive window of `data` (a 1-D array of ids; block_size
    defaults to the model's): windows [i*T, (i+1)*T) predict [i*T+1, (i+1)*T+1), every target token once except
    the tail shorter than a window. Eval mode, no sampling: deterministic. The model's mode is restored."""
    T = block_size or model.config.block_size
    n = (len(data) - 1) // T  # whole windows that still have a next token for their last position
    if n < 1:
        raise ValueError(f"{len(data)} tokens hold no window of block_size {T} (+1 target)")
    ids = torch.from_numpy(np.asarray(data[:n * T + 1]).astype(np.int64))  # (n·T + 1,)
    x, y = ids[:-1].view(n, T), ids[1:].view(n, T)  # (n, T) each: y is x shifted by one token
    total, device = 0.0, next(model.parameters()).device
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for i in range(0, n, batch_rows):
            xb, yb = x[i:i + batch_rows].to(device), y[i:i + batch_rows].to(device)  # (b, T) each
            _, loss = model(xb, yb)  # the mean over the b·T targets
            total += loss.item() * len(xb)
    model.train(was_training)
    return total / n


def split_loss(checkpoint: str | Path, dataset: str | Path, split: str = "val") -> float:
    """full_split_loss of a train.py checkpoint on one split of a dataset folder."""
    from .checkpoint import load_model
    model, _ = load_model(checkpoint)
    return full_split_loss(model, open_split(dataset, split))
