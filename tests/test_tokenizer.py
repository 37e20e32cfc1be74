"""Tokenizers: round trips (hand-picked and property-based), BPE training against a naive trainer and
hand-worked merges, GPT-2 ids from the real ranks file, rebuilding from meta, and the errors."""
import functools
import hashlib
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model.training.data import pydoc_text
from model.training.tokenizer import (GPT2_EOT, R50K_SHA256, R50K_URL, RANKS_FILE, CharTokenizer, Tokenizer,
                             TiktokenTokenizer, bpe_tokenizer, gpt2_tokenizer, load_ranks, load_tokenizer,
                             pretokenize, ranks_bytes, ranks_from_merges, sha256_file, tiktoken_cache_path,
                             train_bpe)

from conftest import R50K, needs_r50k
CORPUS = "Größe — naïve café ☃ 𝄞 hello, world!\n\tTabs & 'quotes' \"double\" 123 456.\n"


@pytest.fixture(autouse=True)
def private_tiktoken_cache(tmp_path, monkeypatch):
    """tiktoken copies each ranks file it reads into its cache: keep that, and lookups, inside tmp_path."""
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tiktoken-cache"))


@functools.cache
def small_bpe() -> TiktokenTokenizer:
    return bpe_tokenizer(pydoc_text()[:30_000], 400)


@functools.cache
def gpt2() -> TiktokenTokenizer:
    return gpt2_tokenizer(R50K)


# ----------------------------------------------------------------------------------------------------
# char

def test_char_vocab_is_sorted_corpus_characters_and_round_trips():
    tok = CharTokenizer.from_text(CORPUS)
    assert tok.chars == sorted(set(CORPUS)) and tok.vocab_size == len(set(CORPUS))
    ids = tok.encode(CORPUS)
    assert ids[:2] == [tok.chars.index("G"), tok.chars.index("r")]
    assert tok.decode(ids) == CORPUS
    assert tok.decode(np.array(ids, dtype=np.uint16)) == CORPUS  # numpy ids, as read from a .bin
    assert isinstance(tok, Tokenizer) and tok.name == "char" and tok.eot_token_id is None


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet=st.sampled_from(sorted(set(CORPUS)))))
def test_char_round_trip_property(text):
    tok = CharTokenizer.from_text(CORPUS)
    assert tok.decode(tok.encode(text)) == text


def test_char_unknown_character_and_bad_id_are_errors():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(ValueError, match=r"'é'"):
        tok.encode("abé")
    with pytest.raises(ValueError, match=r"token id 3 "):
        tok.decode([0, 3])
    with pytest.raises(ValueError, match="twice"):
        CharTokenizer(["a", "a"])
    with pytest.raises(ValueError, match="single character"):
        CharTokenizer(["ab"])


def test_char_meta_is_json_and_rebuilds():
    tok = CharTokenizer.from_text(CORPUS)
    meta = json.loads(json.dumps(tok.meta()))
    again = load_tokenizer(meta)
    assert again.chars == tok.chars and again.encode(CORPUS) == tok.encode(CORPUS)


# ----------------------------------------------------------------------------------------------------
# bpe training

def naive_bpe(text: str, vocab_size: int) -> tuple[list[tuple[int, int]], int]:
    """Recount every pair after every merge; the same tie-break. Returns merges and the final token count."""
    words = pretokenize(text)
    seqs = {w: list(w.encode()) for w in words}
    vocab = [bytes([i]) for i in range(256)]
    merges = []
    while len(vocab) < vocab_size:
        counts = Counter()
        for w, seq in seqs.items():
            for pair in zip(seq, seq[1:]):
                counts[pair] += words[w]
        a, b = min(counts, key=lambda p: (-counts[p], vocab[p[0]], vocab[p[1]]))
        merges.append((a, b))
        vocab.append(vocab[a] + vocab[b])
        new = len(vocab) - 1
        for w, seq in seqs.items():
            out, i = [], 0
            while i < len(seq):
                if i + 1 < len(seq) and (seq[i], seq[i + 1]) == (a, b):
                    out.append(new)
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            seqs[w] = out
    return merges, sum(len(seq) * words[w] for w, seq in seqs.items())


def test_bpe_hand_worked_merges():
    # pieces "ab", " ab", " ab", " abc": (a,b) occurs 4 times, then (" ", ab) 3 times, then (" ab", c) once
    assert train_bpe("ab ab ab abc", 259) == [(97, 98), (32, 256), (257, 99)]
    ranks = ranks_from_merges(train_bpe("ab ab ab abc", 259))
    assert ranks[b"ab"] == 256 and ranks[b" ab"] == 257 and ranks[b" abc"] == 258
    # pieces "ab", " cd": three pairs seen once; the tie goes to the smallest bytes, (b" ", b"c")
    assert train_bpe("ab cd", 257) == [(32, 99)]
    # "aaaa": (a,a) merges left to right into [aa, aa], then (aa, aa)
    assert train_bpe("aaaa", 258) == [(97, 97), (256, 256)]


def test_bpe_runs_out_of_pairs_and_checks_vocab_size():
    with pytest.raises(ValueError, match="corpus too small for a bpe vocab of 260"):
        train_bpe("ab ab ab abc", 260)
    for bad in (256, 100, 300.0, True):
        with pytest.raises(ValueError, match=">= 257"):
            train_bpe("ab ab", bad)


def test_bpe_incremental_matches_naive_and_tiktoken_applies_the_merges():
    text = pydoc_text()[:20_000]
    merges, n_tokens = naive_bpe(text, 256 + 150)
    assert train_bpe(text, 256 + 150) == merges
    tok = TiktokenTokenizer("bpe", ranks_from_merges(merges), merges=merges)
    # tiktoken's lowest-rank-first encoding reproduces the segmentation training ended with
    assert len(tok.encode(text)) == n_tokens


def test_bpe_vocab_is_exactly_the_requested_size():
    tok = small_bpe()
    assert tok.vocab_size == 400 and len(tok.ranks) == 400 and len(tok.merges) == 400 - 256
    text = pydoc_text()[:30_000]
    ids = tok.encode(text)
    assert 0 <= min(ids) and max(ids) < 400  # every id fits the vocabulary
    assert len(ids) < len(text.encode()) / 1.8  # 144 merges compress the text they were learned from


@settings(max_examples=150, deadline=None)
@given(st.text())
def test_bpe_round_trips_arbitrary_unicode(text):
    tok = small_bpe()
    assert tok.decode(tok.encode(text)) == text


def test_bpe_meta_rebuilds_from_file_or_embedded_merges(tmp_path):
    tok = small_bpe()
    sha = tok.save_ranks(tmp_path / RANKS_FILE)
    meta = json.loads(json.dumps(tok.meta()))
    assert meta["ranks_sha256"] == sha == sha256_file(tmp_path / RANKS_FILE)
    from_file = load_tokenizer(meta, tmp_path)
    from_merges = load_tokenizer(meta)  # no folder: the merges embedded in meta suffice
    for again in (from_file, from_merges):
        assert again.ranks == tok.ranks and again.encode(CORPUS) == tok.encode(CORPUS)
    # the folder rebuilt with another vocabulary: the embedded merges still rebuild the tokenizer; without
    # them the error names the file that holds other ranks and what to pass instead
    (tmp_path / RANKS_FILE).write_bytes(ranks_bytes(ranks_from_merges(tok.merges[:-1])))
    assert load_tokenizer(meta, tmp_path).ranks == tok.ranks
    with pytest.raises(FileNotFoundError, match=f"{RANKS_FILE} holds other ranks .*rebuilt.*--bpe-file"):
        load_tokenizer({k: v for k, v in meta.items() if k != "merges"}, tmp_path)
    # merges that do not match the recorded sha256
    with pytest.raises(ValueError, match="merges do not match"):
        load_tokenizer({**meta, "merges": meta["merges"][:-1]})
    # neither a file nor merges
    no_merges = {k: v for k, v in meta.items() if k != "merges"}
    with pytest.raises(FileNotFoundError, match=RANKS_FILE):
        load_tokenizer(no_merges, tmp_path / "elsewhere")


def test_byte_level_tokenizers_reject_lone_surrogates_and_bad_ids():
    tok = small_bpe()
    with pytest.raises(ValueError, match="index 1"):
        tok.encode("a\ud800b")
    with pytest.raises(ValueError, match="token id 400"):
        tok.decode([1, 400])


def test_load_ranks_errors(tmp_path):
    path = tmp_path / "garbage.tiktoken"
    path.write_text("this is not base64 and a rank\n")
    with pytest.raises(ValueError, match="garbage.tiktoken: not a .tiktoken ranks file"):
        load_ranks(path)
    with pytest.raises(ValueError, match=f"garbage.tiktoken has sha256 {sha256_file(path)}, expected abc"):
        load_ranks(path, "abc")
    with pytest.raises(FileNotFoundError, match="nope.tiktoken"):
        load_ranks(tmp_path / "nope.tiktoken")


def test_load_tokenizer_unknown_name_and_vocab_mismatch():
    with pytest.raises(ValueError, match="'sentencepiece'"):
        load_tokenizer({"tokenizer": "sentencepiece", "vocab_size": 3})
    with pytest.raises(ValueError, match="vocab_size=5"):
        load_tokenizer({"tokenizer": "char", "vocab_size": 5, "chars": ["a", "b"]})


# ----------------------------------------------------------------------------------------------------
# gpt2

@needs_r50k
def test_gpt2_known_ids_and_round_trip():
    tok = gpt2()
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode(" the") == [262]
    assert tok.vocab_size == 50257 and tok.eot_token_id == GPT2_EOT == 50256
    assert tok.decode([15496, 995, GPT2_EOT]) == "Hello world<|endoftext|>"
    # the special token's text is ordinary text when encoding
    assert GPT2_EOT not in tok.encode("<|endoftext|>")
    assert tok.decode(tok.encode(CORPUS)) == CORPUS


@needs_r50k
@settings(max_examples=100, deadline=None)
@given(st.text())
def test_gpt2_round_trips_arbitrary_unicode(text):
    tok = gpt2()
    assert tok.decode(tok.encode(text)) == text


@needs_r50k
def test_gpt2_ranks_serialise_byte_identically():
    assert hashlib.sha256(ranks_bytes(gpt2().ranks)).hexdigest() == R50K_SHA256 == sha256_file(R50K)


def test_gpt2_offline_without_ranks_is_a_clear_error(tmp_path):
    cache = tiktoken_cache_path(R50K_URL)
    assert cache.parent == tmp_path / "tiktoken-cache" and not cache.exists()
    with pytest.raises(FileNotFoundError, match=r"GPT-2 BPE ranks not found offline.*--bpe-file"):
        gpt2_tokenizer()
    with pytest.raises(FileNotFoundError, match="missing.tiktoken"):
        gpt2_tokenizer(tmp_path / "missing.tiktoken")


def test_gpt2_rejects_a_ranks_file_that_is_not_r50k(tmp_path):
    path = tmp_path / "other.tiktoken"
    small_bpe().save_ranks(path)
    with pytest.raises(ValueError, match=f"other.tiktoken has sha256 .* expected {R50K_SHA256}"):
        gpt2_tokenizer(path)


@needs_r50k
def test_gpt2_found_in_tiktoken_cache_and_rebuilt_from_meta(tmp_path):
    cache = tiktoken_cache_path(R50K_URL)  # <TIKTOKEN_CACHE_DIR>/sha1(url), as tiktoken names it
    cache.parent.mkdir(parents=True)
    shutil.copyfile(R50K, cache)
    tok = gpt2_tokenizer()
    assert tok.encode("Hello world") == [15496, 995]
    meta = json.loads(json.dumps(tok.meta()))
    assert meta["ranks_sha256"] == R50K_SHA256 and meta["eot_token_id"] == GPT2_EOT
    assert load_tokenizer(meta).encode("Hello world") == [15496, 995]  # from the cache
    cache.unlink()
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'ds' / RANKS_FILE}"):
        load_tokenizer(meta, tmp_path / "ds")
    assert load_tokenizer(meta, bpe_file=R50K).encode(" the") == [262]
