"""Fast decoding, behind one setting: generate(..., fast=True) and beam_search(..., fast=True) (the default).

A generation step at batch 1 multiplies one vector by every weight matrix, so its speed limit is the memory
bandwidth: a good step streams each weight once and does little else. `Decoder` computes the function of
GPT.forward(idx, kv_cache=cache, last_only=True) with:
- the weights as plain tensors (no nn.Module calls, no per-call input checks, the q/k/v split and the cache
  write as views): fewer Python-level ops per token, which is what bounds small models;
- each matrix stored for its cheapest kernel (_Linear): fp32 transposed once for torch.addmm; bf16/fp16 as
  is, a single row through torch.addmv (torch's reduced-precision gemv, fp32 accumulation);
- weights and KV cache in `dtype` (bfloat16: half the bytes, so about twice the tokens/s at the memory
  roof); logits are returned in float32, and all sampling arithmetic stays in float32;
- with kernels="avx512" (x86 CPUs with AVX-512; built on first use), a step of up to 4 rows (batch 1, or 4
  beams) as one call of model.gpt.cpu_decode.step, which streams the weights nearer the memory bandwidth than
  torch's kernels and dispatches no torch op per layer; other inputs' products of up to 4 rows through its
  `linear`.
Measured figures: docs/sampling.md. The reference path (fast=False) runs the model's own forward.
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

from . import cpu_decode
from .kv_cache import KVCache

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype, device, name: str = "dtype") -> torch.dtype | None:
    """None, a torch dtype or its name ("float32", "bfloat16", "float16") -> torch dtype (None stays None).

    float16 needs CUDA: torch's CPU kernels for half-precision matmuls are slow and not what fp16 is for.
    """
    if dtype is None:
        return None
    key = dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
    if key not in DTYPES:
        raise ValueError(f"{name} must be one of {tuple(DTYPES)}, got {dtype!r}")
    if key == "float16" and torch.device(device).type != "cuda":
        raise ValueError(f"{name} float16 needs a CUDA device; on the CPU use bfloat16")
    return DTYPES[key]


KERNELS = ("torch", "avx512")


def check_kernels(kernels, dtype: torch.dtype, device) -> None:
    """ValueError naming the value when `kernels` is not one of KERNELS or cannot run here."""
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}")
    if kernels == "avx512":
        cpu_decode.check(dtype, device)


class _Linear:
    """y = x Wᵀ + b with W stored for the cheapest kernel of its dtype: in float32 transposed, (in, out), the
    layout addmm takes with the fewest steps (Hugging Face's Conv1D layout); in bf16/fp16 as is, (out, in),
    the layout of torch's reduced-precision gemv, which one row uses (fp32 accumulation). With
    kernels="avx512", W stays (out, in) and inputs of up to cpu_decode.MAX_ROWS rows go to that kernel."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, kernels: str):
        self.avx512 = kernels == "avx512"
        self.gemv = dtype != torch.float32 or self.avx512
        w = weight.detach().to(dtype)
        self.weight = w.contiguous() if self.gemv else w.t().contiguous()  # (out, in) or (in, out), made once
        self.bias = None if bias is None else bias.detach().to(dtype).contiguous()  # (out,)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # (N, in) -> (N, out)
        if not self.gemv:
            return torch.mm(x, self.weight) if self.bias is None else torch.addmm(self.bias, x, self.weight)
        if self.avx512 and x.size(0) <= cpu_decode.MAX_ROWS:
            return cpu_decode.linear(x, self.weight, self.bias)
        if x.size(0) > 1:
            return F.linear(x, self.weight, self.bias)
        v = x.view(-1)  # (in,)
        y = torch.mv(self.weight, v) if self.bias is None else torch.addmv(self.bias, self.weight, v)  # (out,)
        return y.view(1, -1)


class _Block:
    """One transformer block's tensors, in the decoder's dtype."""

    def __init__(self, block, dtype: torch.dtype, kernels: str):
        def cast(t):
            return None if t is None else t.detach().to(dtype)

        self.ln_1 = (cast(block.ln_1.weight), cast(block.ln_1.bias))
        self.c_attn = _Linear(block.attn.c_attn.weight, block.attn.c_attn.bias, dtype, kernels)  # C -> 3C
        self.attn_proj = _Linear(block.attn.c_proj.weight, block.attn.c_proj.bias, dtype, kernels)  # C -> C
        self.ln_2 = (cast(block.ln_2.weight), cast(block.ln_2.bias))
        self.c_fc = _Linear(block.mlp.c_fc.weight, block.mlp.c_fc.bias, dtype, kernels)  # C -> 4C
        self.mlp_proj = _Linear(block.mlp.c_proj.weight, block.mlp.c_proj.bias, dtype, kernels)  # 4C -> C


class Decoder:
    """A GPT's weights prepared for generation steps (see the module docstring).

    The matrices are copied once, here, in the layout their kernel wants (see _Linear): in float32 the
    decoder holds a second copy of the weight matrices while it lives (one generate/beam_search call).
    dtype None keeps the model's dtype. kernels "torch" multiplies with torch's kernels; "avx512" runs a step
    of up to 4 rows through model.gpt.cpu_decode.step and other few-row products through its kernel (checked
    with check_kernels first).
    Call it like the model: decoder(idx, cache) == model(idx, kv_cache=cache, last_only=True)[0][:, -1],
    in float32.
    """

    def __init__(self, model, dtype: torch.dtype | None = None, kernels: str = "torch"):
        wte = model.transformer.wte.weight
        self.config = model.config
        self.dtype = wte.dtype if dtype is None else dtype
        self.device = wte.device
        check_kernels(kernels, self.dtype, self.device)  # an AVX-512 kernel on a CPU without it would crash

        def cast(t):
            return None if t is None else t.detach().to(self.dtype)

        self.wte = cast(wte)  # (V, C)
        self.head = _Linear(model.lm_head.weight, None, self.dtype, kernels)  # C -> V
        self.pos = cast(model.transformer.wpe.weight if self.config.pos_encoding == "learned" else model.pos_table)
        self.blocks = [_Block(b, self.dtype, kernels) for b in model.transformer.h]
        self.ln_f = (cast(model.transformer.ln_f.weight), cast(model.transformer.ln_f.bias))
        self.tanh_gelu = self.config.activation == "gelu_tanh"
        self.step_params = self._step_params() if kernels == "avx512" else None

    def _step_params(self) -> list:
        """The tensors of cpu_decode.step, in its order (cpu_decode.cpp)."""
        params = [self.wte, self.pos.contiguous(), *self.ln_f, self.head.weight]
        for b in self.blocks:
            params += [*b.ln_1, b.c_attn.weight, b.c_attn.bias, b.attn_proj.weight, b.attn_proj.bias,
                       *b.ln_2, b.c_fc.weight, b.c_fc.bias, b.mlp_proj.weight, b.mlp_proj.bias]
        return [None if t is None else t.contiguous() for t in params]

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        return KVCache(self.config, batch_size, max_len, device=self.device, dtype=self.dtype)

    def __call__(self, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """idx (B, T) continues the cache's positions -> next-token logits (B, V) in float32; the cache advances."""
        B, T = idx.shape
        if self.step_params is not None and T == 1 and B <= cpu_decode.MAX_ROWS:  # one C++ call for the step
            logits = cpu_decode.step(idx.reshape(B), cache.pos, self.step_params, cache.k, cache.v,
                                     self.config.n_head, self.tanh_gelu)  # (B, V)
            cache.pos += 1
            return logits
        C = self.config.n_embd
        past, end = cache.pos, cache.pos + T
        x = F.embedding(idx, self.wte) + self.pos[past:end]  # (B, T, C)
        x = x.view(B * T, C)
        # every layer's slot for the new keys/values and its keys/values so far, as views of the cache
        new_k, new_v = cache.k[:, :, :, past:end], cache.v[:, :, :, past:end]  # (L, B, nh, T, hs) each
        all_k, all_v = cache.k[:, :, :, :end], cache.v[:, :, :, :end]  # (L, B, nh, S, hs) each, S = past + T
        gelu = "tanh" if self.tanh_gelu else "none"
        for i, blk in enumerate(self.blocks):
            qkv = blk.c_attn(F.layer_norm(x, (C,), *blk.ln_1))  # (B·T, 3C)
            q, k, v = qkv.view(B, T, 3, self.config.n_head, -1).permute(2, 0, 3, 1, 4)  # (B, nh, T, hs) each
            new_k[i].copy_(k)
            new_v[i].copy_(v)
            y = self._attention(q, all_k[i], all_v[i], past)  # (B·T, C)
            x = x + blk.attn_proj(y)  # (B·T, C)
            h = F.gelu(blk.c_fc(F.layer_norm(x, (C,), *blk.ln_2)), approximate=gelu)  # (B·T, 4C)
            x = x + blk.mlp_proj(h)  # (B·T, C)
        cache.pos = end
        if T > 1:
            x = x.view(B, T, C)[:, -1]  # (B, C): only the last position's logits
        return self.head(F.layer_norm(x, (C,), *self.ln_f)).float()  # (B, V)

    @staticmethod
    def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: int) -> torch.Tensor:
        """q (B, nh, T, hs) at positions past.., k, v (B, nh, past+T, hs) -> (B·T, C), heads side by side."""
        B, nh, T, hs = q.shape
        if T == 1:  # one query sees every key: no mask, and (B, nh, 1, hs) is already (B, C) in memory
            return F.scaled_dot_product_attention(q, k, v).view(B, nh * hs)
        # query i sits at absolute position past + i and sees keys 0..past+i
        causal = torch.ones(T, past + T, dtype=torch.bool, device=q.device).tril(past) if past else None
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=causal, is_causal=not past)  # (B, nh, T, hs)
        return y.transpose(1, 2).reshape(B * T, nh * hs)
