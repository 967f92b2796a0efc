"""train/strategies/ and train/callbacks/preemption.py without launching processes: what each `strategy=` option builds,
what this machine refuses up front (one sentence), the DeepSpeed JSON that reaches Lightning, the ZeRO checkpoint
publishing path, and the preemption callback's decisions (save, stop, requeue only on SIGUSR1 under SLURM)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from train.checkpoint import layout as ck

from train.checkpoint import weights as ck_weights
from train.config import ConfigError, register_configs
from train.callbacks.preemption import Preemption, requeue, slurm_job_id
from train.strategies import build_plugins, build_strategy, check_hardware, check_resume
from train.strategies.engines.fsdp2 import FSDP2Strategy, apply_fsdp, import_class, mixed_precision_policy
from train.strategies.engines.zero import finalize_zero_checkpoint
from helpers import compose_config

ROOT = Path(__file__).resolve().parents[1]
register_configs()


def cfg_for(*overrides: str):
    return compose_config(list(overrides))


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


@pytest.fixture
def eight_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)


# ------------------------------------------------------------------------------------------ refused up front
@pytest.mark.parametrize("name", ["deepspeed_zero1", "deepspeed_zero2", "deepspeed_zero3", "deepspeed_zero3_offload"])
def test_deepspeed_builds_for_the_cpu(no_cuda, monkeypatch, name):
    """Without CUDA (and with trainer.accelerator=cpu on a GPU machine) DeepSpeed runs on its CPU accelerator."""
    pytest.importorskip("deepspeed")
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)  # restored after the test: build_strategy sets it
    from lightning.pytorch.strategies import DeepSpeedStrategy

    cfg = cfg_for(f"strategy={name}", "trainer.accelerator=cpu", "strategy.stage3_param_persistence_threshold=0")
    s = build_strategy(cfg.strategy, cfg.trainer, 1, check_hardware(cfg.strategy, cfg.trainer))
    assert isinstance(s, DeepSpeedStrategy)
    assert os.environ["DS_ACCELERATOR"] == "cpu"  # the ranks Lightning launches pick DeepSpeed's CPU accelerator
    if name.startswith("deepspeed_zero3"):
        assert s.config["zero_optimization"]["stage3_param_persistence_threshold"] == 0


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["trainer.precision=64-true"], r"^strategy=deepspeed_zero2 cannot train in trainer.precision=64-true "
                                        r"\(DeepSpeed has no fp64 mode\); "
                                        r"use trainer.precision=32-true or bf16-mixed.$"),
        (["trainer.accelerator=mps"], r"^strategy=deepspeed_zero2 runs on CUDA GPUs or the CPU, not "
                                      r"trainer.accelerator=mps; use trainer.accelerator=cpu.$"),
    ],
)
def test_deepspeed_requests_this_cpu_cannot_run_are_named(no_cuda, overrides, match):
    cfg = cfg_for("strategy=deepspeed_zero2", *overrides)
    with pytest.raises(ConfigError, match=match):
        check_hardware(cfg.strategy, cfg.trainer)


def test_deepspeed_fp16_is_refused_on_a_cpu_without_fp16_kernels(no_cuda, monkeypatch):
    pytest.importorskip("deepspeed")
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

    monkeypatch.setattr(CPU_Accelerator, "is_fp16_supported", lambda self: False)
    cfg = cfg_for("strategy=deepspeed_zero3", "trainer.accelerator=cpu", "trainer.precision=16-mixed")
    with pytest.raises(ConfigError, match=r"^strategy=deepspeed_zero3 with trainer.precision=16-mixed needs fp16 "
                                          r"kernels this CPU lacks .*; use trainer.precision=bf16-mixed or 32-true"):
        check_hardware(cfg.strategy, cfg.trainer)


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["trainer.accelerator=gpu"], "no CUDA GPU is visible; use trainer.accelerator=cpu"),
        (["attention=flash"], "attention=flash needs a CUDA GPU"),
        ([f"trainer.devices={(os.cpu_count() or 1) + 1}", "trainer.accelerator=cpu"], "CPU cores; set trainer.devices"),
    ],
)
def test_what_this_cpu_machine_cannot_run_is_named(no_cuda, overrides, match):
    cfg = cfg_for(*overrides)
    with pytest.raises(ConfigError, match=match):
        check_hardware(cfg.strategy, cfg.trainer, cfg.attention.implementation)


def test_more_devices_than_gpus_is_refused(eight_gpus):
    cfg = cfg_for("trainer.devices=16", "strategy=fsdp")
    with pytest.raises(ConfigError, match="trainer.devices=16 but this node has 8 CUDA GPU"):
        check_hardware(cfg.strategy, cfg.trainer)


def test_cli_refuses_a_deepspeed_request_this_machine_cannot_run_in_one_sentence(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    r = subprocess.run([sys.executable, str(ROOT / "train/run.py"), "strategy=deepspeed_zero2",
                        "trainer.accelerator=cpu", f"trainer.devices={(os.cpu_count() or 1) + 1}",
                        f"run_dir={tmp_path}/run"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 1, r.stderr[-2000:]
    n = os.cpu_count() or 1
    assert r.stderr.strip() == (f"error: trainer.devices={n + 1} CPU processes but this node has {n} CPU cores; set "
                                f"trainer.devices<={n}.")
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before anything was prepared


# ------------------------------------------------------------------------------------------ what gets built
def test_ddp_and_fsdp_build_from_their_yaml(no_cuda):
    from lightning.pytorch.strategies import DDPStrategy

    cfg = cfg_for("strategy=ddp", "trainer.accelerator=cpu")
    hardware = check_hardware(cfg.strategy, cfg.trainer)
    assert isinstance(build_strategy(cfg.strategy, cfg.trainer, 1, hardware), DDPStrategy)
    cfg = cfg_for("strategy=fsdp", "trainer.accelerator=cpu", "trainer.precision=bf16-mixed")
    s = build_strategy(cfg.strategy, cfg.trainer, 1, check_hardware(cfg.strategy, cfg.trainer))
    assert isinstance(s, FSDP2Strategy)
    assert s.wrap_class == "gpt2.modeling.GPT2Block" and s.reshard_after_forward and not s.offload
    assert s.param_precision == "bf16-mixed"
    cfg = cfg_for()
    assert build_strategy(cfg.strategy, cfg.trainer, 1, check_hardware(cfg.strategy, cfg.trainer)) == "auto"


def test_mixed_precision_policy_follows_trainer_precision():
    assert mixed_precision_policy("bf16-mixed").param_dtype == torch.bfloat16
    assert mixed_precision_policy("bf16-mixed").reduce_dtype == torch.float32  # gradients reduced in fp32
    assert mixed_precision_policy("16-mixed").param_dtype == torch.float16
    assert mixed_precision_policy("32-true").param_dtype is None


def test_wrap_class_errors_name_the_key():
    import gpt2

    assert import_class("gpt2.modeling.GPT2Block") is gpt2.modeling.GPT2Block
    with pytest.raises(ConfigError, match="strategy.wrap_class=gpt2.modeling.NoSuchBlock cannot be imported"):
        import_class("gpt2.modeling.NoSuchBlock")
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(ConfigError, match="matches no module of Sequential"):
        apply_fsdp(model, mesh=None, wrap_class="gpt2.modeling.GPT2Block")
    with pytest.raises(ConfigError, match="dotted class path"):
        cfg_for("strategy=fsdp", "strategy.wrap_class=GPT2Block")


@pytest.mark.parametrize(
    "name,stage,offload", [("deepspeed_zero1", 1, False), ("deepspeed_zero2", 2, False),
                           ("deepspeed_zero3", 3, False), ("deepspeed_zero3_offload", 3, True)],
)
def test_deepspeed_config_comes_from_our_values(eight_gpus, name, stage, offload):
    pytest.importorskip("deepspeed")
    cfg = cfg_for(f"strategy={name}", "data.batch_size=6", "trainer.accumulate_grad_batches=4",
                  "trainer.gradient_clip_val=0.5", "trainer.precision=bf16-mixed")
    s = build_strategy(cfg.strategy, cfg.trainer, cfg.data.batch_size, check_hardware(cfg.strategy, cfg.trainer))
    from lightning.pytorch.strategies import DeepSpeedStrategy

    assert isinstance(s, DeepSpeedStrategy)
    c = s.config
    assert c["train_micro_batch_size_per_gpu"] == 6  # data.batch_size
    assert "gradient_accumulation_steps" not in c  # Lightning fills it from trainer.accumulate_grad_batches
    assert c["gradient_clipping"] == 0.5 and c["bf16"] == {"enabled": True}
    assert c["zero_optimization"]["stage"] == stage
    assert ("offload_optimizer" in c["zero_optimization"]) == offload
    assert ("offload_param" in c["zero_optimization"]) == offload
    assert c.get("zero_force_ds_cpu_optimizer", True) == (not offload)  # torch AdamW under offload is allowed


# ------------------------------------------------------------------------------------------ ZeRO -> our step dir
def _fake_zero_dir(tmp: Path) -> None:
    (tmp / "checkpoint").mkdir(parents=True)
    (tmp / "latest").write_text("checkpoint")
    (tmp / "checkpoint" / "mp_rank_00_model_states.pt").write_bytes(b"shard")


def _fake_convert(weights: dict):
    def convert(src, out):
        assert (Path(src) / "latest").is_file() and Path(out).parent == Path(src)
        ck_weights.save_weights(weights, Path(out))

    return convert


def test_zero_checkpoint_is_published_as_our_step_dir(tmp_path):
    import gpt2
    from train.tasks.model import load_checkpoint_model

    model = gpt2.GPT2LMHeadModel(gpt2.GPT2Config.from_preset("tiny", vocab_size=300, n_positions=32))
    sd = {k: v for k, v in model.state_dict().items()}
    run = tmp_path / "run"
    path = ck.step_dir(run, 20)
    tmp = path.parent / "step-20.tmp-123"
    _fake_zero_dir(tmp)
    out = finalize_zero_checkpoint(tmp, path, model.config.to_dict(), {"task": "GPT2LMHeadModel"}, 20,
                                   convert=_fake_convert(sd))
    assert out == path and not tmp.exists()
    assert ck.latest_checkpoint(run) == path  # a complete checkpoint resume=auto and export find
    meta = ck.read_meta(path)
    assert meta["global_step"] == 20 and meta["strategy"] == "deepspeed" and meta["task"] == "GPT2LMHeadModel"
    assert (path / "checkpoint" / "mp_rank_00_model_states.pt").is_file()  # DeepSpeed's own shards stay for resume
    loaded = load_checkpoint_model(path)
    torch.testing.assert_close(loaded.transformer.wte.weight, model.transformer.wte.weight)
    # a re-save of the same step replaces the old dir as a whole
    _fake_zero_dir(tmp)
    finalize_zero_checkpoint(tmp, path, model.config.to_dict(), {}, 20, convert=_fake_convert(sd))
    assert sorted(p.name for p in path.parent.iterdir()) == ["step-20"]


def test_unfinished_zero_save_is_not_published(tmp_path):
    tmp = tmp_path / "checkpoints" / "step-5.tmp-1"
    tmp.mkdir(parents=True)
    with pytest.raises(ck.CheckpointError, match="'latest' missing"):
        finalize_zero_checkpoint(tmp, tmp_path / "checkpoints" / "step-5", None, {}, 5, convert=_fake_convert({}))
    assert ck.list_checkpoints(tmp_path) == []


def _step(tmp_path, **meta) -> Path:
    step = tmp_path / "step-8"
    step.mkdir(exist_ok=True)
    (step / "meta.json").write_text(json.dumps({"format": ck.FORMAT, "global_step": 8, **meta}))
    return step


def _check(step: Path, *overrides: str) -> None:
    cfg = cfg_for(*overrides)
    check_resume(step, cfg.strategy, ck.read_meta(step), cfg.trainer)


def test_resume_across_strategy_families_and_world_sizes_is_allowed(tmp_path):
    """Any family resumes under any other (the universal training state), at any world size."""
    step = _step(tmp_path, strategy="fsdp", strategy_name="fsdp", world_size=2, precision="32-true")
    for strategy in ("fsdp", "ddp", "deepspeed_zero2", "deepspeed_zero3"):
        _check(step, f"strategy={strategy}", "trainer.devices=1")
    step = _step(tmp_path, strategy="deepspeed", strategy_name="deepspeed_zero3", world_size=2)
    (step / ck.STATE_NAME).write_bytes(b"")  # written since universal checkpoints: Lightning's state beside ZeRO's
    for strategy in ("ddp", "fsdp", "deepspeed_zero1", "deepspeed_zero3"):
        _check(step, f"strategy={strategy}", "trainer.devices=1")


def test_what_cannot_be_mapped_is_refused_in_one_sentence(tmp_path):
    """A ZeRO checkpoint from before universal checkpoints (no training_state.pt, no world size in meta.json) resumes
    only natively, at its own world size; fp16 state (its loss scale) stays with its engine."""
    step = _step(tmp_path, strategy="deepspeed")
    (step / "checkpoint").mkdir()
    for rank in (0, 1):
        (step / "checkpoint" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"")
    _check(step, "strategy=deepspeed_zero3", "trainer.devices=2")  # DeepSpeed's own loader, as before
    with pytest.raises(ConfigError, match=r"ZeRO partitions of 2 ranks .* trainer.devices x trainer.num_nodes = 2"):
        _check(step, "strategy=deepspeed_zero3", "trainer.devices=1")
    with pytest.raises(ConfigError, match=r"inside DeepSpeed's files only .* strategy=ddp cannot resume it; resume it "
                                          r"with strategy=deepspeed_zero1\|.*model.init_from="):
        _check(step, "strategy=ddp", "trainer.devices=2")
    step = _step(tmp_path, strategy="fsdp", strategy_name="fsdp", world_size=2, precision="16-mixed")
    _check(step, "strategy=fsdp", "trainer.devices=1")  # DCP reshards; the scaler state is the same plugin's
    with pytest.raises(ConfigError, match=r"trained in fp16.*resume it with strategy=fsdp on 2 ranks"):
        _check(step, "strategy=deepspeed_zero2", "trainer.devices=2")


# ------------------------------------------------------------------------------------------ cluster environment
def test_slurm_environment_without_lightnings_requeue(monkeypatch):
    from lightning.fabric.plugins.environments import SLURMEnvironment

    for k in list(os.environ):
        if k.startswith("SLURM_"):
            monkeypatch.delenv(k)
    assert build_plugins() == []
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "2")
    monkeypatch.setenv("SLURM_JOB_NAME", "gpt2-forge")
    (env,) = build_plugins()
    assert isinstance(env, SLURMEnvironment) and env.auto_requeue is False


def test_slurm_job_id_and_requeue_command():
    assert slurm_job_id({"SLURM_JOB_ID": "42"}) == "42"
    assert slurm_job_id({"SLURM_JOB_ID": "43", "SLURM_ARRAY_JOB_ID": "40", "SLURM_ARRAY_TASK_ID": "3"}) == "40_3"
    assert slurm_job_id({}) is None
    calls = []
    assert requeue("40_3", runner=lambda cmd, **kw: calls.append(cmd) or SimpleNamespace(returncode=0))
    assert calls == [["scontrol", "requeue", "40_3"]]
    with pytest.warns(UserWarning, match="Invalid job id"):
        assert not requeue("1", runner=lambda cmd, **kw: SimpleNamespace(returncode=1, stderr="Invalid job id", stdout=""))


class _Ckpt:
    def __init__(self):
        self.saved = []

    def save(self, trainer):
        self.saved.append(trainer.global_step)
        return Path(f"/run/checkpoints/step-{trainer.global_step}")


def _trainer(step: int):
    return SimpleNamespace(global_step=step, world_size=1, is_global_zero=True, should_stop=False,
                           strategy=SimpleNamespace(root_device=torch.device("cpu")))


@pytest.mark.parametrize("sig,in_slurm,requeued", [(signal.SIGUSR1, True, True), (signal.SIGTERM, True, False),
                                                   (signal.SIGUSR1, False, False)])
def test_preemption_saves_stops_and_requeues_only_usr1_under_slurm(monkeypatch, sig, in_slurm, requeued):
    import train.callbacks.preemption as pre

    for k in list(os.environ):
        if k.startswith("SLURM_"):
            monkeypatch.delenv(k)
    if in_slurm:
        monkeypatch.setenv("SLURM_JOB_ID", "77")
    calls = []
    monkeypatch.setattr(pre, "requeue", lambda job: calls.append(job) or True)
    seen_by_previous = []
    old = signal.signal(sig, lambda s, f: seen_by_previous.append(s))  # a user's handler: still called
    try:
        cb, ckpt = None, _Ckpt()
        cb = Preemption(ckpt)
        trainer = _trainer(10)
        cb.on_train_start(trainer, None)
        trainer.global_step = 11
        cb.on_train_batch_end(trainer, None, None, None, 0)
        assert ckpt.saved == [] and not trainer.should_stop  # no signal: nothing happens
        os.kill(os.getpid(), sig)  # the handler only sets a flag...
        assert ckpt.saved == [] and seen_by_previous == [sig]
        trainer.global_step = 12
        cb.on_train_batch_end(trainer, None, None, None, 0)  # ...the step boundary saves and stops
        assert ckpt.saved == [12] and trainer.should_stop and cb.stopped
        assert cb.signal_name == signal.Signals(sig).name
        assert calls == (["77"] if requeued else []) and cb.requeued == requeued
        cb.on_train_end(trainer, None)
        assert signal.getsignal(sig) is not cb._handle  # handlers restored
    finally:
        signal.signal(sig, old)


def test_deepspeed_micro_batch_is_the_loader_batch_of_the_task(tmp_path):
    """DeepSpeed's train_micro_batch_size_per_gpu is what the loader yields: data.batch_size for the LM,
    task.data.batch_size for a fine-tuning task."""
    pytest.importorskip("deepspeed")
    from train.tasks import get_task
    from train.trainer import build_trainer

    common = ["strategy=deepspeed_zero2", "trainer.accelerator=cpu", "trainer.devices=1", "data.batch_size=6"]
    for extra, want in ((["task=lm"], 6), (["task=cls", "task.data.batch_size=10"], 10)):
        cfg = cfg_for(*common, *extra)
        hardware = check_hardware(cfg.strategy, cfg.trainer)
        micro_batch = get_task(cfg.task.name).micro_batch_size(cfg.data, cfg.task)
        strategy = build_strategy(cfg.strategy, cfg.trainer, micro_batch, hardware)
        trainer = build_trainer(cfg.trainer, cfg.guard, strategy, hardware.precision, tmp_path, loggers=[])
        assert trainer.strategy.config["train_micro_batch_size_per_gpu"] == want, extra


def test_a_launcher_that_starts_another_number_of_processes_is_refused(tmp_path):
    """Lightning takes the launcher's world size: `sbatch --ntasks=1` (or torchrun --nproc-per-node 1) with
    trainer.devices=2 would train on one process at half the global batch (Lightning#20391). Refused, naming both
    numbers; matching launches, Lightning's own launcher and an interactive Slurm shell pass."""
    from train.strategies import check_launcher

    two = cfg_for("trainer.accelerator=cpu", "trainer.devices=2").trainer
    slurm = {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "train"}
    with pytest.raises(ConfigError, match=r"^Slurm started 1 process\(es\) but trainer\.devices x trainer\.num_nodes "
                                          r"= 2 x 1 = 2; .*srun --ntasks-per-node=2"):
        check_launcher(two, slurm)
    torchrun = {"TORCHELASTIC_RUN_ID": "x", "WORLD_SIZE": "4"}
    with pytest.raises(ConfigError, match=r"^torchrun started 4 process\(es\) but .* = 2; .*--nproc-per-node=2"):
        check_launcher(two, torchrun)
    for env in ({}, {**slurm, "SLURM_NTASKS": "2"}, {**slurm, "SLURM_JOB_NAME": "interactive"},
                {**torchrun, "WORLD_SIZE": "2"}):
        check_launcher(two, env)
    check_launcher(cfg_for("trainer.accelerator=cpu", "trainer.devices=auto").trainer, slurm)  # Lightning counts
    # the run itself stops with that sentence before Lightning is imported
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC"))}
    r = subprocess.run([sys.executable, "train/run.py", "trainer.accelerator=cpu", "trainer.devices=2",
                        "strategy=ddp", "trainer.max_steps=1", f"run_dir={tmp_path / 'run'}"],
                       cwd=ROOT, env={**env, **slurm}, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith("error: Slurm started 1 process(es)")
    assert not (tmp_path / "run" / "config.yaml").exists()
