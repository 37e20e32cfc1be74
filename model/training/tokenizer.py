"""Tokenizers: characters, GPT-2's BPE (tiktoken, offline from a local ranks file) and a byte-level BPE
trained from scratch on the corpus.

All three satisfy `Tokenizer`. The two byte-level ones share one class over a `tiktoken.Encoding`; their
ranks live in tiktoken's text format (`base64(token_bytes) rank` per line) in a file `tokenizer.tiktoken`
beside a dataset's meta.json, whose sha256 meta.json records.
"""
from __future__ import annotations

import base64
import hashlib
import heapq
import os
import tempfile
from collections import Counter, defaultdict
from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable

import regex
import tiktoken
import tiktoken.load

from ..config import check

RANKS_FILE = "tokenizer.tiktoken"  # ranks file name inside a dataset folder
# GPT-2's pre-tokenizer: contractions, letter runs, digit runs and punctuation runs (each with at most one
# leading space), then whitespace. Merges never cross these pieces, for GPT-2 and for our own BPE alike.
GPT2_PATTERN = (r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s""")
ENDOFTEXT = "<|endoftext|>"
GPT2_EOT = 50256
R50K_URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"  # GPT-2's ranks
R50K_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
TOKENIZERS = ("char", "gpt2", "bpe")


@runtime_checkable
class Tokenizer(Protocol):
    name: str  # "char" | "gpt2" | "bpe"
    vocab_size: int
    eot_token_id: int | None  # <|endoftext|> for gpt2; None for char and bpe

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def meta(self) -> dict: ...


def _check_ids(ids: Sequence[int], vocab_size: int) -> list[int]:
    out = [int(i) for i in ids]  # accepts numpy / torch integers too
    bad = next((i for i in out if not 0 <= i < vocab_size), None)
    if bad is not None:
        raise ValueError(f"token id {bad} is outside the vocabulary [0, {vocab_size})")
    return out


class CharTokenizer:
    """One token per character; ids follow the order of `chars` (sorted corpus characters when built)."""

    name = "char"
    eot_token_id = None

    def __init__(self, chars: Sequence[str]):
        chars = list(chars)
        if not chars:
            raise ValueError("char tokenizer needs at least one character")
        for ch in chars:
            if not isinstance(ch, str) or len(ch) != 1:
                raise ValueError(f"char vocabulary entry {ch!r} is not a single character")
        if len(set(chars)) != len(chars):
            dup = next(c for c, n in Counter(chars).items() if n > 1)
            raise ValueError(f"char vocabulary lists {dup!r} twice")
        self.chars = chars
        self.vocab_size = len(chars)
        self._stoi = {c: i for i, c in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls(sorted(set(text)))

    def encode(self, text: str) -> list[int]:
        try:
            return [self._stoi[c] for c in text]
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in the char vocabulary "
                             f"({self.vocab_size} characters)") from None

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.chars[i] for i in _check_ids(ids, self.vocab_size))

    def meta(self) -> dict:
        return {"tokenizer": self.name, "vocab_size": self.vocab_size, "chars": self.chars}


# ----------------------------------------------------------------------------------------------------
# Ranks files (tiktoken's format) and the byte-level tokenizers built on them.

def ranks_bytes(ranks: dict[bytes, int]) -> bytes:
    """The ranks in tiktoken's file format, in rank order (byte-identical to OpenAI's r50k_base.tiktoken)."""
    return b"".join(base64.b64encode(tok) + b" " + str(rank).encode() + b"\n"
                    for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]))


def sha256_file(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_ranks(path: str | Path, expected_sha256: str | None = None) -> dict[bytes, int]:
    """Read a .tiktoken ranks file; a missing file or a sha256 other than the expected one is an error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"BPE ranks file not found: {path}")
    digest = sha256_file(path)
    if expected_sha256 is not None and digest != expected_sha256:
        raise ValueError(f"BPE ranks file {path} has sha256 {digest}, expected {expected_sha256}")
    try:
        # expected_hash also guards tiktoken's own cache (keyed by path) against a stale copy
        return tiktoken.load.load_tiktoken_bpe(str(path), expected_hash=digest)
    except ValueError as e:
        raise ValueError(f"{path}: not a .tiktoken ranks file ({e})") from None


def tiktoken_cache_path(url: str = R50K_URL) -> Path | None:
    """Where tiktoken caches `url` (None when its cache is disabled); tiktoken names the file sha1(url)."""
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        cache_dir = os.environ["TIKTOKEN_CACHE_DIR"]
    elif "DATA_GYM_CACHE_DIR" in os.environ:
        cache_dir = os.environ["DATA_GYM_CACHE_DIR"]
    else:
        cache_dir = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    if cache_dir == "":
        return None
    return Path(cache_dir) / hashlib.sha1(url.encode()).hexdigest()


class TiktokenTokenizer:
    """Byte-level BPE over a `tiktoken.Encoding` with GPT-2's pre-tokenizer: `gpt2` or our own `bpe`.

    Every byte is a token, so any (valid Unicode) text encodes, and decode(encode(text)) == text.
    `<|endoftext|>` in the text is encoded as ordinary text, never as the special token.
    """

    def __init__(self, name: str, ranks: dict[bytes, int], *, eot_token_id: int | None = None,
                 merges: list[tuple[int, int]] | None = None):
        if name not in ("gpt2", "bpe"):
            raise ValueError(f"unknown byte-level tokenizer {name!r}; expected 'gpt2' or 'bpe'")
        missing = next((b for b in range(256) if bytes([b]) not in ranks), None)
        if missing is not None:
            raise ValueError(f"{name} ranks lack the single byte {missing:#04x}; text could not round-trip")
        special = {ENDOFTEXT: eot_token_id} if eot_token_id is not None else {}
        self.name, self.eot_token_id, self.ranks, self.merges = name, eot_token_id, ranks, merges
        self.ranks_sha256 = hashlib.sha256(ranks_bytes(ranks)).hexdigest()
        self.encoding = tiktoken.Encoding(f"flopgpt-{name}", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                                          special_tokens=special)
        self.vocab_size = self.encoding.n_vocab

    def encode(self, text: str) -> list[int]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # tiktoken would silently drop a lone surrogate
            raise ValueError(f"text holds {text[e.start]!r} at index {e.start}, which is not valid Unicode "
                             f"(lone surrogate)") from None
        return self.encoding.encode_ordinary(text)

    def decode(self, ids: Sequence[int]) -> str:
        # a cut through a multi-byte character (e.g. mid-sample) decodes to U+FFFD instead of failing
        return self.encoding.decode(_check_ids(ids, self.vocab_size))

    def save_ranks(self, path: str | Path) -> str:
        """Write the ranks file; returns its sha256."""
        data = ranks_bytes(self.ranks)
        Path(path).write_bytes(data)
        return hashlib.sha256(data).hexdigest()

    def meta(self) -> dict:
        meta = {"tokenizer": self.name, "vocab_size": self.vocab_size, "ranks_file": RANKS_FILE,
                "ranks_sha256": self.ranks_sha256, "eot_token_id": self.eot_token_id}
        if self.merges is not None:
            meta["merges"] = [list(m) for m in self.merges]
        return meta


def gpt2_tokenizer(bpe_file: str | Path | None = None) -> TiktokenTokenizer:
    """GPT-2's BPE (r50k_base) from `bpe_file` or tiktoken's cache; never downloads."""
    if bpe_file is None:
        cached = tiktoken_cache_path(R50K_URL)
        if cached is None or not cached.is_file():
            where = f"no cached copy at {cached}" if cached else "tiktoken's cache is disabled"
            raise FileNotFoundError(
                f"GPT-2 BPE ranks not found offline: no --bpe-file given and {where}; download {R50K_URL} "
                f"once and pass --bpe-file PATH (or set TIKTOKEN_CACHE_DIR to a folder holding it)")
        bpe_file = cached
    ranks = load_ranks(bpe_file, R50K_SHA256)
    return TiktokenTokenizer("gpt2", ranks, eot_token_id=GPT2_EOT)


# ----------------------------------------------------------------------------------------------------
# Training a byte-level BPE.

def pretokenize(text: str) -> Counter[str]:
    """Frequency of each GPT-2 pre-token piece in the text."""
    return Counter(regex.findall(GPT2_PATTERN, text))


def _merge_pair(seq: list[int], a: int, b: int, new: int) -> list[int]:
    """Replace each non-overlapping (a, b), scanning left to right, with `new`."""
    out, i, n = [], 0, len(seq)
    while i < n:
        if i + 1 < n and seq[i] == a and seq[i + 1] == b:
            out.append(new)
            i += 2
        else:
            out.append(seq[i])
            i += 1
    return out


def train_bpe(text: str, vocab_size: int) -> list[tuple[int, int]]:
    """Learn merges until there are `vocab_size` tokens: 256 bytes plus one token per merge.

    Returns merges in rank order: merges[i] = (a, b) makes token 256 + i from tokens a and b. Each step merges
    the most frequent adjacent pair within pre-token pieces; ties go to the pair whose (bytes_a, bytes_b) sorts
    first. Pair counts are updated only for the words a merge touches, and a heap with lazy deletion finds
    the top pair. A pair whose bytes already form a token (e.g. "a"+"bc" after "ab"+"c") is merged into that
    token without taking a new rank. A corpus with too few distinct pairs is a ValueError.
    """
    check("bpe vocab_size", vocab_size, int, 257)  # 256 bytes + 1 merge
    words = pretokenize(text)
    seqs = [list(w.encode("utf-8")) for w in words]
    freqs = list(words.values())
    vocab = [bytes([i]) for i in range(256)]  # token id -> bytes
    index = {tok: i for i, tok in enumerate(vocab)}  # bytes -> token id
    counts: dict[tuple[int, int], int] = defaultdict(int)
    where: dict[tuple[int, int], set[int]] = defaultdict(set)  # pair -> words that may hold it
    for w, (seq, f) in enumerate(zip(seqs, freqs)):
        for pair in zip(seq, seq[1:]):
            counts[pair] += f
            where[pair].add(w)
    heap = [(-c, vocab[a], vocab[b], a, b) for (a, b), c in counts.items()]
    heapq.heapify(heap)
    merges: list[tuple[int, int]] = []
    while len(vocab) < vocab_size:
        while heap and -heap[0][0] != counts.get((heap[0][3], heap[0][4]), 0):
            heapq.heappop(heap)  # stale entry: that pair's count changed since it was pushed
        if not heap:
            raise ValueError(f"corpus too small for a bpe vocab of {vocab_size}: no pairs left to merge after "
                             f"{len(vocab)} tokens")
        _, _, _, a, b = heapq.heappop(heap)
        joined = vocab[a] + vocab[b]
        new = index.get(joined)
        if new is None:
            new = len(vocab)
            vocab.append(joined)
            index[joined] = new
            merges.append((a, b))
        delta: dict[tuple[int, int], int] = defaultdict(int)
        for w in where.pop((a, b)):
            seq = seqs[w]
            merged = _merge_pair(seq, a, b, new)
            if len(merged) == len(seq):
                continue  # stale: an earlier merge already consumed this word's (a, b)
            f = freqs[w]
            for pair in zip(seq, seq[1:]):
                delta[pair] -= f
            for pair in zip(merged, merged[1:]):
                delta[pair] += f
                where[pair].add(w)
            seqs[w] = merged
        for pair, d in delta.items():
            if d:
                counts[pair] += d
                if counts[pair] > 0:
                    heapq.heappush(heap, (-counts[pair], vocab[pair[0]], vocab[pair[1]], *pair))
                else:
                    del counts[pair]
    return merges


def ranks_from_merges(merges: Sequence[Sequence[int]]) -> dict[bytes, int]:
    """Byte-level ranks: bytes 0..255 are tokens 0..255, then merge i makes token 256 + i."""
    vocab = [bytes([i]) for i in range(256)]
    for i, pair in enumerate(merges):
        if len(pair) != 2 or not all(isinstance(t, int) and 0 <= t < len(vocab) for t in pair):
            raise ValueError(f"merge {i} = {pair!r} does not name two earlier tokens")
        vocab.append(vocab[pair[0]] + vocab[pair[1]])
    ranks = {tok: i for i, tok in enumerate(vocab)}
    if len(ranks) != len(vocab):
        raise ValueError("merges make the same token twice")
    return ranks


def bpe_tokenizer(text: str, vocab_size: int) -> TiktokenTokenizer:
    """Train a byte-level BPE of exactly `vocab_size` tokens on `text`."""
    merges = train_bpe(text, vocab_size)
    return TiktokenTokenizer("bpe", ranks_from_merges(merges), merges=merges)


# ----------------------------------------------------------------------------------------------------
# Rebuilding a tokenizer from meta.json.

def _ranks_for(meta: dict, dataset_dir: str | Path | None, bpe_file: str | Path | None) -> dict[bytes, int]:
    """The ranks a byte-level meta names: bpe_file (which must match), else (bpe) the merges the meta embeds,
    so a checkpoint samples without its dataset, else the dataset's ranks file where its sha256 matches (a
    folder rebuilt with another vocabulary is passed over), else for gpt2 tiktoken's cache."""
    name, sha = meta["tokenizer"], meta.get("ranks_sha256")
    if not isinstance(sha, str):
        raise ValueError(f"{name} meta lacks 'ranks_sha256'")
    if bpe_file is not None:
        return load_ranks(bpe_file, sha)
    if name == "bpe" and "merges" in meta:
        ranks = ranks_from_merges(meta["merges"])
        if hashlib.sha256(ranks_bytes(ranks)).hexdigest() != sha:
            raise ValueError("bpe meta: the embedded merges do not match ranks_sha256")
        return ranks
    local = Path(dataset_dir) / meta.get("ranks_file", RANKS_FILE) if dataset_dir is not None else None
    other = local is not None and local.is_file() and sha256_file(local) != sha
    if local is not None and local.is_file() and not other:
        return load_ranks(local, sha)
    if name == "gpt2" and sha == R50K_SHA256:
        cached = tiktoken_cache_path(R50K_URL)
        if cached is not None and cached.is_file():
            return load_ranks(cached, sha)
    found = (f"{local} holds other ranks (its dataset folder was rebuilt with another tokenizer)" if other else
             f"{local if local else RANKS_FILE} not found")
    raise FileNotFoundError(f"{name} ranks not found: {found}; pass the ranks file the model was trained with "
                            f"(bpe_file / --bpe-file)")


def check_tokenizer_meta(meta: dict, where: str | Path = "meta") -> None:
    """The tokenizer's keys of a meta dict, each checked for its type and range (a ValueError naming `where`
    and the key): its name; char: `chars`, distinct single characters, one per id; gpt2/bpe: the ranks
    file's name and sha256, the end-of-text id, bpe's merges (pairs of earlier ids)."""
    name = meta.get("tokenizer")
    check(f"{where}: tokenizer", name, choices=TOKENIZERS)
    vocab = meta.get("vocab_size")
    if name == "char":
        chars = meta.get("chars")
        if not isinstance(chars, list) or not chars or not all(isinstance(c, str) and len(c) == 1 for c in chars):
            raise ValueError(f"{where}: chars must be a list of single characters, got {str(chars)[:60]}")
        if len(set(chars)) != len(chars) or (isinstance(vocab, int) and len(chars) != vocab):
            raise ValueError(f"{where}: chars must hold vocab_size={vocab} distinct characters, "
                             f"got {len(chars)} ({len(set(chars))} distinct)")
        return
    for key in ("ranks_file", "ranks_sha256"):
        if key in meta and not isinstance(meta[key], str):
            raise ValueError(f"{where}: {key} must be a string, got {meta[key]!r}")
    if not isinstance(meta.get("ranks_sha256"), str) or len(meta["ranks_sha256"]) != 64:
        raise ValueError(f"{where}: ranks_sha256 must be the 64-hex-digit sha256 of the ranks, "
                         f"got {meta.get('ranks_sha256')!r}")
    if meta.get("eot_token_id") is not None:
        check(f"{where}: eot_token_id", meta["eot_token_id"], int, 0, (vocab if isinstance(vocab, int) else 2**32) - 1)
    merges = meta.get("merges")
    if merges is not None and not (isinstance(merges, list) and all(
            isinstance(m, list) and len(m) == 2 and all(isinstance(i, int) and not isinstance(i, bool)
                                                       and 0 <= i < 256 + k for i in m)
            for k, m in enumerate(merges))):
        raise ValueError(f"{where}: merges must be a list of [id, id] pairs of earlier tokens")


def load_tokenizer(meta: dict, dataset_dir: str | Path | None = None,
                   bpe_file: str | Path | None = None) -> Tokenizer:
    """Rebuild the tokenizer a dataset's (or a checkpoint's) meta dict describes."""
    check_tokenizer_meta(meta, Path(dataset_dir) / "meta.json" if dataset_dir is not None else "meta")
    name = meta["tokenizer"]
    if name == "char":
        tok: Tokenizer = CharTokenizer(meta["chars"])
    else:
        ranks = _ranks_for(meta, dataset_dir, bpe_file)
        merges = [tuple(m) for m in meta["merges"]] if name == "bpe" and "merges" in meta else None
        eot = meta.get("eot_token_id", GPT2_EOT if name == "gpt2" else None)
        tok = TiktokenTokenizer(name, ranks, eot_token_id=eot, merges=merges)
    if "vocab_size" in meta and meta["vocab_size"] != tok.vocab_size:
        raise ValueError(f"{name} meta says vocab_size={meta['vocab_size']} but its tokenizer has "
                         f"{tok.vocab_size} tokens")
    return tok


# ----------------------------------------------------------------------------------------------------
# Prompts and samples: the end-of-text token

def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of text; a literal <|endoftext|> becomes the end-of-text token where the tokenizer has one."""
    eot = tokenizer.eot_token_id
    if eot is None:
        return tokenizer.encode(text)
    ids: list[int] = []
    for i, piece in enumerate(text.split(ENDOFTEXT)):
        if i:
            ids.append(eot)
        ids.extend(tokenizer.encode(piece))
    return ids


def cut_at_eot(ids: list[int], prompt_len: int, eot: int | None) -> list[int]:
    """The prompt plus the generated tokens before the first end-of-text token (which is dropped)."""
    if eot is not None and eot in ids[prompt_len:]:
        return ids[:ids.index(eot, prompt_len)]
    return ids


class StreamPrinter:
    """on_token callback: print the text one sample gains with each token, as soon as it is whole.

    Decodes the ids so far and prints what is new; a byte-level tokenizer may stop in the middle of a
    UTF-8 character (decoded as U+FFFD), so the tail is held back until the character is complete.
    """

    def __init__(self, tokenizer, prompt_ids: list[int], out):
        self.tokenizer, self.ids, self.out = tokenizer, list(prompt_ids), out
        self.shown = len(tokenizer.decode(self.ids))
        self.done = False

    def __call__(self, tokens) -> None:
        tok = int(tokens[0])
        if self.done or tok == self.tokenizer.eot_token_id:
            self.done = True
            return
        self.ids.append(tok)
        text = self.tokenizer.decode(self.ids)
        whole = text.rstrip("\ufffd")
        if len(whole) > self.shown:
            self.out.write(whole[self.shown:])
            self.out.flush()
            self.shown = len(whole)

    def finish(self) -> None:
        text = self.tokenizer.decode(self.ids)
        self.out.write(text[self.shown:] + "\n")  # whatever was held back (an unfinished character)
