"""Submit `train/run.py` to SLURM: write an sbatch script into the run directory, submit it, print the job id.

    python launch/slurm.py [--nodes N] [--gpus-per-node G] [--tasks-per-node T] [--cpus-per-task C]
                           [--partition P] [--time HH:MM:SS] [--job-name NAME] [--env-file FILE] [--dry-run]
                           -- <train/run.py overrides>

* One task per GPU (`--ntasks-per-node` = G; Lightning reads its rank, world size and the rendezvous address from
  SLURM's variables through `SLURMEnvironment`), launched by `srun`; the overrides go through verbatim, followed by
  `trainer.num_nodes=N trainer.devices=G` (and `trainer.accelerator=cpu` for a CPU job: `--gpus-per-node 0` with
  `--tasks-per-node T` processes per node).
* The run directory is the `run_dir=` override, or a fresh `outputs/slurm/<date>/<time>`; the script, Slurm's log
  (`slurm/<jobid>.out`) and the run itself live there. The command gets `run_dir=<it> resume=auto`, so a requeued
  job continues from the newest complete checkpoint instead of starting over.
* Preemption: `--signal=USR1@90` asks Slurm to send SIGUSR1 to the training processes 90 s before the time limit;
  `--requeue` lets the job be requeued; `--open-mode=append` keeps one log across restarts. The training side
  saves a checkpoint and runs `scontrol requeue $SLURM_JOB_ID`. A USR1 sent to the batch shell only
  (`scancel --signal=USR1 --batch <id>`) is forwarded to the srun step by the script.
* The environment (modules, conda/venv activation, NCCL variables, ...) is set in ONE place: `launch/env.sh` if it
  exists, or `--env-file FILE`; it is copied into the script so the job does not depend on the file staying put.

Data preparation across nodes (`data_pipelines/prepare.py` as a Slurm array, then an index step):

    python launch/slurm.py --prepare --array K [--cpus-per-task C] [--partition P] [--time HH:MM:SS] [--dry-run]
                           -- data=<option> [data.key=value ...] [run_dir=DIR]

* `prepare.sbatch`: an array of K one-task jobs; task i runs `prepare.py ... num_tasks=K task_index=i` with
  `data.num_proc` = the task's CPUs (`--cpus-per-task`, unless data.num_proc is given) and encodes its share of the
  shards (data_pipelines/shards.py) into `data.cache_dir`, which must be on storage every node sees.
* `index.sbatch`: submitted with `--dependency=afterany:<array job>`; runs `prepare.py ...` once more, which encodes
  whatever a failed task left missing and writes index.json. Its job id is what the launcher prints: when it has
  completed, the token folder is ready (`data=tokens data.path=<folder it printed>` or the same `data=...` overrides).
* Logs: `<run_dir>/slurm/prepare_%A_%a.out` and `index_<jobid>.out`.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from data_pipelines.cli import ArgumentParser

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ENV_FILE = ROOT / "launch" / "env.sh"
TIME_RE = re.compile(r"^(\d+-)?\d{1,3}:\d{2}(:\d{2})?$|^\d+$")  # sbatch --time: MM, HH:MM:SS, D-HH:MM[:SS]
REQUEUE_SIGNAL_LEAD_S = 90  # seconds before the time limit: enough to write a GPT-2 XL checkpoint to shared storage


class SlurmError(ValueError):
    """Bad launcher input; the message names the problem and the fix."""


def _check_job_options(spec) -> None:
    """The sbatch options a training job and a preparation array share."""
    if spec.cpus_per_task is not None and not (isinstance(spec.cpus_per_task, int) and spec.cpus_per_task >= 1):
        raise SlurmError(f"--cpus-per-task must be a positive integer, got {spec.cpus_per_task!r}.")
    if spec.time is not None and not TIME_RE.match(spec.time):
        raise SlurmError(f"--time {spec.time!r} is not a Slurm time; write HH:MM:SS (or D-HH:MM:SS).")
    if not re.fullmatch(r"[A-Za-z0-9._-]+", spec.job_name):
        raise SlurmError(f"--job-name {spec.job_name!r} may only contain letters, digits, '.', '_' and '-'.")
    if spec.env_file is not None and not Path(spec.env_file).is_file():
        raise SlurmError(f"--env-file {spec.env_file} does not exist; point it at a shell file to source.")


def _resource_directives(spec) -> list[str]:
    """--cpus-per-task / --time / --partition, where given."""
    d = []
    if spec.cpus_per_task:
        d.append(f"--cpus-per-task={spec.cpus_per_task}")
    if spec.time:
        d.append(f"--time={spec.time}")
    if spec.partition:
        d.append(f"--partition={spec.partition}")
    return d


def _override_keys(overrides: list[str], program: str) -> dict[str, str]:
    """{key: value} of `key=value` overrides (Hydra's +/~ prefixes dropped); an option after '--' is refused."""
    keys: dict[str, str] = {}
    for o in overrides:
        if o.startswith("-"):
            raise SlurmError(f"{o!r} is not a {program} override; launcher options go before '--', "
                             f"overrides (key=value) after it.")
        key, sep, val = o.lstrip("+~").partition("=")
        if sep:
            keys[key] = val
    return keys


@dataclass
class JobSpec:
    overrides: list[str]
    nodes: int = 1
    gpus_per_node: int = 1
    tasks_per_node: int | None = None  # None -> gpus_per_node (one task per GPU); required for CPU jobs
    cpus_per_task: int | None = None
    partition: str | None = None
    time: str | None = None
    job_name: str = "gpt2-forge"
    env_file: Path | None = None
    extra_sbatch: list[str] = field(default_factory=list)  # more "#SBATCH" options, e.g. "--account=abc"
    python: str = sys.executable
    run_dir: Path = field(init=False)
    train_overrides: list[str] = field(init=False)  # what srun passes to train/run.py (+ resume=auto, see below)
    auto_resume: bool = field(init=False)

    def __post_init__(self):
        for name in ("nodes", "gpus_per_node"):
            v = getattr(self, name)
            if not (isinstance(v, int) and v >= (1 if name == "nodes" else 0)):
                raise SlurmError(f"--{name.replace('_', '-')} must be a {'positive' if name == 'nodes' else 'non-negative'} integer, got {v!r}.")
        if self.tasks_per_node is None:
            if self.gpus_per_node == 0:
                raise SlurmError("a CPU job (--gpus-per-node 0) needs --tasks-per-node: the number of training "
                                 "processes per node.")
            self.tasks_per_node = self.gpus_per_node
        if not (isinstance(self.tasks_per_node, int) and self.tasks_per_node >= 1):
            raise SlurmError(f"--tasks-per-node must be a positive integer, got {self.tasks_per_node!r}.")
        if self.gpus_per_node and self.tasks_per_node != self.gpus_per_node:
            raise SlurmError(f"--tasks-per-node ({self.tasks_per_node}) must equal --gpus-per-node "
                             f"({self.gpus_per_node}): Lightning runs one process per GPU.")
        _check_job_options(self)
        self._resolve_overrides()

    def _resolve_overrides(self) -> None:
        keys = _override_keys(self.overrides, "train/run.py")
        if "run_dir" in keys and keys["run_dir"]:
            run_dir = Path(keys["run_dir"]).expanduser()
        else:
            now = _dt.datetime.now()
            run_dir = Path("outputs") / "slurm" / now.strftime("%Y-%m-%d") / now.strftime("%H-%M-%S")
        self.run_dir = run_dir if run_dir.is_absolute() else (Path.cwd() / run_dir)
        self.run_dir = Path(os.path.normpath(self.run_dir))

        # the launcher owns these: they must agree with the allocation
        want = {"trainer.num_nodes": str(self.nodes), "trainer.devices": str(self.tasks_per_node)}
        if self.gpus_per_node == 0:
            want["trainer.accelerator"] = "cpu"
        for key, val in want.items():
            if key in keys and keys[key] != val:
                raise SlurmError(f"{key}={keys[key]} disagrees with the allocation ({key}={val} from --nodes/"
                                 f"--gpus-per-node/--tasks-per-node); drop the override, the launcher sets it.")
        out = [o for o in self.overrides if not o.startswith("run_dir=")]
        out.append(f"run_dir={self.run_dir}")
        out += [f"{k}={v}" for k, v in want.items() if k not in keys]
        # a requeued (or resubmitted) job must continue, not restart (train/run.py refuses to start fresh over
        # existing checkpoints): the script adds resume=auto once the run dir holds a complete checkpoint and logs
        # which one, so the job's log tells a requeue from a first start. An explicit resume= is passed through.
        self.auto_resume = "resume" not in keys
        self.train_overrides = out

    @property
    def script_path(self) -> Path:
        return self.run_dir / "slurm" / "job.sbatch"


def _env_block(spec: JobSpec) -> str:
    src = spec.env_file if spec.env_file is not None else (DEFAULT_ENV_FILE if DEFAULT_ENV_FILE.is_file() else None)
    if src is None:
        return ("# --- environment: none given (create launch/env.sh or pass --env-file to load modules, activate an\n"
                "# environment, set NCCL_* variables; it is copied here) ---\n")
    body = Path(src).read_text()
    return f"# --- environment: copied from {src} ---\n{body.rstrip()}\n# --- end of environment ---\n"


def render_script(spec: JobSpec, dry_run: bool = False) -> str:
    """The sbatch script for `spec` (pure: writes nothing). Its first comment says where it lives: written to
    spec.script_path (resubmit with sbatch), or with dry_run=True printed only (nothing written or submitted)."""
    log = spec.run_dir / "slurm" / "%j.out"
    d = [
        f"--job-name={spec.job_name}",
        f"--nodes={spec.nodes}",
        f"--ntasks-per-node={spec.tasks_per_node}",
    ]
    if spec.gpus_per_node:
        d.append(f"--gpus-per-node={spec.gpus_per_node}")
    d += _resource_directives(spec)
    d += [
        f"--output={log}",
        "--open-mode=append",  # a requeued job appends to the same log
        f"--signal=USR1@{REQUEUE_SIGNAL_LEAD_S}",  # SIGUSR1 to every task 90 s before the time limit
        "--requeue",
    ]
    d += spec.extra_sbatch
    cmd = " ".join(shlex.quote(x) for x in [spec.python, str(ROOT / "train" / "run.py"), *spec.train_overrides])
    directives = "\n".join(f"#SBATCH {x}" for x in d)
    resume_block = ""
    if spec.auto_resume:
        last = shlex.quote(str(spec.run_dir / "checkpoints" / "last"))
        resume_block = f"""
# a requeued or resubmitted job continues from the newest complete checkpoint of its run dir
resume=()
if [[ -e {last} ]]; then
    resume=(resume=auto)
    echo "[launch] resuming: resume=auto ($(cat {last}))"
fi
"""
    path = shlex.quote(str(spec.script_path))
    origin = (f"launch/slurm.py --dry-run printed this script only: nothing is written or submitted; the same command "
              f"without --dry-run writes it to {path} and submits it" if dry_run else
              f"Written by launch/slurm.py; resubmit with: sbatch {path}")
    return f"""#!/bin/bash
# {origin}
{directives}

set -uo pipefail
{_env_block(spec)}
cd {shlex.quote(str(ROOT))}
echo "[launch] job $SLURM_JOB_ID start (restart ${{SLURM_RESTART_COUNT:-0}}) on $(hostname) at $(date -Is)"
{resume_block}
# srun runs the training processes in the background so this shell can forward signals: a SIGUSR1 sent to the
# batch shell only (scancel --signal=USR1 --batch) goes on to every task; srun relays it (srun(1), SIGNALS).
srun --kill-on-bad-exit=1 {cmd}{' "${resume[@]}"' if spec.auto_resume else ''} &
srun_pid=$!
trap 'echo "[launch] forwarding SIGUSR1 to the training tasks"; kill -USR1 "$srun_pid" 2>/dev/null' USR1
while true; do
    wait "$srun_pid"
    rc=$?
    kill -0 "$srun_pid" 2>/dev/null || break  # wait returned because of a trapped signal: keep waiting
done
echo "[launch] job $SLURM_JOB_ID training exited with $rc at $(date -Is)"
exit "$rc"
"""


def check_training_overrides(spec: JobSpec) -> None:
    """Run `train/run.py --check` with the job's overrides before anything is written or submitted, so a misspelled
    key or a bad value fails here in one sentence instead of in the queued job (train.cli.run.check_command: the
    config is composed and validated, nothing else runs). Raises SlurmError with train/run.py's sentence."""
    cmd = [spec.python, str(ROOT / "train" / "run.py"), "--check", *spec.train_overrides]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        lines = [line for line in p.stderr.strip().splitlines() if line.strip()]
        msg = lines[-1].removeprefix("error: ") if lines else f"train/run.py --check exited with {p.returncode}"
        raise SlurmError(f"the training overrides do not compose: {msg}")


def _write_executable(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.chmod(0o755)
    os.replace(tmp, path)
    return path


def write_script(spec: JobSpec) -> Path:
    return _write_executable(spec.script_path, render_script(spec))


def _sbatch(path: Path, *options: str) -> str:
    proc = subprocess.run(["sbatch", "--parsable", *options, str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SlurmError(f"sbatch refused {path}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout.strip().split(";")[0]  # "<jobid>[;<cluster>]"


def submit(spec: JobSpec) -> str:
    """Write the script and `sbatch --parsable` it; returns the job id."""
    if shutil.which("sbatch") is None:
        raise SlurmError("sbatch is not on PATH; run this on a Slurm login node (or use --dry-run to see the script).")
    return _sbatch(write_script(spec))


@dataclass
class PrepareSpec:
    """A Slurm-array preparation: `array` tasks of `data_pipelines/prepare.py`, then one index job."""

    overrides: list[str]  # prepare.py overrides (data=..., data.key=value); run_dir= is taken out
    array: int = 2
    cpus_per_task: int | None = None
    partition: str | None = None
    time: str | None = None
    job_name: str = "gpt2-forge-prepare"
    env_file: Path | None = None
    extra_sbatch: list[str] = field(default_factory=list)
    python: str = sys.executable
    workdir: Path = field(default_factory=Path.cwd)  # the jobs run here, so relative data paths mean what they meant
    run_dir: Path = field(init=False)

    def __post_init__(self):
        if not (isinstance(self.array, int) and self.array >= 1):
            raise SlurmError(f"--array must be a positive number of tasks, got {self.array!r}.")
        _check_job_options(self)
        keys = _override_keys(self.overrides, "prepare.py")
        for owned in ("num_tasks", "task_index"):
            if owned in keys:
                raise SlurmError(f"{owned}= is set by the launcher (one value per array task); drop the override.")
        if not any(k == "data" or k.startswith("data.") for k in keys):
            raise SlurmError("give the data to prepare after '--', e.g. -- data=jsonl data.path=/shared/owt "
                             "data.cache_dir=/shared/cache.")
        if keys.get("run_dir"):
            run_dir = Path(keys["run_dir"]).expanduser()
        else:
            now = _dt.datetime.now()
            run_dir = Path("outputs") / "prepare" / now.strftime("%Y-%m-%d") / now.strftime("%H-%M-%S")
        self.run_dir = Path(os.path.normpath(run_dir if run_dir.is_absolute() else self.workdir / run_dir))
        self.overrides = [o for o in self.overrides if not o.startswith("run_dir=")]
        self.num_proc_given = "data.num_proc" in keys

    @property
    def script_paths(self) -> tuple[Path, Path]:
        return self.run_dir / "slurm" / "prepare.sbatch", self.run_dir / "slurm" / "index.sbatch"


def render_prepare_scripts(spec: PrepareSpec, dry_run: bool = False) -> tuple[str, str]:
    """(array script, index script) for `spec` (pure: writes nothing). The index script gets its dependency on
    the array job from `sbatch --dependency` at submission. dry_run: their first comment says they were printed
    only (nothing written or submitted)."""
    logs = spec.run_dir / "slurm"
    common = _resource_directives(spec) + spec.extra_sbatch
    prepare = " ".join(shlex.quote(x) for x in [spec.python, str(ROOT / "data_pipelines" / "prepare.py"), *spec.overrides])
    # every task encodes with all the CPUs Slurm gave it, unless the user fixed data.num_proc
    num_proc = "" if spec.num_proc_given else ' "data.num_proc=${SLURM_CPUS_PER_TASK:-1}"'

    def script(name: str, directives: list[str], body: str) -> str:
        lines = "\n".join(f"#SBATCH {x}" for x in directives)
        return f"""#!/bin/bash
# {"Printed by launch/slurm.py --prepare --dry-run (nothing written or submitted)" if dry_run else
   "Written by launch/slurm.py --prepare"} ({name})
{lines}

set -euo pipefail
{_env_block(spec)}
cd {shlex.quote(str(spec.workdir))}
{body}
"""

    array = script(
        f"one task of {spec.array}",
        [f"--job-name={spec.job_name}", f"--array=0-{spec.array - 1}", "--ntasks=1", *common,
         f"--output={logs / 'prepare_%A_%a.out'}", "--requeue"],
        f'echo "[launch] prepare task $SLURM_ARRAY_TASK_ID of {spec.array} on $(hostname) at $(date -Is)"\n'
        f"{prepare}{num_proc} num_tasks={spec.array} task_index=$SLURM_ARRAY_TASK_ID",
    )
    index = script(
        "the index step, after the array",
        [f"--job-name={spec.job_name}-index", "--ntasks=1", *common, f"--output={logs / 'index_%j.out'}", "--requeue"],
        f'echo "[launch] prepare index step on $(hostname) at $(date -Is)"\n{prepare}{num_proc}',
    )
    return array, index


def submit_prepare(spec: PrepareSpec) -> tuple[str, str]:
    """Write both scripts, submit the array, then the index job after it; returns (array job id, index job id)."""
    if shutil.which("sbatch") is None:
        raise SlurmError("sbatch is not on PATH; run this on a Slurm login node (or use --dry-run to see the scripts).")
    paths = spec.script_paths
    for path, text in zip(paths, render_prepare_scripts(spec)):
        _write_executable(path, text)
    array_id = _sbatch(paths[0])
    # afterany, not afterok: the index step also finishes the shards of a task that failed (preparation resumes)
    return array_id, _sbatch(paths[1], f"--dependency=afterany:{array_id}")


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="launch/slurm.py",
        description="Write an sbatch script for train/run.py into the run directory and submit it.",
        epilog="Everything after '--' goes to train/run.py verbatim, e.g. -- model=gpt2 strategy=ddp data=tokens.",
    )
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=1, help="GPUs per node (= tasks per node); 0 for a CPU job")
    p.add_argument("--tasks-per-node", type=int, default=None, help="processes per node of a CPU job")
    p.add_argument("--cpus-per-task", type=int, default=None)
    p.add_argument("--partition", default=None)
    p.add_argument("--time", default=None, help="time limit, HH:MM:SS")
    p.add_argument("--job-name", default="gpt2-forge")
    p.add_argument("--env-file", type=Path, default=None, help="shell file with the job's environment "
                                                               "(default: launch/env.sh if present)")
    p.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                   help="an extra sbatch option, e.g. --sbatch=--account=abc (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="print the script; submit nothing")
    p.add_argument("--prepare", action="store_true",
                   help="run data_pipelines/prepare.py as a Slurm array (--array K) plus an index step, not training")
    p.add_argument("--array", type=int, default=None, metavar="K", help="with --prepare: number of array tasks")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" in argv:
        i = argv.index("--")
        argv, overrides = argv[:i], argv[i + 1:]
    else:
        overrides = []
    args = build_parser().parse_args(argv)  # unknown options: argparse prints usage and exits 2
    if args.prepare or args.array is not None:
        return _main_prepare(args, overrides)
    try:
        spec = JobSpec(overrides, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                       tasks_per_node=args.tasks_per_node, cpus_per_task=args.cpus_per_task,
                       partition=args.partition, time=args.time, job_name=args.job_name, env_file=args.env_file,
                       extra_sbatch=args.sbatch)
        check_training_overrides(spec)
        if args.dry_run:
            print(render_script(spec, dry_run=True), end="")
            return 0
        job_id = submit(spec)
    except SlurmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(job_id)
    print(f"submitted job {job_id}: script {spec.script_path}, log {spec.run_dir / 'slurm' / (job_id + '.out')}",
          file=sys.stderr)
    return 0


def _main_prepare(args: argparse.Namespace, overrides: list[str]) -> int:
    try:
        if not args.prepare:
            raise SlurmError("--array is for data preparation; add --prepare (training runs one job, not an array).")
        if args.nodes != 1 or args.tasks_per_node is not None:
            raise SlurmError("--prepare runs one task per array job; use --array K (and --cpus-per-task) instead of "
                             "--nodes/--tasks-per-node.")
        spec = PrepareSpec(overrides, array=args.array or 1, cpus_per_task=args.cpus_per_task,
                           partition=args.partition, time=args.time,
                           job_name=args.job_name if args.job_name != "gpt2-forge" else "gpt2-forge-prepare",
                           env_file=args.env_file, extra_sbatch=args.sbatch)
        if args.dry_run:
            array, index = render_prepare_scripts(spec, dry_run=True)
            print(f"# ---- {spec.script_paths[0]} (without --dry-run)\n{array}# ---- {spec.script_paths[1]} "
                  f"(without --dry-run; sbatch --dependency=afterany:<array job id>)\n{index}", end="")
            return 0
        array_id, index_id = submit_prepare(spec)
    except SlurmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(index_id)
    print(f"submitted preparation: array job {array_id} ({spec.array} tasks), index job {index_id} after it; "
          f"logs in {spec.run_dir / 'slurm'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
