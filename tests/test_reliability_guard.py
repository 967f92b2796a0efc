"""The loss-spike / NaN guard on real runs: a NaN step is skipped (weights and AdamW state untouched), a loss spike
rolls back to the last checkpoint and skips its data, and too many bad steps stop the run naming them.

Faults are injected in-process: `GPT2LitModule.training_step` is wrapped so that at chosen optimizer steps the
model's loss is multiplied by NaN or by 10 (forward and backward both see it, as with a real bad batch).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import yaml

from helpers import compose_config, corpus_text
from train.checkpoint import layout as ck
from train.checkpoint import weights as ck_weights
from train.callbacks.loggers import read_metrics
from train.config import GuardConfig, register_configs
from train.trainer import GuardError, LossGuard
from train.module import GPT2LitModule
from train.job import train

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
register_configs()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("corpus")
    text = corpus_text(60_000)
    (d / "input.txt").write_text(text)
    return d / "input.txt"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def cfg_for(corpus: Path, cache: Path, run_dir: Path, *extra: str):
    overrides = [
        "data=text", f"data.path={corpus}", f"data.cache_dir={cache}", "data.vocab_size=384",
        "data.block_size=32", "data.batch_size=8", "data.val_fraction=0.1",
        "model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.n_positions=32",
        "trainer.max_steps=30", "trainer.val_check_interval=30", "trainer.limit_val_batches=1",
        "trainer.log_every_n_steps=5", "trainer.enable_progress_bar=false",
        "checkpoint.every_n_steps=5", "checkpoint.keep_last=2", "optim.warmup_steps=2",
        "guard.warmup_steps=8", "guard.spike_factor=3.0", "sample.max_new_tokens=2", "sample.prompts=[To]",
        f"run_dir={run_dir}", *extra,
    ]
    return compose_config(overrides)


def inject(monkeypatch, faults: dict[int, float], probe=None):
    """Multiply the loss by faults[step] at those optimizer steps; probe(module, step) runs before each step."""
    orig = GPT2LitModule.training_step

    def training_step(self, batch, batch_idx):
        step = self.trainer.global_step + 1  # the optimizer step this micro-batch belongs to
        if probe is not None:
            probe(self, step)
        factor = faults.get(step)
        if factor is None:
            return orig(self, batch, batch_idx)
        real_forward = self.model.forward

        def forward(*a, **k):
            out = real_forward(*a, **k)
            out.loss = out.loss * factor
            return out

        self.model.forward = forward  # an instance attribute: nn.Module.__call__ dispatches to it
        try:
            return orig(self, batch, batch_idx)
        finally:
            del self.model.forward

    monkeypatch.setattr(GPT2LitModule, "training_step", training_step)


def snapshot(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.model.state_dict().items()}


def adam_steps(module) -> list[float]:
    opt = module.trainer.optimizers[0]
    return [float(s["step"]) for s in opt.state.values() if "step" in s]


def test_guard_yaml_matches_dataclass():
    """Each guard option sets only GuardConfig's fields, each to a value other than the default, and validates."""
    fields = {f.name: f.default for f in dataclasses.fields(GuardConfig)}
    for f in (CONF / "guard").glob("*.yaml"):
        values = yaml.safe_load(f.read_text()) or {}
        assert set(values) <= set(fields), f.name
        assert all(values[k] != fields[k] for k in values), f.name
        GuardConfig(**values)  # each option validates
    with pytest.raises(ValueError, match="guard.spike_factor"):
        GuardConfig(spike_factor=0.5)


def test_nan_step_is_skipped_and_spike_rolls_back(monkeypatch, corpus, cache_dir, tmp_path):
    run_dir = tmp_path / "run"
    seen: dict[int, tuple] = {}

    def probe(module, step):
        if step in (7, 8) and step not in seen:
            seen[step] = (snapshot(module), adam_steps(module))

    rolled: list[tuple] = []
    orig_rollback = LossGuard.rollback

    def rollback(self, trainer, pl_module):
        target = orig_rollback(self, trainer, pl_module)
        saved = ck_weights.load_weights(ck.step_dir(run_dir, target) / ck.WEIGHTS_NAME)
        rolled.append((trainer.global_step, target, saved, snapshot(pl_module), adam_steps(pl_module)))
        return target

    monkeypatch.setattr(LossGuard, "rollback", rollback)
    inject(monkeypatch, {7: float("nan"), 23: 10.0}, probe)
    summary = train(cfg_for(corpus, cache_dir, run_dir))

    # the run completed every step
    assert summary["global_step"] == 30 and (run_dir / "checkpoints" / "step-30").is_dir()
    # NaN at step 7: the update was skipped - weights and AdamW's step count at step 8 equal those at step 7
    w7, s7 = seen[7]
    w8, s8 = seen[8]
    assert all(torch.equal(w7[k], w8[k]) for k in w7)
    assert s7 == s8 and s7 and s7[0] == 6.0
    # the spike at step 23 rolled the model and optimizer back to the last checkpoint (step 20)
    assert len(rolled) == 1
    at, target, saved, after, steps_after = rolled[0]
    assert at == 23 and target == 20
    assert all(torch.equal(after[k], saved[k]) for k in saved)
    assert steps_after and all(s == 19.0 for s in steps_after)  # 20 steps minus the skipped step 7
    # ... and skipped its data: samples are never replayed, the stream position is 30 steps x 8 samples
    state = torch.load(run_dir / "checkpoints" / "step-30" / ck.STATE_NAME, weights_only=True)
    assert state["LMDataModule"]["consumed_samples"] == 30 * 8
    guard_state = state["callbacks"]["LossGuard"]
    assert guard_state["skipped"] == 1 and guard_state["rollbacks"] == 1
    assert [e[:2] for e in guard_state["events"]] == [[7, "nan"], [23, "spike"]]
    # counts in metrics.csv, final weights finite
    rows = read_metrics(run_dir / "metrics.csv")
    last = rows[-1]
    assert last["step"] == 30 and last["guard/skipped"] == 1 and last["guard/rollbacks"] == 1
    assert next(r for r in rows if r["step"] == 7)["guard/skipped"] == 1
    assert next(r for r in rows if r["step"] == 23)["guard/rollbacks"] == 1
    final = ck_weights.load_weights(run_dir / "checkpoints" / "step-30" / ck.WEIGHTS_NAME)
    assert all(torch.isfinite(t).all() for t in final.values())
    assert summary["last_train_loss"] < summary["first_train_loss"]


def test_a_small_loss_that_triples_is_not_a_spike(monkeypatch, corpus, cache_dir, tmp_path):
    """A well-fitted classifier's loss sits near 0 and one batch can triple it (0.05 -> 0.25) without anything
    diverging: above spike_factor x the running average, but not guard.spike_min_delta above it, so no rollback."""
    run_dir = tmp_path / "run"
    faults = {step: 0.01 for step in range(1, 31)}  # the LM's ~5.5 nats scaled to a fine-tune's ~0.06
    faults.update({15: 0.05, 20: 0.05})  # 5x the running average, ~0.25 nats above it
    inject(monkeypatch, faults)
    summary = train(cfg_for(corpus, cache_dir, run_dir))
    assert summary["global_step"] == 30
    state = torch.load(run_dir / "checkpoints" / "step-30" / ck.STATE_NAME, weights_only=True)
    assert state["callbacks"]["LossGuard"]["events"] == []
    assert read_metrics(run_dir / "metrics.csv")[-1]["guard/rollbacks"] == 0


def test_too_many_bad_steps_stop_the_run_naming_them(monkeypatch, corpus, cache_dir, tmp_path):
    run_dir = tmp_path / "run"
    inject(monkeypatch, {3: float("inf"), 6: float("nan")})
    with pytest.raises(GuardError, match=r"2 bad steps.*step 3: non-finite.*step 6: non-finite.*resume=auto"):
        train(cfg_for(corpus, cache_dir, run_dir, "guard.max_events=2"))
    # the good checkpoint from before the stop survives and is the one resume=auto would take
    assert ck.latest_checkpoint(run_dir).name == "step-5"


def test_guard_off_applies_the_nan(monkeypatch, corpus, cache_dir, tmp_path):
    """The control: without the guard the same NaN step poisons the weights; the run then refuses to export or sample
    them with one clear sentence (not a traceback from the sampler)."""
    run_dir = tmp_path / "run"
    inject(monkeypatch, {3: float("nan")})
    with pytest.raises(GuardError, match=r"weights hold NaN/Inf .* at step 4: .*guard=off"):
        train(cfg_for(corpus, cache_dir, run_dir, "guard=off", "trainer.max_steps=4", "checkpoint.every_n_steps=4"))
    assert not (run_dir / "hf").exists() and not (run_dir / "samples.txt").exists()
    final = ck_weights.load_weights(run_dir / "checkpoints" / "step-4" / ck.WEIGHTS_NAME)
    assert not all(torch.isfinite(t).all() for t in final.values())


def test_accumulation_writes_one_row_per_logged_step(monkeypatch, corpus, cache_dir, tmp_path):
    """With 3 micro-batches per step, a NaN step is still skipped, and metrics.csv holds exactly the logged steps:
    no step-0 row of guard counts written by the micro-batches before the first update completes."""
    run_dir = tmp_path / "run"
    inject(monkeypatch, {4: float("nan")})
    train(cfg_for(corpus, cache_dir, run_dir, "trainer.accumulate_grad_batches=3", "trainer.max_steps=10",
                  "trainer.val_check_interval=10", "checkpoint.every_n_steps=10"))
    rows = read_metrics(run_dir / "metrics.csv")
    steps = [int(r["step"]) for r in rows]
    assert steps == sorted(set(steps)) and 0 not in steps, steps
    assert {1, 4, 5, 10} <= set(steps)  # the first step, the skipped one (its event row), every 5th
    assert float(rows[-1]["guard/skipped"]) == 1.0
