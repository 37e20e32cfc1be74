"""sample.py end to end: a checkpoint written by train.py, a Hugging Face folder, streaming, errors."""
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sample as sample_mod
from conftest import R50K as BPE_FILE
from conftest import needs_r50k as needs_bpe
from model import GPTConfig, TrainConfig
from model.gpt import cpu_decode
from model.training.checkpoint import load_model
from model.training.data import prepare
from model.training.tokenizer import StreamPrinter

ROOT = Path(__file__).resolve().parents[1]
TEXT = "the cat sat on the mat. the dog sat on the log. a cat and a dog met on a mat by a log.\n" * 30


def write_run(root: Path) -> Path:
    """A folder laid out like the repo after `python train.py`: data/tiny_char and out/default/{best,last}.pt,
    holding a small char model trained briefly here (the checkpoint fields are train.py's)."""
    from model.training.checkpoint import FORMAT, save_checkpoint
    from model.config import to_dict
    from model import GPT

    (root / "corpus.txt").write_text(TEXT)
    dataset = prepare("file", "char", root / "data" / "tiny_char", input_path=root / "corpus.txt", quiet=True)
    meta = json.loads((dataset / "meta.json").read_text())
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=meta["vocab_size"], block_size=32, n_layer=2, n_head=2, n_embd=32))
    data = torch.tensor([meta["chars"].index(c) for c in TEXT])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(60):
        starts = torch.randint(0, len(data) - 33, (16,))
        window = torch.stack([data[s:s + 33] for s in starts])  # (16, 33)
        _, loss = model(window[:, :-1], window[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    state = {"format": FORMAT, "step": 60, "best_val_loss": loss.item(), "model": model.state_dict(),
             "model_config": to_dict(model.config), "meta": meta, "dataset": str(dataset)}
    for name in ("best.pt", "last.pt"):
        save_checkpoint(state, root / "out" / "default" / name)
    return root


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return write_run(tmp_path_factory.mktemp("repo"))


@pytest.mark.slow
def test_after_train_py(monkeypatch, capsys, tmp_path):
    """The real sequence: train.train writes out/default, then `python sample.py` with no arguments."""
    import train as train_mod
    (tmp_path / "corpus.txt").write_text(TEXT)
    dataset = prepare("file", "char", tmp_path / "data" / "tiny_char", input_path=tmp_path / "corpus.txt",
                      quiet=True)
    vocab = json.loads((dataset / "meta.json").read_text())["vocab_size"]
    cfg = TrainConfig(dataset=str(dataset), out_dir=str(tmp_path / "out" / "default"), batch_size=4, max_iters=4,
                      eval_interval=2, eval_iters=1, warmup_iters=1, device="cpu", peak_flops=1e12, progress=False)
    train_mod.train(GPTConfig(vocab_size=vocab, block_size=16, n_layer=1, n_head=2, n_embd=16), cfg)
    code, out, err = cli(monkeypatch, capsys, tmp_path, "--max-new-tokens", "20")
    assert code == 0, err
    assert [len(s) for s in samples(out)] == [21, 21, 22]


def cli(monkeypatch, capsys, cwd, *args):
    monkeypatch.chdir(cwd)
    code = sample_mod.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def samples(out: str) -> list[str]:
    return out.split("\n" + sample_mod.SEPARATOR + "\n")


def test_no_arguments_samples_the_default_checkpoint(monkeypatch, capsys, run_dir):
    code, out, err = cli(monkeypatch, capsys, run_dir)
    lines = err.splitlines()  # stderr: the start-up line, then the decoding line
    assert code == 0 and len(lines) == 2, err
    assert lines[0].startswith("sample.py: ") and "parameters on cpu; " in lines[0] and " CPU thread" in lines[0]
    assert lines[1].startswith("decoding: ")
    got = samples(out)
    assert len(got) == 3  # default --num-samples 3, each "\n" + 500 characters, the last with a final newline
    assert [len(s) for s in got] == [501, 501, 502] and all(s.startswith("\n") for s in got)
    assert len(set(got)) == 3  # sampled, not greedy
    assert set("".join(got)) <= set(TEXT)


def test_falls_back_to_last_pt_and_errors_without_checkpoints(monkeypatch, capsys, run_dir, tmp_path):
    (tmp_path / "out" / "default").mkdir(parents=True)
    (tmp_path / "out" / "default" / "last.pt").write_bytes((run_dir / "out" / "default" / "last.pt").read_bytes())
    code, out, _ = cli(monkeypatch, capsys, tmp_path, "--num-samples", "1", "--max-new-tokens", "5")
    assert code == 0 and len(out) == 1 + 5 + 1
    (tmp_path / "out" / "default" / "last.pt").unlink()
    code, out, err = cli(monkeypatch, capsys, tmp_path)
    assert code == 2 and out == "" and "python train.py" in err and len(err.strip().splitlines()) == 1


def test_ckpt_may_name_a_train_py_out_dir(monkeypatch, capsys, run_dir, tmp_path):
    args = ("--num-samples", "1", "--max-new-tokens", "8", "--temperature", "0")
    code, by_file, _ = cli(monkeypatch, capsys, run_dir, "--ckpt", "out/default/best.pt", *args)
    assert code == 0
    code, by_dir, _ = cli(monkeypatch, capsys, run_dir, "--ckpt", "out/default", *args)
    assert code == 0 and by_dir == by_file
    only_last = tmp_path / "run"
    only_last.mkdir()
    (only_last / "last.pt").write_bytes((run_dir / "out" / "default" / "last.pt").read_bytes())
    code, out, _ = cli(monkeypatch, capsys, run_dir, "--ckpt", str(only_last), *args)
    assert code == 0 and out == by_file  # best.pt and last.pt hold the same weights in run_dir
    (only_last / "last.pt").unlink()
    code, out, err = cli(monkeypatch, capsys, run_dir, "--ckpt", str(only_last))
    assert code == 2 and out == "" and err.strip() == (f"sample.py: error: no checkpoint in directory {only_last}: "
                                                      f"best.pt and last.pt not found")


def test_same_seed_same_text_and_greedy_matches_the_api(monkeypatch, capsys, run_dir):
    args = ("--start", "the ", "--num-samples", "2", "--max-new-tokens", "40")
    a = cli(monkeypatch, capsys, run_dir, *args, "--seed", "5")[1]
    b = cli(monkeypatch, capsys, run_dir, *args, "--seed", "5")[1]
    c = cli(monkeypatch, capsys, run_dir, *args, "--seed", "6")[1]
    assert a == b and a != c
    code, out, _ = cli(monkeypatch, capsys, run_dir, *args, "--temperature", "0")
    model, info = load_model(run_dir / "out" / "default" / "best.pt")
    chars = info["meta"]["chars"]
    idx = torch.tensor([[chars.index(ch) for ch in "the "]])
    greedy = "".join(chars[i] for i in model.generate(idx, 40, temperature=0)[0].tolist())
    assert samples(out) == [greedy, greedy + "\n"]


def test_bfloat16_samples_like_the_api_in_bfloat16(monkeypatch, capsys, run_dir):
    args = ("--start", "the ", "--num-samples", "1", "--max-new-tokens", "30", "--temperature", "0")
    code, out, _ = cli(monkeypatch, capsys, run_dir, *args, "--dtype", "bfloat16")
    assert code == 0
    model, info = load_model(run_dir / "out" / "default" / "best.pt")
    chars = info["meta"]["chars"]
    idx = torch.tensor([[chars.index(ch) for ch in "the "]])
    greedy = "".join(chars[i] for i in model.generate(idx, 30, temperature=0, dtype="bfloat16")[0].tolist())
    assert out == greedy + "\n"


@pytest.mark.skipif(cpu_decode.unavailable(torch.bfloat16) is not None, reason="kernels='avx512' cannot run here")
def test_avx512_kernels_sample_like_the_api(monkeypatch, capsys, run_dir):
    args = ("--start", "the ", "--num-samples", "1", "--max-new-tokens", "30", "--temperature", "0",
            "--dtype", "bfloat16", "--kernels", "avx512")
    code, out, _ = cli(monkeypatch, capsys, run_dir, *args)
    assert code == 0
    model, info = load_model(run_dir / "out" / "default" / "best.pt")
    chars = info["meta"]["chars"]
    idx = torch.tensor([[chars.index(ch) for ch in "the "]])
    tokens = model.generate(idx, 30, temperature=0, dtype="bfloat16", kernels="avx512")[0].tolist()
    assert out == "".join(chars[i] for i in tokens) + "\n"


def test_avx512_kernels_where_they_cannot_run_is_one_line(monkeypatch, capsys, run_dir):
    monkeypatch.setattr(cpu_decode, "cpu_flags", lambda: {"avx2"})
    monkeypatch.setattr(cpu_decode.platform, "machine", lambda: "x86_64")
    code, out, err = cli(monkeypatch, capsys, run_dir, "--kernels", "avx512")
    lines = err.strip().splitlines()
    assert code == 2 and out == "" and len(lines) == 1, err
    assert lines[0] == ("sample.py: error: kernels='avx512' cannot run here: this CPU lacks avx512bw, avx512f; "
                        "use kernels='torch'")


def test_beam_search_matches_the_api(monkeypatch, capsys, run_dir):
    code, out, _ = cli(monkeypatch, capsys, run_dir, "--start", "a cat", "--num-beams", "3", "--num-samples", "2",
                       "--max-new-tokens", "20", "--length-penalty", "0.5")
    assert code == 0
    model, info = load_model(run_dir / "out" / "default" / "best.pt")
    chars = info["meta"]["chars"]
    idx = torch.tensor([[chars.index(ch) for ch in "a cat"]])
    seqs, _ = model.beam_search(idx, 20, num_beams=3, num_return_sequences=2, length_penalty=0.5)
    expect = ["".join(chars[i] for i in row) for row in seqs.tolist()]
    assert [s.rstrip("\n") for s in samples(out)] == expect


def test_stream_prints_the_same_text_as_a_single_batch_sample(monkeypatch, capsys, run_dir):
    args = ("--start", "the", "--num-samples", "1", "--max-new-tokens", "60", "--top-p", "0.9")
    plain = cli(monkeypatch, capsys, run_dir, *args)[1]
    streamed = cli(monkeypatch, capsys, run_dir, *args, "--stream")[1]
    assert streamed == plain
    code, out, _ = cli(monkeypatch, capsys, run_dir, "--start", "the", "--num-samples", "2", "--stream",
                       "--max-new-tokens", "10")
    assert code == 0 and len(samples(out)) == 2


def test_start_from_file(monkeypatch, capsys, run_dir, tmp_path):
    (tmp_path / "p.txt").write_text("the dog")
    code, out, _ = cli(monkeypatch, capsys, run_dir, "--start", f"FILE:{tmp_path / 'p.txt'}", "--num-samples", "1",
                       "--max-new-tokens", "3")
    assert code == 0 and out.startswith("the dog") and len(out) == len("the dog") + 3 + 1


@pytest.mark.parametrize("args,match", [
    (["--start", "the Zebra"], "character 'Z' is not in the char vocabulary"),
    (["--start", "FILE:/nonexistent/prompt.txt"], "/nonexistent/prompt.txt"),
    (["--start", ""], "prompt is empty"),
    (["--top-p", "0"], "--top-p must be in (0, 1], got 0.0"),
    (["--top-k", "-1"], "--top-k must be a non-negative integer, got -1"),
    (["--temperature", "-0.5"], "--temperature must be a finite non-negative number, got -0.5"),
    (["--num-samples", "0"], "--num-samples must be a positive integer, got 0"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be a positive integer, got 0"),
    (["--num-beams", "2", "--num-samples", "3"], "--num-samples 3 exceeds --num-beams 2"),
    (["--num-beams", "2", "--num-samples", "1", "--stream"], "--stream works with sampling only"),
    (["--num-beams", "0"], "--num-beams must be a positive integer, got 0"),
    (["--seed", "x"], "argument --seed: invalid int value: 'x'"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--ckpt", "a.pt", "--hf", "b"], "not allowed with argument"),
    (["--ckpt", "/nonexistent/ckpt.pt"], "checkpoint not found: /nonexistent/ckpt.pt"),
    (["--hf", "/nonexistent/gpt2"], "/nonexistent/gpt2"),
    (["--device", "tpu"], "--device"),
    (["--dtype", "float64"], "argument --dtype: invalid choice: 'float64'"),
    (["--dtype", "float16"], "--dtype float16 needs a CUDA device"),
    (["--kernels", "mkl"], "argument --kernels: invalid choice: 'mkl'"),
])
def test_bad_input_is_one_line_exit_2(monkeypatch, capsys, run_dir, args, match):
    code, out, err = cli(monkeypatch, capsys, run_dir, *args)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("sample.py: error:"), err
    assert match in lines[0], lines[0]


def test_help_shows_each_option_with_its_default():
    parser = sample_mod.build_parser()
    text = " ".join(parser.format_help().split())
    for action in parser._actions:
        if action.default not in (None, False) and action.dest != "help":
            assert f"(default {action.default})" in text, action.dest


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_cuda_without_cuda(monkeypatch, capsys, run_dir):
    code, _, err = cli(monkeypatch, capsys, run_dir, "--device", "cuda")
    assert code == 2 and "CUDA is not available" in err


def test_subprocess_exit_codes(run_dir):
    ok = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--num-samples", "1", "--max-new-tokens", "8"],
                        capture_output=True, text=True, cwd=run_dir, timeout=120)
    assert ok.returncode == 0 and len(ok.stdout) == 1 + 8 + 1, ok.stderr
    bad = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--top-k", "many"], capture_output=True,
                         text=True, cwd=run_dir, timeout=120)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr


# ----------------------------------------------------------------------------------------------------
# --hf with GPT-2's tokenizer (needs transformers and ../shared/data/r50k_base.tiktoken)



@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=50257, n_positions=64, n_embd=16, n_layer=1, n_head=2,
                                  initializer_range=0.2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    folder = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(folder)
    return folder, hf


@needs_bpe
def test_hf_folder_greedy_matches_transformers(monkeypatch, capsys, hf_folder, tmp_path):
    folder, hf = hf_folder
    from model.training.tokenizer import gpt2_tokenizer
    tok = gpt2_tokenizer(BPE_FILE)
    code, out, err = cli(monkeypatch, capsys, tmp_path, "--hf", str(folder), "--bpe-file", str(BPE_FILE),
                         "--start", "Hello, world", "--temperature", "0", "--num-samples", "1",
                         "--max-new-tokens", "12")
    assert code == 0, err
    idx = torch.tensor([tok.encode("Hello, world")])
    ref = hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=12, do_sample=False,
                      eos_token_id=50256, pad_token_id=50256)[0].tolist()
    if 50256 in ref[idx.size(1):]:
        ref = ref[:ref.index(50256, idx.size(1))]
    assert out == tok.decode(ref) + "\n"


@needs_bpe
def test_hf_default_start_is_endoftext(monkeypatch, capsys, hf_folder, tmp_path):
    folder, _ = hf_folder
    code, out, err = cli(monkeypatch, capsys, tmp_path, "--hf", str(folder), "--bpe-file", str(BPE_FILE),
                         "--num-samples", "2", "--max-new-tokens", "5", "--stream")
    assert code == 0, err
    assert all(s.startswith("<|endoftext|>") for s in samples(out)) and len(samples(out)) == 2


def test_hf_without_tokenizer_offline(monkeypatch, capsys, hf_folder, tmp_path):
    folder, _ = hf_folder
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty-cache"))
    code, _, err = cli(monkeypatch, capsys, tmp_path, "--hf", str(folder))
    assert code == 2 and "--bpe-file" in err and len(err.strip().splitlines()) == 1


@needs_bpe
def test_stream_printer_holds_back_split_characters():
    from model.training.tokenizer import gpt2_tokenizer
    tok = gpt2_tokenizer(BPE_FILE)
    text = "naïve café 🙂 — 日本語"
    ids = tok.encode(text)
    assert any("\ufffd" in tok.decode(ids[:i]) for i in range(1, len(ids)))  # some prefix splits a character
    out = io.StringIO()
    printer = StreamPrinter(tok, ids[:1], out)
    for t in ids[1:]:
        printer(torch.tensor([t]))
        assert "\ufffd" not in out.getvalue()
    printer(torch.tensor([tok.eot_token_id]))
    printer(torch.tensor([ids[0]]))  # after end-of-text nothing more is shown
    printer.finish()
    assert tok.decode(ids[:1]) + out.getvalue() == text + "\n"


def test_decoding_line_and_generate_stats(monkeypatch, capsys, run_dir):
    from model.flops import bytes as nbytes
    from model.flops.peaks import Peak
    from model.flops.roofline import decoding_summary
    code, out, err = cli(monkeypatch, capsys, run_dir, "--start", "the ", "--num-samples", "2",
                         "--max-new-tokens", "12")
    assert code == 0
    line = [ln for ln in err.splitlines() if ln.startswith("decoding:")]
    assert len(line) == 1 and "tokens/s" in line[0] and "GB/s minimum bytes" in line[0] and "MBU" in line[0] \
        and "MFU" in line[0]
    # the API: stats from generate give the same tokens as without, and a summary by hand
    model, info = load_model(run_dir / "out" / "default" / "best.pt")
    idx = torch.zeros(2, 4, dtype=torch.long)
    stats = {}
    a = model.generate(idx, 6, temperature=0, stats=stats)
    assert torch.equal(a, model.generate(idx, 6, temperature=0))
    assert stats["rows"] == 2 and stats["prompt_len"] == 4 and stats["new_tokens"] == 6
    assert 0 < stats["prefill_seconds"] <= stats["seconds"]
    s = decoding_summary(model.config, [stats], torch.float32, Peak(1e9, "test"), Peak(1e3, "test", unit="B/s"))
    # decode steps: tokens 2..6 at contexts 5..9 (prompt 4, then one cached position more per step)
    expect = sum(nbytes.decode_minimum_bytes(model.config, 2, c, "float32")["total"] for c in range(5, 10))
    assert s["tokens"] == 10 and s["bytes"] == expect
    assert s["mbu"] == 1.0  # 1 kB/s is beaten at once: the bandwidth peak is raised, MBU never above 1


def test_samples_after_its_dataset_folder_was_rebuilt_with_another_vocabulary(monkeypatch, capsys, tmp_path):
    """The checkpoint carries its tokenizer (meta with the BPE merges): a rebuilt folder does not matter."""
    from model import GPT
    from model.config import to_dict
    from model.training.checkpoint import FORMAT, save_checkpoint
    (tmp_path / "corpus.txt").write_text(TEXT)
    folder = tmp_path / "data" / "tiny_bpe"
    prepare("file", "bpe", folder, input_path=tmp_path / "corpus.txt", vocab_size=270, quiet=True)
    meta = json.loads((folder / "meta.json").read_text())
    model = GPT(GPTConfig(vocab_size=meta["vocab_size"], block_size=32, n_layer=1, n_head=2, n_embd=16))
    save_checkpoint({"format": FORMAT, "step": 0, "best_val_loss": 9.0, "model": model.state_dict(),
                     "model_config": to_dict(model.config), "meta": meta, "dataset": str(folder)},
                    tmp_path / "run" / "last.pt")
    capsys.readouterr()
    prepare("file", "bpe", folder, input_path=tmp_path / "corpus.txt", vocab_size=260)
    said = capsys.readouterr().out
    assert f"replaced {folder}, which was built differently" in said and "vocab 270; now" in said
    assert "changed: vocab_size, ranks_sha256" in said
    code, out, err = cli(monkeypatch, capsys, tmp_path, "--ckpt", str(tmp_path / "run"), "--start", "the cat",
                         "--num-samples", "1", "--max-new-tokens", "8")
    assert code == 0, err
    assert out.startswith("the cat")
    capsys.readouterr()
    prepare("file", "bpe", folder, input_path=tmp_path / "corpus.txt", vocab_size=260)  # the same again
    assert "replaced" not in capsys.readouterr().out
