"""Training speed, side by side in one run: a nanoGPT-style baseline step against flopgpt's train.py step.

    python bench/train_speed.py          # recipes a and b; sdpa/manual; eager/compile (compile: a only on CPU)
    python bench/train_speed.py --quick  # recipe a only, eager only (about a minute)
    python bench/train_speed.py --recipes=a --without=allocator,fused_adamw  # what each technique buys

Recipes (nanoGPT's): (a) its CPU "baby GPT" command: char-level, 4 layers, 4 heads, 128 wide, block 64, batch
12, dropout 0; (b) its shakespeare_char config: 6 layers, 6 heads, 384 wide, block 256, batch 64, dropout 0.2.
The baseline re-implements nanoGPT's per-iteration work (not its code): its model (one c_attn projection split
into q, k, v; exact-erf GELU; bias-free LayerNorm/Linear; SDPA attention), its get_batch (np.memmap opened on
every call, one torch.stack per x and y of per-row slices), plain AdamW (nanoGPT fuses it only on CUDA) and
its loop (loss divided by the accumulation steps, next batch fetched between forward and backward, clip, step,
loss.item() and its MFU estimate's parameter count every step as with --log_interval=1; its log print is left
out). Each variant runs in its own process, with the process settings of the program it stands for:
flopgpt's workers apply train.py's (model/training/runtime.py, glibc's allocator keeping freed memory), the
baseline's none. Variants are timed in alternating blocks of steps (repeats) after warm-up steps; each row
reports the median step time, tokens/s, model FLOP/s (exact FLOPs from model.flops.formulas.train_step_flops,
2 per multiply-add) and MFU against the peak from model.flops.peaks.device_peak (on CPU the hardware figure,
cores x clock x FMA width; a row faster than the peak raises it and says so), and its speed relative to the
baseline: the median over repeats of the ratio of the two programs' median step times in that repeat's
blocks (timed seconds apart), with the range of those ratios. The machine may be shared: compare ratios, not
absolute numbers.

On CPUs with bf16 matmul units (AMX, AVX512-BF16) two more rows run both steps with float32 matmul precision
"medium" (bf16 inputs, fp32 accumulation; train.py's --matmul_precision=medium), their MFU against the bf16
matmul peak (the bf16 units' figure); --no-bf16-matmuls leaves them out. Recipe (b) on CPU runs at most three
processes (5.5-6 GB each): there the flopgpt bf16-mm row replaces "flopgpt manual" (with dropout on, CPU 'sdpa'
takes the manual path anyway) and the nanoGPT-style bf16-mm row is left out.

--without=T1,T2 times, instead, flopgpt as train.py runs it and flopgpt without each named technique
(TECHNIQUES: cpu_kernels, allocator, fused_adamw); with cpu_kernels, on CPUs with bf16 units
and for recipe (a), the same pair also runs at matmul precision "medium".
"""
from __future__ import annotations

import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
USAGE = ("usage: python bench/train_speed.py [--quick] [--recipes=a,b] [--repeats=N] [--steps=N] [--warmup=N] "
         "[--threads=N] [--dataset=DIR] [--device=cpu|cuda] [--no-compile] [--no-bf16-matmuls] [--without=T1,T2]")
RECIPES = {  # name -> (model shape, batch size); vocab comes from the dataset
    "a": (dict(n_layer=4, n_head=4, n_embd=128, block_size=64, dropout=0.0, bias=False, activation="gelu"), 12),
    "b": (dict(n_layer=6, n_head=6, n_embd=384, block_size=256, dropout=0.2, bias=False, activation="gelu"), 64),
}

# flopgpt's speed techniques that --without=... can leave out (docs/performance.md): the CPU kernels of
# model/gpt/speed.py, glibc's allocator setting of model/training/runtime.py, torch's fused AdamW
TECHNIQUES = ("cpu_kernels", "allocator", "fused_adamw")


@dataclass(frozen=True)
class Variant:
    label: str
    runner: str  # "nanogpt" or "flopgpt"
    attention: str = "sdpa"
    compile: bool = False
    precision: str = "highest"  # float32 matmul precision
    without: frozenset = frozenset()  # flopgpt techniques left out


# ----------------------------------------------------------------------------------------------------
# The nanoGPT-style baseline: its model, batches, optimizer and loop, rewritten here.

def _nanogpt_layers(cfg):
    """nanoGPT's LayerNorm (optional bias) and Block (fused c_attn, SDPA with is_causal and dropout in
    training, exact GELU MLP) classes for GPTConfig `cfg`."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    class Norm(nn.Module):
        def __init__(self, n, bias):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(n))
            self.bias = nn.Parameter(torch.zeros(n)) if bias else None

        def forward(self, x):
            return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
            self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
            self.resid_dropout = nn.Dropout(cfg.dropout)

        def forward(self, x):
            B, T, C = x.size()
            q, k, v = self.c_attn(x).split(C, dim=2)  # (B, T, C) each
            q = q.view(B, T, cfg.n_head, C // cfg.n_head).transpose(1, 2)  # (B, nh, T, hs)
            k = k.view(B, T, cfg.n_head, C // cfg.n_head).transpose(1, 2)  # (B, nh, T, hs)
            v = v.view(B, T, cfg.n_head, C // cfg.n_head).transpose(1, 2)  # (B, nh, T, hs)
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=cfg.dropout if self.training else 0.0,
                                               is_causal=True)  # (B, nh, T, hs)
            y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
            return self.resid_dropout(self.c_proj(y))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1, self.ln_2 = Norm(cfg.n_embd, cfg.bias), Norm(cfg.n_embd, cfg.bias)
            self.attn = Attn()
            self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
            self.gelu = nn.GELU()  # exact erf form
            self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
            self.drop = nn.Dropout(cfg.dropout)

        def forward(self, x):
            x = x + self.attn(self.ln_1(x))  # (B, T, C)
            return x + self.drop(self.c_proj(self.gelu(self.c_fc(self.ln_2(x)))))  # (B, T, C)

    return Norm, Block


def nanogpt_model(cfg):
    """nanoGPT's GPT for GPTConfig `cfg`, as it computes: nanoGPT's layers, tied head, GPT-2 init. Returns an
    nn.Module whose forward(idx, targets) -> (logits, loss)."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    Norm, Block = _nanogpt_layers(cfg)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
            self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
            self.drop = nn.Dropout(cfg.dropout)
            self.h = nn.ModuleList(Block() for _ in range(cfg.n_layer))
            self.ln_f = Norm(cfg.n_embd, cfg.bias)
            self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
            self.wte.weight = self.lm_head.weight
            for name, p in self.named_parameters():
                if p.dim() >= 2:
                    std = 0.02 / math.sqrt(2 * cfg.n_layer) if name.endswith("c_proj.weight") else 0.02
                    nn.init.normal_(p, 0.0, std)
                elif name.endswith("bias"):
                    nn.init.zeros_(p)

        def forward(self, idx, targets):
            T = idx.size(1)
            pos = torch.arange(0, T, dtype=torch.long, device=idx.device)  # (T,)
            x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)
            for block in self.h:
                x = block(x)
            logits = self.lm_head(self.ln_f(x))  # (B, T, V)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
            return logits, loss

    return Model()


def nanogpt_optimizer(model, device_type: str):
    """AdamW, weight decay on >= 2-D tensors only; fused only on CUDA (nanoGPT's rule), else torch's default."""
    import torch
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    extra = {"fused": True} if device_type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.99), **extra)


def nanogpt_get_batch(path: Path, block_size: int, batch_size: int, device):
    """A fresh memmap per call (nanoGPT does this to avoid a memory leak), per-row slices stacked."""
    import numpy as np
    import torch
    data = np.memmap(path, dtype=np.uint16, mode="r")
    ix = torch.randint(len(data) - block_size, (batch_size,))  # (B,)
    x = torch.stack([torch.from_numpy(data[i:i + block_size].astype(np.int64)) for i in ix])  # (B, T)
    y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + block_size].astype(np.int64)) for i in ix])  # (B, T)
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


class NanoGPTRunner:
    """One nanoGPT training iteration per step(): forward on the prefetched batch, fetch the next batch,
    backward, clip to 1.0, AdamW step, zero grads, loss.item() (log_interval=1)."""

    def __init__(self, cfg, batch_size: int, dataset: Path, device, dtype: str, compile: bool):
        import torch
        self.model = nanogpt_model(cfg).to(device)
        self.optimizer = nanogpt_optimizer(self.model, device.type)
        self.fwd = torch.compile(self.model) if compile else self.model
        self.ctx = (torch.autocast(device_type=device.type, dtype=torch.bfloat16)
                    if device.type == "cuda" and dtype == "bfloat16" else nullcontext())
        self.batch = lambda: nanogpt_get_batch(dataset / "train.bin", cfg.block_size, batch_size, device)
        self.x, self.y = self.batch()
        self.it = 0

    def step(self) -> float:
        import torch
        lr = 1e-3 * min(1.0, (self.it + 1) / 100)  # its warmup, cosine is the same cost
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with self.ctx:
            _, loss = self.fwd(self.x, self.y)
            loss = loss / 1  # its loss / gradient_accumulation_steps (1 here), an op in the graph all the same
        self.x, self.y = self.batch()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.it += 1
        lossf = loss.item()
        if self.it >= 5:  # its estimate_mfu at every log step counts the parameters again (its print is left out)
            sum(p.numel() for p in self.model.parameters())
        return lossf


# ----------------------------------------------------------------------------------------------------
# flopgpt's step: the body of train.py's loop for one process and grad_accum=1.

class FlopgptRunner:
    """`without` names techniques of TECHNIQUES to leave out, to measure what each buys."""

    def __init__(self, cfg, batch_size: int, dataset: Path, device, dtype: str, compile: bool,
                 precision: str = "highest", without: frozenset = frozenset()):
        import torch
        from model import GPT, TrainConfig
        from model.gpt.speed import use_cpu_kernels
        from model.training.data import Batches
        from model.training.optim import adamw
        kernels = use_cpu_kernels(device.type, cfg.dropout, precision, compile) and "cpu_kernels" not in without
        self.raw = GPT(cfg, cpu_kernels=kernels).to(device)  # as train.py builds it
        self.model = torch.compile(self.raw) if compile else self.raw
        self.tcfg = TrainConfig(dataset=str(dataset), batch_size=batch_size, max_iters=10**6)
        if "fused_adamw" in without:  # torch's default AdamW implementation (foreach)
            self.optimizer = torch.optim.AdamW(self.raw.optim_groups(0.1), lr=1e-3, betas=(0.9, 0.99))
        else:
            self.optimizer = adamw(self.raw, 1e-3, 0.1, (0.9, 0.99), device.type)
        self.batches = Batches(dataset, "train", cfg.block_size, batch_size, seed=1337, device=device)
        self.autocast = (torch.autocast(device_type=device.type, dtype=torch.bfloat16)
                         if dtype == "bfloat16" else nullcontext())
        self.device = device
        self.it = 0

    def step(self) -> float:
        import torch
        from model.training.optim import clip_and_step
        from model.training.optim import lr_at
        lr = lr_at(self.it, self.tcfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=self.device)
        x, y = self.batches.next()
        with self.autocast:
            _, loss = self.model(x, y)
        loss.backward()
        loss_sum += loss.detach()
        grad_norm = clip_and_step(self.optimizer, 1.0)
        self.optimizer.zero_grad(set_to_none=True)
        grad_norm.item()
        self.it += 1
        return loss_sum.item()


# ----------------------------------------------------------------------------------------------------

def default_dataset() -> Path:
    """The recipes' corpus, tiny Shakespeare (char-level), when prepared; else the embedded default corpus
    (prepared on first use)."""
    shakespeare = ROOT / "data" / "shakespeare_char"
    return shakespeare if (shakespeare / "meta.json").is_file() else ROOT / "data" / "pydoc_char"


def median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def parse_args(argv: list[str]) -> dict:
    opts = {"quick": False, "recipes": None, "repeats": None, "steps": None, "warmup": None, "threads": 0,
            "dataset": None, "device": "auto", "compile": True, "bf16_matmuls": True, "without": []}
    for arg in argv:
        key, eq, value = arg.partition("=")
        name = key.lstrip("-").replace("-", "_")
        if not key.startswith("--"):
            raise ValueError(f"unexpected argument {arg!r}; {USAGE}")
        if name in ("quick",) and not eq:
            opts["quick"] = True
        elif name == "no_compile" and not eq:
            opts["compile"] = False
        elif name == "no_bf16_matmuls" and not eq:
            opts["bf16_matmuls"] = False
        elif name in ("repeats", "steps", "warmup", "threads") and eq:
            try:
                opts[name] = int(value)
            except ValueError:
                raise ValueError(f"--{name} expects an integer, got {value!r}") from None
            if opts[name] < (0 if name in ("warmup", "threads") else 1):
                raise ValueError(f"--{name} must be {'non-negative' if name in ('warmup', 'threads') else 'positive'},"
                                 f" got {value}")
        elif name == "recipes" and eq:
            opts["recipes"] = [r for r in value.split(",") if r]
            bad = [r for r in opts["recipes"] if r not in RECIPES]
            if bad or not opts["recipes"]:
                raise ValueError(f"--recipes: unknown recipe {bad[0] if bad else value!r}; expected a, b or a,b")
        elif name in ("dataset", "device") and eq:
            opts[name] = value
        elif name == "without" and eq:
            opts["without"] = [t for t in value.split(",") if t]
            bad = [t for t in opts["without"] if t not in TECHNIQUES]
            if bad or not opts["without"]:
                raise ValueError(f"--without: unknown technique {bad[0] if bad else value!r}; expected some of "
                                 f"{', '.join(TECHNIQUES)}")
        else:
            raise ValueError(f"unknown or malformed option {arg!r}; {USAGE}")
    return opts


def bf16_cpu_matmuls_available() -> bool:
    """Whether matmul_precision="medium" sends fp32 matmuls to bf16 hardware here (AMX or AVX512-BF16)."""
    from model.training.runtime import cpu_bf16_matmul_unit
    return cpu_bf16_matmul_unit() in ("AMX", "AVX512-BF16")


def variants_for(recipe: str, opts: dict, device) -> list[Variant]:
    """The rows to time, in timing order; the first is the baseline."""
    base = Variant("nanoGPT-style", "nanogpt")
    big = recipe == "b" and device.type == "cpu"  # each process holds 5.5-6 GB: at most 3 fit in 24 GB
    bf16 = device.type == "cpu" and opts["bf16_matmuls"] and bf16_cpu_matmuls_available()
    if opts["without"]:  # what each technique buys: flopgpt with it, and without it
        rows = [base, Variant("flopgpt", "flopgpt")]
        rows += [Variant(f"flopgpt without {t}", "flopgpt", without=frozenset([t])) for t in opts["without"]]
        if "cpu_kernels" in opts["without"] and bf16 and not big:  # where bf16 matmul inputs need them
            rows += [Variant("flopgpt bf16-mm", "flopgpt", precision="medium"),
                     Variant("flopgpt bf16-mm without cpu_kernels", "flopgpt", precision="medium",
                             without=frozenset(["cpu_kernels"]))]
        return rows
    rows = [base, Variant("flopgpt sdpa", "flopgpt"), Variant("flopgpt manual", "flopgpt", attention="manual")]
    # bf16 matmul inputs (fp32 accumulation) on CPUs with bf16 units: flopgpt's matmul_precision="medium",
    # and the same setting given to the nanoGPT-style step, whose SDPA then slows down (see model/gpt/speed.py)
    if bf16:
        if big:  # with dropout, flopgpt's CPU kernels take the manual path anyway: its row gives way
            rows = rows[:2] + [Variant("flopgpt bf16-mm", "flopgpt", precision="medium")]
        else:
            rows += [Variant("nanoGPT-style bf16-mm", "nanogpt", precision="medium"),
                     Variant("flopgpt bf16-mm", "flopgpt", precision="medium")]
    if opts["compile"] and not opts["quick"] and not big:  # not recipe (b) on CPU: memory, as above
        rows += [Variant("nanoGPT-style compile", "nanogpt", compile=True),
                 Variant("flopgpt sdpa compile", "flopgpt", compile=True)]
    return rows


def _worker(conn, v: Variant, cfg_fields: dict, batch_size: int, dataset: str, device: str, dtype: str,
            warmup: int, threads: int) -> None:
    """One variant in its own process: build, warm up, then time `n` steps per request until told to stop.

    A process per variant lets each keep its own process settings, as the real programs would: flopgpt's
    runs train.py's (model.training.runtime.cpu_process_settings); the nanoGPT-style baseline runs none.
    """
    try:
        import torch
        from model import GPTConfig
        if threads:
            torch.set_num_threads(threads)
        dev = torch.device(device)
        if v.runner == "flopgpt" and dev.type == "cpu" and "allocator" not in v.without:
            from model.training.runtime import cpu_process_settings
            cpu_process_settings()
        precision = "high" if dev.type == "cuda" else v.precision  # TF32, as both programs set it on CUDA
        if dev.type == "cuda":
            torch.backends.cudnn.allow_tf32 = True
        torch.set_float32_matmul_precision(precision)
        t0 = time.perf_counter()
        cfg, data = GPTConfig(**cfg_fields), Path(dataset)
        if v.runner == "nanogpt":
            run = NanoGPTRunner(cfg, batch_size, data, dev, dtype, v.compile)
        else:
            run = FlopgptRunner(cfg, batch_size, data, dev, dtype, v.compile, precision, v.without)
        for _ in range(warmup):  # allocation, autotuning, compilation
            run.step()
        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
        conn.send(("ready", time.perf_counter() - t0))
        while (n := conn.recv()) is not None:
            times = []
            for _ in range(n):
                t = time.perf_counter()
                run.step()  # ends in loss.item(): the step is complete when it returns
                sync()
                times.append(time.perf_counter() - t)
            conn.send(("times", times))
    except Exception as e:  # reported by the parent as one line
        conn.send(("error", f"{type(e).__name__}: {e}"))


def bench_recipe(recipe: str, opts: dict, dataset: Path, vocab: int, device, dtype: str,
                 peaks: dict) -> list[dict]:
    """Time every variant of `recipe`; `peaks` maps each float32 matmul precision to its peaks.Peak (MFU of a
    bf16-matmul row is against the bf16 matmul peak)."""
    import multiprocessing as mp
    from dataclasses import asdict
    from model import GPTConfig
    from model.flops.formulas import train_step_flops
    shape, batch_size = RECIPES[recipe]
    quick = opts["quick"]
    big = recipe == "b" and device.type == "cpu"
    repeats = opts["repeats"] or (3 if big else 6 if quick else 10)  # many short blocks: see paired_speedup
    steps = opts["steps"] or (2 if big else 5)
    warmup = opts["warmup"] if opts["warmup"] is not None else (1 if big else 3)
    ctx = mp.get_context("spawn")
    rows = []
    try:
        for v in variants_for(recipe, opts, device):
            cfg = GPTConfig(vocab_size=vocab, attention=v.attention, **shape)
            here, there = ctx.Pipe()
            proc = ctx.Process(target=_worker, daemon=True,
                               args=(there, v, asdict(cfg), batch_size, str(dataset), str(device), dtype, warmup,
                                     opts["threads"]))
            proc.start()
            row = {"label": v.label, "cfg": cfg, "conn": here, "proc": proc, "blocks": [], "precision": v.precision}
            rows.append(row)
            row["setup_s"] = _receive(row, "ready")  # one setup at a time: they would compete for the cores
        for _ in range(repeats):
            for row in rows:  # alternate, so slow phases of a shared machine hit every variant alike
                row["conn"].send(steps)
                row["blocks"].append(_receive(row, "times"))
    finally:
        for row in rows:
            try:
                row["conn"].send(None)
            except (BrokenPipeError, OSError):
                pass
            row["proc"].join(timeout=30)
            if row["proc"].is_alive():
                row["proc"].kill()
    tokens = batch_size * shape["block_size"]
    out = []
    for row in rows:
        dt = median([t for block in row["blocks"] for t in block])
        flops = train_step_flops(row["cfg"], batch_size, shape["block_size"])
        speedup, low, high = paired_speedup(rows[0]["blocks"], row["blocks"])
        out.append({"recipe": recipe, "variant": row["label"], "ms": dt * 1e3, "tokens_per_s": tokens / dt,
                    "flops_per_s": flops / dt, "mfu": peaks[row["precision"]].mfu(flops / dt), "speedup": speedup,
                    "speedup_range": (low, high), "steps_timed": sum(map(len, row["blocks"])),
                    "setup_s": row["setup_s"]})
    return out


def paired_speedup(base_blocks: list[list[float]], blocks: list[list[float]]) -> tuple[float, float, float]:
    """Speed relative to the baseline from step times timed in alternating blocks: for each repeat r, the
    baseline's median step time in its block r over this variant's in its block r (timed seconds apart, so a
    slow phase of a shared machine hits both); returns the median of those per-repeat ratios and their min and
    max. A ratio of medians over the whole run lets a slow minute that hit one program's blocks more than the
    other's move the result."""
    if len(base_blocks) != len(blocks) or not blocks or not all(base_blocks) or not all(blocks):
        raise ValueError(f"paired_speedup needs the same number of non-empty blocks, got {len(base_blocks)} and "
                         f"{len(blocks)}")
    ratios = [median(b) / median(v) for b, v in zip(base_blocks, blocks)]
    return median(ratios), min(ratios), max(ratios)


def _receive(row: dict, kind: str):
    try:
        what, value = row["conn"].recv()
    except EOFError:
        raise RuntimeError(f"{row['label']}: worker process died (exit code {row['proc'].exitcode})") from None
    if what == "error":
        raise RuntimeError(f"{row['label']}: {value}")
    assert what == kind, (what, kind)
    return value


def cli_start(argv: list[str] | None, doc: str, usage: str) -> list[str] | None:
    """Shared start of the bench CLIs: the arguments (sys.argv[1:] by default), or None once -h/--help has
    printed `doc` and `usage`; puts the repository root on sys.path for the `model` imports."""
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(doc.strip() + "\n\n" + usage)
        return None
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return argv


def main(argv: list[str] | None = None) -> int:
    argv = cli_start(argv, __doc__, USAGE)
    if argv is None:
        return 0
    try:
        opts = parse_args(argv)
        import torch
        from model.training.data import ensure_dataset, load_meta
        from model.flops.peaks import device_peak
        from model.cli import resolve_device
        from model.training.runtime import resolve_dtype
        device = resolve_device(opts["device"])
        dataset = ensure_dataset(opts["dataset"] or default_dataset())
        meta = load_meta(dataset)
        if meta["dtype"] != "uint16":
            raise ValueError(f"{dataset}: the nanoGPT-style baseline reads uint16 tokens, this dataset is "
                             f"{meta['dtype']}")
    except (ValueError, FileNotFoundError) as e:
        print(f"train_speed.py: error: {e}", file=sys.stderr)
        return 2
    if opts["threads"]:
        torch.set_num_threads(opts["threads"])
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    dtype = resolve_dtype("auto", device)
    peak = device_peak(device)  # a peaks.Peak: a row faster than it raises it (and says so), so MFU <= 100%
    peaks = {"highest": peak, "high": peak}
    bf16_note = ""
    if device.type == "cpu" and opts["bf16_matmuls"] and bf16_cpu_matmuls_available():
        from model.training.runtime import matmul_precision
        with matmul_precision("medium", "cpu"):
            peaks["medium"] = device_peak(device)  # the bf16 matmul peak
        bf16_note = f"; bf16-mm rows: matmul_precision=medium, bf16 matmul peak {peaks['medium'].describe()}"
    recipes = opts["recipes"] or (["a"] if opts["quick"] else ["a", "b"])
    print(f"device {device} ({torch.get_num_threads()} threads), {dtype}, torch {torch.__version__}; dataset "
          f"{dataset} (vocab {meta['vocab_size']}); peak {peak.describe()}{bf16_note}",
          flush=True)
    results = []
    for recipe in recipes:
        shape, bs = RECIPES[recipe]
        print(f"\nrecipe ({recipe}): {shape['n_layer']} layers x {shape['n_head']} heads x {shape['n_embd']} wide, "
              f"block {shape['block_size']}, batch {bs}, dropout {shape['dropout']}", flush=True)
        try:
            rows = bench_recipe(recipe, opts, dataset, meta["vocab_size"], device, dtype, peaks)
        except RuntimeError as e:
            print(f"train_speed.py: error: {e}", file=sys.stderr)
            return 1
        print(f"{'variant':24s} {'ms/step':>9s} {'tokens/s':>10s} {'GFLOP/s':>9s} {'MFU':>7s} {'vs nanoGPT':>10s} "
              f"{'repeats range':>14s}")
        for r in rows:
            low, high = r["speedup_range"]
            print(f"{r['variant']:24s} {r['ms']:9.2f} {r['tokens_per_s']:10,.0f} {r['flops_per_s'] / 1e9:9.2f} "
                  f"{r['mfu']:7.2%} {r['speedup']:9.2f}x {low:7.2f}-{high:.2f}x", flush=True)
        for note in {id(p): p for p in peaks.values()}.values():
            while note.messages:
                print(note.messages.pop(0), flush=True)
        results += rows
    return 0


if __name__ == "__main__":
    sys.exit(main())
