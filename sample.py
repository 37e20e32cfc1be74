"""Sample text from a trained checkpoint or a local Hugging Face GPT-2 folder.

    python sample.py                                   # out/default/best.pt (else last.pt), 3 samples
    python sample.py --start "def " --num-samples 2 --max-new-tokens 200 --temperature 0.7 --top-k 40
    python sample.py --start FILE:prompt.txt --num-beams 4 --num-samples 2
    python sample.py --hf path/to/gpt2 --bpe-file r50k_base.tiktoken --start "Hello" --top-p 0.9 --stream

Samples are printed (prompt included) separated by a line of dashes. Generation of a sample ends at
--max-new-tokens or at the tokenizer's <|endoftext|> token (GPT-2 and models trained on its tokenizer).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from model.cli import OneLineParser, UsageError, report_errors, resolve_device
from model.config import check
from model.training.threads import describe, set_threads, set_wait_policy
from model.training.tokenizer import ENDOFTEXT, StreamPrinter, cut_at_eot, encode_prompt

DEFAULT_OUT_DIR = Path("out/default")  # what `python train.py` writes
SEPARATOR = "-" * 40


def build_parser() -> OneLineParser:
    # each default is written once, as default=; the help text shows it through %(default)s
    p = OneLineParser(prog="sample.py", description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 1)[1],
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--ckpt", metavar="PATH", help="flopgpt checkpoint, or a train.py out_dir (its best.pt, else "
                     "last.pt); default: out/default")
    src.add_argument("--hf", metavar="PATH", help="local Hugging Face GPT-2 folder (config.json + weights)")
    p.add_argument("--start", metavar="TEXT", help='prompt text, or FILE:path to read it from a file; default: "\\n" '
                   'for char models, "<|endoftext|>" for GPT-2 BPE')
    p.add_argument("--num-samples", metavar="N", type=int, default=3, help="samples to draw (default %(default)s)")
    p.add_argument("--max-new-tokens", metavar="N", type=int, default=500,
                   help="tokens per sample (default %(default)s)")
    p.add_argument("--temperature", metavar="T", type=float, default=0.8, help="0 = greedy (default %(default)s)")
    p.add_argument("--top-k", metavar="K", type=int, default=200,
                   help="keep the k most likely tokens; 0 = all (default %(default)s)")
    p.add_argument("--top-p", metavar="P", type=float, default=1.0,
                   help="nucleus sampling: keep the most likely tokens up to this mass, in (0, 1]; 1 = off "
                   "(default %(default)s)")
    p.add_argument("--num-beams", metavar="N", type=int, default=1, help="beam search with this many beams; 1 = "
                   "sampling (default %(default)s); prints the best --num-samples beams")
    p.add_argument("--length-penalty", metavar="A", type=float, default=1.0,
                   help="beam score = log-probability / length ** A (default %(default)s)")
    p.add_argument("--seed", type=int, default=1337, help="seed of the sampling generator (default %(default)s)")
    p.add_argument("--stream", action="store_true",
                   help="print tokens as they are generated (samples one after another; not with beams)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default %(default)s)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="weights and KV cache in this precision, logits in float32; float16 on CUDA only "
                   "(default %(default)s)")
    p.add_argument("--kernels", default="torch", choices=("torch", "avx512"),
                   help="decoding steps through torch's ops, or each as one AVX-512 call on x86 CPUs, nearer the "
                   "memory bandwidth (built on first use; docs/sampling.md) (default %(default)s)")
    p.add_argument("--threads", metavar="N", type=int, default=0,
                   help="CPU threads; 0 = one per core less those other programs keep busy (default %(default)s)")
    p.add_argument("--bpe-file", metavar="PATH", help="GPT-2 ranks file r50k_base.tiktoken, for the GPT-2 "
                   "tokenizer offline; default: tiktoken's download and cache")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    return p


def check_args(args) -> None:
    check("--num-samples", args.num_samples, low=1)
    check("--max-new-tokens", args.max_new_tokens, low=1)
    check("--temperature", args.temperature, float, low=0)
    check("--top-k", args.top_k, low=0)
    check("--top-p", args.top_p, float, low=0, high=1, open_low=True)
    check("--num-beams", args.num_beams, low=1)
    check("--length-penalty", args.length_penalty, float)
    check("--seed", args.seed, low=0, high=2**63 - 1)  # what torch.Generator.manual_seed accepts
    check("--threads", args.threads, low=0)
    if args.num_beams > 1 and args.num_samples > args.num_beams:
        raise UsageError(f"--num-samples {args.num_samples} exceeds --num-beams {args.num_beams} "
                         f"(beam search returns at most one sample per beam)")
    if args.num_beams > 1 and args.stream:
        raise UsageError("--stream works with sampling only: beams are reordered until the search ends")


def load(args, device):
    """(model, tokenizer) from --hf, --ckpt or the default checkpoint."""
    from model import GPT  # torch loads here: --help and usage errors come before it
    from model.gpt.weights import OUT_DIR_CHECKPOINTS, out_dir_checkpoint
    from model.training.checkpoint import load_model
    from model.training.tokenizer import gpt2_tokenizer, load_tokenizer
    if args.hf:
        model = GPT.from_pretrained(args.hf, device=device)
        tokenizer = gpt2_tokenizer(args.bpe_file)
    else:
        path = Path(args.ckpt) if args.ckpt else out_dir_checkpoint(DEFAULT_OUT_DIR)
        if path is not None and path.is_dir():  # a train.py out_dir: its best checkpoint, else its last
            path, given = out_dir_checkpoint(path), path
            if path is None:
                raise FileNotFoundError(f"no checkpoint in directory {given}: best.pt and last.pt not found")
        if path is None:
            tried = " and ".join(str(DEFAULT_OUT_DIR / name) for name in OUT_DIR_CHECKPOINTS)
            raise FileNotFoundError(f"no checkpoint: {tried} not found (train one with `python train.py`, or pass "
                                    f"--ckpt / --hf)")
        model, info = load_model(path, device=device)
        if not isinstance(info.get("meta"), dict):
            raise ValueError(f"{path}: the checkpoint carries no tokenizer metadata ('meta')")
        tokenizer = load_tokenizer(info["meta"], info.get("dataset"), args.bpe_file)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens, the model only "
                         f"{model.config.vocab_size}")
    return model, tokenizer


def prompt_text(args, tokenizer) -> str:
    start = args.start
    if start is None:
        return ENDOFTEXT if tokenizer.eot_token_id is not None else "\n"
    if start.startswith("FILE:"):
        path = Path(start[len("FILE:"):])
        if not path.is_file():
            raise FileNotFoundError(f"--start file not found: {path}")
        try:
            start = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"--start file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not start:
        raise UsageError("the prompt is empty: give --start some text")
    return start


def check_memory(args, config, prompt_len: int, device) -> None:
    """Refuse, before generating, what cannot fit: KV cache, token buffer and logits of every row."""
    from model.training.memory import check_fits, sampling_bytes  # torch
    beams = args.num_beams > 1
    rows = args.num_beams if beams else 1 if args.stream else args.num_samples
    total = prompt_len + args.max_new_tokens
    check_fits(sampling_bytes(config, rows, total, beams=beams),
               f"sampling {rows:,} {'beams' if beams else 'rows'} of {total:,} tokens", device)


def run(args, out=None) -> None:
    import torch

    from model.flops.roofline import decoding_report
    out = sys.stdout if out is None else out
    device = resolve_device(args.device, "--device")
    model, tokenizer = load(args, device)
    from model.gpt.decode import check_kernels, resolve_dtype
    dtype = resolve_dtype(args.dtype, device, "--dtype")
    model.to(dtype)  # half the bytes per token in bf16 (docs/sampling.md)
    check_kernels(args.kernels, dtype, device)  # before the start-up line: a refusal is one line
    text = prompt_text(args, tokenizer)
    ids = encode_prompt(tokenizer, text)
    eot = tokenizer.eot_token_id
    check_memory(args, model.config, len(ids), device)
    # the start-up line, once the input is known good (a bad one gets its one error line alone)
    print(f"sample.py: {model.num_params():,} parameters on {device}; {describe(set_threads(args.threads))}",
          file=sys.stderr)
    idx = torch.tensor([ids], dtype=torch.long, device=device)  # (1, T)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, eos_token_id=eot,
                    generator=generator, kernels=args.kernels)
    runs = []  # one stats dict per generate call, for the decoding line at the end
    if args.stream:
        for i in range(args.num_samples):
            if i:
                out.write(SEPARATOR + "\n")
            out.write(tokenizer.decode(ids))
            printer = StreamPrinter(tokenizer, ids, out)
            runs.append({})
            model.generate(idx, args.max_new_tokens, on_token=printer, stats=runs[-1], **sampling)
            printer.finish()
        return print(decoding_report(model, runs, device), file=sys.stderr)
    if args.num_beams > 1:
        seqs, _ = model.beam_search(idx, args.max_new_tokens, num_beams=args.num_beams,
                                    length_penalty=args.length_penalty, eos_token_id=eot,
                                    num_return_sequences=args.num_samples, kernels=args.kernels)
    else:
        runs.append({})
        seqs = model.generate(idx.expand(args.num_samples, -1), args.max_new_tokens, stats=runs[-1], **sampling)
    for i, row in enumerate(seqs.tolist()):
        if i:
            out.write(SEPARATOR + "\n")
        out.write(tokenizer.decode(cut_at_eot(row, len(ids), eot)) + "\n")
    print(decoding_report(model, runs, device), file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    set_wait_policy()  # before torch loads: OpenMP reads its wait policy once (model/training/threads.py)
    return report_errors("sample.py", lambda: run_args(build_parser().parse_args(argv)), debug="--debug" in argv)


def run_args(args) -> int:
    check_args(args)
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
