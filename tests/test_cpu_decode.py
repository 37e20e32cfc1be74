"""The AVX-512 decoding kernels (model/gpt/cpu_decode.py): the few-row product against F.linear in float64, the
whole step against the torch-kernel decoder (fp32) and against its rounding rule worked out in torch (bf16),
through generate and beam search, and the one-line reasons where they cannot run."""
import copy
import functools

import pytest
import torch
from torch.nn import functional as F

from model.gpt import cpu_decode
from model.gpt.decode import Decoder, check_kernels

from test_decode import VARIANTS, tiny_gpt


def needs(dtype):
    reason = cpu_decode.unavailable(dtype)
    return pytest.mark.skipif(reason is not None, reason=f"kernels='avx512' cannot run here: {reason}")


@needs(torch.float32)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 9])  # a group of up to 4 rows per pass, then the rest
@pytest.mark.parametrize("n_in,n_out", [(1, 3), (15, 2), (16, 17), (33, 5), (64, 1), (100, 7), (768, 40)])
def test_float32_equals_float64_linear(rows, n_in, n_out):
    gen = torch.Generator().manual_seed(rows * 1000 + n_in)
    x, w, b = (torch.randn(*s, generator=gen) for s in ((rows, n_in), (n_out, n_in), (n_out,)))
    for bias in (b, None):
        want = F.linear(x.double(), w.double(), None if bias is None else bias.double())
        got = cpu_decode.linear(x, w, bias)
        assert got.dtype == torch.float32 and got.shape == (rows, n_out)
        # fp32 sums of n_in products, in another order than the float64 ones: a few ulps of the largest term
        tol = 4 * n_in * torch.finfo(torch.float32).eps * float((x.abs().max() * w.abs().max()).clamp(min=1))
        assert float((got.double() - want).abs().max()) <= tol


@needs(torch.bfloat16)
@pytest.mark.parametrize("rows", [1, 3, 4, 6])
@pytest.mark.parametrize("n_in,n_out", [(1, 3), (31, 2), (32, 9), (65, 4), (768, 40)])
def test_bfloat16_is_the_fp32_sum_rounded_once(rows, n_in, n_out):
    gen = torch.Generator().manual_seed(rows * 1000 + n_in)
    x, w, b = (torch.randn(*s, generator=gen).bfloat16() for s in ((rows, n_in), (n_out, n_in), (n_out,)))
    want = F.linear(x.double(), w.double(), b.double())  # exact products of the bf16 values
    got = cpu_decode.linear(x, w, b)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, n_out)
    # one rounding to bf16 (half an ulp: 2^-9 relative) plus the fp32 sum's own error
    tol = want.abs() * 2.0 ** -8 + 4 * n_in * torch.finfo(torch.float32).eps * float(x.abs().max() * w.abs().max())
    assert bool(((got.double() - want).abs() <= tol).all())


@needs(torch.float32)
def test_decoder_with_avx512_equals_torch_kernels():
    model = tiny_gpt(seed=4)
    attn = model.transformer.h[0].attn.c_attn
    attn.weight = torch.nn.Parameter(attn.weight.detach().t().contiguous().t())  # same values, column-major
    idx = torch.randint(0, 37, (1, 9), generator=torch.Generator().manual_seed(4))
    fast, ref = Decoder(model, kernels="avx512"), Decoder(model)
    assert fast.head.weight.shape == (37, 16)  # (out, in): the kernel's layout in fp32 too
    caches = fast.new_cache(1, 16), ref.new_cache(1, 16)
    with torch.inference_mode():
        for part in (idx[:, :3], idx[:, 3:4], idx[:, 4:5]):  # a 3-token prompt: 3 rows through `linear`; steps
            got, want = fast(part, caches[0]), ref(part, caches[1])
            assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()


def step_cases():  # widths whose heads fill 16-lane vectors, and ones that end in masked tails
    for kw in VARIANTS:
        yield dict(n_embd=16, n_head=2, **kw)
    yield dict(n_embd=40, n_head=2)  # head size 20: one full vector and a tail of 4
    yield dict(n_embd=96, n_head=3)  # head size 32, C = 96: products with in = 96 and 384


def decoders(kw, dtype, seed):
    model = tiny_gpt(seed=seed, vocab=41, block=24, **kw)
    return model, Decoder(model, dtype, kernels="avx512"), Decoder(model, dtype)


@needs(torch.float32)
@pytest.mark.parametrize("kw", list(step_cases()), ids=str)
@pytest.mark.parametrize("rows", [1, 2, 4])
def test_step_equals_the_model_in_float64(kw, rows):
    model, fused, ref = decoders(kw, torch.float32, seed=rows)
    exact = copy.deepcopy(model).double()
    idx = torch.randint(0, 41, (rows, 12), generator=torch.Generator().manual_seed(rows))
    caches = fused.new_cache(rows, 16), ref.new_cache(rows, 16)
    with torch.inference_mode():
        for cache, dec in zip(caches, (fused, ref)):
            dec(idx[:, :5], cache)  # the prefill: torch's kernels in both
        for t in range(5, 12):  # then one C++ call per step
            got, want = fused(idx[:, t:t + 1], caches[0]), exact(idx[:, :t + 1])[0][:, -1]
            # fp32 through layers of large random weights: torch's fp32 kernels (the reference decoder) err by
            # up to 1.3e-5 of the largest logit on these models
            tol = 3e-5 * float(want.abs().max())
            assert torch.allclose(got.double(), want, atol=tol, rtol=0), (t, float((got - want).abs().max()))
            ref(idx[:, t:t + 1], caches[1])
    assert caches[0].pos == caches[1].pos == 12
    for a, b in ((caches[0].k, caches[1].k), (caches[0].v, caches[1].v)):  # each step's keys and values stored
        assert torch.allclose(a, b, atol=1e-5 * float(b.abs().max()), rtol=0)


def bf16_step_by_hand(model, idx, k, v, pos):
    """The step's documented numerics in torch ops: fp32 activations, the inputs of every product and the
    cached keys/values rounded to bf16, bf16 weights. idx (R,); k, v (L, R, nh, max_len, hs) fp32, updated."""
    def bf(t):
        return t.bfloat16().float()

    def ln(x, m):
        return F.layer_norm(x, x.shape[-1:], bf(m.weight), None if m.bias is None else bf(m.bias))

    def lin(x, m):
        return F.linear(bf(x), bf(m.weight), None if m.bias is None else bf(m.bias))

    tr, cfg = model.transformer, model.config
    nh, hs = cfg.n_head, cfg.head_dim
    table = tr.wpe.weight if cfg.pos_encoding == "learned" else model.pos_table
    x = bf(tr.wte.weight[idx]) + bf(table[pos])  # (R, C)
    for i, blk in enumerate(tr.h):
        q, kk, vv = lin(ln(x, blk.ln_1), blk.attn.c_attn).view(-1, 3, nh, hs).unbind(1)  # (R, nh, hs) each
        k[i, :, :, pos], v[i, :, :, pos] = bf(kk), bf(vv)
        att = torch.einsum("rhd,rhsd->rhs", q, k[i, :, :, :pos + 1]) / hs ** 0.5  # (R, nh, S)
        y = torch.einsum("rhs,rhsd->rhd", att.softmax(-1), v[i, :, :, :pos + 1]).reshape(x.shape)  # (R, C)
        x = x + lin(y, blk.attn.c_proj)
        x = x + lin(blk.mlp.gelu(lin(ln(x, blk.ln_2), blk.mlp.c_fc)), blk.mlp.c_proj)
    return F.linear(bf(ln(x, tr.ln_f)), bf(model.lm_head.weight))  # (R, V)


@needs(torch.bfloat16)
@pytest.mark.parametrize("kw", list(step_cases()), ids=str)
def test_bf16_step_follows_its_rounding_rule(kw):
    model, fused, _ = decoders(kw, torch.bfloat16, seed=7)
    idx = torch.randint(0, 41, (3, 10), generator=torch.Generator().manual_seed(7))
    cache = fused.new_cache(3, 16)
    with torch.inference_mode():
        k, v = (torch.zeros(cache.k.shape) for _ in range(2))
        for t in range(10):
            want = bf16_step_by_hand(model, idx[:, t], k, v, t)
            got = fused(idx[:, t:t + 1], cache)
            # the same roundings; the sums' order may move an fp32 value across a bf16 rounding boundary
            # (torch's bf16 decoder, with bf16 activations, is 2-12% of the largest logit away from this rule)
            assert torch.allclose(got, want, atol=0.002 * float(want.abs().max()), rtol=0), t
            assert torch.allclose(cache.k.float(), k, atol=0.004 * float(k.abs().max()), rtol=0)


@needs(torch.float32)
def test_step_takes_4_rows_at_most_and_larger_batches_use_torch():
    _, fused, ref = decoders({}, torch.float32, seed=3)
    idx = torch.randint(0, 41, (6, 4), generator=torch.Generator().manual_seed(3))
    caches = fused.new_cache(6, 8), ref.new_cache(6, 8)
    with torch.inference_mode():
        for t in range(4):  # 6 rows: torch's ops, and the few-row kernel for no product
            got, want = fused(idx[:, t:t + 1], caches[0]), ref(idx[:, t:t + 1], caches[1])
            assert torch.allclose(got, want, atol=2e-5)
    with pytest.raises(RuntimeError, match="1 to 4 rows"):
        cpu_decode.step(idx[:, 0], 0, fused.step_params, caches[0].k, caches[0].v, 2, True)


@needs(torch.float32)
def test_generate_and_beam_search_with_avx512_give_the_same_tokens():
    model = tiny_gpt(seed=5, vocab=41, block=32)
    idx = torch.randint(0, 41, (1, 5), generator=torch.Generator().manual_seed(5))
    assert torch.equal(model.generate(idx, 30, temperature=0, kernels="avx512"), model.generate(idx, 30, temperature=0))
    a = model.beam_search(idx, 20, num_beams=4, kernels="avx512")
    b = model.beam_search(idx, 20, num_beams=4)
    assert torch.equal(a[0], b[0]) and torch.allclose(a[1], b[1], atol=1e-5)


@pytest.mark.parametrize("kw,match", [
    (dict(kernels="mkl"), "kernels must be one of ('torch', 'avx512'), got 'mkl'"),
    (dict(kernels="avx512", fast=False), "needs fast=True and use_cache=True"),
    (dict(kernels="avx512", use_cache=False), "needs fast=True and use_cache=True"),
])
def test_bad_kernels_setting(kw, match):
    model = tiny_gpt()
    idx = torch.zeros(1, 2, dtype=torch.long)
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace(")", r"\)")):
        model.generate(idx, 3, **kw)
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace(")", r"\)")):
        model.beam_search(idx, 3, num_beams=2, **kw)


def test_reasons_it_cannot_run(monkeypatch):
    with pytest.raises(ValueError, match="kernels='avx512' cannot run here: it runs on the CPU only"):
        check_kernels("avx512", torch.float32, "cuda")
    assert "not float16" in cpu_decode.unavailable(torch.float16)
    monkeypatch.setattr(cpu_decode.platform, "machine", lambda: "aarch64")
    assert cpu_decode.unavailable(torch.float32) == "it needs an x86-64 CPU, this one is aarch64"
    monkeypatch.setattr(cpu_decode.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(cpu_decode, "cpu_flags", lambda: {"avx512f", "avx512bw"})
    assert cpu_decode.unavailable(torch.bfloat16) == "this CPU lacks avx512_bf16"
    monkeypatch.setattr(cpu_decode, "cpu_flags", lambda: {"avx2"})
    assert cpu_decode.unavailable(torch.float32) == "this CPU lacks avx512bw, avx512f"
    with pytest.raises(ValueError, match="this CPU lacks avx512bw, avx512f"):  # before any kernel runs
        Decoder(tiny_gpt(), kernels="avx512")
    monkeypatch.setattr(cpu_decode, "cpu_flags", lambda: {"avx512f", "avx512bw", "avx512_bf16"})
    monkeypatch.setattr(cpu_decode, "_library", functools.cache(lambda: None))  # as if not built yet
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    assert "no C++ compiler (no-such-compiler-xyz) is on PATH" in cpu_decode.unavailable(torch.float32)
    with pytest.raises(ValueError, match=r"no C\+\+ compiler .*; use kernels='torch'"):
        check_kernels("avx512", torch.bfloat16, "cpu")


@needs(torch.float32)
def test_a_failed_build_is_one_value_error(monkeypatch, tmp_path):
    broken = tmp_path / "cpu_decode.cpp"
    broken.write_text("#error this source does not compile\n")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    monkeypatch.setattr(cpu_decode, "SOURCE", broken)
    monkeypatch.setattr(cpu_decode, "NAME", "flopgpt_cpu_decode_broken_test")
    cpu_decode._library.cache_clear()
    try:
        with pytest.raises(ValueError, match=r"kernels='avx512': building cpu_decode.cpp failed \(.+\); use kernels"):
            cpu_decode.linear(torch.ones(1, 4), torch.ones(2, 4))
    finally:
        cpu_decode._library.cache_clear()  # the next caller loads the real kernel again


@needs(torch.float32)
def test_once_loaded_no_compiler_is_needed(monkeypatch):
    cpu_decode.linear(torch.ones(1, 4), torch.ones(2, 4))  # loads the built library
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    assert cpu_decode.unavailable(torch.float32) is None  # and generate's checks cost a flag lookup
