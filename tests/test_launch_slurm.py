"""launch/slurm.py: the sbatch script it writes (everywhere), and real jobs on the local Slurm cluster that
.ci/slurm-up.sh starts (skipped where there is no Slurm): a 2-task CPU DDP run, preemption -> requeue -> resume, and
a Hydra sweep sent to Slurm with hydra/launcher=slurm (submitit), and a data preparation as a Slurm array plus an
index step (launch/slurm.py --prepare)."""

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import corpus_text
from launch.slurm import JobSpec, PrepareSpec, SlurmError, main, render_prepare_scripts, render_script, write_script

ROOT = Path(__file__).resolve().parents[1]


def _dry_run(capsys, *argv) -> str:
    i = argv.index("--")
    assert main([*argv[:i], "--dry-run", *argv[i:]]) == 0
    return capsys.readouterr().out


def test_dry_run_gpu_script(capsys, tmp_path):
    out = _dry_run(capsys, "--nodes", "2", "--gpus-per-node", "8", "--cpus-per-task", "12", "--partition", "gpu",
                   "--time", "12:00:00", "--job-name", "xl", "--",
                   "model=gpt2-xl", "strategy=fsdp", "optim.lr=6e-4", f"run_dir={tmp_path}/run")
    for directive in ("--job-name=xl", "--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8", "--cpus-per-task=12",
                      "--time=12:00:00", "--partition=gpu", f"--output={tmp_path}/run/slurm/%j.out",
                      "--open-mode=append", "--signal=USR1@90", "--requeue"):
        assert f"#SBATCH {directive}\n" in out
    srun = next(line for line in out.splitlines() if line.startswith("srun "))
    # the user's overrides verbatim and in order, then what the launcher owns
    assert re.search(r"train/run\.py model=gpt2-xl strategy=fsdp optim\.lr=6e-4 "
                     rf"run_dir={re.escape(str(tmp_path))}/run trainer\.num_nodes=2 trainer\.devices=8 "
                     r'"\$\{resume\[@\]\}" &$', srun), srun
    assert "trainer.accelerator" not in srun
    assert f"if [[ -e {tmp_path}/run/checkpoints/last ]]; then\n    resume=(resume=auto)" in out
    assert "trap " in out and 'kill -USR1 "$srun_pid"' in out  # a USR1 to the batch shell reaches the tasks
    assert not (tmp_path / "run").exists()  # a dry run writes nothing, and says so
    assert "nothing is written or submitted" in out.splitlines()[1] and "resubmit with" not in out


def test_readme_slurm_commands_are_valid(capsys, tmp_path, monkeypatch):
    """Every `python launch/slurm.py ...` line of README (a GPU job, a CPU job with --tasks-per-node) is accepted as
    written: its --dry-run prints a script with the tasks it asks for and writes nothing."""
    monkeypatch.chdir(tmp_path)  # the fresh run dir would be outputs/slurm/... here (a dry run creates nothing)
    lines = [ln.split("#")[0].split() for ln in (ROOT / "README.md").read_text().splitlines()
             if ln.startswith("python launch/slurm.py ")]
    assert len(lines) >= 2 and any("--tasks-per-node" in ln for ln in lines)
    for argv in lines:
        out = _dry_run(capsys, *argv[2:])
        opts = dict(zip(argv[2:argv.index("--")], argv[3:argv.index("--")]))
        tasks = opts.get("--tasks-per-node", opts.get("--gpus-per-node"))
        assert f"#SBATCH --ntasks-per-node={tasks}\n" in out and f"trainer.devices={tasks}" in out
    assert not (tmp_path / "outputs").exists()


def test_cpu_job_uses_tasks_per_node_and_cpu_accelerator(capsys, tmp_path):
    out = _dry_run(capsys, "--gpus-per-node", "0", "--tasks-per-node", "2", "--", "strategy=ddp",
                   f"run_dir={tmp_path}")
    assert "#SBATCH --ntasks-per-node=2\n" in out and "--gpus-per-node" not in out
    assert "trainer.devices=2 trainer.accelerator=cpu" in out


def test_fresh_run_dir_is_timestamped_under_outputs_slurm(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    spec = JobSpec(["model=tiny"], gpus_per_node=1)
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}/\d{2}-\d{2}-\d{2}", "/".join(spec.run_dir.parts[-2:]))
    assert spec.run_dir.parent.parent == tmp_path / "outputs" / "slurm"
    path = write_script(spec)
    assert path == spec.run_dir / "slurm" / "job.sbatch" and path.read_text() == render_script(spec)
    assert path.read_text().splitlines()[1] == f"# Written by launch/slurm.py; resubmit with: sbatch {path}"
    assert path.stat().st_mode & 0o111  # executable


def test_explicit_resume_is_passed_through(tmp_path):
    spec = JobSpec(["resume=/ckpts/step-100", f"run_dir={tmp_path}"], gpus_per_node=1)
    script = render_script(spec)
    assert "resume=/ckpts/step-100" in script and "resume=(resume=auto)" not in script


def test_env_file_is_copied_into_the_script(tmp_path):
    env = tmp_path / "env.sh"
    env.write_text("module load cuda/12.4\nexport NCCL_IB_DISABLE=1\n")
    script = render_script(JobSpec([f"run_dir={tmp_path}"], gpus_per_node=4, env_file=env))
    assert "module load cuda/12.4\nexport NCCL_IB_DISABLE=1\n" in script
    assert script.index("NCCL_IB_DISABLE") < script.index("srun ")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(gpus_per_node=0), "needs --tasks-per-node"),
        (dict(gpus_per_node=4, tasks_per_node=2), "must equal --gpus-per-node"),
        (dict(nodes=0), "--nodes must be a positive integer"),
        (dict(time="90 minutes"), "is not a Slurm time"),
        (dict(job_name="a b"), "--job-name"),
        (dict(overrides=["trainer.devices=4"], gpus_per_node=8), "trainer.devices=4 disagrees"),
        (dict(overrides=["--max-steps", "5"]), "launcher options go before '--'"),
        (dict(env_file=Path("/nonexistent/env.sh")), "does not exist"),
    ],
)
def test_bad_input_is_refused(kwargs, match):
    kwargs.setdefault("overrides", [])
    with pytest.raises(SlurmError, match=re.escape(match) if "--" in match else match):
        JobSpec(**kwargs)


def test_cli_error_is_one_sentence():
    r = subprocess.run([sys.executable, str(ROOT / "launch/slurm.py"), "--gpus-per-node", "0", "--dry-run", "--",
                        "model=tiny"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "needs --tasks-per-node" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("override,match", [
    ("+trainer.max_step=5", r"trainer.max_step is not a setting .*did you mean trainer.max_steps"),  # Hydra's own hint
    ("trainer.max_step=5", r"trainer.max_step is not a setting"),
    ("model=gpt5", r"gpt5"),
    ("optim.lr=fast", r"optim.lr"),
])
def test_training_overrides_are_validated_before_anything_is_written(tmp_path, capsys, override, match):
    """A mistake in the training overrides fails at submission in one sentence (train/run.py --check), not in the
    queued job; nothing is written, not even with --dry-run."""
    run_dir = tmp_path / "run"
    rc = main(["--gpus-per-node", "0", "--tasks-per-node", "2", "--", "model=tiny", override, f"run_dir={run_dir}"])
    err = capsys.readouterr().err
    assert rc == 2 and re.search(match, err), err
    assert err.startswith("error: the training overrides do not compose: ") and err.count("\n") == 1, err
    assert not run_dir.exists()


# ------------------------------------------------------------------------------------------ the real cluster
def _slurm_up() -> bool:
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return False
    try:
        r = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0 and any(s in r.stdout for s in ("idle", "mixed", "alloc"))


needs_slurm = pytest.mark.skipif(not _slurm_up(), reason="no running Slurm cluster (start one with .ci/slurm-up.sh)")


def _job(job_id: str) -> dict[str, str]:
    """`scontrol show job` as a dict (there is no slurmdbd, so no sacct; finished jobs stay MinJobAge seconds)."""
    r = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30)
    return dict(kv.split("=", 1) for kv in r.stdout.split() if "=" in kv)


def _wait(job_id: str, done, timeout: float, what: str) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = _job(job_id)
        if done(info):
            return info
        time.sleep(0.5)
    subprocess.run(["scancel", job_id], timeout=30)
    raise AssertionError(f"job {job_id}: {what} not reached within {timeout:.0f} s (last state: {_job(job_id)})")


def _wait_for_requeue(job_id: str) -> None:
    """Wait until the job has requeued itself (Restarts >= 1), then let it start at once: Slurm holds a requeued job
    ~12 s (pending, Reason=BeginTime, measured on this one-node cluster) before it may run again, time in which the
    test would only wait; what is tested (the job comes back and resumes) is the same either way."""
    info = _wait(job_id, lambda info: (int(info.get("Restarts", 0)) >= 1 and info.get("JobState") != "COMPLETING")
                 or _finished(info), 90, "a requeue")
    if info.get("JobState") == "PENDING":
        subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], capture_output=True, timeout=30)


def _overrides(run_dir: Path, cache: Path, max_steps: int, every: int) -> list[str]:
    corpus = run_dir.parent / "input.txt"  # 300 kB of English made here: the job reads it from the shared tmp folder
    corpus.write_text(corpus_text(300_000), encoding="utf-8")
    return [
        "strategy=ddp", "data=text", f"data.path={corpus}", f"data.cache_dir={cache}", "data.vocab_size=512",
        "data.block_size=32", "data.batch_size=8", "data.val_fraction=0.1",
        "model.n_layer=2", "model.n_head=2", "model.n_embd=64", "model.n_positions=64",
        f"trainer.max_steps={max_steps}", f"trainer.val_check_interval={max_steps // 2}",
        "trainer.limit_val_batches=2", "trainer.log_every_n_steps=5", "trainer.enable_progress_bar=false",
        f"checkpoint.every_n_steps={every}", "optim.lr=3e-3", "optim.warmup_steps=5", "sample.max_new_tokens=8",
        f"run_dir={run_dir}",
    ]


def _submit(overrides: list[str]) -> str:
    r = subprocess.run([sys.executable, str(ROOT / "launch/slurm.py"), "--nodes", "1", "--gpus-per-node", "0",
                        "--tasks-per-node", "2", "--job-name", "gpt2-forge-test", "--", *overrides],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.strip()
    assert job_id.isdigit(), r.stdout
    return job_id


def _finished(info):
    return info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def _read_metrics(path: Path) -> list[dict[str, str]]:
    import csv

    with path.open() as f:
        return list(csv.DictReader(f))


@needs_slurm
@pytest.mark.slow
def test_two_task_cpu_ddp_job_trains_to_completion(tmp_path):
    run_dir = tmp_path / "run"
    job_id = _submit(_overrides(run_dir, tmp_path / "cache", max_steps=20, every=10))
    info = _wait(job_id, _finished, 240, "the end of the job")
    log = (run_dir / "slurm" / f"{job_id}.out").read_text()
    assert info["JobState"] == "COMPLETED", log[-3000:]
    # both ranks joined one gloo process group
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in log and "GLOBAL_RANK: 1, MEMBER: 2/2" in log
    # the run completed: final checkpoint, HF export, metrics up to the last step
    assert (run_dir / "checkpoints" / "last").read_text().strip() == "step-20"
    assert (run_dir / "hf" / "model.safetensors").is_file() and (run_dir / "samples.txt").stat().st_size > 0
    steps = [int(r["step"]) for r in _read_metrics(run_dir / "metrics.csv") if r.get("train/loss")]
    assert max(steps) == 20
    assert (run_dir / "slurm" / "job.sbatch").is_file()


@needs_slurm
@pytest.mark.slow
def test_usr1_requeues_and_the_job_resumes_to_the_final_step(tmp_path):
    run_dir = tmp_path / "run"
    max_steps = 400
    job_id = _submit(_overrides(run_dir, tmp_path / "cache", max_steps=max_steps, every=50))
    last = run_dir / "checkpoints" / "last"
    _wait(job_id, lambda info: info.get("JobState") == "RUNNING" and last.is_file(), 180, "a first checkpoint")
    before = int(last.read_text().strip().split("-")[1])  # newest periodic checkpoint when the signal arrives
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True, timeout=30)
    # the training saves a checkpoint and requeues itself: Restarts goes to 1
    _wait_for_requeue(job_id)
    info = _wait(job_id, _finished, 240, "the end of the requeued job")
    log = (run_dir / "slurm" / f"{job_id}.out").read_text()
    assert int(info["Restarts"]) >= 1 and info["JobState"] == "COMPLETED", log[-3000:]
    starts = re.findall(r"^\[launch\] job \d+ start \(restart (\d+)\)", log, flags=re.M)
    assert starts[:2] == ["0", "1"], starts
    resumed = re.search(r"^\[launch\] resuming: resume=auto \((step-\d+)\)", log, flags=re.M)
    assert resumed, "the requeued job did not resume from a checkpoint"
    resumed_step = int(resumed.group(1).split("-")[1])
    # the signal itself produced a checkpoint: the work since the last periodic one is not lost
    assert before < resumed_step < max_steps, (before, resumed_step)
    # ...in our format, under checkpoints/ (not a Lightning hpc_ckpt_N.ckpt beside it that resume=auto never reads)
    assert not list(run_dir.glob("hpc_ckpt_*")), "the preemption checkpoint went to Lightning's hpc_ckpt path"
    assert last.read_text().strip() == f"step-{max_steps}"
    rows = _read_metrics(run_dir / "metrics.csv")
    steps = [int(r["step"]) for r in rows if r.get("train/loss")]
    assert max(steps) == max_steps and len(steps) == len(set(steps))  # every logged step once: no restart from 0


@needs_slurm
@pytest.mark.slow
def test_hydra_sweep_with_the_slurm_launcher_runs_each_job_on_slurm(tmp_path):
    """`-m hydra/launcher=slurm`: each combination is a SLURM job (submitit) with the same overrides; the launching
    process waits for them and writes the sweep summary."""
    sweep = tmp_path / "sweep"
    r = subprocess.run(
        [sys.executable, str(ROOT / "train" / "run.py"), "-m", "hydra/launcher=slurm", "task=cls", "model=tiny",
         "hydra.launcher.gpus_per_node=0", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1",
         "hydra.launcher.timeout_min=10", "hydra.launcher.setup=['export OMP_NUM_THREADS=1']",
         f"hydra.sweep.dir={sweep}", f"data.cache_dir={tmp_path / 'cache'}", f"task.data.cache_dir={tmp_path / 'cache'}",
         "task.data.demo_train_size=64", "task.data.demo_val_size=16", "task.data.batch_size=8",
         "trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.enable_progress_bar=false",
         "optim.lr=1e-3,2e-3"],
        capture_output=True, text=True, timeout=400, cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    # two SLURM jobs (an array: <id>_0, <id>_1), each with its log and result written by submitit on the node
    results = sorted(p.parent.name for p in (sweep / ".submitit").glob("*/*_result.pkl"))
    assert len(results) == 2 and all(re.fullmatch(r"\d+_[01]", n) for n in results), results
    for job in ("0", "1"):
        assert (sweep / job / "hf" / "model.safetensors").is_file() and (sweep / job / "metrics.csv").is_file()
    rows = _read_metrics(sweep / "summary.csv")
    assert [(r["optim.lr"], r["status"], r["global_step"]) for r in rows] == [
        ("0.001", "COMPLETED", "4"), ("0.002", "COMPLETED", "4")]


# ------------------------------------------------------------------------------- data preparation as an array
def test_prepare_scripts_run_one_share_per_task_then_the_index(tmp_path):
    spec = PrepareSpec(["data=jsonl", "data.path=a.jsonl", f"run_dir={tmp_path}"], array=3, cpus_per_task=4,
                       workdir=tmp_path)
    array, index = render_prepare_scripts(spec)
    assert "#SBATCH --array=0-2" in array and "#SBATCH --cpus-per-task=4" in array
    assert "num_tasks=3 task_index=$SLURM_ARRAY_TASK_ID" in array and '"data.num_proc=${SLURM_CPUS_PER_TASK:-1}"' in array
    assert "--array" not in index and "num_tasks" not in index and "data.path=a.jsonl" in index
    assert f"cd {tmp_path}" in array and "run_dir" not in array.split("prepare.py")[1]
    with pytest.raises(SlurmError, match="set by the launcher"):
        PrepareSpec(["data=jsonl", "task_index=1"], array=2)
    with pytest.raises(SlurmError, match="give the data"):
        PrepareSpec([], array=2)
    assert main(["--array", "2", "--dry-run", "--", "data=jsonl"]) == 2  # --array without --prepare
    dry = render_prepare_scripts(spec, dry_run=True)
    assert all("nothing written or submitted" in s.splitlines()[1] for s in dry) and "Written by" in array


@needs_slurm
@pytest.mark.slow
def test_two_array_tasks_and_the_index_step_equal_one_process(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    docs = [f"Document {i}: it's line {i} of the corpus, naïve café {i * 31}.\n" * (5 + i % 40) for i in range(240)]
    for k in range(3):  # three files (units) for the 2 tasks, and small shards so each unit has several
        (corpus / f"{k}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[80 * k : 80 * k + 80]))
    from gpt2.tokenizer import train_tokenizer

    tok = train_tokenizer(iter(docs), vocab_size=400)
    tok.save_pretrained(str(tmp_path / "tok"))
    data = ["data=jsonl", f"data.path={corpus}", f"data.tokenizer={tmp_path / 'tok'}", "data.shard_size_mb=0.02"]
    r = subprocess.run(
        [sys.executable, str(ROOT / "launch/slurm.py"), "--prepare", "--array", "2", "--cpus-per-task", "1",
         "--job-name", "gpt2-forge-test-prepare", "--", *data, f"data.cache_dir={tmp_path / 'cache'}",
         f"run_dir={tmp_path / 'run'}"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    index_job = r.stdout.strip()
    info = _wait(index_job, _finished, 300, "the end of the index job")
    logs = {p.name: p.read_text() for p in (tmp_path / "run" / "slurm").glob("*.out")}
    assert info["JobState"] == "COMPLETED", logs
    tasks = [t for name, t in logs.items() if name.startswith("prepare_")]
    assert len(tasks) == 2 and all("shard(s)" in t and "task " in t and " of 2 done" in t for t in tasks)
    # each task encoded shards of its own (none left for the index step) ...
    assert all(int(t.split(" shard(s)")[0].split()[-1]) > 0 for t in tasks)
    (index_log,) = [t for name, t in logs.items() if name.startswith("index_")]
    assert "  0 shard(s)" in index_log and "tokens written to" in index_log
    # ... and the folder is, shard for shard, what one process writes
    from data_pipelines import DataConfig
    from data_pipelines.prepare import prepare

    (root,) = (tmp_path / "cache" / "tokens").glob("*")
    one = prepare(DataConfig(source="jsonl", path=str(corpus), tokenizer=str(tmp_path / "tok"), shard_size_mb=0.02,
                             cache_dir=str(tmp_path / "one")))
    shards = lambda d: {f.name: f.read_bytes() for f in sorted((d / "shards").glob("*.bin"))}  # noqa: E731
    assert len(shards(one)) > 3 and shards(root) == shards(one)
    a, b = (json.loads((d / "index.json").read_text()) for d in (root, one))
    assert a["splits"] == b["splits"] and a["num_tokens"] == b["num_tokens"]


@needs_slurm
@pytest.mark.slow
def test_two_task_cpu_zero2_job_is_requeued_by_usr1_and_completes(tmp_path):
    """strategy=deepspeed_zero2 as a 2-task CPU job (DeepSpeed's CPU accelerator over gloo, ranks from srun): a USR1
    mid-run saves a ZeRO checkpoint and requeues the job, which resumes from it and trains to the final step."""
    pytest.importorskip("deepspeed")
    from helpers import corpus_text

    # 300 steps, checkpoints every 50: on a quiet machine the tiny job runs ~25 steps/s, so the USR1 sent after the
    # first checkpoint must still find the job running (60 steps finished before the signal in a quiet CI run)
    corpus, run_dir, max_steps = tmp_path / "input.txt", tmp_path / "run", 300
    corpus.write_text(corpus_text(30_000))
    overrides = [o for o in _overrides(run_dir, tmp_path / "cache", max_steps=max_steps, every=50)
                 if not o.startswith(("strategy=", "data.path=", "model.", "trainer.val_check_interval"))]
    job_id = _submit(["strategy=deepspeed_zero2", f"data.path={corpus}", "model.n_layer=1", "model.n_head=2",
                      "model.n_embd=32", "model.n_positions=32", "trainer.val_check_interval=150",
                      "trainer.accumulate_grad_batches=2", *overrides])
    last = run_dir / "checkpoints" / "last"
    _wait(job_id, lambda info: info.get("JobState") == "RUNNING" and last.is_file(), 240, "a first checkpoint")
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True, timeout=30)
    _wait_for_requeue(job_id)
    info = _wait(job_id, _finished, 600, "the end of the requeued job")
    log = (run_dir / "slurm" / f"{job_id}.out").read_text()
    assert int(info["Restarts"]) >= 1 and info["JobState"] == "COMPLETED", log[-3000:]
    assert "initializing deepspeed distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in log  # both ranks, one ZeRO group
    resumed = re.search(r"^\[launch\] resuming: resume=auto \((step-\d+)\)", log, flags=re.M)
    assert resumed, "the requeued job did not resume from a checkpoint"
    step = int(resumed.group(1).split("-")[1])
    assert 0 < step < max_steps
    assert (run_dir / "checkpoints" / resumed.group(1) / "checkpoint").is_dir()  # DeepSpeed's shards, resumed from
    assert last.read_text().strip() == f"step-{max_steps}" and (run_dir / "hf" / "model.safetensors").is_file()
    steps = [int(r["step"]) for r in _read_metrics(run_dir / "metrics.csv") if r.get("train/loss")]
    assert max(steps) == max_steps and len(steps) == len(set(steps))  # every logged step once: no restart from 0
