"""The fast decoding path (model/gpt/decode.py) against the model's own forward, and the lower-precision path."""
import pytest
import torch

from model import GPT, GPTConfig
from model.gpt.decode import Decoder, resolve_dtype


def tiny_gpt(seed=0, vocab=37, block=16, n_layer=2, n_head=2, n_embd=16, **kw):
    """Large random weights: peaked logits, so argmax and draws do not hinge on the last bit."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=vocab, block_size=block, n_layer=n_layer, n_head=n_head, n_embd=n_embd, **kw))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.5)
    return model.eval()


VARIANTS = [dict(), dict(pos_encoding="sinusoidal", attention="manual"), dict(bias=False, activation="gelu")]


@pytest.mark.parametrize("kw", VARIANTS)
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_decoder_logits_equal_the_models(kw, dtype):
    model = tiny_gpt(seed=1, **kw)
    ref = model if dtype is None else tiny_gpt(seed=1, **kw).to(dtype)
    dec = Decoder(model, dtype)
    idx = torch.randint(0, 37, (3, 9), generator=torch.Generator().manual_seed(1))
    cache, ref_cache = dec.new_cache(3, 16), ref.new_cache(3, 16)
    assert cache.k.dtype == (dtype or torch.float32)
    with torch.inference_mode():
        for part in (idx[:, :5], idx[:, 5:6], idx[:, 6:7], idx[:, 7:]):  # prefill, steps, a 2-token chunk
            got = dec(part, cache)
            want = ref(part, kv_cache=ref_cache, last_only=True)[0][:, -1]
            assert got.dtype == torch.float32 and got.shape == (3, 37)
            tol = 1e-5 if dtype is None else 0.05 * float(want.abs().max())  # bf16: 8-bit mantissas
            assert torch.allclose(got, want.float(), atol=tol, rtol=0), (got - want.float()).abs().max()
    assert cache.pos == ref_cache.pos == 9
    one = dec(idx[:1, :1], dec.new_cache(1, 4))  # one row: the gemv path in bf16
    assert one.dtype == torch.float32


@pytest.mark.parametrize("kw", VARIANTS)
@pytest.mark.parametrize("prompt_len,new", [(5, 8), (5, 30), (20, 6)])  # within, sliding past, prompt > block
def test_fast_greedy_equals_reference(kw, prompt_len, new):
    model = tiny_gpt(**kw)
    for rows in (1, 3):
        idx = torch.randint(0, 37, (rows, prompt_len), generator=torch.Generator().manual_seed(rows))
        fast = model.generate(idx, new, temperature=0)
        assert torch.equal(fast, model.generate(idx, new, temperature=0, fast=False))
        assert torch.equal(fast, model.generate(idx, new, temperature=0, use_cache=False))


@pytest.mark.parametrize("opts", [dict(temperature=1.0), dict(temperature=0.8, top_k=5),
                                  dict(temperature=1.1, top_p=0.8), dict(temperature=0.9, top_k=8, top_p=0.9)])
def test_fast_sampling_equals_reference(opts):
    model = tiny_gpt(seed=2)
    idx = torch.randint(0, 37, (4, 3), generator=torch.Generator().manual_seed(2))
    a = model.generate(idx, 30, generator=torch.Generator().manual_seed(5), **opts)
    b = model.generate(idx, 30, generator=torch.Generator().manual_seed(5), fast=False, **opts)
    assert torch.equal(a, b)


@pytest.mark.parametrize("eos", [None, 7])
def test_fast_beam_search_equals_reference(eos):
    model = tiny_gpt(seed=3, vocab=41, block=32)
    idx = torch.randint(0, 41, (2, 4), generator=torch.Generator().manual_seed(3))
    kw = dict(num_beams=4, eos_token_id=eos, num_return_sequences=3, no_repeat_ngram_size=2)
    seqs, scores = model.beam_search(idx, 20, **kw)
    ref_seqs, ref_scores = model.beam_search(idx, 20, fast=False, **kw)
    assert torch.equal(seqs, ref_seqs) and torch.allclose(scores, ref_scores, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, "bfloat16"])
def test_bfloat16_runs_and_matches_the_cast_model(dtype):
    model = tiny_gpt(seed=4)
    idx = torch.randint(0, 37, (2, 4), generator=torch.Generator().manual_seed(4))
    fast = model.generate(idx, 12, temperature=0, dtype=dtype)
    ref = model.generate(idx, 12, temperature=0, dtype=dtype, fast=False)  # a bf16 copy through the model
    assert torch.equal(fast, ref)
    assert model.transformer.wte.weight.dtype == torch.float32  # the model itself is not cast
    seqs, scores = model.beam_search(idx, 8, num_beams=3, dtype=dtype)
    assert seqs.shape[0] == 2 and scores.dtype == torch.float32
    # a model cast once gives the same tokens with dtype=None
    assert torch.equal(tiny_gpt(seed=4).to(torch.bfloat16).generate(idx, 12, temperature=0), fast)


def test_bfloat16_sampling_draws_from_fp32_probabilities():
    from model.gpt import sampling
    seen = []
    orig = sampling.next_token

    def spy(logits, **kw):
        seen.append(logits.dtype)
        return orig(logits, **kw)

    sampling.next_token = spy
    try:
        tiny_gpt(seed=5).generate(torch.zeros(1, 2, dtype=torch.long), 5, dtype="bfloat16",
                                  generator=torch.Generator().manual_seed(0))
    finally:
        sampling.next_token = orig
    assert seen == [torch.float32] * 5


@pytest.mark.parametrize("dtype,match", [("float64", "dtype must be one of"), ("bf16", "dtype must be one of"),
                                         (torch.int8, "dtype must be one of"), ("float16", "needs a CUDA device")])
def test_bad_dtype(dtype, match):
    model = tiny_gpt()
    idx = torch.zeros(1, 2, dtype=torch.long)
    with pytest.raises(ValueError, match=match):
        model.generate(idx, 3, dtype=dtype)
    with pytest.raises(ValueError, match=match):
        model.beam_search(idx, 3, num_beams=2, dtype=dtype)


def test_bad_fast_flag():
    with pytest.raises(ValueError, match="fast must be True or False"):
        tiny_gpt().generate(torch.zeros(1, 2, dtype=torch.long), 3, fast="yes")


def test_resolve_dtype_names():
    assert resolve_dtype(None, "cpu") is None
    assert resolve_dtype("float32", "cpu") is torch.float32 and resolve_dtype(torch.bfloat16, "cpu") is torch.bfloat16
    with pytest.raises(ValueError, match="--dtype float16 needs a CUDA device"):
        resolve_dtype("float16", "cpu", "--dtype")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float16])
def test_cuda_fast_equals_reference(dtype):
    model = tiny_gpt(seed=6).cuda()
    idx = torch.randint(0, 37, (2, 4), device="cuda")
    a = model.generate(idx, 30, temperature=0, dtype=dtype)
    b = model.generate(idx, 30, temperature=0, dtype=dtype, fast=False)
    assert torch.equal(a, b)
    g = [torch.Generator(device="cuda").manual_seed(3) for _ in range(2)]
    a = model.generate(idx, 30, temperature=0.8, top_k=10, generator=g[0], dtype=dtype)
    b = model.generate(idx, 30, temperature=0.8, top_k=10, generator=g[1], dtype=dtype, fast=False)
    assert torch.equal(a, b)
    seqs, _ = model.beam_search(idx, 12, num_beams=3, dtype=dtype)
    ref, _ = model.beam_search(idx, 12, num_beams=3, dtype=dtype, fast=False)
    assert torch.equal(seqs, ref)
