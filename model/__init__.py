"""flopgpt: a minimal GPT that trains, samples and counts its own FLOPs exactly.

`GPT` and `KVCache` load torch when first used (a module __getattr__), so importing `model.config` or the
FLOP formulas, and a program's `--help`, stay free of it.
"""
from .config import GPTConfig, TrainConfig

__all__ = ["GPT", "GPTConfig", "TrainConfig", "KVCache"]


def __getattr__(name: str):
    if name in ("GPT", "KVCache"):
        from .gpt import gpt
        return getattr(gpt, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
