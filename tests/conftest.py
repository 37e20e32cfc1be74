import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


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
