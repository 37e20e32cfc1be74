"""flops.py --paper: each paper's published values (typed here from the papers) beside ours and exact."""
import json

import pytest

import flops as cli
from model.flops import papers


def rows(name):
    return {r["name"]: r for r in papers.paper_table(name)["rows"]}


def test_gpt3_table_d1_total_train_compute():
    published = [2.25e20, 6.41e20, 1.37e21, 2.38e21, 4.77e21, 1.20e22, 2.31e22, 3.14e23]  # Table D.1, flops
    got = papers.paper_table("gpt3")["rows"]
    assert [r["published"] for r in got] == published
    for r in got:
        # Table D.1 is 6·N·D with N to 3-4 significant figures: ours agrees to its rounding (XL: 1,320M vs our
        # 1,315.7M parameters)
        assert r["ours"] == pytest.approx(r["published"], rel=5e-3)
        assert r["exact"] > r["ours"]  # exact adds the attention that Appendix D leaves out
    assert f"{got[-1]['ours']:.2e}" == "3.14e+23"


def test_chinchilla_table_a4_needs_the_table_form():
    got = papers.paper_table("chinchilla")["rows"]
    assert [r["published"] for r in got] == [1.03, 1.10, 1.08, 1.04, 1.03, 0.99]  # Table A4, FLOPs / 6ND
    assert [round(r["ours"], 2) for r in got] == [1.03, 1.10, 1.08, 1.04, 1.03, 0.99]
    text = [float(r["convention"].split("gives ")[1].split(")")[0]) for r in got]
    assert text == [1.580, 1.315, 1.231, 1.144, 1.115, 1.028]  # the text's formula does not reproduce it


def test_chinchilla_params_count_by_hand():
    # 73M model: L=10, d=640, ffw=2560, V=32000; per layer 5d² + 2·d·ffw + 11d + ffw (nanoGPT: 73,825,280)
    per_layer = 5 * 640 ** 2 + 2 * 640 * 2560 + 11 * 640 + 2560
    assert papers.chinchilla_params(10, 640, 2560, 32000) == 10 * per_layer + 2 * 640 + 640 * 32000 == 73_825_280


def test_kaplan_table1_rows_for_gpt2():
    got = rows("kaplan")
    L, d, T, V = 12, 768, 1024, 50257
    assert got["Attention: QKV  2·L·d·3·d_attn"]["published"] == 2 * L * d * 3 * d == 42_467_328
    mask = got["Attention: mask  2·L·n_ctx·d_attn"]
    assert mask["published"] == 2 * L * T * d and mask["ours"] == 2 * L * d * (T + 1) and mask["exact"] == 4 * L * T * d
    assert got["De-embed  2·d·n_vocab"]["published"] == got["De-embed  2·d·n_vocab"]["exact"] == 2 * d * V
    c = got["C_forward = 2N + 2·L·n_ctx·d_attn"]
    assert c["published"] == 2 * 85_056_000 + 2 * L * T * d
    assert c["exact"] == 291_648_307_200 // T  # every matmul of the forward, per token (T divides it)


def test_palm_appendix_b_mfu():
    got = rows("palm")
    expected = {"PaLM 540B MFU without attention": 0.457, "PaLM 540B MFU with attention": 0.462,
                "MT-NLG 530B MFU without attention": 0.297, "MT-NLG 530B MFU with attention": 0.302}
    for name, value in expected.items():
        assert got[name]["published"] == value
        assert 0 <= got[name]["ours"] - value < 1e-3  # the paper rounds down (MT-NLG 29.77% printed 29.7%)
    by_hand = 238.3e3 * (6 * 540.35e9 + 12 * 118 * 48 * 256 * 2048) / (6144 * 275e12)
    assert got["PaLM 540B MFU with attention"]["ours"] == pytest.approx(by_hand)


def test_megatron_table1_params_and_eq3():
    got = papers.paper_table("megatron")["rows"]
    params = [r for r in got if "parameters" in r["name"]]
    assert [r["published"] / 1e9 for r in params] == [1.7, 3.6, 7.5, 18.4, 39.1, 76.1, 145.6, 310.1, 529.6, 1008.0]
    for r in params:
        assert round(r["ours"] / 1e9, 1) == round(r["published"] / 1e9, 1)  # eq. 2 reproduces Table 1
        assert r["exact"] - r["ours"] == 2 * int(r["name"].split("h=")[1].rstrip(")"))  # final LayerNorm
    eq3 = [r for r in got if r["name"].startswith("eq. 3")]
    B, s, l, h, V = 2304, 2048, 80, 12288, 51200
    assert eq3[0]["published"] == 96 * B * s * l * h * h + 16 * B * s * s * l * h + 6 * B * s * h * V
    assert all(r["ours"] == r["published"] for r in eq3)  # our count + the recomputed forward = eq. 3
    days = {r["published"]: r["ours"] for r in got if r["name"].startswith("eq. 4")}
    assert set(days) == {34, 84} and all(round(v) == k for k, v in days.items())


def test_nanogpt_transformer_sizing():
    got = rows("nanogpt")
    assert got["forward FLOPs per sequence"]["published"] == got["forward FLOPs per sequence"]["ours"] \
        == got["forward FLOPs per sequence"]["exact"] == 291_648_307_200
    assert got["training FLOPs per sequence"]["exact"] == 874_944_921_600 == got["training FLOPs per sequence"]["published"]
    assert got["parameters"]["exact"] == 124_337_664
    assert got["PaLM formula per sequence"]["ours"] == got["PaLM formula per sequence"]["published"] == 879_894_724_608
    assert round(got["MFU of 100 sequences in 0.755 s on an A100"]["ours"], 4) == 0.3714


@pytest.mark.parametrize("name", list(papers.PAPERS))
def test_cli_json_schema_is_strict(name, capsys):
    assert cli.main(["--paper", name, "--json"]) == 0
    out = json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))
    assert out["paper"] == name and out["source"]
    for r in out["rows"]:
        assert {"name", "published", "ours", "exact", "convention"} <= set(r) and r["convention"]


def test_cli_text_and_unknown_paper(capsys):
    assert cli.main(["--paper", "gpt3"]) == 0
    assert "Table D.1" in capsys.readouterr().out
    assert cli.main(["--paper", "bert"]) == 2
    assert "known: gpt3" in capsys.readouterr().err
