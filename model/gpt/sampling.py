"""Text generation: sampling steps as pure functions on logits, KV-cached generation, and beam search.

The filters keep exactly the tokens Hugging Face transformers' TopKLogitsWarper / TopPLogitsWarper keep
(min_tokens_to_keep=1), and `beam_search` reproduces transformers' `generate(num_beams>1, do_sample=False)`
(version 5.x) step for step, scores included. The loops print nothing: streaming is a callback.

Context longer than block_size: like nanoGPT, only the last block_size tokens are fed to the model. With the
KV cache, positions are absolute within that window, so once the window starts to slide every new token
shifts all positions and the cache is rebuilt from the cropped window: past block_size a cached step costs a
full block_size-token forward, the same as an uncached one.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch.nn import functional as F

from ..config import check
from .decode import Decoder, check_kernels, resolve_dtype

NOT_A_CANDIDATE = -1.0e9  # transformers' score for beams that must not be chosen (kept for identical ties)


# ----------------------------------------------------------------------------------------------------
# Pure steps on logits (..., V)

def check_logits(logits: torch.Tensor) -> None:
    """Raise ValueError when a row contains NaN or +inf, or has no finite logit (all -inf): nothing to sample."""
    # the row maximum propagates NaN and is +inf/-inf exactly in the bad cases, and the float64 sum of the
    # row maxima is finite exactly when every one is: few ops per step (they bound small models' decoding)
    row_max = logits.amax(dim=-1)  # (...,)
    if not math.isfinite(row_max.sum(dtype=torch.float64)):
        bad = (~torch.isfinite(row_max)).nonzero()[0].tolist()
        raise ValueError(f"logits row {bad} is unusable for sampling (NaN, +inf, or every entry -inf): "
                         f"row max = {row_max[tuple(bad)].item()}")


def validate_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    check("temperature", temperature, float, 0)  # 0 = greedy
    if top_k is not None:
        check("top_k", top_k, int, 0)  # 0 = no filtering
    if top_p is not None:
        check("top_p", top_p, float, 0, 1, open_low=True)


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / temperature; temperature must be > 0 (greedy decoding is `greedy`, not a division by 0)."""
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0 here (use greedy for 0), got {temperature!r}")
    return logits if temperature == 1.0 else logits / temperature


def top_k_filter(logits: torch.Tensor, top_k: int | None) -> torch.Tensor:
    """Set to -inf every logit below the k-th largest of its row; ties with the k-th value are all kept.

    top_k None or 0 keeps everything; top_k > V is clamped to V. At least one token is always kept.
    """
    validate_sampling(1.0, top_k, None)
    if not top_k or top_k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (..., 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, top_p: float | None) -> torch.Tensor:
    """Nucleus filtering: keep the most probable tokens whose probabilities sum past top_p.

    Token j is dropped when the probability mass of j and every token sorted at or below it (ascending order)
    is <= 1 - top_p; the most probable token is always kept. Ties are ordered by the same ascending sort
    transformers uses, so the kept set is the one its TopPLogitsWarper keeps. top_p None or 1 keeps everything.
    """
    validate_sampling(1.0, None, top_p)
    if top_p is None or top_p >= 1.0:
        return logits
    ascending, order = torch.sort(logits, dim=-1)  # (..., V) each
    mass_at_or_below = ascending.softmax(dim=-1).cumsum(dim=-1)  # (..., V)
    drop_sorted = mass_at_or_below <= 1.0 - top_p  # (..., V)
    drop_sorted[..., -1] = False  # the top token survives whatever rounding did
    drop = torch.empty_like(drop_sorted).scatter_(-1, order, drop_sorted)  # (..., V) back in vocab order
    return logits.masked_fill(drop, float("-inf"))


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """The argmax token of each row: (..., V) -> (...,)."""
    return logits.argmax(dim=-1)


def sample(logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one token per row from softmax(logits) with an explicit generator: (B, V) -> (B,)."""
    probs = F.softmax(logits.float(), dim=-1)  # (B, V)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)  # (B,)


def next_token(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int | None = None,
               top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """One decoding step (B, V) -> (B,): greedy when temperature == 0, else temperature, top-k, top-p, sample.

    The order is transformers' warper order, so with torch.manual_seed(s) there and a generator seeded s here
    the same tokens are drawn.
    """
    if temperature == 0:
        check_logits(logits)
        return greedy(logits)
    logits = apply_temperature(logits, temperature)
    check_logits(logits)  # after scaling: a tiny temperature can overflow to inf
    logits = top_p_filter(top_k_filter(logits, top_k), top_p)
    return sample(logits, generator)


def ban_repeated_ngrams(seqs: torch.Tensor, log_probs: torch.Tensor, n: int) -> torch.Tensor:
    """Set to -inf each token that would complete an n-gram already present in its row of seqs (N, L).

    The candidates are the n-grams whose first n-1 tokens equal the row's last n-1 tokens; each bans its last
    token. Same rule as transformers' NoRepeatNGramLogitsProcessor.
    """
    N, L = seqs.shape
    if n <= 0 or L < n:
        return log_probs
    windows = seqs.unfold(1, n, 1)  # (N, L-n+1, n), every n-gram of each row
    suffix = seqs[:, L - n + 1:]  # (N, n-1), the prefix the next token would extend
    hit = (windows[:, :, :-1] == suffix[:, None, :]).all(dim=-1)  # (N, L-n+1)
    # scatter_add, not scatter: a token can be hit by one window and missed by another
    banned = torch.zeros(N, log_probs.size(-1), device=log_probs.device)  # (N, V)
    banned.scatter_add_(1, windows[:, :, -1], hit.float())
    return log_probs.masked_fill(banned > 0, float("-inf"))


# ----------------------------------------------------------------------------------------------------
# The model's view of a growing batch of sequences

class _Window:
    """Next-token logits for each row of seqs[:, :length], fed through the KV cache when there is one.

    The model sees the last block_size tokens (nanoGPT's crop). With a cache, one new token per call is fed
    while the window does not move; when it slides, positions shift, so the cache is refilled from the
    cropped window (the uncached computation exactly, at the uncached cost). fast=True (with the cache) runs
    the steps through model.gpt.decode.Decoder, else through the model's forward; dtype (None: the model's)
    is the weights' and the cache's dtype; kernels: the decoder's matrix kernels (decode.check_kernels).
    """

    def __init__(self, model, rows: int, total_len: int, use_cache: bool, fast: bool = False, dtype=None,
                 kernels: str = "torch"):
        self.block = model.config.block_size
        self.decoder = Decoder(model, dtype, kernels) if fast and use_cache else None
        if self.decoder is None and dtype not in (None, model.transformer.wte.weight.dtype):
            model = copy.deepcopy(model).to(dtype)  # the reference path in lower precision: a cast copy
        self.model = model
        source = self.decoder if self.decoder is not None else model
        self.cache = source.new_cache(rows, min(self.block, total_len)) if use_cache else None
        self.start = 0  # absolute index of the cache's first token

    def logits(self, seqs: torch.Tensor, length: int) -> torch.Tensor:
        start = max(0, length - self.block)
        cache = self.cache
        if cache is not None and cache.pos > 0 and start == self.start and cache.pos == length - start - 1:
            x = seqs[:, length - 1:length]  # (N, 1): only the newest token
        else:
            if cache is not None:
                cache.reset()
                self.start = start
            x = seqs[:, start:length]  # (N, <=block_size)
        if self.decoder is not None:
            return self.decoder(x, cache)  # (N, V) float32
        logits, _ = self.model(x, kv_cache=cache, last_only=True)  # (N, 1, V)
        return logits[:, -1].float()  # (N, V)

    def reorder(self, index: torch.Tensor, shared: list[int] | None = None) -> None:
        """Keep rows `index`; new row i's first shared[i] tokens equal its source's: while the window has not
        slid, their cache positions are equal too, and stay put."""
        if self.cache is not None:
            self.cache.reorder(index, shared if self.start == 0 else None)


def _check_prompt(model, idx: torch.Tensor) -> None:
    if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.dtype not in (torch.int64, torch.int32):
        shape = tuple(idx.shape) if isinstance(idx, torch.Tensor) else type(idx).__name__
        raise ValueError(f"idx must be a 2-D integer tensor (batch, time), got {shape}")
    if idx.size(0) == 0 or idx.size(1) == 0:
        raise ValueError(f"idx must hold at least one token per row, got shape {tuple(idx.shape)}")
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= model.config.vocab_size:
        raise ValueError(f"token id {lo if lo < 0 else hi} outside the vocabulary [0, {model.config.vocab_size})")


def _check_eos(model, eos_token_id) -> None:
    if eos_token_id is not None:
        check("eos_token_id", eos_token_id, int, 0, model.config.vocab_size, open_high=True)


def _check_decoding(model, idx: torch.Tensor, fast, dtype, kernels, use_cache) -> torch.dtype | None:
    """Validate fast, dtype and kernels; return dtype as a torch dtype (None: the model's)."""
    if not isinstance(fast, bool):
        raise ValueError(f"fast must be True or False, got {fast!r}")
    dtype = resolve_dtype(dtype, idx.device)
    if kernels != "torch" and not (fast and use_cache):
        raise ValueError(f"kernels={kernels!r} runs on the fast cached path: it needs fast=True and use_cache=True")
    check_kernels(kernels, model.transformer.wte.weight.dtype if dtype is None else dtype, idx.device)
    return dtype


class _EvalMode:
    """Eval mode inside the block, the caller's train/eval mode restored after."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.was_training = self.model.training
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was_training)


# ----------------------------------------------------------------------------------------------------
# Sampling / greedy generation

def generate(model, idx: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, eos_token_id: int | None = None,
             generator: torch.Generator | None = None, use_cache: bool = True,
             on_token: Callable[[torch.Tensor], None] | None = None, stats: dict | None = None,
             fast: bool = True, dtype: torch.dtype | str | None = None, kernels: str = "torch") -> torch.Tensor:
    """Extend each prompt row of idx (B, T) by up to max_new_tokens tokens -> (B, T + n), n <= max_new_tokens.

    temperature=0 is greedy (argmax); otherwise logits / temperature, then top-k, then top-p, then one draw
    per row from `generator` (None: torch's default generator). A row that emits eos_token_id has finished:
    later positions are filled with eos_token_id while other rows continue, and generation stops early once
    every row has finished (as transformers does), so n can be < max_new_tokens. on_token, when given, is
    called with the (B,) tokens of each step (streaming). Runs under torch.inference_mode() in eval mode and
    restores the model's train/eval mode afterwards. use_cache=False recomputes the whole (cropped) context
    each step; both give the same tokens. stats, when given (a dict), receives rows, prompt_len, new_tokens,
    use_cache, prefill_seconds (up to the first token) and seconds (all): two clock reads (and, on CUDA, two
    syncs) per call; model.flops.roofline.decoding_summary turns them into tokens/s, GB/s, MBU and MFU.
    fast=True (with the cache) decodes through model.gpt.decode, else through the model's forward: the same
    function. dtype ("bfloat16", "float16" on CUDA, "float32"; None: the model's) holds the weights and the
    cache in that precision (a cast copy of the weights, made per call: cast the model once to avoid it);
    logits and sampling stay in float32. kernels="avx512" runs each step of up to 4 rows as one call of
    model.gpt.cpu_decode (x86 CPUs with AVX-512; built on first use): closer to the memory bandwidth, and no
    per-op dispatch; "torch" (the default) uses torch's ops.
    """
    _check_prompt(model, idx)
    check("max_new_tokens", max_new_tokens, int, 0)
    validate_sampling(temperature, top_k, top_p)
    _check_eos(model, eos_token_id)
    dtype = _check_decoding(model, idx, fast, dtype, kernels, use_cache)
    with _EvalMode(model), torch.inference_mode():
        B, T = idx.shape
        out = torch.empty(B, T + max_new_tokens, dtype=torch.long, device=idx.device)  # (B, T+n), filled below
        out[:, :T] = idx
        window = _Window(model, B, T + max_new_tokens, use_cache, fast, dtype, kernels)
        finished = torch.zeros(B, dtype=torch.bool, device=idx.device) if eos_token_id is not None else None
        length = T
        start = time.perf_counter()
        for step in range(max_new_tokens):
            logits = window.logits(out, length)  # (B, V)
            tok = next_token(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
            if stats is not None and step == 0:
                stats["prefill_seconds"] = _elapsed(start, idx.device)
            if finished is not None:
                tok = tok.masked_fill(finished, eos_token_id)  # (B,) finished rows are padded with eos
                finished |= tok == eos_token_id
            out[:, length] = tok
            length += 1
            if on_token is not None:
                on_token(tok)
            if finished is not None and bool(finished.all()):
                break
        if stats is not None:
            stats.update(rows=B, prompt_len=T, new_tokens=length - T, use_cache=use_cache,
                         seconds=_elapsed(start, idx.device))
        return out[:, :length]


def _elapsed(start: float, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


# ----------------------------------------------------------------------------------------------------
# Beam search (the semantics of transformers 5.x `generate(num_beams>1, do_sample=False)`)

def _pick(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows of t (B, K, ...) chosen per batch by index (B, m) -> (B, m, ...)."""
    index = index.view(*index.shape, *([1] * (t.dim() - 2))).expand(*index.shape, *t.shape[2:])
    return t.gather(1, index)


def _check_beam_args(num_beams, length_penalty, early_stopping, no_repeat_ngram_size,
                     num_return_sequences) -> None:
    check("num_beams", num_beams, int, 1)
    check("length_penalty", length_penalty, float)
    if not (early_stopping is True or early_stopping is False or early_stopping == "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
    check("no_repeat_ngram_size", no_repeat_ngram_size, int, 0)
    check("num_return_sequences", num_return_sequences, int, 1)
    if num_return_sequences > num_beams:
        raise ValueError(f"num_return_sequences={num_return_sequences} exceeds num_beams={num_beams}")


@dataclass(frozen=True)
class BeamSettings:
    """beam_search's options, validated (see beam_search for what each means)."""

    num_beams: int
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    eos_token_id: int | None = None
    no_repeat_ngram_size: int = 0
    num_return_sequences: int = 1
    use_cache: bool = True
    fast: bool = True
    dtype: torch.dtype | None = None
    kernels: str = "torch"


def beam_search(model, idx: torch.Tensor, max_new_tokens: int, *, num_beams: int, length_penalty: float = 1.0,
                early_stopping: bool | str = False, eos_token_id: int | None = None,
                no_repeat_ngram_size: int = 0, num_return_sequences: int = 1, use_cache: bool = True,
                fast: bool = True, dtype: torch.dtype | str | None = None,
                kernels: str = "torch") -> tuple[torch.Tensor, torch.Tensor]:
    """Beam search over prompts idx (B, T) -> (sequences (B·R, <= T+n), scores (B·R,)), R = num_return_sequences.

    Returns, per prompt, the R best finished hypotheses, best first. A hypothesis finishes when it emits
    eos_token_id or reaches T + max_new_tokens tokens; its score is its summed log-probability divided by
    (generated tokens, eos included, prompt excluded) ** length_penalty (transformers' `sequences_scores`).
    Each step looks at the 2·num_beams best (beam, token) continuations: an eos among the first num_beams
    is a finished candidate, the best num_beams non-eos ones continue. The search stops when every step is
    taken, or when no open beam can still beat the worst of the num_beams kept hypotheses of any prompt:
    early_stopping=True stops a prompt as soon as num_beams hypotheses have finished; False estimates the
    best reachable score at the current length; "never" (with length_penalty > 0) at the maximum length.
    Sequences shorter than the longest returned one are padded with eos_token_id. num_beams=1 is greedy
    decoding (as in transformers), scored the same way. no_repeat_ngram_size=n > 0 forbids repeating any
    n-gram (prompt included). fast, dtype and kernels: as for `generate`.
    """
    _check_prompt(model, idx)
    check("max_new_tokens", max_new_tokens, int, 1)
    _check_beam_args(num_beams, length_penalty, early_stopping, no_repeat_ngram_size, num_return_sequences)
    _check_eos(model, eos_token_id)
    dtype = _check_decoding(model, idx, fast, dtype, kernels, use_cache)
    opts = BeamSettings(num_beams=num_beams, length_penalty=length_penalty, early_stopping=early_stopping,
                        eos_token_id=eos_token_id, no_repeat_ngram_size=no_repeat_ngram_size,
                        num_return_sequences=num_return_sequences, use_cache=use_cache, fast=fast, dtype=dtype,
                        kernels=kernels)
    with _EvalMode(model), torch.inference_mode():
        if num_beams == 1:
            return _greedy_scored(model, idx, max_new_tokens, opts)
        return _beam_search(model, idx, max_new_tokens, opts)


def _greedy_scored(model, idx: torch.Tensor, max_new_tokens: int, opts: BeamSettings):
    B, T = idx.shape
    eos = opts.eos_token_id
    out = torch.empty(B, T + max_new_tokens, dtype=torch.long, device=idx.device)  # (B, T+n)
    out[:, :T] = idx
    window = _Window(model, B, T + max_new_tokens, opts.use_cache, opts.fast, opts.dtype, opts.kernels)
    total = torch.zeros(B, device=idx.device)  # (B,) summed log-probabilities of the chosen tokens
    gen_len = torch.zeros(B, dtype=torch.long, device=idx.device)  # (B,) tokens generated up to eos
    finished = torch.zeros(B, dtype=torch.bool, device=idx.device)
    length = T
    for _ in range(max_new_tokens):
        log_probs = F.log_softmax(window.logits(out, length), dim=-1)  # (B, V)
        check_logits(log_probs)
        log_probs = ban_repeated_ngrams(out[:, :length], log_probs, opts.no_repeat_ngram_size)
        tok = greedy(log_probs)  # (B,)
        live = ~finished
        total += torch.where(live, log_probs.gather(1, tok[:, None]).squeeze(1), 0.0)
        gen_len += live.long()
        if eos is not None:
            tok = tok.masked_fill(finished, eos)
            finished |= tok == eos
        out[:, length] = tok
        length += 1
        if eos is not None and bool(finished.all()):
            break
    return out[:, :length], total / gen_len.double().pow(opts.length_penalty).float()


@dataclass
class _Beams:
    """The search's state per prompt: nb open beams and the nb best finished hypotheses."""

    running: torch.Tensor  # (B, nb, L) open beams, padded
    run_score: torch.Tensor  # (B, nb) summed log-probabilities
    fin_seq: torch.Tensor  # (B, nb, L) the nb best finished hypotheses
    fin_score: torch.Tensor  # (B, nb) length-penalised
    fin_done: torch.Tensor  # (B, nb) slot holds a real hypothesis
    fin_len: torch.Tensor  # (B, nb) generated tokens
    improvable: torch.Tensor  # (B, 1) open beams may still win

    @classmethod
    def start(cls, idx: torch.Tensor, L: int, nb: int, pad: int) -> "_Beams":
        B, T = idx.shape
        dev = idx.device
        running = torch.full((B, nb, L), pad, dtype=torch.long, device=dev)  # (B, nb, L)
        running[:, :, :T] = idx[:, None, :]
        run_score = torch.zeros(B, nb, device=dev)  # (B, nb)
        run_score[:, 1:] = NOT_A_CANDIDATE  # identical beams at the start: only beam 0 may expand
        return cls(running, run_score, running.clone(), torch.full((B, nb), NOT_A_CANDIDATE, device=dev),
                   torch.zeros(B, nb, dtype=torch.bool, device=dev), torch.zeros(B, nb, dtype=torch.long, device=dev),
                   torch.ones(B, 1, dtype=torch.bool, device=dev))


def _beam_search(model, idx: torch.Tensor, max_new_tokens: int, opts: BeamSettings):
    B, T = idx.shape
    nb, L = opts.num_beams, T + max_new_tokens
    beams = _Beams.start(idx, L, nb, pad=opts.eos_token_id if opts.eos_token_id is not None else 0)
    batch_base = torch.arange(B, device=idx.device)[:, None] * nb  # (B, 1) row offset of each prompt's beams
    # prefill the B prompts once, then give every beam a copy of its prompt's cache rows
    window = _Window(model, B, L, opts.use_cache, opts.fast, opts.dtype, opts.kernels)
    logits = window.logits(idx, T).repeat_interleave(nb, dim=0)  # (B·nb, V)
    window.reorder(torch.arange(B, device=idx.device).repeat_interleave(nb))
    for step in range(max_new_tokens):
        cur = T + step  # tokens in each open beam
        log_probs = F.log_softmax(logits, dim=-1)  # (B·nb, V)
        check_logits(log_probs)
        log_probs = ban_repeated_ngrams(beams.running.view(B * nb, L)[:, :cur], log_probs,
                                        opts.no_repeat_ngram_size)
        cand_score, cand_beam, cand_seq, ends = _candidates(beams, log_probs, cur, last=step == max_new_tokens - 1,
                                                            eos=opts.eos_token_id)
        old = beams.running.view(B * nb, L)  # the beams whose keys and values the cache holds
        src_row = _keep_open(beams, cand_score, cand_beam, cand_seq, ends) + batch_base  # (B, nb)
        _keep_finished(beams, cand_score, cand_seq, ends, new_len=cur + 1 - T, opts=opts)
        _update_improvable(beams, opts, length=cur + 1 - T, max_length=L - T)
        stop = ~beams.improvable.any() | (beams.fin_done.all() & (opts.early_stopping is True)) | ends.all()
        if step == max_new_tokens - 1 or bool(stop):
            break
        window.reorder(src_row.view(-1), shared=_shared_prefix(old, src_row.view(-1), cur))
        logits = window.logits(beams.running.view(B * nb, L), cur + 1)  # (B·nb, V)
    R = opts.num_return_sequences
    seqs = beams.fin_seq[:, :R].reshape(B * R, L)  # (B·R, L)
    out_len = T + int(beams.fin_len[:, :R].max())
    return seqs[:, :out_len], beams.fin_score[:, :R].reshape(B * R)


def _shared_prefix(seqs: torch.Tensor, index: torch.Tensor, cur: int) -> list[int]:
    """For each row i of seqs (N, L), how many of its first cur tokens it shares with row index[i]: beams
    descend from few ancestors, so a beam that continues another usually differs from it in its last few
    tokens only, and the cache copies just those positions (rows of one prompt share at least the prompt)."""
    differ = seqs[:, :cur] != seqs[index, :cur]  # (N, cur)
    return torch.where(differ.any(dim=1), differ.int().argmax(dim=1), cur).tolist()  # (N,) first difference


def _candidates(beams: _Beams, log_probs: torch.Tensor, cur: int, *, last: bool, eos: int | None):
    """The 2·nb best (beam, token) continuations per prompt: (score, beam, sequence, ends), best first."""
    B, nb, L = beams.running.shape
    K = 2 * nb  # enough that num_beams of them are not eos
    V = log_probs.size(-1)
    total = log_probs.view(B, nb, V) + beams.run_score[:, :, None]  # (B, nb, V)
    # the K best of each beam, then the K best of those: the K best of all nb·V (as transformers' one topk
    # over them finds, up to the order of exact ties) at a third of the cost for a 50k vocabulary
    beam_score, beam_tok = torch.topk(total, min(K, V), dim=2)  # (B, nb, k) each
    cand_score, pick = torch.topk(beam_score.view(B, -1), K, dim=1)  # (B, K) each, best first
    cand_beam, cand_tok = pick // beam_score.size(2), beam_tok.view(B, -1).gather(1, pick)  # (B, K) each
    cand_seq = _pick(beams.running, cand_beam)  # (B, K, L)
    cand_seq[:, :, cur] = cand_tok
    if last:
        ends = torch.ones(B, K, dtype=torch.bool, device=pick.device)  # max length: every candidate ends
    elif eos is not None:
        ends = cand_tok == eos  # (B, K)
    else:
        ends = torch.zeros(B, K, dtype=torch.bool, device=pick.device)
    return cand_score, cand_beam, cand_seq, ends


def _keep_open(beams: _Beams, cand_score, cand_beam, cand_seq, ends) -> torch.Tensor:
    """The nb best candidates that did not end become the open beams; returns each new beam's old beam (B, nb)."""
    nb = beams.running.size(1)
    open_score = cand_score + ends.float() * NOT_A_CANDIDATE  # (B, K)
    keep = torch.topk(open_score, nb, dim=1).indices  # (B, nb)
    beams.running = _pick(cand_seq, keep)  # (B, nb, L)
    beams.run_score = open_score.gather(1, keep)  # (B, nb)
    return cand_beam.gather(1, keep)  # (B, nb)


def _keep_finished(beams: _Beams, cand_score, cand_seq, ends, *, new_len: int, opts: BeamSettings) -> None:
    """Candidates that ended among the first nb compete with the kept hypotheses on penalised score."""
    B, nb, _ = beams.running.shape
    K = cand_score.size(1)
    fresh = ends & (torch.arange(K, device=ends.device) < nb)  # (B, K) only the first nb may finish
    scored = cand_score / (new_len ** opts.length_penalty)  # (B, K)
    closed = beams.fin_done.all(dim=1, keepdim=True) & (opts.early_stopping is True)  # (B, 1) nb finished
    scored = scored + closed.float() * NOT_A_CANDIDATE
    scored = scored + (~beams.improvable).float() * NOT_A_CANDIDATE
    scored = scored + (~fresh).float() * NOT_A_CANDIDATE
    merged_score = torch.cat((beams.fin_score, scored), dim=1)  # (B, nb+K)
    best = torch.topk(merged_score, nb, dim=1).indices  # (B, nb)
    beams.fin_score = merged_score.gather(1, best)
    beams.fin_seq = _pick(torch.cat((beams.fin_seq, cand_seq), dim=1), best)  # (B, nb, L)
    beams.fin_done = torch.cat((beams.fin_done, fresh), dim=1).gather(1, best)  # (B, nb)
    lengths = torch.full((B, K), new_len, dtype=torch.long, device=ends.device)  # (B, K)
    beams.fin_len = torch.cat((beams.fin_len, lengths), dim=1).gather(1, best)  # (B, nb)


def _update_improvable(beams: _Beams, opts: BeamSettings, *, length: int, max_length: int) -> None:
    """Can an open beam still beat the worst kept hypothesis? (transformers' heuristic, per prompt)"""
    reach = max_length if (opts.early_stopping == "never" and opts.length_penalty > 0.0) else length
    best_open = beams.run_score[:, :1] / (reach ** opts.length_penalty)  # (B, 1)
    worst_kept = torch.where(beams.fin_done, beams.fin_score.min(dim=1, keepdim=True).values,
                             NOT_A_CANDIDATE)  # (B, nb)
    beams.improvable = beams.improvable & (best_open > worst_kept).any(dim=1, keepdim=True)
