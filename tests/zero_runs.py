"""The DeepSpeed ZeRO runs on the CPU (DeepSpeed's CPU accelerator, 2 processes over gloo) that
tests/test_deepspeed_cpu.py and tests/test_deepspeed_config.py both read: made once per session by the `zero_runs`
fixture (tests/conftest.py).

`make_runs(d)` trains, under d: a DDP reference and ZeRO-1, ZeRO-2, ZeRO-3 and ZeRO-3-offload runs of S = 20
optimizer steps, a ZeRO-2 run SIGKILLed after step 12 and resumed to step 20 (`deepspeed_zero2`) next to an
uninterrupted one (`zero2-uninterrupted`), and a fine-tuning run under ZeRO-3 started from the ZeRO-3 checkpoint
(`cls`, 5 steps: its last validation runs in a trainer.validate() after fit), and a 3-step FSDP2 run (`fsdp`). Each
ZeRO run but the killed one leaves `probe/live.safetensors`, its live weights at the end of fit (ZeRO-3: gathered from
both ranks), the ZeRO runs `probe/probe-rank{0,1}.json`, the elements each rank held at step 3, and every LM run
`probe/bytes-rank{0,1}.json`, the bytes of parameters / gradients / optimizer state / buffers each rank held then
(tests/state_bytes.py). The run settings and why they are what they are:
tests/test_deepspeed_cpu.py's docstring. Three single-process scripts run alongside, their outcome in SCRIPTS: a
bf16-mixed ZeRO-2 checkpoint (`zero2-bf16-mixed/`, for the conversion test), a Lightning script that saves under ZeRO-3
after a validate() that follows fit (`validate-then-save/`), and train/cli/export.py of the ZeRO-1 checkpoint
(`hf-zero1/`).

Cost: a launch is mostly start-up, not training (20 steps of this model take ~1-2 s): rank 0 imports torch, Lightning
and the project and prepares the data, then Lightning starts rank 1, which imports everything again, while rank 0
waits: one core works and the other idles. So two jobs run at a time (two worker threads, each waiting on its own
subprocesses), the second starting once the first has written the shared token cache.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from helpers import corpus_text
from train.callbacks.loggers import read_metrics

ROOT = Path(__file__).resolve().parents[1]
S, SPIKE_AT, EVERY, KILL_AFTER = 20, 6, 5, 12
ZERO = ("deepspeed_zero1", "deepspeed_zero2", "deepspeed_zero3", "deepspeed_zero3_offload")
CONCURRENT_LAUNCHES = 2

# train/run.py with two test-only additions (a wrapper, not product code; the rank Lightning launches runs it too):
# the loss of step SPIKE_AT multiplied, and a probe that writes, at the accumulation boundary of step PROBE_AT, how
# many elements of parameters / gradients / optimizer state this rank holds (DeepSpeed) and how many bytes (every
# strategy: tests/state_bytes.py), and at the end of fit the live weights (ZeRO-3: gathered from every rank) as
# PROBE_OUT/live.safetensors.
WRAPPER = r'''
import json, os, runpy, sys
import torch
from train.module import GPT2LitModule

spike_at, factor = int(os.environ["SPIKE_AT"]), float(os.environ["SPIKE_FACTOR"])
probe_at, out = int(os.environ.get("PROBE_AT", "0")), os.environ.get("PROBE_OUT")
orig_step = GPT2LitModule.training_step


def training_step(self, batch, batch_idx):
    loss = orig_step(self, batch, batch_idx)
    return loss * factor if self.trainer.global_step + 1 == spike_at else loss


def numel(ts):
    return sum(t.numel() for t in ts if t is not None)


peak_grads = 0


held_max = {}


def write_held_bytes(self, optimizer, engine):
    """PROBE_OUT/bytes-rank{r}.json: the bytes this rank holds (tests/state_bytes.py), each part's largest value
    after the micro-batches of step PROBE_AT (DeepSpeed calls this hook after each one; ZeRO-1 holds whole
    gradients until the last), written at its accumulation boundary."""
    if self.trainer.global_step + 1 != probe_at:
        return
    sys.path.insert(0, os.path.join(os.environ["FORGE_ROOT"], "tests"))
    from state_bytes import held_bytes
    for k, v in held_bytes(self.trainer, self.model, optimizer).items():
        held_max[k] = max(held_max.get(k, 0), v)
    if engine is None or engine.is_gradient_accumulation_boundary():
        with open(os.path.join(out, f"bytes-rank{self.trainer.global_rank}.json"), "w") as f:
            json.dump(held_max, f)


def on_before_optimizer_step(self, optimizer):  # under DeepSpeed: after every micro-batch
    global peak_grads
    engine = getattr(self.trainer.strategy, "deepspeed_engine", None)
    write_held_bytes(self, optimizer, engine)
    if engine is None or self.trainer.global_step + 1 != probe_at:
        return
    opt, params = engine.optimizer, list(self.model.parameters())
    stage3 = hasattr(params[0], "ds_tensor")
    if stage3:  # the rank's partition of each parameter; its fp32 master and gradient partitions (flat)
        held = numel(p.ds_tensor for p in params)
        master = numel(opt.fp32_partitioned_groups_flat)
        buf = getattr(opt, "grad_partitions_flat_buffer", None)
        grads = numel(g.grad for g in opt.fp32_partitioned_groups_flat) or (0 if buf is None else buf.numel())
    else:  # whole parameters; fp32 master partitions; gradients (whole ones accumulating, or reduced partitions)
        held = numel(params)
        master = numel(opt.single_partition_of_fp32_groups)
        grads = numel(p.grad for p in params) + sum(numel(v) for v in opt.averaged_gradients.values() if v)
    peak_grads = max(peak_grads, grads)
    if not engine.is_gradient_accumulation_boundary():
        return
    state = sum(v.numel() for s in opt.optimizer.state.values() for k, v in s.items() if k != "step"
                and torch.is_tensor(v))
    info = {"rank": self.trainer.global_rank, "total": sum(p.ds_numel if stage3 else p.numel() for p in params),
            "params": held, "grads": grads, "grads_peak": peak_grads, "master": master, "moments": state}
    with open(os.path.join(out, f"probe-rank{self.trainer.global_rank}.json"), "w") as f:
        json.dump(info, f)


def on_train_end(self):
    from train.strategies.engines.zero import is_zero3
    if not out or getattr(self.trainer.strategy, "deepspeed_engine", None) is None:
        return
    import contextlib
    import deepspeed
    from safetensors.torch import save_file
    params = list(self.model.parameters())  # ZeRO-3: gathered from every rank's partition; ZeRO-1/2: whole already
    gather = deepspeed.zero.GatheredParameters(params, modifier_rank=None) if is_zero3(self.trainer.strategy) \
        else contextlib.nullcontext()
    with gather:
        if self.trainer.global_rank == 0:
            sd = {k: v.detach().clone().contiguous() for k, v in self.model.state_dict().items()}
            save_file({k: v for k, v in sd.items() if k != "lm_head.weight"}, os.path.join(out, "live.safetensors"))


GPT2LitModule.training_step = training_step
if probe_at:
    GPT2LitModule.on_before_optimizer_step = on_before_optimizer_step
    GPT2LitModule.on_train_end = on_train_end
# runpy sets sys.argv[0] to run.py while it runs, and Lightning starts rank 1 from sys.argv[0]: start this file instead
import lightning.pytorch.strategies.launchers.subprocess_script as launcher
orig_cmd, me = launcher._hydra_subprocess_cmd, os.path.abspath(__file__)
launcher._hydra_subprocess_cmd = lambda local_rank: ([sys.executable, me, *orig_cmd(local_rank)[0][2:]],
                                                     orig_cmd(local_rank)[1])
runpy.run_path(os.path.join(os.environ["FORGE_ROOT"], "train", "run.py"), run_name="__main__")
'''


def overrides(corpus: Path, cache: Path, run_dir: Path, strategy: str, max_steps: int, *extra: str) -> list[str]:
    return [
        "data=text", f"data.path={corpus}", f"data.cache_dir={cache}", "data.vocab_size=300",
        "data.block_size=16", "data.batch_size=2", "data.val_fraction=0.1",
        "model.n_layer=1", "model.n_head=2", "model.n_embd=16", "model.n_positions=16", "model.dropout=0.0",
        f"trainer.max_steps={max_steps}", "trainer.accelerator=cpu", "trainer.devices=2", f"strategy={strategy}",
        "trainer.accumulate_grad_batches=2", "trainer.gradient_clip_val=null", "trainer.limit_val_batches=0",
        "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false",
        f"checkpoint.every_n_steps={EVERY}", "checkpoint.keep_last=0",
        "optim.warmup_steps=2", f"optim.decay_steps={S}", "optim.eps=1e-3", "sample.max_new_tokens=2",
        "guard.warmup_steps=3", "guard.spike_factor=3.0", f"run_dir={run_dir}",
        *(["strategy.stage3_param_persistence_threshold=0"] if strategy.startswith("deepspeed_zero3") else []),
        *extra,
    ]


def env(probe: Path | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC_"))}
    for k in ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "RANK", "DS_ACCELERATOR"):
        env.pop(k, None)
    env.update(OMP_NUM_THREADS="1", HYDRA_FULL_ERROR="1", FORGE_ROOT=str(ROOT), SPIKE_AT=str(SPIKE_AT),
               SPIKE_FACTOR="10")
    if probe is not None:
        probe.mkdir(parents=True, exist_ok=True)
        env.update(PROBE_AT="3", PROBE_OUT=str(probe))
    return env


TIMES: dict[str, float] = {}


def train(wrapper: Path, args: list[str], name: str, probe: Path | None = None) -> None:
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, str(wrapper), *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=env(probe))
    TIMES[name] = time.monotonic() - t0
    assert r.returncode == 0, (name, r.stdout[-2000:], r.stderr[-4000:])


def losses(run_dir: Path, metrics: str = "metrics.csv") -> dict[int, float]:
    rows = read_metrics(run_dir / metrics)
    steps = [int(r["step"]) for r in rows if r.get("train/loss") is not None]
    assert len(steps) == len(set(steps)), f"a step was logged twice: {steps}"
    return {int(r["step"]): r["train/loss"] for r in rows if r.get("train/loss") is not None}


def kill_and_resume(wrapper: Path, args: list[str], resume: list[str], run_dir: Path, probe: Path) -> None:
    """ZeRO-2 run SIGKILLed (every process of it) once step KILL_AFTER is logged, then resume=auto to step S."""
    t0 = time.monotonic()
    log = run_dir.parent / "zero2-killed.log"
    with open(log, "w") as f:
        p = subprocess.Popen([sys.executable, str(wrapper), *args], cwd=ROOT, env=env(probe), stdout=f,
                             stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while True:
            assert p.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, f"the ZeRO-2 run did not reach step {KILL_AFTER} in 240 s"
            try:
                if max(losses(run_dir), default=0) >= KILL_AFTER:
                    break
            except (FileNotFoundError, AssertionError, KeyError, ValueError):
                pass
            time.sleep(0.05)
        os.killpg(p.pid, signal.SIGKILL)  # the launcher and the rank it started, as a node failure would
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    (run_dir / "metrics-before-kill.csv").write_bytes((run_dir / "metrics.csv").read_bytes())
    TIMES["deepspeed_zero2 (killed)"] = time.monotonic() - t0
    train(wrapper, resume, "deepspeed_zero2 (resume)")


# A Lightning script (not train/run.py: nothing in a run saves after a validate() that follows fit, but a user's
# script may): fit under ZeRO-3, trainer.validate(), then save. Lightning would rebuild an inference-only engine for
# the validate() and the save would fail on its missing checkpoint engine; ZeroStrategy keeps the training engine.
# Its command line: the output folder.
VALIDATE_THEN_SAVE = r'''
import os, sys
import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset
import gpt2
from train.strategies.engines.deepspeed_config import deepspeed_config
from train.strategies.engines.zero import ZeroStrategy, select_cpu_accelerator


class Net(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = gpt2.GPT2LMHeadModel(gpt2.GPT2Config.from_preset("tiny", vocab_size=64, n_layer=1, n_head=2,
                                                                       n_embd=16, n_positions=8))

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch[0], labels=batch[0]).loss

    def validation_step(self, batch, batch_idx):
        self.log("val", self.model(input_ids=batch[0], labels=batch[0]).loss)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


select_cpu_accelerator()
config = deepspeed_config(3, False, micro_batch_size=4, precision="32-true", param_persistence_threshold=0,
                          for_lightning=True)
trainer = L.Trainer(accelerator="cpu", devices=1, strategy=ZeroStrategy(config=config), max_steps=2,
                    enable_progress_bar=False, logger=False, enable_checkpointing=False, default_root_dir=sys.argv[1])
data = DataLoader(TensorDataset(torch.randint(0, 64, (16, 8))), batch_size=4)
trainer.fit(Net(), data, data)
trainer.validate(trainer.lightning_module, data, verbose=False)
trainer.save_checkpoint(os.path.join(sys.argv[1], "checkpoints", "step-2"))
'''


# A bf16-mixed ZeRO-2 checkpoint for tests/test_deepspeed_config.py's conversion test (the runs above are fp32: the
# losses must equal DDP's). One process (DeepSpeed without Lightning) trains the tiny model two steps and saves it
# with engine.save_checkpoint the way Lightning's DeepSpeedStrategy does: tag "checkpoint", the model wrapped as
# `_forward_module` with the network at `.model`; next to it the module's own (bf16) weights as the reference.
# Its command line: the output folder (it writes `checkpoint/` and `reference.safetensors` there).
BF16_WRITER = r'''
import os, sys, torch
os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
import deepspeed
# the shared-memory all-reduce kernel serves CPU inference only; building it is a 2-minute C++ compile. DeepSpeed
# builds it only when its cached table of compatible ops says so (the same switch as train/strategies/deepspeed.py)
deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
import gpt2
from safetensors.torch import save_file
from train.strategies.engines.deepspeed_config import deepspeed_config

class LitLike(torch.nn.Module):  # our LightningModule holds the network as self.model
    def __init__(self, model):
        super().__init__()
        self.model = model

class Wrapper(torch.nn.Module):  # lightning's _LightningModuleWrapperBase
    def __init__(self, module):
        super().__init__()
        self._forward_module = module

    def forward(self, x):
        return self._forward_module.model(x, labels=x).loss

out = sys.argv[1]
deepspeed.init_distributed(dist_backend="gloo")
torch.manual_seed(2)
model = gpt2.GPT2LMHeadModel(gpt2.GPT2Config.from_preset("tiny", vocab_size=320, n_positions=64))
cfg = deepspeed_config(2, micro_batch_size=2, precision="bf16-mixed", gradient_clip_val=1.0, world_size=1)
opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
engine, *_ = deepspeed.initialize(model=Wrapper(LitLike(model)), optimizer=opt, config=cfg)
x = torch.randint(0, 320, (2, 16))
for _ in range(2):
    engine.backward(engine(x)); engine.step()
engine.save_checkpoint(os.path.join(out, "checkpoint"), tag="checkpoint")
ref = {k: v.detach().clone().float() for k, v in model.state_dict().items() if k != "lm_head.weight"}
save_file(ref, os.path.join(out, "reference.safetensors"))
'''

# The single-process scripts of the session (the bf16 writer, the validate-then-save script, train/cli/export.py of the
# ZeRO-1 checkpoint), by name: their tests assert on the outcome, so one failing script fails only its own test.
SCRIPTS: dict[str, subprocess.CompletedProcess] = {}


def script(name: str, argv: list[str], port: bool = False) -> None:
    """Run `python *argv` from the repository root (with MASTER_PORT=<a free port> if `port`); SCRIPTS[name] = the
    outcome."""
    t0 = time.monotonic()
    extra = {"MASTER_PORT": str(free_port())} if port else {}
    SCRIPTS[name] = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300,
                                   env={**env(None), **extra})
    TIMES[name] = time.monotonic() - t0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_runs(d: Path) -> Path:
    """Train every run and run every script described in the module docstring under `d` (two at a time); returns `d`.
    Raises AssertionError (with the run's output) when a run fails; a script's failure is left to its test."""
    corpus, cache = d / "input.txt", d / "cache"
    corpus.write_text(corpus_text(30_000))
    wrapper = d / "run_wrapped.py"
    wrapper.write_text(WRAPPER)

    def lm(name: str, strategy: str, probe: bool = True, steps: int = S):
        return lambda: train(wrapper, overrides(corpus, cache, d / name, strategy, steps), name,
                             probe=d / name / "probe" if probe else None)

    def zero2_killed_and_resumed():
        # the killed run would go on to 2S: only a SIGKILL stops it (the LR schedule depends on optim.decay_steps only)
        z2 = d / "deepspeed_zero2"
        killed = overrides(corpus, cache, z2, "deepspeed_zero2", 2 * S)
        resume = overrides(corpus, cache, z2, "deepspeed_zero2", S, "resume=auto")
        kill_and_resume(wrapper, killed, resume, z2, z2 / "probe")

    jobs: dict[str, Future] = {}  # by name, in the order submitted: a job waits only for one submitted before it

    def cls():
        # fine-tuning under ZeRO-3, started from the ZeRO-3 LM checkpoint (model.init_from reads its model.safetensors)
        jobs["deepspeed_zero3"].result()
        train(wrapper, [
            "task=cls", "strategy=deepspeed_zero3", "strategy.stage3_param_persistence_threshold=0",
            "trainer.devices=2", "trainer.accelerator=cpu", f"run_dir={d / 'cls'}", f"data.cache_dir={cache}",
            f"task.data.cache_dir={cache}",
            f"model.init_from={d / 'deepspeed_zero3' / 'checkpoints' / f'step-{S}'}", "task.data.demo_train_size=32",
            "task.data.demo_val_size=8", "task.data.batch_size=4", "task.data.max_length=16", "trainer.max_steps=5",
            "trainer.val_check_interval=2", "checkpoint.every_n_steps=2", "checkpoint.keep_last=0",
            "trainer.enable_progress_bar=false", "guard=off",
        ], "cls under deepspeed_zero3")

    def export_zero1():
        jobs["deepspeed_zero1"].result()
        script("export zero1", [str(ROOT / "train" / "cli" / "export.py"),
                                str(d / "deepspeed_zero1" / "checkpoints" / f"step-{S}"), str(d / "hf-zero1")])

    def scripts_job(name: str, text: str, port: bool = False):
        def job():  # the script is d/<name>.py, its output folder d/<name>
            (d / name).mkdir()
            (d / f"{name}.py").write_text(text)
            script(name, [str(d / f"{name}.py"), str(d / name)], port)

        return job

    # the longest first; the first launch writes the token cache every LM run reads, the others start after it;
    # the single-process scripts last, to fill the core a launch leaves idle while its rank 1 starts
    first = zero2_killed_and_resumed
    rest = {name: lm(name, name) for name in ("deepspeed_zero3", "deepspeed_zero3_offload")}
    rest.update({"zero2-uninterrupted": lm("zero2-uninterrupted", "deepspeed_zero2"),
                 "deepspeed_zero1": lm("deepspeed_zero1", "deepspeed_zero1"), "ddp": lm("ddp", "ddp"),
                 "cls": cls, "zero2-bf16-mixed": scripts_job("zero2-bf16-mixed", BF16_WRITER, port=True),
                 "validate-then-save": scripts_job("validate-then-save", VALIDATE_THEN_SAVE),
                 "export zero1": export_zero1,
                 # FSDP2 only for launch/plan.py's per-rank bytes (tests/test_deepspeed_cpu.py): probed at step 3
                 "fsdp": lm("fsdp", "fsdp", steps=3)})
    t0 = time.monotonic()
    with ThreadPoolExecutor(CONCURRENT_LAUNCHES) as pool:
        jobs["deepspeed_zero2"] = pool.submit(first)
        while not any(cache.glob("tokens/*/index.json")) and not jobs["deepspeed_zero2"].done():
            time.sleep(0.1)
        for name, job in rest.items():
            jobs[name] = pool.submit(job)
        try:
            for f in jobs.values():
                f.result()  # the first failure's assertion, with the run's output
        except BaseException:
            for f in jobs.values():
                f.cancel()  # the jobs not started yet; the running ones finish
            raise
    print(f"\nDeepSpeed CPU runs (s): {round(time.monotonic() - t0, 1)} wall, per launch",
          {k: round(v, 1) for k, v in TIMES.items()}, "load:", os.getloadavg())
    return d
