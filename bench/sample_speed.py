"""Decoding speed side by side: flopgpt's fast path (fp32, bf16), its reference path, and transformers' generate.

    python bench/sample_speed.py --threads 1                    # GPT-2 124M-shaped, then the default 4x128 model
    python bench/sample_speed.py --model gpt2 --threads 1 --repeats 3 --batches 1,8,32,64 --batch-tokens 32
    python bench/sample_speed.py --model default --threads 1 --repeats 5

Random weights (speed does not depend on their values); transformers' GPT2LMHeadModel is built from the same
tensors. Rows: greedy, beam search (4 beams) and sampling (temperature 0.8, top-k 40, top-p 0.9, one seeded
generator), each at batch 1, --new-tokens after a --prompt-len prompt, no EOS. Paths: flopgpt's fast decoding
path in fp32 and in bf16 (model cast once), each with torch's kernels and with kernels='avx512' (where it runs;
model/gpt/cpu_decode.py, built on first use), flopgpt's reference path (generate(fast=False): the model's own
forward), transformers' generate (eager), and with --hf-static transformers with its static cache and
torch.compile. Every timed call is a whole generate call; entries alternate, median of --repeats after one
warm-up call each, so a load change on a shared machine hits every entry alike.
Bytes follow the minimum convention (model/flops/bytes.py), summed over the run's calls (prefill included);
MBU is against the highest STREAM bandwidth measured in this run up to the row (at the start, and after each
row block's timing: a neighbour's load moves it) and MFU against the FLOP peak (model/flops/peaks.py);
a measured rate above a peak raises it (said below the table). --batches adds greedy rows at larger batches
beside the roofline's prediction (the time the binding roof allows for every call of the run).
"""
from __future__ import annotations

import copy
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


from model.cli import OneLineParser, report_errors  # noqa: E402


def parse_args(argv):
    p = OneLineParser(prog="sample_speed.py", description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=("gpt2", "default", "both"), default="both",
                   help="GPT-2 124M-shaped (12x768, vocab 50257), the default 4x128 model (vocab 103), or both")
    p.add_argument("--new-tokens", type=int, default=200, help="tokens generated per call (default 200)")
    p.add_argument("--prompt-len", type=int, default=16, help="prompt tokens (default 16)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per entry, median (default 3)")
    p.add_argument("--beams", type=int, default=4, help="beams of the beam-search row (default 4)")
    p.add_argument("--batches", default="", help="comma-separated batch sizes of greedy rows beside the roofline "
                   "(GPT-2 only; e.g. 1,8,32,64)")
    p.add_argument("--batch-tokens", type=int, default=32, help="new tokens per call of the batch rows (default 32)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--modes", default="greedy,beam,sample", help="rows to run (default greedy,beam,sample)")
    p.add_argument("--hf-static", action="store_true",
                   help="also time transformers with cache_implementation='static' and a compiled forward")
    p.add_argument("--no-hf", action="store_true", help="skip transformers (also when it is not installed)")
    p.add_argument("--no-reference", action="store_true", help="skip flopgpt's reference path (fast=False)")
    p.add_argument("--no-avx512", dest="avx512", action="store_false",
                   help="skip the fast path with kernels='avx512' (model/gpt/cpu_decode.py; skipped anyway where "
                   "it cannot run)")
    args = p.parse_args(argv)
    for name in ("new_tokens", "prompt_len", "repeats", "beams", "batch_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    try:
        args.batches = [int(b) for b in args.batches.split(",") if b.strip()]
    except ValueError:
        p.error(f"--batches must be comma-separated integers, got {args.batches!r}")
    if any(b < 1 for b in args.batches):
        p.error(f"--batches must be positive, got {args.batches}")
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.modes or any(m not in ("greedy", "beam", "sample") for m in args.modes):
        p.error(f"--modes takes greedy, beam and sample, got {args.modes}")
    return args


def timed(fns: dict, repeats: int) -> dict:
    """name -> (median seconds, last output); the entries' calls alternate."""
    times = {name: [] for name in fns}
    outputs = {}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            outputs[name] = fn()
            times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(times[name]), outputs[name]) for name in fns}


def run_cost(cfg, prompt_len: int, new_tokens: int, rows: int, beams: int, dtype) -> tuple[int, int]:
    """(FLOPs, minimum bytes) of every forward call of one generate/beam-search run, prefill included."""
    from model.flops import bytes as nbytes
    from model.flops import formulas
    flops = nbytes_ = 0
    for r, q_len, past in formulas.generation_calls(cfg, prompt_len, new_tokens, batch=rows, num_beams=beams):
        flops += formulas.step(cfg, r, q_len, past, last_only=True).total
        nbytes_ += (nbytes.decode_minimum_bytes(cfg, r, past + 1, dtype) if q_len == 1 else
                    nbytes.forward_minimum_bytes(cfg, r, q_len, dtype, last_only=True))["total"]
    return flops, nbytes_


def main(argv=None) -> int:
    return report_errors("sample_speed.py", lambda: run(parse_args(argv)))


def run(args) -> int:
    import torch

    from model import GPTConfig
    from model.flops.peaks import device_peak, measure_cpu_bandwidth, Peak

    if args.threads:
        torch.set_num_threads(args.threads)
    hf_version = None
    if not args.no_hf:
        try:
            import transformers
            transformers.logging.set_verbosity_error()
            hf_version = transformers.__version__
        except ImportError:
            print("transformers is not installed: skipping its columns")
            args.no_hf = True
    start = max(measure_cpu_bandwidth() for _ in range(3))
    bandwidth = Peak(start, "STREAM copy/triad measured in this run, best of 3", unit="B/s")
    peaks = {torch.float32: device_peak("cpu")}
    torch.set_float32_matmul_precision("medium")  # the bf16 matmul peak (AMX/AVX512-BF16 where present)
    peaks[torch.bfloat16] = device_peak("cpu")
    torch.set_float32_matmul_precision("highest")
    print(f"machine: {_cpu_name()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
          + (f", transformers {hf_version}" if hf_version else ""))
    print(f"bandwidth {bandwidth.describe()}; FLOP peaks fp32 {peaks[torch.float32].describe()}, "
          f"bf16 {peaks[torch.bfloat16].describe()}\n")
    models = {"gpt2": GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768),
              "default": GPTConfig(vocab_size=103, block_size=128, n_layer=4, n_head=4, n_embd=128)}
    for name in (("gpt2", "default") if args.model == "both" else (args.model,)):
        _bench_model(name, models[name], args, bandwidth, peaks)
    end = max(measure_cpu_bandwidth() for _ in range(3))  # a neighbour's load moves it: say how far it drifted
    print(f"STREAM at the end of the run: {end / 1e9:.1f} GB/s (start: {start / 1e9:.1f} GB/s)")
    for peak in (bandwidth, *peaks.values()):
        for message in peak.messages:
            print(f"note: {message}")
    return 0


def _bench_model(name: str, cfg, args, bandwidth, peaks) -> None:
    import torch

    from model import GPT
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    model_bf16 = copy.deepcopy(model).to(torch.bfloat16)
    hf = hf_static = None
    if not args.no_hf:
        from model.gpt.weights import to_hf_gpt2
        hf = to_hf_gpt2(model)
        if args.hf_static:
            hf_static = to_hf_gpt2(model)
            hf_static.forward = torch.compile(hf_static.forward, fullgraph=True)
    T, n = args.prompt_len, min(args.new_tokens, cfg.block_size - args.prompt_len)
    prompt = torch.randint(0, cfg.vocab_size, (1, T), generator=torch.Generator().manual_seed(1))  # (1, T)
    print(f"{name}: {cfg.n_layer} layers x {cfg.n_embd} wide, vocab {cfg.vocab_size}, {model.num_params() / 1e6:.1f}M "
          f"params, random weights; {n} new tokens after {T}, batch 1, median of {args.repeats}")
    print(f"{'row':<9}{'path':<34}{'tok/s':>9}{'GB/s':>8}{'MBU':>7}{'MFU':>8}{'vs HF':>7}  same tokens as HF")
    for mode in args.modes:
        _bench_mode(mode, model, model_bf16, (hf, hf_static), prompt, n, args, bandwidth, peaks)
    if name == "gpt2" and args.batches:
        _bench_batches(model, model_bf16, args, bandwidth, peaks)
    print()


def _paths(mode: str, model, model_bf16, hfs, prompt, n: int, args) -> dict:
    """name -> (callable, dtype) for one row."""
    import torch

    from model.gpt.cpu_decode import unavailable
    hf, hf_static = hfs
    beams = args.beams if mode == "beam" else 1
    opts = dict(temperature=0.8, top_k=40, top_p=0.9)

    def ours(m, fast=True, kernels="torch"):
        if mode == "beam":
            return lambda: m.beam_search(prompt, n, num_beams=beams, fast=fast, kernels=kernels)[0]
        if mode == "greedy":
            return lambda: m.generate(prompt, n, temperature=0, fast=fast, kernels=kernels)
        return lambda: m.generate(prompt, n, generator=torch.Generator().manual_seed(7), fast=fast,
                                  kernels=kernels, **opts)

    def theirs(m, **extra):
        kw = dict(do_sample=False, num_beams=beams) if mode != "sample" else dict(do_sample=True, **opts)

        def call():
            torch.manual_seed(7)  # transformers draws from the default generator: same seed, same draws
            return m.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, **kw, **extra)
        return call

    paths = {"flopgpt fast fp32": (ours(model), torch.float32)}
    if not args.no_reference:
        paths["flopgpt reference fp32 (fast=False)"] = (ours(model, fast=False), torch.float32)
    paths["flopgpt fast bf16"] = (ours(model_bf16), torch.bfloat16)
    for m, dtype in ((model, torch.float32), (model_bf16, torch.bfloat16)):
        if args.avx512 and unavailable(dtype) is None:
            paths[f"flopgpt fast {_short(dtype)} avx512"] = (ours(m, kernels="avx512"), dtype)
    if hf is not None:
        paths["transformers eager fp32"] = (theirs(hf), torch.float32)
    if hf_static is not None:
        paths["transformers static+compile fp32"] = (theirs(hf_static, cache_implementation="static"), torch.float32)
    return paths


def _short(dtype) -> str:
    return {"torch.float32": "fp32", "torch.bfloat16": "bf16"}[str(dtype)]


def _bench_mode(mode, model, model_bf16, hfs, prompt, n, args, bandwidth, peaks) -> None:
    import torch

    from model.flops.peaks import measure_cpu_bandwidth
    paths = _paths(mode, model, model_bf16, hfs, prompt, n, args)
    with torch.inference_mode():
        for fn, _ in _paths(mode, model, model_bf16, hfs, prompt, min(n, 4), args).values():
            fn()  # a short warm-up call: first-call allocations, kernel choice, compilation
        res = timed({k: fn for k, (fn, _) in paths.items()}, args.repeats)
    # a neighbour's load moves the bandwidth: these rows' MBU is against the highest STREAM read so far, this
    # reading (right after their timing) included
    bandwidth.raise_to(max(measure_cpu_bandwidth() for _ in range(3)))
    beams = args.beams if mode == "beam" else 1
    label = {"greedy": "greedy", "beam": f"beam {beams}", "sample": "top-k/p"}[mode]
    ref = res.get("transformers eager fp32")
    for path, (fn, dtype) in paths.items():
        sec, out = res[path]
        flops, nbytes_ = run_cost(model.config, prompt.size(1), n, 1, beams, dtype)
        same = "-" if ref is None or path.startswith("transformers eager") else \
            ("yes" if out.shape == ref[1].shape and torch.equal(out, ref[1]) else "NO")
        vs = f"{ref[0] / sec:.2f}x" if ref is not None else "-"
        print(f"{label:<9}{path:<34}{n / sec:>9.1f}{nbytes_ / sec / 1e9:>8.2f}{bandwidth.mfu(nbytes_ / sec):>7.1%}"
              f"{peaks[dtype].mfu(flops / sec):>8.2%}{vs:>7}  {same}")


def _bench_batches(model, model_bf16, args, bandwidth, peaks) -> None:
    """Greedy tokens/s at each batch size beside the roofline's prediction, and the batch that turns compute-bound."""
    import torch

    from model.flops.roofline import bound, decode_compute_bound_batch
    cfg, T, n = model.config, args.prompt_len, args.batch_tokens
    print(f"\ngreedy at larger batches ({n} new tokens after {T}; tokens/s summed over the batch); "
          f"roofline: every call at the time its binding roof allows")
    print(f"{'batch':>5}  {'path':<20}{'tok/s':>9}{'roofline':>10}{'of roof':>9}{'bound':>9}{'MBU':>7}{'MFU':>8}")
    gen = torch.Generator().manual_seed(2)
    for B in args.batches:
        idx = torch.randint(0, cfg.vocab_size, (B, T), generator=gen)  # (B, T)
        paths = {"flopgpt fast fp32": (model, torch.float32), "flopgpt fast bf16": (model_bf16, torch.bfloat16)}
        fns = {k: (lambda m=m: m.generate(idx, n, temperature=0)) for k, (m, _) in paths.items()}
        with torch.inference_mode():
            for fn in fns.values():
                fn()
            res = timed(fns, args.repeats)
        for path, (_, dtype) in paths.items():
            sec = res[path][0]
            flops, nbytes_ = run_cost(cfg, T, n, B, 1, dtype)
            roof = bound(flops, nbytes_, peaks[dtype].rate, bandwidth.rate)
            print(f"{B:>5}  {path:<20}{B * n / sec:>9.1f}{B * n / roof['seconds']:>10.1f}"
                  f"{roof['seconds'] / sec:>9.0%}{roof['bound']:>9}{bandwidth.mfu(nbytes_ / sec):>7.1%}"
                  f"{peaks[dtype].mfu(flops / sec):>8.2%}")
    for dtype in (torch.float32, torch.bfloat16):
        turn = decode_compute_bound_batch(cfg, T + n, dtype, peaks[dtype].rate, bandwidth.rate)
        where = f"turn compute-bound from batch {turn}" if turn else \
            "stay memory-bound at every batch (each row's KV cache keeps the intensity below the ridge)"
        print(f"decode steps at context {T + n} {where} ({str(dtype).removeprefix('torch.')}, this run's peaks)")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    sys.exit(main())
