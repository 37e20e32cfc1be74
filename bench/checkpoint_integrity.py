"""What the checkpoint integrity checks cost, on a GPT-2 124M-sized state (weights + AdamW moments, 1.5 GB).

    python bench/checkpoint_integrity.py [--repeats 3] [--dir /tmp]

Side by side in one run, best of --repeats each: a plain atomic save (torch.save, fsync, rename) and
save_checkpoint (plus its finite check and the sha256 digests); torch.load alone, with every member's CRC-32
(what a file without a digest gets) and load_checkpoint (the pickle's CRC, then the digests). Prints seconds
and ratios to the plain save and the plain load.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model import GPT, GPTConfig  # noqa: E402
from model.gpt.integrity import check_digest, verify_archive, with_digest  # noqa: E402
from model.training.checkpoint import (atomic_write, load_checkpoint, non_finite_tensor,  # noqa: E402
                                       save_checkpoint)

GPT2 = GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768)


def state() -> dict:
    torch.manual_seed(0)
    model = GPT(GPT2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()
    return {"format": "flopgpt-2", "step": 1, "model": model.state_dict(), "model_config": dict(GPT2.__dict__),
            "optimizer": opt.state_dict()}


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    s = state()
    tensors = [*s["model"].values(), *(v for st in s["optimizer"]["state"].values() for v in st.values())]
    nbytes = sum({t.data_ptr(): t.numel() * t.element_size() for t in tensors}.values())  # tied head once
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        plain, checked = Path(d) / "plain.pt", Path(d) / "checked.pt"
        rows = [("save: torch.save + fsync + rename", best(lambda: atomic_write(plain, lambda f: torch.save(s, f)),
                                                           args.repeats)),
                ("save: save_checkpoint (finite check + digests)", best(lambda: save_checkpoint(s, checked),
                                                                         args.repeats)),
                ("  of which the finite check alone", best(lambda: non_finite_tensor(s), args.repeats)),
                ("  of which the sha256 digests alone", best(lambda: with_digest(s), args.repeats))]
        loaded = load_checkpoint(checked)
        rows += [("load: torch.load", best(lambda: torch.load(plain, weights_only=True), args.repeats)),
                 ("load: + every member's CRC-32 (no digest)", best(lambda: (verify_archive(checked),
                                                                             torch.load(checked, weights_only=True)),
                                                                    args.repeats)),
                 ("load: load_checkpoint (pickle CRC + digests)", best(lambda: load_checkpoint(checked),
                                                                        args.repeats)),
                 ("  of which the digest check alone", best(lambda: check_digest(loaded, checked), args.repeats))]
        size = checked.stat().st_size
    print(f"GPT-2 124M state: {nbytes / 1e9:.2f} GB of tensors, file {size / 1e9:.2f} GB; best of {args.repeats}; "
          f"{torch.get_num_threads()} threads")
    base = {"save": rows[0][1], "load": rows[4][1]}
    for i, (name, sec) in enumerate(rows):
        kind = "save" if i < 4 else "load"
        print(f"{name:<46} {sec:7.2f} s  {sec / base[kind]:5.2f}x")


if __name__ == "__main__":
    main()
