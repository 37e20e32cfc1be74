"""Prepare a dataset folder: train.bin, val.bin (first 90% / last 10% of the tokens) and meta.json.

    python data/prepare.py                                   # pydoc corpus, char tokenizer -> data/pydoc_char
    python data/prepare.py --source shakespeare              # download tiny Shakespeare (needs the network once)
    python data/prepare.py --source shakespeare --input input.txt   # ... or use a local copy of it
    python data/prepare.py --input notes.txt --tokenizer bpe --vocab-size 1024   # -> data/notes_bpe
    python data/prepare.py --tokenizer gpt2 --bpe-file r50k_base.tiktoken        # GPT-2 BPE, offline
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # data/ is not a package; model/ is beside it
from model.cli import OneLineParser, UsageError, report_errors  # noqa: E402
from model.training.data import prepare  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="prepare.py", description=__doc__.split("\n")[0],
                      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 1)[1])
    p.add_argument("--source", choices=("pydoc", "file", "shakespeare"), default=None,
                   help="corpus: the embedded Python docs, a local file, or tiny Shakespeare (default: pydoc, or "
                   "file with --input)")
    p.add_argument("--input", metavar="PATH", help="local UTF-8 text file (implies --source file); with "
                   "--source shakespeare, a local copy of tiny Shakespeare (checked by sha256)")
    p.add_argument("--tokenizer", choices=("char", "gpt2", "bpe"), default="char",
                   help="char (one token per character), gpt2 (GPT-2's BPE) or bpe (trained on the corpus) "
                   "(default %(default)s)")
    p.add_argument("--vocab-size", type=int, metavar="N", help="bpe only: tokens to learn, >= 257 (default 4096)")
    p.add_argument("--bpe-file", metavar="PATH", help="gpt2 only: local r50k_base.tiktoken ranks file "
                   "(default: tiktoken downloads GPT-2's ranks once and caches them)")
    p.add_argument("--out-dir", metavar="DIR", help="output folder (default data/<source>_<tokenizer>)")
    p.add_argument("--quiet", action="store_true", help="print nothing on success")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # OSError covers a missing file, a failed download and a full disk
    return report_errors("prepare.py", lambda: run(build_parser().parse_args(argv)), debug="--debug" in argv)


def run(args) -> int:
    if args.input is not None and args.source == "pydoc":
        raise UsageError(f"--input {args.input} conflicts with --source {args.source}")
    source = args.source or ("file" if args.input else "pydoc")
    prepare(source, args.tokenizer, args.out_dir, input_path=args.input, bpe_file=args.bpe_file,
            vocab_size=args.vocab_size, quiet=args.quiet)
    return 0


if __name__ == "__main__":
    sys.exit(main())
