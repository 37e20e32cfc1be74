"""Measured FLOPs (fvcore + torch FlopCounterMode, model/flops/counters.py) equal the analytic formulas exactly."""
import itertools
import random

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

from model import GPTConfig
from model.flops import formulas as flops
from model.flops.counters import (FVCORE_RULES, attention_backward_formula, attention_forward_formula, build_model,
                            fvcore_count, fvcore_default_count, fvcore_module_count, torch_count,
                            torch_formulas)

TORCH_COMPONENTS = ("qkv", "attn_proj", "mlp_up", "mlp_down", "lm_head")


def random_configs(n: int = 32, seed: int = 0):
    """n configurations cycling through attention x positions x bias, random sizes, batch 1..4, T <= block."""
    rng = random.Random(seed)
    combos = list(itertools.product(("sdpa", "manual"), ("learned", "sinusoidal"), (True, False)))
    out = []
    for i in range(n):
        attention, pos, bias = combos[i % len(combos)]
        n_head = rng.randint(1, 4)
        cfg = GPTConfig(vocab_size=rng.randint(2, 97), block_size=rng.randint(1, 24), n_layer=rng.randint(1, 3),
                        n_head=n_head, n_embd=n_head * rng.randint(1, 8), bias=bias, pos_encoding=pos,
                        attention=attention, dropout=rng.choice([0.0, 0.1]))
        out.append((cfg, rng.randint(1, 4), rng.randint(1, cfg.block_size)))
    return out


CONFIGS = random_configs()


def assert_matches(cfg, batch, seq_len):
    analytic = flops.forward(cfg, batch, seq_len)
    model = build_model(cfg)
    fv = fvcore_count(cfg, batch, seq_len, model=model)
    assert fv.unsupported == {}
    assert fv.matmul == analytic.matmul  # per component, integers
    assert fv.total == analytic.total == 2 * fv.macs
    assert fv.non_matmul == {k: v for k, v in analytic.non_matmul.items() if v}
    tf = torch_count(cfg, batch, seq_len, model=model)
    assert tf.total == tf.forward == analytic.total
    assert {k: tf.components[k] for k in TORCH_COMPONENTS} == {k: analytic.matmul[k] for k in TORCH_COMPONENTS}
    assert tf.components["attention"] == analytic.attention
    tt = torch_count(cfg, batch, seq_len, train=True, model=model)
    assert tt.total == flops.train_step(cfg, batch, seq_len).total
    assert tt.forward == analytic.total and tt.components == tf.components


def test_random_configurations_cover_every_variant():
    assert len(CONFIGS) >= 30
    assert {(c.attention, c.pos_encoding, c.bias) for c, _, _ in CONFIGS} == set(
        itertools.product(("sdpa", "manual"), ("learned", "sinusoidal"), (True, False)))
    assert {b for _, b, _ in CONFIGS} == {1, 2, 3, 4}


@pytest.mark.parametrize("cfg,batch,seq_len", CONFIGS)
def test_analytic_equals_fvcore_and_torch(cfg, batch, seq_len):
    assert_matches(cfg, batch, seq_len)


@pytest.mark.parametrize("attention", ["sdpa", "manual"])
def test_gpt2_124m_measured(attention):
    cfg = GPTConfig(attention=attention)
    fv = fvcore_count(cfg, 1, 1024)
    assert fv.total == 291_648_307_200 and fv.macs == 145_824_153_600 and fv.unsupported == {}
    tt = torch_count(cfg, 1, 1024, train=True)
    assert tt.forward == 291_648_307_200 and tt.total == 874_944_921_600


@pytest.mark.parametrize("attention", ["sdpa", "manual"])
@pytest.mark.parametrize("pos", ["learned", "sinusoidal"])
def test_kv_cache_steps_equal_measurement(attention, pos):
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=8, block_size=12, vocab_size=13, attention=attention,
                    pos_encoding=pos)
    model = build_model(cfg)
    for batch, q_len, past in [(1, 1, 5), (3, 1, 11), (2, 4, 3), (2, 7, 0)]:  # decode, full cache, chunk, prefill
        analytic = flops.step(cfg, batch, q_len, past, last_only=True)
        fv = fvcore_count(cfg, batch, q_len, past=past, last_only=True, model=model)
        assert fv.unsupported == {} and fv.matmul == analytic.matmul
        assert fv.non_matmul == {k: v for k, v in analytic.non_matmul.items() if v}
        tf = torch_count(cfg, batch, q_len, past=past, last_only=True, model=model)
        assert tf.total == analytic.total and tf.components["attention"] == analytic.attention
    assert flops.decode_step(cfg, 3, 11).total == torch_count(cfg, 3, 1, past=11, last_only=True).total


def test_training_forward_trace_counts_cross_entropy():
    cfg = GPTConfig(n_layer=1, n_head=2, n_embd=8, block_size=6, vocab_size=11, attention="manual")
    fv = fvcore_count(cfg, 2, 6, with_loss=True)
    assert fv.unsupported == {}
    assert fv.non_matmul["cross_entropy"] == flops.cross_entropy(cfg, 12) == 12 * (4 * 11 + 3)
    assert fv.total == flops.forward(cfg, 2, 6).total


def test_cpu_flash_attention_is_missed_by_torch_and_restored_by_our_formulas():
    # torch 2.13 on CPU runs sdpa as _scaled_dot_product_flash_attention_for_cpu, which has no formula:
    # attention counts 0 in eval (no_grad) and in training, unless the project's formulas are registered
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=17, attention="sdpa")
    torch.manual_seed(0)
    model = build_model(cfg, "cpu")
    fwd, train = flops.forward(cfg, 2, 8), flops.train_step(cfg, 2, 8)
    raw_eval = torch_count(cfg, 2, 8, model=model, formulas=False)
    raw_train = torch_count(cfg, 2, 8, train=True, model=model, formulas=False)
    assert raw_eval.total == fwd.total - fwd.attention
    assert raw_train.total == train.total - train.attention
    assert torch_count(cfg, 2, 8, model=model).total == fwd.total
    assert torch_count(cfg, 2, 8, train=True, model=model).total == train.total
    # the manual path is plain bmm: counted on CPU as on meta
    manual = GPTConfig(**{**cfg.__dict__, "attention": "manual"})
    assert torch_count(manual, 2, 8, model=build_model(manual, "cpu"), formulas=False).total == fwd.total


def test_attention_formulas_by_hand():
    q, k, v = (2, 3, 5, 7), (2, 3, 11, 7), (2, 3, 11, 4)
    # scores 2·(2·3)·5·11·7, values 2·(2·3)·5·11·4
    assert attention_forward_formula(q, k, v) == 2 * 6 * 5 * 11 * (7 + 4) == 7260
    assert attention_backward_formula((2, 3, 5, 4), q, k, v) == 2 * 7260
    aten, mapping = torch.ops.aten, torch_formulas()
    assert mapping[aten._scaled_dot_product_flash_attention_for_cpu] is attention_forward_formula
    for op in (aten._scaled_dot_product_flash_attention_for_cpu_backward,
               aten._scaled_dot_product_flash_attention_backward, aten._scaled_dot_product_efficient_attention_backward,
               aten._scaled_dot_product_cudnn_attention_backward):
        assert mapping[op] is attention_backward_formula  # 4 matmuls, not torch's 5 (recomputation)


def test_fvcore_out_of_the_box_misses_attention_and_nonmatmul_ops():
    cfg = GPTConfig()
    total, unsupported = fvcore_default_count(cfg, 1, 1024)
    # its own handles: linear + layer_norm at 5/element in multiply-adds; sdpa, gelu, add, embedding count 0
    assert total == 126_496_800_768 + 5 * 25 * 1024 * 768
    assert unsupported["aten::scaled_dot_product_attention"] == 12
    assert {"aten::gelu", "aten::add", "aten::embedding"} <= set(unsupported)


class Einsum(nn.Module):
    def forward(self, a, b):
        return torch.einsum("bhqd,bhkd->bhqk", a, b)


def test_einsum_counted_exactly_where_fvcore_rounds():
    a, b = torch.zeros(3, 7, 11, 13), torch.zeros(3, 7, 17, 13)
    exact = 3 * 7 * 11 * 17 * 13  # 51,051 multiply-adds: 5 significant digits
    counts, unsupported = fvcore_module_count(Einsum(), (a, b))
    assert counts == {"other_matmul": exact} and unsupported == {}
    from fvcore.nn import FlopCountAnalysis  # imported quietly by the call above
    default = FlopCountAnalysis(Einsum(), (a, b))
    default.unsupported_ops_warnings(False)
    assert default.total() != exact  # fvcore's handle keeps 4 significant digits


class Relu(nn.Module):
    def forward(self, x):
        return torch.relu(x) + x


def test_strict_counter_reports_ops_without_a_rule():
    # fvcore ignores relu silently; here an op without a rule is never a silent 0
    counts, unsupported = fvcore_module_count(Relu(), (torch.zeros(2, 3),))
    assert unsupported == {"aten::relu": 1} and counts == {"add": 6}
    assert "aten::relu" not in FVCORE_RULES


def test_every_rule_is_documented():
    for name, rule in FVCORE_RULES.items():
        assert name.startswith("aten::") and rule.rule and callable(rule.handle)


def simulate_generation(model, prompt_len, new_tokens, batch, use_cache, num_beams):
    """Drive the model the way model/gpt/sampling.py does (crop to block_size; cache refilled when the window
    slides; beams expand after the prefill), counting with FlopCounterMode."""
    block = model.config.block_size
    seqs = torch.zeros(batch, prompt_len + new_tokens, dtype=torch.long, device="meta")  # (B, p+n)
    cache = model.new_cache(batch, min(block, prompt_len + new_tokens)) if use_cache else None
    counter = FlopCounterMode(display=False)
    start = 0
    with counter, torch.no_grad():
        for k in range(new_tokens):
            length = prompt_len + k
            if k == 1 and num_beams > 1:
                seqs = seqs.repeat_interleave(num_beams, dim=0)  # (B·nb, p+n)
                if cache is not None:
                    cache.reorder(torch.arange(batch, device="meta").repeat_interleave(num_beams))
            window_start = max(0, length - block)
            if cache is not None and k > 0 and window_start == start and cache.pos == length - start - 1:
                x = seqs[:, length - 1:length]  # (rows, 1)
            else:
                if cache is not None:
                    cache.reset()
                    start = window_start
                x = seqs[:, window_start:length]  # (rows, <= block)
            model(x, kv_cache=cache, last_only=True)
    return counter.get_total_flops()


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("num_beams", [1, 3])
def test_generation_equals_measurement(use_cache, num_beams):
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=8, block_size=10, vocab_size=13)
    model = build_model(cfg).eval()
    for prompt_len, new_tokens in [(3, 5), (4, 9), (12, 3), (1, 1)]:
        measured = simulate_generation(model, prompt_len, new_tokens, 2, use_cache, num_beams)
        analytic = flops.generation(cfg, prompt_len, new_tokens, batch=2, use_cache=use_cache, num_beams=num_beams)
        assert measured == analytic.total


@pytest.mark.slow
def test_sampling_module_runs_the_counted_schedule():
    from model.gpt import sampling
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=11)
    torch.manual_seed(0)
    model = build_model(cfg, "cpu")
    idx = torch.zeros(2, 3, dtype=torch.long)  # (B, p)
    for use_cache in (True, False):
        counter = FlopCounterMode(display=False, custom_mapping=torch_formulas())
        with counter:
            out = sampling.generate(model, idx, 9, temperature=0.0, use_cache=use_cache)
        assert out.shape == (2, 12)
        assert counter.get_total_flops() == flops.generation(cfg, 3, 9, batch=2, use_cache=use_cache).total
        counter = FlopCounterMode(display=False, custom_mapping=torch_formulas())
        with counter:
            sampling.beam_search(model, idx, 4, num_beams=3, use_cache=use_cache)
        assert counter.get_total_flops() == flops.beam_search(cfg, 3, 4, 3, batch=2, use_cache=use_cache).total


@settings(max_examples=6, deadline=None)
@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 6), st.integers(2, 50), st.integers(1, 12),
       st.integers(1, 3), st.sampled_from(["sdpa", "manual"]), st.booleans())
def test_measurement_equals_formula_on_random_shapes(n_layer, n_head, head_dim, vocab, block, batch, attention,
                                                     bias):
    cfg = GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_head * head_dim, vocab_size=vocab, block_size=block,
                    attention=attention, bias=bias)
    assert_matches(cfg, batch, block)


def test_bad_shapes_raise():
    cfg = GPTConfig(n_layer=1, n_head=1, n_embd=4, block_size=4, vocab_size=5)
    for call in (lambda: fvcore_count(cfg, 1, 5), lambda: torch_count(cfg, 0, 2),
                 lambda: torch_count(cfg, 1, 2, past=1, train=True), lambda: fvcore_count(cfg, 1, 2, past=3)):
        with pytest.raises(ValueError):
            call()


def test_exact_gelu_flops_match_the_fvcore_measurement():
    from model.flops import formulas as flops
    from model.flops.counters import fvcore_count
    for act in ("gelu", "gelu_tanh"):
        cfg = GPTConfig(vocab_size=65, n_layer=2, n_head=2, n_embd=32, block_size=16, bias=False, activation=act)
        measured = fvcore_count(cfg, 2, 16)
        assert measured.non_matmul["gelu"] == (5 if act == "gelu" else 9) * 2 * 16 * 4 * 32 * 2  # by hand
        assert flops.forward(cfg, 2, 16).total == measured.total
