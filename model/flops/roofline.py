"""The roofline (Williams, Waterman and Patterson 2009): a step can go no faster than its FLOPs at the peak
FLOP/s, nor than its bytes at the memory bandwidth; the slower of the two binds.

    intensity I = FLOPs / bytes            ridge = peak FLOP/s / bandwidth (FLOP per byte)
    I < ridge: memory-bound, time >= bytes / bandwidth;  I >= ridge: compute-bound, time >= FLOPs / peak

FLOPs are the exact matmul FLOPs of model/flops/formulas.py (the MFU count); per component, the non-matmul ops
add their per-element conventions (as in the profile). Bytes follow model/flops/bytes.py's two conventions:
`minimum` decides the step's bound (what a perfect implementation meets), `unfused` is shown beside it and per
component (the traffic if every op were its own kernel and nothing stayed in cache).
"""
from __future__ import annotations

import math

from . import bytes as nbytes
from . import formulas
from ..config import GPTConfig, check
from .profile import component_flops

FUSED_PARTS = ("attn_scores", "softmax", "attn_values")


def bound(flops: int, nbytes_: int, peak_flops: float, bandwidth: float) -> dict:
    """The roofline of one piece of work: intensity, ridge, which roof binds, and the time each allows."""
    for name, value in (("peak_flops", peak_flops), ("bandwidth", bandwidth)):
        if isinstance(value, bool) or not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    check("flops", flops, int, 0)
    check("bytes", nbytes_, int, 1)
    intensity, ridge = flops / nbytes_, peak_flops / bandwidth
    compute, memory = flops / peak_flops, nbytes_ / bandwidth
    return {"flops": flops, "bytes": nbytes_, "intensity": intensity, "ridge": ridge,
            "bound": "memory" if intensity < ridge else "compute", "compute_seconds": compute,
            "memory_seconds": memory, "seconds": max(compute, memory),
            "attainable_flops_per_s": min(peak_flops, intensity * bandwidth)}


def forward_component_flops(cfg: GPTConfig, batch: int, q_len: int, past: int, last_only: bool) -> dict[str, int]:
    """FLOPs per component of one forward call (the profile's rows), non-matmul ops by their conventions."""
    step = formulas.step(cfg, batch, q_len, past, last_only=last_only)
    mm, nm = step.matmul, step.non_matmul
    rows = {"qkv": mm["qkv"], "attn_scores": mm["attn_scores"] + nm["attn_scale"], "softmax": nm["softmax"],
            "attn_values": mm["attn_values"], "attn_proj": mm["attn_proj"], "mlp_up": mm["mlp_up"],
            "gelu": nm["gelu"], "mlp_down": mm["mlp_down"], "layer_norm": nm["layer_norm"],
            "lm_head": mm["lm_head"], "other": nm["residual_add"] + nm["position_add"] + nm["bias_add"]}
    return _fuse(cfg, rows)


def _fuse(cfg: GPTConfig, rows: dict[str, int]) -> dict[str, int]:
    if cfg.attention == "sdpa":
        rows = {k: v for k, v in rows.items() if k not in FUSED_PARTS} | {
            "attention_fused": sum(rows.get(k, 0) for k in FUSED_PARTS) + rows.get("attention_fused", 0)}
    return rows


def _components(flops: dict[str, int], unfused: dict[str, int], peak_flops: float, bandwidth: float) -> dict:
    """Per component: FLOPs, unfused bytes, and the roofline of the pair (no FLOPs: intensity 0, memory)."""
    out = {}
    for name in list(flops) + [k for k in unfused if k not in flops]:
        f, b = flops.get(name, 0), unfused.get(name, 0)
        if b:
            out[name] = bound(f, b, peak_flops, bandwidth)
    return out


def step_roofline(cfg: GPTConfig, kind: str, batch: int, length: int, dtype, peak_flops: float,
                  bandwidth: float) -> dict:
    """The roofline of a training step (kind "train_step", seq_len = length) or a decode step ("decode_step",
    context = length): the step under both byte conventions (the minimum one decides `bound`) and per
    component (unfused bytes)."""
    if kind == "train_step":
        flops = formulas.train_step_flops(cfg, batch, length)
        minimum = nbytes.train_minimum_bytes(cfg, batch, length, dtype)
        unfused = _fuse(cfg, nbytes.unfused_train_step(cfg, batch, length, dtype))
        comp_flops = component_flops(cfg, batch, length, cfg.attention == "sdpa")
        comp_flops.pop("other", None)  # the profile's "other" FLOPs are the residual/position/bias adds
        comp_flops["other"] = component_flops(cfg, batch, length, False)["other"]
    elif kind == "decode_step":
        flops = formulas.decode_step(cfg, batch, length - 1).total
        minimum = nbytes.decode_minimum_bytes(cfg, batch, length, dtype)
        unfused = _fuse(cfg, nbytes.unfused_decode(cfg, batch, length, dtype))
        comp_flops = forward_component_flops(cfg, batch, 1, length - 1, True)
    else:
        raise ValueError(f"kind must be train_step or decode_step, got {kind!r}")
    result = {"flops": flops, "minimum": bound(flops, minimum["total"], peak_flops, bandwidth),
              "unfused": bound(flops, sum(unfused.values()), peak_flops, bandwidth),
              "minimum_bytes": minimum, "components": _components(comp_flops, unfused, peak_flops, bandwidth)}
    result["bound"] = result["minimum"]["bound"]
    return result


def decode_compute_bound_batch(cfg: GPTConfig, context: int, dtype, peak_flops: float, bandwidth: float,
                               limit: int = 1 << 40) -> int | None:
    """The smallest batch at which a decode step at `context` turns compute-bound under the minimum bytes:
    FLOPs B·f grow with the batch, bytes W + B·k (weights once, KV cache and ids/logits per row), so the
    intensity B·f / (W + B·k) rises toward f / k. Returns None when f / k stays below the ridge (the KV cache
    keeps even an infinite batch memory-bound) or the batch would exceed `limit`."""
    ridge = peak_flops / bandwidth
    f = formulas.decode_step(cfg, 1, context - 1).total
    one, two = (nbytes.decode_minimum_bytes(cfg, b, context, dtype)["total"] for b in (1, 2))
    k = two - one
    w = one - k
    if f <= ridge * k:
        return None
    batch = max(1, math.ceil(ridge * w / (f - ridge * k)))
    # the closed form in floating point: settle the integer on the exact arithmetic
    while batch > 1 and f * (batch - 1) >= ridge * (w + (batch - 1) * k):
        batch -= 1
    while f * batch < ridge * (w + batch * k):
        batch += 1
    return batch if batch <= limit else None


def roofline(cfg: GPTConfig, batch: int, seq_len: int, context: int, dtype, peak_flops: float,
             bandwidth: float) -> dict:
    """Training step (batch x seq_len) and decode step (batch rows, `context` keys) against the roofs."""
    check("context", context, int, 1, cfg.block_size)
    return {"peak_flops": peak_flops, "bandwidth": bandwidth, "ridge": peak_flops / bandwidth,
            "dtype": str(dtype).replace("torch.", ""), "batch_size": batch, "seq_len": seq_len, "context": context,
            "train_step": step_roofline(cfg, "train_step", batch, seq_len, dtype, peak_flops, bandwidth),
            "decode_step": step_roofline(cfg, "decode_step", batch, context, dtype, peak_flops, bandwidth),
            "decode_compute_bound_batch": decode_compute_bound_batch(cfg, context, dtype, peak_flops, bandwidth)}


def plot_roofline(result: dict, path, title: str = "") -> None:
    """Log-log roofline: attainable FLOP/s against FLOPs per byte, both roofs, the ridge, and one labelled
    point per component (unfused bytes) and for the whole step (both conventions), training and decoding."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    peak, bw = result["peak_flops"], result["bandwidth"]
    fig, axes = plt.subplots(1, 2, figsize=(14, 6))
    for ax, kind, label in ((axes[0], "train_step", f"training step, batch {result['batch_size']} x "
                                                    f"{result['seq_len']}"),
                            (axes[1], "decode_step", f"decode step, batch {result['batch_size']}, context "
                                                     f"{result['context']}")):
        step = result[kind]
        points = [(n, c["intensity"]) for n, c in step["components"].items() if c["intensity"] > 0]
        points += [("step (minimum)", step["minimum"]["intensity"]), ("step (unfused)", step["unfused"]["intensity"])]
        xs = [x for _, x in points] + [result["ridge"]]
        lo, hi = min(xs) / 4, max(xs) * 4
        grid = [lo * (hi / lo) ** (i / 200) for i in range(201)]
        ax.plot(grid, [min(peak, x * bw) for x in grid], color="black", lw=2)
        ax.axvline(result["ridge"], color="gray", ls=":", lw=1)
        ax.text(result["ridge"], peak * 1.08, f"ridge {result['ridge']:.3g} FLOP/B", ha="center", fontsize=8)
        ax.text(lo * 1.2, peak * 1.08, f"peak {peak / 1e9:,.0f} GFLOP/s", fontsize=8)
        ax.text(lo * 1.2, lo * 1.2 * bw * 1.3, f"bandwidth {bw / 1e9:,.1f} GB/s", fontsize=8, rotation=0)
        markers = "o^sDvP<>Xhp"
        for i, (name, x) in enumerate(points):
            y = min(peak, x * bw)
            whole = name.startswith("step")
            ax.scatter([x], [y], s=160 if whole else 45, marker="*" if whole else markers[i % len(markers)],
                       color="black" if whole else f"C{i % 10}", facecolors="none" if name.endswith("(unfused)")
                       else None, zorder=3, label=f"{name}: {x:.3g} FLOP/B")
            if whole:
                ax.annotate(name, (x, y), textcoords="offset points", xytext=(8, 8 if "unfused" in name else -14),
                            fontsize=8, fontweight="bold")
        ax.legend(fontsize=7, loc="lower right", title="points sit on the roof they meet", title_fontsize=7)
        ax.set(xscale="log", yscale="log", xlabel="arithmetic intensity (FLOPs per byte)",
               ylabel="attainable FLOP/s", title=f"{label}: {step['bound']}-bound", xlim=(lo, hi),
               ylim=(min(lo * bw, peak) / 3, peak * 2))
        ax.grid(True, which="both", alpha=0.2)
        zero = [n for n, c in step["components"].items() if c["intensity"] == 0]
        if zero:
            ax.text(0.02, 0.02, "no FLOPs (not drawn): " + ", ".join(zero), transform=ax.transAxes, fontsize=7)
    fig.suptitle(title or f"roofline, {result['dtype']}: components at their unfused bytes, the step at both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------
# Text for flops.py

def _mb(x) -> str:
    return "—" if x is None else f"{x / 1e6:,.3f}"


def render_bytes(section: dict) -> str:
    """The `bytes` section of flops.py as a table: unfused bytes per component (analytic = counted), totals,
    and the minimum convention."""
    steps = ("forward", "train_step", "decode_step")
    d = section["decode_step"]
    names = []
    for s in steps:
        names += [n for n in section[s]["unfused"]["components"] if n not in names]
    lines = [f"bytes, {section['forward']['dtype']}; unfused = every aten op's tensor inputs read + outputs written "
             f"(analytic, checked against the byte counter); minimum = what a perfect kernel must move",
             f"decode step: batch {d['batch_size']}, context {d['context']} (KV cache on); MB = 10^6 bytes",
             f"{'component (unfused MB)':<24}" + "".join(f"{s:>16}" for s in steps)]
    for n in names:
        cells = [section[s]["unfused"]["components"].get(n, {}).get("analytic") for s in steps]
        lines.append(f"{n:<24}" + "".join(f"{_mb(c):>16}" for c in cells))
    for label, key in (("unfused, analytic", "analytic"), ("unfused, counted", "counted")):
        lines.append(f"{label:<24}" + "".join(f"{_mb(section[s]['unfused'][key]):>16}" for s in steps))
    lines.append(f"{'minimum':<24}" + "".join(f"{_mb(section[s]['minimum']):>16}" for s in steps))
    parts = ", ".join(f"{k} {_mb(v)} MB" for k, v in d["minimum_components"].items())
    tparts = ", ".join(f"{k} {_mb(v)} MB" for k, v in section["train_step"]["minimum_components"].items())
    lines += [f"decode minimum: {parts}", f"training minimum: {tparts}"]
    notes = [section[s]["unfused"].get("note") for s in steps if section[s]["unfused"].get("note")]
    return "\n".join(lines + notes)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.4g} ms"


def render_roofline(r: dict) -> str:
    lines = [f"roofline: peak {r['peak_flops'] / 1e9:,.1f} GFLOP/s ({r['peak_source']}); bandwidth "
             f"{r['bandwidth'] / 1e9:,.2f} GB/s ({r['bandwidth_source']})",
             f"ridge point: {r['ridge']:.4g} FLOPs per byte; {r['dtype']}; FLOPs = the exact matmul count"]
    for kind, label in (("train_step", f"training step, batch {r['batch_size']} x {r['seq_len']}"),
                        ("decode_step", f"decode step, batch {r['batch_size']}, context {r['context']}")):
        s = r[kind]
        lines += ["", f"{label}: {s['flops']:,} FLOPs -> {s['bound']}-bound (minimum bytes)",
                  f"{'':<20}{'bytes':>18}{'FLOP/byte':>11}{'bound':>9}{'compute roof':>15}{'memory roof':>15}"]
        rows = [("minimum", s["minimum"]), ("unfused", s["unfused"])]
        rows += [(f"  {n}", c) for n, c in s["components"].items()]
        for name, c in rows:
            lines.append(f"{name:<20}{c['bytes']:>18,}{c['intensity']:>11.4g}{c['bound']:>9}"
                         f"{_ms(c['compute_seconds']):>15}{_ms(c['memory_seconds']):>15}")
    b = r["decode_compute_bound_batch"]
    lines += ["", f"decoding at context {r['context']} turns compute-bound at batch "
                  f"{b:,}" if b else f"decoding at context {r['context']} stays memory-bound at any batch: the KV "
                                     f"cache grows with it"]
    lines.append("components use unfused bytes (every op its own kernel, nothing cached); the step's bound uses "
                 "the minimum bytes")
    return "\n".join(lines)


def roofs(device: str | None) -> tuple:
    """(peak FLOP/s Peak, bandwidth Peak) for this machine's CPU (None or "cpu": the hardware/calibrated FLOP
    peak and the STREAM measurement), its GPU ("cuda"), or a GPU by short name (h100, a100, ...: datasheets)."""
    from .peaks import Peak, bandwidth_by_key, device_bandwidth, device_peak, peak_by_key
    name = (device or "cpu").lower()
    if name == "cpu" or name.startswith("cuda"):
        return device_peak(name), device_bandwidth(name)
    entry = peak_by_key(name)
    bandwidth, note = bandwidth_by_key(name)
    return (Peak(entry.flops, f"{entry.note}, vendor datasheet"),
            Peak(bandwidth, f"{note}, vendor datasheet", unit="B/s"))


def machine_roofline(cfg: GPTConfig, batch: int, seq_len: int, context: int, dtype, device: str | None) -> dict:
    """roofline() against the roofs of `device` (see roofs), with their sources."""
    peak, bandwidth = roofs(device)
    result = roofline(cfg, batch, seq_len, context, dtype, peak.flops, bandwidth.flops)
    result.update(device=device or "cpu", peak_source=peak.source, bandwidth_source=bandwidth.source)
    return result


# ----------------------------------------------------------------------------------------------------
# Decoding measured against the roofs (sample.py, model.generate(stats=...))

def decoding_summary(cfg: GPTConfig, runs: list[dict], dtype, peak, bandwidth) -> dict | None:
    """Tokens/s, achieved minimum-bytes GB/s, MBU and MFU of the decode steps of generate calls, from the
    `stats` dicts generate filled. The first call of each (the prompt's prefill) is left out; every later
    call is a decode step (or, past block_size, a window rebuild) with the schedule of
    formulas.generation_calls: its minimum bytes (bytes.py) and exact FLOPs. `peak` and `bandwidth` are
    peaks.Peak objects (raised, and saying so, by a faster rate). None when no call decoded a second token."""
    tokens, seconds, nbytes_, flops = 0, 0.0, 0, 0
    for s in runs:
        calls = formulas.generation_calls(cfg, s["prompt_len"], s["new_tokens"], batch=s["rows"],
                                          use_cache=s["use_cache"])[1:]
        if not calls:
            continue
        tokens += s["rows"] * len(calls)
        seconds += s["seconds"] - s["prefill_seconds"]
        for rows, q_len, past in calls:
            flops += formulas.step(cfg, rows, q_len, past, last_only=True).total
            nbytes_ += (nbytes.decode_minimum_bytes(cfg, rows, past + 1, dtype) if q_len == 1 else
                        nbytes.forward_minimum_bytes(cfg, rows, q_len, dtype, last_only=True))["total"]
    if not tokens or seconds <= 0:
        return None
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "bytes": nbytes_,
            "bytes_per_s": nbytes_ / seconds, "mbu": bandwidth.mfu(nbytes_ / seconds) if bandwidth else None,
            "flops": flops, "flops_per_s": flops / seconds, "mfu": peak.mfu(flops / seconds)}


def decoding_line(summary: dict | None, peak, bandwidth) -> str:
    """sample.py's last line."""
    from .peaks import mbu_text
    if summary is None:
        return "decoding: no decode steps (one new token or fewer per call)"
    return (f"decoding: {summary['tokens_per_s']:,.1f} tokens/s over {summary['tokens']:,} tokens, "
            f"{summary['bytes_per_s'] / 1e9:,.2f} GB/s minimum bytes, {mbu_text(summary['mbu'], bandwidth)}, "
            f"MFU {summary['mfu']:.2%} of {peak.describe()}")


def decoding_report(model, runs: list[dict], device) -> str:
    """sample.py's last line for the generate calls whose `stats` dicts are `runs`, against the peaks of
    `device` (peaks.device_peak, peaks.step_bandwidth) and the model's weight dtype."""
    from .peaks import device_peak, step_bandwidth
    peak, bandwidth = device_peak(device), step_bandwidth(device)
    dtype = next(model.parameters()).dtype
    return decoding_line(decoding_summary(model.config, runs, dtype, peak, bandwidth), peak, bandwidth)
