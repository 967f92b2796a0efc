"""`TaskDataConfig`: where a fine-tuning task's examples come from, which columns hold what, and how they are encoded.

One dataclass serves the four tasks; the column fields default to `None`, meaning "the task's default", listed in
each task's `TaskData.columns` (the first candidate present in the data wins, so GLUE's `sentence`, CoNLL's `ner_tags` and
SWAG's `sent1`/`sent2`/`ending0..3` work without overrides). A column named explicitly must exist, else the error
lists the columns the data has.

Default columns per task (local jsonl/csv/parquet and hub alike):

    cls        text: "text" | "sentence"        label: "label"           (text_pair_column: optional 2nd text)
               label: int ids, or strings (mapped to ids: sorted, or in `label_list` order), or floats with
               problem_type="regression" (num_labels = 1).
    token_cls  tokens: "tokens" (list[str]; in csv a JSON list or a space-separated string)
               tags: "tags" | "ner_tags" (list[str] BIO tags, or list[int] ids — a hub ClassLabel gives the names)
    qa         id: "id" (optional; else the row index)   question: "question"   context: "context"
               answers: "answers" = {"text": [...], "answer_start": [...]} (SQuAD), or flat columns
               "answer_text" + "answer_start" (one answer per row; what a csv can hold)
    mc         context: "context" | "startphrase" | "sent1"   (+ "sent2" appended when `sent1` is used: SWAG)
               endings: "endings" (list[str]) | the columns "ending0", "ending1", ... (SWAG)   label: "label"
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from data_pipelines.config import default_cache_dir, to_dataclass

TASK_SOURCES = ("demo", "jsonl", "csv", "parquet", "hub")
FILE_BUILDERS = {"jsonl": "json", "csv": "csv", "parquet": "parquet"}  # source -> datasets builder
PROBLEM_TYPES = ("single_label_classification", "regression")
MC_LM_LABELS = ("all", "correct", "none")

@dataclass
class TaskDataConfig:
    # --- where the examples come from ---
    source: str = "demo"  # demo (offline, built from the embedded corpus) | jsonl | csv | parquet | hub
    path: Optional[str] = None  # jsonl/csv/parquet: training file, folder or glob
    val_path: Optional[str] = None  # jsonl/csv/parquet: validation file(s); else `val_fraction` of the training rows
    name: Optional[str] = None  # hub: dataset id, e.g. "glue", "conll2003", "squad", "swag"
    config_name: Optional[str] = None  # hub: configuration, e.g. "sst2" for glue, "regular" for swag
    split: str = "train"  # hub: training split
    val_split: Optional[str] = "validation"  # hub: validation split (None -> `val_fraction` of the training split)
    val_fraction: float = 0.1  # held-out share of the training rows when no validation file/split is given
    max_train_examples: Optional[int] = None  # keep only the first N training examples (quick runs)
    max_val_examples: Optional[int] = None
    # --- columns (None -> the task's default: its TaskData.columns) ---
    text_column: Optional[str] = None
    text_pair_column: Optional[str] = None
    label_column: Optional[str] = None
    tokens_column: Optional[str] = None
    tags_column: Optional[str] = None
    id_column: Optional[str] = None
    question_column: Optional[str] = None
    context_column: Optional[str] = None
    answers_column: Optional[str] = None
    answer_text_column: Optional[str] = None
    answer_start_column: Optional[str] = None
    context_suffix_column: Optional[str] = None  # mc: appended to the context with a space (SWAG's sent2)
    endings_column: Optional[str] = None
    ending_columns: Optional[list[str]] = None  # mc: one column per ending (SWAG's ending0..ending3); else detected
    # --- labels ---
    label_list: Optional[list[str]] = None  # cls/token_cls: label names in id order; else sorted labels (or hub names)
    num_labels: Optional[int] = None  # cls with int labels and no names: the label count (else max label + 1)
    problem_type: Optional[str] = None  # cls: None (classification) | "single_label_classification" | "regression"
    # --- encoding ---
    max_length: int = 128  # tokens per sequence (per window for qa, per choice for mc); <= the model's n_positions
    doc_stride: int = 32  # qa: tokens shared by consecutive windows of a long context (HF run_qa's doc_stride)
    max_question_length: int = 48  # qa: longer questions keep their first tokens
    max_answer_length: int = 30  # qa post-processing: longest predicted span in tokens
    n_best_size: int = 20  # qa post-processing: start/end candidates per window
    num_choices: Optional[int] = None  # mc: choices per example (None -> inferred; every example must have it)
    mc_lm_labels: str = "all"  # mc LM labels: "all" choices (HF run_openai_gpt), the "correct" one only, or "none"
    # --- demo data ---
    demo_train_size: Optional[int] = None  # None -> the task's TaskData.demo_sizes
    demo_val_size: Optional[int] = None
    # --- loading ---
    batch_size: int = 16
    eval_batch_size: Optional[int] = None  # None -> batch_size
    num_workers: int = 0
    cache_dir: Optional[str] = None  # None -> $GPT2_FORGE_CACHE or ~/.cache/gpt2-forge
    seed: int = 1337  # demo construction, the val_fraction split and the training shuffle

    def __post_init__(self) -> None:
        if self.source not in TASK_SOURCES:
            raise ValueError(
                f"data.source={self.source!r} is not a task data source; use one of {', '.join(TASK_SOURCES)}."
            )
        if self.source in FILE_BUILDERS and not self.path:
            raise ValueError(f"data.source={self.source} needs data.path=<{self.source} file, folder or glob>.")
        if self.source == "hub" and not self.name:
            raise ValueError("data.source=hub needs data.name=<dataset id>, e.g. data.name=glue data.config_name=sst2.")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction={self.val_fraction} must be in (0, 1).")
        if self.max_length < 8:
            raise ValueError(f"data.max_length={self.max_length} is too small; use at least 8 tokens.")
        if self.doc_stride < 0:
            raise ValueError(f"data.doc_stride={self.doc_stride} must be >= 0.")
        if self.max_answer_length < 1 or self.n_best_size < 1:
            raise ValueError("data.max_answer_length and data.n_best_size must be >= 1.")
        if self.num_choices is not None and self.num_choices < 2:
            raise ValueError(f"data.num_choices={self.num_choices} must be at least 2.")
        if self.mc_lm_labels not in MC_LM_LABELS:
            raise ValueError(f"data.mc_lm_labels={self.mc_lm_labels!r} must be one of {', '.join(MC_LM_LABELS)}.")
        if self.problem_type is not None and self.problem_type not in PROBLEM_TYPES:
            raise ValueError(
                f"data.problem_type={self.problem_type!r} must be null or one of {', '.join(PROBLEM_TYPES)}."
            )
        if self.label_list is not None:
            self.label_list = [str(x) for x in self.label_list]
            if len(set(self.label_list)) != len(self.label_list) or not self.label_list:
                raise ValueError(f"data.label_list={self.label_list} must be a non-empty list of distinct labels.")
            if self.num_labels is not None and self.num_labels != len(self.label_list):
                raise ValueError(
                    f"data.num_labels={self.num_labels} disagrees with data.label_list ({len(self.label_list)} names); "
                    f"drop one of them."
                )
        if self.num_labels is not None and self.num_labels < 1:
            raise ValueError(f"data.num_labels={self.num_labels} must be >= 1.")
        if self.batch_size < 1 or (self.eval_batch_size is not None and self.eval_batch_size < 1):
            raise ValueError("data.batch_size and data.eval_batch_size must be >= 1.")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers={self.num_workers} must be >= 0.")
        for f in ("max_train_examples", "max_val_examples", "demo_train_size", "demo_val_size"):
            v = getattr(self, f)
            if v is not None and v < 1:
                raise ValueError(f"data.{f}={v} must be >= 1 (or null).")

    @property
    def cache_root(self) -> Path:
        return Path(self.cache_dir).expanduser() if self.cache_dir else default_cache_dir()  # the LM pipeline's root


def to_task_data_config(node) -> TaskDataConfig:
    """DictConfig / dict / TaskDataConfig -> a validated TaskDataConfig (unknown keys are named in the error)."""
    return to_dataclass(TaskDataConfig, node, "task data config")


def register_configs() -> None:
    """Register `TaskDataConfig` with Hydra's ConfigStore as `task_data_schema`, so a YAML node typed by it rejects a
    misspelt key at composition time (as data_pipelines.config.register_configs does for `DataConfig`)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="task_data_schema", node=TaskDataConfig)
