"""GPT.from_pretrained: Hugging Face GPT-2 folders (safetensors, .bin), nanoGPT ckpt.pt files, and train.py's
checkpoints (a .pt file or an out_dir)."""
import json

import pytest
import torch

from model import GPT, GPTConfig
from model.gpt.weights import hf_config, load_pretrained, save_nanogpt, to_hf_gpt2

transformers = pytest.importorskip("transformers")


def tiny_hf(seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=67, n_positions=24, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
               attn_pdrop=0.0, initializer_range=0.3, bos_token_id=None, eos_token_id=None)
    cfg.update(overrides)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**cfg)).eval()


def ids(seed=0, vocab=67, shape=(3, 11)):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def assert_same_logits(ours: GPT, hf, atol=1e-4):
    x = ids()
    with torch.no_grad():
        a = ours(x)[0]
        b = hf(x).logits
    assert a.shape == b.shape
    assert torch.allclose(a, b, atol=atol, rtol=0), (a - b).abs().max()


@pytest.fixture(scope="module")
def hf_model():
    return tiny_hf()


def test_safetensors_folder(tmp_path, hf_model):
    hf_model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    model = GPT.from_pretrained(tmp_path)
    assert not model.training and model.config.block_size == 24 and model.config.vocab_size == 67
    assert_same_logits(model, hf_model)


def test_pytorch_bin_folder_with_old_style_buffers(tmp_path, hf_model):
    hf_model.config.save_pretrained(tmp_path)
    state = dict(hf_model.state_dict())
    for i in range(2):  # older transformers saved the causal-mask buffers too
        state[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 24, 24))
        state[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(state, tmp_path / "pytorch_model.bin")
    assert_same_logits(GPT.from_pretrained(tmp_path), hf_model)


def test_keys_without_transformer_prefix(tmp_path, hf_model):
    hf_model.config.save_pretrained(tmp_path)
    state = {k.removeprefix("transformer."): v for k, v in hf_model.state_dict().items() if k != "lm_head.weight"}
    torch.save(state, tmp_path / "pytorch_model.bin")
    assert_same_logits(GPT.from_pretrained(tmp_path), hf_model)


def test_conv1d_weights_are_transposed(tmp_path, hf_model):
    hf_model.save_pretrained(tmp_path)
    model = GPT.from_pretrained(tmp_path)
    hf_w = hf_model.transformer.h[0].mlp.c_fc.weight  # Conv1D: (in, out)
    assert hf_w.shape == (32, 128) and torch.equal(model.transformer.h[0].mlp.c_fc.weight, hf_w.t())


def test_export_to_transformers_round_trip():
    torch.manual_seed(3)
    ours = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=24)).eval()
    hf = to_hf_gpt2(ours)
    x = ids(vocab=50, shape=(2, 9))
    with torch.no_grad():
        assert torch.allclose(ours(x)[0], hf(x).logits, atol=1e-5, rtol=0)


def test_device_argument(tmp_path, hf_model):
    hf_model.save_pretrained(tmp_path)
    model = GPT.from_pretrained(tmp_path, device="cpu")
    assert model.transformer.wte.weight.device.type == "cpu"


# ----------------------------------------------------------------------------------------------------
# nanoGPT ckpt.pt

def test_nanogpt_round_trip(tmp_path):
    torch.manual_seed(4)
    ours = GPT(GPTConfig(vocab_size=45, block_size=12, n_layer=2, n_head=2, n_embd=16, bias=False)).eval()
    save_nanogpt(ours, tmp_path / "ckpt.pt", iter_num=7)
    back = GPT.from_pretrained(tmp_path / "ckpt.pt")
    assert back.config == ours.config
    x = ids(vocab=45, shape=(2, 12))
    with torch.no_grad():
        assert torch.equal(back(x)[0], ours(x)[0])


def test_nanogpt_file_as_nanogpt_writes_it(tmp_path):
    """nanoGPT's train.py: compiled-model keys, mask buffers on the slow path, optimizer and config dicts."""
    torch.manual_seed(5)
    ours = GPT(GPTConfig(vocab_size=45, block_size=12, n_layer=2, n_head=2, n_embd=16)).eval()
    state = {"_orig_mod." + k: v for k, v in ours.state_dict().items()}
    for i in range(2):
        state[f"_orig_mod.transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 12, 12))
    opt = torch.optim.AdamW(ours.parameters())
    ckpt = {"model": state, "optimizer": opt.state_dict(), "iter_num": 100, "best_val_loss": torch.tensor(1.5),
            "config": {"dataset": "shakespeare_char", "compile": True},
            "model_args": dict(n_layer=2, n_head=2, n_embd=16, block_size=12, bias=True, vocab_size=45,
                               dropout=0.0)}
    torch.save(ckpt, tmp_path / "ckpt.pt")
    back = GPT.from_pretrained(tmp_path / "ckpt.pt")
    x = ids(vocab=45, shape=(2, 12))
    with torch.no_grad():
        assert torch.equal(back(x)[0], ours(x)[0])


# ----------------------------------------------------------------------------------------------------
# train.py's checkpoints

def _logits(model, vocab, seed=0):
    with torch.no_grad():
        return model.eval()(ids(seed, vocab=vocab, shape=(2, 8)))[0]


def test_train_py_checkpoint_file_loads_as_load_model_reads_it(dataset, tmp_path):
    import train as train_mod
    from model import TrainConfig
    from model.training.checkpoint import load_model
    vocab = json.loads((dataset / "meta.json").read_text())["vocab_size"]
    model_cfg = GPTConfig(vocab_size=vocab, block_size=8, n_layer=1, n_head=2, n_embd=16)
    out = tmp_path / "run"
    train_mod.train(model_cfg, TrainConfig(dataset=str(dataset), out_dir=str(out), batch_size=2, max_iters=2,
                                           eval_interval=2, eval_iters=1, warmup_iters=1, device="cpu",
                                           peak_flops=1e12, progress=False))
    reference, _ = load_model(out / "last.pt")
    for source in (out / "last.pt", str(out / "last.pt")):
        model = GPT.from_pretrained(source)
        assert model.config == model_cfg and not model.training
        assert torch.equal(_logits(model, vocab), _logits(reference, vocab))


def test_train_py_out_dir_prefers_best_then_last(tmp_path):
    from dataclasses import asdict
    from model.training.checkpoint import FORMAT, save_checkpoint
    cfg = GPTConfig(vocab_size=20, block_size=8, n_layer=1, n_head=2, n_embd=16)
    models = {}
    for seed, name in ((1, "best.pt"), (2, "last.pt")):
        torch.manual_seed(seed)
        models[name] = GPT(cfg)
        save_checkpoint({"format": FORMAT, "step": seed, "model": models[name].state_dict(),
                         "model_config": asdict(cfg)}, tmp_path / name)
    assert not torch.equal(_logits(models["best.pt"], 20), _logits(models["last.pt"], 20))
    assert torch.equal(_logits(GPT.from_pretrained(tmp_path), 20), _logits(models["best.pt"], 20))
    (tmp_path / "best.pt").unlink()
    assert torch.equal(_logits(GPT.from_pretrained(tmp_path), 20), _logits(models["last.pt"], 20))
    (tmp_path / "last.pt").unlink()
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path}: .*no best.pt or last.pt"):
        GPT.from_pretrained(tmp_path)


def test_train_py_checkpoint_errors_name_the_file(tmp_path):
    torch.save({"format": "flopgpt-1", "model": {}, "model_config": {"n_layer": 0}}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"bad.pt: n_layer must be a positive integer, got 0"):
        GPT.from_pretrained(tmp_path / "bad.pt")
    torch.save({"model": {}, "model_config": [1, 2]}, tmp_path / "odd.pt")
    with pytest.raises(ValueError, match=r"odd.pt: model_config is not a dict \(list\)"):
        GPT.from_pretrained(tmp_path / "odd.pt")
    cfg = GPTConfig(vocab_size=20, block_size=8, n_layer=1, n_head=2, n_embd=16)
    from dataclasses import asdict
    torch.save({"model": GPT(cfg).state_dict(), "model_config": {**asdict(cfg), "n_embd": 32}},
               tmp_path / "shape.pt")
    shape_error = r"shape.pt: transformer.h.0.attn.c_attn.bias has shape \(48,\), the config implies \(96,\)"
    with pytest.raises(ValueError, match=shape_error):
        GPT.from_pretrained(tmp_path / "shape.pt")


# ----------------------------------------------------------------------------------------------------
# errors name the file and the value

def test_missing_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_pretrained(GPT, tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_pretrained(GPT, tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(hf_config(GPTConfig(vocab_size=10, block_size=8, n_layer=1,
                                                                         n_head=1, n_embd=8))))
    with pytest.raises(FileNotFoundError, match="model.safetensors or pytorch_model.bin"):
        load_pretrained(GPT, tmp_path)


@pytest.mark.parametrize("key,value,match", [
    ("activation_function", "relu", "activation_function='relu'"),
    ("layer_norm_epsilon", 1e-6, "layer_norm_epsilon=1e-06"),
    ("scale_attn_by_inverse_layer_idx", True, "scale_attn_by_inverse_layer_idx"),
    ("n_inner", 100, "n_inner=100"),
    ("model_type", "llama", "model_type 'llama'"),
    ("tie_word_embeddings", False, "tie_word_embeddings"),
])
def test_unsupported_config(tmp_path, hf_model, key, value, match):
    hf_model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg[key] = value
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=match) as err:
        GPT.from_pretrained(tmp_path)
    assert "config.json" in str(err.value)


def test_bad_json_and_missing_key(tmp_path, hf_model):
    hf_model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    del cfg["n_embd"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="missing key 'n_embd'"):
        GPT.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        GPT.from_pretrained(tmp_path)


def test_shape_mismatch_names_file_and_tensor(tmp_path, hf_model):
    hf_model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["n_positions"] = 30
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"model.safetensors: transformer.wpe.weight has shape \(24, 32\)"):
        GPT.from_pretrained(tmp_path)


def test_missing_and_untied_tensors(tmp_path, hf_model):
    hf_model.config.save_pretrained(tmp_path)
    state = dict(hf_model.state_dict())
    del state["transformer.ln_f.bias"]
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pytorch_model.bin: .*missing \['transformer.ln_f.bias'\]"):
        GPT.from_pretrained(tmp_path)
    state = dict(hf_model.state_dict())
    state["lm_head.weight"] = state["lm_head.weight"] + 1
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="untied"):
        GPT.from_pretrained(tmp_path)


def test_unknown_and_corrupt_files(tmp_path):
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"other.pt: unknown checkpoint format"):
        GPT.from_pretrained(tmp_path / "other.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="junk.pt"):
        GPT.from_pretrained(tmp_path / "junk.pt")
    torch.save({"model_args": {"n_layer": 1, "flash": True}, "model": {}}, tmp_path / "odd.pt")
    with pytest.raises(ValueError, match=r"odd.pt: model_args has keys GPTConfig does not know: \['flash'\]"):
        GPT.from_pretrained(tmp_path / "odd.pt")


class Evil:
    """Any pickled class: weights_only loading must refuse it."""


def test_pickled_objects_are_refused(tmp_path):
    torch.save({"model_args": {}, "model": {}, "extra": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match=r"evil.pt: refusing to load: the file holds pickled objects, .*Evil"):
        GPT.from_pretrained(tmp_path / "evil.pt")


def test_export_rejects_what_gpt2_cannot_hold():
    with pytest.raises(ValueError, match="sinusoidal"):
        hf_config(GPTConfig(vocab_size=10, block_size=8, n_layer=1, n_head=1, n_embd=8, pos_encoding="sinusoidal"))
