"""Resuming a run from out_dir/last.pt: which checkpoint a run may open (or must refuse to overwrite), the state
a checkpoint holds (checkpoint_state) and its restore, and what a resume with a changed config does to the run.
`run` below is a Run (model/training/run.py): the state the steps of one run share."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ..config import TrainConfig, to_dict
from .checkpoint import FORMAT, FORMATS, load_checkpoint, load_weights, rng_state, set_rng_state
from .optim import lr_at
from .outputs import ARTEFACTS, check_artefacts
from .signals import TrainingStopped

QUIET_KEYS = ("resume", "overwrite", "progress")  # differ on most resumes and change nothing in the run
SCHEDULE_KEYS = ("lr", "min_lr", "warmup_iters", "lr_decay_iters", "lr_schedule", "max_iters")


def open_resume_checkpoint(cfg: TrainConfig, model_config: dict, meta: dict) -> dict | None:
    """With cfg.resume: out_dir/last.pt, checked against this run's model config (to_dict of a GPTConfig) and
    dataset meta. Without it: None, or ValueError when out_dir already holds a checkpoint that --overwrite
    does not allow to replace."""
    out_dir = Path(cfg.out_dir)
    path = out_dir / "last.pt"
    for output in (out_dir / name for name in ARTEFACTS):
        if output.is_dir():
            raise ValueError(f"{output} is a directory; train.py writes a file there")
    if not cfg.resume:
        check_artefacts(out_dir, cfg.resume, cfg.overwrite)  # any of last.pt, best.pt, metrics.jsonl
        return None
    ckpt = load_checkpoint(path)
    if ckpt.get("format") not in FORMATS:
        raise ValueError(f"{path}: not a flopgpt checkpoint")
    if ckpt["model_config"] != model_config:
        diff = {k: (v, model_config.get(k)) for k, v in ckpt["model_config"].items() if model_config.get(k) != v}
        raise ValueError(f"{path}: checkpoint is from a different model config (checkpoint vs now: {diff})")
    if ckpt.get("meta") != meta:
        raise ValueError(f"{path}: checkpoint was trained on a different dataset than {cfg.dataset}")
    return ckpt


def checkpoint_state(run, evaluated: bool = True) -> dict:
    """Everything a bit-exact resume needs, plus what sample.py and load_model read. evaluated: False when
    the evaluation due at this step has not run (a signal came first)."""
    return {"format": FORMAT, "step": run.step, "evaluated": evaluated, "best_val_loss": run.best_val,
            "model": run.raw_model.state_dict(), "model_config": to_dict(run.model_cfg),
            "train_config": to_dict(run.cfg), "optimizer": run.optimizer.state_dict(), "rng": rng_state(),
            "batches": run.train_batches.state_dict(), "meta": run.meta, "dataset": str(run.cfg.dataset)}


def restore(run, ckpt: dict) -> None:
    """Weights, optimizer, batch sampler, RNG, step and best val loss from checkpoint_state's dict: bit-exact."""
    load_weights(run.raw_model, ckpt["model"], run.last_path)
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.train_batches.load_state_dict(ckpt["batches"])
    set_rng_state(ckpt["rng"])
    run.step, run.best_val = int(ckpt["step"]), float(ckpt["best_val_loss"])
    run.saved_step = run.step
    # a run stopped before the evaluation due at its last step had finished evaluates it now
    run.resumed_at = run.step if ckpt.get("evaluated", True) else -1
    if run.step > run.cfg.max_iters:
        raise ValueError(f"{run.last_path} is at step {run.step}, beyond max_iters={run.cfg.max_iters}")


def check_unfinished(ckpt: dict, cfg: TrainConfig) -> None:
    """A resume of a run that already reached max_iters (and evaluated it) has nothing to do: TrainingStopped
    (exit code 0) saying so and how to extend it, instead of a run of 0 steps."""
    step = int(ckpt["step"])
    if step == cfg.max_iters and ckpt.get("evaluated", True):
        raise TrainingStopped(f"{Path(cfg.out_dir) / 'last.pt'} already finished at step {step} "
                              f"(max_iters={cfg.max_iters}); nothing to train. To train it longer, resume with a "
                              f"larger max_iters: --resume --max_iters={2 * step}", 0)


def resume_changes(old: dict, cfg: TrainConfig, step: int) -> tuple[TrainConfig, list[str]]:
    """(config to run, lines to print) for a resume whose TrainConfig differs from the checkpoint's `old`:
    every changed key, old -> new, and what it does to the schedule. A new max_iters keeps the checkpoint's
    decay horizon, so the steps it planned keep their learning rates, unless lr_decay_iters is given too:
    that is how to ask for the decay to be planned over the new length."""
    now = to_dict(cfg)
    changed = {k: (old[k], v) for k, v in now.items() if k in old and old[k] != v and k not in QUIET_KEYS}
    if not changed:
        return cfg, []
    lines = ["resume: changed from the checkpoint's config: " +
             ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items())]
    if "max_iters" in changed and "lr_decay_iters" not in changed and old.get("lr_decay_iters") == 0:
        cfg = replace(cfg, lr_decay_iters=old["max_iters"])
        after = (f"steps {old['max_iters']}-{cfg.max_iters} train at min_lr={cfg.min_lr:g}"
                 if cfg.max_iters > old["max_iters"] else f"the run now ends at step {cfg.max_iters}, before it")
        lines.append(f"resume: the learning-rate decay still ends at step {old['max_iters']} ({after}); pass "
                     f"--lr_decay_iters={cfg.max_iters} to decay over the new length instead")
    if any(k in changed for k in SCHEDULE_KEYS if k != "max_iters"):  # max_iters alone: horizon kept above
        planned = replace(cfg, **{k: old[k] for k in SCHEDULE_KEYS if k in old})
        lines.append(f"resume: learning rate at step {step}: {lr_at(step, planned):.4g} as the checkpoint planned, "
                     f"{lr_at(step, cfg):.4g} now; steps {step} on follow the new schedule")
    if "batch_size" in changed or "grad_accum" in changed:
        lines.append(f"resume: {old['batch_size'] * old['grad_accum']} -> {cfg.batch_size * cfg.grad_accum} "
                     f"sequences per step from step {step} on; no longer the same batches as an uninterrupted run")
    if "seed" in changed:
        lines.append("resume: the training batches continue from the checkpoint's sampler; the evaluation "
                     "batches change (they are drawn from seed+1)")
    return cfg, lines
