"""Analytic FLOP counts of the model in model/gpt/gpt.py, as pure functions of (config, batch, sequence length).

Convention, used everywhere in this project: one multiply-add = 2 FLOPs. A matmul (M, K) @ (K, N) costs
2·M·K·N FLOPs. The headline totals count matmuls only (the seven components below, which are what fvcore
and torch's FlopCounterMode measure); the non-matmul ops get their own per-element conventions and are
reported beside the totals, never folded into them.

Matmul components of one forward call with B rows, T new tokens, S = past + T keys, width d, L layers, V vocab:
    qkv          2·B·T·d·3d·L     c_attn: x (BT, d) @ W (d, 3d)
    attn_scores  2·B·T·S·d·L      q @ kᵀ per head: (T, hs) @ (hs, S), times n_head heads, hs·n_head = d
    attn_values  2·B·T·S·d·L      att @ v per head: (T, S) @ (S, hs)
    attn_proj    2·B·T·d·d·L      attn.c_proj
    mlp_up       2·B·T·d·4d·L     mlp.c_fc
    mlp_down     2·B·T·4d·d·L     mlp.c_proj
    lm_head      2·R·d·V          R = B·T rows, or B with last_only (generation needs only the last position)
Attention is counted on the full T×S rectangle, as dense kernels (and both counters) execute it; the
causal-only figure (query i sees past+i+1 keys: Σ = T·past + T(T+1)/2 pairs) is reported beside it.

Parameter counts: `params_total` (tied head counted once) equals GPT(cfg).num_params();
`params_non_embedding` (Kaplan et al. 2020: without the token embedding, which is also the tied head, and
without the learned position table) equals GPT.num_params(non_embedding=True); `params_kaplan` is Kaplan's
N = 12·L·d². The exact counts below use no parameter count at all; the approximations in
model/flops/approximations.py say which N each uses.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..config import GPTConfig, check
from ..config import param_count as params_total  # noqa: F401 (the closed form, used here and by model.gpt.memory)

MATMUL_COMPONENTS = ("qkv", "attn_scores", "attn_values", "attn_proj", "mlp_up", "mlp_down", "lm_head")

# Per-element conventions of the non-matmul ops (FLOPs per element of the tensor named in each formula).
LAYER_NORM_CORE = 5  # mean (1 add), x - mean (1), square (1), sum of squares (1), times 1/std (1); per-row rsqrt ignored
SOFTMAX = 5  # row max (1 compare), x - max (1), exp (1), row sum (1), divide (1)
ATTN_SCALE = 1  # scores · 1/sqrt(head_dim)
GELU_TANH = 9  # 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))): x³ (2), ·0.044715, +x, ·√(2/π), tanh, +1, ·x, ·0.5
GELU_ERF = 5  # 0.5·x·(1 + erf(x/√2)): /√2, erf, +1, ·x, ·0.5 (GPTConfig.activation="gelu")
ADD = 1  # residual, position and bias adds: one add per output element
CROSS_ENTROPY_PER_LOGIT = 4  # log-softmax: row max, subtract, exp, row sum
CROSS_ENTROPY_PER_ROW = 3  # log of the sum, subtract it from the target's logit, accumulate into the mean
BACKWARD_ELEMENTWISE = 2  # backward of an element-wise op: 2 × its forward (a convention, measured by nobody)


@dataclass(frozen=True)
class Count:
    """FLOPs of one or more forward/backward calls.

    matmul: component -> FLOPs, attention on the full rectangle (the number both counters report).
    non_matmul: op -> FLOPs by the per-element conventions above (kept out of `total`).
    causal_attention: attn_scores + attn_values restricted to the causal lower triangle.
    """

    matmul: dict[str, int]
    non_matmul: dict[str, int] = field(default_factory=dict)
    causal_attention: int = 0

    @property
    def total(self) -> int:
        """Matmul FLOPs: the exact figure compared with fvcore and FlopCounterMode."""
        return sum(self.matmul.values())

    @property
    def attention(self) -> int:
        return self.matmul.get("attn_scores", 0) + self.matmul.get("attn_values", 0)

    @property
    def causal_total(self) -> int:
        """Matmul FLOPs if attention computed only the causal lower triangle."""
        return self.total - self.attention + self.causal_attention

    @property
    def non_matmul_total(self) -> int:
        return sum(self.non_matmul.values())

    def __add__(self, other: Count) -> Count:
        def merge(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
            return {k: a.get(k, 0) + b.get(k, 0) for k in {**a, **b}}
        return Count(merge(self.matmul, other.matmul), merge(self.non_matmul, other.non_matmul),
                     self.causal_attention + other.causal_attention)

    def times(self, k: int) -> Count:
        return Count({n: v * k for n, v in self.matmul.items()}, {n: v * k for n, v in self.non_matmul.items()},
                     self.causal_attention * k)


ZERO = Count({name: 0 for name in MATMUL_COMPONENTS})


# ----------------------------------------------------------------------------------------------------
# Parameter counts

def params_non_embedding(cfg: GPTConfig) -> int:
    """Kaplan et al. 2020's N: all parameters except the token embedding (= tied head) and learned positions.

    Equals GPT(cfg).num_params(non_embedding=True).
    """
    wpe = cfg.block_size * cfg.n_embd if cfg.pos_encoding == "learned" else 0
    return params_total(cfg) - cfg.vocab_size * cfg.n_embd - wpe


def params_kaplan(cfg: GPTConfig) -> int:
    """Kaplan et al. 2020, eq. 2.1: N ≈ 2·d_model·n_layer·(2·d_attn + d_ff) = 12·L·d² with d_ff = 4d."""
    return 12 * cfg.n_layer * cfg.n_embd ** 2


# ----------------------------------------------------------------------------------------------------
# Matmul formulas, one per op. `tokens` = rows × new tokens that pass through the op.

def qkv(cfg: GPTConfig, tokens: int) -> int:
    """c_attn, x (tokens, d) @ W (d, 3d): 2·tokens·d·3d per layer. Backward: dX and dW, 2 matmuls of that size."""
    return 2 * tokens * cfg.n_embd * 3 * cfg.n_embd * cfg.n_layer


def attn_scores(cfg: GPTConfig, batch: int, q_len: int, k_len: int) -> int:
    """q @ kᵀ on the full q_len × k_len rectangle: 2·B·n_head·q_len·k_len·head_dim per layer.

    Backward: dQ = dS @ K and dK = dSᵀ @ Q, 2 matmuls of the same size (flash kernels also recompute S; not
    counted, as MFU does not count recomputation).
    """
    return 2 * batch * q_len * k_len * cfg.n_embd * cfg.n_layer


def attn_values(cfg: GPTConfig, batch: int, q_len: int, k_len: int) -> int:
    """att @ v on the full rectangle: 2·B·n_head·q_len·k_len·head_dim per layer.

    Backward: dP = dO @ Vᵀ and dV = Pᵀ @ dO, 2 matmuls of the same size.
    """
    return 2 * batch * q_len * k_len * cfg.n_embd * cfg.n_layer


def attn_causal_pairs(q_len: int, past: int) -> int:
    """Query i (absolute position past+i) sees keys 0..past+i: Σ (past+i+1) = q_len·past + q_len(q_len+1)/2."""
    return q_len * past + q_len * (q_len + 1) // 2


def attn_causal(cfg: GPTConfig, batch: int, q_len: int, past: int) -> int:
    """Scores + values on the causal lower triangle only: 2 matmuls × 2·B·pairs·head_dim·n_head per layer."""
    return 2 * 2 * batch * attn_causal_pairs(q_len, past) * cfg.n_embd * cfg.n_layer


def attn_proj(cfg: GPTConfig, tokens: int) -> int:
    """attn.c_proj, (tokens, d) @ (d, d): 2·tokens·d² per layer. Backward 2×."""
    return 2 * tokens * cfg.n_embd * cfg.n_embd * cfg.n_layer


def mlp_up(cfg: GPTConfig, tokens: int) -> int:
    """mlp.c_fc, (tokens, d) @ (d, 4d): 2·tokens·4d² per layer. Backward 2×."""
    return 2 * tokens * cfg.n_embd * 4 * cfg.n_embd * cfg.n_layer


def mlp_down(cfg: GPTConfig, tokens: int) -> int:
    """mlp.c_proj, (tokens, 4d) @ (4d, d): 2·tokens·4d² per layer. Backward 2×."""
    return 2 * tokens * 4 * cfg.n_embd * cfg.n_embd * cfg.n_layer


def lm_head(cfg: GPTConfig, rows: int) -> int:
    """lm_head, (rows, d) @ (d, V): 2·rows·d·V. Backward 2× (dX, and dW into the tied wte)."""
    return 2 * rows * cfg.n_embd * cfg.vocab_size


# ----------------------------------------------------------------------------------------------------
# Non-matmul formulas (FLOPs by the per-element conventions at the top of the file)

def layer_norm(cfg: GPTConfig, tokens: int) -> int:
    """2 per layer + ln_f over (tokens, d): 5 per element, + 1 for the scale, + 1 for the shift with bias."""
    return (2 * cfg.n_layer + 1) * tokens * cfg.n_embd * (LAYER_NORM_CORE + 1 + int(cfg.bias))


def attn_scale(cfg: GPTConfig, batch: int, q_len: int, k_len: int) -> int:
    """1/sqrt(head_dim) on every score of the full rectangle: 1 per element."""
    return ATTN_SCALE * batch * cfg.n_head * q_len * k_len * cfg.n_layer


def softmax(cfg: GPTConfig, batch: int, q_len: int, k_len: int) -> int:
    """Softmax over every score row of the full rectangle (masked entries included): 5 per element."""
    return SOFTMAX * batch * cfg.n_head * q_len * k_len * cfg.n_layer


def gelu(cfg: GPTConfig, tokens: int) -> int:
    """GELU on the (tokens, 4d) MLP activation: 9 per element (tanh form), 5 (exact erf form, activation="gelu")."""
    per = GELU_ERF if getattr(cfg, "activation", "gelu_tanh") == "gelu" else GELU_TANH
    return per * tokens * 4 * cfg.n_embd * cfg.n_layer


def residual_add(cfg: GPTConfig, tokens: int) -> int:
    """Two residual adds per block on (tokens, d): 1 per element."""
    return ADD * 2 * tokens * cfg.n_embd * cfg.n_layer


def position_add(cfg: GPTConfig, tokens: int) -> int:
    """token embedding + position (learned row or sinusoidal table): 1 per element of (tokens, d)."""
    return ADD * tokens * cfg.n_embd


def bias_add(cfg: GPTConfig, tokens: int) -> int:
    """Linear biases (c_attn 3d, attn.c_proj d, c_fc 4d, mlp.c_proj d per token per layer); lm_head has none."""
    return ADD * tokens * 9 * cfg.n_embd * cfg.n_layer if cfg.bias else 0


def embedding(cfg: GPTConfig, tokens: int) -> int:
    """Token and position lookups are gathers (memory reads): 0 FLOPs in the forward."""
    return 0


def embedding_backward(cfg: GPTConfig, tokens: int) -> int:
    """The lookups' backward scatter-adds each output-gradient element into the table: 1 per element
    for wte, and again for wpe with learned positions."""
    tables = 2 if cfg.pos_encoding == "learned" else 1
    return ADD * tables * tokens * cfg.n_embd


def cross_entropy(cfg: GPTConfig, rows: int) -> int:
    """Mean cross-entropy over (rows, V) logits: 4 per logit (log-softmax) + 3 per row."""
    return rows * (CROSS_ENTROPY_PER_LOGIT * cfg.vocab_size + CROSS_ENTROPY_PER_ROW)


# ----------------------------------------------------------------------------------------------------
# Modes

def _check(cfg: GPTConfig, batch: int, q_len: int, past: int) -> None:
    if not isinstance(cfg, GPTConfig):
        raise ValueError(f"config must be a GPTConfig, got {type(cfg).__name__}")
    for name, value, low in (("batch", batch, 1), ("seq_len", q_len, 1), ("past", past, 0)):
        check(name, value, int, low)
    if past + q_len > cfg.block_size:
        raise ValueError(f"{past + q_len} positions (past={past} + seq_len={q_len}) exceed "
                         f"block_size={cfg.block_size}")


def step(cfg: GPTConfig, batch: int, q_len: int, past: int = 0, *, last_only: bool = False) -> Count:
    """One forward call: `batch` rows of `q_len` new tokens after `past` cached positions (keys S = past+q_len).

    last_only=True applies lm_head to the last position only (GPT.forward(..., last_only=True)); ln_f still
    runs on every position, as the model does.
    """
    _check(cfg, batch, q_len, past)
    tokens, keys = batch * q_len, past + q_len
    head_rows = batch if last_only else tokens
    matmul = {
        "qkv": qkv(cfg, tokens),
        "attn_scores": attn_scores(cfg, batch, q_len, keys),
        "attn_values": attn_values(cfg, batch, q_len, keys),
        "attn_proj": attn_proj(cfg, tokens),
        "mlp_up": mlp_up(cfg, tokens),
        "mlp_down": mlp_down(cfg, tokens),
        "lm_head": lm_head(cfg, head_rows),
    }
    non_matmul = {
        "layer_norm": layer_norm(cfg, tokens),
        "attn_scale": attn_scale(cfg, batch, q_len, keys),
        "softmax": softmax(cfg, batch, q_len, keys),
        "gelu": gelu(cfg, tokens),
        "residual_add": residual_add(cfg, tokens),
        "position_add": position_add(cfg, tokens),
        "bias_add": bias_add(cfg, tokens),
        "embedding": embedding(cfg, tokens),
    }
    return Count(matmul, non_matmul, attn_causal(cfg, batch, q_len, past))


def forward(cfg: GPTConfig, batch: int, seq_len: int, *, last_only: bool = False) -> Count:
    """A forward pass over (batch, seq_len) tokens without a cache; lm_head on all positions by default."""
    return step(cfg, batch, seq_len, 0, last_only=last_only)


def train_step(cfg: GPTConfig, batch: int, seq_len: int) -> Count:
    """Forward (lm_head on all positions) + cross-entropy + backward of one micro-batch.

    Backward rule per op: every matmul Y = X @ W costs two matmuls of the same size, dX = dY @ Wᵀ and
    dW = Xᵀ @ dY (attention: dQ, dK for the scores, dP, dV for the values); the input of the first layer
    needs dX too, because the embedding it came from is trained. So matmul FLOPs are exactly 3 × forward.
    Non-matmul backward (convention, no counter measures it): 2 × forward per element-wise op, plus the
    embedding's scatter-add (`embedding_backward`); keys end in "_backward".
    """
    fwd = forward(cfg, batch, seq_len)
    non_matmul = dict(fwd.non_matmul)
    non_matmul["cross_entropy"] = cross_entropy(cfg, batch * seq_len)
    backward = {f"{op}_backward": BACKWARD_ELEMENTWISE * flops for op, flops in non_matmul.items()}
    backward["embedding_backward"] = embedding_backward(cfg, batch * seq_len)
    return Count({k: 3 * v for k, v in fwd.matmul.items()}, {**non_matmul, **backward}, 3 * fwd.causal_attention)


def train_step_flops(config: GPTConfig, batch_size: int, seq_len: int) -> int:
    """Exact forward+backward matmul FLOPs of one micro-batch (train.py multiplies by grad_accum)."""
    return train_step(config, batch_size, seq_len).total


def prefill(cfg: GPTConfig, batch: int, prompt_len: int) -> Count:
    """Generation's first call: the whole prompt into an empty KV cache, logits for the last position only."""
    return step(cfg, batch, prompt_len, 0, last_only=True)


def decode_step(cfg: GPTConfig, batch: int, t: int) -> Count:
    """One cached generation step: 1 new token per row after t cached positions (attention over t+1 keys)."""
    return step(cfg, batch, 1, t, last_only=True)


def generation_calls(cfg: GPTConfig, prompt_len: int, new_tokens: int, *, batch: int = 1,
                     use_cache: bool = True, num_beams: int = 1) -> list[tuple[int, int, int]]:
    """The forward calls that produce `new_tokens` tokens after a `prompt_len`-token prompt, as
    (rows, new tokens, past) triples; every call computes logits for its last position only.

    This is the schedule of model/gpt/sampling.py (generate and beam_search): call k (k = 0..n-1) sees the
    sequence of length p+k cropped to its last block_size tokens (nanoGPT's rule). Without a cache every call
    recomputes that whole window. With a cache the first call prefills the window and later calls feed one
    token, until the window starts to slide (p+k > block_size): positions then shift, so the cache is
    rebuilt and the call costs a full block_size forward, like the uncached one. Beam search prefills the
    `batch` prompts once and then runs batch·num_beams rows; the count assumes no early stop (an upper bound
    when beams finish early).
    """
    for name, value, low in (("prompt_len", prompt_len, 1), ("new_tokens", new_tokens, 0), ("batch", batch, 1),
                             ("num_beams", num_beams, 1)):
        check(name, value, int, low)
    block = cfg.block_size
    calls = []
    for k in range(new_tokens):
        length = prompt_len + k
        rows = batch if k == 0 else batch * num_beams
        window = min(length, block)
        if use_cache and k > 0 and length <= block:
            calls.append((rows, 1, length - 1))
        else:
            calls.append((rows, window, 0))
    return calls


def generation(cfg: GPTConfig, prompt_len: int, new_tokens: int, *, batch: int = 1, use_cache: bool = True,
               num_beams: int = 1) -> Count:
    """FLOPs of generating `new_tokens` tokens per row after a `prompt_len`-token prompt (see generation_calls)."""
    total = ZERO
    for rows, q_len, past in generation_calls(cfg, prompt_len, new_tokens, batch=batch, use_cache=use_cache,
                                              num_beams=num_beams):
        total = total + step(cfg, rows, q_len, past, last_only=True)
    return total


def beam_search(cfg: GPTConfig, prompt_len: int, new_tokens: int, num_beams: int, *, batch: int = 1,
                use_cache: bool = True) -> Count:
    """Beam search with num_beams rows per prompt (see generation_calls)."""
    return generation(cfg, prompt_len, new_tokens, batch=batch, use_cache=use_cache, num_beams=num_beams)
