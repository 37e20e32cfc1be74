"""A decoder-only GPT (GPT-2 layout) written from torch primitives.

Parameter names follow GPT-2/nanoGPT (transformer.wte, transformer.h.{i}.attn.c_attn, ..., lm_head) so that
nanoGPT checkpoints and converted Hugging Face GPT-2 weights load without renaming.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.nn import functional as F

from ..config import GPTConfig
from . import speed
from .kv_cache import KVCache


def sinusoidal_table(n_pos: int, n_embd: int) -> torch.Tensor:
    """Vaswani et al. 2017: PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(p / 10000^(2i/d))."""
    pos = torch.arange(n_pos, dtype=torch.float64).unsqueeze(1)  # (P, 1)
    two_i = torch.arange(0, n_embd, 2, dtype=torch.float64)  # (ceil(d/2),)
    angle = pos / torch.pow(10000.0, two_i / n_embd)  # (P, ceil(d/2))
    table = torch.zeros(n_pos, n_embd, dtype=torch.float64)
    table[:, 0::2] = torch.sin(angle)
    table[:, 1::2] = torch.cos(angle[:, : n_embd // 2])  # odd d: one fewer cosine column
    return table.float()


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, cpu_kernels: bool = False):
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        # fused SDPA unless the config asks for the manual form or the CPU kernels are on (model.gpt.speed)
        self.flash = config.attention == "sdpa" and not cpu_kernels
        Dropout = speed.Dropout if cpu_kernels else nn.Dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v for all heads
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = Dropout(config.dropout)
        self.resid_dropout = Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)  # (B, T, C) each
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, nh, S, hs), S = cached positions + T
        past = k.size(2) - T  # query i sits at absolute position past + i and sees keys 0..past+i
        # (T, S): True where query i may see key j; one query (T == 1) sees every key
        causal = None if T == 1 else torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(past)
        if self.flash:  # without cached keys the mask is SDPA's own is_causal
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=causal if past else None, dropout_p=self.dropout if self.training else 0.0,
                is_causal=bool(past == 0 and T > 1),  # a Python bool even under a JIT trace (fvcore)
            )  # (B, nh, T, hs)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))  # (B, nh, T, S)
            if causal is not None:
                att = att.masked_fill_(~causal, float("-inf"))  # in place: the scaling's backward needs no output
            att = self.attn_dropout(F.softmax(att, dim=-1))  # (B, nh, T, S)
            y = att @ v  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C), heads side by side
        return self.resid_dropout(self.c_proj(y))  # (B, T, C)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig, cpu_kernels: bool = False):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        # tanh form: GPT-2's, so its weights give its logits; exact erf form: nanoGPT's, faster on CPU
        self.gelu = nn.GELU(approximate="tanh" if config.activation == "gelu_tanh" else "none")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = (speed.Dropout if cpu_kernels else nn.Dropout)(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.gelu(self.c_fc(x))  # (B, T, 4C)
        return self.dropout(self.c_proj(h))  # (B, T, C)


class Block(nn.Module):
    def __init__(self, config: GPTConfig, cpu_kernels: bool = False):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, cpu_kernels)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config, cpu_kernels)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, layer)  # (B, T, C)
        x = x + self.mlp(self.ln_2(x))  # (B, T, C)
        return x


class GPT(nn.Module):
    """The network. cpu_kernels=True swaps in the CPU training kernels of model.gpt.speed (same function)."""

    def __init__(self, config: GPTConfig, cpu_kernels: bool = False):
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise ValueError(f"config must be a GPTConfig, got {type(config).__name__}")
        if not isinstance(cpu_kernels, bool):
            raise ValueError(f"cpu_kernels must be True or False, got {cpu_kernels!r}")
        self.config = config
        self.cpu_kernels = cpu_kernels
        modules = dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            drop=(speed.Dropout if cpu_kernels else nn.Dropout)(config.dropout),
            h=nn.ModuleList([Block(config, cpu_kernels) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        )
        if config.pos_encoding == "learned":
            modules["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        self.transformer = nn.ModuleDict(modules)
        if config.pos_encoding == "sinusoidal":
            # fixed table, rebuilt from the config, so it is not saved in checkpoints
            self.register_buffer("pos_table", sinusoidal_table(config.block_size, config.n_embd), persistent=False)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied: the head is the embedding transposed
        self.apply(self._init_weights)
        # GPT-2: residual projections scaled by 1/sqrt(2·n_layer), two residual adds per block
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count (the tied head counted once).

        non_embedding=True follows Kaplan et al. 2020: leave out the token embedding (= the tied head) and
        the learned position table. The closed form is in model.flops.
        """
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wte.weight.numel()
            if "wpe" in self.transformer:
                n -= self.transformer.wpe.weight.numel()
        return n

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *,
                kv_cache: KVCache | None = None, last_only: bool = False):
        """idx (B, T) token ids -> (logits, loss).

        logits are (B, T, vocab), or (B, 1, vocab) with last_only=True (generation needs only the last
        position). loss is the mean cross-entropy over targets != -1 when targets are given, else None.
        With kv_cache, idx continues the cached positions and the cache advances by T.
        """
        past = self._check_input(idx, targets, kv_cache, last_only)
        B, T = idx.size()
        tok = self.transformer.wte(idx)  # (B, T, C)
        if self.config.pos_encoding == "learned":
            pos = torch.arange(past, past + T, dtype=torch.long, device=idx.device)  # (T,)
            x = tok + self.transformer.wpe(pos)  # (B, T, C)
        else:
            x = tok + self.pos_table[past:past + T].to(tok.dtype)  # (B, T, C)
        x = self.transformer.drop(x)  # (B, T, C)
        for i, block in enumerate(self.transformer.h):
            x = block(x, kv_cache, i)  # (B, T, C)
        if kv_cache is not None:
            kv_cache.pos = past + T
        x = self.transformer.ln_f(x)  # (B, T, C)
        if last_only:
            return self.lm_head(x[:, -1:, :]), None  # (B, 1, V): generation needs only the last position
        logits = self.lm_head(x)  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def _check_input(self, idx, targets, kv_cache, last_only) -> int:
        """Raise ValueError for inputs forward cannot take; return the number of cached positions."""
        if idx.dim() != 2:
            raise ValueError(f"idx must be 2-D (batch, time), got shape {tuple(idx.shape)}")
        T = idx.size(1)
        past = kv_cache.pos if kv_cache is not None else 0
        if T == 0:
            raise ValueError("idx has no tokens (T=0)")
        if past + T > self.config.block_size:
            raise ValueError(f"sequence of {past + T} positions exceeds block_size={self.config.block_size}")
        if kv_cache is not None and past + T > kv_cache.max_len:
            raise ValueError(f"sequence of {past + T} positions exceeds the cache's max_len={kv_cache.max_len}")
        if targets is not None and targets.shape != idx.shape:
            raise ValueError(f"targets shape {tuple(targets.shape)} differs from idx shape {tuple(idx.shape)}")
        if targets is not None and last_only:
            raise ValueError("last_only=True cannot compute a loss over all positions")
        return past

    def generate(self, idx: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, eos_token_id: int | None = None,
                 generator: torch.Generator | None = None, use_cache: bool = True, on_token=None,
                 stats: dict | None = None, fast: bool = True, dtype=None, kernels: str = "torch") -> torch.Tensor:
        """Sample (temperature 0: greedy) up to max_new_tokens after idx (B, T) -> (B, T + n).

        Stops early once every row has emitted eos_token_id. stats (a dict) receives the call's timing: see
        model.gpt.sampling.generate and model.flops.roofline.decoding_summary (tokens/s, GB/s, MBU, MFU).
        fast: the decoding path of model.gpt.decode; dtype: weights and cache in bfloat16/float16; kernels:
        "avx512" for model.gpt.cpu_decode's decoding step on x86 CPUs.
        """
        from .sampling import generate  # sampling drives the model: imported where used, not at load
        return generate(self, idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                        eos_token_id=eos_token_id, generator=generator, use_cache=use_cache, on_token=on_token,
                        stats=stats, fast=fast, dtype=dtype, kernels=kernels)

    def beam_search(self, idx: torch.Tensor, max_new_tokens: int, *, num_beams: int, length_penalty: float = 1.0,
                    early_stopping: bool | str = False, eos_token_id: int | None = None,
                    no_repeat_ngram_size: int = 0, num_return_sequences: int = 1,
                    use_cache: bool = True, fast: bool = True, dtype=None,
                    kernels: str = "torch") -> tuple[torch.Tensor, torch.Tensor]:
        """Beam search -> (sequences, scores), as transformers' generate(num_beams=...) computes them.

        See model.gpt.sampling.beam_search.
        """
        from .sampling import beam_search
        return beam_search(self, idx, max_new_tokens, num_beams=num_beams, length_penalty=length_penalty,
                           early_stopping=early_stopping, eos_token_id=eos_token_id,
                           no_repeat_ngram_size=no_repeat_ngram_size,
                           num_return_sequences=num_return_sequences, use_cache=use_cache, fast=fast,
                           dtype=dtype, kernels=kernels)

    @classmethod
    def from_pretrained(cls, path, device="cpu") -> "GPT":
        """A GPT in eval mode from a local Hugging Face GPT-2 folder, a nanoGPT ckpt.pt, a flopgpt checkpoint
        written by train.py, or a train.py out_dir (its best.pt, else last.pt); see model.gpt.weights."""
        from .weights import load_pretrained
        return load_pretrained(cls, path, device=device)

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        p = self.transformer.wte.weight
        return KVCache(self.config, batch_size, max_len, device=p.device, dtype=p.dtype)

    def optim_groups(self, weight_decay: float) -> list[dict]:
        """AdamW parameter groups: decoupled weight decay on 2-D weights (matmuls, embeddings), none on
        biases and LayerNorm gains."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
