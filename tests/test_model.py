"""The model: shapes, causality, manual == sdpa, positions, parameter count, init loss, learning."""
import math

import pytest
import torch

from conftest import small
from model import GPT, GPTConfig
from model.gpt.gpt import sinusoidal_table
from model.gpt.speed import Dropout, use_cpu_kernels
from model.training.optim import adamw

TINY = dict(vocab_size=67, block_size=16, n_layer=2, n_head=4, n_embd=32)


def make(cpu_kernels=False, **kw):
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**TINY, **kw}), cpu_kernels=cpu_kernels)


@pytest.mark.parametrize("pos", ["learned", "sinusoidal"])
@pytest.mark.parametrize("attn", ["sdpa", "manual"])
def test_shapes_and_loss(pos, attn):
    m = make(pos_encoding=pos, attention=attn)
    idx = torch.randint(0, 67, (3, 16))
    logits, loss = m(idx)
    assert logits.shape == (3, 16, 67) and loss is None
    logits, loss = m(idx, idx)
    assert loss.shape == () and torch.isfinite(loss)
    last, _ = m(idx, last_only=True)
    torch.testing.assert_close(last[:, 0], logits[:, -1])


@pytest.mark.parametrize("attn", ["sdpa", "manual"])
def test_causality(attn):
    """Changing a future token never changes the logits of earlier positions."""
    m = make(attention=attn).eval()
    idx = torch.randint(0, 67, (2, 16))
    base, _ = m(idx)
    for t in (0, 5, 15):
        changed = idx.clone()
        changed[:, t] = (changed[:, t] + 1) % 67
        out, _ = m(changed)
        assert torch.equal(out[:, :t], base[:, :t])
        assert not torch.allclose(out[:, t], base[:, t])


@pytest.mark.parametrize("pos", ["learned", "sinusoidal"])
def test_manual_equals_sdpa(pos):
    a = make(attention="manual", pos_encoding=pos).eval()
    b = make(attention="sdpa", pos_encoding=pos).eval()
    b.load_state_dict(a.state_dict())
    idx = torch.randint(0, 67, (2, 16))
    torch.testing.assert_close(a(idx)[0], b(idx)[0], atol=1e-5, rtol=1e-5)
    # and through a KV cache: a 9-token prefill then one token at a time
    ca, cb = a.new_cache(2), b.new_cache(2)
    outs_a = [a(idx[:, :9], kv_cache=ca)[0]] + [a(idx[:, t:t + 1], kv_cache=ca)[0] for t in range(9, 16)]
    outs_b = [b(idx[:, :9], kv_cache=cb)[0]] + [b(idx[:, t:t + 1], kv_cache=cb)[0] for t in range(9, 16)]
    torch.testing.assert_close(torch.cat(outs_a, 1), torch.cat(outs_b, 1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat(outs_a, 1), a(idx)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "manual"])
def test_cache_chunks_equal_full_forward(attn):
    """Cached positions + a multi-token chunk need an offset causal mask; compare with the full pass."""
    m = make(attention=attn).eval()
    idx = torch.randint(0, 67, (2, 16))
    cache = m.new_cache(2)
    parts = [m(idx[:, a:b], kv_cache=cache)[0] for a, b in ((0, 5), (5, 11), (11, 12), (12, 16))]
    assert cache.pos == 16
    torch.testing.assert_close(torch.cat(parts, 1), m(idx)[0], atol=1e-5, rtol=1e-5)


def test_dropout_differs_between_train_and_eval():
    m = make(dropout=0.5)
    idx = torch.randint(0, 67, (1, 16))
    m.train()
    assert not torch.equal(m(idx)[0], m(idx)[0])
    m.eval()
    assert torch.equal(m(idx)[0], m(idx)[0])


@pytest.mark.parametrize("p", [0.1, 0.2, 0.5, 0.9])
def test_cpu_dropout_keeps_1_minus_p_and_scales_like_nn_dropout(p):
    """The bulk CPU mask has nn.Dropout's distribution: keep with probability 1-p, kept values x/(1-p)."""
    x = torch.randn(400, 500)
    torch.manual_seed(1)
    y = Dropout(p).train()(x)
    kept = y != 0
    n = x.numel()
    assert abs(kept.float().mean().item() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)  # 5 sigma
    torch.testing.assert_close(y[kept], x[kept] / (1 - p))
    # rows and columns are not correlated: every row keeps about 1-p of its elements (5 sigma)
    assert (kept.float().mean(1) - (1 - p)).abs().max() < 5 * math.sqrt(p * (1 - p) / 500)
    assert (kept.float().mean(0) - (1 - p)).abs().max() < 5 * math.sqrt(p * (1 - p) / 400)


def test_cpu_dropout_is_seeded_by_torch_and_backprops_through_the_mask():
    d = Dropout(0.3).train()
    x = torch.randn(64, 64, requires_grad=True)
    torch.manual_seed(7)
    y1 = d(x)
    torch.manual_seed(7)
    y2 = d(x)
    assert torch.equal(y1, y2)  # torch.manual_seed fixes the mask
    assert not torch.equal(d(x), y1)  # the next call draws a new one
    y1.backward(torch.ones_like(y1))
    assert torch.equal(x.grad, (y1 != 0).float() / 0.7)
    assert d.eval()(x) is x and Dropout(0.0).train()(x) is x


def test_sdpa_and_manual_train_identically_with_cpu_kernels():
    """With cpu_kernels=True, 'sdpa' takes the manual path (SDPA has no fused CPU kernel for dropout): under
    one seed both attention settings give the same loss and gradients."""
    a = make(attention="manual", dropout=0.2, cpu_kernels=True).train()
    b = make(attention="sdpa", dropout=0.2, cpu_kernels=True).train()
    idx = torch.randint(0, 67, (2, 16))
    torch.manual_seed(3)
    la = a(idx, idx)[1]
    torch.manual_seed(3)
    lb = b(idx, idx)[1]
    assert torch.equal(la, lb)
    la.backward()
    lb.backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa.grad, pb.grad), name


def test_training_with_dropout_compiles_without_graph_breaks():
    """Under torch.compile the numpy mask would split the graph at every dropout; F.dropout is used there."""
    m = make(dropout=0.2, cpu_kernels=True).train()
    idx = torch.randint(0, 67, (2, 16))
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(m)(idx, idx)
    assert explanation.graph_break_count == 0, explanation.break_reasons


@pytest.mark.parametrize("attn", ["sdpa", "manual"])
def test_cpu_kernels_compute_the_same_function(attn):
    """cpu_kernels=True changes kernels, not the model: same weights, same logits, loss and gradients (no
    dropout), and the same dropout modules' distribution (tests above); an invalid setting is refused."""
    ref, fast = make(attention=attn), make(attention=attn, cpu_kernels=True)
    assert fast.transformer.h[0].attn.flash is False and isinstance(fast.transformer.drop, Dropout)
    assert ref.transformer.h[0].attn.flash is (attn == "sdpa") and isinstance(ref.transformer.drop, torch.nn.Dropout)
    idx = torch.randint(0, 67, (3, 16))
    (la, lb) = (m(idx, idx)[1] for m in (ref, fast))
    torch.testing.assert_close(lb, la, atol=1e-6, rtol=1e-6)
    la.backward()
    lb.backward()
    for (name, pa), pb in zip(ref.named_parameters(), fast.parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, atol=1e-6, rtol=1e-5, msg=name)
    with pytest.raises(ValueError, match="cpu_kernels must be True or False, got 'cpu'"):
        GPT(GPTConfig(**TINY), cpu_kernels="cpu")


def test_use_cpu_kernels_by_hand():
    # eager CPU runs with dropout or bf16 matmul inputs; never compiled, never off the CPU
    assert use_cpu_kernels("cpu", 0.2, "highest", False) is True
    assert use_cpu_kernels("cpu", 0.0, "medium", False) is True
    assert use_cpu_kernels("cpu", 0.0, "highest", False) is False
    assert use_cpu_kernels("cpu", 0.2, "medium", True) is False
    assert use_cpu_kernels("cuda", 0.2, "medium", False) is False


def test_sinusoidal_matches_formula():
    d = 10
    table = sinusoidal_table(7, d)
    for p in range(7):
        for i in range(d // 2):
            angle = p / 10000 ** (2 * i / d)
            assert table[p, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert table[p, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)
    odd = sinusoidal_table(4, 5)  # odd width: sin columns 0,2,4 and cos columns 1,3
    assert odd[3, 4].item() == pytest.approx(math.sin(3 / 10000 ** (4 / 5)), abs=1e-6)
    m = make(pos_encoding="sinusoidal")
    assert "transformer.wpe.weight" not in m.state_dict() and "pos_table" not in m.state_dict()
    torch.testing.assert_close(m.pos_table[:3], sinusoidal_table(16, 32)[:3])


def closed_form_params(V, P, L, d, bias, learned):
    ln = 2 * d if bias else d
    per_layer = 12 * d * d + (9 * d if bias else 0) + 2 * ln  # biases: 3d + d + 4d + d
    return V * d + (P * d if learned else 0) + L * per_layer + ln


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("pos", ["learned", "sinusoidal"])
def test_parameter_count(bias, pos):
    m = make(bias=bias, pos_encoding=pos)
    V, P, L, d = 67, 16, 2, 32
    total = closed_form_params(V, P, L, d, bias, pos == "learned")
    assert m.num_params() == total
    assert m.num_params(non_embedding=True) == total - V * d - (P * d if pos == "learned" else 0)


def test_gpt2_124m_parameter_count():
    with torch.device("meta"):
        m = GPT(GPTConfig())
    assert m.num_params() == 124_439_808  # GPT-2 small, tied head counted once


def test_weights_are_tied_and_named_like_gpt2():
    m = make()
    assert m.lm_head.weight is m.transformer.wte.weight
    names = set(m.state_dict())
    for n in ("transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.ln_1.weight",
              "transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_proj.bias",
              "transformer.h.1.ln_2.bias", "transformer.h.1.mlp.c_fc.weight", "transformer.h.1.mlp.c_proj.weight",
              "transformer.ln_f.weight", "lm_head.weight"):
        assert n in names


def test_gpt2_init_scales():
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=500, block_size=64, n_layer=8, n_head=4, n_embd=256))
    assert m.transformer.h[0].attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert m.transformer.h[0].mlp.c_proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert m.transformer.h[0].attn.c_attn.bias.abs().max().item() == 0


def test_loss_at_init_is_about_ln_vocab():
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=1000, block_size=32, n_layer=2, n_head=2, n_embd=64))
    idx, targets = torch.randint(0, 1000, (2, 8, 32))  # targets unrelated to inputs (tied head favours idx)
    _, loss = m(idx, targets)
    assert loss.item() == pytest.approx(math.log(1000), abs=0.1)


def test_overfits_one_batch():
    m = make()
    idx = torch.randint(0, 67, (4, 16))
    x, y = idx[:, :-1], idx[:, 1:]
    opt = adamw(m, lr=3e-3, weight_decay=0.0, betas=(0.9, 0.99))
    for _ in range(150):
        _, loss = m(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05


def test_weight_decay_only_on_2d():
    m = make()
    opt = adamw(m, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.99))
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["fused"] is True
    decay, no_decay = opt.param_groups
    assert all(p.dim() == 2 for p in decay["params"]) and decay["weight_decay"] == 0.1
    assert all(p.dim() == 1 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == m.num_params()


def test_input_errors():
    m = make()
    with pytest.raises(ValueError, match="exceeds block_size=16"):
        m(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="must be 2-D"):
        m(torch.zeros(17, dtype=torch.long))
    with pytest.raises(ValueError, match="targets shape"):
        m(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long))
    cache = m.new_cache(1)
    m(torch.zeros(1, 16, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match="exceeds block_size"):
        m(torch.zeros(1, 1, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match="config must be a GPTConfig"):
        GPT({"n_layer": 2})


def test_activation_choice_changes_only_the_mlp_nonlinearity():
    x = torch.linspace(-4, 4, 101)
    exact = GPT(small(activation="gelu")).transformer.h[0].mlp.gelu(x)
    tanh = GPT(small()).transformer.h[0].mlp.gelu(x)
    erf = 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))  # the definition
    approx = 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    torch.testing.assert_close(exact, erf, atol=1e-6, rtol=0)
    torch.testing.assert_close(tanh, approx, atol=1e-6, rtol=0)
    assert (exact - tanh).abs().max() > 1e-4  # the two really differ
    with pytest.raises(ValueError, match="'relu'"):
        small(activation="relu")
