"""Nothing lost under faults: checkpoint integrity and finite-only saves, full disks, the out_dir lock,
memory estimates refused before allocation (the CLI-level faults are further down)."""
import errno
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import zipfile
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import model.training.checkpoint as checkpoint
import model.gpt.memory as memory
import model.training.memory as train_memory
import train as train_mod
from model import GPT, GPTConfig, TrainConfig
from model.training.checkpoint import (NonFiniteStateError, load_checkpoint, model_from_checkpoint,
                                       non_finite_tensor, save_checkpoint, verify_archive)
from model.training.lock import LOCK_NAME, OutDirInUseError, OutDirLock, check_out_dir
from model.training.metrics import TRIM_PAUSE_ENV
from model.training.optim import lr_at

ROOT = Path(__file__).resolve().parents[1]
TINY = GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8)


def tiny_state(step: int = 1) -> dict:
    torch.manual_seed(step)
    model = GPT(TINY)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))[1].backward()
    opt.step()
    return {"format": checkpoint.FORMAT, "step": step, "model": model.state_dict(),
            "model_config": TINY.__dict__.copy(), "optimizer": opt.state_dict()}


def member_offset(path: Path, name_part: str) -> tuple[int, int]:
    """(offset of the data of the first archive member whose name contains name_part, its size)."""
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if name_part in i.filename)
    raw = path.read_bytes()
    header = info.header_offset
    name_len = int.from_bytes(raw[header + 26:header + 28], "little")
    extra_len = int.from_bytes(raw[header + 28:header + 30], "little")
    return header + 30 + name_len + extra_len, info.file_size


# ----------------------------------------------------------------------------------------------------
# Checkpoint integrity

def test_a_flipped_bit_in_the_weights_is_refused_naming_the_file(tmp_path):
    path = save_checkpoint(tiny_state(), tmp_path / "last.pt")
    load_checkpoint(path)  # intact: loads
    offset, size = member_offset(path, "/data/0")
    raw = bytearray(path.read_bytes())
    raw[offset + size // 2] ^= 0x10  # one bit inside the first tensor's bytes: still a valid zip, valid floats
    path.write_bytes(raw)
    with pytest.raises(ValueError, match=rf"^{path}: corrupt checkpoint: model.transformer.wte.weight does not "
                                         rf"match its sha256 digest$"):
        load_checkpoint(path)
    with pytest.raises(ValueError, match=rf"^{path}: corrupt checkpoint: archive/data/0 fails its CRC-32 check$"):
        verify_archive(path)


def test_from_pretrained_refuses_a_flipped_bit_too(tmp_path):
    """GPT.from_pretrained reads checkpoints without model.training: it checks the same digests."""
    path = save_checkpoint(tiny_state(), tmp_path / "last.pt")
    GPT.from_pretrained(path)  # intact: loads
    offset, size = member_offset(path, "/data/0")
    raw = bytearray(path.read_bytes())
    raw[offset + size // 2] ^= 0x10
    path.write_bytes(raw)
    with pytest.raises(ValueError, match=rf"^{path}: corrupt checkpoint: model.transformer.wte.weight does not "
                                         rf"match its sha256 digest$"):
        GPT.from_pretrained(path)
    with pytest.raises(ValueError, match=r"corrupt checkpoint"):
        GPT.from_pretrained(tmp_path)  # the out_dir form reads the same file


def test_a_file_without_a_digest_has_every_crc_checked(tmp_path):
    """nanoGPT's ckpt.pt (and flopgpt-1 checkpoints) carry no digest: every member's CRC-32 is checked."""
    from model.gpt.weights import save_nanogpt
    path = tmp_path / "ckpt.pt"
    torch.manual_seed(0)
    save_nanogpt(GPT(TINY), path)
    GPT.from_pretrained(path)
    offset, size = member_offset(path, "/data/0")
    raw = bytearray(path.read_bytes())
    raw[offset + size // 2] ^= 0x10
    path.write_bytes(raw)
    with pytest.raises(ValueError, match=rf"^{path}: corrupt checkpoint: \S+/data/0 fails its CRC-32 check$"):
        GPT.from_pretrained(path)


def test_two_thousand_flipped_bytes_are_refused(tmp_path):
    path = save_checkpoint(tiny_state(), tmp_path / "last.pt")
    raw = bytearray(path.read_bytes())
    offset, size = member_offset(path, "/data/")
    for i in range(offset, offset + min(2000, size)):
        raw[i] ^= 0xFF
    path.write_bytes(raw)
    with pytest.raises(ValueError, match=rf"^{path}: corrupt checkpoint"):
        verify_archive(path)
    with pytest.raises(ValueError, match=rf"^{path}: corrupt checkpoint"):
        load_checkpoint(path)


def same_values(a, b) -> bool:
    """Equal as loaded: tensors of the same dtype, shape and bytes; everything else equal (NaN equal NaN)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(a.view(torch.uint8) if a.dim() else a,
                                                       b.view(torch.uint8) if b.dim() else b))
    if isinstance(a, dict) and isinstance(b, dict):
        return list(a) == list(b) and all(same_values(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_values(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and (a == b or (a != a and b != b))


def central_directory_entry(path: Path, member: str) -> int:
    """Offset of member's record in the zip's central directory (46 fixed bytes, then the name)."""
    raw = path.read_bytes()
    with zipfile.ZipFile(path) as z:
        at = z.start_dir
    while raw[at:at + 4] == b"PK\x01\x02":
        name_len, extra_len, comment_len = (int.from_bytes(raw[at + k:at + k + 2], "little") for k in (28, 30, 32))
        if raw[at + 46:at + 46 + name_len].decode(errors="replace").endswith(member):
            return at
        at += 46 + name_len + extra_len + comment_len
    raise LookupError(member)


def flip_outcome(path: Path, good: bytes, reference: dict, byte: int, bit: int) -> str:
    """Load path with one bit flipped: "refused" (one line naming the file) or "harmless" (loads the
    reference's values exactly); anything else fails the test."""
    raw = bytearray(good)
    raw[byte] ^= 1 << bit
    path.write_bytes(raw)
    try:
        loaded = load_checkpoint(path)
    except ValueError as e:  # CorruptCheckpointError is one
        assert str(e).startswith(f"{path}: ") and "\n" not in str(e), (byte, bit, str(e))
        return "refused"
    assert same_values(loaded, reference), f"byte {byte} bit {bit} loads different values"
    return "harmless"


def test_every_single_bit_flip_is_refused_or_changes_nothing(tmp_path):
    """Random flips over the whole file, and more over the zip's headers (the bytes CRCs do not cover): each
    is refused as one ValueError naming the file, or loads exactly the saved values; no other exception."""
    path = save_checkpoint(tiny_state(), tmp_path / "last.pt")
    good = path.read_bytes()
    reference = load_checkpoint(path)
    rng = random.Random(22)
    with zipfile.ZipFile(path) as z:
        start = z.start_dir  # the central directory: how every member is to be read
    positions = [rng.randrange(len(good)) for _ in range(300)] + \
        [rng.randrange(start, len(good)) for _ in range(300)]
    outcomes = [flip_outcome(path, good, reference, byte, rng.randrange(8)) for byte in positions]
    assert outcomes.count("refused") > len(outcomes) // 2


def test_a_central_directory_flip_that_leaves_a_tensor_unfilled_is_refused(tmp_path):
    """Bit 4 of a member's external attributes (MS-DOS "directory") makes torch's zip reader skip the member's
    bytes and leave its tensor's memory as the allocator hands it over, while every CRC still matches: the
    tensor digests refuse it. Loaded in a fresh process, whose memory never held the saved values (in this
    process, memory freed by an earlier load of the same file can hold them by chance)."""
    path = save_checkpoint(tiny_state(), tmp_path / "last.pt")
    good = path.read_bytes()
    code = ("import sys\nfrom model import GPT\nfrom model.training.checkpoint import load_checkpoint\n"
            "load = load_checkpoint if sys.argv[2] == 'checkpoint' else GPT.from_pretrained\n"
            "try:\n    load(sys.argv[1])\n    print('loaded')\nexcept ValueError as e:\n    print(e)\n")
    for member in ("archive/data/0", "archive/data/3"):
        raw = bytearray(good)
        raw[central_directory_entry(path, member) + 38] ^= 1 << 4  # external file attributes, 4 bytes
        path.write_bytes(raw)
        for loader, message in (("checkpoint", ": corrupt checkpoint: .* does not match its sha256 digest$"),
                                ("from_pretrained", ": corrupt checkpoint")):
            out = subprocess.run([sys.executable, "-c", code, str(path), loader], capture_output=True, text=True,
                                 cwd=ROOT, timeout=120)
            assert out.returncode == 0, out.stderr
            assert re.match(f"^{re.escape(str(path))}{message}", out.stdout), (loader, out.stdout)


def test_zip_reader_errors_are_one_corrupt_checkpoint_error(tmp_path):
    """A flag that claims encryption or strong encryption, a bad compression method: the zip reader's own
    exception types (RuntimeError, NotImplementedError, BadZipFile) become one line naming the file."""
    path = save_checkpoint(tiny_state(), tmp_path / "last.pt")
    good = path.read_bytes()
    at = central_directory_entry(path, "archive/data/0")
    for offset, value in ((8, 0x01), (8, 0x40), (10, 0x63)):  # flags: encrypted, strong encryption; method
        raw = bytearray(good)
        raw[at + offset] |= value
        path.write_bytes(raw)
        for load in (load_checkpoint, GPT.from_pretrained):
            with pytest.raises(ValueError, match=rf"^{path}: corrupt checkpoint \((RuntimeError|NotImplementedError|"
                                                 r"BadZipFile): [^\n]*$"):
                load(path)


def test_non_finite_weights_or_moments_are_never_saved(tmp_path):
    path = save_checkpoint(tiny_state(1), tmp_path / "last.pt")
    good = path.read_bytes()
    bad = tiny_state(2)
    bad["model"]["transformer.h.0.mlp.c_fc.weight"][0, 3] = float("nan")
    with pytest.raises(NonFiniteStateError, match=r"not saving .*last.pt: model.transformer.h.0.mlp.c_fc.weight "
                                                  r"holds NaN or infinite values"):
        save_checkpoint(bad, path)
    bad = tiny_state(2)
    bad["optimizer"]["state"][0]["exp_avg_sq"][0] = float("inf")
    with pytest.raises(NonFiniteStateError, match=r"optimizer.state.0.exp_avg_sq"):
        save_checkpoint(bad, path)
    assert path.read_bytes() == good  # the last good checkpoint is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
    big = tiny_state(3)
    big["model"]["transformer.h.0.mlp.c_fc.weight"].fill_(3e38)  # finite, but its sum overflows to inf
    assert non_finite_tensor(big) is None
    big["model"]["transformer.h.0.mlp.c_fc.weight"][1, 1] = -float("inf")
    assert non_finite_tensor(big) == "model.transformer.h.0.mlp.c_fc.weight"


def test_a_directory_named_like_the_checkpoint_is_one_clear_error(tmp_path):
    (tmp_path / "last.pt").mkdir()
    with pytest.raises(IsADirectoryError, match=r"checkpoint path .*last.pt is a directory"):
        save_checkpoint(tiny_state(), tmp_path / "last.pt")
    with pytest.raises(ValueError, match=r"checkpoint path .*last.pt is a directory"):
        load_checkpoint(tmp_path / "last.pt")


def test_a_full_disk_is_one_oserror_and_keeps_the_previous_file(tmp_path, monkeypatch):
    path = save_checkpoint(tiny_state(1), tmp_path / "last.pt")
    good = path.read_bytes()

    def torn_write(state, f):  # what torch's zip writer raises when a write comes up short
        f.write(b"PK\3\4 partial")
        raise RuntimeError("[enforce fail at inline_container.cc:858] . PytorchStreamWriter failed writing file "
                           "data/3: file write failed\nunexpected pos 1472 vs 1408")
    monkeypatch.setattr(checkpoint.torch, "save", torn_write)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: SimpleNamespace(free=4096))
    with pytest.raises(OSError, match=rf"^\[Errno 28\] could not write checkpoint {path}: no space left on the "
                                      r"device \(4,096 bytes free\); the previous last.pt is kept$") as e:
        save_checkpoint(tiny_state(2), path)
    assert e.value.errno == errno.ENOSPC
    assert path.read_bytes() == good and [p.name for p in tmp_path.iterdir()] == ["last.pt"]


# ----------------------------------------------------------------------------------------------------
# One run per out_dir

HOLDER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, f"{os.getpid()}\\n".encode())
print("locked", flush=True)
time.sleep(60)
"""  # OutDirLock's protocol without importing torch, so the test stays fast


def hold_lock(out: Path) -> subprocess.Popen:
    out.mkdir(exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(out / LOCK_NAME)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_run_on_a_locked_out_dir_is_refused_naming_the_holder(tmp_path):
    out = tmp_path / "run"
    holder = hold_lock(out)
    try:
        with pytest.raises(OutDirInUseError, match=rf"^{out} is in use by another run \(pid {holder.pid} holds "
                                                   rf"{out / LOCK_NAME}\)"):
            OutDirLock(out).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with OutDirLock(out) as lock:  # the kernel dropped the dead holder's lock; its pid is still in the file
        assert lock.note == f"took over {out / LOCK_NAME} from pid {holder.pid}, which is no longer running"
        assert (out / LOCK_NAME).read_text() == f"{os.getpid()}\n"
        with pytest.raises(OutDirInUseError, match=rf"pid {os.getpid()}"):  # a second lock in one process too
            OutDirLock(out).acquire()
    assert (out / LOCK_NAME).read_text() == ""  # released cleanly: no pid left
    with OutDirLock(out) as lock:
        assert lock.note == ""


def test_out_dir_must_name_a_folder(tmp_path):
    with pytest.raises(ValueError, match="out_dir is empty"):
        check_out_dir("")
    with pytest.raises(ValueError, match="out_dir /dev/null exists and is not a folder"):
        OutDirLock("/dev/null")
    assert check_out_dir(tmp_path / "a" / "b").is_dir()


# ----------------------------------------------------------------------------------------------------
# Memory estimates

@pytest.mark.parametrize("cfg", [TINY, GPTConfig(vocab_size=50, block_size=16, n_layer=3, n_head=2, n_embd=16,
                                                bias=False, pos_encoding="sinusoidal")])
def test_param_count_matches_the_built_model(cfg):
    """The weights' estimate that GPT.from_pretrained checks (model/gpt/memory.py): the closed form equals the
    model's own count, and sizes no tensor could hold are counted exactly, without allocating."""
    from model.config import param_count
    assert param_count(cfg) == GPT(cfg).num_params()
    assert memory.weights_bytes(cfg) == {"parameters": 4 * GPT(cfg).num_params()}
    huge = replace(cfg, n_embd=10**9, n_head=1)  # tensors over 2^63 bytes
    wpe = huge.block_size * 10**9 if huge.pos_encoding == "learned" else 0
    per_layer = 12 * 10**18 + 2 * 10**9 + 11 * 10**9 * int(huge.bias)
    assert param_count(huge) == huge.vocab_size * 10**9 + wpe + huge.n_layer * per_layer + 10**9 * (1 + int(huge.bias))


def test_training_estimate_by_hand_and_refusal_names_the_figures(monkeypatch):
    cfg = GPTConfig(vocab_size=100, block_size=32, n_layer=2, n_head=2, n_embd=16)
    n = GPT(cfg).num_params()
    parts = train_memory.training_bytes(cfg, batch_size=4)
    assert parts == {"parameters": 4 * n, "gradients": 4 * n, "AdamW moments": 8 * n,
                     "activations": 4 * 4 * 32 * (16 * 2 * 16 + 2 * 100)}
    monkeypatch.setattr(memory, "machine_memory", lambda device="cpu": (2**30, "physical memory"))
    huge = GPTConfig(vocab_size=5 * 10**9, block_size=1024, n_layer=1, n_head=1, n_embd=64)
    with pytest.raises(memory.InsufficientMemoryError,
                       # parameters 5e9·64 + 1024·64 + ... ≈ 3.2e11 x 4 B = 1,192.1 GiB; activations
                       # 4 B x 12·1024 tokens x (16·64 + 2·5e9) = 457,763.7 GiB
                       match=r"^training needs at least 462,532\.1 GiB \(parameters 1,192\.1 GiB, gradients "
                             r"1,192\.1 GiB, AdamW moments 2,384\.2 GiB, activations 457,763\.7 GiB\), more than "
                             r"the 1\.0 GiB of physical memory on this machine$"):
        memory.check_fits(train_memory.training_bytes(huge, 12), "training")
    assert memory.check_fits(parts, "training") == sum(parts.values())


def test_machine_memory_is_the_smaller_of_ram_and_the_container_limit(tmp_path, monkeypatch):
    ram, source = memory.machine_memory()
    assert ram > 2**28 and (source == "physical memory" or source.startswith("container limit"))
    limit = tmp_path / "memory.max"
    limit.write_text("1073741824\n")
    monkeypatch.setattr(memory, "CGROUP_LIMITS", (tmp_path / "absent", limit))
    assert memory.machine_memory() == (min(ram, 2**30), f"container limit ({limit})" if ram > 2**30 else source)
    limit.write_text("max\n")
    assert memory.machine_memory()[0] >= ram


def test_a_checkpoint_config_too_big_to_build_is_refused_before_allocating(tmp_path):
    ckpt = tiny_state()
    ckpt["model_config"] = {**ckpt["model_config"], "vocab_size": 10**12, "n_embd": 768, "n_head": 12}
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=rf"^the model of {tmp_path / 'x.pt'} needs at least 2,861,\d{{3}}\.\d GiB "
                                         r"\(parameters"):
        model_from_checkpoint(ckpt, tmp_path / "x.pt")
    assert time.perf_counter() - t0 < 2


@pytest.mark.parametrize("model_config", [{"n_layer": 10**7, "n_embd": 4096, "n_head": 8},
                                          {"n_embd": 10**9, "n_head": 1}])
def test_from_pretrained_refuses_a_config_too_big_before_allocating(model_config, tmp_path, monkeypatch):
    monkeypatch.setattr(memory, "machine_memory", lambda device="cpu": (2**34, "physical memory"))
    state = tiny_state()
    state["model_config"] = {**state["model_config"], **model_config}
    path = save_checkpoint(state, tmp_path / "big.pt")
    t0 = time.perf_counter()
    with pytest.raises(memory.InsufficientMemoryError, match=rf"^the model of {path} needs at least [\d,.]+ GiB "
                                                            r"\(parameters [\d,.]+ GiB\), more than the 16.0 GiB"):
        GPT.from_pretrained(path)
    assert time.perf_counter() - t0 < 2


# ----------------------------------------------------------------------------------------------------
# train.py: the NaN stop, signals, the metrics trim, resume changes, concurrent runs


MODEL = dict(block_size=16, n_layer=1, n_head=2, n_embd=16, dropout=0.1)
RUN = dict(batch_size=2, max_iters=6, eval_interval=3, eval_iters=2, warmup_iters=1, lr=1e-2, min_lr=1e-3,
           device="cpu", peak_flops=1e12, progress=False)


def configs(dataset, out, **kw):
    vocab = json.loads((Path(dataset) / "meta.json").read_text())["vocab_size"]
    run = {**RUN, **{k: v for k, v in kw.items() if k not in MODEL}}
    return (GPTConfig(vocab_size=vocab, **{**MODEL, **{k: v for k, v in kw.items() if k in MODEL}}),
            TrainConfig(dataset=str(dataset), out_dir=str(out), **run))


def cli_args(dataset, out, **kw) -> list[str]:
    return [f"--{k}={v}" for k, v in {**MODEL, **RUN, "dataset": dataset, "out_dir": out, **kw}.items()]


def records(out) -> list[dict]:
    return [json.loads(ln) for ln in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def same_weights(a: Path, b: Path) -> bool:
    sa, sb = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def one_error_line(err: str, prog: str = "train.py") -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err
    return lines[0]


def test_nan_stop_names_a_last_good_checkpoint_that_loads_is_finite_and_resumes(dataset, tmp_path, capsys):
    out = tmp_path / "run"
    model_cfg, cfg = configs(dataset, out, max_iters=50, warmup_iters=0, eval_interval=1, lr=1e308)
    with pytest.raises(train_mod.TrainingStopped, match=rf"Last good checkpoint: {out / 'last.pt'} \(step (\d+)\)"
                       ) as e:
        train_mod.train(model_cfg, cfg)
    assert e.value.code == 1
    named = int(re.search(r"\(step (\d+)\)$", str(e.value)).group(1))
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["step"] == named and non_finite_tensor(ckpt) is None
    assert all(rec["val_loss"] is None or math.isfinite(rec["val_loss"]) for rec in records(out)
               if rec.get("kind") == "eval")  # strict JSON: null, never NaN
    summary = train_mod.train(model_cfg, replace(cfg, lr=1e-3, max_iters=named + 2, resume=True))
    assert summary["step"] == named + 2 and math.isfinite(summary["val_loss"])
    assert "lr 1e+308 -> 0.001" in capsys.readouterr().err


def test_metrics_are_strict_json(dataset, tmp_path):
    out = tmp_path / "run"
    train_mod.train(*configs(dataset, out, max_iters=2, grad_clip=0.0))
    text = (out / "metrics.jsonl").read_text()
    assert "NaN" not in text and all(r["grad_norm"] is None for r in records(out) if "loss" in r)
    for line in text.splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))


def send_signal_first(monkeypatch, name: str, n: int = 1, sig=signal.SIGTERM):
    """Patch train_mod.<name> so that its n-th call first delivers `sig` to this process."""
    real, calls = getattr(train_mod, name), {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            os.kill(os.getpid(), sig)  # the handler runs here, before the call
        return real(*args, **kwargs)
    monkeypatch.setattr(train_mod, name, wrapper)


def test_a_signal_during_setup_stops_before_training(dataset, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    send_signal_first(monkeypatch, "build_model")
    assert train_mod.main(cli_args(dataset, out)) == 143
    err = capsys.readouterr().err
    assert "train.py: SIGTERM received during setup: stopped before training; nothing to save" in err
    assert not (out / "last.pt").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers put back


def test_a_signal_during_evaluation_keeps_that_evaluation_for_the_resume(dataset, tmp_path, monkeypatch, capsys):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert train_mod.main(cli_args(dataset, straight)) == 0
    send_signal_first(monkeypatch, "evaluate", n=2)  # the evaluation of step 3
    assert train_mod.main(cli_args(dataset, split)) == 143
    err = capsys.readouterr().err
    assert "SIGTERM received during the evaluation of step 3: stopped; checkpoint saved" in err
    assert load_checkpoint(split / "last.pt")["evaluated"] is False
    monkeypatch.undo()
    assert train_mod.main(cli_args(dataset, split, resume=True)) == 0
    keep = ("kind", "step", "train_loss", "val_loss", "loss", "lr", "grad_norm")
    assert [{k: r.get(k) for k in keep} for r in records(split)] == [{k: r.get(k) for k in keep}
                                                                    for r in records(straight)]
    assert same_weights(split / "best.pt", straight / "best.pt") and same_weights(split / "last.pt",
                                                                                  straight / "last.pt")


def test_a_signal_after_an_evaluation_step_evaluates_it_on_resume(dataset, tmp_path, monkeypatch):
    straight, split = tmp_path / "straight", tmp_path / "split"
    model_cfg, cfg = configs(dataset, straight, max_iters=1, eval_interval=1)
    train_mod.train(model_cfg, cfg)
    flag: dict = {}
    real = train_mod.train_step

    def step_then_signal(run):
        flag["signal"] = "SIGTERM"  # arrives during the step: the run stops after it, before its evaluation
        return real(run)
    monkeypatch.setattr(train_mod, "train_step", step_then_signal)
    with pytest.raises(train_mod.TrainingStopped, match="stopped after step 1"):
        train_mod.train(model_cfg, replace(cfg, out_dir=str(split)), stop_flag=flag)
    monkeypatch.undo()
    train_mod.train(model_cfg, replace(cfg, out_dir=str(split), resume=True))
    assert [r for r in records(split) if r.get("kind") == "eval"] == [r for r in records(straight)
                                                                      if r.get("kind") == "eval"]
    assert same_weights(split / "best.pt", straight / "best.pt")


def start_training(dataset, out, *extra, env=None) -> subprocess.Popen:
    args = cli_args(dataset, out, max_iters=100000, eval_interval=100000, grad_accum=2000)
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args, *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)


def wait_for(condition, timeout=60.0):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.slow  # two fresh interpreters importing torch (~4 s each on 2 cores)
def test_a_second_signal_exits_at_once_and_a_second_run_is_refused(dataset, tmp_path, capsys):
    out = tmp_path / "run"
    proc = start_training(dataset, out)
    wait_for(lambda: (out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text())  # in step 1
    assert train_mod.main(cli_args(dataset, out, overwrite=True)) == 2  # one run per out_dir
    line = one_error_line(capsys.readouterr().err)
    assert f"{out} is in use by another run (pid {proc.pid} holds {out / '.lock'})" in line
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)  # the step (2,000 micro-batches, seconds) is still running: exit now
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGTERM, err
    assert "SIGTERM received: stopping at the next safe point" in err and "second SIGTERM: exiting now" in err
    assert not (out / "last.pt").exists() or load_checkpoint(out / "last.pt")  # never torn
    with OutDirLock(out) as lock:  # the dead run's lock is free again
        assert f"from pid {proc.pid}, which is no longer running" in lock.note


def test_kill_9_during_the_metrics_trim_leaves_the_metrics_and_resume_completes(dataset, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    train_mod.train(*configs(dataset, straight, lr_decay_iters=6))
    model_cfg, cfg = configs(dataset, split, max_iters=3, lr_decay_iters=6)  # its last evaluation: as at 3 of 6
    train_mod.train(model_cfg, cfg)
    before = (split / "metrics.jsonl").read_bytes()
    env = {**os.environ, TRIM_PAUSE_ENV: "60"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *cli_args(dataset, split, lr_decay_iters=6,
                             resume=True)], stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    wait_for(lambda: list(split.glob(".metrics.jsonl.*.tmp")))  # written, not yet renamed
    proc.kill()
    proc.wait()
    assert (split / "metrics.jsonl").read_bytes() == before
    train_mod.train(model_cfg, replace(cfg, resume=True, max_iters=6))
    assert not list(split.glob(".*.tmp"))
    keep = ("kind", "step", "loss", "lr", "val_loss")
    assert [{k: r.get(k) for k in keep} for r in records(split)] == [{k: r.get(k) for k in keep}
                                                                    for r in records(straight)]


def test_a_torn_last_metrics_line_is_dropped_and_other_damage_is_named(dataset, tmp_path, capsys):
    out = tmp_path / "run"
    model_cfg, cfg = configs(dataset, out, max_iters=3)
    train_mod.train(model_cfg, cfg)
    path = out / "metrics.jsonl"
    good = path.read_text()
    for i, torn in enumerate(('{"step": 4, "loss": 2.3', "\n", '{"step": 4, "lo')):
        before = path.read_text()
        path.write_text(before + torn)
        train_mod.train(model_cfg, replace(cfg, resume=True, max_iters=4 + i))  # one more step each time
        after = path.read_text()
        assert after.startswith(before) and [json.loads(ln)["step"] for ln in after.splitlines()][-1] == 4 + i
        assert f"{path}:{before.count(chr(10)) + 1}: dropped a torn last line" in capsys.readouterr().err
    lines = good.splitlines()
    for bad, match in (("garbage", r":2: not a JSON record"), ("{}", r":2: not a metrics record"),
                       ('{"step": "x"}', r":2: not a metrics record")):
        path.write_text("\n".join([lines[0], bad, *lines[1:]]) + "\n")
        with pytest.raises(ValueError, match=rf"^{path}{match}"):
            train_mod.train(model_cfg, replace(cfg, resume=True, max_iters=10))


def test_resume_names_each_change_and_keeps_the_planned_schedule(dataset, tmp_path, capsys):
    full, short, asked = tmp_path / "full", tmp_path / "short", tmp_path / "asked"
    train_mod.train(*configs(dataset, full, max_iters=6))
    for out in (short, asked):
        train_mod.train(*configs(dataset, out, max_iters=3))
    capsys.readouterr()
    model_cfg, cfg = configs(dataset, short, max_iters=6, resume=True, seed=7)
    train_mod.train(model_cfg, cfg)
    err = capsys.readouterr().err
    assert "resume: changed from the checkpoint's config: max_iters 3 -> 6, seed 1337 -> 7" in err
    assert ("resume: the learning-rate decay still ends at step 3 (steps 3-6 train at min_lr=0.001); pass "
            "--lr_decay_iters=6 to decay over the new length instead") in err
    assert "evaluation batches change" in err
    planned = [r["lr"] for r in records(short) if "lr" in r]
    assert planned[:3] == [lr_at(s, replace(cfg, max_iters=3)) for s in range(3)]
    assert planned[3:] == [1e-3] * 3  # past the kept horizon: min_lr
    assert load_checkpoint(short / "last.pt")["train_config"]["lr_decay_iters"] == 3
    train_mod.train(*configs(dataset, asked, max_iters=6, lr_decay_iters=6, resume=True))
    asked_lr = [r["lr"] for r in records(asked) if "lr" in r]
    assert asked_lr[3:] == [r["lr"] for r in records(full) if "lr" in r][3:]  # re-planned: as a 6-step run


# ----------------------------------------------------------------------------------------------------
# Every bad input: one line, exit 2

def ckpt_with(tmp_path, **model_config) -> Path:
    state = tiny_state()
    state.update(meta={"tokenizer": "char", "vocab_size": 11, "chars": list("abcdefghijk")}, dataset="x",
                 model_config={**state["model_config"], **model_config})
    return save_checkpoint(state, tmp_path / "last.pt")


@pytest.mark.parametrize("kw, match", [
    ({"block_size": 1_000_000_000}, r"train.bin: 6156 tokens, fewer than block_size\+1=1000000001"),
    ({"block_size": 512, "batch_size": 1_000_000}, r"training \(batch_size=1000000, block_size=512\) needs at least "
                                                   r"[\d,.]+ GiB \(activations"),
    ({"vocab_size": 5_000_000_000}, r"training .* needs at least [\d,.]+ GiB \(parameters"),
    # 4 B x 1e7·16 tokens x (16 values x 1 layer x 16 wide + 2 x 24, the tiny dataset's vocabulary) = 181.2 GiB
    ({"batch_size": 10_000_000}, r"needs at least 181\.2 GiB \(activations 181\.2 GiB\), more than the 16\.0 GiB"),
    # tensors torch cannot describe (over 2^63 bytes): the estimate, not "Storage size calculation overflowed"
    ({"n_embd": 1_000_000_000, "n_head": 1}, r"training .* needs at least [\d,.]+ GiB \(parameters"),
    ({"seed": 10**20}, r"seed must be in \[0, 9223372036854775806\], got 100000000000000000000"),
    ({"out_dir": ""}, r"out_dir is empty"),
    ({"out_dir": "/dev/null"}, r"out_dir /dev/null exists and is not a folder"),
])
def test_train_bad_sizes_and_paths_are_one_line_exit_2(kw, match, dataset, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(memory, "machine_memory", lambda device="cpu": (2**34, "physical memory"))
    assert train_mod.main(cli_args(dataset, tmp_path / "o", **kw)) == 2
    assert re.search(match, one_error_line(capsys.readouterr().err))


def test_train_disk_full_and_a_directory_named_last_pt_are_one_line(dataset, tmp_path, capsys, monkeypatch):
    (tmp_path / "a" / "last.pt").mkdir(parents=True)
    assert train_mod.main(cli_args(dataset, tmp_path / "a", overwrite=True)) == 2
    assert f"{tmp_path / 'a' / 'last.pt'} is a directory" in one_error_line(capsys.readouterr().err)

    def full(state, f):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0")
    monkeypatch.setattr(checkpoint.torch, "save", full)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: SimpleNamespace(free=0))
    assert train_mod.main(cli_args(dataset, tmp_path / "b")) == 2
    err = capsys.readouterr().err  # after the model, plan and first evaluation lines
    assert "Traceback" not in err and err.strip().splitlines()[-1] == (
        f"train.py: error: could not write checkpoint {tmp_path / 'b' / 'best.pt'}: no space left on the device "
        f"(0 bytes free)")
    with pytest.raises(OSError, match="no space left"):  # --debug: the traceback instead
        train_mod.main(cli_args(dataset, tmp_path / "c") + ["--debug"])


def test_bit_flipped_checkpoint_is_refused_by_sample_and_resume(dataset, tmp_path, capsys):
    import sample
    out = tmp_path / "run"
    train_mod.train(*configs(dataset, out, max_iters=1))
    path = out / "last.pt"
    offset, size = member_offset(path, "/data/0")
    raw = bytearray(path.read_bytes())
    raw[offset:offset + size] = bytes(b ^ 0xFF for b in raw[offset:offset + size])
    path.write_bytes(raw)
    capsys.readouterr()
    assert sample.main(["--ckpt", str(path), "--max-new-tokens", "2", "--device", "cpu"]) == 2
    assert f"{path}: corrupt checkpoint: model.transformer.wte.weight does not match its sha256 digest" in \
        one_error_line(capsys.readouterr().err, "sample.py")
    assert train_mod.main(cli_args(dataset, out, resume=True)) == 2
    assert f"{path}: corrupt checkpoint" in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("change, match", [
    ({"tokenizer": "zzz"}, r"tokenizer must be one of \('char', 'gpt2', 'bpe'\), got 'zzz'"),
    ({"chars": None}, r"chars must be a list of single characters, got None"),
    ({"chars": ["a", "bb"]}, r"chars must be a list of single characters"),
    ({"train_tokens": "418543"}, r"train_tokens must be a positive integer, got '418543'"),
    ({"val_tokens": 0}, r"val_tokens must be a positive integer, got 0"),
    ({"vocab_size": 70_000}, r"vocab_size must be in \[1, 65536\], got 70000"),
    ({"vocab_size": True}, r"vocab_size must be in \[1, 65536\], got True"),
    ({"dtype": None}, r"dtype must be one of \('uint16', 'uint32'\), got None"),
    ({"text_sha256": 12}, r"text_sha256 must be 64 hex digits, got 12"),
    ({"source": ["file"]}, r"source must be one of"),
])
def test_a_damaged_meta_json_is_refused_naming_the_file_and_key(change, match, dataset, tmp_path, capsys):
    copy = tmp_path / "ds"
    shutil.copytree(dataset, copy)
    meta = json.loads((copy / "meta.json").read_text())
    (copy / "meta.json").write_text(json.dumps({**meta, **change}))
    assert train_mod.main(cli_args(copy, tmp_path / "o")) == 2
    assert re.search(rf"^train.py: error: {re.escape(str(copy / 'meta.json'))}: {match}",
                     one_error_line(capsys.readouterr().err))
    assert not (tmp_path / "o").exists()


def test_token_ids_beyond_the_vocabulary_are_refused_before_training(dataset, tmp_path, capsys):
    import shutil
    copy = tmp_path / "ds"
    shutil.copytree(dataset, copy)
    meta = json.loads((copy / "meta.json").read_text())
    (copy / "meta.json").write_text(json.dumps({**meta, "vocab_size": meta["vocab_size"] - 1,
                                                "chars": meta["chars"][:-1]}))
    assert train_mod.main(cli_args(copy, tmp_path / "o")) == 2
    assert f"is not below vocab_size={meta['vocab_size'] - 1}" in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("args, match", [
    (["--num-samples", "1000000000"], r"sampling 1,000,000,000 rows of 1,000,000,\d+ tokens|sampling 1,000,000,000 rows"),
    (["--num-beams", "100000000"], r"sampling 100,000,000 beams of"),
    (["--max-new-tokens", "1000000000", "--num-samples", "4"], r"sampling 4 rows of 1,000,000,\d{3} tokens needs"),
    (["--seed", str(10**20)], r"--seed must be in \[0, 9223372036854775807\], got 100000000000000000000"),
])
def test_sample_sizes_that_cannot_fit_are_one_line(args, match, tmp_path, capsys, monkeypatch):
    import sample
    monkeypatch.setattr(memory, "machine_memory", lambda device="cpu": (2**34, "physical memory"))
    path = ckpt_with(tmp_path)
    assert sample.main(["--ckpt", str(path), "--device", "cpu", "--start", "abc", *args]) == 2
    assert re.search(match, one_error_line(capsys.readouterr().err, "sample.py"))


def test_sample_a_checkpoint_config_too_big_to_build(tmp_path, capsys):
    import sample
    path = ckpt_with(tmp_path, vocab_size=10**12)
    assert sample.main(["--ckpt", str(path), "--device", "cpu"]) == 2
    assert "needs at least" in one_error_line(capsys.readouterr().err, "sample.py")


@pytest.mark.parametrize("args, match", [
    (["--n_layer=1000000"], r"n_layer=1,000,000: the counters trace every block"),
    (["--n_embd=1000000000", "--n_head=1"], r"MLP weight \(4 n_embd, n_embd\) would hold 4\.000e\+18 elements"),
    (["--block_size=1000000000"], r"attention scores .* would hold 1\.200e\+19 elements"),
    (["--batch-size", str(10**21)], r"logits .* would hold 5\.146e\+28 elements"),
    (["--sweep", "/dev/null"], r"--sweep /dev/null: exists and is not a folder"),
])
def test_flops_sizes_are_refused_before_building_anything(args, match, capsys):
    import flops
    t0 = time.perf_counter()
    assert flops.main(args) == 2
    assert re.search(match, one_error_line(capsys.readouterr().err, "flops.py"))
    assert time.perf_counter() - t0 < 2  # nothing was built or traced


# ----------------------------------------------------------------------------------------------------
# Library: a run's outputs replaced only after the new run saved, sweep records, children, file modes

from model.training import outputs, sweep  # noqa: E402
from model.training.checkpoint import atomic_write  # noqa: E402


def old_run(out: Path, with_last: bool = True) -> dict[str, bytes]:
    out.mkdir(parents=True, exist_ok=True)
    files = {"best.pt": b"best", "metrics.jsonl": b'{"step": 1}\n', "loss.png": b"png"}
    if with_last:
        files["last.pt"] = b"last"
    for name, data in files.items():
        (out / name).write_bytes(data)
    return files


def files_in(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}


@pytest.mark.parametrize("with_last", [True, False])
def test_a_replaced_run_comes_back_until_the_new_run_has_saved(tmp_path, with_last):
    out = tmp_path / "run"
    old = old_run(out, with_last)
    for name in outputs.ARTEFACTS:
        if (out / name).exists():
            with pytest.raises(ValueError, match=rf"^{out} already holds a run \(.*{name}.*\); pass --resume"):
                outputs.check_artefacts(out, resume=False, overwrite=False)
    assert sorted(outputs.set_aside(out)) == sorted(old)
    assert files_in(out) == {}
    (out / "metrics.jsonl").write_bytes(b'{"step": 0}\n')  # the new run, killed before its first save
    (out / "best.pt").write_bytes(b"new best")
    assert outputs.recover(out).startswith(f"{out}: put back the previous run's files")
    assert files_in(out) == old and not (out / outputs.REPLACED).exists()
    outputs.set_aside(out)  # again, and this time the new run saves
    (out / "last.pt").write_bytes(b"new last")
    assert outputs.recover(out).startswith(f"removed {out / outputs.REPLACED}")
    assert files_in(out) == {"last.pt": b"new last"}


def test_a_kill_while_setting_aside_loses_nothing(tmp_path, monkeypatch):
    """Killed after moving last.pt (first) and before the rest: the next start puts everything back."""
    out = tmp_path / "run"
    old = old_run(out)
    real = os.replace
    moved = []

    def dying_replace(a, b):
        if Path(b).name == outputs.MANIFEST:
            return real(a, b)
        if moved:
            raise KeyboardInterrupt  # stands in for SIGKILL between two renames
        moved.append(a)
        real(a, b)
    monkeypatch.setattr(outputs.os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        outputs.set_aside(out)
    monkeypatch.setattr(outputs.os, "replace", real)
    assert moved == [out / "last.pt"]
    outputs.recover(out)
    assert files_in(out) == old


def test_results_torn_last_line_and_duplicates_are_dropped_with_notes(tmp_path):
    path = tmp_path / "results.jsonl"
    a, b = {"id": "a", "val_loss": 1.0}, {"id": "b", "val_loss": 2.0}
    path.write_text(json.dumps(a) + "\n" + json.dumps(b) + "\n" + json.dumps({**a, "val_loss": 9.0}) + "\n"
                    + '{"id": "c", "val_lo')
    records, notes = sweep._read_results(path)
    assert records == [a, b]
    assert notes == [f"{path}:3: dropped a second record of run a (first on line 1)",
                     f"{path}:4: dropped a torn last line (a crash while writing it)"]
    sweep.repair_results(path, records)
    sweep.append_result(path, {"id": "c", "val_loss": 3.0})
    with pytest.raises(ValueError, match=rf"^{path}: run b is recorded already$"):
        sweep.append_result(path, {"id": "b", "val_loss": 5.0})
    assert sweep._read_results(path) == ([a, b, {"id": "c", "val_loss": 3.0}], [])
    path.write_text('{"id": "a"}\nnot json\n{"id": "b"}\n')
    with pytest.raises(ValueError, match=rf"^{path}:2: not valid JSON"):
        sweep._read_results(path)


def test_a_child_stops_when_its_parent_is_killed(tmp_path):
    """The parent starts a child with start_child and is killed with SIGKILL: the child gets SIGTERM."""
    code = ("import sys, time, signal\n"
            "from model.training.sweep import start_child\n"
            "child = start_child([sys.executable, '-c', 'import signal, sys, time\\n"
            "signal.signal(signal.SIGTERM, lambda *a: (open(sys.argv[1], \"w\").write(\"term\"), sys.exit(0)))\\n"
            "print(\"ready\", flush=True)\\ntime.sleep(60)', sys.argv[1]], sys.stdout, None)\n"
            "time.sleep(60)\n")
    flag = tmp_path / "flag"
    parent = subprocess.Popen([sys.executable, "-c", code, str(flag)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert parent.stdout.readline().strip() == "ready"
    parent.kill()
    parent.wait()
    wait_for(lambda: flag.exists(), timeout=10)
    assert flag.read_text() == "term"


def test_the_lock_waits_for_its_holder_when_asked(tmp_path):
    out = tmp_path / "run"
    holder = hold_lock(out)
    threading.Timer(0.5, holder.kill).start()
    lock = OutDirLock(out, what="sweep").acquire(wait_s=20)
    assert lock.fd is not None
    lock.release()
    holder.wait()
    holder = hold_lock(out)
    try:
        with pytest.raises(OutDirInUseError, match=rf"^{out} is in use by another sweep"):
            OutDirLock(out, what="sweep").acquire(wait_s=0.3)
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_writes_create_files_as_open_would(tmp_path, umask):
    old = os.umask(umask)
    try:
        save_checkpoint(tiny_state(), tmp_path / "last.pt")
        atomic_write(tmp_path / "metrics.jsonl", lambda f: f.write(b"{}\n"))
        (tmp_path / "plain").write_text("x")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes == {"last.pt": 0o666 & ~umask, "metrics.jsonl": 0o666 & ~umask, "plain": 0o666 & ~umask}


# ----------------------------------------------------------------------------------------------------
# train.py: outputs kept until the new run saved, arguments checked first, stops between micro-batches

def snapshot(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in Path(out).iterdir() if p.is_file() and p.name != LOCK_NAME}


@pytest.mark.parametrize("keep", [("best.pt", "metrics.jsonl"), ("metrics.jsonl",), ("best.pt",)])
def test_a_folder_with_any_run_artefact_needs_resume_or_overwrite(keep, dataset, tmp_path, capsys):
    out = tmp_path / "run"
    train_mod.train(*configs(dataset, out, max_iters=3))
    for name in {"last.pt", "best.pt", "metrics.jsonl"} - set(keep):
        (out / name).unlink()
    before = snapshot(out)
    capsys.readouterr()
    assert train_mod.main(cli_args(dataset, out, max_iters=10)) == 2
    assert f"{out} already holds a run ({', '.join(keep)}); pass --resume" in one_error_line(capsys.readouterr().err)
    assert snapshot(out) == before


def test_overwrite_checks_every_argument_before_touching_the_old_run(dataset, tmp_path, capsys):
    out = tmp_path / "run"
    train_mod.train(*configs(dataset, out, max_iters=3))
    before = snapshot(out)
    capsys.readouterr()
    assert train_mod.main(cli_args(dataset, out, overwrite=True, peak_flops=1e-320)) == 2
    assert "peak" in one_error_line(capsys.readouterr().err)
    assert snapshot(out) == before


KILL_AT_FIRST_SAVE = ("import os, runpy, sys, torch\n"
                      "torch.save = lambda *a, **k: os._exit(9)  # SIGKILL's stand-in, at the new run's first save\n"
                      "sys.argv = ['train.py', *sys.argv[1:]]\n"
                      "runpy.run_path('train.py', run_name='__main__')\n")


def test_overwrite_killed_before_its_first_save_keeps_the_old_run(dataset, tmp_path, capsys):
    out = tmp_path / "run"
    train_mod.train(*configs(dataset, out, max_iters=4, eval_interval=2))
    old = records(out)
    killed = subprocess.run([sys.executable, "-c", KILL_AT_FIRST_SAVE, *cli_args(dataset, out, overwrite=True,
                                                                                  max_iters=3)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert killed.returncode == 9, killed.stderr[-2000:]
    capsys.readouterr()
    assert train_mod.main(cli_args(dataset, out, resume=True, max_iters=6, eval_interval=2)) == 0
    err = capsys.readouterr().err
    assert f"{out}: put back the previous run's files" in err
    now = records(out)
    assert now[:len(old)] == old and now[len(old)]["step"] == 5  # the old run continued from its step 4


def test_a_metrics_record_without_its_loss_is_refused_on_resume(dataset, tmp_path, capsys):
    out = tmp_path / "run"
    train_mod.train(*configs(dataset, out, max_iters=3, eval_interval=3))
    lines = (out / "metrics.jsonl").read_text().splitlines()
    for i, key in ((1, "loss"), (0, "val_loss")):
        bad = list(lines)
        rec = json.loads(bad[i])
        assert key in rec
        del rec[key]
        bad[i] = json.dumps(rec)
        (out / "metrics.jsonl").write_text("\n".join(bad) + "\n")
        capsys.readouterr()
        # a longer max_iters: resuming a finished run trains nothing and reads no metrics
        assert train_mod.main(cli_args(dataset, out, resume=True, max_iters=5, eval_interval=3)) == 2
        *notes, line = capsys.readouterr().err.splitlines()  # resume's lines on the changed max_iters, the error
        assert all(n.startswith("resume: ") for n in notes) and line.startswith("train.py: error: ")
        assert f"{out / 'metrics.jsonl'}:{i + 1}: " in line and f"'{key}'" in line


def test_a_signal_between_micro_batches_stops_without_a_partial_step_and_resumes_bit_exact(dataset, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    model_cfg, cfg = configs(dataset, straight, max_iters=4, eval_interval=2, grad_accum=3)
    train_mod.train(model_cfg, cfg)
    flag, calls = {}, {"n": 0}

    def signal_mid_step(module, args, output):  # after the 2nd micro-batch of step 3 (training forwards only)
        if isinstance(module, GPT) and module.training:
            calls["n"] += 1
            if calls["n"] == 2 * 3 + 2:
                flag["signal"] = "SIGTERM"
    hook = torch.nn.modules.module.register_module_forward_hook(signal_mid_step)
    try:
        with pytest.raises(train_mod.TrainingStopped, match=r"SIGTERM received: stopped after step 2"):
            train_mod.train(model_cfg, replace(cfg, out_dir=str(split)), stop_flag=flag)
    finally:
        hook.remove()
    assert calls["n"] == 8 and load_checkpoint(split / "last.pt")["step"] == 2
    train_mod.train(model_cfg, replace(cfg, out_dir=str(split), resume=True))
    keys = ("kind", "step", "loss", "lr", "grad_norm", "train_loss", "val_loss")
    same = [[{k: r[k] for k in keys if k in r} for r in records(d)] for d in (split, straight)]
    assert same[0] == same[1]
    assert same_weights(split / "last.pt", straight / "last.pt")


@pytest.mark.slow  # a fresh interpreter importing torch
def test_a_huge_grad_accum_stops_promptly_on_sigterm(dataset, tmp_path):
    out = tmp_path / "run"
    proc = start_training(dataset, out, "--grad_accum=1000000000")
    try:
        wait_for(lambda: (out / "last.pt").exists(), timeout=120)  # the step-0 evaluation saved: now in step 1
        time.sleep(0.5)
        t0 = time.time()
        proc.send_signal(signal.SIGTERM)
        err = proc.communicate(timeout=60)[1]
    finally:
        proc.kill()
    assert proc.returncode == 143 and time.time() - t0 < 30, err[-2000:]
    assert "stopped after step 0" in err and load_checkpoint(out / "last.pt")["step"] == 0


@pytest.mark.slow  # a fresh interpreter importing torch
def test_sigint_before_the_handlers_are_installed_prints_no_traceback(dataset, tmp_path):
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *cli_args(dataset, tmp_path / "o")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        time.sleep(0.5)  # still importing torch
        proc.send_signal(signal.SIGINT)
        err = proc.communicate(timeout=60)[1]
    finally:
        proc.kill()
    assert proc.returncode in (130, -signal.SIGINT) and "Traceback" not in err and "KeyboardInterrupt" not in err, err


# ----------------------------------------------------------------------------------------------------
# scaling.py: one sweep per folder, records unique, torn lines, children stopped with the sweep, bad --out

import scaling  # noqa: E402

TINY_SWEEP = [str(ROOT / "configs" / "scaling_tiny.toml"), "--budgets", "3e9,1e10", "--sizes", "3"]


def test_one_sweep_per_out(dataset, tmp_path, capsys):
    out = tmp_path / "sw"
    holder = hold_lock(out)
    try:
        assert scaling.main([*TINY_SWEEP, f"--dataset={dataset}", "--out", str(out)]) == 2
    finally:
        holder.kill()
        holder.wait()
    assert f"{out} is in use by another sweep (pid {holder.pid} holds" in \
        one_error_line(capsys.readouterr().err, "scaling.py")
    assert not (out / "points").exists()


@pytest.mark.parametrize("out", ["/dev/null", "/sys", "/sys/flopgpt-sweep"])
def test_a_bad_sweep_out_is_one_line(out, dataset, capsys):
    assert scaling.main([*TINY_SWEEP, f"--dataset={dataset}", "--out", out]) == 2
    assert out in one_error_line(capsys.readouterr().err, "scaling.py")


def sweep_records(budgets=(1e9, 1e10), sizes=5) -> list[dict]:
    """Records shaped like a sweep's, losses on a parabola in log N per budget."""
    recs = []
    for b in budgets:
        for i in range(sizes):
            n = 1e5 * 2 ** i * b / 1e9
            recs.append({"id": f"b{b:.0e}-{i}", "budget": b, "params": int(n), "params_nonembedding": int(n * 0.8),
                         "tokens": int(b / (6 * n)), "flops": int(b), "flops_6nd": int(b),
                         "val_loss": 2 + 0.1 * (math.log10(n) - math.log10(4e5 * b / 1e9)) ** 2 - 0.05 * math.log10(b),
                         "n_layer": i + 1, "n_embd": 8 * (i + 1)})
    return recs


@pytest.mark.parametrize("method", [[], ["--method", "parametric", "--bootstrap", "20"]])
def test_fit_drops_a_torn_last_line_and_duplicate_records_with_a_note(tmp_path, capsys, method):
    path = tmp_path / "results.jsonl"
    recs = sweep_records()
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert scaling.main(["--fit", str(path), *method, "--json", "--out", str(tmp_path / "a")]) == 0
    clean = json.loads(capsys.readouterr().out)
    path.write_text("".join(json.dumps(r) + "\n" for r in recs) + json.dumps({**recs[2], "val_loss": 9.0}) + "\n"
                    + json.dumps(recs[3])[:40])
    assert scaling.main(["--fit", str(path), *method, "--json", "--out", str(tmp_path / "b")]) == 0
    out = capsys.readouterr()
    got = json.loads(out.out)
    for key in ("elapsed_s", "seconds", "out", "files", "pictures"):
        clean.pop(key, None), got.pop(key, None)
    assert got == clean
    assert f"{path}:{len(recs) + 1}: dropped a second record of run {recs[2]['id']}" in out.err
    assert f"{path}:{len(recs) + 2}: dropped a torn last line" in out.err


def alive(pid: int) -> bool:
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()  # a zombie has ended
    except FileNotFoundError:
        return False


@pytest.mark.slow  # a sweep process and its train.py child
def test_killing_a_sweep_stops_its_training_child(dataset, tmp_path):
    out = tmp_path / "sw"
    sweep_proc = subprocess.Popen([sys.executable, str(ROOT / "scaling.py"), *TINY_SWEEP, f"--dataset={dataset}",
                                   "--out", str(out)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def child_pid() -> int | None:  # the train.py holding a point's lock (the sweep takes it a moment first)
        for lock in out.glob(f"points/*/{LOCK_NAME}"):
            text = lock.read_text().strip()
            if text.isdigit() and int(text) != sweep_proc.pid:
                return int(text)
        return None
    try:
        wait_for(lambda: child_pid() is not None, timeout=180)
        pid = child_pid()
    finally:
        sweep_proc.kill()
        sweep_proc.wait()
    wait_for(lambda: not alive(pid), timeout=120)  # SIGTERM from the kernel: it saves and exits
    OutDirLock(next(out.glob(f"points/*/{LOCK_NAME}")).parent).acquire(wait_s=30).release()  # free for a rerun


def test_a_metrics_record_that_cannot_be_written_names_the_file(tmp_path):
    from model.training.metrics import write_record

    class FullDisk:
        name = str(tmp_path / "metrics.jsonl")

        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(OSError, match=rf"^\[Errno 28\] could not write metrics file {tmp_path / 'metrics.jsonl'}: "
                                      r"No space left on device$"):
        write_record(FullDisk(), {"step": 1, "loss": 1.0})
