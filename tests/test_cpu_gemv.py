"""The AVX-512 few-row kernels (model/gpt/cpu_gemv.py): against F.linear in float64, through the decoder, and
the one-line reasons where they cannot run."""
import functools

import pytest
import torch
from torch.nn import functional as F

from model.gpt import cpu_gemv
from model.gpt.decode import Decoder, check_kernels

from test_decode import tiny_gpt


def needs(dtype):
    reason = cpu_gemv.unavailable(dtype)
    return pytest.mark.skipif(reason is not None, reason=f"kernels='avx512' cannot run here: {reason}")


@needs(torch.float32)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 9])  # a group of up to 4 rows per pass, then the rest
@pytest.mark.parametrize("n_in,n_out", [(1, 3), (15, 2), (16, 17), (33, 5), (64, 1), (100, 7), (768, 40)])
def test_float32_equals_float64_linear(rows, n_in, n_out):
    gen = torch.Generator().manual_seed(rows * 1000 + n_in)
    x, w, b = (torch.randn(*s, generator=gen) for s in ((rows, n_in), (n_out, n_in), (n_out,)))
    for bias in (b, None):
        want = F.linear(x.double(), w.double(), None if bias is None else bias.double())
        got = cpu_gemv.linear(x, w, bias)
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
    got = cpu_gemv.linear(x, w, b)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, n_out)
    # one rounding to bf16 (half an ulp: 2^-9 relative) plus the fp32 sum's own error
    tol = want.abs() * 2.0 ** -8 + 4 * n_in * torch.finfo(torch.float32).eps * float(x.abs().max() * w.abs().max())
    assert bool(((got.double() - want).abs() <= tol).all())


@needs(torch.bfloat16)
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_decoder_with_avx512_equals_torch_kernels(dtype):
    model = tiny_gpt(seed=4)
    attn = model.transformer.h[0].attn.c_attn
    attn.weight = torch.nn.Parameter(attn.weight.detach().t().contiguous().t())  # same values, column-major
    idx = torch.randint(0, 37, (3, 9), generator=torch.Generator().manual_seed(4))
    fast, ref = Decoder(model, dtype, kernels="avx512"), Decoder(model, dtype)
    assert fast.head.weight.shape == (37, 16)  # (out, in): the kernel's layout in fp32 too
    caches = fast.new_cache(3, 16), ref.new_cache(3, 16)
    with torch.inference_mode():
        for part in (idx[:, :3], idx[:, 3:4], idx[:, 4:5]):  # 3 rows x 3 tokens: torch (9 rows); then 3 rows
            got, want = fast(part, caches[0]), ref(part, caches[1])
            tol = 1e-5 if dtype is None else 0.05 * float(want.abs().max())
            assert torch.allclose(got, want, atol=tol, rtol=0), (got - want).abs().max()


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
    assert "not float16" in cpu_gemv.unavailable(torch.float16)
    monkeypatch.setattr(cpu_gemv.platform, "machine", lambda: "aarch64")
    assert cpu_gemv.unavailable(torch.float32) == "it needs an x86-64 CPU, this one is aarch64"
    monkeypatch.setattr(cpu_gemv.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(cpu_gemv, "cpu_flags", lambda: {"avx512f", "avx512bw"})
    assert cpu_gemv.unavailable(torch.bfloat16) == "this CPU lacks avx512_bf16"
    monkeypatch.setattr(cpu_gemv, "cpu_flags", lambda: {"avx2"})
    assert cpu_gemv.unavailable(torch.float32) == "this CPU lacks avx512bw, avx512f"
    with pytest.raises(ValueError, match="this CPU lacks avx512bw, avx512f"):  # before any kernel runs
        Decoder(tiny_gpt(), kernels="avx512")
    monkeypatch.setattr(cpu_gemv, "cpu_flags", lambda: {"avx512f", "avx512bw", "avx512_bf16"})
    monkeypatch.setattr(cpu_gemv, "_library", functools.cache(lambda: None))  # as if not built yet
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    assert "no C++ compiler (no-such-compiler-xyz) is on PATH" in cpu_gemv.unavailable(torch.float32)
    with pytest.raises(ValueError, match=r"no C\+\+ compiler .*; use kernels='torch'"):
        check_kernels("avx512", torch.bfloat16, "cpu")


@needs(torch.float32)
def test_a_failed_build_is_one_value_error(monkeypatch, tmp_path):
    broken = tmp_path / "cpu_gemv.cpp"
    broken.write_text("#error this source does not compile\n")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    monkeypatch.setattr(cpu_gemv, "SOURCE", broken)
    monkeypatch.setattr(cpu_gemv, "NAME", "flopgpt_cpu_gemv_broken_test")
    cpu_gemv._library.cache_clear()
    try:
        with pytest.raises(ValueError, match=r"kernels='avx512': building cpu_gemv.cpp failed \(.+\); use kernels"):
            cpu_gemv.linear(torch.ones(1, 4), torch.ones(2, 4))
    finally:
        cpu_gemv._library.cache_clear()  # the next caller loads the real kernel again


@needs(torch.float32)
def test_once_loaded_no_compiler_is_needed(monkeypatch):
    cpu_gemv.linear(torch.ones(1, 4), torch.ones(2, 4))  # loads the built library
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    assert cpu_gemv.unavailable(torch.float32) is None  # and generate's checks cost a flag lookup
