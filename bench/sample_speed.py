"""Generation speed on one set of weights: our KV cache, our uncached loop, and transformers' generate.

    python bench/sample_speed.py                      # 1,000 tokens after a 16-token prompt, median of 3
    python bench/sample_speed.py --threads 1 --new-tokens 200 --repeats 2 --uncached all

The model is 6 layers x 384 wide (6 heads, block_size 1024) with GPT-2's vocabulary of 50,257 tokens and
random weights (speed does not depend on the values); the transformers GPT2LMHeadModel is built from the same
tensors, and the script checks that both produce the same tokens. Rows: greedy (batch 1), beam search with
4 beams (batch 1), and greedy with a batch of prompts (throughput = batch x new tokens / time). Each timing is
the median of several runs after a short warm-up run; no EOS, so every run generates exactly --new-tokens.
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from model.cli import OneLineParser, report_errors, resolve_device  # noqa: E402


def parse_args(argv):
    p = OneLineParser(prog="sample_speed.py", description=__doc__.split("\n")[0])
    p.add_argument("--new-tokens", type=int, default=1000, help="tokens generated per run (default 1000)")
    p.add_argument("--prompt-len", type=int, default=16, help="prompt tokens (default 16)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per cached/transformers entry (median)")
    p.add_argument("--uncached-repeats", type=int, default=1,
                   help="timed runs per uncached entry (default 1: quadratic, minutes each at 1000 tokens)")
    p.add_argument("--batch", type=int, default=8, help="batch size of the throughput row (default 8)")
    p.add_argument("--beams", type=int, default=4, help="beams of the beam-search row (default 4)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--uncached", choices=("greedy", "all", "none"), default="greedy",
                   help="rows that also run without the cache (default greedy: beam and batch rows without a "
                        "cache take tens of minutes at 1000 tokens)")
    p.add_argument("--no-hf", action="store_true", help="skip transformers (also when it is not installed)")
    args = p.parse_args(argv)
    for name in ("new_tokens", "prompt_len", "repeats", "uncached_repeats", "batch", "beams"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.prompt_len + args.new_tokens > 1024:
        p.error(f"--prompt-len + --new-tokens must fit block_size 1024, got {args.prompt_len + args.new_tokens}")
    return args


def timed(fns: dict, repeats: int, sync) -> dict:
    """name -> (median seconds, last output); the runs of the entries alternate, so a load change on a
    shared machine hits every entry alike."""
    times = {name: [] for name in fns}
    outputs = {}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            outputs[name] = fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(times[name]), outputs[name]) for name in fns}


def main(argv=None) -> int:
    return report_errors("sample_speed.py", lambda: run(parse_args(argv)))


def run(args) -> int:
    import torch

    from model import GPT, GPTConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device, "--device")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    hf = None
    if not args.no_hf:
        try:
            import transformers
            transformers.logging.set_verbosity_error()
            from model.gpt.weights import to_hf_gpt2
        except ImportError:
            print("transformers is not installed: skipping its column")
            args.no_hf = True

    torch.manual_seed(0)
    config = GPTConfig(vocab_size=50257, block_size=1024, n_layer=6, n_head=6, n_embd=384)
    model = GPT(config).to(device).eval()
    if not args.no_hf:
        hf = to_hf_gpt2(model)
    n, T = args.new_tokens, args.prompt_len
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, config.vocab_size, (1, T), generator=gen).to(device)  # (1, T)
    prompts = torch.randint(0, config.vocab_size, (args.batch, T), generator=gen).to(device)  # (B, T)

    print(f"model: {config.n_layer} layers x {config.n_embd} wide, {config.n_head} heads, block_size "
          f"{config.block_size}, vocab {config.vocab_size} (GPT-2 BPE), {model.num_params() / 1e6:.1f}M params, "
          f"random fp32 weights; device {device}, {torch.get_num_threads()} CPU threads, torch {torch.__version__}"
          + ("" if args.no_hf else f", transformers {transformers.__version__}"))
    print(f"prompt {T} tokens, {n} new tokens; median of {args.repeats} runs "
          f"(uncached: {args.uncached_repeats}) after a warm-up run\n")

    rows = [("greedy", prompt, 1), (f"beam search ({args.beams} beams)", prompt, args.beams),
            (f"greedy, batch {args.batch}", prompts, 1)]
    header = f"{'mode':<26}{'ours cache':>12}{'ours no cache':>15}{'transformers':>14}{'cache/no-cache':>16}" \
             f"{'ours/transformers':>19}  same tokens (no cache, transformers)"
    print("tokens/s (batch rows: generated tokens summed over the batch)")
    print(header)
    for name, idx, beams in rows:
        _time_row(name, idx, beams, model, hf, args, sync)
    return 0


def _time_row(name: str, idx, beams: int, model, hf, args, sync) -> None:
    """Time one row (ours with the cache, transformers, ours without the cache where asked) and print it."""
    import torch
    n = args.new_tokens

    def ours(beams, cache, tokens=n):
        if beams == 1:
            return lambda: model.generate(idx, tokens, temperature=0, use_cache=cache)
        return lambda: model.beam_search(idx, tokens, num_beams=beams, use_cache=cache)[0]

    def theirs(beams, tokens=n):
        return lambda: hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=tokens,
                                   do_sample=False, num_beams=beams)

    fns = {"cache": ours(beams, True)}
    if hf is not None:
        fns["hf"] = theirs(beams)
    with torch.inference_mode():
        ours(beams, True, 4)()  # warm-up: first-call allocations and kernel selection
        if hf is not None:
            theirs(beams, 4)()
        res = timed(fns, args.repeats, sync)
        if args.uncached == "all" or (args.uncached == "greedy" and name == "greedy"):
            ours(beams, False, 4)()
            res.update(timed({"no cache": ours(beams, False)}, args.uncached_repeats, sync))
    speed = {k: n * idx.size(0) / sec for k, (sec, _) in res.items()}
    out = res["cache"][1]
    same = [("yes" if res[k][1].shape == out.shape and torch.equal(res[k][1], out) else "NO")
            if k in res else "-" for k in ("no cache", "hf")]
    print(f"{name:<26}{_num(speed.get('cache'), 12)}{_num(speed.get('no cache'), 15)}"
          f"{_num(speed.get('hf'), 14)}{_ratio(speed.get('cache'), speed.get('no cache'), 16)}"
          f"{_ratio(speed.get('cache'), speed.get('hf'), 19)}  {', '.join(same)}")


def _num(value, width):
    return f"{value:>{width}.1f}" if value is not None else f"{'-':>{width}}"


def _ratio(a, b, width):
    return f"{f'{a / b:.2f}x':>{width}}" if b else f"{'-':>{width}}"


if __name__ == "__main__":
    sys.exit(main())
