"""What a task is: the `Task` interface the training job (train/job.py) calls — torchtitan's TrainSpec: its data
module, model, LightningModule (loss + validation metrics), best checkpoint, export class, summary fields; each hook
gets only the config groups it reads — and what the fine-tuning tasks (cls, token_cls, qa, mc) share:
`FineTuneTask` and their LightningModule `TaskModule`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from train.config import ConfigError
from train.tasks.model import build_head_model
from train.module import GPT2LitModule

log = logging.getLogger(__name__)


class Task:
    """One task of the training job; a task module's `TASK` is an instance. The hooks' defaults are the LM's where
    that is the natural one (no tokenizer before the data, no best checkpoint, nothing extra in the summary)."""

    name: str = ""  # = its module's name = task.name = conf/task/<name>.yaml
    model_class: type = nn.Module  # the gpt2 class it trains
    hf_class: str = ""  # the transformers class that loads its export
    full_validation: bool = False  # validation scores every example (trainer.limit_val_batches is not applied)

    def tokenizer(self, data_cfg, init_from: Optional[str], resume_from: Optional[Path], run_dir: Path):
        """The tokenizer the data module encodes with, or None when the data module builds it itself."""
        return None

    def datamodule(self, data_cfg, task_cfg, tokenizer):
        """The task's LightningDataModule (not yet prepared or set up)."""
        raise NotImplementedError

    def build_model(self, model_cfg, attention_cfg, stability_cfg, dm) -> tuple[nn.Module, Optional[dict[str, Any]]]:
        """(the model to train, what model.init_from gave it: {"source", "new", "reinitialized"} or None)."""
        raise NotImplementedError

    def training_model(self, model_cfg, attention_cfg, stability_cfg, peft_cfg, dm,
                       init_dir: Optional[Path] = None) -> tuple[nn.Module, Optional[dict[str, Any]]]:
        """The model the run trains and `build_model`'s report: the task's model with the adapters of the `peft`
        group injected (train.adapters.lora.wrap: with peft=lora the base is frozen; peft=none leaves it as built).
        Every task goes through here, so a task, one defined outside the repository too, trains with LoRA without
        code of its own. init_dir: the folder model.init_from resolved to (a hub snapshot: the adapter names the hub
        id and its commit as its base model). Raises ConfigError for a LoRA target module the model does not have."""
        from train.adapters import lora
        from train.checkpoint.layout import hub_commit

        model, report = self.build_model(model_cfg, attention_cfg, stability_cfg, dm)
        base = lora.base_model(model_cfg.init_from, init_dir)
        revision = hub_commit(init_dir) if init_dir is not None else None
        return lora.wrap(model, peft_cfg, base=base, revision=revision), report

    def sequence_length(self, data_cfg, task_cfg) -> tuple[str, int]:
        """(config key, value) of the longest sequence the data produce; must fit the model's n_positions."""
        raise NotImplementedError

    def check_sequence_length(self, model_config, data_cfg, task_cfg) -> None:
        """Raise ConfigError when the longest sequence the data produce does not fit the model's n_positions."""
        key, length = self.sequence_length(data_cfg, task_cfg)
        if length > model_config.n_positions:
            raise ConfigError(f"{key}={length} exceeds the model's n_positions={model_config.n_positions}; "
                              f"lower {key}.")

    def micro_batch_size(self, data_cfg, task_cfg) -> int:
        """Examples per loader batch on each rank (DeepSpeed's train_micro_batch_size_per_gpu): the LM's data.batch_size."""
        return data_cfg.batch_size

    def module(self, model: nn.Module, dm, task_cfg, trainer_cfg, optim_cfg, meta: dict) -> GPT2LitModule:
        """The LightningModule that trains `model` (its loss and validation metrics)."""
        raise NotImplementedError

    def monitor(self, task_cfg, dm) -> Optional[tuple[str, str]]:
        """(metric, "max" | "min") that picks checkpoints/best and the export; None: export the final model."""
        return None

    def summary(self, module: GPT2LitModule, dm, rows: list[dict[str, Optional[float]]]) -> dict[str, Any]:
        """Fields the task adds to summary.json; rows: metrics.csv as numbers."""
        return {}

    def export_tokenizer(self, tokenizer):
        """The tokenizer the HF export ships: one that transformers' documented calls make feed the model as
        training did. The LM's: the training tokenizer as it is."""
        return tokenizer

    def checkpoint_meta(self) -> dict[str, Any]:
        """Fields every checkpoint's meta.json gets from the task (train/cli/export.py reads "data_task" to give an
        export of a checkpoint the same tokenizer layout as the run's own export)."""
        return {}

    def after_export(self, net: nn.Module, tokenizer, sample_cfg, run_dir: Path) -> dict[str, Any]:
        """Files the task writes next to the export, as summary fields {name: path}."""
        return {}

    @staticmethod
    def module_args(trainer_cfg, optim_cfg, meta: dict) -> dict[str, Any]:
        """The GPT2LitModule arguments every task takes from the trainer and optim groups."""
        return dict(optim=optim_cfg, max_steps=1 if trainer_cfg.fast_dev_run else trainer_cfg.max_steps,
                    log_every_n_steps=trainer_cfg.log_every_n_steps, compile=trainer_cfg.compile,
                    activation_checkpointing=trainer_cfg.activation_checkpointing, meta=meta)


# ------------------------------------------------------------------------------------------------ fine-tuning
class TaskModule(GPT2LitModule):
    """GPT2LitModule for a fine-tuning head: the forward takes the batch keys the head accepts (its TaskData's
    model_keys) except the targets (`target_keys`: the task sums its loss terms itself, `loss_sums`, and counts
    their items, `count_items`), and validation keeps what each task scores of every batch (`keep`, on the CPU) to
    score the WHOLE validation set at its end (`score`): qa's post-processing needs every window of an example.
    Every rank scores the whole set (TaskDataModule's validation loader is not sharded).
    """

    target_keys: tuple[str, ...] = ()  # batch keys that are targets of the loss, not inputs of the forward

    def __init__(self, model: nn.Module, optim, max_steps: int, *, model_keys: tuple[str, ...],
                 loss_weights: Optional[dict[str, float]] = None, **kwargs):
        super().__init__(model, optim, max_steps, loss_weights=loss_weights or {"examples": 1.0}, **kwargs)
        self.model_keys = tuple(model_keys)
        self.kept: list[tuple] = []

    # The defaults, for a head of one's own that computes its loss itself: that loss is taken as a mean over the
    # batch's examples. A head whose loss averages over anything else (tokens, labelled positions) overrides both,
    # as the built-in tasks do, or its gradients change with how a step is cut into micro-batches.
    def count_items(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"examples": torch.tensor(batch["input_ids"].shape[0])}

    def loss_sums(self, batch: dict[str, torch.Tensor]) -> tuple[Any, dict[str, torch.Tensor]]:
        out = self.outputs(batch)
        return out, {"examples": out.loss.float() * batch["input_ids"].shape[0]}

    def outputs(self, batch: dict[str, torch.Tensor]) -> Any:
        """The head's outputs (logits) for the batch's inputs; no loss is computed in the model."""
        return self.model(**{k: batch[k] for k in self.model_keys if k in batch and k not in self.target_keys})

    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        self.kept = []

    def collect(self, outputs: Any, batch: dict[str, torch.Tensor]) -> None:
        self.kept.append(self.keep(outputs, batch))

    def val_metrics(self, val_loss: float) -> dict[str, float]:
        scores = self.score(self.kept) if self.kept else {}
        self.kept = []
        return scores

    def keep(self, outputs: Any, batch: dict[str, torch.Tensor]) -> tuple:
        """What the task's score needs of one validation batch (CPU tensors)."""
        raise NotImplementedError

    def score(self, kept: list[tuple]) -> dict[str, float]:
        """The task's validation metrics {"val/<name>": value} over everything kept since the validation began."""
        raise NotImplementedError


class FineTuneTask(Task):
    """A head fine-tuned on task data (data_pipelines.tasks): the tokenizer of model.init_from, a head sized by the
    data, the whole validation set scored, and checkpoints/best + the export at the best monitored metric."""

    full_validation = True
    module_class: type[TaskModule] = TaskModule
    data_task: Optional[str] = None  # the data_pipelines task whose data it trains on; None: its own name
    data: Any = None  # its own data_pipelines.tasks.TaskData (a task defined outside); None: the built-in one

    def task_data(self):
        """The data side of this task (data_pipelines.tasks.TaskData): `data`, else the built-in one named
        `data_task` or the task's own name."""
        from data_pipelines.tasks import task_data

        return self.data if self.data is not None else task_data(self.data_task or self.name)

    def micro_batch_size(self, data_cfg, task_cfg) -> int:
        """A fine-tuning task's loader batch is task.data.batch_size (the `data` group is the LM corpus)."""
        return task_cfg.data.batch_size

    def tokenizer(self, data_cfg, init_from: Optional[str], resume_from: Optional[Path], run_dir: Path):
        """The tokenizer of model.init_from (its ids index that embedding table; the job put it into
        data.tokenizer), a resumed run's own, data.tokenizer, or else the byte-level BPE trained (and cached) on the
        LM data source, as an LM run would."""
        from gpt2 import GPT2TokenizerFast

        if resume_from is not None and (run_dir / "tokenizer" / "tokenizer.json").is_file():
            return GPT2TokenizerFast.from_pretrained(str(run_dir / "tokenizer"))
        if init_from and not data_cfg.tokenizer:
            raise ConfigError(
                f"model.init_from={init_from} has no tokenizer next to it (tokenizer.json / vocab.json, or the "
                f"run's tokenizer/ folder); set data.tokenizer=<the folder of the tokenizer that model was trained "
                f"with>."
            )
        from data_pipelines.sources import DocumentSource
        from data_pipelines.tokenizing import get_tokenizer

        return get_tokenizer(data_cfg, DocumentSource(data_cfg))

    def export_tokenizer(self, tokenizer):
        """The task data's layout carried by the tokenizer (`TaskData.hf_tokenizer`: prefix space, pair template)."""
        return self.task_data().hf_tokenizer(tokenizer)

    def checkpoint_meta(self) -> dict[str, Any]:
        """{"data_task": name} of built-in task data (data_pipelines.tasks.task_data finds it by that name)."""
        return {"data_task": self.task_data().name} if self.data is None else {}

    def datamodule(self, data_cfg, task_cfg, tokenizer):
        from data_pipelines.tasks import TaskDataModule

        return TaskDataModule(self.task_data(), task_cfg.data, tokenizer)

    def head_config(self, dm) -> dict[str, Any]:
        """The GPT2Config fields of the head, from the data; GPT-2 has no pad token: fine-tuning pads with eos."""
        return {"pad_token_id": dm.pad_token_id}

    @staticmethod
    def label_config(dm) -> dict[str, Any]:
        """A classifier head's label fields (they reach the export's config.json: transformers' pipelines name the
        labels with them)."""
        return {"num_labels": dm.num_labels, "id2label": dm.id2label, "label2id": dm.label2id}

    def build_model(self, model_cfg, attention_cfg, stability_cfg, dm) -> tuple[nn.Module, Optional[dict[str, Any]]]:
        """The head model (train.tasks.model.build_head_model); the log names every parameter that did not come from
        model.init_from, and warns when a head of another shape (another label count) was re-initialised."""
        log.info("%s", dm.summary())
        tok = dm.tokenizer
        model, report = build_head_model(self.model_class, model_cfg, attention_cfg, stability_cfg, len(tok),
                                         tok.eos_token_id, self.head_config(dm))
        if report["reinitialized"]:
            log.warning(
                "model.init_from=%s: the head's shape differs (another label count: %d labels now), so it was "
                "RE-INITIALISED: %s", model_cfg.init_from, model.config.num_labels, "; ".join(report["reinitialized"]),
            )
        if report["new"] and report["source"] is not None:
            log.info("model.init_from=%s: new %s head initialised: %s", model_cfg.init_from, self.model_class.__name__,
                     ", ".join(report["new"]))
        return model, report

    def sequence_length(self, data_cfg, task_cfg) -> tuple[str, int]:
        return "task.data.max_length", task_cfg.data.max_length

    def module(self, model: nn.Module, dm, task_cfg, trainer_cfg, optim_cfg, meta: dict) -> TaskModule:
        return self.module_class(model, model_keys=self.task_data().model_keys,
                                 **self.module_options(model, dm, task_cfg),
                                 **self.module_args(trainer_cfg, optim_cfg, meta))

    def module_options(self, model: nn.Module, dm, task_cfg) -> dict[str, Any]:
        """The task's own arguments of its module_class."""
        return {}

    def default_monitor(self, dm) -> tuple[str, str]:
        """(metric, mode) picking checkpoints/best when task.monitor is null."""
        raise NotImplementedError

    def monitor(self, task_cfg, dm) -> tuple[str, str]:
        metric, mode = self.default_monitor(dm)
        if task_cfg.monitor is not None:
            metric = task_cfg.monitor
            mode = task_cfg.monitor_mode or ("min" if metric in ("val/loss", "val/mse") else "max")
        elif task_cfg.monitor_mode is not None:
            mode = task_cfg.monitor_mode
        return metric, mode

    def summary(self, module: GPT2LitModule, dm, rows: list[dict[str, Optional[float]]]) -> dict[str, Any]:
        return {"task": self.name, "num_labels": module.model.config.num_labels,
                "id2label": {str(k): v for k, v in (dm.id2label or {}).items()} or None,
                "final_metrics": dict(module.last_val_metrics)}


__all__ = ["FineTuneTask", "Task", "TaskModule"]
