"""Nothing lost under faults: checkpoint integrity and finite-only saves, full disks, the out_dir lock,
memory estimates refused before allocation (the CLI-level faults are further down)."""
import errno
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import model.training.checkpoint as checkpoint
import model.training.memory as memory
from model import GPT, GPTConfig
from model.training.checkpoint import (NonFiniteStateError, load_checkpoint, model_from_checkpoint, save_checkpoint,
                                       verify_archive)
from model.training.lock import LOCK_NAME, OutDirInUseError, OutDirLock, check_out_dir

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
    with pytest.raises(ValueError, match=rf"^{path}: corrupt checkpoint: archive/data/0 fails its CRC-32 check$"):
        load_checkpoint(path)


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
                                                 bias=False, pos_encoding="sinusoidal")], ids=["learned", "sinusoidal"])
def test_param_count_matches_the_built_model(cfg):
    assert memory.param_count(cfg) == GPT(cfg).num_params()


def test_training_estimate_by_hand_and_refusal_names_the_figures(monkeypatch):
    cfg = GPTConfig(vocab_size=100, block_size=32, n_layer=2, n_head=2, n_embd=16)
    n = GPT(cfg).num_params()
    parts = memory.training_bytes(cfg, batch_size=4)
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
        memory.check_fits(memory.training_bytes(huge, 12), "training")
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
