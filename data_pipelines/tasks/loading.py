"""Rows in, columns resolved, labels mapped: the task-independent half of reading a fine-tuning dataset.

Every source goes through `datasets.load_dataset`: local files with the "json"/"csv"/"parquet" builders, hub datasets
by name (`load_dataset(name, config_name, split=...)`), and the demo sets as the jsonl files `demo.py` writes — so the
demo exercises exactly the code path a user's files take.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from typing import Any, Optional

from data_pipelines.tasks.config import FILE_BUILDERS, TaskDataConfig


@dataclass
class RawSplit:
    """One split as columns (name -> list of values), its `datasets` features (for ClassLabel names) and a label
    naming where it came from (used in every error message)."""

    columns: dict[str, list]
    features: Any = None
    where: str = "the data"

    def __len__(self) -> int:
        return len(next(iter(self.columns.values()))) if self.columns else 0

    def take(self, indices: list[int], where: str | None = None) -> "RawSplit":
        return RawSplit({k: [v[i] for i in indices] for k, v in self.columns.items()}, self.features,
                        where or self.where)


# ------------------------------------------------------------------------------------------------------ loading
def _load(cfg: TaskDataConfig, split: str, path: str | None = None):
    import datasets

    datasets.disable_progress_bars()
    if cfg.source in FILE_BUILDERS or cfg.source == "demo":
        from data_pipelines.sources import resolve_files

        kind = "jsonl" if cfg.source == "demo" else cfg.source
        key = "task.data.path" if split == "train" else "task.data.val_path"
        files = resolve_files(path, kind, key)
        ds = datasets.load_dataset(FILE_BUILDERS[kind], data_files=[str(f) for f in files], split="train",
                                   cache_dir=str(cfg.cache_root / "hf_datasets"))
        where = ", ".join(str(f) for f in files[:3]) + (" ..." if len(files) > 3 else "")
        return ds, where
    hub_split = cfg.split if split == "train" else cfg.val_split
    where = f"hub dataset {cfg.name}" + (f"/{cfg.config_name}" if cfg.config_name else "") + f" [{hub_split}]"
    try:
        ds = datasets.load_dataset(cfg.name, cfg.config_name, split=hub_split)
    except (ConnectionError, FileNotFoundError) as e:  # unreachable / not cached, or no such dataset
        from data_pipelines.sources import hub_dataset_error

        raise FileNotFoundError(hub_dataset_error(
            where, e, local="task.data.source=jsonl task.data.path=<file> (or csv / parquet)")) from e
    return ds, where


def _to_raw(ds, where: str, limit: Optional[int]) -> RawSplit:
    if limit is not None and len(ds) > limit:
        ds = ds.select(range(limit))
    if len(ds) == 0:
        raise ValueError(f"{where} has no rows; give a non-empty dataset.")
    return RawSplit(ds.to_dict(), ds.features, where)


def load_splits(cfg: TaskDataConfig, train_path: str | None = None, val_path: str | None = None):
    """-> (train RawSplit, val RawSplit). Without a validation file/split, a seeded `val_fraction` of the training
    rows is held out (the same rows for the same seed)."""
    train_path = train_path or cfg.path
    val_path = val_path if val_path is not None else cfg.val_path
    ds, where = _load(cfg, "train", train_path)
    has_val = bool(val_path) if cfg.source != "hub" else bool(cfg.val_split)
    if has_val:
        vds, vwhere = _load(cfg, "val", val_path)
        return _to_raw(ds, where, cfg.max_train_examples), _to_raw(vds, vwhere, cfg.max_val_examples)
    raw = _to_raw(ds, where, None)
    n = len(raw)
    n_val = max(1, int(round(n * cfg.val_fraction)))
    if n - n_val < 1:
        raise ValueError(f"{where} has {n} rows: too few to hold out a validation split; add rows or a val file.")
    order = list(range(n))
    random.Random(cfg.seed).shuffle(order)
    val_idx, train_idx = sorted(order[:n_val]), sorted(order[n_val:])
    if cfg.max_train_examples:
        train_idx = train_idx[: cfg.max_train_examples]
    if cfg.max_val_examples:
        val_idx = val_idx[: cfg.max_val_examples]
    return raw.take(train_idx, where + " (train part)"), raw.take(val_idx, where + f" (held-out {cfg.val_fraction:g})")


# ------------------------------------------------------------------------------------------------------ columns
def resolve_column(raw: RawSplit, logical: str, candidates: tuple[str, ...], *, required: bool = True,
                   config_key: str | None = None) -> Optional[str]:
    """The first of `candidates` that `raw` has; a required column that is missing -> an error listing the columns
    the data has and the config key that names it."""
    for c in candidates:
        if c in raw.columns:
            return c
    if not required:
        return None
    have = ", ".join(map(str, raw.columns)) or "none"
    wanted = " or ".join(repr(c) for c in candidates) or f"a {logical} column"
    fix = f"set data.{config_key}=<one of them>" if config_key else "rename the column"
    raise ValueError(f"{raw.where} has no {logical} column {wanted} (columns: {have}); {fix}.")


def class_names(features: Any, column: str) -> Optional[list[str]]:
    """ClassLabel names of `column` (or of its items, for a sequence column), if the dataset declares them."""
    if features is None or column not in features:
        return None
    feat = features[column]
    for f in (feat, getattr(feat, "feature", None)):  # Sequence(ClassLabel) / List(ClassLabel) keep it in .feature
        names = getattr(f, "names", None)
        if names:
            return list(names)
    return None


def as_list(value: Any, what: str, where: str, row: int) -> list:
    """A list column value; csv cells hold a JSON list or a space-separated string."""
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, str):
        s = value.strip()
        if s.startswith("["):
            try:
                parsed = json.loads(s)
            except json.JSONDecodeError:
                raise ValueError(f"row {row} of {where}: {what} {value[:60]!r} is not a valid JSON list.") from None
            if isinstance(parsed, list):
                return parsed
        return s.split()
    raise ValueError(f"row {row} of {where}: {what} should be a list, got {type(value).__name__} {value!r}.")


# ------------------------------------------------------------------------------------------------------ labels
@dataclass
class LabelMap:
    """Label names in id order. `label2id`/`id2label` are what the export writes into config.json."""

    names: list[str]
    regression: bool = False
    _index: dict[str, int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._index = {n: i for i, n in enumerate(self.names)}

    @property
    def num_labels(self) -> int:
        return 1 if self.regression else len(self.names)

    @property
    def label2id(self) -> dict[str, int]:
        return dict(self._index)

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.names))

    def encode(self, value: Any, where: str) -> Any:
        """One raw label -> its id (a float for regression). `where` names the row in the error."""
        if self.regression:
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value != value:
                raise ValueError(f"{where}: regression label {value!r} is not a number.")
            return float(value)
        v = _normalise(value)
        if isinstance(v, str):
            if v in self._index:
                return self._index[v]
            raise ValueError(
                f"{where}: unknown label {v!r}; known labels are {self.names[:20]}"
                f"{' ...' if len(self.names) > 20 else ''} (fix the data, or list every label in data.label_list)."
            )
        if 0 <= v < len(self.names):
            return v
        raise ValueError(
            f"{where}: label {v} is out of range for {len(self.names)} labels (ids 0..{len(self.names) - 1}); "
            f"fix the data or set data.num_labels / data.label_list to cover it."
        )


def _normalise(value: Any) -> int | str:
    """int-like -> int (bool, 1.0, numpy ints), anything else -> str."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if hasattr(value, "item") and not isinstance(value, str):  # numpy scalars
        return _normalise(value.item())
    if value is None:
        return "None"
    return str(value)


def build_label_map(values: list, cfg: TaskDataConfig, names: Optional[list[str]], where: str,
                    regression: bool = False) -> LabelMap:
    """Label names from (in order of precedence) `cfg.label_list`, a hub ClassLabel's `names`, the sorted set of
    string labels, or range(num_labels) for int labels (num_labels = cfg.num_labels or max label + 1)."""
    if regression:
        return LabelMap(["LABEL_0"], regression=True)
    if cfg.label_list is not None:
        return LabelMap(list(cfg.label_list))
    if names:
        return LabelMap([str(n) for n in names])
    norm = [_normalise(v) for v in values]
    strs = sorted({v for v in norm if isinstance(v, str)})
    ints = sorted({v for v in norm if isinstance(v, int)})
    if strs and ints:
        raise ValueError(
            f"{where} mixes string labels ({strs[:3]}) and integer labels ({ints[:3]}); use one kind, or give "
            f"data.label_list in id order."
        )
    if strs:
        return LabelMap(strs)  # sorted: the same id for the same label on every run and every rank
    if not ints:
        raise ValueError(f"{where} has no labels.")
    if ints[0] < 0:
        raise ValueError(
            f"{where}: label {ints[0]} is negative (an unlabeled test split?); use a labeled split for training."
        )
    n = cfg.num_labels if cfg.num_labels is not None else ints[-1] + 1
    return LabelMap([str(i) for i in range(n)])


def pad(seqs: list[list[int]], value: int, length: int) -> list[list[int]]:
    """Each sequence right-padded with `value` to `length`."""
    return [s + [value] * (length - len(s)) for s in seqs]


def padded_ids(feats: list[dict], pad_token_id: int) -> dict:
    """input_ids and attention_mask (B, T) of single-sequence features, right-padded to the longest."""
    import torch

    T = max(len(f["input_ids"]) for f in feats)
    ids = [f["input_ids"] for f in feats]
    return {"input_ids": torch.tensor(pad(ids, pad_token_id, T)),  # (B, T)
            "attention_mask": torch.tensor(pad([[1] * len(s) for s in ids], 0, T))}  # (B, T)


# ------------------------------------------------------------------------------------------------ export layouts
def with_prefix_space(tokenizer):
    """A copy of `tokenizer` that puts a space before its input (and before each word of pre-split input), as
    transformers' GPT-2 tokenizer does with add_prefix_space=True (saved in tokenizer_config.json and tokenizer.json's
    ByteLevel pre-tokenizer, which transformers rebuilds from it)."""
    import copy

    from tokenizers import pre_tokenizers

    tok = copy.deepcopy(tokenizer)
    tok.add_prefix_space = True
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=True)
    return tok


def with_pair_template(tokenizer, pair: str):
    """A copy of `tokenizer` whose post-processor lays out a text pair as `pair` (tokenizers' TemplateProcessing
    syntax, "<eos>" standing for the tokenizer's eos token), one text as it is; saved in tokenizer.json, which
    transformers loads with the folder, so `tokenizer(first, second)` gives that layout. Byte-level offsets are kept
    as the tokenizer had them (the ByteLevel step runs first)."""
    import copy

    from tokenizers import processors

    tok = copy.deepcopy(tokenizer)
    eos = tok.eos_token
    template = processors.TemplateProcessing(single="$A:0", pair=pair.replace("<eos>", eos),
                                             special_tokens=[(eos, tok.eos_token_id)])
    tok.backend_tokenizer.post_processor = processors.Sequence([processors.ByteLevel(trim_offsets=False), template])
    return tok
