"""Analytic FLOP formulas (model/flops/formulas.py): hand-worked values, parameter counts, modes, approximations."""
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model import GPT, GPTConfig
from model.flops import approximations as approx
from model.flops import formulas as flops

GPT2 = GPTConfig()  # GPT-2 124M: V=50257, L=12, d=768, block 1024


def tiny(**kw) -> GPTConfig:
    """B=1, T=2, d=4 example: 1 layer, 2 heads of 2, vocab 3, block 2."""
    base = dict(vocab_size=3, block_size=2, n_layer=1, n_head=2, n_embd=4)
    return GPTConfig(**{**base, **kw})


def test_gpt2_124m_check_values():
    # the project's check values: head on all 1024 positions
    assert flops.forward(GPT2, 1, 1024).total == 291_648_307_200
    assert flops.train_step(GPT2, 1, 1024).total == 874_944_921_600
    assert flops.train_step_flops(GPT2, 1, 1024) == 874_944_921_600
    # per token: 24·L·d² + 4·L·T·d + 2·d·V = 169,869,312 + 37,748,736 + 77,194,752
    assert flops.forward(GPT2, 1, 1024).total == 1024 * (169_869_312 + 37_748_736 + 77_194_752)


def test_tiny_shape_worked_by_hand():
    c = tiny()
    f = flops.forward(c, 1, 2)
    # qkv: (2 tokens, 4) @ (4, 12): 2·2·4·12 = 192
    # scores: 2 heads × (2, 2) @ (2, 2): 2·2·2·2·2 = 32; values the same: 32
    # attn_proj: (2, 4) @ (4, 4): 2·2·4·4 = 64; mlp_up (2, 4) @ (4, 16) and mlp_down (2, 16) @ (16, 4): 256 each
    # lm_head: (2, 4) @ (4, 3): 2·2·4·3 = 48
    assert f.matmul == {"qkv": 192, "attn_scores": 32, "attn_values": 32, "attn_proj": 64, "mlp_up": 256,
                        "mlp_down": 256, "lm_head": 48}
    assert f.total == 880
    # causal: query 0 sees 1 key, query 1 sees 2: 3 of the 4 pairs; scores+values = 2·(2·3 pairs·2 hs·2 heads)
    assert f.causal_attention == 48 and f.causal_total == 880 - 64 + 48
    assert flops.train_step(c, 1, 2).total == 3 * 880
    # non-matmul: 3 layer norms × 8 elements × (5 + scale + shift) = 168; 8 scores: scale 8, softmax 40;
    # gelu 9 × 2·16 = 288; residual 2 × 8 = 16; position 8; biases 2·(12 + 4 + 16 + 4) = 72
    assert f.non_matmul == {"layer_norm": 168, "attn_scale": 8, "softmax": 40, "gelu": 288, "residual_add": 16,
                            "position_add": 8, "bias_add": 72, "embedding": 0}
    assert flops.forward(tiny(bias=False), 1, 2).non_matmul["layer_norm"] == 3 * 8 * 6
    assert flops.forward(tiny(bias=False), 1, 2).non_matmul["bias_add"] == 0


def test_tiny_decode_and_last_only_by_hand():
    c = tiny(block_size=4)
    d = flops.decode_step(c, 1, 2)  # 1 new token after 2 cached: attention over 3 keys, head on 1 row
    assert d.matmul == {"qkv": 96, "attn_scores": 2 * 1 * 3 * 4, "attn_values": 24, "attn_proj": 32, "mlp_up": 128,
                        "mlp_down": 128, "lm_head": 24}
    assert d.causal_attention == d.attention  # one query sees every key
    last = flops.forward(c, 2, 3, last_only=True)
    assert last.matmul["lm_head"] == 2 * 2 * 4 * 3  # 2 rows, not 6
    assert last.non_matmul["layer_norm"] == flops.forward(c, 2, 3).non_matmul["layer_norm"]  # ln_f runs on all


def test_tiny_params_by_hand():
    # wte 3·4 + wpe 2·4 + layer (12·16 + 2·4 + 11·4 = 244) + ln_f (4 + 4) = 272
    assert flops.params_total(tiny()) == 272
    assert flops.params_non_embedding(tiny()) == 272 - 12 - 8
    assert flops.params_kaplan(tiny()) == 12 * 16


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("pos", ["learned", "sinusoidal"])
def test_param_counts_equal_the_model(bias, pos):
    for shape in [dict(n_layer=2, n_embd=32, n_head=4, block_size=16, vocab_size=37),
                  dict(n_layer=3, n_embd=24, n_head=3, block_size=5, vocab_size=11)]:
        cfg = GPTConfig(bias=bias, pos_encoding=pos, **shape)
        model = GPT(cfg)
        assert flops.params_total(cfg) == model.num_params()
        assert flops.params_non_embedding(cfg) == model.num_params(non_embedding=True)


def test_gpt2_family_parameter_counts():
    # the published sizes: 124M, 350M, 774M, 1558M
    shapes = {(12, 768, 12): 124_439_808, (24, 1024, 16): 354_823_168, (36, 1280, 20): 774_030_080,
              (48, 1600, 25): 1_557_611_200}
    for (L, d, h), n in shapes.items():
        assert flops.params_total(GPTConfig(n_layer=L, n_embd=d, n_head=h)) == n


def test_causal_pairs():
    assert flops.attn_causal_pairs(4, 0) == 1 + 2 + 3 + 4
    assert flops.attn_causal_pairs(1, 9) == 10
    assert flops.attn_causal_pairs(3, 5) == 6 + 7 + 8
    f = flops.forward(GPT2, 1, 1024)
    assert f.causal_attention * 1024 * 2 == f.attention * 1025  # T(T+1)/2 of T² pairs


def test_train_step_rule_per_component_and_non_matmul():
    c = GPTConfig(n_layer=2, n_embd=16, n_head=2, block_size=8, vocab_size=10)
    fwd, train = flops.forward(c, 2, 8), flops.train_step(c, 2, 8)
    assert train.matmul == {k: 3 * v for k, v in fwd.matmul.items()}
    assert train.non_matmul["cross_entropy"] == 16 * (4 * 10 + 3)
    assert train.non_matmul["softmax_backward"] == 2 * fwd.non_matmul["softmax"]
    assert train.non_matmul["embedding_backward"] == 2 * 16 * 16  # wte and wpe scatter-adds
    s = GPTConfig(n_layer=2, n_embd=16, n_head=2, block_size=8, vocab_size=10, pos_encoding="sinusoidal")
    assert flops.train_step(s, 2, 8).non_matmul["embedding_backward"] == 16 * 16


def test_count_addition_and_scaling():
    a, b = flops.forward(tiny(), 1, 2), flops.decode_step(tiny(block_size=4), 1, 2)
    s = a + b
    assert s.total == a.total + b.total and s.causal_total == a.causal_total + b.causal_total
    assert s.non_matmul_total == a.non_matmul_total + b.non_matmul_total
    assert a.times(3).total == 3 * a.total


def test_generation_schedule():
    c = GPTConfig(n_layer=1, n_embd=8, n_head=2, block_size=6, vocab_size=5)
    # prompt 3, 5 new tokens: prefill 3, then 1 token after 3, 4, 5 cached; at length 7 > 6 the window slides
    assert flops.generation_calls(c, 3, 5) == [(1, 3, 0), (1, 1, 3), (1, 1, 4), (1, 1, 5), (1, 6, 0)]
    assert flops.generation_calls(c, 3, 5, use_cache=False) == [(1, 3, 0), (1, 4, 0), (1, 5, 0), (1, 6, 0),
                                                                 (1, 6, 0)]
    assert flops.generation_calls(c, 9, 2) == [(1, 6, 0), (1, 6, 0)]  # prompt longer than the block
    assert flops.generation_calls(c, 2, 3, batch=2, num_beams=4) == [(2, 2, 0), (8, 1, 2), (8, 1, 3)]
    assert flops.generation_calls(c, 2, 0) == []
    g = flops.generation(c, 3, 5)
    assert g.total == sum(flops.step(c, *call, last_only=True).total for call in flops.generation_calls(c, 3, 5))
    assert flops.beam_search(c, 2, 3, 4, batch=2).total == flops.generation(c, 2, 3, batch=2, num_beams=4).total


def test_cache_saves_compute_within_the_block():
    cached = flops.generation(GPT2, 16, 100)
    uncached = flops.generation(GPT2, 16, 100, use_cache=False)
    assert cached.total < uncached.total / 10
    # the cached decode step: 2N_matmul + attention over the context, far below a full forward
    d = flops.decode_step(GPT2, 1, 1023)
    assert d.total == 2 * (12 * 12 * 768 ** 2 + 768 * 50257) + 2 * 2 * 1024 * 768 * 12


@pytest.mark.parametrize("call", [
    lambda: flops.forward(GPT2, 0, 8), lambda: flops.forward(GPT2, 1, 0), lambda: flops.forward(GPT2, 1, 1025),
    lambda: flops.step(GPT2, 1, 4, past=1021), lambda: flops.step(GPT2, 1, 4, past=-1),
    lambda: flops.decode_step(GPT2, 1, 1024), lambda: flops.forward("gpt2", 1, 8),
    lambda: flops.forward(GPT2, True, 8), lambda: flops.generation(GPT2, 0, 4),
    lambda: flops.generation(GPT2, 4, -1), lambda: flops.beam_search(GPT2, 4, 4, 0)])
def test_bad_inputs_raise_value_error(call):
    with pytest.raises(ValueError):
        call()


def test_approximations_by_hand():
    c = GPT2
    n, n_ne = 124_439_808, 85_056_000
    assert approx.six_n(c, 1024) == 6 * n * 1024
    assert approx.six_n(c, 1024, non_embedding=True) == 6 * n_ne * 1024
    assert approx.kaplan_forward(c, 1024, 1024) == (2 * n_ne + 2 * 12 * 1024 * 768) * 1024
    assert approx.palm(c, 1024, 1024) == (6 * n + 12 * 12 * 12 * 64 * 1024) * 1024
    s, v, d, L = 1024, 50257, 768, 12
    per_layer = 2 * 3 * s * d * d + 2 * s * s * d + 3 * 12 * s * s + 2 * s * s * d + 2 * s * d * d + 2 * s * 8 * d * d
    assert approx.chinchilla_forward_sequence(c, s) == 2 * s * v * d + L * per_layer + 2 * s * d * v
    assert approx.blog_forward(c, s) == d * v + L * (8 * d * d * s + 4 * d * 4 * d * s + 4 * d * s * s)
    assert approx.per_generated_token_2ns(c, s) == 2 * n * s


def test_audit_ratios_for_gpt2():
    a = approx.audit(GPT2, 1, 1024)
    assert a["palm"].ratio == pytest.approx(880_522_297_344 / 874_944_921_600)
    assert 0.87 < a["6N"].ratio < 0.88  # 6N misses attention but counts the embedding lookup as a matmul
    assert a["6N_nonembedding"].ratio < a["6N"].ratio  # and without the head it misses more
    # the blog forward formula is a whole uncached step, not a per-token cost
    assert a["blog_per_token"].ratio > 500
    assert a["blog_next_token"].ratio == pytest.approx(1.0, abs=1e-3)
    # "2NS per generated token" ignores the KV cache
    assert a["2NS_cached"].ratio > 800 and 1.1 < a["2NS_uncached"].ratio < 1.3
    for item in a.values():
        assert item.exact > 0 and math.isfinite(item.ratio)


@st.composite
def shapes(draw):
    n_head = draw(st.integers(1, 4))
    cfg = GPTConfig(n_layer=draw(st.integers(1, 4)), n_head=n_head, n_embd=n_head * draw(st.integers(1, 8)),
                    vocab_size=draw(st.integers(2, 100)), block_size=draw(st.integers(3, 32)),
                    bias=draw(st.booleans()))
    seq_len = draw(st.integers(1, cfg.block_size - 2))  # room to grow by one, and for a decode step after it
    return cfg, draw(st.integers(1, 4)), seq_len


@settings(max_examples=60, deadline=None)
@given(shapes(), st.sampled_from(["n_layer", "n_embd", "vocab_size", "batch", "seq_len", "n_head"]))
def test_formulas_monotone_in_every_size(shape, size):
    cfg, batch, seq_len = shape
    big_cfg = cfg
    if size == "n_embd":
        big_cfg = GPTConfig(**{**cfg.__dict__, "n_embd": cfg.n_embd + cfg.n_head})
    elif size == "n_head":  # more heads at the same width: same matmuls, more scores to scale and softmax
        big_cfg = GPTConfig(**{**cfg.__dict__, "n_head": cfg.n_embd, "n_embd": cfg.n_embd})
    elif size in ("n_layer", "vocab_size"):
        big_cfg = GPTConfig(**{**cfg.__dict__, size: getattr(cfg, size) + 1})
    b2, t2 = batch + (size == "batch"), seq_len + (size == "seq_len")
    for mode in (lambda c, b, t: flops.forward(c, b, t), lambda c, b, t: flops.train_step(c, b, t),
                 lambda c, b, t: flops.decode_step(c, b, t)):
        small, big = mode(cfg, batch, seq_len), mode(big_cfg, b2, t2)
        if size == "n_head":
            assert big.total == small.total and big.non_matmul_total >= small.non_matmul_total
        else:
            assert big.total > small.total and big.causal_total > small.causal_total
            assert big.non_matmul_total >= small.non_matmul_total
