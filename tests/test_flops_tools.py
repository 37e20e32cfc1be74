"""`flops.py --tools`: every popular counter on one small GPT, each count checked against a value worked out by
hand from that tool's own documented rules, so an upgrade that changes a tool's count fails here, naming it."""
import json

import pytest

import flops as cli
from model import GPTConfig
from model.flops import formulas
from model.flops import tools
from model.flops.tools import COMPONENTS, audit, installed, own_from_inclusive
from model.flops.tools_report import plot, render

# L=2 layers, d=16, H=2 heads (head size 8), V=11, B=2 rows of T=8 tokens: N = B·T = 16 token positions
L, D, H, V, B, T = 2, 16, 2, 11, 2, 8
N = B * T
LINEAR_MACS = L * 12 * D * D * N + D * V * N  # c_attn 3d², attn.c_proj d², c_fc 4d², mlp.c_proj 4d²; lm_head d·V
BIAS_OUTPUTS = L * 9 * D * N  # c_attn 3d + attn.c_proj d + c_fc 4d + mlp.c_proj d outputs per token, biased
LN_ELEMENTS = (2 * L + 1) * N * D  # ln_1, ln_2 per layer and ln_f
GELU_ELEMENTS = L * 4 * D * N
SCORES = L * B * H * T * T  # attention scores (full T x T square), all layers
ATTN_MACS = 2 * L * B * T * T * D  # q @ kᵀ and att @ v: B·H·T·T·(d/H) each


def cfg(attention: str) -> GPTConfig:
    return GPTConfig(n_layer=L, n_head=H, n_embd=D, block_size=T, vocab_size=V, attention=attention, bias=True)


def need(tool: str) -> None:
    if installed(tool) is None:
        pytest.skip(f"{tool} is not installed (pip install -e \".[tools]\")")


_CACHE: dict = {}


def run(tool: str, attention: str) -> dict:
    """The audit for one tool and one attention path: {(backend, mode): entry}."""
    need(tool)
    if (tool, attention) not in _CACHE:
        rep = audit(cfg(attention), B, T, tools=(tool,))
        assert rep["errors"] == [] and rep["not_installed"] == [], rep
        _CACHE[tool, attention] = {(e["backend"], e["mode"]): e for e in rep["tools"]}
    return _CACHE[tool, attention]


def test_hand_values_agree_with_the_exact_formulas():
    exact = formulas.forward(cfg("sdpa"), B, T)
    assert 2 * LINEAR_MACS + 2 * ATTN_MACS == exact.total == 218_624
    assert formulas.train_step(cfg("sdpa"), B, T).total == 3 * exact.total


@pytest.mark.parametrize("attention", ["sdpa", "manual"])
def test_fvcore(attention):
    # fvcore's handles: linear rows·in·out MACs (no bias), layer_norm 5 per element with affine, matmul
    # output·contracted MACs; sdpa, gelu, add, softmax have none (0)
    e = run("fvcore", attention)[None, "forward"]
    macs = LINEAR_MACS + 5 * LN_ELEMENTS + (ATTN_MACS if attention == "manual" else 0)
    assert (e["raw"], e["raw_unit"], e["flops"]) == (macs, "MAC", 2 * macs), "fvcore's count changed"
    assert e["components"]["attention"] == (2 * ATTN_MACS if attention == "manual" else 0)
    assert ("attention" in e["missing"]) == (attention == "sdpa") and "gelu" in e["missing"]


@pytest.mark.parametrize("attention", ["sdpa", "manual"])
def test_flopcountermode(attention):
    # flop_registry: mm/addmm/bmm 2·M·K·N FLOPs, no bias; the CPU sdpa kernel has no entry (pytorch#195460)
    entries = run("flopcountermode", attention)
    fwd = 2 * LINEAR_MACS + (2 * ATTN_MACS if attention == "manual" else 0)
    assert entries[None, "forward"]["flops"] == fwd, "FlopCounterMode's forward count changed"
    assert entries[None, "train_step"]["flops"] == 3 * fwd, "FlopCounterMode's training-step count changed"
    if attention == "sdpa":
        assert entries[None, "forward"]["missing"][0] == "attention"
        assert any("pytorch#195460" in n for n in entries[None, "forward"]["notes"])
        assert "attention" in entries[None, "train_step"]["missing"]
    else:
        assert entries[None, "forward"]["ratio"] == 1.0


@pytest.mark.parametrize("attention", ["sdpa", "manual"])
def test_ptflops_both_backends(attention):
    entries = run("ptflops", attention)
    # pytorch backend: Linear (in·out + out with bias)·rows; LayerNorm numel (its hook looks for `affine`, which
    # nn.LayerNorm lacks); nn.GELU numel by its module hook and again by the F.gelu patch; F.softmax numel;
    # `@` and sdpa are not patched (ptflops#77)
    pt = LINEAR_MACS + BIAS_OUTPUTS + LN_ELEMENTS + 2 * GELU_ELEMENTS + (SCORES if attention == "manual" else 0)
    e = entries["pytorch", "forward"]
    assert (e["raw"], e["raw_unit"]) == (pt, "MAC"), "ptflops (pytorch backend) count changed"
    assert "attention" in e["missing"] and any(n.startswith("double-counts gelu") for n in e["notes"])
    # aten backend: addmm rows·in·out + rows·out (bias), mm, bmm; the CPU sdpa kernel is not among them
    aten = LINEAR_MACS + BIAS_OUTPUTS + (ATTN_MACS if attention == "manual" else 0)
    e = entries["aten", "forward"]
    assert (e["raw"], e["flops"]) == (aten, 2 * aten), "ptflops (aten backend) count changed"
    assert e["components"]["lm_head"] == 2 * D * V * N and e["components"]["qkv"] is None
    assert ("attention" in e["missing"]) == (attention == "sdpa")


@pytest.mark.parametrize("attention", ["sdpa", "manual"])
def test_thop(attention):
    # register_hooks: Linear in_features·output elements (no bias); LayerNorm 2·numel, x2 with elementwise_affine;
    # no rule for GELU, Embedding, matmul or sdpa (pytorch-OpCounter#213): the same count on both paths
    e = run("thop", attention)[None, "forward"]
    macs = LINEAR_MACS + 4 * LN_ELEMENTS
    assert (e["raw"], e["flops"]) == (macs, 2 * macs), "thop's count changed"
    assert e["components"]["qkv"] == 2 * L * 3 * D * D * N and e["components"]["layer_norm"] == 8 * LN_ELEMENTS
    assert e["missing"][0] == "attention" and any("pytorch-OpCounter#213" in n for n in e["notes"])


@pytest.mark.parametrize("attention", ["sdpa", "manual"])
def test_calflops(attention):
    # F.linear 2·MACs (no bias), F.layer_norm 5·numel, F.gelu and F.softmax numel; `@` and sdpa not patched
    # (calflops#48); training step = forward x (1 + compute_bp_factor=2)
    entries = run("calflops", attention)
    fwd = 2 * LINEAR_MACS + 5 * LN_ELEMENTS + GELU_ELEMENTS + (SCORES if attention == "manual" else 0)
    assert entries[None, "forward"]["flops"] == fwd, "calflops' forward count changed"
    assert entries[None, "train_step"]["flops"] == 3 * fwd, "calflops' training-step factor changed"
    assert "attention" in entries[None, "forward"]["missing"]
    assert any("calflops#48" in n for n in entries[None, "forward"]["notes"])


def test_calflops_grows_linearly_with_the_sequence():
    need("calflops")
    c = GPTConfig(n_layer=L, n_head=H, n_embd=D, block_size=2 * T, vocab_size=V, bias=True)
    short, long = (audit(c, 1, t, tools=("calflops",))["tools"][0]["flops"] for t in (T, 2 * T))
    assert long == 2 * short  # attention's T² term is missing (calflops#48)
    assert formulas.forward(c, 1, 2 * T).total > 2 * formulas.forward(c, 1, T).total


@pytest.mark.parametrize("attention", ["sdpa", "manual"])
def test_deepspeed(attention):
    # F.linear 2·MACs (no bias), F.layer_norm 5·numel, F.gelu numel, sdpa and `@` 2·MACs (since PR 4724),
    # F.softmax numel; x + y and x * s (Tensor.__add__/__mul__) are not patched; training = 3 x forward
    entries = run("deepspeed", attention)
    fwd = 2 * LINEAR_MACS + 2 * ATTN_MACS + 5 * LN_ELEMENTS + GELU_ELEMENTS + (SCORES if attention == "manual" else 0)
    e = entries[None, "forward"]
    assert e["flops"] == fwd, "DeepSpeed's forward count changed"
    assert entries[None, "train_step"]["flops"] == 3 * fwd
    assert e["components"]["attention"] == 2 * ATTN_MACS + (SCORES if attention == "manual" else 0)
    assert e["missing"] == ["other"]


def test_report_is_strict_json_with_the_issue_keys(monkeypatch):
    need("thop")
    monkeypatch.setattr(tools, "installed", lambda t: None if t == "calflops" else installed(t))
    rep = audit(cfg("sdpa"), B, T, tools=("thop", "calflops"))
    assert rep["not_installed"] == ["calflops"] and rep["errors"] == []
    assert set(rep) >= {"config", "batch_size", "seq_len", "exact", "tools", "not_installed"}
    assert rep["exact"] == {"forward": 218_624, "train_step": 655_872}
    (e,) = rep["tools"]
    assert set(e) == {"tool", "version", "backend", "mode", "raw", "raw_unit", "flops", "ratio", "components",
                      "missing", "notes"}
    assert isinstance(e["flops"], int) and set(e["components"]) == set(COMPONENTS)
    json.loads(json.dumps(rep, allow_nan=False))


def test_a_tool_that_crashes_is_reported_not_fatal(monkeypatch):
    need("thop")

    def broken(model, idx, attention):
        raise RuntimeError("boom")
    monkeypatch.setitem(tools.ADAPTERS, "thop", broken)
    rep = audit(cfg("sdpa"), B, T, tools=("thop",))
    assert rep["tools"] == [] and rep["errors"][0]["tool"] == "thop" and "boom" in rep["errors"][0]["error"]


def test_bad_arguments():
    for call in (lambda: audit(cfg("sdpa"), 0, T), lambda: audit(cfg("sdpa"), B, T + 1),
                 lambda: audit(cfg("sdpa"), B, T, tools=("nvprof",)), lambda: audit("gpt2", B, T)):
        with pytest.raises(ValueError):
            call()


def test_own_shares_from_inclusive_totals():
    inclusive = {"": 10, "a": 7, "a.b": 3, "a.c": 2, "d": 1}
    assert own_from_inclusive(inclusive) == {"": 2, "a": 2, "a.b": 3, "a.c": 2, "d": 1}


def test_render_and_picture(tmp_path):
    need("thop")
    rep = audit(cfg("manual"), B, T, tools=("thop", "flopcountermode"))
    text = render(rep)
    assert "thop" in text and "pytorch-OpCounter#213" in text and "exact FLOPs" in text
    png = plot(rep, tmp_path / "tools.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_tools_json_and_errors(tmp_path, capsys):
    need("thop")
    small = [f"--n_layer={L}", f"--n_head={H}", f"--n_embd={D}", f"--block_size={T}", f"--vocab_size={V}",
             "--batch-size", str(B)]
    assert cli.main([*small, "--tools", "--json", "--out", str(tmp_path / "t.png")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["exact"]["forward"] == 218_624 and (tmp_path / "t.png").exists()
    assert {e["tool"] for e in out["tools"]} | set(out["not_installed"]) == set(tools.ADAPTERS)
    assert cli.main([*small, "--tools", "--device", "tpu"]) == 2
    assert "--device 'tpu'" in capsys.readouterr().err


@pytest.mark.gpu
def test_flopcountermode_counts_cuda_attention():
    # on CUDA sdpa runs a flash or memory-efficient kernel, both in flop_registry: the forward is exact
    e = audit(cfg("sdpa"), B, T, tools=("flopcountermode",), device="cuda")["tools"][0]
    assert e["mode"] == "forward" and e["flops"] == 2 * LINEAR_MACS + 2 * ATTN_MACS and "attention" not in e["missing"]
