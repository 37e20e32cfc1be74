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


# ----------------------------------------------------------------------------------------------------
# unfused: the analytic formulas equal the byte counter to the integer, per component

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from model.flops.byte_counter import ByteCounterMode, count_forward, count_train_step, op_bytes  # noqa: E402
from model.flops.profile import _OpTimer  # noqa: E402
from model.training.optim import adamw  # noqa: E402


@st.composite
def shapes(draw):
    n_head = draw(st.integers(1, 3))
    cfg = GPTConfig(vocab_size=draw(st.integers(2, 40)), block_size=draw(st.integers(2, 12)),
                    n_layer=draw(st.integers(1, 2)), n_head=n_head, n_embd=n_head * draw(st.integers(1, 4)),
                    bias=draw(st.booleans()), pos_encoding=draw(st.sampled_from(["learned", "sinusoidal"])),
                    activation=draw(st.sampled_from(["gelu_tanh", "gelu"])),
                    attention=draw(st.sampled_from(["sdpa", "manual"])))
    B = draw(st.integers(1, 3))
    T = draw(st.integers(1, cfg.block_size))
    dtype = draw(st.sampled_from(["float32", "bfloat16"]))
    return cfg, B, T, dtype


def model_in(cfg, dtype):
    torch.manual_seed(0)
    return GPT(cfg).to(getattr(torch, dtype))


def counted(counter) -> dict:
    return {k: v for k, v in counter.by_component.items() if v}


@settings(max_examples=25, deadline=None)
@given(shapes())
def test_forward_counter_equals_formulas(shape):
    cfg, B, T, dtype = shape
    c = count_forward(model_in(cfg, dtype), torch.zeros(B, T, dtype=torch.long), tracker=_OpTimer(torch.device("cpu")))
    assert counted(c) == nbytes.unfused_forward(cfg, B, T, dtype)
    assert c.total == sum(nbytes.unfused_forward(cfg, B, T, dtype).values())


@settings(max_examples=25, deadline=None)
@given(shapes())
def test_decode_counter_equals_formulas(shape):
    cfg, B, T, dtype = shape
    context = T  # T - 1 cached positions, one new token
    c = count_forward(model_in(cfg, dtype), torch.zeros(B, 1, dtype=torch.long), past=context - 1, last_only=True,
                      tracker=_OpTimer(torch.device("cpu")))
    assert counted(c) == nbytes.unfused_decode(cfg, B, context, dtype)


@settings(max_examples=20, deadline=None)
@given(shapes(), st.booleans())
def test_train_step_counter_equals_formulas(shape, clip):
    cfg, B, T, dtype = shape
    model = model_in(cfg, dtype)
    opt = adamw(model, 1e-3, 0.1, (0.9, 0.95), "cpu")
    c = count_train_step(model, torch.zeros(B, T, dtype=torch.long), opt, 1.0 if clip else 0.0,
                         tracker=_OpTimer(torch.device("cpu")))
    assert counted(c) == nbytes.unfused_train_step(cfg, B, T, dtype, clip=clip)
    # without the tracker's hooks the counter sees the same ops
    model2 = model_in(cfg, dtype)
    opt2 = adamw(model2, 1e-3, 0.1, (0.9, 0.95), "cpu")
    assert count_train_step(model2, torch.zeros(B, T, dtype=torch.long), opt2, 1.0 if clip else 0.0).total == c.total


def test_unfused_by_hand():
    # 1 layer, 1 head of 2, vocab 3, B=1, T=1, no bias, sinusoidal, SDPA, fp32 (e = 4)
    cfg = GPTConfig(vocab_size=3, block_size=2, n_layer=1, n_head=1, n_embd=2, bias=False,
                    pos_encoding="sinusoidal")
    got = nbytes.unfused_forward(cfg, 1, 1, "float32")
    # wte gather: id 8 + row 8 read, row 8 written; position add: 8 + 8 read, 8 written
    assert got["other"] == 24 + 24 + 2 * 24  # + two residual adds of 24
    # 3 layer norms: x 8 + weight 8 read; y 8, mean 4, rstd 4 written
    assert got["layer_norm"] == 3 * 32
    # c_attn: x 8 + W 2·6·4 = 48 read, 24 written; SDPA: q, k, v 24 read, out 8 + lse 4 written
    assert got["qkv"] == 80 and got["attention_fused"] == 36
    # lm_head: x 8 + W 24 read, logits 12 written
    assert got["lm_head"] == 44


def test_counter_rules():
    a = torch.ones(4, 3)
    c = ByteCounterMode()
    with c:
        a.t()  # a view: 0
        b = a + 1  # 48 read, 48 written
        b.copy_(a)  # destination written, not read: 48 + 48
        torch.zeros_like(a)  # nothing read, 48 written
        torch.nn.functional.embedding(torch.tensor([0, 2]), a)  # 2 ids (16) + 2 rows (24) read, 24 written
    assert (c.read, c.written) == (48 + 48 + 16 + 24, 48 + 48 + 48 + 24)
    assert c.by_op == {"add": 96, "copy_": 96, "zeros_like": 48, "embedding": 64}


def test_unfused_train_step_rejects_dropout():
    with pytest.raises(ValueError, match="dropout"):
        nbytes.unfused_train_step(tiny(dropout=0.1), 1, 2, "float32")


@pytest.mark.parametrize("attention, dtype", [("sdpa", "float32"), ("manual", "bfloat16")])
def test_fake_tensor_count_equals_real(attention, dtype):
    from model.flops.byte_counter import count_steps
    cfg = tiny(n_head=2, n_embd=8, block_size=8, vocab_size=11, attention=attention, pos_encoding="learned")
    fake = count_steps(cfg, 2, 5, 7, dtype)
    model = model_in(cfg, dtype)
    assert fake["forward"] == counted(count_forward(model, torch.zeros(2, 5, dtype=torch.long),
                                                    tracker=_OpTimer(torch.device("cpu"))))
    assert fake["decode_step"] == counted(count_forward(model, torch.zeros(2, 1, dtype=torch.long), past=6,
                                                        last_only=True, tracker=_OpTimer(torch.device("cpu"))))
    real = count_train_step(model, torch.zeros(2, 5, dtype=torch.long), adamw(model, 1e-3, 0.1, (0.9, 0.95), "cpu"),
                            tracker=_OpTimer(torch.device("cpu")))
    assert fake["train_step"] == counted(real) == nbytes.unfused_train_step(cfg, 2, 5, dtype)
