"""What a resume does with the settings it is given: every one either takes effect from the first resumed step (and
the log line that lists the changes names it) or is refused in one sentence before anything is built.

The checkpoint's optimizer and scheduler state used to overwrite what the resumed run's config built, so an lr
lowered to rescue a run kept the old one while config.yaml recorded the new (pytorch/examples#816, composer#3154).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch

from helpers import compose_config, corpus_text
from train.callbacks.loggers import read_metrics
from train.checkpoint.layout import STATE_NAME
from train.config import ConfigError
from train.job import train

LR, WARMUP = 3e-3, 2


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict[str, Path]:
    """A 6-step run at lr=3e-3 with checkpoints at steps 3 and 6: what every resume below continues."""
    d = tmp_path_factory.mktemp("resume_settings")
    (d / "input.txt").write_text(corpus_text(60_000))
    w = {"d": d, "corpus": d / "input.txt", "cache": d / "cache", "run": d / "base"}
    train(compose_config(args(w, w["run"])))
    return w


def args(w, run_dir: Path, *extra: str) -> list[str]:
    return ["data=text", f"data.path={w['corpus']}", f"data.cache_dir={w['cache']}", "data.vocab_size=300",
            "data.block_size=16", "data.batch_size=8", "data.val_fraction=0.1",
            "model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.n_positions=32",
            "trainer.max_steps=6", "trainer.val_check_interval=6", "trainer.limit_val_batches=1",
            "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false", "checkpoint.every_n_steps=3",
            f"optim.lr={LR}", f"optim.warmup_steps={WARMUP}", "optim.min_lr_ratio=0.1", "sample.max_new_tokens=2",
            f"run_dir={run_dir}", *extra]


def cosine(lr: float, steps: int, s: int) -> float:
    """The lr optimizer step s runs at (WarmupDecay's formula: s - 1 steps taken before it)."""
    k = s - 1
    if k < WARMUP:
        return lr * (k + 1) / (WARMUP + 1)
    progress = min(1.0, (k - WARMUP) / (steps - WARMUP))
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def resume(w, name: str, *extra: str) -> Path:
    run_dir = w["d"] / name
    train(compose_config(args(w, run_dir, f"resume={w['run'] / 'checkpoints' / 'step-3'}", *extra)))
    return run_dir


def test_optimizer_settings_and_a_longer_horizon_take_effect_from_the_first_resumed_step(base, caplog):
    """optim.lr / betas / weight_decay and a raised trainer.max_steps given on resume: the logged lr of every resumed
    step is the NEW schedule's (new peak, new horizon), the saved optimizer holds the new betas and weight decay with
    the moments kept, config.yaml records what ran, and one line lists each change (old -> new)."""
    with caplog.at_level(logging.INFO):
        run_dir = resume(base, "changed", "optim.lr=1e-3", "optim.betas=[0.8,0.9]", "optim.weight_decay=0.05",
                         "trainer.max_steps=10")
    line = next(r.getMessage() for r in caplog.records if "settings that differ" in r.getMessage())
    for change in ("optim.lr 0.003 -> 0.001", "optim.betas [0.9, 0.95] -> [0.8, 0.9]", "optim.weight_decay 0.1 -> 0.05",
                   "trainer.max_steps 6 -> 10"):
        assert change in line, line
    assert "data.tokenizer" not in line, line  # the checkpoint's own tokenizer, resolved for the resume: no change
    logged = {int(r["step"]): r["lr"] for r in read_metrics(run_dir / "metrics.csv") if r.get("lr") is not None}
    for s in range(4, 11):
        assert logged[s] == pytest.approx(cosine(1e-3, 10, s), rel=1e-6), (s, logged[s])
    state = torch.load(run_dir / "checkpoints" / "step-9" / STATE_NAME, map_location="cpu", weights_only=False)
    groups = state["optimizer_states"][0]["param_groups"]
    assert {tuple(g["betas"]) for g in groups} == {(0.8, 0.9)}
    assert sorted(g["weight_decay"] for g in groups) == [0.0, 0.05]
    assert state["optimizer_states"][0]["state"], "the Adam moments were dropped"
    assert "lr: 0.001" in (run_dir / "config.yaml").read_text()


@pytest.mark.parametrize("change,refused", [
    ("trainer.gradient_clip_val=0.5", None),
    ("seed=7", None),
    ("trainer.precision=bf16-mixed", None),
    ("data.path=OTHER", None),  # another corpus: encoded with the checkpoint's tokenizer, not a BPE trained on it
    ("model.n_layer=2", r"was written by a model with n_layer=1, but this run builds n_layer=2; resume with the same"),
    ("optim=muon", r"holds optim=adamw state and cannot be resumed with optim=muon; resume with optim=adamw"),
    ("task=cls", r"holds a GPT2LMHeadModel \(another task head\), but this run builds a "
                 r"GPT2ForSequenceClassification; resume with the task it was trained with"),
])
def test_each_setting_a_resume_can_carry_is_applied_and_logged_or_refused(base, caplog, change, refused):
    """The table in docs/checkpoints.md ("What a resume does with your settings"): applied ones are listed by the
    change line and recorded in config.yaml; refused ones stop the run with one sentence before anything trains."""
    name = "t-" + change.replace("=", "-").replace(".", "-")
    if change == "data.path=OTHER":
        other = base["d"] / "other.txt"
        other.write_text(corpus_text(60_000)[::-1])  # other text: a BPE trained on it would differ
        change = f"data.path={other}"
    if refused:
        with pytest.raises(ConfigError, match=refused):
            resume(base, name, change, "trainer.max_steps=4")
        return
    with caplog.at_level(logging.INFO):
        run_dir = resume(base, name, change, "trainer.max_steps=4")
    key, value = change.split("=")
    line = next(r.getMessage() for r in caplog.records if "settings that differ" in r.getMessage())
    assert f"{key} " in line and f"-> {value}" in line, line
    assert f"{key.split('.')[-1]}: {value}" in (run_dir / "config.yaml").read_text()
    assert last_step(run_dir) == 4
    tokenizer = (run_dir / "tokenizer" / "tokenizer.json").read_text()
    assert tokenizer == (base["run"] / "tokenizer" / "tokenizer.json").read_text()  # the ids the weights were trained on


def last_step(run_dir: Path) -> int:
    return int((run_dir / "checkpoints" / "last").read_text().strip().split("-")[1])
