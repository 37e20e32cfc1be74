"""generate(): KV-cached against uncached against a naive loop, past block_size too; eos; modes; transformers."""
import pytest
import torch

from model import GPT, GPTConfig


def tiny_gpt(seed=0, vocab=37, block=16, pos="learned", attention="sdpa", dropout=0.0, n_layer=2):
    """A small GPT with large random weights, so that logits are far apart and argmax/sampling are stable."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=vocab, block_size=block, n_layer=n_layer, n_head=2, n_embd=16,
                          pos_encoding=pos, attention=attention, dropout=dropout))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.5)
    return model.eval()


def naive_generate(model, idx, n, *, temperature=1.0, top_k=None, top_p=None, eos=None, generator=None):
    """The textbook loop: crop to block_size, full forward, pick, append (no cache, no preallocation)."""
    from model.gpt.sampling import next_token
    done = torch.zeros(idx.size(0), dtype=torch.bool)
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(idx[:, -model.config.block_size:])
            tok = next_token(logits[:, -1], temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
            if eos is not None:
                tok = torch.where(done, eos, tok)
                done |= tok == eos
            idx = torch.cat([idx, tok[:, None]], dim=1)
            if eos is not None and done.all():
                break
    return idx


CONFIGS = [("learned", "sdpa"), ("learned", "manual"), ("sinusoidal", "sdpa"), ("sinusoidal", "manual")]


@pytest.mark.parametrize("pos,attention", CONFIGS)
@pytest.mark.parametrize("prompt_len,new", [(5, 8), (5, 30), (20, 6)])  # within, sliding past, prompt > block
def test_greedy_cached_equals_uncached_equals_naive(pos, attention, prompt_len, new):
    model = tiny_gpt(pos=pos, attention=attention)
    idx = torch.randint(0, 37, (3, prompt_len), generator=torch.Generator().manual_seed(1))
    ref = naive_generate(model, idx, new, temperature=0)
    cached = model.generate(idx, new, temperature=0, use_cache=True)
    uncached = model.generate(idx, new, temperature=0, use_cache=False)
    assert cached.shape == (3, prompt_len + new)
    assert torch.equal(cached, ref) and torch.equal(uncached, ref)
    assert torch.equal(cached[:, :prompt_len], idx)


@pytest.mark.parametrize("pos,attention", CONFIGS[::3])
@pytest.mark.parametrize("opts", [dict(temperature=1.0), dict(temperature=0.7, top_k=5),
                                  dict(temperature=1.3, top_p=0.8), dict(temperature=0.9, top_k=8, top_p=0.9)])
def test_sampling_cached_equals_uncached_equals_naive(pos, attention, opts):
    model = tiny_gpt(seed=2, pos=pos, attention=attention)
    idx = torch.randint(0, 37, (4, 3), generator=torch.Generator().manual_seed(2))
    n = 35  # past block_size=16: the cache is rebuilt from the sliding window
    runs = [model.generate(idx, n, generator=torch.Generator().manual_seed(9), use_cache=c, **opts)
            for c in (True, False)]
    ref = naive_generate(model, idx, n, generator=torch.Generator().manual_seed(9), **opts)
    assert torch.equal(runs[0], ref) and torch.equal(runs[1], ref)
    other = model.generate(idx, n, generator=torch.Generator().manual_seed(10), **opts)
    assert not torch.equal(other, ref)  # the generator really drives the draws


def spy_calls(model, monkeypatch, fast):
    """Record (new tokens, cached?) of each forward call: the model's own, or the fast Decoder's."""
    from model.gpt.decode import Decoder
    seen = []
    if fast:
        orig_call = Decoder.__call__

        def spy_decoder(self, idx, cache):
            seen.append((idx.size(1), cache is not None))
            return orig_call(self, idx, cache)

        monkeypatch.setattr(Decoder, "__call__", spy_decoder)
        return seen
    orig = model.forward

    def spy(idx, *args, **kwargs):
        seen.append((idx.size(1), kwargs.get("kv_cache") is not None))
        return orig(idx, *args, **kwargs)

    model.forward = spy
    return seen


@pytest.mark.parametrize("fast", [True, False])
def test_cache_feeds_one_token_per_step_then_rebuilds_once_the_window_slides(fast, monkeypatch):
    model = tiny_gpt(block=8)
    seen = spy_calls(model, monkeypatch, fast)
    model.generate(torch.zeros(1, 3, dtype=torch.long), 9, temperature=0, fast=fast)
    # prefill 3, then one token at a time up to the full window of 8, then a full re-prefill per step
    assert seen == [(3, True)] + [(1, True)] * 5 + [(8, True)] * 3
    seen.clear()
    model.generate(torch.zeros(1, 3, dtype=torch.long), 4, temperature=0, use_cache=False)
    assert seen == ([] if fast else [(3, False), (4, False), (5, False), (6, False)])  # no cache: the model's path


def test_eos_rows_stop_and_are_padded_and_generation_ends_early():
    model = tiny_gpt(seed=3)
    idx = torch.randint(0, 37, (4, 4), generator=torch.Generator().manual_seed(3))
    free = model.generate(idx, 20, temperature=0)
    eos = int(free[0, 6])  # a token row 0 emits at step 3
    out = model.generate(idx, 20, temperature=0, eos_token_id=eos)
    assert torch.equal(out, naive_generate(model, idx, 20, temperature=0, eos=eos))
    for row, full in zip(out, free):
        hits = (full[4:] == eos).nonzero()
        if len(hits):  # identical up to the first eos, eos after it
            stop = 4 + int(hits[0])
            assert torch.equal(row[:stop + 1], full[:stop + 1]) and bool((row[stop:] == eos).all())
        else:
            assert torch.equal(row, full[:len(row)])
    every_row_hit = all((full[4:] == eos).any() for full in free)
    assert (out.size(1) < 24) == every_row_hit


def test_generation_stops_when_all_rows_finish():
    model = tiny_gpt(seed=4)
    idx = torch.randint(0, 37, (1, 4), generator=torch.Generator().manual_seed(4))
    first = int(model.generate(idx, 1, temperature=0)[0, -1])
    out = model.generate(idx, 50, temperature=0, eos_token_id=first)
    assert out.shape == (1, 5) and int(out[0, -1]) == first


@pytest.mark.parametrize("training", [True, False])
def test_mode_is_restored_and_dropout_is_off(training):
    model = tiny_gpt(seed=5, dropout=0.5)
    model.train(training)
    idx = torch.zeros(2, 3, dtype=torch.long)
    a = model.generate(idx, 10, temperature=0)
    assert model.training == training
    b = model.generate(idx, 10, temperature=0)
    assert torch.equal(a, b)  # eval mode inside: dropout would make greedy runs differ
    assert a.is_inference() and not a.requires_grad


def test_on_token_streams_each_step():
    model = tiny_gpt(seed=6)
    idx = torch.randint(0, 37, (2, 3), generator=torch.Generator().manual_seed(6))
    got = []
    out = model.generate(idx, 7, temperature=0.8, generator=torch.Generator().manual_seed(1),
                         on_token=lambda t: got.append(t.clone()))
    assert len(got) == 7 and all(t.shape == (2,) for t in got)
    assert torch.equal(torch.stack(got, dim=1), out[:, 3:])


def test_zero_new_tokens_returns_the_prompt():
    model = tiny_gpt()
    idx = torch.tensor([[1, 2, 3]])
    assert torch.equal(model.generate(idx, 0), idx)


@pytest.mark.parametrize("kwargs,match", [
    (dict(temperature=-1.0), "temperature"), (dict(top_k=-2), "top_k"), (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"), (dict(eos_token_id=37), "eos_token_id"), (dict(eos_token_id=-1), "eos_token_id"),
])
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_gpt().generate(torch.zeros(1, 2, dtype=torch.long), 3, **kwargs)


@pytest.mark.parametrize("idx,n,match", [
    (torch.zeros(3, dtype=torch.long), 2, "2-D"), (torch.zeros(1, 2), 2, "integer"),
    (torch.tensor([[1, 37]]), 2, "token id 37"), (torch.tensor([[-3, 1]]), 2, "token id -3"),
    (torch.zeros(1, 0, dtype=torch.long), 2, "at least one token"), (torch.zeros(1, 2, dtype=torch.long), -1,
                                                                      "max_new_tokens"),
])
def test_bad_prompts(idx, n, match):
    with pytest.raises(ValueError, match=match):
        tiny_gpt().generate(idx, n)


def test_nan_weights_raise_value_error():
    model = tiny_gpt()
    with torch.no_grad():
        model.transformer.ln_f.weight.fill_(float("nan"))
    with pytest.raises(ValueError, match="logits row"):
        model.generate(torch.zeros(1, 2, dtype=torch.long), 3)


# ----------------------------------------------------------------------------------------------------
# transformers as the reference

@pytest.fixture(scope="module")
def pair():
    pytest.importorskip("transformers")
    from model.gpt.weights import to_hf_gpt2
    model = tiny_gpt(seed=7, vocab=41, block=32)
    return model, to_hf_gpt2(model)


def test_greedy_matches_transformers(pair):
    model, hf = pair
    idx = torch.randint(0, 41, (2, 5), generator=torch.Generator().manual_seed(8))
    ours = model.generate(idx, 20, temperature=0)
    ref = hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=20, do_sample=False)
    assert torch.equal(ours, ref)
    eos = int(ours[1, 9])
    ours = model.generate(idx, 20, temperature=0, eos_token_id=eos)
    ref = hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=20, do_sample=False,
                      eos_token_id=eos, pad_token_id=eos)
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("opts", [dict(temperature=1.0, top_k=0), dict(temperature=0.7, top_k=6),
                                  dict(temperature=1.2, top_k=0, top_p=0.7), dict(temperature=0.9, top_k=10, top_p=0.9)])
def test_sampling_matches_transformers_with_the_same_seed(pair, opts):
    model, hf = pair
    idx = torch.randint(0, 41, (3, 4), generator=torch.Generator().manual_seed(9))
    ours = model.generate(idx, 15, generator=torch.Generator().manual_seed(123), **opts)
    torch.manual_seed(123)
    ref = hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=15, do_sample=True, **opts)
    assert torch.equal(ours, ref)


@pytest.mark.gpu
def test_cuda_cached_equals_uncached():
    model = tiny_gpt(seed=8).cuda()
    idx = torch.randint(0, 37, (2, 4), device="cuda")
    g = [torch.Generator(device="cuda").manual_seed(3) for _ in range(2)]
    a = model.generate(idx, 30, temperature=0.8, top_k=10, generator=g[0])
    b = model.generate(idx, 30, temperature=0.8, top_k=10, generator=g[1], use_cache=False)
    assert torch.equal(a, b)
