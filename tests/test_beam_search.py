"""beam_search(): transformers' generate(num_beams=...) as the reference, exhaustive search, cache vs no cache."""
import itertools

import pytest
import torch
from torch.nn import functional as F

from model import GPT, GPTConfig
from model.gpt.kv_cache import _copy_order
from model.gpt.sampling import _shared_prefix


def tiny_gpt(seed=0, vocab=41, block=32, pos="learned", attention="sdpa"):
    """Large random weights: peaked, well separated log-probabilities, so no near-ties decide a beam."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=vocab, block_size=block, n_layer=2, n_head=2, n_embd=16,
                          pos_encoding=pos, attention=attention))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def pair():
    pytest.importorskip("transformers")
    from model.gpt.weights import to_hf_gpt2
    model = tiny_gpt(seed=1)
    return model, to_hf_gpt2(model)


PROMPTS = torch.randint(0, 41, (2, 4), generator=torch.Generator().manual_seed(5))  # a batch of 2 prompts


def hf_beam(hf, idx, n, **kw):
    if kw.get("eos_token_id") is not None:
        kw["pad_token_id"] = kw["eos_token_id"]
    out = hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=n, do_sample=False,
                      return_dict_in_generate=True, output_scores=True, **kw)
    return out.sequences, out.sequences_scores


def common_eos(model, idx, n, num_beams):
    """A token that the top beams emit early (a finished-hypothesis path is then really exercised)."""
    seqs, _ = model.beam_search(idx, n, num_beams=num_beams, num_return_sequences=num_beams)
    counts = torch.bincount(seqs[:, idx.size(1):].flatten(), minlength=model.config.vocab_size)
    return int(counts.argmax())


CASES = [  # num_beams, length_penalty, early_stopping, no_repeat_ngram_size, num_return_sequences
    (2, 1.0, False, 0, 1), (3, 1.0, True, 0, 2), (4, 1.0, "never", 0, 4), (3, 0.0, False, 2, 1),
    (4, 2.0, False, 0, 3), (3, -1.0, True, 3, 3), (5, 0.5, "never", 2, 2), (4, -0.5, "never", 0, 1),
    (2, 2.0, True, 2, 2), (6, 1.0, False, 1, 6),
]


@pytest.mark.parametrize("with_eos", [False, True])
@pytest.mark.parametrize("num_beams,lp,es,ngram,nrs", CASES)
def test_matches_transformers(pair, num_beams, lp, es, ngram, nrs, with_eos):
    model, hf = pair
    n = 12
    eos = common_eos(model, PROMPTS, n, num_beams) if with_eos else None
    kw = dict(num_beams=num_beams, length_penalty=lp, early_stopping=es, eos_token_id=eos,
              no_repeat_ngram_size=ngram, num_return_sequences=nrs)
    seqs, scores = model.beam_search(PROMPTS, n, **kw)
    ref_seqs, ref_scores = hf_beam(hf, PROMPTS, n, **kw)
    assert seqs.shape == ref_seqs.shape and torch.equal(seqs, ref_seqs)
    assert torch.allclose(scores, ref_scores, atol=1e-4, rtol=0)
    assert seqs.shape[0] == 2 * nrs
    if with_eos and lp <= 1.0:  # some returned hypothesis finished on eos (lp > 1 favours running to the end)
        assert (seqs[:, 4:] == eos).any()


def test_matches_transformers_on_a_longer_run(pair):
    model, hf = pair
    idx = PROMPTS[:, :2]
    kw = dict(num_beams=4, length_penalty=1.0, early_stopping=False, num_return_sequences=2)
    kw["eos_token_id"] = common_eos(model, idx, 28, 4)
    seqs, scores = model.beam_search(idx, 28, **kw)
    ref_seqs, ref_scores = hf_beam(hf, idx, 28, **kw)
    assert torch.equal(seqs, ref_seqs) and torch.allclose(scores, ref_scores, atol=1e-4, rtol=0)


def test_one_beam_is_greedy_like_transformers(pair):
    model, hf = pair
    for eos in (None, common_eos(model, PROMPTS, 10, 2)):
        seqs, scores = model.beam_search(PROMPTS, 10, num_beams=1, eos_token_id=eos, no_repeat_ngram_size=2)
        ref = hf.generate(PROMPTS, attention_mask=torch.ones_like(PROMPTS), max_new_tokens=10, do_sample=False,
                          num_beams=1, eos_token_id=eos, pad_token_id=eos, no_repeat_ngram_size=2)
        assert torch.equal(seqs, ref)
        assert scores.shape == (2,)
    # the score of the greedy sequence is its summed log-probability over length ** penalty
    seqs, scores = model.beam_search(PROMPTS, 6, num_beams=1, length_penalty=2.0)
    assert torch.allclose(scores, sequence_logprob(model, seqs, 4) / 6 ** 2.0, atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# without transformers

def sequence_logprob(model, seqs, prompt_len):
    with torch.no_grad():
        logp = F.log_softmax(model(seqs)[0], dim=-1)  # (N, T, V)
    return logp[:, prompt_len - 1:-1].gather(2, seqs[:, prompt_len:, None]).sum((1, 2))  # (N,)


@pytest.mark.parametrize("lp", [1.0, 0.0, -2.0])
def test_enough_beams_is_exhaustive_search(lp):
    """With num_beams = V**n every continuation is kept, so the result is the exhaustive ranking."""
    V, n = 3, 3
    model = tiny_gpt(seed=2, vocab=V, block=8)
    idx = torch.tensor([[0, 2]])
    seqs, scores = model.beam_search(idx, n, num_beams=V ** n, num_return_sequences=V ** n, length_penalty=lp,
                                     early_stopping="never")
    every = torch.tensor([[0, 2, *c] for c in itertools.product(range(V), repeat=n)])  # (27, 5)
    every_score = sequence_logprob(model, every, 2) / n ** lp
    order = torch.argsort(every_score, descending=True)
    assert torch.equal(seqs, every[order])
    assert torch.allclose(scores, every_score[order], atol=1e-5)


def test_scores_are_the_penalised_log_probabilities_of_the_sequences():
    model = tiny_gpt(seed=3)
    seqs, scores = model.beam_search(PROMPTS, 7, num_beams=3, num_return_sequences=3, length_penalty=1.5)
    assert torch.allclose(scores, sequence_logprob(model, seqs, 4) / 7 ** 1.5, atol=1e-5)
    assert bool((scores.view(2, 3).diff(dim=1) <= 0).all())  # best first per prompt


@pytest.mark.parametrize("pos,attention", [("learned", "sdpa"), ("sinusoidal", "manual")])
@pytest.mark.parametrize("prompt_len,new", [(4, 10), (4, 25), (20, 5)])  # within block 16, sliding, long prompt
def test_cached_equals_uncached(pos, attention, prompt_len, new):
    model = tiny_gpt(seed=4, block=16, pos=pos, attention=attention)
    idx = torch.randint(0, 41, (2, prompt_len), generator=torch.Generator().manual_seed(4))
    for eos in (None, 7):
        kw = dict(num_beams=3, eos_token_id=eos, num_return_sequences=2, no_repeat_ngram_size=2)
        a = model.beam_search(idx, new, use_cache=True, **kw)
        b = model.beam_search(idx, new, use_cache=False, **kw)
        assert torch.equal(a[0], b[0]) and torch.allclose(a[1], b[1], atol=1e-5)


@pytest.mark.parametrize("fast", [True, False])
def test_cache_is_reordered_not_recomputed(fast, monkeypatch):
    from model.gpt.decode import Decoder
    model = tiny_gpt(seed=5)
    lengths = []
    if fast:
        orig_call = Decoder.__call__
        monkeypatch.setattr(Decoder, "__call__", lambda self, idx, cache: (lengths.append(tuple(idx.shape)),
                                                                           orig_call(self, idx, cache))[1])
    else:
        orig = model.forward
        model.forward = lambda idx, *a, **k: (lengths.append(tuple(idx.shape)), orig(idx, *a, **k))[1]
    model.beam_search(PROMPTS, 5, num_beams=3, fast=fast)
    assert lengths == [(2, 4)] + [(6, 1)] * 4  # one prefill of the 2 prompts, then one token per beam


def test_mode_restored_and_inference_tensors():
    model = tiny_gpt()
    model.train()
    seqs, scores = model.beam_search(PROMPTS, 3, num_beams=2)
    assert model.training and seqs.is_inference() and not scores.requires_grad


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_beams=0), "num_beams"), (dict(num_beams=2, num_return_sequences=3), "num_return_sequences=3"),
    (dict(num_beams=2, early_stopping="sometimes"), "early_stopping"), (dict(num_beams=2, early_stopping=1),
                                                                        "early_stopping"),
    (dict(num_beams=2, length_penalty=float("nan")), "length_penalty"),
    (dict(num_beams=2, no_repeat_ngram_size=-1), "no_repeat_ngram_size"),
    (dict(num_beams=2, eos_token_id=41), "eos_token_id"),
])
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_gpt().beam_search(PROMPTS, 3, **kwargs)


def test_zero_new_tokens_rejected():
    with pytest.raises(ValueError, match="max_new_tokens"):
        tiny_gpt().beam_search(PROMPTS, 0, num_beams=2)


def test_kv_cache_reorder_gathers_the_filled_positions():
    model = tiny_gpt()
    cache = model.new_cache(2, 10)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3], [4, 5, 6]]), kv_cache=cache)
    cache.reorder(torch.tensor([0, 0, 1, 1]))  # prompts -> beams (batch grows)
    k0 = cache.k[:, :, :, :3].clone()
    # chains copied in place ([0, 0, 1, 2], [3, 1, 1, 3]), cycles through the spare pair ([1, 0, 3, 2], and the
    # 0 <-> 2 trade of [2, 2, 0, 1]), and no move at all
    for index in ([0, 0, 1, 2], [1, 0, 3, 2], [2, 2, 0, 1], [3, 1, 1, 3], [0, 1, 2, 3]):
        expect_k = k0[:, index]
        cache.reorder(torch.tensor(index))
        assert torch.equal(cache.k[:, :, :, :3], expect_k)
        k0 = expect_k
    # the cache still extends correctly: next-token logits equal a full forward of each reordered row
    rows = torch.tensor([[1, 2, 3], [4, 5, 6]])[[0, 0, 1, 1]][[0, 0, 1, 2]][[1, 0, 3, 2]][[2, 2, 0, 1]][[3, 1, 1, 3]]
    nxt = torch.tensor([[7], [8], [9], [10]])
    with torch.no_grad():
        a = model(nxt, kv_cache=cache)[0][:, -1]
        b = model(torch.cat([rows, nxt], dim=1))[0][:, -1]
    assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.gpu
def test_cuda_cached_equals_uncached():
    model = tiny_gpt(seed=6).cuda()
    idx = PROMPTS.cuda()
    a = model.beam_search(idx, 20, num_beams=3, num_return_sequences=3, eos_token_id=7)
    b = model.beam_search(idx, 20, num_beams=3, num_return_sequences=3, eos_token_id=7, use_cache=False)
    assert torch.equal(a[0], b[0]) and torch.allclose(a[1], b[1], atol=1e-4)


@pytest.mark.parametrize("moves,ok", [({}, True), ({1: 0, 2: 1, 3: 2}, True), ({0: 3, 2: 1}, True),
                                      ({0: 1, 1: 0}, False), ({0: 2, 1: 2, 2: 0, 3: 1}, False)])
def test_copy_order_reads_every_row_before_overwriting_it(moves, ok):
    order = _copy_order(moves)
    assert (order is not None) == ok
    if ok:
        rows = list(range(4))
        for dst in order:
            rows[dst] = rows[moves[dst]]
        assert rows == [moves.get(d, d) for d in range(4)]


def test_kv_cache_reorder_under_autograd_keeps_working():
    model = tiny_gpt()
    cache = model.new_cache(2, 6)
    model(torch.tensor([[1, 2], [3, 4]]), kv_cache=cache)  # grad mode: the cache is part of a graph
    before = cache.k[:, :, :, :2].detach().clone()
    cache.reorder(torch.tensor([1, 0]))
    assert torch.equal(cache.k[:, :, :, :2].detach(), before[:, [1, 0]])


def test_shared_prefix_counts_the_tokens_each_beam_shares_with_its_source():
    seqs = torch.tensor([[1, 2, 3, 4], [1, 2, 5, 6], [1, 7, 3, 4], [1, 2, 3, 4]])
    assert _shared_prefix(seqs, torch.tensor([1, 0, 0, 2]), 4) == [2, 2, 1, 1]
    assert _shared_prefix(seqs, torch.tensor([3, 1, 2, 0]), 4) == [4, 4, 4, 4]  # the same tokens: nothing to copy
    assert _shared_prefix(seqs, torch.tensor([1, 0, 0, 2]), 2) == [2, 2, 1, 1]  # only the first cur tokens count


def test_kv_cache_reorder_copies_only_positions_past_the_shared_prefix():
    cache = tiny_gpt().new_cache(3, 8)
    cache.k.copy_(torch.arange(cache.k.numel(), dtype=torch.float32).view(cache.k.shape))
    cache.v.copy_(-cache.k)
    cache.pos = 6
    before = cache.k.clone()
    cache.reorder(torch.tensor([1, 1, 0]), shared=[0, 6, 4])  # row 0 <- row 1 whole; row 2 <- row 0 from 4 on
    expect = before.clone()
    expect[:, 0, :, :6] = before[:, 1, :, :6]
    expect[:, 2, :, 4:6] = before[:, 0, :, 4:6]  # positions 0-3 stay: equal to row 0's by the caller's word
    assert torch.equal(cache.k, expect) and torch.equal(cache.v, -expect)
