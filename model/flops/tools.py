"""Every popular FLOP counter run on the same GPT, as its README tells users to call it, beside the exact count.

Each adapter below is one tool called with its defaults and no custom handles; the only arguments given are
the ones a GPT needs (token ids instead of the float tensor the tools make by default) and, where a tool
prints its per-module figures, where to print them. Per-module figures are the tool's own, read from its
public per-module API (fvcore by_module, FlopCounterMode get_flop_counts, thop ret_layer_info) or, for the
tools that only print them, from the module attributes the tool prints, at the moment it prints them.

Conventions (the tool's own documentation), converted here to FLOPs = 2 per multiply-add:
  fvcore FlopCountAnalysis   multiply-adds, called "flops" (fvcore#108); no training step
  torch FlopCounterMode      FLOPs (2 per multiply-add); measures forward and backward
  ptflops (pytorch, aten)    MACs; no training step; README: default backend aten (PR 140), code: pytorch
  thop profile               MACs; no training step
  calflops calculate_flops   FLOPs and MACs; training step = forward x (1 + compute_bp_factor=2)
  DeepSpeed get_model_profile  FLOPs and MACs; forward only; its engine counts fwd+bwd = 3 x fwd
The exact count is model/flops/formulas.py's (matmuls only); tools that also count non-matmul ops therefore
sit a little above 1 even when they miss nothing.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import io
import logging
import re
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import GPTConfig, check
from . import formulas
from .counters import _Call, build_model

# Components of a tool's answer: the six matmul groups, then the non-matmul ops it counts beside them.
MATMUL = ("qkv", "attention", "attn_proj", "mlp_up", "mlp_down", "lm_head")
COMPONENTS = MATMUL + ("layer_norm", "gelu", "other")
_SUFFIXES = ((".attn.c_attn", "qkv"), (".attn.c_proj", "attn_proj"), (".mlp.c_fc", "mlp_up"),
             (".mlp.c_proj", "mlp_down"), (".lm_head", "lm_head"), (".attn", "attention"), (".ln_1", "layer_norm"),
             (".ln_2", "layer_norm"), (".ln_f", "layer_norm"), (".gelu", "gelu"))

# tool key -> (PyPI distribution, import name)
TOOLS = {"fvcore": ("fvcore", "fvcore"), "flopcountermode": ("torch", "torch"), "ptflops": ("ptflops", "ptflops"),
         "thop": ("thop", "thop"), "calflops": ("calflops", "calflops"), "deepspeed": ("deepspeed", "deepspeed")}

# Why a tool misses or double-counts a component: (tool, component, attention path or None) -> cause and source.
# A cause is printed only when the measurement shows the gap, so an upgrade that fixes one drops its note.
KNOWN = {
    ("fvcore", "attention", "sdpa"): "aten::scaled_dot_product_attention has no handle: reported as an unsupported "
                                     "op and counted 0 (fvcore/nn/flop_count.py _DEFAULT_SUPPORTED_OPS)",
    ("fvcore", "gelu", None): "aten::gelu has no handle: unsupported, 0 (_DEFAULT_SUPPORTED_OPS)",
    ("fvcore", "other", None): "softmax, add, mul have no handle: unsupported, 0 (_DEFAULT_SUPPORTED_OPS)",
    ("flopcountermode", "attention", "sdpa"): "CPU sdpa runs aten._scaled_dot_product_flash_attention_for_cpu, "
                                              "absent from flop_registry: 0 in forward and backward (pytorch#195460, "
                                              "fixed by pytorch PR 195801 after torch 2.13)",
    ("flopcountermode", "layer_norm", None): "counts matmul and attention kernels only (flop_registry), by design",
    ("flopcountermode", "gelu", None): "counts matmul and attention kernels only (flop_registry), by design",
    ("flopcountermode", "other", None): "counts matmul and attention kernels only (flop_registry), by design",
    ("ptflops-pytorch", "attention", "sdpa"): "F.scaled_dot_product_attention is not patched; only "
                                              "nn.MultiheadAttention is counted (ptflops#77)",
    ("ptflops-pytorch", "attention", "manual"): "q @ k.T calls Tensor.__matmul__, which is not patched (only "
                                                "torch.matmul / Tensor.matmul are); only nn.MultiheadAttention is "
                                                "counted (ptflops#77)",
    ("ptflops-pytorch", "gelu", None): "nn.GELU is counted twice: its module hook and the F.gelu functional patch "
                                       "both add numel (README: functional hooks can conflict with module hooks)",
    ("ptflops-aten", "attention", "sdpa"): "CPU sdpa dispatches to aten._scaled_dot_product_flash_attention_for_cpu; "
                                           "the aten backend counts mm, matmul, addmm, bmm, convolution only "
                                           "(ptflops/aten_ops.py); same gap as pytorch#195460",
    ("thop", "attention", None): "hooks nn.Module leaves only: torch.matmul, @ and F.scaled_dot_product_attention "
                                 "count 0 (pytorch-OpCounter#213)",
    ("thop", "gelu", None): "nn.GELU has no rule in register_hooks: 0",
    ("calflops", "attention", None): "F.scaled_dot_product_attention and Tensor.__matmul__ (q @ k) are not patched: "
                                     "attention counts 0 and the total grows linearly with T (calflops#48)",
    ("deepspeed", "attention", None): "sdpa and @ are counted only since DeepSpeed PR 4724",
    ("ptflops-pytorch", "other", None): "x + y and x * s run Tensor.__add__ / __mul__, which are not patched (only "
                                        "torch.add, Tensor.add, torch.mul, Tensor.mul); sdpa's softmax and scale are "
                                        "inside the unpatched sdpa",
    ("thop", "other", None): "rules exist for nn.Module leaves only: residual and position adds, the scale and "
                             "softmax (functional calls) count 0",
    ("calflops", "other", None): "x + y and x * s run Tensor.__add__ / __mul__, which are not patched (only torch.add, "
                                 "Tensor.add, torch.mul, Tensor.mul); sdpa's softmax and scale are inside the "
                                 "unpatched sdpa",
    ("deepspeed", "other", None): "x + y and x * s run Tensor.__add__ / __mul__, which are not patched (only "
                                  "torch.add, Tensor.add, torch.mul, Tensor.mul); its sdpa rule counts the two "
                                  "matmuls, not the softmax and scale inside",
}
# Conventions that explain a ratio without a missed op: (tool) -> note, always printed.
CONVENTIONS = {
    "fvcore": "reports multiply-adds under the name 'flops' (fvcore#108): x2 here; layer_norm 5 MACs/element",
    "flopcountermode": "FLOPs = 2 per multiply-add; the training step is measured (forward + backward); on CUDA "
                       "its sdpa backward formulas count 5 matmuls (the recomputed scores too), 2.5x the forward's "
                       "attention where the gradient needs 2x (torch/utils/flop_counter.py)",
    "ptflops-pytorch": "MACs: x2 here; Linear counts +1 MAC per output for the bias; LayerNorm and GELU 1/element; "
                       "the README says the default backend is aten (PR 140) but get_model_complexity_info "
                       "defaults to pytorch in 0.7.5",
    "ptflops-aten": "MACs: x2 here; addmm counts +1 per output for the bias; per-module figures only for the "
                    "model's direct children (README), so only lm_head is split out",
    "thop": "MACs: x2 here; Linear in_features x output elements (no bias); LayerNorm 2/element, x2 with affine",
    "calflops": "FLOPs (2 per MAC for Linear, no bias); LayerNorm 5/element, GELU and softmax 1/element; training "
                "step = forward x (1 + compute_bp_factor), default 2",
    "deepspeed": "FLOPs (2 per MAC, no bias); LayerNorm 5/element, GELU, softmax, add, mul 1/element; the warm-up "
                 "forward is not counted; its engine counts fwd+bwd = (1 + bwd_factor 2) x fwd",
}


@dataclass
class Reading:
    """One tool's answer for one mode. own: module path -> FLOPs the tool put on that module itself (not its
    children); None where the tool reports no per-module figures."""

    tool: str
    backend: str | None
    mode: str
    raw: float
    raw_unit: str
    flops: int
    own: dict[str, float] | None
    notes: list[str] = field(default_factory=list)
    components: dict[str, int | None] | None = None


# ----------------------------------------------------------------------------------------------------
# Shared plumbing

@contextlib.contextmanager
def _quiet():
    """The tools print tables, warnings and log lines by default; keep them out of our output."""
    out = io.StringIO()
    level = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield out
    finally:
        logging.disable(level)


_TORCH_ATTRS = ("matmul", "mm", "bmm", "addmm", "baddbmm", "mul", "add", "einsum")
_TENSOR_ATTRS = ("matmul", "__matmul__", "mm", "bmm", "addmm", "mul", "add")


@contextlib.contextmanager
def _restore_patches():
    """Hook-based tools monkeypatch torch.nn.functional and tensor methods; a tool that fails half-way must not
    leave them patched for the next one."""
    saved_f = dict(vars(F))
    saved_t = {a: getattr(torch, a) for a in _TORCH_ATTRS}
    saved_m = {a: getattr(torch.Tensor, a) for a in _TENSOR_ATTRS}
    try:
        yield
    finally:
        for name, value in saved_f.items():
            if vars(F).get(name) is not value:
                setattr(F, name, value)
        for a, v in saved_t.items():
            setattr(torch, a, v)
        for a, v in saved_m.items():
            setattr(torch.Tensor, a, v)


@contextlib.contextmanager
def _wrap(owner, name: str, before: Callable):
    """Call before(*args) ahead of owner.name(*args): reads a tool's per-module counts just before it prints
    them and discards them (the count itself is untouched)."""
    original = getattr(owner, name)

    def wrapped(*args, **kwargs):
        before(*args, **kwargs)
        return original(*args, **kwargs)

    setattr(owner, name, wrapped)
    try:
        yield
    finally:
        setattr(owner, name, original)


def own_from_inclusive(inclusive: dict[str, float]) -> dict[str, float]:
    """Per-module totals that include the children -> each module's own share (its total minus its children's)."""
    names = sorted(inclusive, key=len)
    own = dict(inclusive)
    for name in names:
        parents = [p for p in names if p != name and (p == "" or name.startswith(p + "."))]
        if parents:
            own[max(parents, key=len)] -= inclusive[name]
    return own


def components(own: dict[str, float], total: int, scale: float = 1.0) -> dict[str, int]:
    """Module shares -> components, in FLOPs (scale converts the tool's unit). Whatever no listed module holds,
    including what the tool counts only in its total, is 'other'."""
    out = dict.fromkeys(COMPONENTS, 0)
    for name, value in own.items():
        key = next((c for suffix, c in _SUFFIXES if ("." + name).endswith(suffix)), "other")
        out[key] += value * scale
    out = {k: round(v) for k, v in out.items()}
    out["other"] = total - sum(v for k, v in out.items() if k != "other")
    return out


def _model_call(model: nn.Module) -> nn.Module:
    return _Call(model)  # logits only: GPT returns (logits, None), which jit tracing cannot output


# ----------------------------------------------------------------------------------------------------
# Adapters: one tool each, called as its README shows

def run_fvcore(model, idx, attention: str) -> list[Reading]:
    from fvcore.nn import FlopCountAnalysis
    analysis = FlopCountAnalysis(_model_call(model), (idx,))  # README: FlopCountAnalysis(model, inputs)
    with _quiet():  # it logs one warning per unsupported op
        macs = int(analysis.total())
        by_module = {k.removeprefix("model").lstrip("."): v for k, v in analysis.by_module().items()}
    notes = [f"unsupported ops (counted 0): {dict(sorted(analysis.unsupported_ops().items()))}"]
    return [Reading("fvcore", None, "forward", macs, "MAC", 2 * macs, own_from_inclusive(by_module), notes)]


def run_flopcountermode(model, idx, attention: str) -> list[Reading]:
    from torch.utils.flop_counter import FlopCounterMode
    model.train()
    counter = FlopCounterMode(display=False)  # torch docs: with FlopCounterMode(): model(x).sum().backward()
    with counter:
        _, loss = model(idx, idx)
        forward = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}
        loss.backward()
    model.zero_grad(set_to_none=True)
    model.eval()
    step = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}

    def own(counts):
        return own_from_inclusive({k.removeprefix("GPT").lstrip("."): v for k, v in counts.items() if k != "Global"})
    f, t = forward["Global"], step["Global"]
    quirk = ("training step as a total only: its per-module backward figures overlap (a Dropout's backward "
             "scope also holds the Linear before it), so they do not split into components")
    return [Reading("flopcountermode", None, "forward", f, "FLOP", f, own(forward)),
            Reading("flopcountermode", None, "train_step", t, "FLOP", t, None, [quirk])]


def run_ptflops(model, idx, attention: str) -> list[Reading]:
    import ptflops.pytorch_engine as engine
    from ptflops import get_model_complexity_info
    readings = []
    for backend in ("pytorch", "aten"):
        shares: dict[str, float] = {}
        functional: dict[str, float] = {}

        def snapshot(m, *args, **kwargs):  # print_model_with_flops(model, total, params, ...): before it prints
            shares.update({n: mod.__flops__ / m.__batch_counter__ for n, mod in m.named_modules()
                           if hasattr(mod, "__flops__")})

        def record(wrapper, *args, **kwargs):  # which functional op each MAC count of its total came from
            name = getattr(wrapper.op, "__name__", str(wrapper.op))
            functional[name] = functional.get(name, 0) + float(wrapper.handler(*args, **kwargs))
        printed = io.StringIO()
        with (_quiet() as stdout, _wrap(engine, "print_model_with_flops", snapshot),
              _wrap(engine.torch_function_wrapper, "__call__", record)):
            # README: input_constructor returns the model's keyword arguments (here the token ids)
            macs, _ = get_model_complexity_info(model, tuple(idx.shape[1:]), as_strings=False, backend=backend,
                                                input_constructor=lambda res: {"idx": idx}, ost=printed,
                                                flops_units="Mac")
        if macs is None:
            raise RuntimeError(f"ptflops ({backend}) failed: {stdout.getvalue().strip()[-300:]}")
        notes = []
        if backend == "pytorch":
            own = {**shares, "functional.gelu": functional.get("gelu", 0.0)}  # F.gelu counts under the gelu column
            if functional.get("gelu") and any(k.endswith("gelu") and v for k, v in shares.items()):
                notes.append(f"double-counts gelu: {KNOWN[('ptflops-pytorch', 'gelu', None)]}")
            notes.append(f"functional and tensor-op MACs (in its total, on no module): "
                         f"{ {k: int(v) for k, v in sorted(functional.items())} }")
        else:
            own = _aten_shares(printed.getvalue())
        readings.append(Reading("ptflops", backend, "forward", macs, "MAC", round(2 * macs), own, notes))
    return readings


def _aten_shares(printed: str) -> dict[str, float]:
    """The aten backend prints 'Module: NAME' then 'aten.op: N Mac' per op, for the direct children only."""
    modules: dict[str, dict[str, float]] = {}
    current = None
    for line in printed.splitlines():
        if m := re.match(r"Module:\s+(\S+)", line):
            current = modules.setdefault(m.group(1), {})
        elif (m := re.match(r"(aten\.\w+): ([\d.e+]+) Mac", line)) and current is not None:
            current[m.group(1)] = float(m.group(2))
    lm_head = sum(modules.get("lm_head", {}).values())
    # bmm is the attention's (the Linears run addmm/mm); the rest of the Linears cannot be told apart
    return {"lm_head": lm_head, "transformer.h.0.attn": modules.get("Global", {}).get("aten.bmm", 0.0)}


def run_thop(model, idx, attention: str) -> list[Reading]:
    import thop
    with _quiet():
        macs, _, info = thop.profile(model, inputs=(idx,), ret_layer_info=True)  # README: profile(model, inputs)

    def walk(tree, prefix, out):
        for name, (ops, _, children) in tree.items():
            path = f"{prefix}{name}"
            out[path] = ops
            walk(children, path + ".", out)
        return out
    inclusive = walk(info, "", {})
    inclusive[""] = macs
    return [Reading("thop", None, "forward", macs, "MAC", round(2 * macs), own_from_inclusive(inclusive))]


def _own_attrs(model: nn.Module) -> dict[str, float]:
    """calflops and DeepSpeed keep each module's own count in module.__flops__ until they end."""
    return {n: m.__flops__ for n, m in model.named_modules() if hasattr(m, "__flops__")}


def run_calflops(model, idx, attention: str) -> list[Reading]:
    from calflops import calculate_flops
    from calflops.calculate_pipline import CalFlopsPipline
    readings = []
    for mode, backprop in (("forward", False), ("train_step", True)):
        shares: dict[str, float] = {}
        with _quiet(), _wrap(CalFlopsPipline, "end_flops_calculate", lambda p: shares.update(_own_attrs(p.model))):
            # README: calculate_flops(model, args=[...]) for inputs other than one float tensor
            flops, macs, _ = calculate_flops(model, args=[idx], include_backPropagation=backprop,
                                             output_as_string=False)
        scale = 3 if backprop else 1  # the shares are the forward's; the tool multiplies its total by 1 + 2
        readings.append(Reading("calflops", None, mode, flops, "FLOP", round(flops),
                                {k: v * scale for k, v in shares.items()}, [f"its MAC figure: {macs:,}"]))
    return readings


def run_deepspeed(model, idx, attention: str) -> list[Reading]:
    with _quiet():
        from deepspeed.profiling.flops_profiler import profiler
        from deepspeed.profiling.flops_profiler import get_model_profile
    shares: dict[str, float] = {}
    with _quiet(), _wrap(profiler.FlopsProfiler, "end_profile", lambda p: shares.update(_own_attrs(p.model))):
        flops, macs, _ = get_model_profile(model, args=[idx], as_string=False)  # README: get_model_profile(model, ...)
    bwd_factor = 2  # profiler.py: bwd_factor = 2 + recompute_fwd_factor (0 unless activation checkpointing)
    notes = [f"its MAC figure: {macs:,}"]
    train_note = ("training step = (1 + bwd_factor 2) x forward, as DeepSpeed's engine prints it; "
                  "get_model_profile itself measures the forward only")
    return [Reading("deepspeed", None, "forward", flops, "FLOP", round(flops), shares, notes),
            Reading("deepspeed", None, "train_step", (1 + bwd_factor) * flops, "FLOP", round((1 + bwd_factor) * flops),
                    {k: v * (1 + bwd_factor) for k, v in shares.items()}, [train_note])]


ADAPTERS: dict[str, Callable] = {"fvcore": run_fvcore, "flopcountermode": run_flopcountermode, "ptflops": run_ptflops,
                                 "thop": run_thop, "calflops": run_calflops, "deepspeed": run_deepspeed}


# ----------------------------------------------------------------------------------------------------
# The audit

def installed(tool: str) -> str | None:
    """The tool's installed version, or None."""
    dist, module = TOOLS[tool]
    try:
        version = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None
    return version if importlib.util.find_spec(module) is not None else None


def exact_components(cfg: GPTConfig, batch: int, seq_len: int, mode: str) -> dict[str, int]:
    """The exact count grouped like the tools' components; non-matmul ops by the project's conventions."""
    count = formulas.forward(cfg, batch, seq_len) if mode == "forward" else formulas.train_step(cfg, batch, seq_len)
    m, nm = count.matmul, count.non_matmul
    out = {k: m[k] for k in ("qkv", "attn_proj", "mlp_up", "mlp_down", "lm_head")}
    out["attention"] = m["attn_scores"] + m["attn_values"]
    out["layer_norm"] = nm.get("layer_norm", 0) + nm.get("layer_norm_backward", 0)
    out["gelu"] = nm.get("gelu", 0) + nm.get("gelu_backward", 0)
    out["other"] = count.non_matmul_total - out["layer_norm"] - out["gelu"]
    return {k: out[k] for k in COMPONENTS}


def _label(r: Reading) -> str:
    return r.tool if r.backend is None else f"{r.tool}-{r.backend}"


def diagnose(r: Reading, exact: dict[str, int], attention: str) -> tuple[list[str], list[str]]:
    """(missing components, notes): 0 where the exact count is not 0 is missing; above 1.5x is double-counted.
    Each is explained by KNOWN when the cause is on record."""
    label, missing, notes = _label(r), [], []
    if r.components is None:
        return missing, notes

    def cause(comp):
        return KNOWN.get((label, comp, attention)) or KNOWN.get((label, comp, None)) or "no cause on record"
    for comp in COMPONENTS:
        got, want = r.components.get(comp), exact[comp]
        if got is None or want == 0:
            continue
        if got == 0 or (comp in MATMUL and got < 0.5 * want):  # a matmul group seen only through its softmax
            missing.append(comp)
            part = "" if got == 0 else f" (counts {got / want:.3f}x, the non-matmul ops beside it)"
            notes.append(f"misses {comp}{part}: {cause(comp)}")
        elif got > 1.5 * want and comp not in ("layer_norm", "other"):  # those differ by convention, not by error
            notes.append(f"double-counts {comp} ({got / want:.2f}x): {cause(comp)}")
    return missing, notes


def audit(cfg: GPTConfig, batch: int, seq_len: int, *, tools: tuple[str, ...] | None = None,
          device: str | torch.device = "cpu", seed: int = 0) -> dict:
    """Run every installed counter on GPT(cfg) with (batch, seq_len) token ids on `device`; the strict-JSON
    report of the issue: config, batch_size, seq_len, exact, tools, not_installed (+ exact_components, errors)."""
    if not isinstance(cfg, GPTConfig):
        raise ValueError(f"config must be a GPTConfig, got {type(cfg).__name__}")
    check("batch", batch, int, 1)
    check("seq_len", seq_len, int, 1)
    if seq_len > cfg.block_size:
        raise ValueError(f"seq_len={seq_len} exceeds block_size={cfg.block_size}")
    tools = tuple(ADAPTERS) if tools is None else tools
    unknown = [t for t in tools if t not in ADAPTERS]
    if unknown:
        raise ValueError(f"unknown tool(s) {unknown}; known: {list(ADAPTERS)}")
    torch.manual_seed(seed)
    model = build_model(cfg, device).eval()
    idx = torch.zeros(batch, seq_len, dtype=torch.long, device=device)  # (B, T)
    exact = {mode: exact_components(cfg, batch, seq_len, mode) for mode in ("forward", "train_step")}
    totals = {"forward": formulas.forward(cfg, batch, seq_len).total,
              "train_step": formulas.train_step(cfg, batch, seq_len).total}
    entries, not_installed, errors = [], [], []
    for tool in tools:
        version = installed(tool)
        if version is None:
            not_installed.append(tool)
            continue
        try:
            with _restore_patches():
                readings = ADAPTERS[tool](model, idx, cfg.attention)
        except Exception as e:  # a tool that crashes on this model is reported, never fatal
            errors.append({"tool": tool, "version": version, "error": f"{type(e).__name__}: {e}"[:500]})
            continue
        finally:
            model.eval()
        forward_missing: dict[str, list[str]] = {}
        for r in readings:
            if r.own is not None:
                scale = r.flops / r.raw if r.raw else 1.0
                r.components = components(r.own, r.flops, scale)
                if r.backend == "aten":  # only lm_head and the attention's bmm are split out
                    r.components = {k: (r.components[k] if k in ("lm_head", "attention") else None) for k in COMPONENTS}
            missing, notes = diagnose(r, exact[r.mode], cfg.attention)
            if r.mode == "forward":
                forward_missing[_label(r)] = missing
            elif not missing:  # a training step without components inherits the forward's gaps
                missing = forward_missing.get(_label(r), [])
            entries.append({"tool": r.tool, "version": version, "backend": r.backend, "mode": r.mode, "raw": r.raw,
                            "raw_unit": r.raw_unit, "flops": r.flops, "ratio": r.flops / totals[r.mode],
                            "components": r.components or {}, "missing": missing,
                            "notes": [CONVENTIONS[_label(r)], *notes, *r.notes]})
    return {"config": _config_dict(cfg), "batch_size": batch, "seq_len": seq_len, "exact": totals,
            "tools": entries, "not_installed": not_installed, "exact_components": exact, "errors": errors}


def _config_dict(cfg: GPTConfig) -> dict:
    from dataclasses import asdict
    return asdict(cfg)
