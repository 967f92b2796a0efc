"""The Hydra shell of the training job, behind `python train/run.py [group=option ...] [key=value ...]`.

compose conf/ -> the typed `Config` (a bad value fails here, before torch and Lightning are imported) ->
`check_inputs(cfg)` (a used run dir, a missing or unreadable data file, a corrupt checkpoint, hardware this machine
lacks: before Lightning is imported) -> `train(cfg, checked)` (train/job.py, an ordinary function tests call
directly) -> the outcome lines. Expected errors end with one sentence on stderr and exit code 1 (HYDRA_FULL_ERROR=1
or GPT2_FORGE_DEBUG=1 for the traceback); Ctrl-C exits 130, a SIGTERM stop 143, a SIGUSR1 stop (SLURM requeue) 0;
a rank that died (train/callbacks/ranks.py) ends with the rank named and the command that resumes the run, exit 1.
"""

from __future__ import annotations

import math
import os
import shlex
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import hydra
from omegaconf import DictConfig

from data_pipelines.cli import override, run_hydra
from data_pipelines.config import register_configs as register_data_configs
from train.cli import EXPECTED_ERRORS, debug, error_line
from train.cli.malloc import tune_glibc_malloc
from train.config import ConfigError, check_overrides, register_configs, sweep_root_from_run_dir, to_config
from train.job import RankLostError, check_inputs, train

register_configs()  # the typed schemas must be in Hydra's ConfigStore before composition
register_data_configs()  # data_schema, the data group's own schema name


def _expected_errors() -> tuple[type[BaseException], ...]:
    from omegaconf.errors import OmegaConfBaseException

    errors: tuple = (*EXPECTED_ERRORS, OmegaConfBaseException)
    # only from modules already imported: a config error must not pay for importing torch + Lightning (~5 s)
    if "lightning.fabric" in sys.modules:
        from lightning.fabric.utilities.exceptions import MisconfigurationException

        errors += (MisconfigurationException,)
    if "train.trainer" in sys.modules:  # the loss guard stopped a diverging run
        from train.trainer import GuardError

        errors += (GuardError,)
    return errors


def _route_lightning_logs() -> None:
    """Lightning installs console handlers of its own (on `lightning` and `lightning.pytorch`); under Hydra (console +
    run.log) every line would print twice. Its records go to Hydra's handlers only."""
    import logging
    import warnings

    import lightning.pytorch  # noqa: F401 - installs its handler at import; remove it after

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        lg = logging.getLogger(name)
        lg.handlers.clear()
        lg.propagate = True
    # we run single-process under a SLURM allocation only through launch/slurm.py (srun); the hint is noise
    warnings.filterwarnings("ignore", message=".*srun.*command is available on your system.*")
    warnings.filterwarnings("ignore", message=".*isinstance.treespec, LeafSpec.*")


# an absolute path: Hydra reads a relative config_path as a module path when this file is imported as train.cli.run
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def main(dcfg: DictConfig) -> Optional[float]:
    from hydra.core.hydra_config import HydraConfig

    overrides = HydraConfig.get().overrides.task  # the command line's, as the printed resume commands repeat them
    try:
        # run_dir is hydra's output dir: equal to ${run_dir} in a single run, the job's folder under -m
        dcfg.run_dir = HydraConfig.get().runtime.output_dir
        cfg = to_config(dcfg)  # a bad value fails here, before torch and Lightning are imported
        check_overrides(cfg, overrides)  # a data override the task would ignore
        checked = check_inputs(cfg)  # run dir, resume, data files, hardware: before Lightning's ~4 s import
        if checked.finished(cfg.trainer.max_steps):  # nothing to do: the run dir and its records stay as they are
            print(nothing_to_train_line(checked.resume_step, str(checked.run_dir)))
            return None
        tune_glibc_malloc()  # this process owns the allocator: keep each step's freed memory for the next step
        _route_lightning_logs()
        summary = train(cfg, checked)
    except _expected_errors() as e:
        discard_unused_run_dir(Path(dcfg.run_dir))
        if debug():
            raise
        print(f"error: {error_line(e)}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt as e:
        print(f"stopped: {e or 'interrupted'}\n"
              f"resume: {resume_command(overrides, dcfg.run_dir)}", file=sys.stderr)
        sys.exit(130)
    except RankLostError as e:
        if debug():
            raise
        print(f"stopped: {e}\nresume: {resume_command(overrides, dcfg.run_dir)}",
              file=sys.stderr)
        sys.exit(1)
    if summary.get("preempted"):  # the command that continues it keeps this run's overrides (trainer.max_steps ...)
        requeued = " and requeued the SLURM job" if summary.get("requeued") else ""
        print(f"stopped: {summary['preempted']} at step {summary['global_step']}; saved {summary['checkpoint']}"
              f"{requeued}\nresume: {resume_command(overrides, summary['run_dir'])}",
              file=sys.stderr)
        # a requeued job's exit does not matter; a SIGTERM stop is 128+15, as if the signal had ended it
        sys.exit(0 if summary["preempted"] == "SIGUSR1" else 143)
    prompt = dcfg.sample.prompts[0] if dcfg.sample.prompts else ""
    print("\n".join(outcome_lines(summary, prompt, overrides)))
    best = summary.get("best")
    # the value a sweeper optimises (hydra/sweeper=optuna_lr): the task's best metric, else the LM's val loss
    return best["value"] if best else summary.get("last_val_loss")


def discard_unused_run_dir(run_dir: Path) -> None:
    """After a refused start: remove what Hydra made for it alone (its job logging opens run_dir/run.log before the
    job runs) when run.log is all the run dir holds, and the run dir when that leaves it empty, so a mistake leaves no
    stray run dir behind. A run dir with anything else in it (config.yaml, checkpoints, a user's files) is left as
    it is."""
    try:
        if [p.name for p in run_dir.iterdir()] == ["run.log"]:
            (run_dir / "run.log").unlink()
            run_dir.rmdir()
    except OSError:  # gone already, or not ours to remove: nothing to clean
        pass


def nothing_to_train_line(step: int, run_dir: str) -> str:
    """What a run resumed at or past trainer.max_steps prints."""
    return (f"done: nothing to train: the checkpoint is at step {step}, at or past trainer.max_steps; raise "
            f"trainer.max_steps to train on; run dir {run_dir}")


def outcome_lines(summary: dict[str, Any], prompt: str, overrides: Sequence[str]) -> list[str]:
    """What train/run.py prints after a finished run: the losses (+ validation perplexity), a fine-tune's best
    metric, and for an LM run a last line saying what to open and what to type next (sample from hf/, resume for as
    many steps again with this run's own overrides). Paths are shown as the user types them."""

    lines = []
    start, end = summary.get("resumed_step"), summary["global_step"]
    if summary.get("first_train_loss") is not None:
        val = summary.get("last_val_loss")
        val_txt = f", validation loss {val:.3f} (perplexity {math.exp(val):.1f})" if val is not None else ""
        steps = f"{end - start} more steps ({start} -> {end})" if start is not None else f"{end} steps"
        first, last = summary["first_train_loss"], summary["last_train_loss"]
        # one logged step (trainer.log_every_n_steps longer than the run) has no trend to show
        loss = f"{first:.3f}" if summary.get("logged_train_steps") == 1 else f"{first:.3f} -> {last:.3f}"
        lines.append(f"done: {steps} in {summary['seconds']:.0f}s, train loss {loss}{val_txt}; "
                     f"run dir {summary['run_dir']}")
    elif start is not None and end <= start:  # resumed at or past trainer.max_steps: fit ends before its first step
        lines.append(nothing_to_train_line(start, summary["run_dir"]))
    best = summary.get("best")
    if best:  # a fine-tuning task: the monitored metric of the exported (best) model
        lines.append(f"best {best['metric']}={best['value']:.4f} at step {best['step']}; "
                     f"export {summary.get('hf_dir')}")
    if summary.get("samples"):
        rd = shown(summary["run_dir"])
        py = shlex.quote(shown(sys.executable))
        lines.append(f"open {shown(summary['samples'])} and {shown(summary.get('plot', rd + '/plots'))}; sample: {py} "
                     f"train/cli/generate.py {shlex.quote(shown(summary['hf_dir']))} --prompt {shlex.quote(prompt)}; "
                     f"resume for {summary['global_step']} more steps: "
                     f"{resume_command(overrides, summary['run_dir'], 2 * summary['global_step'])}")
    return lines


def shown(path: str) -> str:
    """A path as the user types it: relative to the working directory when below it."""
    return path if os.path.relpath(path).startswith("..") else os.path.relpath(path)


def resume_command(overrides: Sequence[str], run_dir: str, max_steps: Optional[int] = None) -> str:
    """The command that continues this run from its newest checkpoint: this interpreter, train/run.py, the run's own
    overrides with run_dir, resume=auto (and trainer.max_steps when given) in place of theirs; it runs when pasted
    (run_dir quoted for Hydra and the shell: data_pipelines.cli.override)."""
    skip = ("run_dir", "resume") + (("trainer.max_steps",) if max_steps is not None else ())  # replaced below
    again = [shlex.quote(o) for o in overrides if o.split("=", 1)[0].lstrip("+~") not in skip]
    again += [override("run_dir", shown(run_dir)), "resume=auto"]
    if max_steps is not None:
        again.append(f"trainer.max_steps={max_steps}")
    py = shlex.quote(shown(sys.executable))  # `make run`'s .venv/bin/python works without an activated venv
    return f"{py} train/run.py {' '.join(again)}"


CHECK_FLAG = "--check"  # `python train/run.py --check <overrides>`: validate the overrides, run nothing


def check_command(overrides: Sequence[str]) -> str:
    """Compose conf/ with `overrides` and validate them as a run does before it starts (the typed Config: values,
    unknown keys, `+key` spellings; data.* a fine-tune would ignore), without Hydra's run dir and log, the run-dir and
    hardware checks of check_inputs, or torch: what launch/slurm.py runs on the login node before it submits.
    Returns the line to print. Raises Hydra's / OmegaConf's composition errors and ConfigError."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        dcfg = compose("config", overrides=list(overrides))
    cfg = to_config(dcfg)
    check_overrides(cfg, overrides)
    return (f"ok: task={cfg.task.name} model={cfg.model.n_layer}x{cfg.model.n_embd} strategy={cfg.strategy.name} "
            f"devices={cfg.trainer.devices} nodes={cfg.trainer.num_nodes}; the overrides compose and validate")


def _check(overrides: Sequence[str]) -> None:
    try:
        print(check_command(overrides))
    except EXPECTED_ERRORS as e:
        if debug():
            raise
        print(f"error: {error_line(e)}", file=sys.stderr)
        sys.exit(1)


def cli() -> None:
    """`python train/run.py`: under -m a plain run_dir=X becomes the sweep's root, then Hydra's main (its composition
    errors as one `error:` line: data_pipelines.cli.run_hydra). `--check` validates the overrides only
    (`check_command`)."""
    try:
        sys.argv = sweep_root_from_run_dir(sys.argv)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    if CHECK_FLAG in sys.argv[1:]:
        run_hydra(lambda: _check([a for a in sys.argv[1:] if a != CHECK_FLAG]))
        return
    try:
        run_hydra(main)
    except Exception as e:  # hydra/launcher=slurm: submitit's errors (sbatch refused a job) reach this process
        if not type(e).__module__.startswith("submitit") or debug():
            raise
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        print(f"error: the Slurm launcher could not submit the sweep ({lines[-1] if lines else type(e).__name__}); "
              f"fit hydra.launcher.* to the cluster (partition, gpus_per_node=0 on CPU nodes, mem_gb, "
              f"cpus_per_task)", file=sys.stderr)
        sys.exit(1)


__all__ = ["CHECK_FLAG", "check_command", "cli", "discard_unused_run_dir", "main", "nothing_to_train_line",
           "outcome_lines", "resume_command", "shown"]
