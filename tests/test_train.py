"""Training: end to end, exact resume, checkpoint safety, signals, NaN, CLI errors, data parallel."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import train as train_mod
from model import GPT, GPTConfig, TrainConfig
from model.training.checkpoint import load_checkpoint, load_model, save_checkpoint
from model.training.optim import lr_at


ROOT = Path(__file__).resolve().parents[1]


def cfgs(dataset, out_dir, **train_kw):
    vocab = json.loads((Path(dataset) / "meta.json").read_text())["vocab_size"]
    model_cfg = GPTConfig(vocab_size=vocab, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.1)
    base = dict(dataset=str(dataset), out_dir=str(out_dir), batch_size=4, max_iters=6, eval_interval=3,
                eval_iters=2, warmup_iters=2, lr=1e-2, min_lr=1e-3, device="cpu", peak_flops=1e12,
                progress=False)
    return model_cfg, TrainConfig(**{**base, **train_kw})


def step_losses(out_dir):
    lines = [json.loads(ln) for ln in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in lines if r.get("kind") != "eval"], lines


def test_lr_schedule_by_hand():
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_iters=4, max_iters=14)
    assert [lr_at(s, cfg) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(9, cfg) == pytest.approx(0.1 + 0.5 * (1 + math.cos(math.pi * 0.5)) * 0.9)
    assert lr_at(14, cfg) == pytest.approx(0.1) and lr_at(99, cfg) == pytest.approx(0.1)


def test_train_checkpoint_load_round_trip(dataset, tmp_path, capsys):
    from model.flops.formulas import train_step_flops
    model_cfg, cfg = cfgs(dataset, tmp_path / "run")
    summary = train_mod.train(model_cfg, cfg)
    err = capsys.readouterr().err
    exact = 6 * train_step_flops(model_cfg, 4, 16)  # planned before, achieved after: the same exact count
    assert summary["flops"] == exact
    assert f"exact training compute {exact:.4g} FLOPs" in err and f"{exact:.4g} FLOPs achieved" in err
    assert summary["step"] == 6 and summary["val_loss"] < math.log(model_cfg.vocab_size)
    out = tmp_path / "run"
    assert {p.name for p in out.iterdir()} >= {"best.pt", "last.pt", "metrics.jsonl", "loss.png"}
    losses, lines = step_losses(out)
    assert len(losses) == 6 and [r["step"] for r in lines if r.get("kind") == "eval"] == [0, 3, 6]
    rec = next(r for r in lines if r.get("kind") != "eval")
    assert {"loss", "lr", "grad_norm", "dt_ms", "tokens_per_s", "mfu", "flops"} <= set(rec)
    model, info = load_model(out / "last.pt")
    assert info["step"] == 6 and info["meta"]["tokenizer"] == "char" and info["dataset"] == str(dataset)
    ckpt = load_checkpoint(out / "last.pt")
    fresh = GPT(model_cfg)
    fresh.load_state_dict(ckpt["model"])
    fresh.eval()
    idx = torch.randint(0, model_cfg.vocab_size, (2, 16))
    assert torch.equal(model(idx)[0], fresh(idx)[0])
    assert set(ckpt) >= {"optimizer", "rng", "batches", "train_config", "model_config", "meta", "best_val_loss"}


def test_cpu_peak_is_measured_again_at_evaluations_and_the_highest_reading_kept(dataset, tmp_path, monkeypatch):
    """A busy start-up reads the CPU peak low (MFU over 100% was seen); later evaluations measure again."""
    import model.flops.peaks as peaks
    readings = iter([5e11, 2e11, 3e11, 1e11])
    monkeypatch.setattr(peaks, "hardware_cpu_peak", lambda precision="highest": peaks.Peak(1e9, "a low start-up figure"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # no calibration cached from earlier runs
    monkeypatch.setattr(peaks, "measure_cpu_peak", lambda: next(readings))
    import model.training.run as run_mod
    monkeypatch.setattr(run_mod, "RECALIBRATE_S", 0.0)
    model_cfg, cfg = cfgs(dataset, tmp_path / "run", peak_flops=0.0)
    summary = train_mod.train(model_cfg, cfg)  # evaluations at steps 0, 3, 6: three new readings
    assert summary["peak_flops"] == 5e11
    from model.flops.formulas import train_step_flops
    assert summary["mfu"] == pytest.approx(train_step_flops(model_cfg, 4, 16) / summary["median_step_s"] / 5e11)


def test_resume_is_bit_exact(dataset, tmp_path):
    """20 uninterrupted steps == 10 steps + resume + 10 steps (dropout on, so the torch RNG matters too)."""
    model_cfg, cfg = cfgs(dataset, tmp_path / "full", max_iters=20, eval_interval=10, lr_decay_iters=20)
    train_mod.train(model_cfg, cfg)
    full, _ = step_losses(tmp_path / "full")
    half = replace(cfg, out_dir=str(tmp_path / "half"), max_iters=10)
    train_mod.train(model_cfg, half)
    train_mod.train(model_cfg, replace(half, max_iters=20, resume=True))
    resumed, lines = step_losses(tmp_path / "half")
    assert len(full) == len(resumed) == 20
    assert resumed == full  # identical floats, not approximately equal
    assert [r["step"] for r in lines if r.get("kind") == "eval"] == [0, 10, 20]


def test_refuses_to_overwrite_and_checks_resume(dataset, tmp_path):
    model_cfg, cfg = cfgs(dataset, tmp_path / "run", max_iters=3)
    train_mod.train(model_cfg, cfg)
    with pytest.raises(ValueError, match="already holds a run \(last.pt, best.pt, metrics.jsonl\).*--resume.*--overwrite"):
        train_mod.train(model_cfg, cfg)
    with pytest.raises(ValueError, match="different model config"):
        train_mod.train(replace(model_cfg, n_layer=3), replace(cfg, resume=True, max_iters=4))
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        train_mod.train(model_cfg, replace(cfg, out_dir=str(tmp_path / "none"), resume=True))
    train_mod.train(model_cfg, replace(cfg, overwrite=True))


def test_resume_of_a_finished_run_says_so_and_how_to_extend_it(dataset, tmp_path):
    model_cfg, cfg = cfgs(dataset, tmp_path / "run", max_iters=3)
    train_mod.train(model_cfg, cfg)
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text()
    with pytest.raises(train_mod.TrainingStopped,
                       match=r"already finished at step 3 \(max_iters=3\).*--resume --max_iters=6") as e:
        train_mod.train(model_cfg, replace(cfg, resume=True))
    assert e.value.code == 0  # not an error: nothing was left to do
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == metrics  # nothing rewritten
    assert train_mod.train(model_cfg, replace(cfg, resume=True, max_iters=5))["step"] == 5  # the advice works


def test_threads_key_sets_the_count_for_the_run_and_the_start_up_line_names_it(dataset, tmp_path, capsys):
    before = torch.get_num_threads()
    model_cfg, cfg = cfgs(dataset, tmp_path / "run", max_iters=1, threads=1)
    train_mod.train(model_cfg, cfg)
    model_line = next(ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("model: "))
    assert "; 1 CPU thread (--threads), " in model_line
    assert torch.get_num_threads() == before  # put back for the caller


def test_a_new_thread_count_mid_run_is_said_in_one_line(dataset, tmp_path, capsys, monkeypatch):
    class Governor:  # what model/training/threads.ThreadGovernor does when the load moves at step 2
        def check(self):
            calls.append(torch.get_num_threads())
            return "2 -> 1 CPU threads (other programs use 1.0 of 2 CPUs)" if len(calls) == 2 else None
    calls = []
    monkeypatch.setattr(train_mod, "governor", Governor)
    model_cfg, cfg = cfgs(dataset, tmp_path / "run", max_iters=3)
    train_mod.train(model_cfg, cfg)
    assert len(calls) == 3  # once per step
    assert "step 2: 2 -> 1 CPU threads (other programs use 1.0 of 2 CPUs)" in capsys.readouterr().err


def test_nan_loss_stops_and_keeps_last_good_checkpoint(dataset, tmp_path, monkeypatch):
    model_cfg, cfg = cfgs(dataset, tmp_path / "run", max_iters=10, eval_interval=2)
    calls = {"n": 0}
    real_forward = GPT.forward

    def poisoned(self, idx, targets=None, **kw):
        logits, loss = real_forward(self, idx, targets, **kw)
        if self.training:
            calls["n"] += 1
            if calls["n"] >= 5:
                loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(GPT, "forward", poisoned)
    with pytest.raises(train_mod.TrainingStopped, match=r"loss is nan at step 5.*last.pt \(step 4\)") as e:
        train_mod.train(model_cfg, cfg)
    assert e.value.code == 1
    assert load_checkpoint(tmp_path / "run" / "last.pt")["step"] == 4


def run_cli(*args, timeout=120):
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


@pytest.mark.parametrize("args, match", [
    (["--n_layers=2"], "unknown config key 'n_layers'; did you mean 'n_layer'? valid keys:"),
    (["--lr=-1"], "lr must be a finite non-negative number, got -1.0"),
    (["--batch_size=0"], "batch_size must be a positive integer, got 0"),
    (["--n_embd=30", "--n_head=4"], "n_embd=30 is not divisible by n_head=4"),
    (["--max_iters=ten"], "--max_iters expects int, got 'ten'"),
    (["missing.toml"], "config file not found: missing.toml"),
    (["--block_size=100000"], "fewer than block_size+1=100001"),
    (["--dataset=/nonexistent/ds"], "/nonexistent/ds"),
    (["--matmul_precision=low"], "matmul_precision must be one of ('auto', 'highest', 'high', 'medium'), got 'low'"),
])
def test_cli_errors_are_one_line_exit_2(args, match, dataset, tmp_path):
    extra = [] if any(a.startswith("--dataset") for a in args) else [f"--dataset={dataset}"]
    if not any(a.startswith("--max_iters") for a in args):
        extra.append("--max_iters=1")
    r = run_cli(*args, *extra, f"--out_dir={tmp_path / 'o'}")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train.py: error:") and match in lines[0], r.stderr


def help_values(capsys, *argv) -> dict[str, str]:
    assert train_mod.main([*argv, "--help"]) == 0
    out = capsys.readouterr().out
    return {ln.split()[0].split("=")[0]: ln.split()[0].split("=", 1)[1] for ln in out.splitlines()
            if ln.startswith("  --")}


def test_help_lists_every_key_with_the_value_the_run_would_use(capsys):
    from model.config import read_toml
    shown = help_values(capsys)  # python train.py --help: configs/default.toml's values, else the defaults
    keys = set(GPTConfig.__dataclass_fields__) | set(TrainConfig.__dataclass_fields__)
    assert set(shown) == {f"--{k}" for k in keys}
    default = read_toml(ROOT / "configs" / "default.toml")
    assert (shown["--n_layer"], shown["--block_size"], shown["--max_iters"]) == (
        str(default["n_layer"]), str(default["block_size"]), str(default["max_iters"]))
    assert shown["--grad_accum"] == str(TrainConfig().grad_accum) and shown["--compile"] == "false"
    given = help_values(capsys, str(ROOT / "configs" / "shakespeare_char.toml"), "--n_head=3")
    assert (shown["--n_layer"], given["--n_layer"], given["--n_head"], given["--compile"]) == ("4", "6", "3", "true")


def test_help_lines_carry_the_field_descriptions(capsys):
    assert train_mod.main(["--help"]) == 0
    out = capsys.readouterr().out
    for cls in (GPTConfig, TrainConfig):
        for name, f in cls.__dataclass_fields__.items():
            line = next(ln for ln in out.splitlines() if ln.startswith(f"  --{name}="))
            assert line.endswith(f.metadata["help"])


def test_help_with_a_missing_config_is_one_line_exit_2(capsys):
    assert train_mod.main(["missing.toml", "--help"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "config file not found: missing.toml" in err


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_saves_a_final_checkpoint(sig, code, dataset, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), f"--dataset={dataset}", f"--out_dir={out}",
                             "--block_size=16", "--n_layer=2", "--n_head=2", "--n_embd=32", "--batch_size=4",
                             "--max_iters=100000", "--eval_interval=100000", "--eval_iters=1", "--peak_flops=1e12",
                             "--progress=false"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and (not metrics.exists() or metrics.read_text().count("\n") < 5):
        time.sleep(0.1)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert "Traceback" not in err and "checkpoint saved" in err
    steps, _ = step_losses(out)
    assert load_checkpoint(out / "last.pt")["step"] == len(steps) >= 4


KILL_SCRIPT = """
import sys, torch
sys.path.insert(0, {root!r})
from model.training.checkpoint import save_checkpoint
big = torch.arange(4_000_000, dtype=torch.float32)
i = 1
while True:
    save_checkpoint({{"model": {{"w": big + i}}, "step": i}}, {path!r})
    print(i, flush=True)
    i += 1
"""


@pytest.mark.slow
def test_kill_9_while_saving_leaves_a_loadable_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint({"model": {"w": torch.arange(4_000_000, dtype=torch.float32)}, "step": 0}, path)
    for delay in (0.05, 0.2, 0.35, 0.6):
        proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT.format(root=str(ROOT), path=str(path))],
                                stdout=subprocess.PIPE, text=True)
        proc.stdout.readline()  # at least one save finished: now kill mid-stream
        time.sleep(delay)
        proc.kill()
        proc.wait()
        ckpt = load_checkpoint(path)
        assert torch.equal(ckpt["model"]["w"], torch.arange(4_000_000, dtype=torch.float32) + ckpt["step"])
    # the killed writers' temp files are gone after the next save
    save_checkpoint({"model": {"w": torch.zeros(1)}, "step": 99}, path)
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_save_removes_only_temp_files_of_dead_writers(tmp_path):
    path = tmp_path / "best.pt"
    dead = tmp_path / f".best.pt.{2**22 + 7}.x1y2.tmp"  # above Linux's pid_max: no such process
    live = tmp_path / f".best.pt.{os.getppid()}.a9b8.tmp"  # the test runner's parent: alive
    other = tmp_path / f".last.pt.{2**22 + 7}.q.tmp"  # another checkpoint's: not ours to touch
    for p in (dead, live, other):
        p.write_bytes(b"partial")
    save_checkpoint({"model": {}, "step": 1}, path)
    assert not dead.exists() and live.exists() and other.exists()
    assert load_checkpoint(path)["step"] == 1


@pytest.mark.slow
def test_torchrun_two_ranks_match_one_process_with_accumulation(dataset, tmp_path):
    """2 gloo ranks x accum 1 see the same micro-batches as 1 process x accum 2: same losses to 1e-4."""
    common = [f"--dataset={dataset}", "--block_size=16", "--n_layer=2", "--n_head=2", "--n_embd=32",
              "--batch_size=4", "--grad_accum=2", "--max_iters=5", "--eval_interval=5", "--eval_iters=2",
              "--peak_flops=1e12", "--progress=false", "--dropout=0"]
    single = run_cli(*common, f"--out_dir={tmp_path / 'single'}", timeout=300)
    assert single.returncode == 0, single.stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(ROOT / "train.py"), *common, f"--out_dir={tmp_path / 'ddp'}"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert ddp.returncode == 0, ddp.stderr
    a, _ = step_losses(tmp_path / "single")
    b, lines = step_losses(tmp_path / "ddp")
    assert len(a) == len(b) == 5
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4
    assert lines[1]["tokens_per_s"] > 0 and lines[1]["flops"] == json.loads(
        (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()[1])["flops"]


def test_compiled_and_ddp_wrappers_save_clean_names():
    from model.training.checkpoint import clean_state_dict, load_weights
    m = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=1, n_embd=8))
    compiled = torch.compile(m)  # no compilation happens until it is called
    assert all(k.startswith("_orig_mod.") for k in compiled.state_dict())
    assert list(clean_state_dict(compiled.state_dict())) == list(m.state_dict())
    wrapped = {"module._orig_mod." + k: v for k, v in m.state_dict().items()}
    load_weights(GPT(m.config), wrapped)  # DDP(compile(model)) names load too
    with pytest.raises(ValueError, match="shape"):
        bad = dict(m.state_dict())
        bad["transformer.wte.weight"] = torch.zeros(12, 8)
        load_weights(GPT(m.config), bad, "x.pt")
