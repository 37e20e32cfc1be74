"""Measured FLOPs: fvcore's FlopCountAnalysis and torch's FlopCounterMode, made exact for this model.

fvcore (JIT trace, counts multiply-adds and calls them "flop")
  Out of the box it reports scaled_dot_product_attention, softmax, gelu, embedding, add, mul and
  cross_entropy as unsupported (0), skips dropout/masked_fill/views silently, counts layer_norm at 5 per
  element, and its einsum handle rounds to 4 significant digits. Here every op the model emits gets an
  explicit rule (`FVCORE_RULES`): matmuls return exact multiply-adds keyed by component, non-matmul ops
  return FLOPs by the conventions of model/flops/formulas.py under their own keys, and data movement returns 0
  with the reason written down. `StrictFlopCount` ignores no aten op, so an op without a rule shows up in
  `unsupported_ops()` instead of counting as 0. Matmul multiply-adds are converted to FLOPs (x2); the raw
  figure is kept (`macs`).

torch.utils.flop_counter.FlopCounterMode (dispatch level, counts FLOPs)
  Counts mm/addmm/bmm/baddbmm and the CUDA attention kernels only. Kernels it misses or counts otherwise:
  - CPU: scaled_dot_product_attention runs aten._scaled_dot_product_flash_attention_for_cpu (and its
    backward) in no_grad and in training (torch 2.13); neither has a formula, so attention counts 0 and
    eval and train totals disagree. `torch_formulas()` adds both.
  - CUDA: the flash/efficient/cudnn backward formulas count 5 matmuls (they include recomputing the scores),
    2.5x the forward's attention; `torch_formulas()` replaces them with the gradient's 4 (2x), the MFU
    convention (untested here: no GPU in CI; read from torch/utils/flop_counter.py).
  - meta tensors: sdpa decomposes to bmm, counted exactly; this is the default device, fast and exact.
Neither counter knows about the causal mask: both count the full T x S attention rectangle.
"""
from __future__ import annotations

import math
import re
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import GPTConfig, check
from .formulas import (ADD, ATTN_SCALE, CROSS_ENTROPY_PER_LOGIT, CROSS_ENTROPY_PER_ROW, GELU_ERF, GELU_TANH,
                    LAYER_NORM_CORE, MATMUL_COMPONENTS, SOFTMAX)
from ..gpt.gpt import GPT

# Linear layers by module-name suffix -> matmul component.
LINEAR_COMPONENTS = (("attn.c_attn", "qkv"), ("attn.c_proj", "attn_proj"), ("mlp.c_fc", "mlp_up"),
                     ("mlp.c_proj", "mlp_down"), ("lm_head", "lm_head"))
OTHER_MATMUL = "other_matmul"  # a matmul outside the known modules (none in GPT; kept visible if one appears)
MATMUL_KEYS = frozenset(MATMUL_COMPONENTS) | {OTHER_MATMUL}


# ----------------------------------------------------------------------------------------------------
# Sizes the counters can measure: checked before any model is built

# fvcore and FlopCounterMode trace every block: 0.14 s a block on the shared 2-core Xeon (`python flops.py
# --n_layer=400`: 67 s); 128 covers GPT-3 175B (96) and Llama 3 405B (126)
MAX_TRACED_LAYERS = 128
MAX_ELEMENTS = (2**63 - 1) // 4  # a tensor's size in bytes must fit int64, meta tensors included (float32)


def check_sizes(cfg, batch: int, seq_len: int) -> None:
    """ValueError, before anything is built, for a depth the counters would take minutes to trace or a
    tensor whose size in bytes overflows int64 (the analytic formulas, --plan, take any size)."""
    if cfg.n_layer > MAX_TRACED_LAYERS:
        raise ValueError(f"n_layer={cfg.n_layer:,}: the counters trace every block and flops.py measures at most "
                         f"{MAX_TRACED_LAYERS} (python flops.py --plan --tokens N gives the exact analytic count at "
                         f"any depth)")
    d, h, V = cfg.n_embd, cfg.n_head, cfg.vocab_size
    largest = {"logits (batch, seq_len, vocab_size)": batch * seq_len * V,
               "attention scores (batch, n_head, seq_len, seq_len)": batch * h * seq_len ** 2,
               "MLP activations (batch, seq_len, 4 n_embd)": batch * seq_len * 4 * d,
               "token embedding (vocab_size, n_embd)": V * d, "position table (block_size, n_embd)": cfg.block_size * d,
               "MLP weight (4 n_embd, n_embd)": 4 * d * d}
    for name, n in largest.items():
        if n > MAX_ELEMENTS:
            raise ValueError(f"{name} would hold {n:.3e} elements, more than a float32 tensor can (2^63 bytes); "
                             f"use smaller sizes")


# ----------------------------------------------------------------------------------------------------
# Building and calling the model

def build_model(cfg: GPTConfig, device: str | torch.device = "meta") -> GPT:
    """GPT(cfg) with its parameters on `device`; on "meta" no memory is allocated (shapes only)."""
    with torch.device(device):
        return GPT(cfg)


_MODEL = "model"  # the GPT module's name inside _Call, hence its scope in fvcore's trace


class _Call(nn.Module):
    """One model call with the arguments fvcore's tracer cannot pass (keyword-only, a cache, last_only).

    With past > 0 a cache holding `past` positions is made first (their values do not change the count);
    with_loss=True returns the cross-entropy against the input itself instead of the logits.
    """

    def __init__(self, model: GPT, past: int = 0, last_only: bool = False, with_loss: bool = False):
        super().__init__()
        self.model, self.past, self.last_only, self.with_loss = model, past, last_only, with_loss

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        cache = None
        if self.past:
            cache = self.model.new_cache(idx.size(0), self.past + idx.size(1))
            cache.pos = self.past
        if self.with_loss:
            return self.model(idx, idx)[1]
        logits, _ = self.model(idx, kv_cache=cache, last_only=self.last_only)
        return logits


def _tokens(batch: int, seq_len: int, device) -> torch.Tensor:
    return torch.zeros(batch, seq_len, dtype=torch.long, device=device)  # (B, T)


def _check_shape(cfg: GPTConfig, batch: int, seq_len: int, past: int) -> None:
    for name, value, low in (("batch", batch, 1), ("seq_len", seq_len, 1), ("past", past, 0)):
        check(name, value, int, low)
    if past + seq_len > cfg.block_size:
        raise ValueError(f"{past + seq_len} positions exceed block_size={cfg.block_size}")


# ----------------------------------------------------------------------------------------------------
# fvcore: one rule per op

def _shape(value) -> list[int]:
    t = value.type()
    if not isinstance(t, torch._C.TensorType) or t.sizes() is None:
        raise ValueError(f"fvcore trace has no complete shape for {value.debugName()} ({t}); cannot count exactly")
    return list(t.sizes())


def _numel(value) -> int:
    return math.prod(_shape(value))


def _is_tensor(value) -> bool:
    return isinstance(value.type(), torch._C.TensorType)


def _module(outputs) -> str:
    """The innermost module that ran this node (fvcore pushes module names as trace scopes)."""
    return outputs[0].node().scopeName().split("/")[-1]


def _linear(inputs, outputs) -> Counter:
    """aten::linear: rows·in·out multiply-adds under its component; the bias add (1 per output) apart."""
    x, w = _shape(inputs[0]), _shape(inputs[1])
    macs = math.prod(x[:-1]) * w[1] * w[0]
    name = _module(outputs)
    key = next((c for suffix, c in LINEAR_COMPONENTS if name.endswith(suffix)), OTHER_MATMUL)
    out = Counter({key: macs})
    if _is_tensor(inputs[2]):
        out["bias_add"] = ADD * _numel(outputs[0])
    return out


def _producer(value) -> str:
    """The op that made `value`, looking through dropout (identity in the traced eval model)."""
    node = value.node()
    while node.kind() in ("aten::dropout", "aten::dropout_"):
        node = next(node.inputs()).node()
    return node.kind()


def _matmul(inputs, outputs) -> Counter:
    """aten::matmul (manual attention): output elements x contracted size; att @ v when att came from softmax."""
    k = _shape(inputs[0])[-1]
    macs = _numel(outputs[0]) * k
    key = "attn_values" if _producer(inputs[0]) == "aten::softmax" else "attn_scores"
    if not _module(outputs).endswith("attn"):
        key = OTHER_MATMUL
    return Counter({key: macs})


def _sdpa(inputs, outputs) -> Counter:
    """aten::scaled_dot_product_attention on the full T x S rectangle (the kernel ignores causality in size):
    q @ kᵀ and p @ v multiply-adds, plus the scale and softmax it runs inside (non-matmul FLOPs)."""
    b, h, t, e = _shape(inputs[0])
    s, ev = _shape(inputs[1])[-2], _shape(inputs[2])[-1]
    scores = b * h * t * s
    return Counter({"attn_scores": scores * e, "attn_values": scores * ev,
                    "attn_scale": ATTN_SCALE * scores, "softmax": SOFTMAX * scores})


def _einsum(inputs, outputs) -> Counter:
    """aten::einsum, exact: the product of every index's size (each output element sums over the
    contracted indices). Two operands only: with more, the cost depends on the contraction order."""
    equation = inputs[0].toIValue().replace(" ", "")
    operands = list(inputs[1].node().inputs())
    if len(operands) != 2 or "..." in equation:
        raise ValueError(f"einsum {equation!r} with {len(operands)} operands: only explicit two-operand "
                         f"equations are counted exactly")
    sizes: dict[str, int] = {}
    for letters, operand in zip(equation.split("->")[0].split(","), operands):
        sizes.update(zip(letters, _shape(operand)))
    return Counter({OTHER_MATMUL: math.prod(sizes.values())})


def _elementwise(per_element: int, key: str) -> Callable:
    def handle(inputs, outputs) -> Counter:
        return Counter({key: per_element * _numel(outputs[0])})
    return handle


def _arith(key_by_scope: Callable[[str], str], per_element: int = 1) -> Callable:
    """add/sub/mul: 1 per output element; 0-dim results are shape arithmetic traced from x.size()."""
    def handle(inputs, outputs) -> Counter:
        if not _is_tensor(outputs[0]) or len(_shape(outputs[0])) == 0:
            return Counter()
        return Counter({key_by_scope(_module(outputs)): per_element * _numel(outputs[0])})
    return handle


def _add_key(scope: str) -> str:
    # GPT.forward adds the positions (scope: the GPT module, "model" inside _Call); Block.forward does the
    # two residual adds (scope: "model.transformer.h.<i>")
    if scope == _MODEL:
        return "position_add"
    return "residual_add" if re.search(r"\.h\.\d+$", scope) else "add"


def _mul_key(scope: str) -> str:
    return "attn_scale" if scope.endswith("attn") else "mul"


def _layer_norm(inputs, outputs) -> Counter:
    """5 per element, + 1 with a weight, + 1 with a bias (fvcore's default: 5, or 4 without affine)."""
    per = LAYER_NORM_CORE + int(_is_tensor(inputs[2])) + int(_is_tensor(inputs[3]))
    return Counter({"layer_norm": per * _numel(inputs[0])})


def _gelu(inputs, outputs) -> Counter:
    approximate = inputs[1].toIValue() if len(inputs) > 1 else "none"
    return Counter({"gelu": (GELU_TANH if approximate == "tanh" else GELU_ERF) * _numel(outputs[0])})


def _cross_entropy(inputs, outputs) -> Counter:
    rows, vocab = _shape(inputs[0])
    return Counter({"cross_entropy": rows * (CROSS_ENTROPY_PER_LOGIT * vocab + CROSS_ENTROPY_PER_ROW)})


def _dropout(inputs, outputs) -> Counter:
    """Identity in eval mode or at p=0 (how the model is traced); otherwise a mask multiply per element."""
    p, train = inputs[1].toIValue(), inputs[2].toIValue()
    return Counter({"dropout": _numel(outputs[0])}) if (train and p > 0) else Counter()


def _zero(inputs, outputs) -> Counter:
    return Counter()


@dataclass(frozen=True)
class Rule:
    handle: Callable
    rule: str


_MOVES = "data movement or shape bookkeeping, no arithmetic: 0"
FVCORE_RULES: dict[str, Rule] = {
    "aten::linear": Rule(_linear, "rows·in·out multiply-adds (component by module) + bias add 1/output"),
    "aten::matmul": Rule(_matmul, "output elements × contracted size multiply-adds (attention scores/values)"),
    "aten::scaled_dot_product_attention": Rule(_sdpa, "q@kᵀ + p@v multiply-adds on the full T×S rectangle; "
                                                      "scale 1 + softmax 5 per score"),
    "aten::einsum": Rule(_einsum, "exact: product of all index sizes (fvcore's default rounds)"),
    "aten::layer_norm": Rule(_layer_norm, "5 per element + 1 weight + 1 bias"),
    "aten::softmax": Rule(_elementwise(SOFTMAX, "softmax"), "5 per element"),
    "aten::gelu": Rule(_gelu, "tanh: 9 per element (erf: 5)"),
    "aten::add": Rule(_arith(_add_key), "1 per element; 0-dim shape arithmetic 0"),
    "aten::sub": Rule(_arith(lambda s: "sub"), "1 per element; 0-dim shape arithmetic 0"),
    "aten::mul": Rule(_arith(_mul_key), "1 per element (the attention scale); 0-dim 0"),
    "aten::floor_divide": Rule(_arith(lambda s: "floor_divide"), "0-dim shape arithmetic (C // n_head): 0"),
    "aten::cross_entropy_loss": Rule(_cross_entropy, "4 per logit + 3 per row"),
    "aten::embedding": Rule(_zero, "a gather (memory read): 0"),
    "aten::dropout": Rule(_dropout, "identity in eval or at p=0: 0; else 1 per element"),
    "aten::masked_fill": Rule(_zero, "a select by mask, no arithmetic: 0"),
    "aten::masked_fill_": Rule(_zero, "a select by mask, no arithmetic: 0"),
    "aten::bitwise_not": Rule(_zero, "building the boolean mask: 0"),
    "aten::tril": Rule(_zero, "building the boolean mask: 0"),
    "aten::ones": Rule(_zero, "building the boolean mask: 0"),
    "aten::zeros": Rule(_zero, "allocating the KV cache: 0"),
    "aten::arange": Rule(_zero, "position indices: 0"),
    **{op: Rule(_zero, _MOVES) for op in (
        "aten::size", "aten::Int", "aten::ScalarImplicit", "aten::view", "aten::reshape", "aten::transpose",
        "aten::contiguous", "aten::split", "aten::slice", "aten::select", "aten::copy_", "aten::to",
        "aten::expand", "aten::unsqueeze", "aten::detach")},
}


def _fvcore_classes():
    # fvcore is imported lazily: importing this module must stay cheap for train.py
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fvcore's import calls torch.jit.script
        from fvcore.nn import FlopCountAnalysis

    class StrictFlopCount(FlopCountAnalysis):
        """FlopCountAnalysis that ignores no aten op: an op without a rule is reported as unsupported.

        (set_op_handle(name, None) cannot be used to drop a default handle: it adds to the ignore list,
        which is consulted only for ops *without* a handle. So all handles are cleared and replaced.)
        """

        def __init__(self, model, inputs, rules: dict[str, Rule]):
            super().__init__(model, inputs)
            self.clear_op_handles()
            self.set_op_handle(**{name: r.handle for name, r in rules.items()})

        def _should_ignore_node(self, node) -> bool:
            kind = node.kind()
            return kind.startswith("prim::") and not kind.startswith(("prim::PythonOp", "prim::CallFunction"))

    return StrictFlopCount


class _BoolCausal:
    """While tracing, x.size() values are tensors, so GPT's `is_causal=(past == 0 and T > 1)` reaches sdpa
    as a tensor, which sdpa rejects. Convert it to bool for the trace (the traced shapes are fixed anyway)."""

    def __enter__(self):
        self.original = F.scaled_dot_product_attention

        def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kwargs):
            return self.original(q, k, v, attn_mask=attn_mask, dropout_p=float(dropout_p),
                                 is_causal=bool(is_causal), **kwargs)

        F.scaled_dot_product_attention = sdpa

    def __exit__(self, *exc):
        F.scaled_dot_product_attention = self.original


@dataclass(frozen=True)
class FvcoreCount:
    matmul: dict[str, int]  # component -> FLOPs (2 x fvcore's multiply-adds)
    macs: int  # fvcore's raw matmul figure (multiply-adds, which fvcore calls "flops")
    non_matmul: dict[str, int]  # op -> FLOPs by the project's per-element rules
    unsupported: dict[str, int]  # op -> occurrences without a rule (must be empty)

    @property
    def total(self) -> int:
        return sum(self.matmul.values())


def fvcore_module_count(module: nn.Module, inputs: tuple, rules: dict[str, Rule] | None = None
                        ) -> tuple[dict[str, int | float], dict[str, int]]:
    """Any module through StrictFlopCount: (counts by key, unsupported op -> occurrences)."""
    analysis = _fvcore_classes()(module, inputs, FVCORE_RULES if rules is None else rules)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
    with _BoolCausal(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dict(analysis.by_operator()), dict(analysis.unsupported_ops())


def fvcore_count(cfg: GPTConfig, batch: int, seq_len: int, *, past: int = 0, last_only: bool = False,
                 with_loss: bool = False, model: GPT | None = None,
                 rules: dict[str, Rule] | None = None) -> FvcoreCount:
    """Trace one forward call (eval mode, meta tensors unless `model` is given) and count it with fvcore.

    with_loss=True traces the forward of a training step (logits on every position + cross-entropy).
    """
    _check_shape(cfg, batch, seq_len, past)
    if with_loss and (past or last_only):
        raise ValueError("with_loss needs logits on every position and no cache")
    model = build_model(cfg) if model is None else model
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        counts, unsupported = fvcore_module_count(_Call(model, past, last_only, with_loss),
                                                  (_tokens(batch, seq_len, device),), rules)
    finally:
        model.train(was_training)
    macs = {k: int(v) for k, v in counts.items() if k in MATMUL_KEYS}
    matmul = {name: 2 * macs.get(name, 0) for name in MATMUL_COMPONENTS}
    if macs.get(OTHER_MATMUL):
        matmul[OTHER_MATMUL] = 2 * macs[OTHER_MATMUL]
    non_matmul = {k: int(v) for k, v in counts.items() if k not in MATMUL_KEYS}
    return FvcoreCount(matmul, sum(macs.values()), non_matmul, unsupported)


def fvcore_default_count(cfg: GPTConfig, batch: int, seq_len: int) -> tuple[int, dict[str, int]]:
    """fvcore out of the box (its own handles): (total "flops" = multiply-adds, unsupported op counts)."""
    _fvcore_classes()  # imports fvcore quietly
    from fvcore.nn import FlopCountAnalysis
    model = build_model(cfg).eval()
    analysis = FlopCountAnalysis(_Call(model), (_tokens(batch, seq_len, "meta"),))
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
    with _BoolCausal(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return int(analysis.total()), dict(analysis.unsupported_ops())


# ----------------------------------------------------------------------------------------------------
# torch FlopCounterMode

def _attention_pairs(query_shape, key_shape) -> int:
    b, h, t, _ = query_shape
    return b * h * t * key_shape[-2]


def attention_forward_formula(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """q @ kᵀ and p @ v on the full rectangle: 2·B·H·T·S·(E + Ev) FLOPs."""
    return 2 * _attention_pairs(query_shape, key_shape) * (query_shape[-1] + value_shape[-1])


def attention_backward_formula(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                               **kwargs) -> int:
    """The gradient's 4 matmuls (dQ, dK, dP, dV) = 2 x forward; no recomputation of the scores."""
    return 2 * attention_forward_formula(query_shape, key_shape, value_shape)


def torch_formulas() -> dict:
    """FlopCounterMode custom_mapping: the CPU attention kernels it misses, and the gradient-only backward."""
    aten = torch.ops.aten
    return {
        aten._scaled_dot_product_flash_attention_for_cpu: attention_forward_formula,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: attention_backward_formula,
        aten._scaled_dot_product_flash_attention_backward: attention_backward_formula,
        aten._scaled_dot_product_efficient_attention_backward: attention_backward_formula,
        aten._scaled_dot_product_cudnn_attention_backward: attention_backward_formula,
    }


@dataclass(frozen=True)
class TorchCount:
    total: int  # FLOPs of everything run (FlopCounterMode counts 2 per multiply-add)
    forward: int  # FLOPs of the forward alone (= total unless a training step was counted)
    components: dict[str, int]  # forward: qkv, attention (scores + values together), attn_proj, ...
    by_op: dict[str, int]  # everything run, by aten op


def _components(flop_counts: dict) -> dict[str, int]:
    """Per component from FlopCounterMode's per-module counts (module totals include their children)."""
    totals = {name: sum(ops.values()) for name, ops in flop_counts.items()}
    comps = {c: 0 for c in ("qkv", "attention", "attn_proj", "mlp_up", "mlp_down", "lm_head")}
    for name, flops in totals.items():
        for suffix, comp in LINEAR_COMPONENTS:
            if name.endswith("." + suffix):
                comps[comp] += flops
        if name.endswith(".attn"):
            # q @ kᵀ and p @ v run in the attention module itself, outside its two Linear children
            comps["attention"] += flops - totals.get(name + ".c_attn", 0) - totals.get(name + ".c_proj", 0)
    return comps


def torch_count(cfg: GPTConfig, batch: int, seq_len: int, *, past: int = 0, last_only: bool = False,
                train: bool = False, device: str | torch.device = "meta", model: GPT | None = None,
                formulas: bool = True) -> TorchCount:
    """FlopCounterMode over one forward call, or with train=True a training step (forward with targets, then
    backward; `forward` and `components` are read between the two). formulas=False leaves torch's registry
    as it is (to see what it misses)."""
    from torch.utils.flop_counter import FlopCounterMode
    _check_shape(cfg, batch, seq_len, past)
    if train and (past or last_only):
        raise ValueError("a training step has no cache and needs logits on every position")
    model = build_model(cfg, device) if model is None else model
    device = next(model.parameters()).device
    was_training = model.training
    model.train(train)
    idx = _tokens(batch, seq_len, device)
    counter = FlopCounterMode(display=False, custom_mapping=torch_formulas() if formulas else None)
    try:
        with counter:
            if train:
                _, loss = model(idx, idx)
                forward_counts = {m: dict(ops) for m, ops in counter.get_flop_counts().items()}
                loss.backward()
            else:
                with torch.no_grad():
                    _Call(model, past, last_only)(idx)
                forward_counts = counter.get_flop_counts()
    finally:
        model.train(was_training)
    by_op = {str(op): int(v) for op, v in counter.get_flop_counts().get("Global", {}).items()}
    forward = sum(forward_counts.get("Global", {}).values())
    return TorchCount(int(counter.get_total_flops()), int(forward), _components(forward_counts), by_op)
