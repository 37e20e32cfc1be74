"""Checkpoint files read safely: every byte that decides what loads is checked, and every way a damaged file
fails is one error naming it.

    CRC-32     the zip archive torch.save writes records a CRC per member (torch.load checks none). The
               pickle's is checked before unpickling it: it says what to allocate and read. The CRCs cover
               the members' bytes, not the headers that say how to read them: a flipped bit in the central
               directory can make a member load as zeros with every CRC intact.
    digests    flopgpt checkpoints carry `digest`: the sha256 of every tensor's dtype, shape and bytes, and
               one of everything else (the metadata: numbers, strings, the nesting and the tensors' places),
               computed when saving and checked against what actually loaded. Whatever a damaged header
               makes the reader do, a tensor or a value that differs from the saved one is refused. A file
               without a digest (nanoGPT's, Hugging Face's .bin, flopgpt-1) has every member's CRC checked.

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


def verify_archive(path: str | Path, only: str | None = None) -> None:
    """Check the members of a torch zip archive (those whose name ends with `only`, else all) against their
    CRC-32; any failure, whatever the zip reader raised (BadZipFile, NotImplementedError for a flag that
    claims encryption, ...), is one CorruptCheckpointError naming the file and, for a CRC mismatch, the
    member."""
    name = "?"
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                name = info.filename
                if only is None or name.endswith(only):
                    with archive.open(info) as member:
                        while member.read(1 << 24):
                            pass
    except zipfile.BadZipFile as e:
        if str(e).startswith("Bad CRC-32"):
            raise CorruptCheckpointError(f"{path}: corrupt checkpoint: {name} fails its CRC-32 check") from None
        raise CorruptCheckpointError(f"{path}: corrupt checkpoint (BadZipFile: {_line(e)})") from None
    except Exception as e:  # a damaged header can send the reader down any of its error paths
        raise CorruptCheckpointError(f"{path}: corrupt checkpoint ({type(e).__name__}: {_line(e)})") from None


def read_checkpoint(path: str | Path, map_location: Any = "cpu", zip_only: bool = True) -> Any:
    """torch.load(path, weights_only=True) after checking the pickle's CRC, then the digest against what
    loaded, or, in a file without one, every member's CRC. zip_only: refuse torch's legacy non-zip format
    (which has no CRCs)."""
    path = Path(path)
    try:
        is_zip = zipfile.is_zipfile(path)
    except OSError as e:
        raise CorruptCheckpointError(f"{path}: cannot be read ({_line(e)})") from None
    if is_zip:  # the pickle first: it says what to allocate and read
        verify_archive(path, only="/data.pkl")
    elif zip_only:
        raise CorruptCheckpointError(f"{path}: corrupt checkpoint (not a torch zip archive: torn or foreign)")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise CorruptCheckpointError(f"{path}: corrupt checkpoint (UnpicklingError: {_line(e)})") from None
        culprit = re.search(r"GLOBAL (\S+)", str(e))
        raise ValueError(f"{path}: refusing to load: the file holds pickled objects, not only tensors and "
                         f"plain data ({culprit.group(1) if culprit else 'unsupported object'})") from None
    except Exception as e:  # the loader raises many types on damaged data: all mean the same to the user
        raise CorruptCheckpointError(f"{path}: corrupt checkpoint ({type(e).__name__}: {_line(e)})") from None
    if isinstance(obj, dict) and DIGEST_KEY in obj:
        check_digest(obj, path)  # every tensor and value as loaded: covers what the CRCs cover and more
    elif is_zip:
        verify_archive(path)  # no digest (another program's file, flopgpt-1): the CRCs are all there is
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


def _key(t: torch.Tensor) -> tuple:
    return t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride()


def _digests(state: dict) -> tuple[str, list[str], list[str]]:
    """(metadata sha256, tensor names, tensor sha256s) of a state without its digest."""
    tensors: list[tuple[str, torch.Tensor]] = []
    skeleton = _walk({k: v for k, v in state.items() if k != DIGEST_KEY}, "", tensors)
    unique = {_key(t): t for _, t in tensors}  # a tied weight (lm_head is wte) is hashed once
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        done = dict(zip(unique, pool.map(_tensor_sha256, unique.values())))
    sums = [done[_key(t)] for _, t in tensors]
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
