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
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
DEFAULT_CKPTS = (Path("out/default/best.pt"), Path("out/default/last.pt"))  # what `python train.py` writes
ENDOFTEXT = "<|endoftext|>"
SEPARATOR = "-" * 40


class UsageError(ValueError):
    """Bad command-line input: reported as one line on stderr with exit code 2."""


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints usage + message; the project's CLIs print one line
        raise UsageError(message)


def build_parser() -> OneLineParser:
    p = OneLineParser(prog="sample.py", description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--ckpt", help="flopgpt checkpoint, or a train.py out_dir (its best.pt, else last.pt; "
                     "default: out/default)")
    src.add_argument("--hf", metavar="PATH", help="local Hugging Face GPT-2 folder (config.json + weights)")
    p.add_argument("--start", help='prompt text, or FILE:path to read it from a file (default: "\\n" for '
                                   'char models, "<|endoftext|>" for GPT-2 BPE)')
    p.add_argument("--num-samples", type=int, default=3, help="samples to draw (default 3)")
    p.add_argument("--max-new-tokens", type=int, default=500, help="tokens per sample (default 500)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=200, help="keep the k most likely tokens; 0 = all (default 200)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (default 1.0 = off)")
    p.add_argument("--num-beams", type=int, default=1, help="beam search with this many beams (default 1: "
                                                             "sampling); prints the best --num-samples beams")
    p.add_argument("--length-penalty", type=float, default=1.0,
                   help="beam score = log-probability / length ** this (default 1.0)")
    p.add_argument("--seed", type=int, default=1337, help="seed of the sampling generator (default 1337)")
    p.add_argument("--stream", action="store_true",
                   help="print tokens as they are generated (samples one after another; not with beams)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--bpe-file", help="GPT-2 ranks file r50k_base.tiktoken (offline GPT-2 tokenizer)")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    return p


def check_args(args) -> None:
    if args.num_samples < 1:
        raise UsageError(f"--num-samples must be >= 1, got {args.num_samples}")
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise UsageError(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if args.top_k < 0:
        raise UsageError(f"--top-k must be >= 0, got {args.top_k}")
    if not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.num_beams < 1:
        raise UsageError(f"--num-beams must be >= 1, got {args.num_beams}")
    if args.num_beams > 1 and args.num_samples > args.num_beams:
        raise UsageError(f"--num-samples {args.num_samples} exceeds --num-beams {args.num_beams} "
                         f"(beam search returns at most one sample per beam)")
    if args.num_beams > 1 and args.stream:
        raise UsageError("--stream works with sampling only: beams are reordered until the search ends")
    if not math.isfinite(args.length_penalty):
        raise UsageError(f"--length-penalty must be finite, got {args.length_penalty}")
    if not 0 <= args.seed < 2**63:  # what torch.Generator.manual_seed accepts
        raise UsageError(f"--seed must be in [0, 2**63), got {args.seed}")


def resolve_device(name: str):
    import torch
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name} but CUDA is not available; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name!r}: only cpu and cuda are supported")
    return device


def load(args, device):
    """(model, tokenizer) from --hf, --ckpt or the default checkpoint."""
    from model import GPT
    from model.training.checkpoint import load_model
    from model.training.tokenizer import gpt2_tokenizer, load_tokenizer

    if args.hf:
        model = GPT.from_pretrained(args.hf, device=device)
        tokenizer = gpt2_tokenizer(args.bpe_file)
    else:
        path = Path(args.ckpt) if args.ckpt else next((p for p in DEFAULT_CKPTS if p.is_file()), None)
        if path is not None and path.is_dir():  # a train.py out_dir: its best checkpoint, else its last
            found = next((path / n for n in ("best.pt", "last.pt") if (path / n).is_file()), None)
            if found is None:
                raise FileNotFoundError(f"no checkpoint in directory {path}: best.pt and last.pt not found")
            path = found
        if path is None:
            raise FileNotFoundError(f"no checkpoint: {DEFAULT_CKPTS[0]} and {DEFAULT_CKPTS[1]} not found "
                                    f"(train one with `python train.py`, or pass --ckpt / --hf)")
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


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of text; a literal <|endoftext|> becomes the end-of-text token where the tokenizer has one."""
    eot = tokenizer.eot_token_id
    if eot is None:
        return tokenizer.encode(text)
    ids: list[int] = []
    for i, piece in enumerate(text.split(ENDOFTEXT)):
        if i:
            ids.append(eot)
        ids.extend(tokenizer.encode(piece))
    return ids


def cut_at_eot(ids: list[int], prompt_len: int, eot: int | None) -> list[int]:
    """The prompt plus the generated tokens before the first end-of-text token (which is dropped)."""
    if eot is not None and eot in ids[prompt_len:]:
        return ids[:ids.index(eot, prompt_len)]
    return ids


class StreamPrinter:
    """on_token callback: print the text one sample gains with each token, as soon as it is whole.

    Decodes the ids so far and prints what is new; a byte-level tokenizer may stop in the middle of a
    UTF-8 character (decoded as U+FFFD), so the tail is held back until the character is complete.
    """

    def __init__(self, tokenizer, prompt_ids: list[int], out):
        self.tokenizer, self.ids, self.out = tokenizer, list(prompt_ids), out
        self.shown = len(tokenizer.decode(self.ids))
        self.done = False

    def __call__(self, tokens) -> None:
        tok = int(tokens[0])
        if self.done or tok == self.tokenizer.eot_token_id:
            self.done = True
            return
        self.ids.append(tok)
        text = self.tokenizer.decode(self.ids)
        whole = text.rstrip("\ufffd")
        if len(whole) > self.shown:
            self.out.write(whole[self.shown:])
            self.out.flush()
            self.shown = len(whole)

    def finish(self) -> None:
        text = self.tokenizer.decode(self.ids)
        self.out.write(text[self.shown:] + "\n")  # whatever was held back (an unfinished character)


def check_memory(args, config, prompt_len: int, device) -> None:
    """Refuse, before generating, what cannot fit: KV cache, token buffer and logits of every row."""
    from model.training.memory import check_fits, sampling_bytes
    beams = args.num_beams > 1
    rows = args.num_beams if beams else 1 if args.stream else args.num_samples
    total = prompt_len + args.max_new_tokens
    check_fits(sampling_bytes(config, rows, total, beams=beams),
               f"sampling {rows:,} {'beams' if beams else 'rows'} of {total:,} tokens", device)


def run(args, out=None) -> None:
    import torch

    out = sys.stdout if out is None else out
    device = resolve_device(args.device)
    model, tokenizer = load(args, device)
    text = prompt_text(args, tokenizer)
    ids = encode_prompt(tokenizer, text)
    eot = tokenizer.eot_token_id
    check_memory(args, model.config, len(ids), device)
    idx = torch.tensor([ids], dtype=torch.long, device=device)  # (1, T)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, eos_token_id=eot,
                    generator=generator)
    if args.stream:
        for i in range(args.num_samples):
            if i:
                out.write(SEPARATOR + "\n")
            out.write(tokenizer.decode(ids))
            printer = StreamPrinter(tokenizer, ids, out)
            model.generate(idx, args.max_new_tokens, on_token=printer, **sampling)
            printer.finish()
        return
    if args.num_beams > 1:
        seqs, _ = model.beam_search(idx, args.max_new_tokens, num_beams=args.num_beams,
                                    length_penalty=args.length_penalty, eos_token_id=eot,
                                    num_return_sequences=args.num_samples)
    else:
        seqs = model.generate(idx.expand(args.num_samples, -1), args.max_new_tokens, **sampling)
    for i, row in enumerate(seqs.tolist()):
        if i:
            out.write(SEPARATOR + "\n")
        out.write(tokenizer.decode(cut_at_eot(row, len(ids), eot)) + "\n")


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(ROOT))
    from model.cli import pop_debug, report_errors
    argv, debug = pop_debug(sys.argv[1:] if argv is None else list(argv))

    def body() -> int:
        args = build_parser().parse_args(argv)
        check_args(args)
        run(args)
        return 0
    return report_errors("sample.py", body, debug=debug)  # UsageError is a ValueError


if __name__ == "__main__":
    sys.exit(main())
