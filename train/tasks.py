"""Fine-tuning tasks: `task=cls|token_cls|qa|mc` bind a gpt2 head, the task data (data_pipelines.tasks), a loss and
metrics (train/metrics.py), and keep the best model by the task's validation metric.

    python train/run.py task=cls model.init_from=<hf-dir | checkpoints/step-N | run-dir>

`train(cfg)` in train/run.py hands every task but `lm` to `train_task(cfg)` here, which reuses run.py's building
blocks (resume, loggers, Trainer with the guard / RNG / throughput callbacks, StepCheckpoint, Preemption) and adds:

- `build_task_model`: the head model, fresh or from `model.init_from`. Trunk weights (and a head of the same shape)
  are loaded; a head the source lacks is initialised and the log names its parameters; a head whose shape differs
  (another label count) is re-initialised with a warning naming the old and new shape.
- `TaskLitModule`: GPT2LitModule (AdamW groups, warm-up + decay, step-wise metric rows) with the task's loss
  (mc: lm_coef x LM loss + multiple-choice loss, HF run_openai_gpt.py) and validation metrics over the WHOLE
  validation set (trainer.limit_val_batches is not applied: qa post-processing needs every window of an example):
  cls val/accuracy + val/f1 (macro) or val/mse; token_cls val/precision, val/recall, val/f1 (entity level) +
  val/token_accuracy; qa val/exact_match + val/f1 (after post-processing to text); mc val/accuracy. Plus val/loss.
- `BestCheckpoint`: `checkpoints/best/` (weights + config.json + meta.json, a valid `model.init_from`) whenever the
  monitored metric improves (`task.monitor`/`task.monitor_mode`, else the task default). The export `run_dir/hf`
  is the best model, with id2label/label2id and pad_token_id (= eos, as GPT-2 fine-tuning pads) in config.json.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from torch import nn

from gpt2 import GPT2Config

from train import checkpoint as ck
from train import metrics as M
from train.callbacks import BestCheckpoint
from train.checkpoint import best_dir, load_best_into
from train.config import Config, ConfigError, ModelConfig, TaskConfig, write_config
from train.model import TASK_MODELS, build_model_config, runtime_overrides, tokenizer_source
from train.module import GPT2LitModule

log = logging.getLogger(__name__)

FINETUNE_TASKS = ("cls", "token_cls", "qa", "mc")
# task -> (metric, mode) that picks checkpoints/best when task.monitor is null; cls regression uses val/mse, min
DEFAULT_MONITOR = {"cls": ("val/accuracy", "max"), "token_cls": ("val/f1", "max"), "qa": ("val/f1", "max"),
                   "mc": ("val/accuracy", "max")}  # fmt: skip
# which transformers class loads each task's export (documentation and tests)
HF_CLASSES = {"cls": "AutoModelForSequenceClassification", "token_cls": "AutoModelForTokenClassification",
              "qa": "AutoModelForQuestionAnswering", "mc": "GPT2DoubleHeadsModel"}  # fmt: skip


def monitor_for(task_cfg: TaskConfig, regression: bool = False) -> tuple[str, str]:
    """(metric, mode) that selects the best checkpoint."""
    metric, mode = DEFAULT_MONITOR[task_cfg.name]
    if task_cfg.name == "cls" and regression:
        metric, mode = "val/mse", "min"
    if task_cfg.monitor is not None:
        metric = task_cfg.monitor
        mode = task_cfg.monitor_mode or ("min" if metric in ("val/loss", "val/mse") else "max")
    elif task_cfg.monitor_mode is not None:
        mode = task_cfg.monitor_mode
    return metric, mode


# ------------------------------------------------------------------------------------------------ the head model
def _source_weights(src: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], str]:
    """(config dict, state dict under OUR key names, description) of an HF folder or one of our checkpoints."""
    if (src / "config.json").is_file() and not (src / ck.META_NAME).is_file():  # an HF folder
        from gpt2 import hf_io

        folder = hf_io.resolve_model_dir(str(src))
        config = GPT2Config.from_pretrained(folder).to_dict()
        sd, _ = hf_io.convert_hf_state_dict(hf_io.read_weights(hf_io.weight_files(folder)), with_trunk_prefix=True)
        return config, sd, f"HF folder {src}"
    step = ck.resolve_checkpoint(src)
    return ck.load_model_config_dict(step), ck.load_weights(step / ck.WEIGHTS_NAME), f"checkpoint {step}"


def build_task_model(
    task_cfg: TaskConfig,
    model_cfg: ModelConfig,
    attention_cfg,
    stability_cfg,
    vocab_size: int,
    eos_token_id: Optional[int],
    head: dict[str, Any],
) -> tuple[nn.Module, dict[str, Any]]:
    """The task's head model and a report {"source", "new": [...], "reinitialized": [...]}.

    head: the GPT2Config fields of the head, from the data (num_labels, id2label, label2id, problem_type,
    pad_token_id). With model.init_from every tensor whose name and shape match is loaded (the trunk; a head of the
    same shape too, so a fine-tuned model can be fine-tuned further); the rest is freshly initialised and reported.
    """
    cls = TASK_MODELS[task_cfg.name]
    head = {k: v for k, v in head.items() if v is not None or k == "problem_type"}
    if model_cfg.init_from is None:
        config = build_model_config(model_cfg, attention_cfg, stability_cfg, vocab_size, eos_token_id)
        config = GPT2Config.from_dict(config.to_dict(), **head)
        model = cls(config)
        return model, {"source": None, "new": sorted(model.state_dict()), "reinitialized": []}
    src = Path(model_cfg.init_from).expanduser()
    if not src.exists():
        raise FileNotFoundError(
            f"model.init_from={model_cfg.init_from} does not exist; give an HF folder, a checkpoint or a run dir."
        )
    saved, sd, where = _source_weights(src)
    config = GPT2Config.from_dict(saved, **runtime_overrides(model_cfg, attention_cfg, stability_cfg), **head)
    model = cls(config)  # every tensor initialised (GPT-2 init); the matching ones are overwritten below
    target = model.state_dict()
    tied = "lm_head.weight" if config.tie_word_embeddings else None
    load, reinit = {}, []
    for k, t in sd.items():
        if k not in target:
            continue  # another head's weights (an LM checkpoint's lm_head into a classifier)
        if tuple(t.shape) != tuple(target[k].shape):
            reinit.append(f"{k} {tuple(t.shape)} -> {tuple(target[k].shape)}")
        else:
            load[k] = t
    model.load_state_dict(load, strict=False)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    new = sorted(k for k in target if k not in load and k != tied and not any(r.startswith(k + " ") for r in reinit))
    if not any(k.startswith("transformer.") for k in load):
        raise ConfigError(
            f"model.init_from={model_cfg.init_from} ({where}) holds no GPT-2 trunk weights; point it to a GPT-2 HF "
            f"folder, one of our checkpoints or a run dir."
        )
    if reinit:
        log.warning(
            "model.init_from=%s: the head's shape differs (another label count: %d labels now), so it was "
            "RE-INITIALISED: %s", model_cfg.init_from, config.num_labels, "; ".join(reinit),
        )
    if new:
        log.info("model.init_from=%s: new %s head initialised: %s", model_cfg.init_from, cls.__name__, ", ".join(new))
    model.train()
    if model.config.vocab_size < vocab_size:
        raise ConfigError(
            f"the tokenizer has {vocab_size} tokens but model.init_from={model_cfg.init_from} has only "
            f"{model.config.vocab_size} embeddings; use the tokenizer that came with that model (data.tokenizer=null)."
        )
    return model, {"source": where, "new": new, "reinitialized": reinit}


# ------------------------------------------------------------------------------------------------ the module
class TaskLitModule(GPT2LitModule):
    """GPT2LitModule with a task's loss and validation metrics (see the module docstring).

    Args (besides GPT2LitModule's):
        task: cls | token_cls | qa | mc.
        model_keys: the batch keys the head's forward takes (data_pipelines.tasks.MODEL_KEYS[task]).
        lm_coef: mc only, the LM loss weight.
        regression: cls with float labels (val/mse instead of accuracy / F1).
        id2label: token_cls, the tag names (entity chunking reads them).
        qa_eval: qa only, (val features with offsets, contexts, gold answer texts) and the post-processing limits.
    """

    def __init__(self, model: nn.Module, task: str, optim, max_steps: int, *, model_keys: tuple[str, ...],
                 lm_coef: float = 0.5, regression: bool = False, id2label: Optional[dict[int, str]] = None,
                 qa_eval: Optional[dict[str, Any]] = None, **kwargs):  # fmt: skip
        super().__init__(model, optim, max_steps, **kwargs)
        self.task = task
        self.model_keys = tuple(model_keys)
        self.lm_coef = lm_coef
        self.regression = regression
        self.id2label = id2label
        self.qa_eval = qa_eval
        self._outs: list[tuple] = []
        self.last_val_metrics: dict[str, float] = {}

    def _forward(self, batch: dict[str, torch.Tensor]):
        out = self.model(**{k: batch[k] for k in self.model_keys if k in batch})
        if self.task == "mc":  # double heads: LM loss x coefficient + multiple-choice loss (run_openai_gpt.py)
            loss = out.mc_loss if out.loss is None else self.lm_coef * out.loss + out.mc_loss
        else:
            loss = out.loss
        return out, loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        _, loss = self._forward(batch)
        self.count_samples(batch["input_ids"].shape[0])
        # the mean over the micro-batches of one optimizer step, kept on the device (synced at logging steps only)
        self._loss_sum = loss.detach() if self._loss_sum is None else self._loss_sum + loss.detach()
        self._loss_n += 1
        return loss

    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        self._outs = []

    @torch.no_grad()
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        out, loss = self._forward(batch)
        self._val_sum += loss.detach().double()
        self._val_n += 1
        if self.task == "cls":
            self._outs.append((out.logits.float().cpu(), batch["labels"].cpu()))  # (B, L), (B,)
        elif self.task == "token_cls":
            self._outs.append((out.logits.argmax(-1).cpu(), batch["labels"].cpu()))  # (B, T), (B, T)
        elif self.task == "qa":
            self._outs.append((out.start_logits.float().cpu(), out.end_logits.float().cpu(),
                               batch["feature_index"].cpu()))  # (B, T), (B, T), (B,)  # fmt: skip
        else:
            self._outs.append((out.mc_logits.float().cpu(), batch["mc_labels"].cpu()))  # (B, C), (B,)

    def task_metrics(self) -> dict[str, float]:
        """The task's scores over the validation outputs gathered since on_validation_epoch_start."""
        if not self._outs:
            return {}
        if self.task == "cls":
            logits = torch.cat([o[0] for o in self._outs])
            labels = torch.cat([o[1] for o in self._outs])
            m = M.classification_metrics(logits, labels, regression=self.regression)
            return {"val/mse": m["mse"]} if self.regression else {"val/accuracy": m["accuracy"], "val/f1": m["macro_f1"]}
        if self.task == "token_cls":
            preds = [row for o in self._outs for row in o[0]]
            labels = [row for o in self._outs for row in o[1]]
            m = M.token_cls_metrics(preds, labels, self.id2label)
            return {"val/precision": m["precision"], "val/recall": m["recall"], "val/f1": m["f1"],
                    "val/token_accuracy": m["accuracy"]}  # fmt: skip
        if self.task == "qa":
            q = self.qa_eval
            starts = [row for o in self._outs for row in o[0]]
            ends = [row for o in self._outs for row in o[1]]
            fidx = [int(i) for o in self._outs for i in o[2]]
            preds = M.postprocess_qa(starts, ends, q["features"], q["contexts"], n_best_size=q["n_best_size"],
                                     max_answer_length=q["max_answer_length"], feature_indices=fidx)  # fmt: skip
            seen = sorted({q["features"][i]["example_index"] for i in fidx})  # fast_dev_run sees a few windows only
            m = M.squad_metrics([preds[i] for i in seen], [q["answers"][i] for i in seen])
            return {"val/exact_match": m["exact_match"], "val/f1": m["f1"]}
        logits = torch.cat([o[0] for o in self._outs])
        labels = torch.cat([o[1] for o in self._outs])
        return {"val/accuracy": M.multiple_choice_accuracy(logits, labels)}

    def on_validation_epoch_end(self) -> None:
        count = self._val_n.item()
        if count == 0:
            return
        val_loss = (self._val_sum / self._val_n).item()
        # every rank scores the whole validation set (TaskDataModule's validation loader is not sharded)
        metrics = {"val/loss": val_loss, **self.task_metrics()}
        self._outs = []
        self.last_val_metrics = metrics
        self.emit_metrics(metrics, self.trainer.global_step)
        self._flush_logs()
        self.log("val_loss", val_loss, prog_bar=True, logger=False, on_epoch=True)


# ------------------------------------------------------------------------------------------------ train_task()
def _task_tokenizer(cfg: Config, resume_from: Optional[Path], run_dir: Path):
    """The tokenizer of model.init_from (its ids index that embedding table), a resumed run's own, data.tokenizer,
    or else the byte-level BPE trained (and cached) on the LM data source, as an LM run would."""
    from gpt2 import GPT2TokenizerFast

    if resume_from is not None and (run_dir / "tokenizer" / "tokenizer.json").is_file():
        return GPT2TokenizerFast.from_pretrained(str(run_dir / "tokenizer"))
    src = tokenizer_source(cfg.data.tokenizer, cfg.model.init_from, resume_from)
    if src:
        cfg.data.tokenizer = src
    if cfg.model.init_from and not src:
        raise ConfigError(
            f"model.init_from={cfg.model.init_from} has no tokenizer next to it (tokenizer.json / vocab.json, or the "
            f"run's tokenizer/ folder); set data.tokenizer=<the folder of the tokenizer that model was trained with>."
        )
    from data_pipelines.sources import DocumentSource
    from data_pipelines.tokenizing import get_tokenizer

    return get_tokenizer(cfg.data, DocumentSource(cfg.data))


def train_task(cfg: Config) -> dict[str, Any]:
    """Fine-tune `cfg.task.name` (cls | token_cls | qa | mc) end to end: data -> head model -> fit -> best -> export.

    Returns (and writes to run_dir/summary.json) the paths, step count, the final and best validation metrics."""
    from data_pipelines.tasks import MODEL_KEYS, TaskDataModule

    from train.callbacks import Preemption, StepCheckpoint
    from train.loggers import build_loggers, plot_losses, read_metrics
    from train.strategies import check_hardware, model_for_export
    from train.trainer import build_trainer

    t_start = time.perf_counter()
    task, tcfg = cfg.task.name, cfg.trainer
    if task not in FINETUNE_TASKS:
        raise ConfigError(f"task.name={task} is not a fine-tuning task; use one of {', '.join(FINETUNE_TASKS)}.")
    run_dir = Path(cfg.run_dir).expanduser()
    run_dir.mkdir(parents=True, exist_ok=True)
    check_hardware(cfg.strategy, tcfg, cfg.attention.implementation)
    resume_from = ck.resolve_resume(cfg.resume, run_dir)
    resume_step = ck.read_meta(resume_from)["global_step"] if resume_from else None
    fast = tcfg.fast_dev_run

    tokenizer = _task_tokenizer(cfg, resume_from, run_dir)
    write_config(cfg, run_dir)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    if tcfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    tok_dir = run_dir / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        tokenizer.save_pretrained(str(tok_dir))

    dm = TaskDataModule(task, cfg.task.data, tokenizer)
    dm.prepare_data()
    dm.setup("fit")
    log.info("%s", dm.summary())
    regression = dm.problem_type == "regression"
    head = {"pad_token_id": dm.pad_token_id}  # GPT-2 has no pad token: fine-tuning pads with eos (HF docs)
    if task in ("cls", "token_cls"):
        head.update(num_labels=dm.num_labels, id2label=dm.id2label, label2id=dm.label2id)
    if task == "cls":
        head["problem_type"] = dm.problem_type
    model, report = build_task_model(cfg.task, cfg.model, cfg.attention, cfg.stability, len(tokenizer),
                                     tokenizer.eos_token_id, head)  # fmt: skip
    if resume_from is not None:
        ck.check_compatible(resume_from, model.config, type(model).__name__)
    if cfg.task.data.max_length > model.config.n_positions:
        raise ConfigError(
            f"task.data.max_length={cfg.task.data.max_length} exceeds the model's n_positions="
            f"{model.config.n_positions}; lower task.data.max_length."
        )
    monitor, mode = monitor_for(cfg.task, regression)
    qa_eval = None
    if task == "qa":
        feats, contexts, answers = dm.qa_eval_data()
        qa_eval = {"features": feats, "contexts": contexts, "answers": answers,
                   "n_best_size": cfg.task.data.n_best_size, "max_answer_length": cfg.task.data.max_answer_length}
    meta = {"tokenizer_dir": "../../tokenizer"}
    module = TaskLitModule(
        model, task, cfg.optim, max_steps=1 if fast else tcfg.max_steps, model_keys=MODEL_KEYS[task],
        lm_coef=cfg.task.lm_coef, regression=regression, id2label=model.config.id2label, qa_eval=qa_eval,
        log_every_n_steps=tcfg.log_every_n_steps, compile=tcfg.compile,
        activation_checkpointing=tcfg.activation_checkpointing, meta=meta,
    )  # fmt: skip

    protect = resume_from if resume_from is not None and resume_from.parent.parent.resolve() == run_dir.resolve() else None
    ckpt_cb = StepCheckpoint(run_dir, cfg.checkpoint.every_n_steps, cfg.checkpoint.keep_last,
                             save_final=cfg.checkpoint.save_final, protect=protect,
                             val_every_n_steps=tcfg.val_check_interval if tcfg.limit_val_batches else None)  # fmt: skip
    best_cb = BestCheckpoint(run_dir, monitor, mode, meta=meta)
    preempt = Preemption(ckpt_cb)
    loggers = build_loggers(cfg.logger, run_dir, resume_step, dataclasses.asdict(cfg))
    # the task metrics need the whole validation set (every qa window of an example): no limit_val_batches here
    tcfg.limit_val_batches = 1.0 if tcfg.limit_val_batches > 0 else 0
    extra = [] if fast else [best_cb, ckpt_cb, preempt]
    trainer = build_trainer(cfg, run_dir, loggers, extra_callbacks=extra)
    val_every = 1 if fast else tcfg.val_check_interval
    trainer.fit(module, datamodule=dm, ckpt_path=str(resume_from) if resume_from else None)
    if trainer.interrupted:
        raise KeyboardInterrupt(f"interrupted at step {trainer.global_step}; continue with resume=auto run_dir={run_dir}")
    if preempt.stopped:
        for lg in loggers:
            lg.save()
        return {"run_dir": str(run_dir), "global_step": trainer.global_step, "preempted": preempt.signal_name,
                "requeued": preempt.requeued, "checkpoint": str(ckpt_cb.saved[-1]) if ckpt_cb.saved else None}
    if tcfg.limit_val_batches and trainer.global_step % val_every != 0:  # the final step's metrics
        trainer.validate(module, datamodule=dm, verbose=False)
    for lg in loggers:
        lg.save()

    summary: dict[str, Any] = {
        "run_dir": str(run_dir),
        "task": task,
        "global_step": trainer.global_step,
        "checkpoint": str(ckpt_cb.saved[-1]) if ckpt_cb.saved else None,
        "init": report,
        "num_labels": model.config.num_labels,
        "id2label": {str(k): v for k, v in (dm.id2label or {}).items()} or None,
        "final_metrics": dict(module.last_val_metrics),
        "monitor": monitor,
        "monitor_mode": mode,
    }
    export_net = model_for_export(trainer, module) if not fast else None  # every rank (FSDP gathers)
    if trainer.is_global_zero:
        rows = read_metrics(run_dir / "metrics.csv") if (run_dir / "metrics.csv").is_file() else []
        losses = [r["train/loss"] for r in rows if r.get("train/loss") is not None]
        summary.update(first_train_loss=losses[0] if losses else None, last_train_loss=losses[-1] if losses else None)
        if rows:
            summary["plot"] = str(plot_losses(run_dir / "metrics.csv", run_dir / "plots" / "loss.png"))
        if export_net is not None:
            from train.export import export_hf

            best = load_best_into(export_net, run_dir) if best_cb.best is not None else None
            if best is not None:
                summary["best"] = {"metric": monitor, "mode": mode, "value": best["value"],
                                   "step": best["global_step"], "metrics": best.get("metrics", {}),
                                   "path": str(best_dir(run_dir))}  # fmt: skip
                log.info("best %s=%.4f at step %d -> %s", monitor, best["value"], best["global_step"], run_dir / "hf")
            summary["hf_dir"] = str(export_hf(export_net, tokenizer, run_dir / "hf", overwrite=True))
        summary["seconds"] = time.perf_counter() - t_start
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary


__all__ = [
    "DEFAULT_MONITOR",
    "FINETUNE_TASKS",
    "HF_CLASSES",
    "TaskLitModule",
    "build_task_model",
    "monitor_for",
    "train_task",
]
