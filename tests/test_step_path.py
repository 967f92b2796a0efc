"""The per-step path of train/run.py after its overhead cuts: clipping that reuses the loss guard's gradient norm trains
bit-identical weights to the stock clip_grad_norm_, gradients freed after each optimizer step train the same weights
as Lightning's order, the progress bar still shows loss / lr / tokens/s, and nothing
optional (W&B, TensorBoard, datasets, DeepSpeed, lm-evaluation-harness) is imported before the first step."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from train.checkpoint import layout as ck

from train.checkpoint import weights as ck_weights
from train.config import register_configs
from train.callbacks.loggers import read_metrics
from train.job import train
from helpers import compose_config

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
VOCAB = 64
register_configs()


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> Path:
    """nanoGPT-style token files (uint16 train.bin / val.bin, no sidecar) of seeded random ids: no tokenizer to train."""
    d = tmp_path_factory.mktemp("tokens")
    rng = np.random.default_rng(0)
    rng.integers(0, VOCAB, 40_000, dtype=np.uint16).tofile(d / "train.bin")
    rng.integers(0, VOCAB, 4_000, dtype=np.uint16).tofile(d / "val.bin")
    return d


def overrides(tokens: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        "data=tokens", f"data.path={tokens}", f"data.vocab_size={VOCAB}", "data.block_size=16", "data.batch_size=4",
        "model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.n_positions=16",
        "trainer.max_steps=12", "trainer.limit_val_batches=0", "trainer.log_every_n_steps=4",
        "trainer.enable_progress_bar=false", "checkpoint.every_n_steps=1000", "optim.warmup_steps=2",
        f"run_dir={run_dir}", *extra,
    ]


def cfg_for(tokens: Path, run_dir: Path, *extra: str):
    return compose_config(overrides(tokens, run_dir, *extra))


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return ck_weights.load_weights(ck.latest_checkpoint(run_dir) / ck.WEIGHTS_NAME)


def test_clipping_with_the_guards_norm_equals_clip_grad_norm(monkeypatch, tokens, tmp_path):
    """With the guard on, clipping scales by the norm the guard computed; with it off, Lightning's stock
    clip_grad_norm_ runs. A clip value far below the gradient norm makes every step clip: the weights must still
    come out identical bit for bit, and the stock function must have run only in the run without the guard."""
    calls = {"n": 0}
    stock = torch.nn.utils.clip_grad_norm_

    def counting(*a, **k):
        calls["n"] += 1
        return stock(*a, **k)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", counting)
    train(cfg_for(tokens, tmp_path / "guard", "trainer.gradient_clip_val=0.01"))
    assert calls["n"] == 0  # the guard's norm was reused at every step
    train(cfg_for(tokens, tmp_path / "off", "trainer.gradient_clip_val=0.01", "guard=off"))
    assert calls["n"] == 12
    with_guard, without = final_weights(tmp_path / "guard"), final_weights(tmp_path / "off")
    assert with_guard.keys() == without.keys()
    for name, w in with_guard.items():
        assert torch.equal(w, without[name]), name


def test_gradients_are_freed_after_each_optimizer_step_and_the_weights_stay_the_same(monkeypatch, tokens, tmp_path):
    """The module frees the gradients right after optimizer.step() (a hand-written loop's order; Lightning's closure
    frees them between the next forward and backward, so they were alive during every forward). With gradient
    accumulation the window's later micro-batches still see the accumulated gradients, and the weights equal those
    of Lightning's own order bit for bit."""
    from train.module import GPT2LitModule

    seen: list[tuple[int, bool]] = []  # (micro-batch index, whether every .grad was None when its forward began)
    step = GPT2LitModule.training_step

    def probe(self, batch, batch_idx):
        seen.append((batch_idx, all(p.grad is None for p in self.parameters())))
        return step(self, batch, batch_idx)

    monkeypatch.setattr(GPT2LitModule, "training_step", probe)
    train(cfg_for(tokens, tmp_path / "ours", "trainer.accumulate_grad_batches=2", "trainer.max_steps=6"))
    assert [i for i, _ in seen] == list(range(12))
    assert all(freed == (i % 2 == 0) for i, freed in seen), seen  # None at each window's start, kept inside it
    monkeypatch.setattr(GPT2LitModule, "frees_grads_after_step", lambda self: False)
    seen.clear()
    train(cfg_for(tokens, tmp_path / "stock", "trainer.accumulate_grad_batches=2", "trainer.max_steps=6"))
    assert not all(freed for i, freed in seen if i % 2 == 0 and i > 0)  # Lightning's order: still alive then
    ours, stock = final_weights(tmp_path / "ours"), final_weights(tmp_path / "stock")
    assert ours.keys() == stock.keys() and all(torch.equal(w, stock[k]) for k, w in ours.items())


def test_bf16_mixed_with_fused_adamw_clips(tokens, tmp_path):
    """bf16 AMP (the default precision on a bf16 GPU) with the default fused AdamW and clipping: Lightning's
    MixedPrecision refused to clip there (RuntimeError at the first step) although bf16 has no GradScaler and nothing
    to unscale. It trains now, with and without the guard, to the same weights (here on the CPU's bf16 autocast)."""
    for name, extra in (("guard", ()), ("off", ("guard=off",))):
        train(cfg_for(tokens, tmp_path / name, "trainer.precision=bf16-mixed", "trainer.accelerator=cpu",
                      "trainer.max_steps=4", "trainer.gradient_clip_val=0.01", *extra))
    with_guard, without = final_weights(tmp_path / "guard"), final_weights(tmp_path / "off")
    assert all(torch.equal(w, without[k]) and torch.isfinite(w).all() for k, w in with_guard.items())


def test_progress_bar_shows_loss_lr_and_throughput(tokens, tmp_path, capfd):
    """The bar (Lightning's tqdm, on stdout) ends on the last metrics row's loss, with lr and tokens/s."""
    run_dir = tmp_path / "run"
    train(cfg_for(tokens, run_dir, "trainer.enable_progress_bar=true"))
    bar = capfd.readouterr().out.replace("\r", "\n").splitlines()
    last = [line for line in bar if line.startswith("train (steps of 1 batch): 100%")][-1]
    rows = [r for r in read_metrics(run_dir / "metrics.csv") if r.get("train/loss") is not None]
    shown = float(re.search(r"loss=([\d.]+)", last).group(1))  # 3 significant digits
    assert shown == pytest.approx(rows[-1]["train/loss"], rel=2e-3), last
    assert "lr=" in last and "tok/s=" in last, last


def test_no_optional_stack_is_imported_before_the_first_step(tokens, tmp_path):
    """Start-up imports only what the run needs: W&B, TensorBoard, datasets, DeepSpeed and lm-evaluation-harness are
    not loaded by the time a default-logger, single-device run takes its first step."""
    code = f"""
import json, sys
from hydra import compose, initialize_config_dir
from train.config import register_configs, to_config
from train.callbacks.loggers import read_metrics
from train.job import train
from train.module import GPT2LitModule

first = {{}}
step = GPT2LitModule.training_step

def probe(self, batch, batch_idx):
    first.setdefault("modules", sorted({{m.split(".")[0] for m in sys.modules}}))
    return step(self, batch, batch_idx)

GPT2LitModule.training_step = probe
register_configs()
with initialize_config_dir(config_dir={str(CONF)!r}, version_base="1.3"):
    cfg = to_config(compose(config_name="config", overrides={overrides(tokens, tmp_path / "run")!r}))
train(cfg)
print(json.dumps(first["modules"]))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    loaded = set(json.loads(r.stdout.strip().splitlines()[-1]))
    assert "torch" in loaded and "lightning" in loaded  # the probe saw the first step
    assert not loaded & {"wandb", "tensorboard", "datasets", "deepspeed", "lm_eval"}, loaded
