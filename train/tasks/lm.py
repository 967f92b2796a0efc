"""Causal language modelling (`task=lm`): GPT2LMHeadModel, next-token cross-entropy on the `data` group's packed
token stream; validation loss + perplexity. No best checkpoint: the export is the final model, followed by
samples.txt (greedy and sampled continuations of `sample.prompts`). Export: AutoModelForCausalLM.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from torch import nn

import gpt2

from train.tasks.model import build_model
from train.module import GPT2LitModule
from train.tasks.base import Task


class LMTask(Task):
    name = "lm"
    model_class = gpt2.GPT2LMHeadModel
    hf_class = "AutoModelForCausalLM"

    def datamodule(self, data_cfg, task_cfg, tokenizer):
        from data_pipelines import LMDataModule

        return LMDataModule(data_cfg)  # it trains (or loads the cached) BPE tokenizer itself

    def build_model(self, model_cfg, attention_cfg, stability_cfg, dm) -> tuple[nn.Module, None]:
        tok = dm.tokenizer  # None for pre-tokenized data (data=tokens): the vocabulary size comes from the data
        vocab = max(dm.vocab_size, len(tok) if tok is not None else 0)
        return build_model(self.model_class, model_cfg, attention_cfg, stability_cfg, vocab, dm.eos_token_id), None

    def sequence_length(self, data_cfg, task_cfg) -> tuple[str, int]:
        return "data.block_size", data_cfg.block_size

    def module(self, model: nn.Module, dm, task_cfg, trainer_cfg, optim_cfg, meta: dict) -> GPT2LitModule:
        return GPT2LitModule(model, overfit_batches=trainer_cfg.overfit_batches,
                             **self.module_args(trainer_cfg, optim_cfg, meta))

    def summary(self, module: GPT2LitModule, dm, rows: list[dict[str, Optional[float]]]) -> dict[str, Any]:
        val_losses = [r["val/loss"] for r in rows if r.get("val/loss") is not None]
        return {"last_val_loss": val_losses[-1] if val_losses else None}

    def after_export(self, net: nn.Module, tokenizer, sample_cfg, run_dir: Path) -> dict[str, Any]:
        from train.eval.samples import write_samples

        return {"samples": str(write_samples(net, tokenizer, sample_cfg, run_dir / "samples.txt"))}


TASK = LMTask()
