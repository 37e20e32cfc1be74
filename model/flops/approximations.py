"""Popular FLOP formulas, each audited against the exact count of model/flops/formulas.py.

Every formula is written as its source states it, with the parameter count N it uses named. S (or n_ctx, T)
is the sequence length, d = n_embd, L = n_layer, H = n_head, Q = head_dim, V = vocab_size.
"""
from __future__ import annotations

from dataclasses import dataclass

from . import formulas as exact
from ..config import GPTConfig


def six_n(cfg: GPTConfig, tokens: int, non_embedding: bool = False) -> int:
    """Training ≈ 6·N·D (Kaplan et al. 2020, eq. 2.2 with C ≈ 6N per token; Chinchilla's C ≈ 6ND).
    N = all parameters, or the non-embedding N with non_embedding=True."""
    n = exact.params_non_embedding(cfg) if non_embedding else exact.params_total(cfg)
    return 6 * n * tokens


def kaplan_forward(cfg: GPTConfig, seq_len: int, tokens: int) -> int:
    """Kaplan et al. 2020, Table 1: C_forward ≈ 2N + 2·n_layer·n_ctx·d_attn per token, N non-embedding,
    d_attn = d (no de-embedding term; the context term is the causal attention averaged over positions)."""
    per_token = 2 * exact.params_non_embedding(cfg) + 2 * cfg.n_layer * seq_len * cfg.n_embd
    return per_token * tokens


def kaplan_train(cfg: GPTConfig, seq_len: int, tokens: int) -> int:
    """Kaplan et al. 2020: backward ≈ 2 × forward, so training ≈ 3·C_forward (6N + 6·n_layer·n_ctx·d_attn)."""
    return 3 * kaplan_forward(cfg, seq_len, tokens)


def palm(cfg: GPTConfig, seq_len: int, tokens: int) -> int:
    """PaLM (Chowdhery et al. 2022), App. B: training FLOPs per token = 6N + 12·L·H·Q·T, N = the model's
    parameters (here all of them; nanoGPT's estimate_mfu subtracts the position table, torchtitan all
    embeddings: the paper does not say), T the sequence length; attention on the full T×T square."""
    per_token = 6 * exact.params_total(cfg) + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * seq_len
    return per_token * tokens


def chinchilla_forward_sequence(cfg: GPTConfig, seq_len: int, table_form: bool = False,
                                ffw_size: int | None = None) -> int:
    """Hoffmann et al. 2022 (Chinchilla), App. F, forward FLOPs of one sequence of seq_len tokens:
        embeddings       2·S·V·d          (as a one-hot matmul; our lookup costs 0)
        per layer:  QKV  2·3·S·d·(Q·H)    logits 2·S·S·(Q·H)    softmax 3·H·S·S
                    reductions 2·S·S·(Q·H)    projection 2·S·(Q·H)·d    dense 2·S·(d·F + d·F), F = 4d here
        final logits     2·S·d·V
    The text's total is embeddings + L·(attention + dense) + logits. table_form=True leaves out the
    embeddings and final logits: the only form that reproduces the paper's own Table A4 ratios (nanoGPT's
    scaling_laws.ipynb makes the same change, citing correspondence with the authors)."""
    s, d, v, h, qh = seq_len, cfg.n_embd, cfg.vocab_size, cfg.n_head, cfg.n_head * cfg.head_dim
    f = 4 * d if ffw_size is None else ffw_size
    attention = 2 * 3 * s * d * qh + 2 * s * s * qh + 3 * h * s * s + 2 * s * s * qh + 2 * s * qh * d
    dense = 2 * s * (d * f + d * f)
    ends = 0 if table_form else 2 * s * v * d + 2 * s * d * v
    return ends + cfg.n_layer * (attention + dense)


def chinchilla_train(cfg: GPTConfig, seq_len: int, sequences: int, table_form: bool = False) -> int:
    """Chinchilla App. F training FLOPs: 3 × forward (backward = 2 × forward), per sequence."""
    return 3 * chinchilla_forward_sequence(cfg, seq_len, table_form) * sequences


def blog_forward(cfg: GPTConfig, seq_len: int) -> int:
    """Blog formula "per-token forward ≈ E·V + L·(8E²S + 4EHS + HS²)". Read with E = d, S = sequence length and
    H = the MLP width 4d (the only reading that makes the terms dimensionally sensible): 8E²S is the four
    attention projections over S tokens, 4EHS the MLP over S tokens, HS² = 4d·S² the attention — a whole
    S-token forward, with E·V one position's LM head counted as multiply-adds (half of 2·E·V FLOPs)."""
    e, s, h = cfg.n_embd, seq_len, 4 * cfg.n_embd
    return e * cfg.vocab_size + cfg.n_layer * (8 * e * e * s + 4 * e * h * s + h * s * s)


def per_generated_token_2ns(cfg: GPTConfig, seq_len: int) -> int:
    """Blog formula "per generated token ≈ 2·N·S" (N all parameters, S the context): the cost of
    recomputing the whole context for every new token, as if no KV cache existed."""
    return 2 * exact.params_total(cfg) * seq_len


@dataclass(frozen=True)
class Audit:
    flops: int
    exact: int
    compared_with: str
    source: str

    @property
    def ratio(self) -> float:
        return self.flops / self.exact


def audit(cfg: GPTConfig, batch: int, seq_len: int) -> dict[str, Audit]:
    """Every approximation for `batch` sequences of `seq_len` tokens, beside the exact count it estimates."""
    tokens = batch * seq_len
    fwd = exact.forward(cfg, batch, seq_len).total
    train = exact.train_step(cfg, batch, seq_len).total
    uncached = exact.step(cfg, batch, seq_len, 0, last_only=True).total  # next token, whole context recomputed
    cached = exact.decode_step(cfg, batch, seq_len - 1).total  # next token at context seq_len, with a KV cache
    return {
        "6N": Audit(six_n(cfg, tokens), train, "train step", "Kaplan et al. 2020 eq. 2.2; N = all parameters"),
        "6N_nonembedding": Audit(six_n(cfg, tokens, True), train, "train step",
                                 "Kaplan et al. 2020 eq. 2.2; N = non-embedding parameters"),
        "kaplan_forward": Audit(kaplan_forward(cfg, seq_len, tokens), fwd, "forward",
                                "Kaplan et al. 2020 Table 1: 2N + 2·n_layer·n_ctx·d_attn per token"),
        "kaplan_train": Audit(kaplan_train(cfg, seq_len, tokens), train, "train step",
                              "Kaplan et al. 2020: 3 × C_forward"),
        "palm": Audit(palm(cfg, seq_len, tokens), train, "train step",
                      "PaLM App. B: 6N + 12·L·H·Q·T per token"),
        "chinchilla": Audit(chinchilla_train(cfg, seq_len, batch), train, "train step",
                            "Chinchilla App. F as its text reads: embeddings + L·(attention + dense) + logits, × 3"),
        "chinchilla_table": Audit(chinchilla_train(cfg, seq_len, batch, table_form=True), train, "train step",
                                  "Chinchilla App. F as Table A4 computed it: L·(attention + dense), × 3 "
                                  "(no embedding or logits terms; see --paper chinchilla)"),
        "blog_per_token": Audit(blog_forward(cfg, seq_len) * tokens, fwd, "forward",
                                "blog: E·V + L·(8E²S + 4EHS + HS²) per token, times B·T tokens"),
        "blog_next_token": Audit(blog_forward(cfg, seq_len) * batch, uncached, "uncached next-token step",
                                 "the same blog formula read as one uncached step at context S"),
        "2NS_cached": Audit(per_generated_token_2ns(cfg, seq_len) * batch, cached, "cached decode step",
                            "blog: per generated token ≈ 2·N·S"),
        "2NS_uncached": Audit(per_generated_token_2ns(cfg, seq_len) * batch, uncached, "uncached next-token step",
                              "blog: per generated token ≈ 2·N·S"),
    }
