"""Train / fine-tune a GPT-2: `python train/run.py [group=option ...] [key=value ...]`.

The Hydra shell of the training job: compose conf/ -> the typed `Config` (a bad value fails here, before torch and
Lightning are imported) -> `train(cfg)` (train/job.py, an ordinary function tests call directly) -> one line of
outcome. Expected errors end with one sentence on stderr and exit code 1 (set HYDRA_FULL_ERROR=1 for the
traceback); Ctrl-C exits 130, a SIGTERM stop 143, a SIGUSR1 stop (SLURM requeue) 0.
"""

from __future__ import annotations

import math
import os
import shlex
import sys
from typing import Optional

import hydra
from omegaconf import DictConfig

from data_pipelines.config import register_configs as register_data_configs
from train.config import register_configs, to_config
from train.job import train

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
    """Lightning installs its own console handler; under Hydra (console + run.log) every line would print twice."""
    import logging
    import warnings

    import lightning.pytorch  # noqa: F401 - installs its handler at import; remove it after

    for name in ("lightning.pytorch", "lightning.fabric"):
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
        _route_lightning_logs()
        summary = train(cfg)
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
    if summary.get("first_train_loss") is not None:
        val = summary.get("last_val_loss")
        val_txt = f", validation loss {val:.3f} (perplexity {math.exp(val):.1f})" if val is not None else ""
        print(
            f"done: {summary['global_step']} steps in {summary['seconds']:.0f}s, train loss "
            f"{summary['first_train_loss']:.3f} -> {summary['last_train_loss']:.3f}{val_txt}; "
            f"run dir {summary['run_dir']}"
        )
    best = summary.get("best")
    if best:  # a fine-tuning task: the monitored metric of the exported (best) model
        print(f"best {best['metric']}={best['value']:.4f} at step {best['step']}; export {summary.get('hf_dir')}")
    if summary.get("samples"):  # an LM run: the last line says what to look at and what to type next

        def shown(path: str) -> str:  # as the user types it: relative to the working directory when below it
            return path if os.path.relpath(path).startswith("..") else os.path.relpath(path)

        rd, prompt = shown(summary["run_dir"]), dcfg.sample.prompts[0] if dcfg.sample.prompts else ""
        # resume = this run's own overrides + resume=auto into its run dir, to twice the steps
        again = [o for o in HydraConfig.get().overrides.task
                 if o.split("=", 1)[0].lstrip("+~") not in ("run_dir", "resume", "trainer.max_steps")]  # fmt: skip
        again += [f"run_dir={rd}", "resume=auto", f"trainer.max_steps={2 * summary['global_step']}"]
        py = shlex.quote(shown(sys.executable))  # `make run`'s .venv/bin/python works without an activated venv
        print(f"open {shown(summary['samples'])} and {shown(summary.get('plot', rd + '/plots'))}; sample: {py} "
              f"train/generate.py {shlex.quote(shown(summary['hf_dir']))} --prompt {shlex.quote(prompt)}; resume for "
              f"{summary['global_step']} more steps: {py} train/run.py {' '.join(map(shlex.quote, again))}")
    # the value a sweeper optimises (hydra/sweeper=optuna_lr): the task's best metric, else the LM's val loss
    return best["value"] if best else summary.get("last_val_loss")


if __name__ == "__main__":
    main()
