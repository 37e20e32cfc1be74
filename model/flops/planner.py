"""Compute planner: the exact training compute of a run of N tokens, its wall time, and its scale class.

Exact compute = ceil(N / T) whole sequences of T tokens, each costing train_step_flops(config, 1, T) (the
forward+backward matmul FLOPs of model/flops/formulas.py), beside 6ND (N = all parameters, D = the tokens asked for)
and PaLM's (6N + 12·L·H·Q·T)·D.
"""
from __future__ import annotations

import math
import re
import sys
from decimal import Decimal, InvalidOperation

from . import approximations
from . import formulas as flops
from ..config import GPTConfig, check

# Powers of ten and the names used for compute at that scale ("exascale" = 10^18 up to 10^21 FLOPs).
SCALES = ((10 ** 24, "yottascale"), (10 ** 21, "zettascale"), (10 ** 18, "exascale"), (10 ** 15, "petascale"),
          (10 ** 12, "terascale"), (10 ** 9, "gigascale"), (10 ** 6, "megascale"), (10 ** 3, "kiloscale"))
SUFFIXES = {"k": 10 ** 3, "m": 10 ** 6, "b": 10 ** 9, "g": 10 ** 9, "t": 10 ** 12}
DEFAULT_MFU = 0.4
FLOAT_MAX = sys.float_info.max


def scale_class(total_flops: int | float) -> str:
    """yottascale for >= 10^24 FLOPs, zettascale for [10^21, 10^24), exascale for [10^18, 10^21), ... down
    to kiloscale for [10^3, 10^6); below 10^3 "sub-kiloscale". Compared with the integer thresholds exactly:
    a float counts as the decimal it prints as (repr), so 1e24 is 10^24 although the binary float is a little
    below it."""
    check("FLOPs", total_flops, float, 0)
    value = Decimal(total_flops) if isinstance(total_flops, int) else Decimal(repr(total_flops))
    for threshold, name in SCALES:
        if value >= threshold:
            return name
    return "sub-kiloscale"


def parse_tokens(text: str | int) -> int:
    """A positive whole number of tokens: 300000000000, 300_000_000_000, 300e9, 3e11, or with a suffix
    k/K (10^3), M (10^6), B or G (10^9), T (10^12): 300B, 1.4T, 2.5M."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = Decimal(text)
    else:
        s = str(text).strip().replace("_", "").replace(",", "")
        multiplier = 1
        if s and s[-1].lower() in SUFFIXES:
            multiplier, s = SUFFIXES[s[-1].lower()], s[:-1]
        if not re.fullmatch(r"[0-9]*\.?[0-9]+([eE][+-]?[0-9]+)?|[0-9]+\.", s):
            raise ValueError(f"tokens must be a positive number like 300e9 or 300B, got {text!r}")
        try:
            value = Decimal(s) * multiplier
        except InvalidOperation:
            raise ValueError(f"tokens must be a positive number like 300e9 or 300B, got {text!r}") from None
    if value <= 0 or value != value.to_integral_value():
        raise ValueError(f"tokens must be a positive whole number, got {text!r}")
    return int(value)


def plan_run(config: GPTConfig, tokens: int, seq_len: int, peak_flops: float, mfu: float = DEFAULT_MFU) -> dict:
    """Exact training compute of `tokens` tokens in sequences of `seq_len`, and the time at `mfu` of `peak_flops`.

    Keys: tokens, seq_len, sequences (ceil(tokens/seq_len): a partial sequence costs a whole one),
    tokens_trained, flops_per_sequence, flops (exact), flops_6nd, flops_palm, ratio_6nd, ratio_palm
    (approximation / exact), peak_flops, mfu, seconds, scale, per_generated_token ({"cached", "uncached"}:
    one new token at context seq_len, with and without a KV cache).
    """
    check("tokens", tokens, int, 1)
    check("seq_len", seq_len, int, 1, config.block_size)
    if not (isinstance(peak_flops, (int, float)) and math.isfinite(peak_flops) and peak_flops > 0):
        raise ValueError(f"peak_flops must be a positive FLOP/s, got {peak_flops!r}")
    if not (isinstance(mfu, (int, float)) and 0 < mfu <= 1):
        raise ValueError(f"mfu must be in (0, 1], got {mfu!r}")
    sequences = -(-tokens // seq_len)
    per_sequence = flops.train_step_flops(config, 1, seq_len)
    total = sequences * per_sequence
    six_nd = approximations.six_n(config, tokens)
    palm = approximations.palm(config, seq_len, tokens)
    seconds = _finite_seconds(total, tokens, peak_flops, mfu)
    return {
        "tokens": tokens,
        "seq_len": seq_len,
        "sequences": sequences,
        "tokens_trained": sequences * seq_len,
        "flops_per_sequence": per_sequence,
        "flops": total,
        "flops_6nd": six_nd,
        "flops_palm": palm,
        "ratio_6nd": six_nd / total,
        "ratio_palm": palm / total,
        "peak_flops": float(peak_flops),
        "mfu": float(mfu),
        "seconds": seconds,
        "scale": scale_class(total),
        "per_generated_token": {
            "cached": flops.decode_step(config, 1, seq_len - 1).total,
            "uncached": flops.step(config, 1, seq_len, 0, last_only=True).total,
        },
    }


def _finite_seconds(total: int, tokens: int, peak_flops: float, mfu: float) -> float:
    """total / (peak_flops · mfu), or ValueError naming the input when the compute or the time is not a finite
    float (a number JSON and the tables cannot hold)."""
    if total > FLOAT_MAX:
        raise ValueError(f"tokens={Decimal(tokens):.3e}: the training compute ({Decimal(total):.3e} FLOPs) is "
                         f"beyond the largest float ({FLOAT_MAX:.3e}); no finite plan")
    rate = peak_flops * mfu
    seconds = total / rate if rate > 0 else math.inf
    if not math.isfinite(seconds):
        raise ValueError(f"peak_flops={peak_flops!r} at mfu={mfu!r}: {total:.3e} FLOPs would take longer than the "
                         f"largest float of seconds; no finite plan")
    return seconds
