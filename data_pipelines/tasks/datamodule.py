"""`TaskDataModule`: the LightningDataModule of the fine-tuning tasks (cls, token_cls, qa, mc).

    dm = TaskDataModule("cls", TaskDataConfig(source="demo"), tokenizer)   # or a TaskData object instead of a name
    dm.prepare_data(); dm.setup()
    dm.num_labels, dm.id2label, dm.label2id, dm.problem_type   -> the head's config (and the export's config.json)
    batch = next(iter(dm.train_dataloader()))
    model(**dm.model_inputs(batch))                              -> loss

Batches (right-padded with `pad_token_id` = the tokenizer's pad token, else eos — HF GPT-2 fine-tuning's
`tokenizer.pad_token = tokenizer.eos_token`; `attention_mask` marks real tokens; labels are -100 on padding):

    cls        input_ids, attention_mask (B, T); labels (B,) long (float for regression)
    token_cls  input_ids, attention_mask, labels (B, T)
    qa         input_ids, attention_mask (B, T); start_positions, end_positions (B,); example_index, feature_index (B,)
    mc         input_ids, attention_mask, labels (B, C, T) (labels absent with mc_lm_labels=none); mc_token_ids (B, C);
               mc_labels (B,)

`model_inputs(batch)` keeps the keys the matching gpt2 head's forward takes (`TaskData.model_keys`). Validation for qa:
`val_features[feature_index]` holds the window's `offsets` and `example_index`, `val_examples[example_index]` the
context and gold answers — what train/tasks/qa.py `postprocess_qa` + `squad_metrics` need (`qa_eval_data()` bundles
them). Training batches come from the LM data's ResumableBatchSampler: an endless seeded shuffle, a new permutation each
pass, rank-sharded, resuming after `consumed_samples` (part of every checkpoint); validation is the full set in
fixed order on every rank, so qa post-processing sees every window. Build the Trainer with
`use_distributed_sampler=False` (as for the LM stream) so Lightning keeps these samplers.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch.utils.data import BatchSampler, DataLoader, Sampler, SequentialSampler

from data_pipelines.sampler import ResumableBatchSampler, step_batches

from data_pipelines.tasks.base import TaskData, task_data
from data_pipelines.tasks.config import TaskDataConfig, to_task_data_config
from data_pipelines.tasks.demo import demo_files
from data_pipelines.tasks.loading import LabelMap, load_splits


class TaskCollator:
    """Pads a list of features to the longest in the batch, by the task's `TaskData.collate` (a class, so DataLoader
    workers can pickle it)."""

    def __init__(self, data: TaskData, pad_token_id: int, regression: bool = False):
        self.data, self.pad, self.regression = data, pad_token_id, regression

    def __call__(self, feats: list[dict]) -> dict[str, torch.Tensor]:
        return self.data.collate(feats, self.pad, self.regression)


class TaskDataModule(L.LightningDataModule):
    """The LightningDataModule of a fine-tuning task: `task` is a built-in task's name or its `TaskData` object, which
    says everything task-specific (columns, labels, encoding, batches, demo set); this class loads, encodes once,
    and serves resumable training batches and the full validation set."""

    def __init__(self, task: str | TaskData, cfg: TaskDataConfig | dict, tokenizer):
        super().__init__()
        self.data = task_data(task)
        self.task = self.data.name
        self.cfg = to_task_data_config(cfg)
        self.data.check_config(self.cfg)
        if tokenizer is None or tokenizer.eos_token_id is None:
            raise ValueError(
                "the task data needs a tokenizer with an eos token (<|endoftext|>): it separates and pads sequences."
            )
        self.tokenizer = tokenizer
        self.label_map: LabelMap | None = None
        self.train_examples: list[dict] | None = None
        self.val_examples: list[dict] | None = None
        self.train_features: list[dict] | None = None
        self.val_features: list[dict] | None = None
        self._files: tuple[str | None, str | None] = (None, None)
        # training samples consumed by all ranks together (the training step adds to it; saved in checkpoints)
        self.consumed_samples = 0

    # ------------------------------------------------------------------ lifecycle
    def prepare_data(self) -> None:
        """Build + cache the demo jsonl files (source=demo; idempotent). Other sources need no preparation."""
        self._files = self._source_files()

    def _source_files(self) -> tuple[str | None, str | None]:
        cfg = self.cfg
        if cfg.source != "demo":
            return cfg.path, cfg.val_path
        train, val = demo_files(self.data, cfg.cache_root, cfg.seed, cfg.demo_train_size, cfg.demo_val_size)
        return str(train), str(val)

    def setup(self, stage: str | None = None) -> None:
        if self.train_features is not None:
            return
        cfg, data, tok = self.cfg, self.data, self.tokenizer
        train_path, val_path = self._files if self._files[0] else self._source_files()
        train_raw, val_raw = load_splits(cfg, train_path, val_path)
        self.train_examples = data.read_examples(train_raw, cfg)
        self.val_examples = data.read_examples(val_raw, cfg)
        self.label_map = data.label_map(self.train_examples, train_raw, cfg)
        data.check_splits(self.train_examples, self.val_examples)
        self.train_features = data.encode(self.train_examples, tok, cfg, self.label_map, train_raw.where, False)
        self.val_features = data.encode(self.val_examples, tok, cfg, self.label_map, val_raw.where, True)
        for i, f in enumerate(self.train_features):
            f["feature_index"] = i
        for i, f in enumerate(self.val_features):
            f["feature_index"] = i

    def _require_setup(self) -> None:
        if self.train_features is None:
            raise RuntimeError("TaskDataModule.setup() has not run yet; call dm.prepare_data(); dm.setup() first.")

    # ------------------------------------------------------------------ what the head / export need
    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.tokenizer.eos_token_id

    @property
    def num_labels(self) -> int:
        """The head's output count (`TaskData.num_labels`): cls/token_cls the label count (1 for regression), qa 2
        (start, end), mc 1 score per choice."""
        self._require_setup()
        return self.data.num_labels(self.label_map)

    @property
    def label2id(self) -> dict[str, int] | None:
        self._require_setup()
        return self.label_map.label2id if self.label_map and not self.label_map.regression else None

    @property
    def id2label(self) -> dict[int, str] | None:
        self._require_setup()
        return self.label_map.id2label if self.label_map and not self.label_map.regression else None

    @property
    def problem_type(self) -> str | None:
        """cls: "regression" or "single_label_classification" (what GPT2Config.problem_type takes); else None."""
        self._require_setup()
        return self.data.problem_type(self.label_map)

    @property
    def num_choices(self) -> int | None:
        self._require_setup()
        return self.data.num_choices(self.train_examples)

    def model_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The batch keys the task's gpt2 head takes as forward arguments."""
        return self.data.model_inputs(batch)

    def qa_eval_data(self) -> tuple[list[dict], list[str], list[list[str]]]:
        """qa validation: (features with "offsets"/"example_index", contexts, gold answer texts) by index."""
        self._require_setup()
        return (self.val_features, [e["context"] for e in self.val_examples],
                [e["answers"]["text"] for e in self.val_examples])

    # ------------------------------------------------------------------ loaders
    @property
    def collator(self) -> TaskCollator:
        regression = bool(self.label_map and self.label_map.regression)
        return TaskCollator(self.data, self.pad_token_id, regression)

    def _loader(self, feats: list[dict], batch_sampler: Sampler[list[int]]) -> DataLoader:
        cfg = self.cfg
        return DataLoader(feats, batch_sampler=batch_sampler, collate_fn=self.collator, num_workers=cfg.num_workers,
                          pin_memory=torch.cuda.is_available(), persistent_workers=cfg.num_workers > 0)

    def train_dataloader(self):
        """Endless seeded batches, a fresh shuffle each pass, sharded across ranks, starting after `consumed_samples`
        (ResumableBatchSampler, the LM data's sampler): a resumed run sees exactly the samples the uninterrupted run
        would have seen, whatever its micro-batch, accumulation or rank count. Under a Trainer whose module counts
        items, each micro-batch carries its optimizer step's item counts (`sampler.StepBatches`). The trainer stops
        on max_steps."""
        self._require_setup()
        trainer = getattr(self, "trainer", None)
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        sampler = ResumableBatchSampler(len(self.train_features), self.cfg.batch_size, rank=rank, world_size=world,
                                        seed=self.cfg.seed, consumed_samples=self.consumed_samples)
        return step_batches(self._loader(self.train_features, sampler), trainer)

    def val_dataloader(self) -> DataLoader:
        self._require_setup()
        batches = BatchSampler(SequentialSampler(self.val_features), self.cfg.eval_batch_size or self.cfg.batch_size,
                               drop_last=False)
        return self._loader(self.val_features, batches)

    # ------------------------------------------------------------------ state (saved in Lightning checkpoints)
    def state_dict(self) -> dict:
        return {"consumed_samples": int(self.consumed_samples)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.consumed_samples = int(state_dict.get("consumed_samples", 0))

    def summary(self) -> str:
        """One line for the run log: examples, features (qa windows), labels."""
        self._require_setup()
        s = (f"task={self.task}: {len(self.train_examples)} train / {len(self.val_examples)} val examples, "
             f"{len(self.train_features)} / {len(self.val_features)} features")
        if self.label_map is not None:
            s += f", num_labels={self.num_labels}" + (f" {self.label_map.names[:10]}" if self.id2label else "")
        return s
