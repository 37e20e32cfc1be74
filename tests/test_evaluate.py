"""model/training/evaluate.py: the whole-split loss against windows evaluated one by one."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import small
from model import GPT
from model.training.evaluate import full_split_loss


def test_full_split_loss_equals_naive_windows():
    torch.manual_seed(0)
    model = GPT(small(block_size=8)).eval()
    data = np.random.default_rng(0).integers(0, 31, size=61).astype(np.uint16)  # 7 windows + a short tail
    got = full_split_loss(model, data, 8, batch_rows=3)
    losses = []
    with torch.no_grad():
        for i in range(7):
            x = torch.tensor(data[i * 8:i * 8 + 8], dtype=torch.long)[None]
            y = torch.tensor(data[i * 8 + 1:i * 8 + 9], dtype=torch.long)[None]
            losses.append(F.cross_entropy(model(x)[0][0], y[0]).item())
    assert got == pytest.approx(sum(losses) / 7, rel=1e-5)
    assert model.training is False
    model.train()
    assert full_split_loss(model, data, 8, batch_rows=64) == pytest.approx(got, rel=1e-6)  # one batch: same
    assert model.training is True  # evaluated in eval mode, the caller's mode put back
    with pytest.raises(ValueError, match="no window"):
        full_split_loss(model, data[:8], 8)
