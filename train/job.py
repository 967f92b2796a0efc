"""The training job: `train(cfg)` runs every task (lm, cls, token_cls, qa, mc) through one sequence, top to bottom:

    check_inputs (run dir, resume, data files, hardware, eval tasks: before Lightning is imported)
    -> tokenizer -> config.yaml -> seed -> data -> model -> LightningModule -> callbacks + loggers -> Trainer -> fit
       (the last step validates; at the end of fit the callbacks write the export + what the task adds, e.g.
       samples.txt for lm, then summary.json) -> Ctrl-C / preemption / the summary

What differs per task is the `Task` object of train/tasks/<name>.py (torchtitan's TrainSpec): its data module, model,
LightningModule, best checkpoint, micro-batch, summary fields. train/run.py is the Hydra shell around this function;
tests call it directly (lightning-hydra-template's `train(cfg)`).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from train.checkpoint import layout  # torch-free: checked before torch and Lightning are imported
from train.config import Config
from train.tasks import get_task  # torch-free until a task is imported

log = logging.getLogger(__name__)


class RankLostError(RuntimeError):
    """The run stopped because another of its ranks ended (train/callbacks/ranks.py); the message names that rank,
    its signal or exit code where known, the step reached and the newest checkpoint."""


@dataclass(frozen=True)
class CheckedInputs:
    """What `check_inputs` resolved, handed to `train` as it is (nothing is checked or read twice).

    run_dir: the run's folder. resume_from: the checkpoint the run continues from (None: a fresh start) and
    resume_meta its meta.json. tokenizer: the tokenizer folder the run must use (model.init_from's), or None.
    init_dir: the folder model.init_from resolved to (a hub id's snapshot in the huggingface_hub cache), or None.
    hardware: `train.strategies.Hardware` (accelerator, resolved precision) of this machine for this config.
    shape_compared: the model shape fields already compared with the resumed checkpoint (`layout.model_shape`: those
    the config fixes); the built model's other fields are compared once it exists.
    """

    run_dir: Path
    hardware: Any
    resume_from: Optional[Path] = None
    resume_meta: dict[str, Any] = field(default_factory=dict)
    tokenizer: Optional[str] = None
    init_dir: Optional[Path] = None
    shape_compared: tuple[str, ...] = ()

    @property
    def init_commit(self) -> Optional[str]:
        """The hub commit model.init_from resolved to (a hub snapshot), else None."""
        from train.checkpoint.layout import hub_commit

        return hub_commit(self.init_dir) if self.init_dir is not None else None

    @property
    def own_resume_from(self) -> Optional[Path]:
        """The checkpoint resumed from when it is one of this run dir's own (retention must keep it), else None."""
        own = self.resume_from is not None and self.resume_from.parent.parent.resolve() == self.run_dir.resolve()
        return self.resume_from if own else None

    @property
    def resume_step(self) -> Optional[int]:
        """The optimizer step of the checkpoint resumed from; None for a fresh start."""
        return self.resume_meta.get("global_step") if self.resume_from is not None else None

    def finished(self, max_steps: int) -> bool:
        """Whether the run resumed is already done for `max_steps` (trainer.max_steps): its checkpoint is at or past
        it and the run dir holds the summary.json a finished run writes last. Restarting such a run (a requeue after
        the end, a max_steps not raised) has nothing to do; one stopped between its final checkpoint and its summary
        (export, samples) has not finished and goes on to write them."""
        step = self.resume_step
        return step is not None and 0 < max_steps <= step and (self.run_dir / "summary.json").is_file()


def check_inputs(cfg: Config) -> CheckedInputs:
    """Refuse, with one sentence, what the job would refuse later but the config and small file reads already show,
    and return what the checks resolved.

    In order: the run dir and `resume` (a fresh run into a used run dir, a resume=<path> without a checkpoint, a corrupt
    model.safetensors header, a checkpoint of another model shape), a model.init_from that does not exist or a hub
    id that cannot be fetched (and the tokenizer that comes with it; a hub id in data.tokenizer is fetched too), the
    LM data source (missing / empty / not UTF-8 / not JSON lines / no text column), then, after `import torch` (~1 s)
    but before Lightning (~4 s), the optimizer's fit to the strategy, the hardware (devices, attention kernel,
    precision) and the resumed checkpoint's strategy, and the in-training evaluation tasks (eval.tasks). Reads the run
    dir, small checkpoint files and the first MiB of each LM data file.

    Raises:
        ConfigError / CheckpointError / OSError: naming the key or file and the fix.
    """
    from data_pipelines.sources import check_source

    run_dir = Path(cfg.run_dir).expanduser()
    resume_from = layout.resolve_resume(cfg.resume, run_dir)
    if cfg.resume == "auto" and resume_from is None and launch_rank() == 0:
        log.info("resume=auto: no complete checkpoint in %s; starting fresh", layout.checkpoints_dir(run_dir))
    meta: dict[str, Any] = {}
    shape: dict[str, Any] = {}
    if resume_from is not None:
        meta = layout.read_meta(resume_from)
        layout.check_weights_file(resume_from / layout.WEIGHTS_NAME)
        layout.check_same_optimizer(resume_from, meta, cfg.optim.name)
        if not cfg.model.init_from:  # the shape the config fixes (vocab_size waits for the tokenizer unless set)
            shape = layout.model_shape(cfg.model)
            layout.check_compatible(resume_from, meta, shape)
    # model.init_from: a local folder, or a hub id fetched now into the huggingface_hub cache (one sentence offline)
    init_dir = layout.init_source(cfg.model.init_from, cfg.model.revision) if cfg.model.init_from else None
    tokenizer = layout.tokenizer_source(cfg.data.tokenizer, init_dir, resume_from)
    layout.check_same_peft(cfg.peft, init_dir, resume_from, meta)  # LoRA: no adapters as a base nor a changed shape
    if resume_from is not None and not cfg.data.tokenizer and (meta.get("config") or {}).get("data"):
        meta["config"]["data"]["tokenizer"] = tokenizer  # the checkpoint's own: no change for the resume line to list
    # the LM data: an LM's training set, or the corpus a fine-tune's tokenizer is trained on when none is given
    if cfg.task.name == "lm" or not (cfg.model.init_from or cfg.data.tokenizer or resume_from):
        check_source(cfg.data)

    from train.strategies import check_hardware, check_optimizer, check_resume  # imports torch, not Lightning

    check_optimizer(cfg.strategy, cfg.optim)
    hardware = check_hardware(cfg.strategy, cfg.trainer, cfg.attention.implementation)
    if resume_from is not None:
        check_resume(resume_from, cfg.strategy, meta, cfg.trainer)
    if cfg.eval.tasks:  # installed, known, an LM; nothing of lm_eval is imported while eval.tasks is empty
        from train.eval.evaluate import check_eval

        check_eval(cfg.eval, cfg.task.name)
    return CheckedInputs(run_dir, hardware, resume_from, meta, tokenizer, init_dir, tuple(shape))


def launch_rank(env: Optional[dict] = None) -> int:
    """This process's global rank as its launcher set it, before any process group exists: torchrun's RANK, Lightning's
    LOCAL_RANK (the ranks it spawns on one node), srun's SLURM_PROCID; 0 when none is set (the order of Lightning's
    `rank_zero_only` rank, lightning/fabric/utilities/rank_zero.py)."""
    env = os.environ if env is None else env
    for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID"):
        if env.get(key, "").isdigit():
            return int(env[key])
    return 0


def train(cfg: Config, checked: Optional[CheckedInputs] = None) -> dict[str, Any]:
    """Run the training job `cfg` describes; returns run_dir/summary.json's dict (train.callbacks.loggers.RunSummary)
    or a preemption stop's {"preempted", "requeued", "checkpoint", ...}. `checked`: `check_inputs(cfg)`'s result (None
    runs it here). Raises TypeError (not a `train.config.Config`: use `to_config`), ConfigError / CheckpointError /
    OSError (bad input), GuardError (a diverging run), RankLostError (another rank died), KeyboardInterrupt (Ctrl-C)."""
    if not isinstance(cfg, Config):  # a DictConfig would skip every __post_init__ check
        raise TypeError(f"train() takes a train.config.Config, not {type(cfg).__name__}; use to_config(cfg).")
    t_start, checked = time.perf_counter(), checked if checked is not None else check_inputs(cfg)

    import lightning as L

    from train.adapters import lora
    from train.callbacks.loggers import RunSummary, build_loggers
    from train.callbacks.preemption import Preemption
    from train.callbacks.ranks import LostRank
    from train.checkpoint.callbacks import BestCheckpoint, HFExport, StepCheckpoint
    from train.eval.evaluate import build_eval
    from train.strategies import build_strategy
    from train.trainer import build_trainer

    task, tcfg, run_dir = get_task(cfg.task.name, cfg.task.module), cfg.trainer, checked.run_dir

    # -- the tokenizer (a fine-tune keeps model.init_from's: its ids index that embedding table), then config.yaml
    cfg.data.tokenizer = checked.tokenizer or cfg.data.tokenizer
    cfg.model.revision = checked.init_commit or cfg.model.revision  # config.yaml records the hub commit it starts from
    tokenizer = task.tokenizer(cfg.data, cfg.model.init_from, checked.resume_from, run_dir)  # None: the data's own
    hparams = layout.write_config(run_dir, cfg, checked.resume_meta.get("config"), launch_rank())  # + resume changes
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    # -- data
    dm = task.datamodule(cfg.data, cfg.task, tokenizer)
    dm.prepare_data()
    dm.setup("fit")
    tokenizer = dm.tokenizer  # None only for pre-tokenized LM data (data=tokens): then no export or samples
    if tokenizer is not None and not (run_dir / "tokenizer" / "tokenizer.json").is_file():
        tokenizer.save_pretrained(str(run_dir / "tokenizer"))

    # -- model: fresh or from model.init_from (peft=lora: adapters injected, the base frozen); a resumed checkpoint
    # must hold the same head and vocabulary
    model, init_report = task.training_model(cfg.model, cfg.attention, cfg.stability, cfg.peft, dm, checked.init_dir)
    if checked.resume_from is not None:
        layout.check_compatible(checked.resume_from, checked.resume_meta, model.config, type(model).__name__,
                                compared=checked.shape_compared)  # the head, and what the config left open
    task.check_sequence_length(model.config, cfg.data, cfg.task)
    # in every checkpoint's meta.json: the config (a resume compares it), the tokenizer, the task's fields, LoRA's
    meta = {"config": hparams, **({"tokenizer_dir": "../../tokenizer"} if tokenizer is not None else {}),
            **task.checkpoint_meta(), **lora.run_meta(model)}
    module = task.module(model, dm, cfg.task, tcfg, cfg.optim, meta)

    # -- callbacks (the end of the run too: the export and summary.json are written at on_fit_end), loggers, Trainer
    ckpt_cb = StepCheckpoint(run_dir, cfg.checkpoint.every_n_steps, cfg.checkpoint.keep_last,
                             save_final=cfg.checkpoint.save_final, protect=checked.own_resume_from,
                             val_every_n_steps=tcfg.val_check_interval if tcfg.limit_val_batches else None)
    monitor = task.monitor(cfg.task, dm)  # (metric, mode) of checkpoints/best, or None: the export is the final model
    best_cb = BestCheckpoint(run_dir, *monitor, meta=meta) if monitor else None
    export_cb = HFExport(run_dir, tokenizer, task, cfg.sample, best_cb) if tokenizer is not None else None
    preempt = Preemption(ckpt_cb)  # SIGUSR1/SIGTERM -> checkpoint at a step boundary, stop (+ SLURM requeue)
    loggers = build_loggers(cfg.logger, run_dir, checked.resume_step, hparams)
    summary = RunSummary(run_dir, task, t_start, checked.resume_step, init_report)
    if task.full_validation:  # the task metrics need the whole validation set (every qa window of an example)
        tcfg.limit_val_batches = 1.0 if tcfg.limit_val_batches > 0 else 0
    eval_cb = build_eval(cfg.eval, tokenizer, run_dir, tcfg.val_check_interval, tcfg.fast_dev_run)
    # best, eval before step (checkpoint N holds both of step N); fast_dev_run: the eval alone; export, summary last
    lost_rank = LostRank()  # a rank that died: named in the error instead of the collective's broken connection
    run_callbacks = (eval_cb,) if tcfg.fast_dev_run else (best_cb, eval_cb, ckpt_cb, preempt, export_cb)
    callbacks = [cb for cb in (*run_callbacks, lost_rank, summary) if cb is not None]
    strategy = build_strategy(cfg.strategy, tcfg, task.micro_batch_size(cfg.data, cfg.task), checked.hardware)
    trainer = build_trainer(tcfg, cfg.guard, strategy, checked.hardware.precision, run_dir, loggers, callbacks,
                            cfg.checkpoint.async_save)

    try:
        trainer.fit(module, datamodule=dm, ckpt_path=str(checked.resume_from) if checked.resume_from else None)
    except Exception as e:
        if lost_rank.lost is None:
            raise
        raise RankLostError(lost_rank.report(trainer)) from e
    if trainer.interrupted:
        raise KeyboardInterrupt(f"interrupted at step {trainer.global_step} (newest checkpoint in {run_dir}; "
                                f"resume=auto continues)")
    return summary.summary


__all__ = ["CheckedInputs", "RankLostError", "check_inputs", "launch_rank", "train"]
