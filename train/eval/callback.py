"""In-training evaluation on lm-evaluation-harness tasks: `HarnessEval` runs train/cli/evaluate.py's evaluator on the live
model every `every_n_steps` optimizer steps and once at the end of training, and logs eval/<task>/<metric>.

llm.c scores HellaSwag inside its training loop and every GPT-2 reproduction reports benchmark numbers next to its loss
curve; lm_eval does the benchmark (task registry, prompts, metrics, aggregation), train/eval/harness.py answers its
requests with our model.

- Rank 0 evaluates; the other ranks wait for its outcome (a broadcast, so an error on rank 0 stops every rank instead
  of leaving them at a barrier). Under FSDP2 / DeepSpeed ZeRO-3 every rank first takes part in gathering the full
  weights (train.strategies.full_state_dict), and rank 0 scores a plain copy built from them.
- The values go to every logger of the run (metrics.csv, W&B, TensorBoard) at the optimizer step they were measured
  at, and lm_eval's whole results dict (configs, versions, n-samples) to run_dir/eval/step-<N>.json.
- Resume: at a step that both evaluates and checkpoints, the evaluation runs first (this callback sits before
  StepCheckpoint, and its row is on disk before the checkpoint is published), so a run killed after checkpoint N and
  resumed from it has eval row N exactly once; the rows after N are dropped by MetricsCSV and the resumed run
  evaluates those steps again.
- The model is scored in eval mode and in its own dtype, under torch.inference_mode; its train/eval mode and the
  global random states are restored (train.eval.evaluate.evaluate), so evaluating does not change the training run.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Optional

from lightning.pytorch.callbacks import Callback

log = logging.getLogger(__name__)


class HarnessEval(Callback):
    """lm_eval tasks on rank 0 every `every_n_steps` optimizer steps and at the end of training.

    Args:
        tokenizer: the run's `gpt2.GPT2TokenizerFast`.
        tasks: lm_eval task / group / tag names (checked up front by `check_tasks`).
        every_n_steps: optimizer steps between evaluations (step N evaluates when N % every_n_steps == 0).
        run_dir: the run directory; results JSON go to run_dir/eval/step-<N>.json.
        limit, num_fewshot, batch_size, include_path, max_gen_toks: as `train.eval.evaluate.evaluate` (lm_eval's terms).
        at_end: also evaluate the last step of a finished run when it is not a multiple of every_n_steps (like the
            final validation); a run stopped early (preemption) is not finished and is not evaluated.
    After fit, `evaluated` lists the steps evaluated by this process and `last_metrics` the newest eval/... values.
    """

    def __init__(self, tokenizer: Any, tasks: list[str], every_n_steps: int, run_dir: str | os.PathLike, *,
                 limit: Optional[int | float] = None, num_fewshot: Optional[int] = None, batch_size: int = 8,
                 include_path: Optional[str] = None, max_gen_toks: Optional[int] = None,
                 at_end: bool = True):
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps={every_n_steps} must be >= 1.")
        self.tokenizer = tokenizer
        self.tasks = list(tasks)
        self.every_n_steps = every_n_steps
        self.run_dir = Path(run_dir)
        self.kwargs = dict(limit=limit, num_fewshot=num_fewshot, batch_size=batch_size, include_path=include_path,
                           max_gen_toks=max_gen_toks)
        self.at_end = at_end
        self.evaluated: list[int] = []
        self.last_metrics: dict[str, float] = {}
        self._last_step = -1

    def on_train_start(self, trainer, pl_module) -> None:
        self._last_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self._last_step:  # inside an accumulation window
            return
        self._last_step = step
        if step % self.every_n_steps == 0:
            self.run(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        step = trainer.global_step
        finished = trainer.max_steps is not None and 0 < trainer.max_steps <= step
        if self.at_end and finished and step not in self.evaluated:
            self.run(trainer, pl_module)

    # -- one evaluation: every rank calls it (the weights may need gathering); rank 0 scores, logs and writes
    def run(self, trainer, pl_module) -> Optional[dict[str, float]]:
        step = trainer.global_step
        self.evaluated.append(step)
        log_train_step = getattr(pl_module, "log_train_step", None)
        if log_train_step is not None:
            log_train_step()  # the step's train row first: eval values merge into it
        was_training = pl_module.training
        model = eval_model(trainer, pl_module)  # every rank: FSDP2 / ZeRO-3 gather here
        values: Optional[dict[str, float]] = None
        error: Optional[str] = None
        if trainer.is_global_zero:
            try:
                values = self._evaluate_on_rank_zero(trainer, pl_module, model, step)
            except Exception as e:  # noqa: BLE001 - every rank must learn of it; rank 0 re-raises the original
                error = f"{type(e).__name__}: {e}"
                trainer.strategy.broadcast(error, src=0)
                raise
        error = trainer.strategy.broadcast(error, src=0)  # the other ranks wait here for rank 0's outcome
        if error is not None:
            raise RuntimeError(f"the in-training evaluation at step {step} failed on rank 0 ({error}).")
        pl_module.train(was_training)
        for cb in trainer.callbacks:  # the evaluation's time is not training throughput
            restart = getattr(cb, "restart_interval", None)
            if restart is not None:
                restart()
        return values

    def _evaluate_on_rank_zero(self, trainer, pl_module, model, step: int) -> dict[str, float]:
        from train.eval.evaluate import evaluate, metrics, write_json

        t0 = time.perf_counter()
        # bootstrap_iters=0: the stderr columns cost seconds to minutes per task and are not logged
        results = evaluate(model, self.tokenizer, self.tasks, bootstrap_iters=0, **self.kwargs)
        seconds = time.perf_counter() - t0
        values = {f"eval/{k}": v for k, v in metrics(results).items()}
        results["config"]["global_step"] = step
        write_json(results, self.run_dir / "eval" / f"step-{step}.json")
        # to every logger at this step, then flushed: row N is on disk before checkpoint N is published
        emit = getattr(pl_module, "emit_metrics", None)  # GPT2LitModule's: every logger, and last_logged
        if emit is not None:
            emit(values, step)
        else:
            for logger in trainer.loggers:
                logger.log_metrics(values, step=step)
        for logger in trainer.loggers:
            if hasattr(logger, "flush"):
                logger.flush()
        self.last_metrics = values
        shown = ", ".join(f"{k.removeprefix('eval/')}={v:.4g}" for k, v in values.items())
        log.info("eval at step %d (%.1f s): %s", step, seconds, shown)
        return values


def check_eval(eval_cfg, task_name: str) -> None:
    """Refuse up front, before any data is prepared, what cannot evaluate: a task without an LM head, lm_eval not
    installed, an unknown task name, a missing include path or a task YAML there that does not parse. Raises
    ConfigError (one sentence naming the fix). Builds the task index `HarnessEval` reuses (~10 s for lm_eval's
    built-in tasks; a task list that the include path alone defines skips it)."""
    from train.config import ConfigError
    from train.eval.evaluate import EvaluationError, check_tasks

    if task_name != "lm":
        raise ConfigError(f"eval.tasks scores a language model, and task={task_name} trains a fine-tuning head; "
                          f"drop eval.tasks, or evaluate with task=lm.")
    try:
        check_tasks(eval_cfg.tasks, eval_cfg.include_path, option="eval.include_path")
    except EvaluationError as e:
        raise ConfigError(f"eval.tasks: {e}") from None


def build_eval(eval_cfg, tokenizer: Any, run_dir: Path, val_check_interval: int, fast_dev_run: bool = False):
    """The `eval` group -> a `HarnessEval` (None while eval.tasks is empty). every_n_steps=null follows the validation
    cadence; under trainer.fast_dev_run one document per task at the end (a smoke test of the wiring, as Lightning's
    fast_dev_run runs one batch of each loop)."""
    from train.config import ConfigError

    if not eval_cfg.tasks:
        return None
    if tokenizer is None:
        raise ConfigError("eval.tasks needs the run's tokenizer to turn task text into ids, and this run has "
                          "none (pre-tokenized data=tokens); set data.tokenizer=<tokenizer dir> or drop "
                          "eval.tasks.")
    return HarnessEval(tokenizer, eval_cfg.tasks, eval_cfg.every_n_steps or val_check_interval, run_dir,
                       limit=1 if fast_dev_run else eval_cfg.limit, num_fewshot=eval_cfg.num_fewshot,
                       batch_size=eval_cfg.batch_size, include_path=eval_cfg.include_path,
                       max_gen_toks=eval_cfg.max_gen_toks)


def eval_model(trainer, pl_module):
    """The network to score, on rank 0 (None elsewhere): the live `pl_module.model` where every rank holds a full
    replica (single device, DDP, DeepSpeed ZeRO-1/2); under FSDP2 and ZeRO-3 the plain copy of the gathered full
    weights that the export uses (`train.strategies.model_for_export`; call on every rank: the gather is a
    collective), moved to the training device in the dtype of the trained parameters."""
    from train.strategies import model_for_export

    net = model_for_export(trainer, pl_module)
    if net is None or net is pl_module.model:
        return net
    dtype = next(pl_module.model.parameters()).dtype  # the sharded parameters' dtype = the gathered weights'
    return net.to(device=pl_module.device, dtype=dtype).eval()


__all__ = ["HarnessEval", "build_eval", "check_eval", "eval_model"]
