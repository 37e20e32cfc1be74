"""Configuration: the model's shape and the training run, as frozen dataclasses.

Config files are flat TOML tables read with `tomllib`; command-line overrides are `--key=value`, converted
to the type of the field they set. Every key belongs to exactly one dataclass, and an unknown key is an
error that lists the valid ones.
"""
from __future__ import annotations

import dataclasses
import difflib
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
DTYPES = ("auto", "float32", "bfloat16")


def key(default: Any, help: str, **allowed: Any) -> Any:
    """A config field: its default, its one-line description (shown by --help and in docs/config.md), and the
    values it accepts, as keyword arguments of check() (low, high, open_low, open_high, choices)."""
    return dataclasses.field(default=default, metadata={"help": help, "allowed": allowed})


@dataclass(frozen=True)
class GPTConfig:
    """The shape of the model. Defaults are GPT-2 124M."""

    vocab_size: int = key(50257, "token ids the embedding and the head cover (train.py reads it from the dataset)",
                          low=1)
    block_size: int = key(1024, "longest context (positions) the model accepts", low=1)
    n_layer: int = key(12, "transformer blocks", low=1)
    n_head: int = key(12, "attention heads per block; n_embd must divide evenly among them", low=1)
    n_embd: int = key(768, "residual stream width d", low=1)
    dropout: float = key(0.0, "dropout on attention weights and residual branches (training only)", low=0, high=1,
                         open_high=True)
    bias: bool = key(True, "biases in Linear layers and LayerNorms (GPT-2 has them)")
    pos_encoding: str = key("learned", "learned (GPT-2's wpe table) or sinusoidal (fixed, Vaswani et al.)",
                            choices=POS_ENCODINGS)
    attention: str = key("sdpa", "sdpa (one fused kernel) or manual (q@kᵀ, masked softmax, att@v as separate ops)",
                         choices=ATTENTIONS)
    activation: str = key("gelu_tanh", "MLP activation: gelu_tanh (GPT-2's tanh form, matches its logits) or gelu "
                          "(exact erf form, nanoGPT's)", choices=ACTIVATIONS)

    def __post_init__(self) -> None:
        check_fields(self)
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


def param_count(cfg: GPTConfig) -> int:
    """All parameters, the tied head counted once, in closed form (any size, nothing allocated). Equals
    GPT(cfg).num_params(); model.flops.formulas calls it params_total.

    wte V·d, wpe block·d (learned positions only), per layer: ln_1/ln_2 weights 2d, c_attn 3d², attn.c_proj
    d², c_fc 4d², mlp.c_proj 4d², with bias 11d more (ln 2d, c_attn 3d, c_proj d, c_fc 4d, c_proj d);
    ln_f d (+d with bias); lm_head 0 (it is wte).
    """
    d, b = cfg.n_embd, int(cfg.bias)
    wpe = cfg.block_size * d if cfg.pos_encoding == "learned" else 0
    per_layer = 12 * d * d + 2 * d + 11 * d * b
    return cfg.vocab_size * d + wpe + cfg.n_layer * per_layer + d + d * b


@dataclass(frozen=True)
class TrainConfig:
    """Everything about a training run that is not the model's shape."""

    # data and output
    dataset: str = key("data/pydoc_char", "dataset folder holding train.bin, val.bin and meta.json")
    out_dir: str = key("out/default", "where checkpoints, metrics.jsonl and loss.png go")
    # batch
    batch_size: int = key(12, "sequences per micro-batch (per process)", low=1)
    grad_accum: int = key(1, "micro-batches per optimizer step, in total across data-parallel ranks", low=1)
    max_iters: int = key(2000, "optimizer steps", low=1)
    # optimizer: AdamW, decoupled weight decay on 2-D weights only
    lr: float = key(1e-3, "peak learning rate", low=0)
    min_lr: float = key(1e-4, "learning rate at the end of the decay", low=0)
    warmup_iters: int = key(100, "linear warmup steps from 0 to lr", low=0)
    lr_decay_iters: int = key(0, "step where the decay reaches min_lr; 0 means max_iters", low=0)
    lr_schedule: str = key("cosine", "decay after warmup: cosine (nanoGPT's) or linear (a straight line to min_lr)",
                           choices=LR_SCHEDULES)
    weight_decay: float = key(0.1, "AdamW weight decay, applied to 2-D weights only", low=0)
    beta1: float = key(0.9, "AdamW beta1 (first-moment decay)", low=0, high=1, open_high=True)
    beta2: float = key(0.99, "AdamW beta2 (second-moment decay)", low=0, high=1, open_high=True)
    grad_clip: float = key(1.0, "clip the global gradient norm to this; 0 disables clipping", low=0)
    # evaluation and checkpoints
    eval_interval: int = key(250, "evaluate and checkpoint every this many steps, and at the end", low=1)
    eval_iters: int = key(20, "batches per split in an evaluation", low=1)
    # system
    device: str = key("auto", "auto (cuda when available), cpu, cuda or cuda:N")
    dtype: str = key("auto", "auto (bf16 autocast on cuda, fp32 on cpu), float32 or bfloat16", choices=DTYPES)
    compile: bool = key(False, "torch.compile the model")
    matmul_precision: str = key("auto", "float32 matmuls: highest (fp32), high (TF32 on CUDA), medium (bf16 inputs; "
                                "CUDA, AMX CPUs); auto: high on CUDA, highest on CPU",
                                choices=MATMUL_PRECISIONS)
    seed: int = key(1337, "seed of the initialization, dropout and batch sampling", low=0, high=2**63 - 2)
    threads: int = key(0, "CPU threads; 0: from the load, one per core less those other programs keep busy, "
                          "adjusted while training", low=0)
    peak_flops: float = key(0.0, "peak FLOP/s for MFU; 0: the GPU's datasheet figure, or CPU cores x max clock "
                            "x FLOPs/cycle (flops.py --peak shows it)", low=0)
    resume: bool = key(False, "continue from out_dir/last.pt")
    overwrite: bool = key(False, "replace the run out_dir holds (deleted once the new run has saved)")
    progress: bool = key(True, "show the tqdm progress bar")

    def __post_init__(self) -> None:
        check_fields(self)
        if self.lr == 0:
            raise ValueError("lr must be positive, got 0")
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr={self.min_lr} is larger than lr={self.lr}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")


# ----------------------------------------------------------------------------------------------------
# Validation: one helper for every number and choice the project checks.

def check(name: str, value: Any, kind: type = int, low: float | None = None, high: float | None = None, *,
          open_low: bool = False, open_high: bool = False, choices: Iterable | None = None) -> Any:
    """Return `value` if it is valid, else raise a ValueError naming `name` and the value.

    Valid: one of `choices` when given; otherwise a number of `kind` (int: an int; float: a finite int or
    float; never a bool) within low..high, ends included unless open_low / open_high.
    """
    if choices is not None:
        if value not in tuple(choices):
            raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
        return value
    number = isinstance(value, int if kind is int else (int, float)) and not isinstance(value, bool)
    ok = (number and (isinstance(value, int) or math.isfinite(value))
          and (low is None or (value > low if open_low else value >= low))
          and (high is None or (value < high if open_high else value <= high)))
    if not ok:
        raise ValueError(f"{name} must be {_describe(kind, low, high, open_low, open_high)}, got {value!r}")
    return value


def _describe(kind: type, low, high, open_low: bool, open_high: bool) -> str:
    """The valid values in words: "in [0, 1)", "a positive integer", "a finite non-negative number", ..."""
    if high is not None:
        return f"in {'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
    base = "an integer" if kind is int else "a finite number"
    if low is None:
        return base
    if low == 0 or (kind is int and low == 1 and not open_low):
        sign = "positive" if (low == 1 or open_low) else "non-negative"
        return f"a {sign} integer" if kind is int else f"a finite {sign} number"
    return f"{base} {'>' if open_low else '>='} {low}"


def check_fields(obj) -> None:
    """check() every field of a config dataclass against the values its key() allows."""
    types = _field_types(type(obj))
    for f in fields(obj):
        allowed = f.metadata.get("allowed")
        if allowed:
            check(f.name, getattr(obj, f.name), types[f.name], **allowed)


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
        near = difflib.get_close_matches(unknown[0], types, n=1)
        hint = f"did you mean {near[0]!r}? " if near else ""
        raise ValueError(f"unknown config key {unknown[0]!r}; {hint}valid keys: {', '.join(sorted(types))}")
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


# ----------------------------------------------------------------------------------------------------
# Documentation of the keys, from the fields themselves: --help and docs/config.md.

def show(value: Any) -> str:
    """A value as it is written after --key= (bools as true/false, strings bare)."""
    if isinstance(value, bool):
        return str(value).lower()
    return value if isinstance(value, str) else repr(value)


def allowed(f: dataclasses.Field, typ: type) -> str:
    """What a field accepts, in words: its choices or its range, else just its type."""
    spec = f.metadata.get("allowed") or {}
    if "choices" in spec:
        return ", ".join(spec["choices"])
    if spec:
        return _describe(typ, spec.get("low"), spec.get("high"), spec.get("open_low", False),
                         spec.get("open_high", False))
    return {bool: "true or false", str: "text", int: "an integer", float: "a number"}[typ]


def help_lines(cls, values: dict[str, Any]) -> list[str]:
    """`--key=VALUE  description` for every field of cls: VALUE is values[key] where given, else the default."""
    args = [f"--{f.name}={show(values.get(f.name, f.default))}" for f in fields(cls)]
    width = min(26, max(map(len, args)))
    return [f"  {arg:<{width}}  {f.metadata['help']}" for arg, f in zip(args, fields(cls))]


def markdown_reference(file_values: dict[str, Any], file_name: str, classes=(GPTConfig, TrainConfig)) -> str:
    """docs/config.md: one table row per key (type, the value of `file_name`, the dataclass default, what it
    accepts, its description)."""
    lines = ["# Config keys", "",
             "Every key of `train.py` (and the model keys of `flops.py`): `--key=value` on the command line, "
             "`key = value` in a TOML config file; a command-line value wins over the file's. `python train.py "
             "[CONFIG.toml] --help` lists the same keys with the values that run would use.", "",
             f"The `{file_name}` column holds the values of `python train.py` with no arguments; where it is "
             "empty, the run uses the default. `vocab_size` comes from the dataset's meta.json unless a config "
             "sets it.", "",
             "This file is generated from the dataclasses in `model/config.py`: "
             "`python -m model.cli config-doc > docs/config.md` (a test checks that it is current).", ""]
    for cls in classes:
        types = _field_types(cls)
        lines += [f"## {cls.__name__}", "", (cls.__doc__ or "").strip().splitlines()[0], "",
                  f"| key | type | {file_name} | default | accepts | description |",
                  "|---|---|---|---|---|---|"]
        for f in fields(cls):
            in_file = f"`{show(file_values[f.name])}`" if f.name in file_values else ""
            lines.append(f"| `{f.name}` | {types[f.name].__name__} | {in_file} | `{show(f.default)}` | "
                         f"{allowed(f, types[f.name])} | {f.metadata['help']} |")
        lines.append("")
    return "\n".join(lines)
