"""Datasets on disk (train.bin, val.bin, meta.json): preparing them from a corpus, and random batches drawn
from np.memmap views. torch is imported by Batches only: the recipe loader (model/training/recipe.py) reads
meta.json for flops.py without it.

A dataset folder holds the token ids of the first 90% of the corpus (train.bin) and of the rest (val.bin),
as uint16 (uint32 when the vocabulary exceeds 65,535), and meta.json: the tokenizer's description (see
model/training/tokenizer.py), the dtype and the split sizes. JSON, never pickle, so checkpoints can embed it.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..config import check, read_json
from .tokenizer import (RANKS_FILE, TOKENIZERS, CharTokenizer, TiktokenTokenizer, Tokenizer, bpe_tokenizer,
                        check_tokenizer_meta, gpt2_tokenizer, sha256_file)

if TYPE_CHECKING:
    import torch

DEFAULT_DATASET = "data/pydoc_char"
SOURCES = ("pydoc", "file", "shakespeare")
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
DEFAULT_BPE_VOCAB = 4096
DTYPES = ("uint16", "uint32")


def load_meta(dataset_dir: str | Path) -> dict:
    """The dataset's meta.json (tokenizer description, vocab_size, dtype, split sizes), every key checked."""
    path = Path(dataset_dir) / "meta.json"
    meta = read_json(path, f"dataset meta.json not found: {path} (run `python data/prepare.py`)")
    check_meta(meta, path)
    return meta


SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def check_meta(meta: dict, path: str | Path) -> None:
    """A ValueError naming the file and the key for a key missing, of the wrong type or out of range; the
    tokenizer's own keys are checked by check_tokenizer_meta. Keys meta.json does not define are ignored."""
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    for key in ("vocab_size", "dtype", "tokenizer"):
        if key not in meta:
            raise ValueError(f"{path}: missing key {key!r}")
    check(f"{path}: dtype", meta["dtype"], choices=DTYPES)
    check(f"{path}: vocab_size", meta["vocab_size"], int, 1, np.iinfo(meta["dtype"]).max + 1)
    check_tokenizer_meta(meta, path)
    for key in ("train_tokens", "val_tokens", "text_chars"):
        if key in meta:
            check(f"{path}: {key}", meta[key], int, 1)
    for key, ok, what in (("source", lambda v: v in SOURCES, f"one of {SOURCES}"),
                          ("input", lambda v: isinstance(v, str), "a path (string)"),
                          ("text_sha256", lambda v: isinstance(v, str) and SHA256_HEX.fullmatch(v), "64 hex digits")):
        if key in meta and not ok(meta[key]):
            raise ValueError(f"{path}: {key} must be {what}, got {meta[key]!r}")


def open_split(dataset_dir: str | Path, split: str) -> np.memmap:
    """A read-only memmap of train.bin or val.bin, checked against meta.json: its dtype, its token count
    (train_tokens / val_tokens) and every id below vocab_size, so a bad dataset is refused here, not as an
    IndexError mid-run."""
    meta = load_meta(dataset_dir)
    meta_path = Path(dataset_dir) / "meta.json"
    path = Path(dataset_dir) / f"{split}.bin"
    if not path.is_file():
        raise FileNotFoundError(f"dataset split not found: {path}")
    if meta["dtype"] not in DTYPES:
        raise ValueError(f"{meta_path}: dtype {meta['dtype']!r} is not one of {DTYPES}")
    dtype = np.dtype(meta["dtype"])
    size = path.stat().st_size
    if size < dtype.itemsize:
        raise ValueError(f"{path}: empty token file")
    if size % dtype.itemsize:
        raise ValueError(f"{path}: {size:,} bytes is not a whole number of {meta['dtype']} tokens (torn file?)")
    data = np.memmap(path, dtype=dtype, mode="r")
    expected = meta.get(f"{split}_tokens")
    if expected is not None and expected != len(data):
        raise ValueError(f"{path}: {len(data):,} tokens, but {meta_path} says {split}_tokens={expected:,} "
                         f"(the dataset changed or is being rewritten; prepare it again)")
    top = int(data.max())
    if top >= meta["vocab_size"]:
        raise ValueError(f"{path}: token id {top} at index {int(np.argmax(data >= meta['vocab_size']))} is not "
                         f"below vocab_size={meta['vocab_size']} of {meta_path}")
    return data


class Batches:
    """Random (x, y) windows of block_size tokens from one split; y is x shifted by one.

    Draws offsets from its own numpy Generator, so its position in the stream is part of a checkpoint
    (state_dict / load_state_dict) and a resumed run sees the same batches as an uninterrupted one.
    """

    def __init__(self, dataset_dir: str | Path, split: str, block_size: int, batch_size: int,
                 seed: int = 0, device: str | torch.device = "cpu"):
        import torch
        for name, value in (("block_size", block_size), ("batch_size", batch_size)):
            check(name, value, int, 1)
        self.data = open_split(dataset_dir, split)
        if len(self.data) < block_size + 1:
            raise ValueError(f"{Path(dataset_dir) / (split + '.bin')}: {len(self.data)} tokens, fewer than "
                             f"block_size+1={block_size + 1}; use a smaller block_size or more text")
        self.block_size, self.batch_size = block_size, batch_size
        self.device = torch.device(device)
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self._offsets = np.arange(block_size + 1)  # (T+1,) reused every batch

    def _starts(self) -> np.ndarray:
        return self.rng.integers(0, len(self.data) - self.block_size, size=self.batch_size)  # (B,)

    def skip(self) -> None:
        """Advance exactly as next() would, without gathering (another rank trains on that batch)."""
        self._starts()

    def restart(self) -> None:
        """Back to the first batch of the seed (evaluation sees the same batches every time)."""
        self.rng = np.random.default_rng(self.seed)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        import torch  # a dictionary lookup after the first call
        starts = self._starts()
        # one fancy-index gather of (B, T+1) tokens, then x and y are views of it
        window = torch.from_numpy(self.data[starts[:, None] + self._offsets].astype(np.int64))  # (B, T+1)
        if self.device.type == "cuda":
            window = window.pin_memory().to(self.device, non_blocking=True)
        return window[:, :-1], window[:, 1:]  # (B, T), (B, T)

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]


# ----------------------------------------------------------------------------------------------------
# Preparing a dataset: corpus -> tokenizer -> train.bin, val.bin, meta.json.

def token_dtype(vocab_size: int) -> str:
    """uint16 for vocabularies of up to 65,535 tokens, uint32 above (the project's rule; a vocabulary of
    exactly 65,536 would still fit uint16, its ids ending at 65,535)."""
    check("vocab_size", vocab_size, int, 1)
    if vocab_size > 2**32:
        raise ValueError(f"vocab_size {vocab_size} does not fit in uint32")
    return "uint16" if vocab_size <= 65535 else "uint32"


def decode_corpus(data: bytes, name: str) -> str:
    """UTF-8 text, or a ValueError naming `name` when the bytes are empty or binary."""
    if not data:
        raise ValueError(f"{name}: empty corpus (0 bytes)")
    nul = data.find(b"\0")
    if nul >= 0:
        raise ValueError(f"{name}: binary file (NUL byte at offset {nul}), expected UTF-8 text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{name}: binary file, not valid UTF-8 (byte {data[e.start]:#04x} at offset "
                         f"{e.start})") from None


def read_text_file(path: str | Path) -> str:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"input file not found: {path}")
    if not path.is_file():
        raise ValueError(f"input path {path} is not a file")
    return decode_corpus(path.read_bytes(), str(path))


def pydoc_text() -> str:
    """Python's reference documentation shipped with the interpreter: topics joined in sorted-key order."""
    from pydoc_data.topics import topics
    return "\n".join(topics[key] for key in sorted(topics))


def fetch(url: str, hint: str = "", timeout: float = 30.0) -> bytes:
    """The bytes at `url`; a failure is a ConnectionError naming the url, followed by `hint`."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.read()
    except OSError as e:  # URLError, HTTPError, timeouts: all OSErrors
        reason = getattr(e, "reason", e)
        raise ConnectionError(f"could not download {url} ({reason}){hint}") from None


def shakespeare_text(cache: Path | None = None, local: str | Path | None = None) -> str:
    """Tiny Shakespeare (1.1 MB), checked against its sha256: from `local` (a copy on disk) when given, else
    from `cache` when that holds a good copy, else downloaded from SHAKESPEARE_URL and kept in `cache`."""
    if local is not None:
        local = Path(local)
        if not local.is_file():
            raise FileNotFoundError(f"input file not found: {local}")
        data, name = local.read_bytes(), str(local)
    elif cache is not None and cache.is_file() and sha256_file(cache) == SHAKESPEARE_SHA256:
        data, name = cache.read_bytes(), str(cache)
    else:
        hint = "; offline? pass a local copy with --source shakespeare --input PATH"
        data, name = fetch(SHAKESPEARE_URL, hint), SHAKESPEARE_URL
        if cache is not None and hashlib.sha256(data).hexdigest() == SHAKESPEARE_SHA256:
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    if digest != SHAKESPEARE_SHA256:
        raise ValueError(f"{name} has sha256 {digest}, expected tiny Shakespeare's {SHAKESPEARE_SHA256}")
    return decode_corpus(data, name)


def build_tokenizer(name: str, text: str, *, bpe_file=None, vocab_size: int | None = None) -> Tokenizer:
    """char: the corpus's characters. bpe: trained on the first 90% of the text only, so the validation
    text plays no part in the merges (byte-level, it still encodes anything). gpt2: fixed ranks."""
    if name not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer {name!r}; expected one of {', '.join(TOKENIZERS)}")
    if vocab_size is not None and name != "bpe":
        raise ValueError(f"--vocab-size {vocab_size} applies only to --tokenizer bpe, not {name}")
    if bpe_file is not None and name != "gpt2":
        raise ValueError(f"--bpe-file {bpe_file} applies only to --tokenizer gpt2, not {name}")
    if name == "char":
        return CharTokenizer.from_text(text)
    if name == "gpt2":
        return gpt2_tokenizer(bpe_file)
    return bpe_tokenizer(text[:split_point(len(text))], DEFAULT_BPE_VOCAB if vocab_size is None else vocab_size)


def split_point(n_tokens: int) -> int:
    """First 90% of the tokens train, the rest validate; both splits need at least one token."""
    n_train = n_tokens * 9 // 10
    if n_train < 1 or n_tokens - n_train < 1:
        raise ValueError(f"corpus too short: {n_tokens} token(s) cannot be split 90/10 with at least 1 token in "
                         f"train and 1 in val")
    return n_train


def write_meta(meta: dict, path: Path) -> None:
    """One top-level key per line (long lists stay on one line), written atomically."""
    body = ",\n".join(f" {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}" for k, v in meta.items())
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("{\n" + body + "\n}\n", encoding="utf-8")
    os.replace(tmp, path)


def prepare(source: str = "pydoc", tokenizer: str = "char", out_dir: str | Path | None = None, *,
            input_path: str | Path | None = None, bpe_file: str | Path | None = None,
            vocab_size: int | None = None, quiet: bool = False) -> Path:
    """Build train.bin, val.bin and meta.json (plus tokenizer.tiktoken for gpt2/bpe) into out_dir.

    source: "pydoc" (embedded), "file" (input_path; giving input_path with the default source means "file")
    or "shakespeare" (input_path when given, a local copy; else downloaded once and kept in out_dir/input.txt;
    either way checked against its sha256). out_dir defaults to data/<source>_<tokenizer>, with the input
    file's stem as <source> for "file". Returns out_dir.

    The files are written into a new folder beside out_dir, which then replaces out_dir (see
    publish_dataset): a reader of the old dataset keeps its files, never sees them rewritten.
    """
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; expected one of {', '.join(SOURCES)}")
    if input_path is not None and source == "pydoc":
        source = "file"
    if source == "file" and input_path is None:
        raise ValueError("source 'file' needs an input path (--input PATH)")
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer {tokenizer!r}; expected one of {', '.join(TOKENIZERS)}")
    out = dataset_folder(out_dir, Path(input_path).stem if source == "file" else source, tokenizer)

    if source == "file":
        text = read_text_file(input_path)
    elif source == "shakespeare":
        text = shakespeare_text(out / "input.txt", input_path)
    else:
        text = pydoc_text()
    tok = build_tokenizer(tokenizer, text, bpe_file=bpe_file, vocab_size=vocab_size)
    dtype = token_dtype(tok.vocab_size)
    ids = np.array(tok.encode(text), dtype=dtype)  # (N,)
    n_train = split_point(len(ids))

    meta = {"tokenizer": tok.name, "vocab_size": tok.vocab_size, "dtype": dtype, "source": source,
            **({"input": str(input_path)} if input_path is not None else {}),
            "text_chars": len(text), "text_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
            "train_tokens": int(n_train), "val_tokens": int(len(ids) - n_train),
            **tok.meta()}  # the tokenizer's bulky entries (chars, merges) go last in the file
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        ids[:n_train].tofile(tmp / "train.bin")
        ids[n_train:].tofile(tmp / "val.bin")
        if isinstance(tok, TiktokenTokenizer):
            tok.save_ranks(tmp / RANKS_FILE)  # its sha256 is in tok.meta()
        if source == "shakespeare" and (out / "input.txt").is_file():
            shutil.copyfile(out / "input.txt", tmp / "input.txt")  # the download cache moves with the folder
        write_meta(meta, tmp / "meta.json")
        note = replacement_note(out, meta)
        publish_dataset(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not quiet:
        print(f"{source}: {len(text):,} chars -> {tokenizer} tokenizer, vocab {tok.vocab_size:,} -> {out}/\n"
              f"  train.bin {n_train:,} tokens, val.bin {len(ids) - n_train:,} tokens ({dtype}), meta.json")
        if note:
            print(note)
    return out


DESCRIBING_KEYS = ("source", "input", "text_sha256", "tokenizer", "vocab_size", "ranks_sha256")


def replacement_note(out: Path, meta: dict) -> str:
    """A line saying what changes when the dataset at `out` was built differently from `meta` ("" when it
    was not, or there is none): its runs cannot --resume on the new folder, their checkpoints still sample."""
    try:
        old = load_meta(out)
    except (OSError, ValueError):
        return ""
    changed = [k for k in DESCRIBING_KEYS if old.get(k) != meta.get(k)]
    if not changed:
        return ""
    def what(m: dict) -> str:
        return f"{m.get('source')} text, {m.get('tokenizer')} tokenizer, vocab {m.get('vocab_size')}"
    return (f"replaced {out}, which was built differently ({what(old)}; now {what(meta)}; changed: "
            f"{', '.join(changed)}): runs trained on it cannot --resume here; their checkpoints still sample, "
            f"they carry their tokenizer")


def dataset_folder(out_dir: str | Path | None, stem: str, tokenizer: str) -> Path:
    """out_dir, by default data/<stem>_<tokenizer>; an empty name or a path that is not a folder is refused."""
    if out_dir is not None and str(out_dir) == "":
        raise ValueError("out_dir is empty; name a folder")
    out = Path(out_dir) if out_dir is not None else Path("data") / f"{stem}_{tokenizer}"
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir {out} exists and is not a folder")
    return out


DATASET_FILES = ("train.bin", "val.bin", RANKS_FILE, "input.txt", "meta.json")  # meta.json last: see below


def publish_dataset(new: Path, out: Path) -> None:
    """Make the complete dataset folder `new` the dataset at `out`, never writing into a file of the old one.

    No `out` yet: one rename. An `out` holding only dataset files: the two folders swap in one atomic
    rename (renameat2 RENAME_EXCHANGE) and `new` is left holding the old files; where the kernel cannot
    swap, two renames. An `out` that also holds other files (a corpus kept beside its dataset): each
    dataset file is replaced by its own rename, meta.json last, so a reader opening in between sees token
    counts that disagree with meta.json and is refused by open_split. Either way a reader that has the old
    files open or mapped keeps reading them, unchanged, until it closes them."""
    for name in DATASET_FILES:
        if (new / name).is_file():
            with open(new / name, "rb") as f:
                os.fsync(f.fileno())  # the data is on disk before any rename points at it
    if not out.exists():
        os.rename(new, out)
        return
    ours = set(DATASET_FILES) - {"input.txt"} | {p.name for p in new.iterdir()}
    if all(p.name in ours and p.is_file() for p in out.iterdir()):
        if not _exchange(new, out):
            old = new.with_name(new.name + ".old")
            os.rename(out, old)
            os.rename(new, out)
            os.rename(old, new)
        return
    for name in DATASET_FILES:
        if (new / name).is_file():
            os.replace(new / name, out / name)
        elif name != "input.txt":
            (out / name).unlink(missing_ok=True)  # stale ranks from an earlier byte-level prep


def _exchange(a: Path, b: Path) -> bool:
    """Swap two folders atomically (Linux renameat2 RENAME_EXCHANGE); False where that is unavailable."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    at_fdcwd, rename_exchange = -100, 2
    if renameat2 is None or renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange):
        return False
    return True


def _repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


def prepare_command(dataset_dir: str | Path) -> str:
    """The prepare.py command that makes `dataset_dir`, guessed from its <source>_<tokenizer> name."""
    path = Path(dataset_dir)
    source, _, tokenizer = path.name.rpartition("_")
    if source in ("pydoc", "shakespeare") and tokenizer in TOKENIZERS:
        args = f"--source {source} --tokenizer {tokenizer}"
        if path != Path("data") / path.name:
            args += f" --out-dir {path}"
    else:
        args = f"--input FILE --tokenizer {tokenizer if tokenizer in TOKENIZERS else 'char'} --out-dir {path}"
    return f"python data/prepare.py {args}"


def ensure_dataset(dataset_dir: str | Path) -> Path:
    """The dataset folder to read: `dataset_dir` (relative to the cwd, else to the repo root) when it holds
    meta.json; the default (data/pydoc_char) is prepared when missing; any other missing folder is a
    FileNotFoundError naming it and the prepare command to run."""
    path = Path(dataset_dir)
    candidates = [path] if path.is_absolute() else [path, _repo_root() / path]
    for candidate in candidates:
        if (candidate / "meta.json").is_file():
            return candidate
    default = (_repo_root() / DEFAULT_DATASET).resolve()
    if path == Path(DEFAULT_DATASET) or path.resolve() == default:
        print(f"dataset {path} not found; preparing it (once)", file=sys.stderr)
        with contextlib.redirect_stdout(sys.stderr):  # stdout stays the caller's (--json output)
            return prepare("pydoc", "char", path)
    raise FileNotFoundError(f"dataset not found: {path} (no meta.json); prepare it with "
                            f"`{prepare_command(path)}`")
