"""Checkpoint files read safely: every byte that decides what loads is checked, and every way a damaged file
fails is one error naming it.

Two checks, both on every load:
    CRC-32     every member of the zip archive torch.save writes, against the CRC its headers record
               (torch.load checks none). This covers the members' bytes, not the headers that say how to
               read them: a flipped bit in the central directory can make a member load as zeros.
    digests    flopgpt checkpoints carry `digest`: the sha256 of every tensor's dtype, shape and bytes and
               one of everything else (the metadata: numbers, strings, the nesting and the tensors' places),
               computed when saving and checked against what was actually loaded. Whatever a damaged header
               makes the reader do, a tensor or a value that differs from the saved one is refused.

So a flipped bit anywhere either changes nothing that loads, or is refused as one CorruptCheckpointError.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import re
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

DIGEST_KEY = "digest"


class CorruptCheckpointError(ValueError):
    """A checkpoint file that is damaged (flipped bits, torn copy) or not a checkpoint at all."""


def verify_archive(path: str | Path) -> None:
    """Check every member of a torch zip archive against its CRC-32; any failure, whatever the zip reader
    raised (BadZipFile, NotImplementedError for a flag that claims encryption, ...), is one
    CorruptCheckpointError naming the file and, for a CRC mismatch, the member."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except Exception as e:  # a damaged header can send the reader down any of its error paths
        raise CorruptCheckpointError(f"{path}: corrupt checkpoint ({type(e).__name__}: {_line(e)})") from None
    if bad is not None:
        raise CorruptCheckpointError(f"{path}: corrupt checkpoint: {bad} fails its CRC-32 check")


def read_checkpoint(path: str | Path, map_location: Any = "cpu", zip_only: bool = True) -> Any:
    """torch.load(path, weights_only=True) after verify_archive, with the digest (when the file has one)
    checked against what loaded. zip_only: refuse torch's legacy non-zip format (which has no CRCs)."""
    path = Path(path)
    try:
        is_zip = zipfile.is_zipfile(path)
    except OSError as e:
        raise CorruptCheckpointError(f"{path}: cannot be read ({_line(e)})") from None
    if is_zip:
        verify_archive(path)
    elif zip_only:
        raise CorruptCheckpointError(f"{path}: truncated or corrupt checkpoint (not a torch zip archive)")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise CorruptCheckpointError(f"{path}: truncated or corrupt checkpoint ({_line(e)})") from None
        culprit = re.search(r"GLOBAL (\S+)", str(e))
        raise ValueError(f"{path}: refusing to load: the file holds pickled objects, not only tensors and "
                         f"plain data ({culprit.group(1) if culprit else 'unsupported object'})") from None
    except Exception as e:  # the loader raises many types on damaged data: all mean the same to the user
        raise CorruptCheckpointError(f"{path}: truncated or corrupt checkpoint ({type(e).__name__}: "
                                     f"{_line(e)})") from None
    if isinstance(obj, dict) and DIGEST_KEY in obj:
        check_digest(obj, path)
    return obj


def _line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[-1] if text else type(e).__name__


# ----------------------------------------------------------------------------------------------------
# Digests

def _walk(obj: Any, name: str, tensors: list[tuple[str, torch.Tensor]]) -> str:
    """A canonical text of obj with each tensor replaced by its dtype and shape (its bytes are digested on
    their own); tensors collects (name, tensor) in order. Lists and tuples read alike (a loader may turn
    one into the other); a type the digest does not know is a ValueError, never silently skipped."""
    if isinstance(obj, torch.Tensor):
        tensors.append((name, obj))
        return f"tensor({obj.dtype},{tuple(obj.shape)})"
    if isinstance(obj, dict):
        return "{" + ",".join(f"{_walk(k, name, [])}:{_walk(v, f'{name}.{k}', tensors)}"
                              for k, v in obj.items()) + "}"
    if isinstance(obj, (list, tuple)):
        return "[" + ",".join(_walk(v, f"{name}.{i}", tensors) for i, v in enumerate(obj)) + "]"
    if obj is None or isinstance(obj, (bool, int, float, str, bytes)):
        return f"{type(obj).__name__}:{obj!r}"
    raise ValueError(f"{name}: a {type(obj).__name__} cannot be digested (checkpoints hold tensors and plain data)")


def _tensor_sha256(t: torch.Tensor) -> str:
    data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()  # (nbytes,) no copy on CPU
    return hashlib.sha256(data).hexdigest()  # hashlib releases the GIL: tensors hash in parallel


def _digests(state: dict) -> tuple[str, list[str], list[str]]:
    """(metadata sha256, tensor names, tensor sha256s) of a state without its digest."""
    tensors: list[tuple[str, torch.Tensor]] = []
    skeleton = _walk({k: v for k, v in state.items() if k != DIGEST_KEY}, "", tensors)
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        sums = list(pool.map(_tensor_sha256, (t for _, t in tensors)))
    return hashlib.sha256(skeleton.encode()).hexdigest(), [n.lstrip(".") for n, _ in tensors], sums


def with_digest(state: dict) -> dict:
    """state plus its digest: {"metadata": sha256, "tensors": [sha256 of each tensor, in walk order]}."""
    meta, _, sums = _digests(state)
    return {**state, DIGEST_KEY: {"metadata": meta, "tensors": sums}}


def check_digest(state: dict, path: str | Path) -> None:
    """CorruptCheckpointError naming the file and the first tensor (or the metadata) whose digest differs."""
    stored = state[DIGEST_KEY]
    meta, names, sums = _digests(state)
    if not isinstance(stored, dict) or stored.get("metadata") != meta or not isinstance(stored.get("tensors"), list) \
            or len(stored["tensors"]) != len(sums):
        raise CorruptCheckpointError(f"{path}: corrupt checkpoint: its metadata does not match its sha256 digest")
    bad = next((n for n, a, b in zip(names, sums, stored["tensors"]) if a != b), None)
    if bad is not None:
        raise CorruptCheckpointError(f"{path}: corrupt checkpoint: {bad} does not match its sha256 digest")
