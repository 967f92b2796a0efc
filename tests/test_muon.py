"""optim=muon: torch.optim.Muon for the blocks' 2-D matrices and AdamW for the rest, as one optimizer that Lightning,
the LR schedule, the guard and clipping drive like AdamW; its state round-trips through a checkpoint; a run SIGKILLed
under strategy=auto (1 process) and strategy=ddp (2 processes) and continued with resume=auto ends exactly where an
uninterrupted run ends; fsdp and deepspeed are refused in one sentence before anything is built.

Tolerance: exact (metrics.csv strings, torch.equal on the weights), as tests/test_train_resume.py.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train_resume import last_step

from helpers import compose_config, corpus_text
from train.callbacks.loggers import read_metrics
from train.config import ConfigError, MuonConfig, OptimConfig, register_configs
from train.module import WarmupDecay
from train.module import MuonWithAdamW, build_optimizer, hidden_matrices
from train.strategies import check_optimizer, strategy_specs

import gpt2

ROOT = Path(__file__).resolve().parents[1]
register_configs()


def tiny_model(seed: int = 0) -> gpt2.GPT2LMHeadModel:
    torch.manual_seed(seed)
    return gpt2.GPT2LMHeadModel(gpt2.GPT2Config.from_preset("tiny", vocab_size=97, resid_pdrop=0.0, embd_pdrop=0.0,
                                                            attn_pdrop=0.0))


def test_muon_takes_the_blocks_matrices_and_adamw_everything_else():
    model = tiny_model()
    opt = build_optimizer(model, MuonConfig())
    assert isinstance(opt, MuonWithAdamW)
    muon = {id(p) for g in opt.muon.param_groups for p in g["params"]}
    adamw = {id(p) for g in opt.adamw.param_groups for p in g["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[i] for i in muon) == sorted(
        n for n, p in model.named_parameters() if n.startswith("transformer.h.") and p.ndim == 2)
    assert {names[i] for i in adamw} >= {"transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight",
                                         "transformer.h.0.attn.c_attn.bias"}
    assert not muon & adamw and muon | adamw == set(names)  # every parameter (lm_head is wte: tied) exactly once
    # one optimizer for Lightning: its param_groups are the inner optimizers' own dicts, AdamW's first (optim.lr)
    assert opt.param_groups == opt.adamw.param_groups + opt.muon.param_groups
    assert opt.param_groups[0]["lr"] == MuonConfig().lr and opt.param_groups[-1]["lr"] == MuonConfig().muon_lr
    assert isinstance(build_optimizer(model, OptimConfig()), torch.optim.AdamW)
    assert len(hidden_matrices(model)) == 4 * model.config.n_layer


def _steps(model, opt, sched, batches):
    for x in batches:
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)


def test_state_dict_round_trips_and_a_reloaded_optimizer_continues_identically():
    """Optimizer and LambdaLR state saved after 3 steps (through torch.save / weights_only load, as
    training_state.pt) and loaded into a fresh model + optimizer: the next 4 steps (lr still changing: warm-up)
    give bit-identical weights to never stopping."""
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 97, (4, 16), generator=g) for _ in range(7)]
    cfg = MuonConfig(warmup_steps=5)
    sched_of = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, WarmupDecay(5, 7, 0.1))  # noqa: E731
    ref = tiny_model()
    ref_opt = build_optimizer(ref, cfg)
    ref_sched = sched_of(ref_opt)
    _steps(ref, ref_opt, ref_sched, batches[:3])
    buf = io.BytesIO()
    torch.save({"model": ref.state_dict(), "opt": ref_opt.state_dict(), "sched": ref_sched.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    assert {"momentum_buffer", "exp_avg", "exp_avg_sq"} <= {k for s in saved["opt"]["state"].values() for k in s}
    _steps(ref, ref_opt, ref_sched, batches[3:])

    new = tiny_model(seed=5)  # other initial weights: everything must come from the checkpoint
    new.load_state_dict(saved["model"])
    new_opt = build_optimizer(new, cfg)
    new_sched = sched_of(new_opt)
    new_opt.load_state_dict(saved["opt"])
    new_sched.load_state_dict(saved["sched"])
    # the inner optimizers read the loaded groups and state, so the schedule reaches both
    assert new_opt.muon.param_groups[0] is new_opt.param_groups[-1] and new_opt.muon.state is new_opt.state
    _steps(new, new_opt, new_sched, batches[3:])
    for (k, a), b in zip(ref.state_dict().items(), new.state_dict().values()):
        assert torch.equal(a, b), k


def test_sharding_strategies_are_refused_in_one_sentence():
    cfg = MuonConfig()
    refused = []
    for name, spec in strategy_specs().items():
        strategy_cfg = spec.config(name=name)
        check_optimizer(strategy_cfg, OptimConfig())  # AdamW runs everywhere
        if spec.optimizer_params == "whole":
            check_optimizer(strategy_cfg, cfg)
            continue
        with pytest.raises(ConfigError) as e:
            check_optimizer(strategy_cfg, cfg)
        msg = str(e.value)
        assert msg.startswith(f"optim=muon cannot run under strategy={name}: it orthogonalizes whole weight matrices")
        assert "use strategy=auto|ddp, or optim=adamw." in msg and msg.count(". ") == 0, msg
        refused.append(name)
    assert {"fsdp", "deepspeed_zero1", "deepspeed_zero2", "deepspeed_zero3"} <= set(refused)
    assert {"auto", "ddp"}.isdisjoint(refused)


# ------------------------------------------------------------------------------------------------ real runs
MAX_STEPS, KILL_AT = 24, 12


def overrides(corpus: Path, cache: Path, run_dir: Path, batch: int, *extra: str) -> list[str]:
    return [
        "data=text", f"data.path={corpus}", f"data.cache_dir={cache}", "data.vocab_size=320",
        "data.block_size=32", f"data.batch_size={batch}", "data.val_fraction=0.1",
        "model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.n_positions=32", "model.dropout=0.1",
        "optim=muon", "optim.muon_lr=0.02", "optim.warmup_steps=4", f"trainer.max_steps={MAX_STEPS}",
        "trainer.accelerator=cpu",
        "trainer.val_check_interval=6", "trainer.limit_val_batches=2", "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false", "checkpoint.every_n_steps=4", "checkpoint.keep_last=0",
        "sample.max_new_tokens=2", f"run_dir={run_dir}", *extra,
    ]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC_"))}
    for k in ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "RANK"):
        env.pop(k, None)
    env.update(OMP_NUM_THREADS="1")
    return env


def _launch(args: list[str], log: Path) -> subprocess.Popen:
    # its own session: a SIGKILL to the group takes every rank Lightning spawned, as a node failure would
    return subprocess.Popen([sys.executable, str(ROOT / "train" / "run.py"), *args], cwd=ROOT, env=_env(),
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("muon")
    corpus = d / "input.txt"
    corpus.write_text(corpus_text(60_000))
    from data_pipelines import LMDataModule

    LMDataModule(compose_config(overrides(corpus, d / "cache", d / "x", 8)).data).prepare_data()  # tokenize once
    return d, corpus, d / "cache"


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["auto", "ddp"])
def test_sigkill_then_resume_auto_matches_uninterrupted(data, strategy):
    d, corpus, cache = data
    extra = ["strategy=ddp", "trainer.devices=2"] if strategy == "ddp" else []
    batch = 4 if strategy == "ddp" else 8
    ref_dir, run_dir = d / f"{strategy}-ref", d / f"{strategy}-victim"
    ref = _launch(overrides(corpus, cache, ref_dir, batch, *extra), d / f"{strategy}-ref.log")
    victim = _launch(overrides(corpus, cache, run_dir, batch, *extra), d / f"{strategy}-victim.log")
    try:
        deadline = time.monotonic() + 400
        while last_step(run_dir) < KILL_AT:  # then SIGKILL every process of the job at once
            assert victim.poll() is None, (d / f"{strategy}-victim.log").read_text()[-3000:]
            assert time.monotonic() < deadline, f"no step-{KILL_AT} checkpoint within 400 s"
            time.sleep(0.01)
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait()
        assert ref.wait(timeout=400) == 0, (d / f"{strategy}-ref.log").read_text()[-3000:]
    finally:
        for p in (ref, victim):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    killed_at = last_step(run_dir)
    assert KILL_AT <= killed_at < MAX_STEPS, "the victim must die mid-run"
    resumed = subprocess.run([sys.executable, str(ROOT / "train" / "run.py"),
                              *overrides(corpus, cache, run_dir, batch, *extra, "resume=auto")],
                             cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    ref_rows = {int(r["step"]): r for r in read_metrics(ref_dir / "metrics.csv")}
    run_rows = {int(r["step"]): r for r in read_metrics(run_dir / "metrics.csv")}
    assert sorted(run_rows) == sorted(ref_rows) and max(run_rows) == MAX_STEPS
    for step in ref_rows:
        for key in ("train/loss", "val/loss", "lr"):
            assert run_rows[step][key] == ref_rows[step][key], (step, key, run_rows[step], ref_rows[step])
    assert ref_rows[MAX_STEPS]["train/loss"] < ref_rows[1]["train/loss"] - 0.5  # and Muon trains
    a = load_file(str(ref_dir / "checkpoints" / f"step-{MAX_STEPS}" / "model.safetensors"))
    b = load_file(str(run_dir / "checkpoints" / f"step-{MAX_STEPS}" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
