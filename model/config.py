"""Configuration: the model's shape and the training run, as frozen dataclasses.

Config files are flat TOML tables read with `tomllib`; command-line overrides are `--key=value`, converted
to the type of the field they set. Every key belongs to exactly one dataclass, and an unknown key is an
error that lists the valid ones.
"""
from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterable

POS_ENCODINGS = ("learned", "sinusoidal")
ATTENTIONS = ("sdpa", "manual")
ACTIVATIONS = ("gelu_tanh", "gelu")
LR_SCHEDULES = ("cosine", "linear")
MATMUL_PRECISIONS = ("auto", "highest", "high", "medium")  # torch.set_float32_matmul_precision's, plus auto


@dataclass(frozen=True)
class GPTConfig:
    """The shape of the model. Defaults are GPT-2 124M."""

    vocab_size: int = 50257  # number of token ids the embedding and the head cover
    block_size: int = 1024  # longest context (positions) the model accepts
    n_layer: int = 12  # number of transformer blocks
    n_head: int = 12  # attention heads per block; n_embd must divide evenly among them
    n_embd: int = 768  # residual stream width d
    dropout: float = 0.0  # dropout on attention weights and residual branches (training only)
    bias: bool = True  # biases in Linear layers and LayerNorms (GPT-2 has them)
    pos_encoding: str = "learned"  # "learned" (GPT-2's wpe table) or "sinusoidal" (fixed, Vaswani et al.)
    attention: str = "sdpa"  # "sdpa" (fused kernel) or "manual" (q@kᵀ, masked softmax, att@v as separate ops)
    # MLP activation: "gelu_tanh" (GPT-2's tanh approximation, needed to reproduce its logits) or "gelu"
    # (exact erf form, nanoGPT's; about twice as fast as the tanh form on CPU, see the README, "Training speed")
    activation: str = "gelu_tanh"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.pos_encoding not in POS_ENCODINGS:
            raise ValueError(f"pos_encoding must be one of {POS_ENCODINGS}, got {self.pos_encoding!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {self.attention!r}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


@dataclass(frozen=True)
class TrainConfig:
    """Everything about a training run that is not the model's shape."""

    # data and output
    dataset: str = "data/pydoc_char"  # dataset folder holding train.bin, val.bin, meta.json
    out_dir: str = "out/default"  # where checkpoints, metrics.jsonl and the loss plot go
    # batch
    batch_size: int = 12  # sequences per micro-batch (per process)
    grad_accum: int = 1  # micro-batches per optimizer step (in total, across data-parallel ranks)
    max_iters: int = 2000  # optimizer steps
    # optimizer (AdamW, decoupled weight decay on 2-D weights only)
    lr: float = 1e-3  # peak learning rate
    min_lr: float = 1e-4  # learning rate at the end of the cosine decay
    warmup_iters: int = 100  # linear warmup steps from 0 to lr
    lr_decay_iters: int = 0  # step where the decay reaches min_lr; 0 means max_iters
    # shape of the decay after warmup: "cosine" (nanoGPT's) or "linear" (straight line to min_lr, which
    # spends more steps at high lr and ends lower on short runs; see the README, "Training speed")
    lr_schedule: str = "cosine"
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # clip the global gradient norm to this; 0 disables clipping
    # evaluation and checkpoints
    eval_interval: int = 250  # evaluate (and checkpoint) every this many steps, and at the end
    eval_iters: int = 20  # batches per split in an evaluation
    # system
    device: str = "auto"  # "auto" (cuda when available), "cpu", "cuda", "cuda:N"
    dtype: str = "auto"  # "auto" (bf16 autocast on cuda, fp32 on cpu), "float32", "bfloat16"
    compile: bool = False  # torch.compile the model
    # float32 matmuls (torch.set_float32_matmul_precision): "highest" (full fp32), "high" (TF32 on CUDA),
    # "medium" (bf16 inputs, fp32 accumulation: on CUDA, and on CPUs with bf16 matmul units such as AMX, where
    # recipe (a) ran 1.29-1.34x faster than in fp32; a no-op on other CPUs). "auto": "high" on CUDA (nanoGPT's TF32), "highest"
    # on CPU. See the README, "Training speed".
    matmul_precision: str = "auto"
    seed: int = 1337
    peak_flops: float = 0.0  # peak FLOP/s for MFU; 0 means look up the GPU or calibrate the CPU
    resume: bool = False  # continue from out_dir/last.pt
    overwrite: bool = False  # start afresh even though out_dir already holds a checkpoint
    progress: bool = True  # show the tqdm progress bar

    def __post_init__(self) -> None:
        positive = ("batch_size", "grad_accum", "max_iters", "eval_interval", "eval_iters")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("warmup_iters", "lr_decay_iters"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        for name in ("lr", "min_lr", "weight_decay", "grad_clip", "peak_flops"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite non-negative number, got {value!r}")
        if self.lr == 0:
            raise ValueError("lr must be positive, got 0")
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr={self.min_lr} is larger than lr={self.lr}")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"dtype must be one of auto, float32, bfloat16, got {self.dtype!r}")
        if self.matmul_precision not in MATMUL_PRECISIONS:
            raise ValueError(f"matmul_precision must be one of {MATMUL_PRECISIONS}, got {self.matmul_precision!r}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")


# ----------------------------------------------------------------------------------------------------
# Parsing: TOML files and --key=value overrides, typed by the dataclass field they set.

def _field_types(cls) -> dict[str, type]:
    hints = {"int": int, "float": float, "bool": bool, "str": str}
    return {f.name: hints[f.type] if isinstance(f.type, str) else f.type for f in fields(cls)}


class Text(str):
    """A value typed on the command line: parsed from text, unlike TOML values, which carry their own type."""


def convert(key: str, value: Any, typ: type) -> Any:
    """Convert a TOML value or a command-line `Text` to the field's type, or raise ValueError."""
    if isinstance(value, str) and typ is not str and not isinstance(value, Text):
        raise ValueError(f"{key} expects {typ.__name__}, got the string {value!r} (drop the quotes)")
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif typ is str:
        if isinstance(value, str):
            return str(value)  # a plain str: checkpoints must hold no subclass
    raise ValueError(f"--{key} expects {typ.__name__}, got {value!r}")


def parse_overrides(args: Iterable[str]) -> dict[str, str | None]:
    """['--n_layer=4', '--resume'] -> {'n_layer': '4', 'resume': None}. Dashes in keys become underscores.

    A bare --flag (value None) sets a bool field to True; any other field needs a value.
    """
    out: dict[str, str | None] = {}
    for arg in args:
        if not arg.startswith("--") or len(arg) == 2:
            raise ValueError(f"expected --key=value, got {arg!r}")
        key, eq, value = arg[2:].partition("=")
        out[key.replace("-", "_")] = Text(value) if eq else None
    return out


def read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: invalid TOML: {e}") from None
    for key, value in data.items():
        if isinstance(value, dict):
            raise ValueError(f"{path}: tables are not used, put {key!r}'s keys at the top level")
    return data


def read_json(path: str | Path, missing: str) -> dict[str, Any]:
    """A JSON object from `path`; FileNotFoundError with `missing` when absent, ValueError naming the file when
    it is not a valid JSON object."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(missing)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def build(classes: tuple[type, ...], values: dict[str, Any], defaults: dict[str, Any] | None = None):
    """Split a flat {key: value} mapping among dataclasses; each value is converted to its field's type.

    Returns one instance per class, in order. An unknown key raises ValueError listing the valid keys.
    `defaults` fill keys that `values` lacks (e.g. vocab_size read from a dataset).
    """
    types = {}
    for cls in classes:
        types.update({k: (cls, t) for k, t in _field_types(cls).items()})
    unknown = [k for k in values if k not in types]
    if unknown:
        raise ValueError(f"unknown config key {unknown[0]!r}; valid keys: {', '.join(sorted(types))}")
    kwargs: dict[type, dict[str, Any]] = {cls: {} for cls in classes}
    for key, value in {**(defaults or {}), **values}.items():
        cls, typ = types[key]
        if value is None:
            if typ is not bool:
                raise ValueError(f"--{key} needs a value: --{key}=...")
            value = True
        kwargs[cls][key] = convert(key, value, typ)
    return tuple(cls(**kwargs[cls]) for cls in classes)


def load(config_path: str | Path | None, overrides: Iterable[str] = (), classes=(GPTConfig, TrainConfig),
         defaults: dict[str, Any] | None = None):
    """TOML file (optional) + --key=value overrides -> one instance per class."""
    values: dict[str, Any] = read_toml(config_path) if config_path else {}
    values.update(parse_overrides(overrides))
    return build(classes, values, defaults)


def to_dict(obj) -> dict[str, Any]:
    return dataclasses.asdict(obj)
