"""Dataset preparation (sources x tokenizers -> bins + meta.json), the CLI, and memmap batches."""
import hashlib
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import model.training.data as data
from conftest import R50K, needs_r50k
from model.training.data import (DEFAULT_DATASET, SHAKESPEARE_SHA256, Batches, ensure_dataset, load_meta, open_split,
                        prepare, pydoc_text, split_point, token_dtype)
from model.training.tokenizer import (R50K_SHA256, RANKS_FILE, load_tokenizer, ranks_from_merges, sha256_file,
                             train_bpe)

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
SHAKESPEARE = SHARED / "tinyshakespeare.txt"
TEXT = "First line: naïve café — ☃\nSecond line, with 'quotes' and digits 0123456789.\n" * 40


@pytest.fixture(autouse=True)
def private_tiktoken_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tiktoken-cache"))


@pytest.fixture
def corpus(tmp_path) -> Path:
    path = tmp_path / "notes.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def read_split(dataset: Path, split: str) -> np.ndarray:
    return np.array(open_split(dataset, split))


def decoded_corpus(dataset: Path) -> str:
    meta = load_meta(dataset)
    tok = load_tokenizer(meta, dataset)
    return tok.decode(read_split(dataset, "train")) + tok.decode(read_split(dataset, "val"))


# ----------------------------------------------------------------------------------------------------
# prepare

def test_token_dtype_rule():
    assert token_dtype(65) == "uint16"
    assert token_dtype(50257) == "uint16"
    assert token_dtype(65535) == "uint16"
    assert token_dtype(65536) == "uint32"
    assert token_dtype(100_277) == "uint32"
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="vocab_size"):
            token_dtype(bad)


def test_split_point_is_90_10_and_needs_a_token_each():
    assert split_point(10) == 9 and split_point(2) == 1 and split_point(1001) == 900
    with pytest.raises(ValueError, match="1 token.*val"):
        split_point(1)


@pytest.mark.parametrize("tokenizer, vocab_size", [("char", None), ("bpe", 300)])
def test_prepare_file_end_to_end(tmp_path, corpus, tokenizer, vocab_size):
    out = prepare("file", tokenizer, tmp_path / "ds", input_path=corpus, vocab_size=vocab_size, quiet=True)
    meta = load_meta(out)
    n_train, n_val = meta["train_tokens"], meta["val_tokens"]
    assert (len(read_split(out, "train")), len(read_split(out, "val"))) == (n_train, n_val)
    assert n_train == (n_train + n_val) * 9 // 10 and n_val >= 1
    assert decoded_corpus(out) == TEXT
    assert meta["tokenizer"] == tokenizer and meta["dtype"] == "uint16" and meta["source"] == "file"
    assert meta["input"] == str(corpus) and meta["text_sha256"] == hashlib.sha256(TEXT.encode()).hexdigest()
    if tokenizer == "char":
        assert meta["vocab_size"] == len(set(TEXT)) and not (out / RANKS_FILE).exists()
        assert n_train + n_val == len(TEXT)
    else:
        assert meta["vocab_size"] == 300 and meta["ranks_sha256"] == sha256_file(out / RANKS_FILE)
        assert n_train + n_val < len(TEXT.encode()) / 2  # the text repeats: merges compress it well
        assert meta["merges"] == [list(m) for m in train_bpe(TEXT[:len(TEXT) * 9 // 10], 300)]


def test_bpe_merges_never_see_the_validation_text(tmp_path):
    path = tmp_path / "tail.txt"
    path.write_text(TEXT + "zq" * 100, encoding="utf-8")  # "zq" only in the last 10% (the val split)
    assert b"zq" in ranks_from_merges(train_bpe(path.read_text(encoding="utf-8"), 300))  # it would be learned
    out = prepare(input_path=path, tokenizer="bpe", vocab_size=300, out_dir=tmp_path / "ds", quiet=True)
    tok = load_tokenizer(load_meta(out), out)
    assert b"zq" not in tok.ranks and decoded_corpus(out) == TEXT + "zq" * 100


def test_prepare_default_out_dir_and_input_implies_file(tmp_path, corpus, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = prepare(input_path=corpus)
    assert out == Path("data/notes_char") and (tmp_path / "data/notes_char/meta.json").is_file()
    printed = capsys.readouterr().out
    assert "data/notes_char" in printed and f"train.bin {load_meta(out)['train_tokens']:,} tokens" in printed


def test_prepare_uint32_when_vocab_exceeds_65535(tmp_path):
    chars = [chr(c) for c in range(0x4E00, 0x4E00 + 70_000) if not 0xD800 <= c < 0xE000]
    path = tmp_path / "wide.txt"
    path.write_text("".join(chars), encoding="utf-8")
    out = prepare("file", "char", tmp_path / "wide", input_path=path, quiet=True)
    meta = load_meta(out)
    assert meta["vocab_size"] == len(chars) > 65535 and meta["dtype"] == "uint32"
    assert (out / "train.bin").stat().st_size == 4 * meta["train_tokens"]
    assert int(read_split(out, "val").max()) == len(chars) - 1  # the last (largest) id survives the round trip
    assert decoded_corpus(out) == "".join(chars)


def test_pydoc_default_source_is_fast_and_deterministic(tmp_path):
    text = pydoc_text()
    assert len(text) > 460_000 and text == pydoc_text()
    start = time.perf_counter()
    out = prepare(out_dir=tmp_path / "pydoc", quiet=True)
    elapsed = time.perf_counter() - start
    assert elapsed < 2.0, f"char prep of the pydoc corpus took {elapsed:.2f} s"
    meta = load_meta(out)
    assert meta["source"] == "pydoc" and meta["vocab_size"] == len(set(text))
    assert meta["train_tokens"] == len(text) * 9 // 10 and meta["train_tokens"] + meta["val_tokens"] == len(text)
    assert decoded_corpus(out) == text


@needs_r50k
def test_prepare_gpt2_is_self_contained(tmp_path, corpus):
    out = prepare("file", "gpt2", tmp_path / "g", input_path=corpus, bpe_file=R50K, quiet=True)
    meta = load_meta(out)
    assert meta["vocab_size"] == 50257 and meta["eot_token_id"] == 50256 and meta["dtype"] == "uint16"
    assert sha256_file(out / RANKS_FILE) == meta["ranks_sha256"] == R50K_SHA256  # a byte-identical copy
    assert decoded_corpus(out) == TEXT  # from the folder's own ranks file: empty cache, no bpe_file


def test_gpt2_prepare_offline_without_ranks_is_a_clear_error(tmp_path, corpus):
    with pytest.raises(FileNotFoundError, match="GPT-2 BPE ranks not found offline"):
        prepare("file", "gpt2", tmp_path / "g", input_path=corpus, quiet=True)


@pytest.mark.parametrize("content, match", [
    (b"", "empty corpus"),
    (b"text\x00more", r"binary file \(NUL byte at offset 4\)"),
    (b"caf\xe9\n", r"not valid UTF-8 \(byte 0xe9 at offset 3\)"),
    (b"x", r"too short: 1 token"),
])
def test_bad_corpus_is_an_error_naming_the_file(tmp_path, content, match):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=match) as err:
        prepare("file", "char", tmp_path / "out", input_path=path, quiet=True)
    if content != b"x":
        assert str(path) in str(err.value)
    assert not (tmp_path / "out" / "meta.json").exists()


def test_bad_arguments_are_errors(tmp_path, corpus):
    with pytest.raises(FileNotFoundError, match="input file not found: .*missing.txt"):
        prepare(input_path=tmp_path / "missing.txt", quiet=True)
    with pytest.raises(ValueError, match="is not a file"):
        prepare(input_path=tmp_path, quiet=True)
    with pytest.raises(ValueError, match="unknown tokenizer 'wordpiece'"):
        prepare("pydoc", "wordpiece", tmp_path / "o", quiet=True)
    with pytest.raises(ValueError, match="unknown source 'wikipedia'"):
        prepare("wikipedia", "char", tmp_path / "o", quiet=True)
    with pytest.raises(ValueError, match="needs an input path"):
        prepare("file", "char", tmp_path / "o", quiet=True)
    with pytest.raises(ValueError, match="--vocab-size 512 applies only to --tokenizer bpe"):
        prepare(input_path=corpus, vocab_size=512, quiet=True)
    with pytest.raises(ValueError, match="applies only to --tokenizer gpt2"):
        prepare(input_path=corpus, tokenizer="bpe", bpe_file=corpus, quiet=True)
    with pytest.raises(ValueError, match=">= 257"):
        prepare(input_path=corpus, tokenizer="bpe", vocab_size=256, quiet=True)


# ----------------------------------------------------------------------------------------------------
# tiny Shakespeare: the download path without the network (file:// URLs)

@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason=f"{SHAKESPEARE} not present")
def test_shakespeare_download_checks_sha256_and_is_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "SHAKESPEARE_URL", SHAKESPEARE.as_uri())
    out = prepare("shakespeare", "char", tmp_path / "sh", quiet=True)
    meta = load_meta(out)
    assert meta["source"] == "shakespeare" and meta["vocab_size"] == 65
    assert meta["train_tokens"] + meta["val_tokens"] == 1_115_394
    assert sha256_file(out / "input.txt") == SHAKESPEARE_SHA256
    # the kept copy serves a second run with the network gone
    monkeypatch.setattr(data, "SHAKESPEARE_URL", (tmp_path / "gone.txt").as_uri())
    assert load_meta(prepare("shakespeare", "char", out, quiet=True)) == meta


def test_shakespeare_wrong_checksum_and_offline_are_errors(tmp_path, monkeypatch):
    fake = tmp_path / "fake.txt"
    fake.write_text("To be, or not to be\n" * 10)
    monkeypatch.setattr(data, "SHAKESPEARE_URL", fake.as_uri())
    with pytest.raises(ValueError, match=f"sha256 {sha256_file(fake)}, expected .*{SHAKESPEARE_SHA256}"):
        prepare("shakespeare", "char", tmp_path / "sh", quiet=True)
    with pytest.raises(ValueError, match=f"{fake} has sha256"):  # a local copy is checked too
        prepare("shakespeare", "char", tmp_path / "sh", input_path=fake, quiet=True)
    monkeypatch.setattr(data, "SHAKESPEARE_URL", (tmp_path / "unreachable.txt").as_uri())
    with pytest.raises(ConnectionError, match="could not download .*unreachable.txt.*offline.*--source "
                                              "shakespeare --input PATH"):
        prepare("shakespeare", "char", tmp_path / "sh", quiet=True)
    assert not (tmp_path / "sh").exists()


@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason=f"{SHAKESPEARE} not present")
def test_shakespeare_from_a_local_copy_needs_no_network(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "SHAKESPEARE_URL", (tmp_path / "unreachable.txt").as_uri())
    monkeypatch.chdir(tmp_path)
    out = prepare("shakespeare", "char", input_path=SHAKESPEARE, quiet=True)
    assert out == Path("data/shakespeare_char") and load_meta(out)["input"] == str(SHAKESPEARE)
    assert decoded_corpus(out) == SHAKESPEARE.read_text(encoding="utf-8")


# ----------------------------------------------------------------------------------------------------
# ensure_dataset

def test_ensure_dataset_prepares_only_the_default(tmp_path, corpus, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(data, "_repo_root", lambda: tmp_path / "repo")  # ignore a real data/ in the checkout
    got = ensure_dataset(DEFAULT_DATASET)
    assert got == Path(DEFAULT_DATASET) and load_meta(tmp_path / DEFAULT_DATASET)["source"] == "pydoc"
    mine = prepare(input_path=corpus, out_dir=tmp_path / "mine", quiet=True)
    assert ensure_dataset(mine) == mine
    with pytest.raises(FileNotFoundError, match=r"data/shakespeare_char .*`python data/prepare.py "
                                                r"--source shakespeare --tokenizer char`"):
        ensure_dataset("data/shakespeare_char")
    with pytest.raises(FileNotFoundError, match=r"elsewhere/x .*--input FILE --tokenizer char --out-dir"):
        ensure_dataset("elsewhere/x")


def test_ensure_dataset_falls_back_to_the_repo_root(tmp_path, corpus, monkeypatch):
    repo = tmp_path / "repo"
    prepare(input_path=corpus, out_dir=repo / "data" / "notes_char", quiet=True)
    monkeypatch.setattr(data, "_repo_root", lambda: repo)
    monkeypatch.chdir(tmp_path)
    assert ensure_dataset("data/notes_char") == repo / "data" / "notes_char"


# ----------------------------------------------------------------------------------------------------
# CLI

def load_cli():
    spec = importlib.util.spec_from_file_location("prepare_cli", ROOT / "data" / "prepare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_errors_are_one_line_and_exit_2(tmp_path, corpus, capsys):
    cli = load_cli()
    for source in ("file", "shakespeare"):
        assert cli.main(["--source", source, "--input", str(tmp_path / "missing.txt")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "input file not found" in err and "missing.txt" in err
    for argv in (["--tokenizer", "wordpiece"], ["--vocab-size", "lots"], ["--source", "pydoc", "--input", "x"]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("prepare.py: error:"), err
    assert cli.main(["--input", str(corpus), "--tokenizer", "bpe", "--vocab-size", "100"]) == 2
    assert ">= 257" in capsys.readouterr().err


@pytest.mark.slow  # a fresh interpreter importing torch: ~3 s on 2 cores
def test_cli_runs_as_a_script_from_the_repo_root(tmp_path, corpus):
    out = tmp_path / "cli"
    proc = subprocess.run([sys.executable, "data/prepare.py", "--input", str(corpus), "--tokenizer", "bpe",
                           "--vocab-size", "280", "--out-dir", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"{out}/" in proc.stdout and "vocab 280" in proc.stdout
    assert decoded_corpus(out) == TEXT


# ----------------------------------------------------------------------------------------------------
# Batches

@pytest.fixture
def dataset(tmp_path, corpus) -> Path:
    return prepare(input_path=corpus, out_dir=tmp_path / "ds", quiet=True)


def test_batches_are_shifted_windows_of_the_split(dataset):
    tokens = read_split(dataset, "train")
    b = Batches(dataset, "train", block_size=16, batch_size=5, seed=3)
    x, y = b.next()
    assert x.shape == y.shape == (5, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    for row_x, row_y in zip(x.numpy(), y.numpy()):
        starts = [s for s in range(len(tokens) - 16) if np.array_equal(tokens[s:s + 16], row_x)]
        assert any(np.array_equal(tokens[s + 1:s + 17], row_y) for s in starts)


def test_batches_resume_skip_and_restart(dataset):
    a = Batches(dataset, "train", 8, 4, seed=1)
    first = a.next()
    state = a.state_dict()
    second = a.next()
    b = Batches(dataset, "train", 8, 4, seed=1)
    b.load_state_dict(state)
    assert torch.equal(b.next()[0], second[0])
    c = Batches(dataset, "train", 8, 4, seed=1)
    c.skip()
    assert torch.equal(c.next()[0], second[0])
    c.restart()
    assert torch.equal(c.next()[0], first[0])


def test_batches_too_short_corpus_is_an_error(dataset):
    n_val = load_meta(dataset)["val_tokens"]
    Batches(dataset, "val", block_size=n_val - 1, batch_size=2)  # exactly block_size + 1 tokens is enough
    with pytest.raises(ValueError, match=rf"val.bin: {n_val} tokens, fewer than block_size\+1={n_val + 1}"):
        Batches(dataset, "val", block_size=n_val, batch_size=2)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        Batches(dataset, "val", block_size=4, batch_size=0)


def test_open_split_and_meta_errors(tmp_path, dataset):
    with pytest.raises(FileNotFoundError, match="meta.json not found"):
        load_meta(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="test.bin"):
        open_split(dataset, "test")
    meta = json.loads((dataset / "meta.json").read_text())
    (dataset / "meta.json").write_text(json.dumps({**meta, "dtype": "float32"}))
    with pytest.raises(ValueError, match=r"meta.json: dtype must be one of \('uint16', 'uint32'\), got 'float32'"):
        open_split(dataset, "train")


def rewrite_meta(dataset: Path, **changes) -> None:
    meta = json.loads((dataset / "meta.json").read_text())
    (dataset / "meta.json").write_text(json.dumps({**meta, **changes}))


def test_token_ids_at_or_above_vocab_size_are_refused_on_open(dataset):
    vocab = load_meta(dataset)["vocab_size"]
    tokens = read_split(dataset, "train")
    bad = tokens.copy()
    bad[7] = vocab  # the first id out of range
    bad.tofile(dataset / "train.bin")
    with pytest.raises(ValueError, match=rf"train.bin: token id {vocab} at index 7 is not below vocab_size={vocab}"):
        Batches(dataset, "train", 8, 2)
    tokens.tofile(dataset / "train.bin")
    chars = load_meta(dataset)["chars"]  # a meta.json vocabulary smaller than the data:
    rewrite_meta(dataset, vocab_size=int(tokens.max()), chars=chars[:int(tokens.max())])
    with pytest.raises(ValueError, match=rf"token id {tokens.max()} at index {np.argmax(tokens == tokens.max())} "
                                         rf"is not below vocab_size={tokens.max()}"):
        open_split(dataset, "train")


def test_split_sizes_must_match_meta_json(dataset):
    tokens = read_split(dataset, "val")
    tokens[:-1].tofile(dataset / "val.bin")
    with pytest.raises(ValueError, match=rf"val.bin: {len(tokens) - 1:,} tokens, but .*val_tokens={len(tokens):,}"):
        open_split(dataset, "val")
    (dataset / "val.bin").write_bytes(tokens.tobytes() + b"\0")  # half a uint16 token
    with pytest.raises(ValueError, match=rf"{2 * len(tokens) + 1:,} bytes is not a whole number of uint16"):
        open_split(dataset, "val")


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_prepare_swaps_in_a_new_folder_and_an_open_reader_keeps_its_view(tmp_path, corpus, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(data, "_exchange", lambda a, b: False)
    out = prepare(input_path=corpus, out_dir=tmp_path / "ds", quiet=True)
    reader = Batches(out, "train", 8, 4, seed=0)
    before = np.array(reader.data)
    other = tmp_path / "other.txt"
    other.write_text("a different corpus, other letters: xyzzy QWERTY!\n" * 30, encoding="utf-8")
    prepare(input_path=other, out_dir=out, quiet=True)
    assert np.array_equal(np.array(reader.data), before)  # the old files, unchanged, still mapped
    reader.next()
    assert load_meta(out)["input"] == str(other) and len(read_split(out, "train")) != len(before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "notes.txt", "other.txt"]  # no temp folder left


def test_prepare_keeps_other_files_in_the_dataset_folder(tmp_path, corpus):
    out = prepare(input_path=corpus, out_dir=tmp_path / "ds", quiet=True)
    (out / "notes.md").write_text("mine")
    reader = Batches(out, "train", 8, 4, seed=0)
    before = np.array(reader.data)
    prepare(input_path=corpus, tokenizer="bpe", vocab_size=260, out_dir=out, quiet=True)
    assert (out / "notes.md").read_text() == "mine" and (out / RANKS_FILE).is_file()
    assert np.array_equal(np.array(reader.data), before)
    prepare(input_path=corpus, out_dir=out, quiet=True)
    assert not (out / RANKS_FILE).exists()  # a char dataset has no ranks file


def test_prepare_failure_leaves_the_old_dataset(tmp_path, corpus, monkeypatch):
    out = prepare(input_path=corpus, out_dir=tmp_path / "ds", quiet=True)
    files = {p.name: p.read_bytes() for p in out.iterdir()}

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(data, "write_meta", full_disk)
    with pytest.raises(OSError, match="No space left"):
        prepare(input_path=corpus, tokenizer="bpe", vocab_size=260, out_dir=out, quiet=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "notes.txt"]


def test_prepare_out_dir_must_be_a_folder(tmp_path, corpus):
    with pytest.raises(ValueError, match="out_dir is empty"):
        prepare(input_path=corpus, out_dir="", quiet=True)
    with pytest.raises(ValueError, match="out_dir /dev/null exists and is not a folder"):
        prepare(input_path=corpus, out_dir="/dev/null", quiet=True)
