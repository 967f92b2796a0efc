"""Surviving a dead worker (CPU, 2 processes, gloo, model=tiny).

- torchrun --max-restarts 1 ... resume=auto with one worker SIGKILLed mid-run: torchrun restarts the workers, they
  continue from the newest checkpoint, and the command exits 0 with every step's loss and learning rate equal to an
  uninterrupted torchrun run of the same command (exactly: metrics.csv's strings), for ddp, fsdp and deepspeed_zero2.
  The killed worker is rank 1 under ddp and ZeRO-2 and rank 0 (the one writing metrics.csv and the consolidated
  weights) under fsdp.
- python train/run.py strategy=ddp trainer.devices=2 (Lightning's launcher, no restarts) with rank 1 SIGKILLed ends
  within seconds, its last two lines naming the dead rank and signal and giving the command that resumes the run.

Each victim runs next to its uninterrupted reference (two jobs at once: most of a launch is start-up on one core).
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import compose_config, corpus_text
from train.callbacks.loggers import read_metrics

ROOT = Path(__file__).resolve().parents[1]
N, EVERY, KILL_AFTER = 24, 4, 8  # steps, checkpoint interval, the checkpoint whose appearance triggers the kill
KILLED_RANK = {"ddp": 1, "fsdp": 0, "deepspeed_zero2": 1}


def overrides(corpus: Path, cache: Path, run_dir: Path, strategy: str, *extra: str) -> list[str]:
    return [
        "model=tiny", "data=text", f"data.path={corpus}", f"data.cache_dir={cache}", "data.vocab_size=512",
        "data.block_size=32", "data.batch_size=4", "data.val_fraction=0.1", "model.n_positions=32",
        "model.dropout=0.1",  # dropout on: the restarted workers must draw the same masks
        f"strategy={strategy}", "trainer.devices=2", "trainer.accelerator=cpu", f"trainer.max_steps={N}",
        "trainer.val_check_interval=1000", "trainer.limit_val_batches=0", "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false", f"checkpoint.every_n_steps={EVERY}", "checkpoint.keep_last=2",
        "sample.max_new_tokens=2", "sample.prompts=[To]", f"run_dir={run_dir}", *extra,
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: list[str], log: Path, max_restarts: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--max-restarts",
           str(max_restarts), "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "train/run.py", *args]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def last_step(run_dir: Path) -> int:
    try:
        return int((run_dir / "checkpoints" / "last").read_text().strip().split("-")[1])
    except (FileNotFoundError, IndexError, ValueError):
        return -1


def worker_of_rank(agent: int, rank: int) -> int:
    """The pid of torchrun's worker with RANK=rank (a child of the agent process)."""
    for pid in Path(f"/proc/{agent}/task/{agent}/children").read_text().split():
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in env:
            return int(pid)
    raise AssertionError(f"no worker with RANK={rank} under torchrun pid {agent}")


def wait_for(proc: subprocess.Popen, ready, log: Path, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"exited before {what}:\n" + log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout:.0f} s"
        time.sleep(0.01)


def rows(run_dir: Path) -> list[tuple]:
    return [(r["step"], r["train/loss"], r["lr"]) for r in read_metrics(run_dir / "metrics.csv")
            if r["train/loss"] is not None]


# A torchrun worker forming its group as the strategies do; in the first attempt rank 1 dies once the group exists, in
# the second it arrives 8 s after rank 0, as a restarted training job's rank can (start-up and data on a busy machine).
# With torch's own env:// init that second attempt fails in gloo's connectFullMesh ("Connection refused") or hangs
# (rank 0 reads rank 1's address from the dead attempt; gloo's connect retries wait ~4 s): not run here, since a hang
# would cost the suite its timeout. In the first attempt rank 0 then waits for torchrun to stop it: were it to run into
# its dead peer, it could exit (code 1) before the agent's next poll on a busy machine, and the agent's log would name
# that failure instead of rank 1's SIGKILL (torch/distributed/elastic/multiprocessing/api.py, `_poll`: the first
# failure by a whole-second timestamp, ties to the lower local rank).
WORKER = r"""
import os, signal, time
from datetime import timedelta
import torch, torch.distributed as dist
from train.strategies.engines.rendezvous import init_attempt_process_group
attempt, rank = int(os.environ["TORCHELASTIC_RESTART_COUNT"]), int(os.environ["RANK"])
if attempt == 1 and rank == 1:
    time.sleep(8)
init_attempt_process_group("gloo", timedelta(seconds=60))
t = torch.ones(1)
dist.all_reduce(t)
if attempt == 0 and rank == 1:
    os.kill(os.getpid(), signal.SIGKILL)
if attempt == 0:
    time.sleep(120)  # rank 0: torchrun stops it (SIGTERM) once it sees rank 1 dead
dist.all_reduce(t)
print(f"attempt {attempt} rank {rank} all_reduce {t.item():.0f}", flush=True)
"""


def test_restarted_workers_form_their_group_on_this_attempts_keys(tmp_path):
    """torchrun's static rendezvous keeps the dead attempt's gloo addresses in its store
    (`default_pg/0//cpu//0/<rank>`); the restarted workers, arriving seconds apart, form their group on keys of their
    own attempt and all-reduce."""
    (tmp_path / "worker.py").write_text(WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--max-restarts", "1",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(tmp_path / "worker.py")]
    r = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True,
                       timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "exitcode: -9" in r.stderr  # the first attempt's rank 1 died, torchrun restarted both
    assert "attempt 1 rank 0 all_reduce 4" in r.stdout and "attempt 1 rank 1 all_reduce 4" in r.stdout


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A small corpus, tokenized once so the concurrent runs below only read the cache."""
    from data_pipelines import LMDataModule

    d = tmp_path_factory.mktemp("elastic")
    corpus, cache = d / "input.txt", d / "cache"
    corpus.write_text(corpus_text(60_000))
    LMDataModule(compose_config(overrides(corpus, cache, d / "x", "ddp")).data).prepare_data()
    return d, corpus, cache


@pytest.mark.slow
@pytest.mark.parametrize("strategy", list(KILLED_RANK))
def test_torchrun_restart_after_sigkill_equals_uninterrupted(data, strategy):
    d, corpus, cache = data
    ref_dir, run_dir = d / f"{strategy}-ref", d / f"{strategy}-victim"
    ref = torchrun(overrides(corpus, cache, ref_dir, strategy, "resume=auto"), d / f"{strategy}-ref.log", 0)
    log = d / f"{strategy}-victim.log"
    victim = torchrun(overrides(corpus, cache, run_dir, strategy, "resume=auto"), log, 1)
    try:
        wait_for(victim, lambda: last_step(run_dir) >= KILL_AFTER, log, f"a step-{KILL_AFTER} checkpoint")
        os.kill(worker_of_rank(victim.pid, KILLED_RANK[strategy]), signal.SIGKILL)
        killed_at = last_step(run_dir)
        assert victim.wait(timeout=300) == 0, log.read_text()[-3000:]
        assert ref.wait(timeout=300) == 0, (d / f"{strategy}-ref.log").read_text()[-3000:]
    finally:
        for p in (ref, victim):
            if p.poll() is None:
                p.kill()
    text = log.read_text()
    assert killed_at < N, "the worker must die mid-run"
    assert "exitcode: -9" in text  # torchrun saw the SIGKILL and restarted the group ...
    resumed = f"Restoring states from the checkpoint path at {run_dir / 'checkpoints'}/step-"
    assert resumed in text  # ... which continued from a checkpoint, not from step 0
    assert "starting fresh" in text  # (the first attempt found none: resume=auto started it fresh)
    got, want = rows(run_dir), rows(ref_dir)
    assert [r[0] for r in got] == list(range(1, N + 1))  # every step logged exactly once
    assert got == want  # losses and lr before the kill and after the restart equal the uninterrupted run's


@pytest.mark.slow
def test_rank_killed_without_restart_names_it_and_the_resume_command(data):
    d, corpus, cache = data
    run_dir, log = d / "no-restart", d / "no-restart.log"
    args = overrides(corpus, cache, run_dir, "ddp", "trainer.max_steps=2000")
    proc = subprocess.Popen([sys.executable, "train/run.py", *args], cwd=ROOT, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT)
    try:
        wait_for(proc, lambda: last_step(run_dir) >= KILL_AFTER, log, f"a step-{KILL_AFTER} checkpoint")
        child = int(Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()[0])  # local rank 1
        os.kill(child, signal.SIGKILL)
        t_kill = time.monotonic()
        proc.wait(timeout=120)
        took = time.monotonic() - t_kill
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1
    assert took < 30, f"the job took {took:.0f} s to end after its rank 1 died"
    stopped, resume = log.read_text().rstrip().splitlines()[-2:]
    newest = last_step(run_dir)
    assert stopped.startswith(f"stopped: rank 1 (pid {child}) was killed by SIGKILL at step "), stopped
    assert stopped.endswith(f"(newest checkpoint: step-{newest})"), stopped
    # the command as printed, composed: this run's own overrides, continued from its newest checkpoint
    cmd = shlex.split(resume.removeprefix("resume: "))
    py = os.path.relpath(sys.executable, ROOT)  # the interpreter that ran it, as typed from the repository root
    assert cmd[:2] == [sys.executable if py.startswith("..") else py, "train/run.py"], resume
    again = compose_config(cmd[2:])
    assert (again.run_dir, again.resume, again.strategy.name, again.trainer.max_steps) == (
        str(run_dir), "auto", "ddp", 2000)
