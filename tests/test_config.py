"""Config parsing: TOML files, typed --key=value overrides, and errors that name the offending value."""
import pytest

from model.config import GPTConfig, TrainConfig, build, convert, load, parse_overrides


def test_defaults_are_gpt2_124m():
    c = GPTConfig()
    assert (c.vocab_size, c.block_size, c.n_layer, c.n_head, c.n_embd) == (50257, 1024, 12, 12, 768)
    assert c.head_dim == 64


def test_overrides_are_typed_by_field():
    m, t = build((GPTConfig, TrainConfig), parse_overrides(
        ["--n_layer=3", "--lr=3e-4", "--compile=true", "--dataset=x", "--dropout=0", "--resume"]))
    assert m.n_layer == 3 and isinstance(m.n_layer, int)
    assert t.lr == 3e-4 and isinstance(t.lr, float)
    assert t.compile is True and t.resume is True and t.dataset == "x"
    assert m.dropout == 0.0 and isinstance(m.dropout, float)
    assert type(t.dataset) is str  # not the parser's Text subclass: checkpoints load with weights_only


def test_dashes_and_underscores_in_numbers():
    (t,) = build((TrainConfig,), parse_overrides(["--max-iters=1_000"]))
    assert t.max_iters == 1000


def test_toml_file_and_override_precedence(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('n_layer = 2\nn_head = 2\nn_embd = 64\nlr = 0.01\npos_encoding = "sinusoidal"\n')
    m, t = load(p, ["--lr=0.5"])
    assert (m.n_layer, m.n_embd, m.pos_encoding) == (2, 64, "sinusoidal")
    assert t.lr == 0.5


def test_unknown_key_suggests_the_nearest_and_lists_valid_keys(tmp_path):
    with pytest.raises(ValueError, match=r"unknown config key 'n_layers'; did you mean 'n_layer'\? valid keys: "):
        load(None, ["--n_layers=3"])
    with pytest.raises(ValueError, match=r"'max_iter'; did you mean 'max_iters'\?"):
        load(None, ["--max_iter=3"])
    with pytest.raises(ValueError, match=r"unknown config key 'zzz'; valid keys: "):  # nothing near: no guess
        load(None, ["--zzz=3"])
    p = tmp_path / "c.toml"
    p.write_text("learning_rate = 1.0\n")
    with pytest.raises(ValueError, match="learning_rate"):
        load(p)


@pytest.mark.parametrize("arg, match", [
    ("--n_layer=three", r"--n_layer expects int, got 'three'"),
    ("--lr=fast", r"--lr expects float, got 'fast'"),
    ("--compile=maybe", r"--compile expects bool, got 'maybe'"),
    ("--lr", r"--lr needs a value"),
    ("n_layer=3", r"expected --key=value"),
])
def test_bad_values(arg, match):
    with pytest.raises(ValueError, match=match):
        load(None, [arg])


def test_wrong_toml_type_is_an_error(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('n_layer = "4"\n')
    with pytest.raises(ValueError, match="n_layer expects int"):
        load(p)


def test_toml_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.toml"):
        load(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("n_layer = = 3\n")
    with pytest.raises(ValueError, match="invalid TOML"):
        load(bad)
    tab = tmp_path / "tab.toml"
    tab.write_text("[model]\nn_layer = 3\n")
    with pytest.raises(ValueError, match="tables are not used"):
        load(tab)


@pytest.mark.parametrize("kwargs, match", [
    ({"n_embd": 100, "n_head": 3}, r"n_embd=100 is not divisible by n_head=3"),
    ({"n_layer": 0}, r"n_layer must be a positive integer, got 0"),
    ({"vocab_size": -5}, r"vocab_size must be a positive integer, got -5"),
    ({"block_size": 2.5}, r"block_size must be a positive integer, got 2.5"),
    ({"pos_encoding": "rope"}, r"pos_encoding must be one of .* got 'rope'"),
    ({"attention": "flash"}, r"attention must be one of .* got 'flash'"),
    ({"dropout": 1.0}, r"dropout must be in \[0, 1\), got 1.0"),
])
def test_invalid_model_configs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GPTConfig(**kwargs)


@pytest.mark.parametrize("kwargs, match", [
    ({"lr": -1.0}, r"lr must be a finite non-negative number, got -1.0"),
    ({"lr": 0.0}, r"lr must be positive"),
    ({"batch_size": 0}, r"batch_size must be a positive integer, got 0"),
    ({"min_lr": 1.0, "lr": 0.1}, r"min_lr=1.0 is larger than lr=0.1"),
    ({"beta2": 1.0}, r"beta2 must be in \[0, 1\)"),
    ({"device": "tpu"}, r"device must be .* got 'tpu'"),
    ({"dtype": "float16"}, r"dtype must be one of .* got 'float16'"),
    ({"warmup_iters": -1}, r"warmup_iters must be a non-negative integer, got -1"),
])
def test_invalid_train_configs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


def test_convert_bool_spellings():
    from model.config import Text
    assert convert("x", Text("off"), bool) is False and convert("x", Text("YES"), bool) is True
    with pytest.raises(ValueError):
        convert("x", 1, bool)  # an int in TOML is not a bool


def test_configs_are_frozen():
    with pytest.raises(Exception):
        GPTConfig().n_layer = 3


# ---- property-based: any valid value round-trips through its command-line text; anything else is rejected
from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=60, deadline=None)
@given(n_layer=st.integers(1, 64), lr=st.floats(1e-8, 10.0), compile_=st.booleans(),
       dataset=st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=20))
def test_overrides_round_trip(n_layer, lr, compile_, dataset):
    args = ["--min_lr=0", f"--n_layer={n_layer}", f"--lr={lr!r}", f"--compile={str(compile_).lower()}", f"--dataset={dataset}"]
    m, t = load(None, args)
    assert (m.n_layer, t.lr, t.compile, t.dataset) == (n_layer, lr, compile_, dataset)


@settings(max_examples=60, deadline=None)
@given(key=st.sampled_from(["n_layer", "batch_size", "max_iters", "eval_iters"]),
       value=st.text(min_size=1, max_size=8).filter(lambda s: not s.strip().lstrip("+-").replace("_", "").isdigit()))
def test_non_integers_are_rejected_with_the_value(key, value):
    with pytest.raises(ValueError, match=f"--{key} expects int"):
        load(None, [f"--{key}={value}"])


@settings(max_examples=40, deadline=None)
@given(n_embd=st.integers(1, 512), n_head=st.integers(1, 64))
def test_divisibility_rule(n_embd, n_head):
    if n_embd % n_head:
        with pytest.raises(ValueError, match=f"n_embd={n_embd} is not divisible by n_head={n_head}"):
            GPTConfig(n_embd=n_embd, n_head=n_head)
    else:
        assert GPTConfig(n_embd=n_embd, n_head=n_head).head_dim * n_head == n_embd


def test_read_json_errors_name_the_file(tmp_path):
    from model.config import read_json
    with pytest.raises(FileNotFoundError, match="no such meta"):
        read_json(tmp_path / "absent.json", "no such meta")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: not valid JSON"):
        read_json(bad, "")
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="bad.json: expected a JSON object, got list"):
        read_json(bad, "")
    bad.write_text('{"a": 1}')
    assert read_json(bad, "") == {"a": 1}


# ---- the one validation helper, and the key documentation built from the fields

@pytest.mark.parametrize("args, kwargs, message", [
    (("n", 0), {"low": 1}, "n must be a positive integer, got 0"),
    (("n", True), {"low": 1}, "n must be a positive integer, got True"),  # a bool is not a count
    (("n", 2.0), {"low": 1}, "n must be a positive integer, got 2.0"),
    (("n", "3"), {}, "n must be an integer, got '3'"),
    (("n", -1), {"low": 0}, "n must be a non-negative integer, got -1"),
    (("n", 2), {"low": 3}, "n must be an integer >= 3, got 2"),
    (("x", -0.5, float), {"low": 0}, "x must be a finite non-negative number, got -0.5"),
    (("x", float("nan"), float), {"low": 0}, "x must be a finite non-negative number, got nan"),
    (("x", float("inf"), float), {}, "x must be a finite number, got inf"),
    (("p", 0.0, float), {"low": 0, "high": 1, "open_low": True}, "p must be in (0, 1], got 0.0"),
    (("d", 1.0, float), {"low": 0, "high": 1, "open_high": True}, "d must be in [0, 1), got 1.0"),
    (("c", "z"), {"choices": ("a", "b")}, "c must be one of ('a', 'b'), got 'z'"),
])
def test_check_rejects_with_the_name_and_value(args, kwargs, message):
    from model.config import check
    with pytest.raises(ValueError) as e:
        check(*args, **kwargs)
    assert str(e.value) == message


def test_check_accepts_the_edges_it_includes():
    from model.config import check
    assert check("n", 1, low=1) == 1 and check("n", 0, low=0) == 0 and check("n", -7) == -7 and check("x", 3, float, low=0) == 3
    assert check("p", 1.0, float, low=0, high=1, open_low=True) == 1.0
    assert check("d", 0, float, low=0, high=1, open_high=True) == 0
    assert check("c", "b", choices=("a", "b")) == "b"
    assert check("n", 10**400, low=1) == 10**400  # compared as an int, never converted to a float


def test_every_key_has_a_one_line_description():
    from dataclasses import fields
    for cls in (GPTConfig, TrainConfig):
        for f in fields(cls):
            text = f.metadata.get("help", "")
            assert text and "\n" not in text and len(text) < 140, f.name


def test_help_lines_show_the_given_values_else_the_defaults():
    from model.config import help_lines
    lines = help_lines(GPTConfig, {"n_layer": 3, "bias": False})
    assert len(lines) == len(GPTConfig.__dataclass_fields__)
    by_key = {ln.split()[0]: ln for ln in lines}
    assert by_key["--n_layer=3"].endswith("transformer blocks")
    assert "--bias=false" in by_key and "--n_embd=768" in by_key and "--pos_encoding=learned" in by_key


# ---- helpers shared by the CLIs

def test_duration_and_human_by_hand():
    from model.cli import duration, human
    assert [duration(s) for s in (5, 119.9, 120, 7199, 7200, 172800, 2 * 365.25 * 86400)] == [
        "5.0 s", "119.9 s", "2.0 min", "120.0 min", "2.0 h", "2.0 days", "2.0 years"]
    assert human(3.14e23) == "3.140e+23 FLOPs" and human(2e12, "FLOP/s") == "2.000e+12 FLOP/s"


def test_resolve_device_names_the_flag():
    import torch
    from model.cli import resolve_device
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match=r"--device 'tpu' is not a device"):
        resolve_device("tpu", "--device")
    with pytest.raises(ValueError, match=r"device 'meta': only cpu and cuda"):
        resolve_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"device 'cuda:0' but CUDA is not available"):
            resolve_device("cuda:0")
