"""flopgpt: a minimal GPT that trains, samples and counts its own FLOPs exactly."""
from .config import GPTConfig, TrainConfig
from .gpt.gpt import GPT, KVCache

__all__ = ["GPT", "GPTConfig", "TrainConfig", "KVCache"]
