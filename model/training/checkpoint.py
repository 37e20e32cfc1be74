"""Checkpoints: atomic writes of finite states only, verified `weights_only` loads, and everything a
bit-exact resume needs.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts (no pickled classes), so it loads
with `torch.load(weights_only=True)`:
    format, step, best_val_loss, model (state dict, clean names), model_config, train_config,
    optimizer, rng {torch, cuda, numpy, python}, batches (sampler state), meta (tokenizer), dataset
"""
from __future__ import annotations

import errno
import glob
import os
import random
import re
import secrets
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..config import GPTConfig
from ..gpt.gpt import GPT
from ..gpt.integrity import DIGEST_KEY, CorruptCheckpointError, read_checkpoint, verify_archive, with_digest
from .memory import check_fits, weights_bytes

FORMAT = "flopgpt-2"  # with a digest of every tensor and of the metadata (model/gpt/integrity.py)
FORMATS = ("flopgpt-1", FORMAT)  # flopgpt-1: the same keys, no digest (CRC-checked only)


class NonFiniteStateError(ValueError):
    """A state to be saved holds NaN or infinite weights or optimizer moments: saving it would replace the
    last good checkpoint with one that cannot train."""


def non_finite_tensor(state: dict[str, Any]) -> str | None:
    """The name of the first floating-point tensor in state["model"] or state["optimizer"] holding a NaN or
    an infinity, else None."""
    def walk(obj, name):
        if isinstance(obj, torch.Tensor):
            # a finite sum proves every element finite (an inf or a NaN makes it inf or NaN) and costs a
            # twentieth of isfinite on the CPU; only a sum that overflowed needs the element-wise check
            finite = not obj.is_floating_point() or bool(torch.isfinite(obj.sum())) or bool(torch.isfinite(obj).all())
            return None if finite else name
        items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
        for k, v in items:
            found = walk(v, f"{name}.{k}")
            if found:
                return found
        return None
    return walk(state.get("model", {}), "model") or walk(state.get("optimizer", {}), "optimizer")


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write `state` to `path` atomically (see atomic_write); a state with non-finite weights or optimizer
    moments is refused (NonFiniteStateError) and the previous file kept."""
    path = Path(path)
    bad = non_finite_tensor(state)
    if bad is not None:
        raise NonFiniteStateError(f"not saving {path}: {bad} holds NaN or infinite values")
    state = with_digest(state)
    return atomic_write(path, lambda f: torch.save(state, f), what="checkpoint")


def atomic_write(path: str | Path, write: Callable[[Any], None], what: str = "file",
                 pause_env: str | None = None) -> Path:
    """Call write(binary file) on a temp file in path's folder, fsync, rename over `path`, fsync the folder.

    A process killed at any moment leaves either the previous file or the new one, never a torn file. A
    failed write (a full disk) is an OSError naming the file, the previous one kept. pause_env names an
    environment variable holding seconds to wait before the rename (tests kill the process there)."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, f"{what} path {path} is a directory, not a file")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(path)
    try:
        fd, tmp = _create_temp(path)
    except OSError as e:  # a read-only folder, a full inode table
        raise _write_error(path, e, what) from e
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if pause_env and os.environ.get(pause_env):
            time.sleep(float(os.environ[pause_env]))
        os.replace(tmp, path)
    except Exception as e:
        Path(tmp).unlink(missing_ok=True)
        raise _write_error(path, e, what) from e
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)
    return path


def _create_temp(path: Path) -> tuple[int, str]:
    """A new file beside path, created with mode 0666 less the user's umask, as open() would create path
    itself (tempfile's are 0600). The writer's pid in the name lets a later save tell a dead writer's
    leftover from a live writer's file."""
    while True:
        tmp = str(path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue


def _write_error(path: Path, e: Exception, what: str) -> OSError:
    """One OSError for every way a write fails; torch's zip writer reports a full disk as a RuntimeError
    ("unexpected pos"), so a nearly full disk is named as the likely cause."""
    code = getattr(e, "errno", None)
    free = shutil.disk_usage(path.parent).free
    if code == errno.ENOSPC or (code is None and free < (64 << 20)):
        code, reason = errno.ENOSPC, f"no space left on the device ({free:,} bytes free)"
    else:
        reason = getattr(e, "strerror", None) or str(e).strip().splitlines()[-1]
    kept = f"; the previous {path.name} is kept" if path.is_file() else ""
    return OSError(code or errno.EIO, f"could not write {what} {path}: {reason}{kept}")


def remove_stale_temp_files(path: str | Path) -> list[Path]:
    """Delete temp files that a killed save of `path` left behind (a writer killed with SIGKILL cannot clean
    up). Only files whose writer process no longer exists go; returns what was deleted."""
    path = Path(path)
    gone = []
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(\d+)\..*\.tmp$")
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        m = pattern.match(tmp.name)
        if m is None or process_exists(int(m.group(1))):
            continue
        try:
            tmp.unlink()
            gone.append(tmp)
        except FileNotFoundError:  # another process removed it first
            pass
    return gone


def process_exists(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)  # signal 0: existence and permission check only
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # exists (someone else's), or cannot tell: keep the file
    return True


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint dict safely after verifying its integrity (model/gpt/integrity.py: the archive's
    CRCs, then the digests of every tensor and of the metadata against what loaded); every failure is a
    ValueError (CorruptCheckpointError for damage) or FileNotFoundError naming the file."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"checkpoint path {path} is a directory, not a checkpoint file")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    ckpt = read_checkpoint(path, map_location)
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise ValueError(f"{path}: not a checkpoint (expected a dict with a 'model' state dict)")
    if ckpt.get("format") == FORMAT and DIGEST_KEY not in ckpt:
        raise CorruptCheckpointError(f"{path}: corrupt checkpoint: a {FORMAT} checkpoint without its digest")
    return ckpt


def clean_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop torch.compile's and DDP's wrapper prefixes so names match the plain GPT."""
    out = {}
    for k, v in state.items():
        while k.startswith(("_orig_mod.", "module.")):  # any nesting order: DDP(compile(m)), compile(DDP(m))
            k = k.split(".", 1)[1]
        out[k] = v
    return out


def model_from_checkpoint(ckpt: dict[str, Any], path: str | Path = "<checkpoint>",
                          device: str | torch.device = "cpu") -> GPT:
    """Rebuild the GPT a flopgpt checkpoint describes and load its weights."""
    try:
        config = GPTConfig(**ckpt["model_config"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: invalid or missing model_config ({e})") from None
    check_fits(weights_bytes(config), f"the model of {path}", device)
    model = GPT(config)
    load_weights(model, ckpt["model"], path)
    return model.to(device)


def load_weights(model: GPT, state: dict[str, torch.Tensor], path: str | Path = "<checkpoint>") -> None:
    """Load a state dict strictly; a config/weights mismatch is a ValueError naming the file and tensor."""
    state = clean_state_dict(state)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match the model config (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    for k, v in state.items():
        if v.shape != own[k].shape:
            raise ValueError(f"{path}: {k} has shape {tuple(v.shape)}, the config expects {tuple(own[k].shape)}")
    model.load_state_dict(state)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, dict[str, Any]]:
    """(model in eval mode, info) from a flopgpt checkpoint; info has meta, dataset, step, configs."""
    ckpt = load_checkpoint(path, map_location="cpu")
    if ckpt.get("format") not in FORMATS:
        raise ValueError(f"{path}: not a flopgpt checkpoint (format {ckpt.get('format')!r}); "
                         f"for nanoGPT or Hugging Face weights use GPT.from_pretrained")
    model = model_from_checkpoint(ckpt, path, device).eval()
    info = {k: ckpt.get(k) for k in ("meta", "dataset", "step", "best_val_loss", "model_config", "train_config")}
    return model, info


# ----------------------------------------------------------------------------------------------------
# RNG state: everything random in a run, so a resumed run draws the same numbers.

def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state(legacy=False)
    np_state["state"] = {"key": np_state["state"]["key"].tolist(), "pos": np_state["state"]["pos"]}  # no ndarrays
    state = {"torch": torch.get_rng_state(), "numpy": np_state, "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np_state = dict(state["numpy"])
    np_state["state"] = {"key": np.array(np_state["state"]["key"], dtype=np.uint32), "pos": np_state["state"]["pos"]}
    np.random.set_state(np_state)
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))  # lists after a round trip through the loader
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
