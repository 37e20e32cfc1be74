"""The pure sampling steps: hand-worked values, transformers' warpers as reference, property tests."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model.gpt.sampling import (apply_temperature, ban_repeated_ngrams, check_logits, greedy, next_token, sample,
                            top_k_filter, top_p_filter)

NEG_INF = float("-inf")


def kept(logits: torch.Tensor) -> set[int]:
    return set(torch.isfinite(logits).nonzero().flatten().tolist())


# ----------------------------------------------------------------------------------------------------
# hand-worked examples

def test_temperature_divides():
    x = torch.tensor([[1.0, -2.0, 4.0]])
    assert torch.equal(apply_temperature(x, 2.0), torch.tensor([[0.5, -1.0, 2.0]]))
    assert apply_temperature(x, 1.0) is x


def test_top_k_keeps_ties_at_the_kth_value():
    x = torch.tensor([[3.0, 1.0, 2.0, 2.0, 0.0]])
    assert kept(top_k_filter(x, 1)[0]) == {0}
    assert kept(top_k_filter(x, 2)[0]) == {0, 2, 3}  # the 2nd value 2.0 is tied: both kept
    assert kept(top_k_filter(x, 3)[0]) == {0, 2, 3}
    assert kept(top_k_filter(x, 4)[0]) == {0, 1, 2, 3}
    assert torch.equal(top_k_filter(x, 0), x) and torch.equal(top_k_filter(x, None), x)
    assert torch.equal(top_k_filter(x, 99), x)  # clamped to the vocabulary
    assert torch.equal(top_k_filter(x, 3)[0, [0, 2, 3]], x[0, [0, 2, 3]])  # kept logits unchanged


def test_top_p_hand_worked():
    # probabilities 0.5, 0.25, 0.125, 0.125 (logits are their logs)
    x = torch.log(torch.tensor([[0.5, 0.25, 0.125, 0.125]]))
    assert kept(top_p_filter(x, 0.5)[0]) == {0}  # 0.5 alone reaches p
    assert kept(top_p_filter(x, 0.6)[0]) == {0, 1}
    three = kept(top_p_filter(x, 0.8)[0])  # mass 0.125 <= 0.2 can go: one of the two tied smallest tokens
    assert len(three) == 3 and {0, 1} <= three
    assert kept(top_p_filter(x, 1.0)[0]) == {0, 1, 2, 3}
    assert kept(top_p_filter(x, 1e-6)[0]) == {0}  # at least one token


def test_greedy_and_sample_with_generator():
    x = torch.tensor([[0.0, 5.0, 1.0], [9.0, 0.0, 0.0]])
    assert greedy(x).tolist() == [1, 0]
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    a, b = sample(logits, g1), sample(logits, g2)
    assert a.shape == (4,) and torch.equal(a, b)
    onehot = torch.full((2, 5), NEG_INF)
    onehot[0, 3] = onehot[1, 1] = 0.0
    assert sample(onehot, g1).tolist() == [3, 1]  # a single finite logit is always drawn


def test_sample_frequencies_follow_softmax():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]])).expand(20000, 3)
    draws = sample(logits, torch.Generator().manual_seed(1))
    freq = torch.bincount(draws, minlength=3).float() / draws.numel()
    assert torch.allclose(freq, torch.tensor([0.7, 0.2, 0.1]), atol=0.015)


def test_next_token_temperature_zero_is_greedy_and_consumes_no_randomness():
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(5)
    state = g.get_state()
    assert torch.equal(next_token(logits, temperature=0, generator=g), logits.argmax(-1))
    assert torch.equal(g.get_state(), state)


def test_next_token_top_k_one_is_greedy():
    logits = torch.randn(5, 30, generator=torch.Generator().manual_seed(4))
    tok = next_token(logits, temperature=1.3, top_k=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(tok, logits.argmax(-1))


def test_ngram_ban_hand_worked():
    seqs = torch.tensor([[1, 2, 3, 1, 2], [4, 4, 4, 4, 4]])
    lp = torch.zeros(2, 6)
    out2 = ban_repeated_ngrams(seqs, lp, 2)  # last token 2 was followed by 3; 4 by 4
    assert kept(out2[0]) == {0, 1, 2, 4, 5} and kept(out2[1]) == {0, 1, 2, 3, 5}
    out3 = ban_repeated_ngrams(seqs, lp, 3)  # suffix (1, 2) was followed by 3
    assert kept(out3[0]) == {0, 1, 2, 4, 5}
    out1 = ban_repeated_ngrams(seqs, lp, 1)  # every token seen is banned
    assert kept(out1[0]) == {0, 4, 5} and kept(out1[1]) == {0, 1, 2, 3, 5}
    assert torch.equal(ban_repeated_ngrams(seqs, lp, 0), lp)
    assert torch.equal(ban_repeated_ngrams(seqs[:, :2], lp, 3), lp)  # no complete 3-gram yet


# ----------------------------------------------------------------------------------------------------
# bad values

@pytest.mark.parametrize("bad", [-0.5, float("nan"), float("inf")])
def test_bad_temperature(bad):
    with pytest.raises(ValueError, match="temperature"):
        next_token(torch.zeros(1, 3), temperature=bad)


def test_temperature_zero_not_a_division():
    with pytest.raises(ValueError, match="greedy"):
        apply_temperature(torch.zeros(1, 3), 0)


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_bad_top_k(bad):
    with pytest.raises(ValueError, match=f"top_k.*{bad!r}"):
        top_k_filter(torch.zeros(1, 3), bad)


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.01, float("nan")])
def test_bad_top_p(bad):
    with pytest.raises(ValueError, match="top_p"):
        top_p_filter(torch.zeros(1, 3), bad)


@pytest.mark.parametrize("row", [[float("nan"), 0.0, 1.0], [NEG_INF, NEG_INF, NEG_INF], [0.0, float("inf"), 1.0]])
def test_unusable_logits_raise(row):
    logits = torch.tensor([[0.0, 1.0, 2.0], row])
    with pytest.raises(ValueError, match=r"logits row \[1\]"):
        check_logits(logits)
    with pytest.raises(ValueError, match="logits row"):
        next_token(logits, temperature=0.8, generator=torch.Generator())
    with pytest.raises(ValueError, match="logits row"):
        next_token(logits, temperature=0)


def test_partly_masked_logits_are_fine():
    logits = torch.tensor([[NEG_INF, 1.0, NEG_INF]])
    check_logits(logits)
    assert next_token(logits, temperature=1.0, top_p=0.3, generator=torch.Generator()).tolist() == [1]


def test_tiny_temperature_overflow_is_caught():
    with pytest.raises(ValueError, match="logits row"):
        next_token(torch.tensor([[1e30, 0.0]]), temperature=1e-30)


# ----------------------------------------------------------------------------------------------------
# transformers' warpers as the reference (same kept sets, on random and on tied logits)

def _tied_logits(gen, rows, vocab, levels):
    return torch.randint(0, levels, (rows, vocab), generator=gen).float() * 0.5  # (rows, V), many ties


@pytest.mark.parametrize("kind", ["random", "tied"])
@pytest.mark.parametrize("name", ["top_k", "top_p"])
def test_filters_match_transformers_warpers(name, kind):
    """Same kept set and same kept values as TopKLogitsWarper / TopPLogitsWarper, ties included."""
    tf = pytest.importorskip("transformers")
    gen = torch.Generator().manual_seed(11 if name == "top_k" else 12)
    for trial in range(40):
        if name == "top_k":
            V, scale, levels = 3 + trial, 3, 4
            settings = (1, 2, 3, V // 2 + 1, V, V + 5)
            warper, ours_fn = (lambda k: tf.TopKLogitsWarper(top_k=k)), top_k_filter
        else:
            V, scale, levels = 2 + trial, 2, 3
            settings = (0.05, 0.3, 0.5, 0.75, 0.9, 0.99, 1.0)
            warper, ours_fn = (lambda p: tf.TopPLogitsWarper(top_p=p)), top_p_filter
        x = torch.randn(4, V, generator=gen) * scale if kind == "random" else _tied_logits(gen, 4, V, levels)
        for setting in settings:
            ref = warper(setting)(None, x.clone())
            ours = ours_fn(x, setting)
            assert torch.equal(torch.isinf(ours), torch.isinf(ref)), (trial, setting)
            assert torch.equal(ours[torch.isfinite(ours)], ref[torch.isfinite(ref)]), (trial, setting)


def test_ngram_ban_matches_transformers():
    tf = pytest.importorskip("transformers")
    gen = torch.Generator().manual_seed(13)
    for n in (1, 2, 3, 4):
        seqs = torch.randint(0, 5, (6, 17), generator=gen)  # few distinct tokens: many repeats
        scores = torch.randn(6, 7, generator=gen)
        ref = tf.NoRepeatNGramLogitsProcessor(n)(seqs, scores.clone())
        assert torch.equal(ban_repeated_ngrams(seqs, scores, n), ref)


# ----------------------------------------------------------------------------------------------------
# properties

logit_rows = st.lists(st.one_of(st.floats(-30, 30, width=32), st.just(NEG_INF)), min_size=1, max_size=40).filter(
    lambda r: any(math.isfinite(v) for v in r))


@settings(max_examples=200, deadline=None)
@given(row=logit_rows, k=st.integers(0, 45), p=st.floats(1e-4, 1.0), t=st.floats(0.05, 5.0))
def test_filters_never_nan_and_keep_at_least_one(row, k, p, t):
    x = torch.tensor([row])
    out = top_p_filter(top_k_filter(apply_temperature(x, t), k), p)
    assert not torch.isnan(out).any()
    assert torch.isfinite(out).sum() >= 1
    assert kept(out[0]) <= kept(x[0])
    probs = torch.softmax(out, dim=-1)
    assert not torch.isnan(probs).any() and abs(float(probs.sum()) - 1) < 1e-5
    assert int(next_token(x, temperature=t, top_k=k, top_p=p, generator=torch.Generator().manual_seed(0))) \
        in kept(out[0])


@settings(max_examples=200, deadline=None)
@given(row=logit_rows, k=st.integers(1, 45))
def test_top_k_keeps_k_up_to_ties(row, k):
    x = torch.tensor(row)
    finite = x[torch.isfinite(x)]
    out = top_k_filter(x[None], k)[0]
    keep = torch.isfinite(out)
    n_keep = int(keep.sum())
    if k >= len(row):
        assert torch.equal(out, x)
        return
    kth = torch.sort(x, descending=True).values[k - 1]
    # every kept token is >= the k-th value; only ties with it push the count past k
    assert n_keep >= min(k, len(finite))
    assert bool((x[keep] >= kth).all())
    assert int((x > kth).sum()) < k
    assert n_keep == int((x >= kth).sum()) if math.isfinite(kth) else n_keep == len(finite)


@settings(max_examples=200, deadline=None)
@given(row=logit_rows, p=st.floats(1e-3, 0.999))
def test_top_p_keeps_the_smallest_prefix_reaching_p(row, p):
    x = torch.tensor(row, dtype=torch.float64)
    out = top_p_filter(x[None], p)[0]
    keep = torch.isfinite(out)
    probs = torch.softmax(x, dim=-1)
    kept_mass = float(probs[keep].sum())
    assert kept_mass >= p - 1e-9 or int(keep.sum()) == int(torch.isfinite(x).sum())
    # kept tokens are the most probable ones: no dropped token is more probable than a kept one
    if (~keep).any():
        assert float(probs[~keep].max()) <= float(probs[keep].min())
