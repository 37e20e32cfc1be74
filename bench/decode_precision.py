"""How far bf16 decoding strays from fp32: greedy-token agreement and the largest logit difference.

    python bench/decode_precision.py                     # GPT-2 124M-shaped, random weights, 1,000 positions
    python bench/decode_precision.py --ckpt out/default   # a trained flopgpt checkpoint (or --hf FOLDER)

Teacher-forced: one sequence of --tokens + 1 token ids (uniformly random, seeded) runs through the model in
fp32 and through a bf16 copy (weights, activations and KV cache in bf16: the function `dtype="bfloat16"`
decodes with; logits compared in fp32); at each of the --tokens positions the greedy (argmax) tokens are
compared, and the logits' largest absolute difference and the fp32 logits' spread are reported. Where
kernels="avx512" runs (model/gpt/cpu_decode.py), a second line does the same for bf16 decoding steps through
its step: one token per step through the KV cache, as generate runs them, with bf16 weights and cache but fp32
activations.
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="decode_precision.py", description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--ckpt", help="flopgpt checkpoint or train.py out_dir (default: GPT-2 124M-shaped, random)")
    src.add_argument("--hf", help="local Hugging Face GPT-2 folder")
    p.add_argument("--tokens", type=int, default=1000, help="positions compared (default 1000)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    import torch

    from model import GPT, GPTConfig
    torch.manual_seed(args.seed)
    if args.ckpt or args.hf:
        model = GPT.from_pretrained(args.ckpt or args.hf)
    else:
        model = GPT(GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768)).eval()
    cfg = model.config
    n = args.tokens
    if not 1 <= n < cfg.block_size:
        print(f"decode_precision.py: error: --tokens must be in [1, {cfg.block_size - 1}], got {n}", file=sys.stderr)
        return 2
    idx = torch.randint(0, cfg.vocab_size, (1, n), generator=torch.Generator().manual_seed(args.seed))  # (1, n)
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    with torch.inference_mode():
        ref = model(idx)[0][0]  # (n, V) fp32
        low = bf16(idx)[0][0].float()  # (n, V)
    top2 = ref.topk(2, dim=-1).values  # (n, 2)
    gap = (top2[:, 0] - top2[:, 1]).median().item()
    print(f"{cfg.n_layer} layers x {cfg.n_embd}, vocab {cfg.vocab_size}, "
          f"{'weights from ' + (args.ckpt or args.hf) if (args.ckpt or args.hf) else 'random weights'}; "
          f"{n} positions, teacher-forced (fp32 logits: std {ref.std().item():.3f}, median top-1 - top-2 gap "
          f"{gap:.4f})")
    report("bf16 forward", ref, low)
    from model.gpt.cpu_decode import unavailable
    reason = unavailable(torch.bfloat16)
    if reason is None:
        report("bf16 decoding steps, kernels='avx512'", ref, stepped(model, idx, torch.bfloat16, "avx512"))
    else:
        print(f"bf16 decoding steps, kernels='avx512': skipped, {reason}")
    return 0


def stepped(model, idx, dtype, kernels):
    """(n, V) float32 logits of decoding idx (1, n) one token per step through the KV cache."""
    import torch

    from model.gpt.decode import Decoder
    dec = Decoder(model, dtype, kernels)
    cache = dec.new_cache(1, idx.size(1))
    with torch.inference_mode():
        return torch.cat([dec(idx[:, t:t + 1], cache) for t in range(idx.size(1))])  # (n, V)


def report(name, ref, low) -> None:
    agree = (ref.argmax(-1) == low.argmax(-1)).float().mean().item()
    diff = (ref - low).abs().max().item()
    print(f"{name}: greedy tokens equal to fp32's: {agree:.1%}; largest |logit difference| {diff:.4f}")


if __name__ == "__main__":
    sys.exit(main())
