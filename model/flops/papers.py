"""The papers' own FLOP and parameter tables, reproduced: each published value beside the project's value
under that paper's convention (`ours`) and the project's exact count (`exact`, None where the paper's
architecture is not a GPT this project can build).

Sources (where each number was read):
  gpt3        Brown et al. 2020, arXiv 2005.14165: Table 2.1 (shapes), Appendix D, Table D.1 (compute)
  chinchilla  Hoffmann et al. 2022, arXiv 2203.15556: Appendix F (formula), Table A4 (ratio to 6ND)
  kaplan      Kaplan et al. 2020, arXiv 2001.08361: Table 1 (forward FLOPs per token, per operation)
  palm        Chowdhery et al. 2022, arXiv 2204.02311: Appendix B (6N + 12LHQT, MFU of PaLM and MT-NLG)
  megatron    Narayanan et al. 2021, arXiv 2104.04473: eq. 2, eq. 3, eq. 4 and Table 1
  nanogpt     karpathy/nanoGPT transformer_sizing.ipynb (GPT-2 124M, bias=False)
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

from . import approximations
from . import formulas as exact_flops
from .peaks import peak_by_key
from ..config import GPTConfig


@dataclass(frozen=True)
class Row:
    name: str
    published: float | int
    ours: float | int
    exact: float | int | None
    convention: str

    def as_dict(self) -> dict:
        return {"name": self.name, "published": self.published, "ours": self.ours, "exact": self.exact,
                "ours_over_published": self.ours / self.published,
                "exact_over_published": None if self.exact is None else self.exact / self.published,
                "convention": self.convention}


def _gpt(n_layer: int, n_embd: int, n_head: int, vocab: int, block: int, bias: bool = True) -> GPTConfig:
    return GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=vocab, block_size=block,
                     bias=bias, dropout=0.0)


def _train_exact(cfg: GPTConfig, tokens: int) -> int:
    """Exact training matmul FLOPs of `tokens` tokens in whole sequences of block_size."""
    return -(-tokens // cfg.block_size) * exact_flops.train_step_flops(cfg, 1, cfg.block_size)


# ----------------------------------------------------------------------------------------------------
# GPT-3: Table 2.1 shapes (n_layer, d_model, n_heads); Table D.1 total train compute at 300B tokens

GPT3 = (("Small", 12, 768, 12, 2.25e20), ("Medium", 24, 1024, 16, 6.41e20), ("Large", 24, 1536, 16, 1.37e21),
        ("XL", 24, 2048, 16, 2.38e21), ("2.7B", 32, 2560, 32, 4.77e21), ("6.7B", 32, 4096, 32, 1.20e22),
        ("13B", 40, 5120, 40, 2.31e22), ("175B", 96, 12288, 96, 3.14e23))


def gpt3() -> list[Row]:
    tokens = 300 * 10 ** 9
    rows = []
    for name, n_layer, d, heads, published in GPT3:
        cfg = _gpt(n_layer, d, heads, 50257, 2048)
        rows.append(Row(f"GPT-3 {name}", published, approximations.six_n(cfg, tokens), _train_exact(cfg, tokens),
                        "6·N·D, N = all parameters (Table D.1: 2 forward FLOPs per parameter per token x 3 for "
                        "the backward), attention ignored; exact adds attention and leaves out the embedding "
                        "lookup" + ("; d_model 5120 = 40 x 128 (Table 2.1 prints 5140, which its 40 heads of "
                                    "128 do not divide; 5120 gives Table D.1's 12,850M parameters)"
                                    if name == "13B" else "")
                        + ("; 16 heads of 128 (Table 2.1 prints 24 heads of 128, which is not d_model 2048; the "
                           "head count changes neither N nor any matmul)" if name == "XL" else "")))
    return rows


# ----------------------------------------------------------------------------------------------------
# Chinchilla: Table A4's six models (n_layer, d_model, ffw_size, n_heads, kv_size), V = 32,000, S = 2048

CHINCHILLA_A4 = (("73M", 10, 640, 2560, 10, 64, 1.03), ("305M", 20, 1024, 4096, 16, 64, 1.10),
                 ("552M", 24, 1280, 5120, 10, 128, 1.08), ("1.1B", 26, 1792, 7168, 14, 128, 1.04),
                 ("1.6B", 28, 2048, 8192, 16, 128, 1.03), ("6.8B", 40, 3584, 14336, 28, 128, 0.99))


def chinchilla_params(n_layer: int, d: int, ffw: int, vocab: int) -> int:
    """Chinchilla's N as Table A4's 6ND uses it: per layer QKV 3d² + 3d, relative-position keys and biases
    d² + 2d, output projection d² + d, feed-forward 2·d·ffw + ffw + d, two LayerNorms 4d; final LayerNorm
    2d; the output layer d·V; the input embedding (a lookup) left out."""
    per_layer = 3 * d * d + 3 * d + d * d + 2 * d + d * d + d + 2 * d * ffw + ffw + d + 4 * d
    return n_layer * per_layer + 2 * d + d * vocab


def chinchilla() -> list[Row]:
    rows, seq = [], 2048
    for name, n_layer, d, ffw, heads, kv, published in CHINCHILLA_A4:
        cfg = _gpt(n_layer, d, heads, 32000, seq)
        assert heads * kv == d and ffw == 4 * d  # the six models are GPT-shaped: our formulas apply
        six_nd = Fraction(6 * chinchilla_params(n_layer, d, ffw, 32000) * seq)
        text = approximations.chinchilla_train(cfg, seq, 1)
        table = approximations.chinchilla_train(cfg, seq, 1, table_form=True)
        rows.append(Row(f"{name}: App. F / 6ND", published, float(table / six_nd),
                        float(exact_flops.train_step_flops(cfg, 1, seq) / six_nd),
                        f"Table A4's form: App. F without its embedding and logits terms (the text's full "
                        f"formula gives {float(text / six_nd):.3f}); N = Chinchilla's count, no input "
                        f"embedding; exact = our matmul count (no softmax term) over the same 6ND"))
    return rows


# ----------------------------------------------------------------------------------------------------
# Kaplan et al. Table 1: forward FLOPs per token, by operation, for GPT-2 124M (n_ctx = 1024)

def kaplan() -> list[Row]:
    cfg = GPTConfig(dropout=0.0)
    L, d, T, V = cfg.n_layer, cfg.n_embd, cfg.block_size, cfg.vocab_size
    fwd = exact_flops.forward(cfg, 1, T)
    causal_per_token = Fraction(exact_flops.attn_causal(cfg, 1, T, 0), T)
    per_token = {k: Fraction(v, T) for k, v in fwd.matmul.items()}
    n = exact_flops.params_non_embedding(cfg)
    c_forward = 2 * n + 2 * L * T * d
    same = "same matmul, per token"
    rows = [("Attention: QKV  2·L·d·3·d_attn", 2 * L * d * 3 * d, per_token["qkv"], per_token["qkv"], same),
            ("Attention: mask  2·L·n_ctx·d_attn", 2 * L * T * d, causal_per_token,
             per_token["attn_scores"] + per_token["attn_values"],
             "ours = q@kᵀ and att@v on the causal triangle, averaged over the n_ctx positions (2·L·d·(n_ctx+1)); "
             "exact = the full square dense kernels compute, 2x"),
            ("Attention: project  2·L·d_attn·d", 2 * L * d * d, per_token["attn_proj"], per_token["attn_proj"], same),
            ("Feedforward  2·L·2·d·d_ff", 2 * L * 2 * d * 4 * d, per_token["mlp_up"] + per_token["mlp_down"],
             per_token["mlp_up"] + per_token["mlp_down"], same),
            ("De-embed  2·d·n_vocab", 2 * d * V, per_token["lm_head"], per_token["lm_head"],
             same + "; Table 1 lists it but C_forward leaves it out"),
            ("C_forward = 2N + 2·L·n_ctx·d_attn", c_forward, c_forward, Fraction(fwd.total, T),
             "N = non-embedding parameters (LayerNorm weights included here); exact = every matmul, the "
             "de-embedding and the full attention square included")]
    return [Row(name, pub, _num(ours), _num(ex), conv) for name, pub, ours, ex, conv in rows]


def _num(x: Fraction) -> int | float:
    return int(x) if x.denominator == 1 else float(x)


# ----------------------------------------------------------------------------------------------------
# PaLM Appendix B: model FLOPs per token 6N + 12·L·H·Q·T, and the MFU it reports

def palm() -> list[Row]:
    tpu_v4, a100 = 275e12, peak_by_key("a100").flops
    # (name, N, L, H, Q, T, tokens/s, chips, peak per chip, published MFU without / with attention)
    runs = (("PaLM 540B", 540.35e9, 118, 48, 256, 2048, 238.3e3, 6144, tpu_v4, 0.457, 0.462),
            ("MT-NLG 530B", 530e9, 105, 128, 160, 2048, 65.43e3, 2240, a100, 0.297, 0.302))
    rows = []
    for name, n, L, H, Q, T, rate, chips, peak, without, with_attn in runs:
        system = chips * peak
        rows.append(Row(f"{name} MFU without attention", without, rate * 6 * n / system, None,
                        f"6N per token x {rate:,.0f} tokens/s / ({chips} x {peak / 1e12:g} TFLOP/s)"))
        rows.append(Row(f"{name} MFU with attention", with_attn, rate * (6 * n + 12 * L * H * Q * T) / system,
                        None, f"(6N + 12·L·H·Q·T) per token, L={L} H={H} Q={Q} T={T}; attention on the full "
                              f"square, no recomputation (that is HFU)"))
    return rows


# ----------------------------------------------------------------------------------------------------
# Megatron-LM (Narayanan et al. 2021): Table 1's models (heads, h, l, batch B, published params in billions)

MEGATRON_TABLE1 = ((24, 2304, 24, 512, 1.7), (32, 3072, 30, 512, 3.6), (32, 4096, 36, 512, 7.5),
                   (48, 6144, 40, 1024, 18.4), (64, 8192, 48, 1536, 39.1), (80, 10240, 60, 1792, 76.1),
                   (96, 12288, 80, 2304, 145.6), (128, 16384, 96, 2160, 310.1), (128, 20480, 105, 2520, 529.6),
                   (160, 25600, 128, 3072, 1008.0))


def megatron_params(l: int, h: int, V: int = 51200, s: int = 2048) -> int:
    """eq. 2: P = 12·l·h²·(1 + 13/(12h) + (V + s)/(12·l·h)) = 12·l·h² + 13·l·h + (V + s)·h."""
    return 12 * l * h * h + 13 * l * h + (V + s) * h


def megatron_flops(B: int, s: int, l: int, h: int, V: int = 51200) -> int:
    """eq. 3, FLOPs per iteration with activation recomputation:
    96·B·s·l·h²·(1 + s/(6h) + V/(16·l·h)) = 96·B·s·l·h² + 16·B·s²·l·h + 6·B·s·h·V."""
    return 96 * B * s * l * h * h + 16 * B * s * s * l * h + 6 * B * s * h * V


def megatron() -> list[Row]:
    rows = []
    for heads, h, l, B, published in MEGATRON_TABLE1:
        cfg = _gpt(l, h, heads, 51200, 2048)
        rows.append(Row(f"{published:g}B parameters (Table 1; l={l} h={h})", published * 1e9,
                        megatron_params(l, h), exact_flops.params_total(cfg),
                        "eq. 2 with biases; exact adds the final LayerNorm's 2h, which eq. 2 leaves out"))
    for heads, h, l, B, published in MEGATRON_TABLE1[6:7] + MEGATRON_TABLE1[-1:]:
        cfg = _gpt(l, h, heads, 51200, 2048)
        train = exact_flops.train_step(cfg, B, 2048).matmul
        recompute = sum(v for k, v in train.items() if k != "lm_head") // 3  # one more forward per layer
        rows.append(Row(f"eq. 3 FLOPs per iteration, l={l} h={h} B={B}", megatron_flops(B, 2048, l, h),
                        sum(train.values()) + recompute, sum(train.values()),
                        "published = eq. 3 evaluated; ours = our exact count plus the recomputed forward of "
                        "every layer (eq. 3's activation recomputation: 4 forwards' worth per layer, logits 3); "
                        "exact counts no recomputation (the MFU convention)"))
    day = 86400
    for name, tokens, P, n, X, published in (("GPT-3 175B: 300B tokens, 1024 GPUs at 140 TFLOP/s", 300e9, 175e9,
                                              1024, 140e12, 34),
                                             ("1T: 450B tokens, 3072 GPUs at 163 TFLOP/s", 450e9, 1008.0e9,
                                              3072, 163e12, 84)):
        rows.append(Row(f"eq. 4 training days, {name}", published, 8 * tokens * P / (n * X) / day, None,
                        "8·T·P/(n·X): eq. 3 without its small terms (4 forwards x 2·P per token)"))
    return rows


# ----------------------------------------------------------------------------------------------------
# nanoGPT transformer_sizing.ipynb: GPT-2 124M without biases, block 1024

def nanogpt() -> list[Row]:
    cfg = GPTConfig(bias=False, dropout=0.0)
    T = cfg.block_size
    fwd = exact_flops.forward(cfg, 1, T).total
    train = exact_flops.train_step_flops(cfg, 1, T)
    palm_flops = approximations.palm(cfg, T, T)
    matmuls = "matmul FLOPs only, 2 per multiply-add, attention on the full square, backward = 2 x forward"
    return [Row("parameters", 124_337_664, exact_flops.params_total(cfg), exact_flops.params_total(cfg),
                "all parameters, the tied head counted once"),
            Row("forward FLOPs per sequence", 291_648_307_200, fwd, fwd, matmuls),
            Row("training FLOPs per sequence", 874_944_921_600, train, train, matmuls),
            Row("PaLM formula per sequence", 879_894_724_608, palm_flops, train,
                "(6N + 12·L·H·Q·T)·T with N = all parameters; exact = our count"),
            Row("MFU of 100 sequences in 0.755 s on an A100", 0.3714, train * 100 / 0.755 / peak_by_key("a100").flops,
                None, "training FLOPs x 100 / 0.755 s / 312 TFLOP/s (A100 dense bf16)")]


PAPERS = {
    "gpt3": (gpt3, "Brown et al. 2020, Language Models are Few-Shot Learners (arXiv 2005.14165): Table 2.1 "
                   "shapes, Appendix D Table D.1 total train compute (flops) at 300B tokens"),
    "chinchilla": (chinchilla, "Hoffmann et al. 2022, Training Compute-Optimal Large Language Models (arXiv "
                               "2203.15556): Appendix F FLOPs formula, Table A4 ratio to 6ND (V = 32,000, "
                               "sequence 2048)"),
    "kaplan": (kaplan, "Kaplan et al. 2020, Scaling Laws for Neural Language Models (arXiv 2001.08361): Table 1 "
                       "forward-pass FLOPs per token, evaluated for GPT-2 124M (n_ctx 1024)"),
    "palm": (palm, "Chowdhery et al. 2022, PaLM (arXiv 2204.02311): Appendix B model FLOPs 6N + 12LHQT per token "
                   "and the MFU of PaLM 540B and Megatron-Turing NLG 530B"),
    "megatron": (megatron, "Narayanan et al. 2021, Efficient Large-Scale Language Model Training on GPU Clusters "
                           "Using Megatron-LM (arXiv 2104.04473): eq. 2, eq. 3, eq. 4 (Section 5.1), Table 1"),
    "nanogpt": (nanogpt, "karpathy/nanoGPT, transformer_sizing.ipynb (GPT-2 124M, bias=False, block 1024)"),
}


def paper_table(name: str) -> dict:
    """{"paper", "source", "rows": [...]} for a name in PAPERS; ValueError naming the known ones."""
    if name not in PAPERS:
        raise ValueError(f"unknown paper {name!r}; known: {', '.join(PAPERS)}")
    build, source = PAPERS[name]
    return {"paper": name, "source": source, "rows": [row.as_dict() for row in build()]}


def _g(x) -> str:
    if x is None:
        return "—"
    return f"{x:,}" if isinstance(x, int) and abs(x) < 10 ** 12 else f"{x:.4g}"


def render_table(table: dict) -> str:
    """A paper_table as `python flops.py --paper NAME` prints it: each row's published value, ours under the
    paper's convention and the exact count, with the ratios; then each convention once."""
    rows = table["rows"]
    lines = [f"{table['paper']}: {table['source']}",
             f"{'row':<50}{'published':>16}{'ours':>16}{'exact':>16}{'ours/pub':>10}{'exact/pub':>10}"]
    notes = []
    for i, r in enumerate(rows):
        ratio = "—" if r["exact_over_published"] is None else f"{r['exact_over_published']:.4f}"
        lines.append(f"{r['name'][:49]:<50}{_g(r['published']):>16}{_g(r['ours']):>16}{_g(r['exact']):>16}"
                     f"{r['ours_over_published']:>10.4f}{ratio:>10}")
        if i == 0 or r["convention"] != rows[i - 1]["convention"]:  # a run of rows sharing one is listed once
            notes.append(f"  {r['name']}: {r['convention']}")
    return "\n".join(lines + ["", "conventions (ours = the paper's convention applied to our formulas; exact = "
                                   "this project's matmul count):"] + notes)


def markdown() -> str:
    """The papers' section of docs/flops.md: every table as `python flops.py --paper NAME` prints it."""
    parts = []
    for name in PAPERS:
        parts += [f"### {name}", "", "```", f"$ python flops.py --paper {name}", render_table(paper_table(name)),
                  "```", ""]
    return "\n".join(parts)
