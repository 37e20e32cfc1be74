"""Byte counts (model/flops/bytes.py): the minimum convention worked by hand."""
import pytest
import torch

from model import GPT, GPTConfig
from model.flops import bytes as nbytes


def tiny(**kw) -> GPTConfig:
    """1 layer, 2 heads of 2, d=4, vocab 3, block 4."""
    return GPTConfig(**{**dict(vocab_size=3, block_size=4, n_layer=1, n_head=2, n_embd=4), **kw})


def test_decode_minimum_by_hand():
    # parameters read: wte 3·4 = 12 (also the head), ln_1 8, c_attn 4·12 + 12 = 60, attn.c_proj 16 + 4 = 20,
    # ln_2 8, c_fc 4·16 + 16 = 80, mlp.c_proj 64 + 4 = 68, ln_f 8, one wpe row 4: 268 elements
    # kv: 2 (k, v) · 1 layer · 2 rows · 3 positions · 4 = 48 elements; other: 2 ids · 8 + 2·3 fp32 logits · 4
    got = nbytes.decode_minimum_bytes(tiny(), 2, 3, torch.bfloat16)
    assert got == {"weights": 536, "kv_cache": 96, "other": 40, "total": 672}
    got = nbytes.decode_minimum_bytes(tiny(), 2, 3, "float32")
    assert got == {"weights": 1072, "kv_cache": 192, "other": 40, "total": 1304}
    # sinusoidal: no wpe parameter, but the step still reads one row of the fixed table
    assert nbytes.decode_minimum_bytes(tiny(pos_encoding="sinusoidal"), 2, 3, "float32")["weights"] == 1072
    m = GPT(tiny())
    assert sum(p.numel() for p in m.parameters()) - 4 * 4 + 4 == 268


def test_decode_minimum_gpt2_124m():
    # 124,439,808 parameters - 1024·768 wpe + one 768 row = 123,654,144 fp32; kv 2·12·1024·768·4; 8 + 50257·4
    got = nbytes.decode_minimum_bytes(GPTConfig(), 1, 1024, torch.float32)
    assert got == {"weights": 494_616_576, "kv_cache": 75_497_472, "other": 201_036,
                   "total": 494_616_576 + 75_497_472 + 201_036}


@pytest.mark.parametrize("args, match", [
    ((0, 3, "float32"), "batch_size"), ((1, 0, "float32"), "context"), ((1, 5, "float32"), "context"),
    ((1, 3, "float64x"), "dtype"), ((1, 3, torch.int64), "dtype"),
])
def test_decode_minimum_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        nbytes.decode_minimum_bytes(tiny(), *args)
