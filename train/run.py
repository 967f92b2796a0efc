"""Train / fine-tune a GPT-2: `python train/run.py [group=option ...] [key=value ...]`.

The Hydra shell of the training job: compose conf/ -> the typed `Config` (a bad value fails here, before torch and
Lightning are imported) -> `check_inputs(cfg)` (a used run dir, a missing or unreadable data file, a corrupt
checkpoint, hardware this machine lacks: before Lightning is imported) -> `train(cfg)` (train/job.py, an ordinary
function tests call directly) -> one line of outcome. Expected errors end with one sentence on stderr and exit
code 1 (set HYDRA_FULL_ERROR=1 for the traceback); Ctrl-C exits 130, a SIGTERM stop 143, a SIGUSR1 stop (SLURM
requeue) 0.
"""

from __future__ import annotations

import os
import sys
from typing import Optional

import hydra
from omegaconf import DictConfig

from data_pipelines.config import register_configs as register_data_configs
from train.config import ConfigError, check_overrides, register_configs, sweep_root_from_run_dir, to_config
from train.job import check_inputs, outcome_lines, train
from train.malloc import tune_glibc_malloc

register_configs()  # the typed schemas must be in Hydra's ConfigStore before composition
register_data_configs()  # data_schema, the data group's own schema name


def _expected_errors() -> tuple[type[BaseException], ...]:
    from omegaconf.errors import OmegaConfBaseException

    errors: tuple = (ValueError, OSError, KeyError, OmegaConfBaseException)
    # only from modules already imported: a config error must not pay for importing torch + Lightning (~5 s)
    if "lightning.fabric" in sys.modules:
        from lightning.fabric.utilities.exceptions import MisconfigurationException

        errors += (MisconfigurationException,)
    if "train.callbacks.guard" in sys.modules:  # the loss guard stopped a diverging run
        from train.callbacks.guard import GuardError

        errors += (GuardError,)
    return errors


def _debug() -> bool:
    return os.environ.get("HYDRA_FULL_ERROR") == "1" or os.environ.get("GPT2_FORGE_DEBUG") == "1"


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


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(dcfg: DictConfig) -> Optional[float]:
    from hydra.core.hydra_config import HydraConfig

    try:
        # run_dir is hydra's output dir: equal to ${run_dir} in a single run, the job's folder under -m
        dcfg.run_dir = HydraConfig.get().runtime.output_dir
        cfg = to_config(dcfg)  # a bad value fails here, before torch and Lightning are imported
        check_overrides(cfg, HydraConfig.get().overrides.task)  # a data override the task would ignore
        check_inputs(cfg)  # run dir, resume, data files, hardware: before Lightning's ~4 s import
        tune_glibc_malloc()  # this process owns the allocator: keep each step's freed memory for the next step
        _route_lightning_logs()
        summary = train(cfg, inputs_checked=True)
    except _expected_errors() as e:
        if _debug():
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if isinstance(e, KeyError):
            msg = f"missing key {msg}"
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt as e:
        print(f"stopped: {e or 'interrupted'}", file=sys.stderr)
        sys.exit(130)
    if summary.get("preempted"):
        requeued = " and requeued the SLURM job" if summary.get("requeued") else ""
        print(f"stopped: {summary['preempted']} at step {summary['global_step']}; saved {summary['checkpoint']}"
              f"{requeued}; continue with resume=auto run_dir={summary['run_dir']}", file=sys.stderr)
        # a requeued job's exit does not matter; a SIGTERM stop is 128+15, as if the signal had ended it
        sys.exit(0 if summary["preempted"] == "SIGUSR1" else 143)
    prompt = dcfg.sample.prompts[0] if dcfg.sample.prompts else ""
    print("\n".join(outcome_lines(summary, prompt, HydraConfig.get().overrides.task)))
    best = summary.get("best")
    # the value a sweeper optimises (hydra/sweeper=optuna_lr): the task's best metric, else the LM's val loss
    return best["value"] if best else summary.get("last_val_loss")


if __name__ == "__main__":
    try:
        sys.argv = sweep_root_from_run_dir(sys.argv)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    main()
