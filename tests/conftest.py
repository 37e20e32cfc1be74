import os
import sys
from pathlib import Path

import pytest
import torch

# a fixed thread count, whatever else the machine runs: runs repeat bit for bit (the count chosen from the
# load is tested in test_threads.py)
os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))


def find_r50k() -> tuple[Path | None, str]:
    """GPT-2's BPE ranks for the tests that need them: the CI's copy beside the clone, else the file in
    tiktoken's cache that `tiktoken.get_encoding('r50k_base')` fills (looked up before any test redirects
    TIKTOKEN_CACHE_DIR). Returns (path or None, the skip reason: where it looked, and what to do)."""
    from model.training.tokenizer import R50K_SHA256, R50K_URL, sha256_file, tiktoken_cache_path
    cached = tiktoken_cache_path(R50K_URL)
    for path in (SHARED_DATA / "r50k_base.tiktoken", cached):
        if path is not None and path.is_file() and sha256_file(path) == R50K_SHA256:
            return path, ""
    return None, (f"GPT-2's BPE ranks not found in {SHARED_DATA} nor in tiktoken's cache ({cached}); to run "
                  f"this test, fill the cache once with a network: python -c \"import tiktoken; "
                  f"tiktoken.get_encoding('r50k_base')\"")


R50K, R50K_SKIP_REASON = find_r50k()
needs_r50k = pytest.mark.skipif(R50K is None, reason=R50K_SKIP_REASON)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def small(**kw):
    """The small GPT config the unit tests share: 2 layers, 2 heads, 32 wide, 31 tokens, context 16, no biases
    (the key bias's gradient is pure rounding noise, which Adam amplifies; keyword arguments override)."""
    from model import GPTConfig
    return GPTConfig(**{**dict(vocab_size=31, block_size=16, n_layer=2, n_head=2, n_embd=32, bias=False), **kw})


def reference_adamw(model, lr: float, weight_decay: float, betas: tuple[float, float], **kw):
    """The reference optimizer: torch's for-loop AdamW (neither fused nor foreach) over decay groups built here,
    independently of GPT.optim_groups: weight decay on 2-D weights only."""
    groups = [{"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, foreach=False, **kw)


TINY_TEXT = ("It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
             "foolishness, it was the epoch of belief, it was the epoch of incredulity. ") * 40


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A small char-level dataset folder prepared by the real pipeline (shared by training tests)."""
    from model.training.data import prepare
    d = tmp_path_factory.mktemp("ds")
    src = d / "corpus.txt"
    src.write_text(TINY_TEXT)
    return prepare("file", "char", d / "tiny_char", input_path=src, quiet=True)
