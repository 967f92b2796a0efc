"""Real multi-process training on CPU (gloo): `ddp` and `fsdp` (FSDP2) with 2 processes train exactly like 1 process
with the same global batch, resume from their own checkpoints like an uninterrupted run, FSDP's sharded checkpoints
export to an HF folder that transformers loads, and a 2-node x 1-process job over loopback trains like them too.

Every run is `python train/run.py ...` in a subprocess (Lightning spawns the second local rank itself). The reference
is 1 process x micro-batch 8; the distributed runs use 2 ranks x micro-batch 4: the sampler gives rank r the r-th
half of the same global batch (data_pipelines/sampler.py), gradients are averaged over ranks, and the logged loss is
the mean over ranks, so the numbers must agree.

Tolerance: rtol 1e-4 on every logged loss and atol 1e-5 on the final weights. The all-reduce / reduce-scatter sums
the two halves' gradients in another order than one process's batched matmul does, so the results differ in the last
float32 bits (measured: ~1e-7 relative); a wrong sample, rank, optimizer state or LR step moves the loss by > 1e-3.
Dropout is 0, so no random masks are involved. The chain "N steps, stop, resume=auto to 2N" is compared with the
uninterrupted reference: a resume that lost the data position, the optimizer moments or the schedule fails it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import corpus_text
from train.callbacks.loggers import read_metrics

ROOT = Path(__file__).resolve().parents[1]
N = 8  # steps before the stop; the runs continue to 2N
RTOL, ATOL_W = 1e-4, 1e-5

pytestmark = pytest.mark.slow


def overrides(corpus: Path, cache: Path, run_dir: Path, batch: int, max_steps: int, *extra: str) -> list[str]:
    return [
        "data=text", f"data.path={corpus}", f"data.cache_dir={cache}", "data.vocab_size=320",
        "data.block_size=32", f"data.batch_size={batch}", "data.val_fraction=0.1",
        "model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.n_positions=32", "model.dropout=0.0",
        f"trainer.max_steps={max_steps}", "trainer.accelerator=cpu", "trainer.limit_val_batches=0",
        "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false",
        f"checkpoint.every_n_steps={N}", "checkpoint.keep_last=0",
        # the schedule must not depend on where a run stops: decay over 2N steps in every run
        "optim.warmup_steps=2", f"optim.decay_steps={2 * N}", "sample.max_new_tokens=2",
        f"run_dir={run_dir}", *extra,  # the default NaN/spike guard stays on: it must work under ddp and fsdp
    ]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC_"))}
    env.update(OMP_NUM_THREADS="1", HYDRA_FULL_ERROR="1", **extra)
    for k in ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "RANK"):
        if k not in extra:
            env.pop(k, None)
    return env


def run(args: list[str], timeout: int = 240, script: Path = ROOT / "train" / "run.py", **env: str
        ) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, str(script), *args], cwd=ROOT, capture_output=True,
                       text=True, timeout=timeout, env=_env(**env))
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    return r


def losses(run_dir: Path) -> dict[int, float]:
    rows = read_metrics(run_dir / "metrics.csv")
    steps = [int(r["step"]) for r in rows if r.get("train/loss") is not None]
    assert len(steps) == len(set(steps)), f"a step was logged twice: {steps}"
    return {int(r["step"]): r["train/loss"] for r in rows if r.get("train/loss") is not None}


def assert_losses_match(got: dict[int, float], ref: dict[int, float], steps: range) -> None:
    for s in steps:
        assert s in got, f"step {s} missing from {sorted(got)}"
        assert abs(got[s] - ref[s]) <= RTOL * abs(ref[s]), (s, got[s], ref[s])


def weights(step_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(step_dir / "model.safetensors"))


def assert_weights_match(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=ATOL_W, msg=k)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The corpus, and the 1-process reference run of 2N steps (which also fills the token cache)."""
    d = tmp_path_factory.mktemp("dist")
    corpus = d / "input.txt"
    corpus.write_text(corpus_text(60_000))
    cache, ref = d / "cache", d / "ref"
    run(overrides(corpus, cache, ref, 8, 2 * N))
    return d, corpus, cache, ref


# FSDP's second half also turns on CPU offload (CPUOffloadPolicy) and activation checkpointing: they change where
# tensors live and when blocks are recomputed, not the numbers, and the sharded state must load into that model too
# (restarting with less memory after an OOM is what they are for).
RESUME_EXTRA = {"ddp": [], "fsdp": ["strategy.offload=true", "trainer.activation_checkpointing=true"]}


def _stop_and_resume(setup, strategy: str) -> Path:
    d, corpus, cache, _ = setup
    run_dir = d / strategy
    two = ["trainer.devices=2", f"strategy={strategy}"]
    run(overrides(corpus, cache, run_dir, 4, N, *two))
    assert (run_dir / "checkpoints" / "last").read_text().strip() == f"step-{N}"
    run(overrides(corpus, cache, run_dir, 4, 2 * N, *two, *RESUME_EXTRA[strategy], "resume=auto"))
    return run_dir


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one_and_resume_matches_uninterrupted(setup, strategy):
    ref = setup[3]
    run_dir = _stop_and_resume(setup, strategy)
    got, want = losses(run_dir), losses(ref)
    assert_losses_match(got, want, range(1, N + 1))  # 2 ranks x batch 4 == 1 rank x batch 8
    assert_losses_match(got, want, range(N + 1, 2 * N + 1))  # resumed from step N == never stopped
    assert want[2 * N] < want[1] - 0.3  # and it learned something
    for step in (N, 2 * N):  # the consolidated weights (FSDP: gathered from the shards on rank 0) agree too
        assert_weights_match(run_dir / "checkpoints" / f"step-{step}", ref / "checkpoints" / f"step-{step}")
    if strategy == "fsdp":
        step_dir = run_dir / "checkpoints" / f"step-{N}"
        assert (step_dir / "sharded" / ".metadata").is_file()
        assert len(list((step_dir / "sharded").glob("*.distcp"))) == 2  # one shard file per rank
        assert "offload: true" in (run_dir / "config.yaml").read_text()  # the resumed half ran with the options
    assert (run_dir / "hf" / "model.safetensors").is_file()  # the final export ran (FSDP: gathered first)


def test_fsdp_checkpoint_exports_to_transformers_with_equal_logits(setup, tmp_path):
    transformers = pytest.importorskip("transformers")
    d = setup[0]
    step_dir = d / "fsdp" / "checkpoints" / f"step-{N}"
    if not step_dir.is_dir():  # run alone: make the FSDP checkpoint here
        _stop_and_resume(setup, "fsdp")
    out = tmp_path / "hf"
    r = subprocess.run([sys.executable, str(ROOT / "train" / "cli" / "export.py"), str(step_dir), str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120, env=_env())
    assert r.returncode == 0, r.stderr[-2000:]
    from train.tasks.model import load_checkpoint_model

    ours = load_checkpoint_model(step_dir).eval()
    theirs = transformers.GPT2LMHeadModel.from_pretrained(str(out)).eval()
    ids = torch.randint(0, ours.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(input_ids=ids).logits, theirs(input_ids=ids).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_over_loopback_train_like_one_node(setup):
    """2 nodes x 1 process: two launches of train/run.py rendezvous through MASTER_ADDR/MASTER_PORT/NODE_RANK
    (Lightning's LightningEnvironment; SLURM and torchrun set the same through their own environments)."""
    d, corpus, cache, ref = setup
    run_dir = d / "two-nodes"
    args = overrides(corpus, cache, run_dir, 4, N, "strategy=ddp", "trainer.devices=1", "trainer.num_nodes=2")
    port = str(_free_port())
    procs = []
    for node in (0, 1):
        env = _env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, NODE_RANK=str(node), WORLD_SIZE="2")
        log = open(d / f"node{node}.log", "w")
        procs.append(subprocess.Popen([sys.executable, str(ROOT / "train" / "run.py"), *args], cwd=ROOT, env=env,
                                      stdout=log, stderr=subprocess.STDOUT))
    try:
        codes = [p.wait(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    logs = [(d / f"node{n}.log").read_text() for n in (0, 1)]
    assert codes == [0, 0], [lg[-2000:] for lg in logs]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in logs[1]  # node 1 joined as the second member of one process group
    assert_losses_match(losses(run_dir), losses(ref), range(1, N + 1))
    if (d / "ddp" / "metrics.csv").is_file():  # and like the single-node 2-process run
        assert_losses_match(losses(run_dir), losses(d / "ddp"), range(1, N + 1))


def test_sigterm_saves_a_checkpoint_and_stops_cleanly(setup):
    """Outside SLURM, SIGTERM (any scheduler's "stop now") -> a checkpoint at the next step, exit 143, no export."""
    d, corpus, cache, ref = setup
    run_dir = d / "sigterm"
    args = overrides(corpus, cache, run_dir, 8, 100_000, "checkpoint.every_n_steps=1000")
    p = subprocess.Popen([sys.executable, str(ROOT / "train" / "run.py"), *args],
                         cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and p.poll() is None:
        try:
            if len(losses(run_dir)) >= 3:
                break
        except (FileNotFoundError, AssertionError):
            pass
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 143, err[-3000:]
    saved = (run_dir / "checkpoints" / "last").read_text().strip()
    step = int(saved.split("-")[1])
    assert step >= 3 and "SIGTERM" in err and f"step {step}" in err
    assert not (run_dir / "hf").exists()  # not done: no export
    # the printed command continues this run with its own overrides (its trainer.max_steps among them)
    resume = next(line for line in err.splitlines() if line.startswith("resume: "))
    assert "resume=auto" in resume and "trainer.max_steps=100000" in resume and str(run_dir) in resume, resume
    assert max(losses(run_dir)) == step


def test_fsdp_task_best_checkpoint_holds_the_full_model(setup, tmp_path):
    """A fine-tuning run under FSDP2: checkpoints/best gathers the shards, so it holds every weight at full shape,
    equal to the consolidated step checkpoint of the step it was taken at."""
    import json

    import gpt2

    d, corpus, cache, ref = setup
    run_dir = tmp_path / "cls"
    # the demo task data, encoded with the reference LM run's small BPE (data.* would choose task data: refused)
    run(["task=cls", "strategy=fsdp", "trainer.devices=2", "trainer.accelerator=cpu", f"run_dir={run_dir}",
         f"data.tokenizer={ref / 'tokenizer'}", f"data.cache_dir={cache}",
         f"task.data.cache_dir={cache}", "task.data.demo_train_size=64", "task.data.demo_val_size=16",
         "task.data.batch_size=8", "model.n_layer=2", "model.n_head=2", "model.n_embd=32", "trainer.max_steps=6",
         "trainer.val_check_interval=3", "checkpoint.every_n_steps=3", "checkpoint.keep_last=0",
         "trainer.enable_progress_bar=false", "guard=off"])
    best_dir = run_dir / "checkpoints" / "best"
    meta = json.loads((best_dir / "meta.json").read_text())
    assert meta["task"] == "GPT2ForSequenceClassification" and meta["global_step"] in (3, 6)
    best = load_file(str(best_dir / "model.safetensors"))
    config = gpt2.GPT2Config.from_dict(json.loads((best_dir / "config.json").read_text()))
    want = {k: tuple(v.shape) for k, v in gpt2.GPT2ForSequenceClassification(config).state_dict().items()}
    assert {k: tuple(v.shape) for k, v in best.items()} == {k: s for k, s in want.items() if k in best}
    assert "score.weight" in best and "transformer.wte.weight" in best
    step = load_file(str(run_dir / "checkpoints" / f"step-{meta['global_step']}" / "model.safetensors"))
    for k, v in best.items():
        torch.testing.assert_close(v, step[k], rtol=0, atol=0, msg=k)


# train/run.py with the loss of one optimizer step multiplied (a test wrapper, not product code). It keeps
# sys.argv[0], so the second rank that Lightning launches with the same command line gets the fault too.
SPIKE_WRAPPER = r'''
import os, runpy, sys
from train.module import GPT2LitModule
at, factor = int(os.environ["SPIKE_AT"]), float(os.environ["SPIKE_FACTOR"])
orig = GPT2LitModule.training_step

def training_step(self, batch, batch_idx):
    loss = orig(self, batch, batch_idx)
    return loss * factor if self.trainer.global_step + 1 == at else loss

GPT2LitModule.training_step = training_step
runpy.run_path(os.path.join(os.environ["FORGE_ROOT"], "train", "run.py"), run_name="__main__")
'''


def test_fsdp_spike_rollback_matches_one_process(setup, tmp_path):
    """A loss spike at step 12 rolls back to checkpoints/step-8 under FSDP2 exactly as in one process: the model and
    optimizer shards are reloaded (not just the LR schedule), so every later loss matches the 1-process run."""
    d, corpus, cache, _ = setup
    wrapper = tmp_path / "spiking_run.py"
    wrapper.write_text(SPIKE_WRAPPER)
    env = {"SPIKE_AT": "12", "SPIKE_FACTOR": "10", "FORGE_ROOT": str(ROOT)}
    guard = ["guard.warmup_steps=4", "guard.spike_factor=3.0"]
    one, two = tmp_path / "one", tmp_path / "fsdp"
    run(overrides(corpus, cache, one, 8, 2 * N, *guard), script=wrapper, **env)
    run(overrides(corpus, cache, two, 4, 2 * N, *guard, "trainer.devices=2", "strategy=fsdp"), script=wrapper, **env)
    for run_dir in (one, two):
        rows = read_metrics(run_dir / "metrics.csv")
        assert next(r for r in rows if r["step"] == 12)["guard/rollbacks"] == 1, run_dir
    assert_losses_match(losses(two), losses(one), range(1, 2 * N + 1))
    assert_weights_match(two / "checkpoints" / f"step-{2 * N}", one / "checkpoints" / f"step-{2 * N}")
