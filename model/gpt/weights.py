"""Pretrained weights from local files: Hugging Face GPT-2 folders, nanoGPT ckpt.pt files, and the checkpoints
train.py writes (a .pt file, or its out_dir). No network.

Hugging Face GPT-2 stores its four matmul weights per block as Conv1D, shaped (in, out); torch's Linear is
(out, in), so those are transposed. Our parameter names are GPT-2's, so nothing else is renamed.
"""
from __future__ import annotations

import dataclasses
import zipfile
from pathlib import Path
from zlib import error as zlib_error
from typing import TYPE_CHECKING

import torch

from ..config import GPTConfig, read_json

if TYPE_CHECKING:  # for annotations only: the loaders build whatever class they are given
    from .gpt import GPT

CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
BUFFERS = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers of older HF GPT-2 and nanoGPT's slow path
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
GELU_TANH = ("gelu_new", "gelu_pytorch_tanh")  # the tanh approximation our MLP uses
OUT_DIR_CHECKPOINTS = ("best.pt", "last.pt")  # what train.py leaves in its out_dir, in order of preference


def out_dir_checkpoint(out_dir: str | Path) -> Path | None:
    """The checkpoint to read from a train.py out_dir: best.pt, else last.pt; None when it holds neither."""
    return next((Path(out_dir) / name for name in OUT_DIR_CHECKPOINTS if (Path(out_dir) / name).is_file()), None)


def load_pretrained(cls: type[GPT], path: str | Path, device: str | torch.device = "cpu") -> GPT:
    """A `cls` (GPT) in eval mode from a Hugging Face GPT-2 folder (config.json + weights), a train.py out_dir
    (its best.pt, else last.pt), or a checkpoint file: train.py's or nanoGPT's ckpt.pt."""
    path = Path(path)
    if path.is_dir() and not (path / "config.json").is_file():
        found = out_dir_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"{path}: neither a Hugging Face folder (no config.json) nor a train.py out_dir "
                                    f"(no {' or '.join(OUT_DIR_CHECKPOINTS)})")
        path = found
    if path.is_dir():
        model = load_hf_gpt2(cls, path)
    elif path.is_file():
        model = load_checkpoint_file(cls, path)
    else:
        raise FileNotFoundError(f"no such checkpoint file or folder: {path}")
    return model.to(device).eval()


def load_checkpoint_file(cls: type[GPT], file: str | Path) -> GPT:
    """A `cls` from a checkpoint file: train.py's (model_config + model) or nanoGPT's (model_args + model)."""
    file = Path(file)
    if not file.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {file}")
    ckpt = _torch_load(file)
    if isinstance(ckpt, dict) and "model" in ckpt and ("model_config" in ckpt or "model_args" in ckpt):
        key = "model_config" if "model_config" in ckpt else "model_args"  # train.py's, nanoGPT's
        model = cls(_config_from_args(ckpt[key], file, key))
        _load_state(model, ckpt["model"], file)
        return model
    keys = sorted(ckpt)[:10] if isinstance(ckpt, dict) else type(ckpt).__name__
    raise ValueError(f"{file}: unknown checkpoint format (expected train.py's 'model_config' and 'model' keys or "
                     f"nanoGPT's 'model_args' and 'model', found {keys})")


def _config_from_args(args, file: Path, key: str) -> GPTConfig:
    if not isinstance(args, dict):
        raise ValueError(f"{file}: {key} is not a dict ({type(args).__name__})")
    unknown = sorted(set(args) - {f.name for f in dataclasses.fields(GPTConfig)})
    if unknown:
        raise ValueError(f"{file}: {key} has keys GPTConfig does not know: {unknown}")
    try:
        return GPTConfig(**args)
    except ValueError as e:
        raise ValueError(f"{file}: {e}") from None


# ----------------------------------------------------------------------------------------------------
# Hugging Face GPT-2

def config_from_hf(hf: dict, source: str = "config.json") -> GPTConfig:
    """GPTConfig from a GPT-2 config.json dict; anything our model computes differently is a ValueError."""
    if hf.get("model_type", "gpt2") != "gpt2":
        raise ValueError(f"{source}: model_type {hf['model_type']!r} is not gpt2")
    checks = {
        "activation_function": (hf.get("activation_function", "gelu_new"), GELU_TANH),
        "layer_norm_epsilon": (hf.get("layer_norm_epsilon", 1e-5), (1e-5,)),
        "scale_attn_weights": (hf.get("scale_attn_weights", True), (True,)),
        "scale_attn_by_inverse_layer_idx": (hf.get("scale_attn_by_inverse_layer_idx", False), (False,)),
        "add_cross_attention": (hf.get("add_cross_attention", False), (False,)),
        "tie_word_embeddings": (hf.get("tie_word_embeddings", True), (True,)),
    }
    for key, (value, allowed) in checks.items():
        if value not in allowed:
            raise ValueError(f"{source}: {key}={value!r} is not supported (expected one of {list(allowed)})")
    try:
        n_embd = hf["n_embd"]
        n_inner = hf.get("n_inner")
        if n_inner not in (None, 4 * n_embd):
            raise ValueError(f"{source}: n_inner={n_inner} is not supported (the MLP is 4·n_embd={4 * n_embd})")
        return GPTConfig(vocab_size=hf["vocab_size"], block_size=hf["n_positions"], n_layer=hf["n_layer"],
                         n_head=hf["n_head"], n_embd=n_embd, dropout=0.0, bias=True)
    except KeyError as e:
        raise ValueError(f"{source}: missing key {e.args[0]!r}") from None


def hf_config(config: GPTConfig) -> dict:
    """The config.json dict of a transformers GPT2LMHeadModel with the same shape as config (no dropout)."""
    if config.pos_encoding != "learned" or not config.bias:
        raise ValueError(f"GPT-2 has learned positions and biases; this model has pos_encoding="
                         f"{config.pos_encoding!r}, bias={config.bias}")
    return dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=config.vocab_size,
                n_positions=config.block_size, n_embd=config.n_embd, n_layer=config.n_layer,
                n_head=config.n_head, activation_function="gelu_new", layer_norm_epsilon=1e-5,
                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
                bos_token_id=None, eos_token_id=None)


def _read_hf_weights(folder: Path) -> tuple[dict[str, torch.Tensor], Path]:
    for name in HF_WEIGHT_FILES:
        file = folder / name
        if not file.is_file():
            continue
        if name.endswith(".safetensors"):
            try:
                from safetensors.torch import load_file
            except ImportError:
                raise ValueError(f"{file}: reading .safetensors needs the safetensors package "
                                 f"(pip install safetensors)") from None
            try:
                return load_file(str(file)), file
            except Exception as e:  # safetensors raises its own error types for corrupt files
                raise ValueError(f"{file}: not a readable safetensors file ({e})") from None
        return _torch_load(file), file
    raise FileNotFoundError(f"{folder}: no {' or '.join(HF_WEIGHT_FILES)} (sharded checkpoints are not supported)")


def load_hf_gpt2(cls: type[GPT], folder: str | Path) -> GPT:
    """A `cls` (GPT) with the weights of a local Hugging Face GPT-2 folder (config.json + safetensors or .bin)."""
    folder = Path(folder)
    config_file = folder / "config.json"
    hf = read_json(config_file, f"Hugging Face folder has no config.json: {config_file}")
    config = config_from_hf(hf, str(config_file))
    state, file = _read_hf_weights(folder)
    model = cls(config)
    _load_state(model, state, file, transpose=CONV1D)
    return model


def hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """model's weights under transformers GPT2LMHeadModel's names and shapes (Conv1D weights as (in, out))."""
    hf_config(model.config)  # raises for shapes GPT-2 cannot hold
    out = {}
    for key, value in model.state_dict().items():
        value = value.detach()
        out[key] = value.t().contiguous() if key.endswith(CONV1D) else value.clone()
    return out


def to_hf_gpt2(model: GPT):
    """A transformers GPT2LMHeadModel (eval mode) holding model's weights; needs transformers."""
    from transformers import GPT2Config, GPT2LMHeadModel

    hf = GPT2LMHeadModel(GPT2Config(**hf_config(model.config))).eval()
    hf.load_state_dict(hf_state_dict(model), strict=True)
    return hf.to(model.transformer.wte.weight.device)


# ----------------------------------------------------------------------------------------------------
# nanoGPT ckpt.pt: {"model_args": dict(n_layer, n_head, n_embd, block_size, bias, vocab_size, dropout),
#                   "model": state_dict (maybe with torch.compile's "_orig_mod." prefix), ...}

def save_nanogpt(model: GPT, file: str | Path, **extra) -> None:
    """Write model as a nanoGPT ckpt.pt (model_args + model; extra keys such as iter_num are stored too)."""
    args = dataclasses.asdict(model.config)
    torch.save({"model_args": args, "model": model.state_dict(), **extra}, file)


# ----------------------------------------------------------------------------------------------------

def verify_archive(path: str | Path) -> None:
    """Check every member of a torch zip archive against its CRC-32 (torch.load checks none of them), so
    flipped bits or a torn copy are a ValueError naming the file and the damaged member."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, zlib_error) as e:
        raise ValueError(f"{path}: corrupt checkpoint ({type(e).__name__}: {e})") from None
    if bad is not None:
        raise ValueError(f"{path}: corrupt checkpoint: {bad} fails its CRC-32 check")



def _torch_load(file: Path):
    if zipfile.is_zipfile(file):  # torch.save's zip format; the legacy format carries no CRCs to check
        verify_archive(file)
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors come in many types; all mean "not a checkpoint we can read"
        raise ValueError(f"{file}: cannot be read as a torch checkpoint with weights_only=True ({e})") from None


def _canonical(key: str) -> str:
    """Our name for a checkpoint key: no torch.compile/DDP wrappers, with the 'transformer.' prefix."""
    for prefix in ("_orig_mod.", "module."):
        while key.startswith(prefix):
            key = key[len(prefix):]
    if key.startswith("transformer."):
        key = key[len("transformer."):]
    return key if key == "lm_head.weight" else "transformer." + key


def _load_state(model: GPT, state: dict, file: Path, transpose: tuple[str, ...] = ()) -> None:
    """Copy a checkpoint state dict into model, checking names and shapes; errors name the file."""
    ours = model.state_dict()
    loaded: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor) or key.endswith(BUFFERS):
            continue
        name = _canonical(key)
        if name.endswith(transpose):
            value = value.t()
        loaded[name] = value
    head = loaded.pop("lm_head.weight", None)
    wte = loaded.get("transformer.wte.weight")
    # the head is tied to the embedding: a stored copy must equal it (Hugging Face's safetensors omit it)
    if head is not None and wte is not None and (head.shape != wte.shape or not torch.equal(head, wte)):
        raise ValueError(f"{file}: lm_head.weight differs from transformer.wte.weight; untied heads are not supported")
    expected = {k for k in ours if k != "lm_head.weight"}
    missing, unexpected = sorted(expected - set(loaded)), sorted(set(loaded) - expected)
    if missing or unexpected:
        raise ValueError(f"{file}: state dict does not match the model: missing {missing[:5]}"
                         f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                         f"{'...' if len(unexpected) > 5 else ''}")
    for key in sorted(expected):
        if loaded[key].shape != ours[key].shape:
            raise ValueError(f"{file}: {key} has shape {tuple(loaded[key].shape)}, the config implies "
                             f"{tuple(ours[key].shape)}")
    model.load_state_dict({**loaded, "lm_head.weight": loaded["transformer.wte.weight"]}, strict=True)
