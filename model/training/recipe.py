"""Recipes: a TOML config and --key=value overrides -> (GPTConfig, TrainConfig), as train.py, scaling.py,
flops.py and bench/tilt.py read them. vocab_size comes from the dataset's meta.json unless the config sets it."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..cli import DEFAULT_CONFIG, ROOT
from ..config import GPTConfig, TrainConfig, build, help_lines, parse_overrides, read_toml
from .data import ensure_dataset, load_meta


def split_argv(argv: list[str]) -> tuple[Path | None, list[str]]:
    """(config path, overrides): the config named first, else configs/default.toml when every argument is an
    override."""
    if argv and not argv[0].startswith("--"):
        return Path(argv[0]), argv[1:]
    return (DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None), argv


def read_values(path: str | Path | None, overrides: list[str]) -> dict[str, Any]:
    """The flat {key: value} of a TOML file (optional) with the overrides on top."""
    return {**(read_toml(path) if path else {}), **parse_overrides(overrides)}


def load_recipe(path: str | Path | None, overrides: list[str] = ()) -> tuple[GPTConfig, TrainConfig]:
    """(GPTConfig, TrainConfig) of a training recipe. Every key is checked first; then the dataset is found
    (cwd, then the repository root) or prepared when it is a built-in one, and vocab_size read from it."""
    values = read_values(path, list(overrides))
    _, train_cfg = build((GPTConfig, TrainConfig), values, defaults={"vocab_size": 1})
    dataset = ensure_dataset(train_cfg.dataset)
    meta = load_meta(dataset)
    return build((GPTConfig, TrainConfig), {**values, "dataset": str(dataset)},
                 defaults={"vocab_size": meta["vocab_size"]})


def load_model_config(path: str | Path | None, overrides: list[str]) -> tuple[GPTConfig, str]:
    """The model config of a recipe (its training keys are read and ignored), for counting: nothing is
    prepared. Without vocab_size, when the config names a dataset whose meta.json exists, vocab_size comes from
    it. Returns (GPTConfig, a note on where vocab_size came from)."""
    values = read_values(path, overrides)
    defaults, note = {}, "vocab_size from the config" if "vocab_size" in values else "vocab_size: GPTConfig default"
    if "vocab_size" not in values and "dataset" in values:
        meta_path = Path(str(values["dataset"])) / "meta.json"
        try:
            defaults["vocab_size"] = load_meta(str(values["dataset"]))["vocab_size"]
            note = f"vocab_size from {meta_path}"
        except FileNotFoundError:
            note = f"vocab_size: GPTConfig default ({meta_path} not found)"
    model_cfg, _ = build((GPTConfig, TrainConfig), values, defaults=defaults)
    return model_cfg, note


def keys_help(path: Path | None, overrides: list[str]) -> str:
    """Every key with the value the recipe gives it (vocab_size from the dataset's meta.json where it exists)
    and what it means: train.py --help."""
    values = read_values(path, overrides)
    dataset = Path(str(values.get("dataset", TrainConfig.dataset)))
    if "vocab_size" not in values:
        meta = dataset / "meta.json"
        values["vocab_size"] = load_meta(dataset)["vocab_size"] if meta.is_file() else "<meta.json>"
    source = "the defaults" if path is None else path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    lines = [f"Keys, with the values of {source}{' and the overrides given' if overrides else ''} "
             f"(docs/config.md describes them all):"]
    for cls, title in ((GPTConfig, "model"), (TrainConfig, "training")):
        lines += [f"{title} ({cls.__name__}):", *help_lines(cls, values)]
    return "\n".join(lines)
