"""Checkpoint directories: safe loading, tied weights stored once, atomic publish, retention, the LR schedule."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open

import gpt2
from train.checkpoint import io as ck_io
from train.checkpoint import layout as ck
from train.config import OptimConfig
from train.tasks.model import load_checkpoint_model
from train.module import WarmupDecay, param_groups


def tiny_model() -> gpt2.GPT2LMHeadModel:
    torch.manual_seed(0)
    return gpt2.GPT2LMHeadModel(gpt2.GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2))


def fake_lightning_checkpoint(model) -> dict:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, 64, (2, 8)), labels=torch.randint(0, 64, (2, 8))).loss.backward()
    opt.step()
    return {
        "epoch": 0,
        "global_step": 7,
        "pytorch-lightning_version": "2.6.6",
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 1}}}},
        "optimizer_states": [opt.state_dict()],
        "lr_schedulers": [{"last_epoch": 7, "lr_lambdas": [{"warmup_steps": 2}]}],
        "callbacks": {"RNGState": {"torch": torch.get_rng_state(), "python": [3, list(range(5)), None]}},
        "LMDataModule": {"consumed_samples": 56},
        ck.MODEL_CONFIG_KEY: model.config.to_dict(),
        ck.META_KEY: {"tokenizer_dir": "../../tokenizer"},
    }


def test_roundtrip_is_safe_and_exact(tmp_path):
    model = tiny_model()
    io = ck_io.DirCheckpointIO()
    path = tmp_path / "checkpoints" / "step-7"
    io.save_checkpoint(fake_lightning_checkpoint(model), path)
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "meta.json", "model.safetensors",
                                                       "training_state.pt"]
    # the tied lm_head is stored once and restored as an alias
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "transformer.wte.weight" in keys and "lm_head.weight" not in keys
    # the training state loads with weights_only=True: no code runs
    state = torch.load(path / "training_state.pt", weights_only=True)
    assert state["LMDataModule"] == {"consumed_samples": 56} and "state_dict" not in state
    back = io.load_checkpoint(path)
    assert back["global_step"] == 7
    for k, v in model.state_dict().items():
        assert torch.equal(back["state_dict"][f"model.{k}"], v), k
    loaded = load_checkpoint_model(path)
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()
    ids = torch.randint(0, 64, (1, 8))
    assert torch.equal(loaded.eval()(ids).logits, model.eval()(ids).logits)


def test_unsafe_objects_are_refused_at_save(tmp_path):
    ckpt = fake_lightning_checkpoint(tiny_model())
    ckpt["callbacks"]["Bad"] = {"fn": object()}
    with pytest.raises(TypeError, match="Bad"):
        ck_io.DirCheckpointIO().save_checkpoint(ckpt, tmp_path / "step-1")
    assert not list(tmp_path.iterdir())  # nothing half-written is left


def test_partial_checkpoints_are_never_picked(tmp_path):
    io = ck_io.DirCheckpointIO()
    model = tiny_model()
    for step in (2, 4):
        io.save_checkpoint(fake_lightning_checkpoint(model), ck.step_dir(tmp_path, step))
        ck.write_last(tmp_path, ck.step_dir(tmp_path, step))
    # a crash mid-save leaves a tmp folder; one without meta.json is incomplete too
    (tmp_path / "checkpoints" / f"step-6.tmp-{os.getpid() + 1}").mkdir()
    (tmp_path / "checkpoints" / "step-8").mkdir()
    assert ck.latest_checkpoint(tmp_path).name == "step-4"
    assert ck.resolve_checkpoint(tmp_path).name == "step-4"
    ck.clean_partial(tmp_path)
    assert not (tmp_path / "checkpoints" / f"step-6.tmp-{os.getpid() + 1}").exists()


def test_async_save_writes_the_state_of_its_step_and_surfaces_a_failed_write(tmp_path, monkeypatch):
    """checkpoint.async_save's full-state path (AsyncDirCheckpointIO): the checkpoint holds the weights of the moment
    it was saved even though training changes them in place during the write; what follows a save (the `last`
    pointer) runs after the publish; a failed write is raised at the next save, and what followed it is skipped."""
    import threading

    from train.checkpoint.async_io import AsyncDirCheckpointIO

    model = tiny_model()
    ckpt = fake_lightning_checkpoint(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    io = AsyncDirCheckpointIO()
    gate, orig = threading.Event(), ck_io.save_weights

    def held_save_weights(weights, file):  # the write is held, so it is still pending when training moves on
        gate.wait(timeout=60)
        orig(weights, file)

    monkeypatch.setattr(ck_io, "save_weights", held_save_weights)
    path = ck.step_dir(tmp_path, 7)
    io.save_checkpoint(ckpt, path)
    io.writer.submit(lambda: ck.write_last(tmp_path, path))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # the next optimizer step, in place
    assert not path.exists() and ck.latest_checkpoint(tmp_path) is None  # not published while the write is pending
    gate.set()
    back = io.load_checkpoint(path)  # waits for the write
    assert (tmp_path / "checkpoints" / "last").read_text().strip() == "step-7"
    for k, v in before.items():
        assert torch.equal(back["state_dict"][f"model.{k}"], v), k
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in set(f.keys())  # the snapshot kept the tied weight one tensor: stored once

    bad = dict(fake_lightning_checkpoint(model), callbacks={"Bad": {"fn": object()}})  # not storable: the write fails
    io.save_checkpoint(bad, ck.step_dir(tmp_path, 8))
    io.writer.submit(lambda: ck.write_last(tmp_path, ck.step_dir(tmp_path, 8)))
    with pytest.raises(TypeError, match="Bad"):
        io.save_checkpoint(fake_lightning_checkpoint(model), ck.step_dir(tmp_path, 9))
    assert (tmp_path / "checkpoints" / "last").read_text().strip() == "step-7"
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step-7"]
    io.teardown()  # the error was raised once; nothing else is pending


def test_corrupt_and_foreign_checkpoints_give_clear_errors(tmp_path):
    io = ck_io.DirCheckpointIO()
    path = ck.step_dir(tmp_path, 3)
    io.save_checkpoint(fake_lightning_checkpoint(tiny_model()), path)
    (path / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(ck.CheckpointError, match="corrupt"):
        io.load_checkpoint(path)
    other = tmp_path / "not-a-checkpoint"
    other.mkdir()
    with pytest.raises(ck.CheckpointError, match="no complete checkpoint"):
        ck.resolve_checkpoint(other)
    (other / "meta.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ck.CheckpointError, match="not a gpt2-forge checkpoint"):
        ck.resolve_checkpoint(other)


def test_retention_keeps_newest_and_the_protected(tmp_path):
    io = ck_io.DirCheckpointIO()
    model = tiny_model()
    for step in (1, 2, 3, 4, 5):
        io.save_checkpoint(fake_lightning_checkpoint(model), ck.step_dir(tmp_path, step))
    ck.retain(tmp_path, keep_last=2, protect=(ck.step_dir(tmp_path, 1),))
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step-1", "step-4", "step-5"]


def test_schedule_warmup_then_cosine_to_min():
    f = WarmupDecay(warmup_steps=10, decay_steps=110, min_ratio=0.1)
    assert f(0) == pytest.approx(1 / 11) and f(9) == pytest.approx(10 / 11)
    assert f(10) == pytest.approx(1.0) and f(60) == pytest.approx(0.55)
    assert f(110) == pytest.approx(0.1) and f(10_000) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(10, 200))


def test_no_decay_on_biases_layernorm_embeddings():
    model = tiny_model()
    groups = param_groups(model, OptimConfig().weight_decay)
    decayed = {id(p) for p in groups[0]["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in decayed}
    assert names and all(n.endswith(".weight") and ".ln_" not in n and "wte" not in n and "wpe" not in n
                         for n in names)
    assert groups[1]["weight_decay"] == 0.0
    n_params = sum(p.numel() for g in groups for p in g["params"])
    assert n_params == sum(p.numel() for p in model.parameters())  # each parameter once (tied lm_head included)


def test_universal_state_of_a_full_checkpoint_loads_into_a_fresh_optimizer_by_name(tmp_path):
    """A full checkpoint's optimizer state (integer ids) read as the universal state (by parameter name) and put
    back in Lightning's layout loads into a new AdamW over a new model with every moment on the right parameter."""
    from train.checkpoint.universal import lightning_checkpoint, read_universal
    from train.module import build_optimizer, optimizer_param_names

    model = tiny_model()
    opt = build_optimizer(model, OptimConfig(lr=1e-3))
    model(torch.randint(0, 64, (2, 8)), labels=torch.randint(0, 64, (2, 8))).loss.backward()
    opt.step()
    ckpt = fake_lightning_checkpoint(model)
    ckpt["optimizer_states"] = [opt.state_dict()]
    path = tmp_path / "checkpoints" / "step-7"
    ck_io.DirCheckpointIO().save_checkpoint(ckpt, path)
    names = optimizer_param_names(model)
    assert [len(g["params"]) for g in opt.param_groups] == [len(n) for n in names] and "lm_head.weight" not in sum(
        names, [])  # the tied head is wte, once
    state = read_universal(path, ck.read_meta(path), names)
    params = dict(model.named_parameters())
    for name, s in state.optimizer["state"].items():
        torch.testing.assert_close(s["exp_avg"], opt.state[params[name]]["exp_avg"], rtol=0, atol=0)
    assert state.training["LMDataModule"] == {"consumed_samples": 56} and state.step == 7
    fresh = tiny_model()
    fresh_opt = build_optimizer(fresh, OptimConfig(lr=1e-3))
    fresh_opt.load_state_dict(lightning_checkpoint(state, ck.read_meta(path))["optimizer_states"][0])
    for (name, p), q in zip(model.named_parameters(), fresh.parameters()):
        for k in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(fresh_opt.state[q][k], opt.state[p][k], rtol=0, atol=0, msg=f"{name} {k}")
