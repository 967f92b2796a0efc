"""One optimizer step of every task (lm, cls, token_cls, qa, mc), the global batch of 16 cut several ways, for
tests/test_batch_split.py: `python tests/split_runs.py OUT CORPUS CACHE DEVICES MICRO:ACCUMULATE ...`.

For each task and each cut it builds the task's data, model (seed 0, dropout off) and LightningModule exactly as
train/job.py does (`Task` hooks), validates the initial weights with a Lightning Trainer, then trains ONE step and
saves, on rank 0, OUT/<task>-<devices>x<micro>x<accumulate>.pt: the gradients the optimizer is about to apply (after
DDP's all-reduce), the logged train/loss and the val/loss. With DEVICES=2 Lightning launches the second rank by running
this file again. DEVICES=1 also saves OUT/<task>-exact.pt: the validation loss computed independently of the module,
example by example with the model's own (transformers') loss, each mean weighted by its item count.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import compose_config  # noqa: E402

TASKS = ("lm", "cls", "token_cls", "qa", "mc")
GLOBAL_BATCH = 16


def overrides(task: str, corpus: str, cache: str, micro: int) -> list[str]:
    data = [f"task.data.batch_size={micro}", f"task.data.cache_dir={cache}", "task.data.demo_train_size=300",
            "task.data.demo_val_size=37", "task.data.max_length=64", "task.data.max_question_length=16",
            "task.data.doc_stride=16"] if task != "lm" else []
    return [f"task={task}", "data=text", f"data.path={corpus}", f"data.cache_dir={cache}", "data.vocab_size=320",
            "data.block_size=25", f"data.batch_size={micro}", "data.val_fraction=0.1", "model=tiny",
            "model.n_embd=32", "model.n_head=2", "model.n_positions=64", "model.dropout=0.0", "guard=off",
            f"run_dir={cache}/run-{task}", *data]


class Grads(L.Callback):
    """The gradients of the first optimizer step, as the optimizer sees them (DDP has averaged them)."""

    def __init__(self):
        self.grads: dict[str, torch.Tensor] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if not self.grads:
            self.grads = {n: p.grad.detach().clone() for n, p in pl_module.model.named_parameters()
                          if p.grad is not None}


def trainer(devices: int, accumulate: int, callbacks=(), validate: bool = False) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                     max_steps=1, accumulate_grad_batches=accumulate, limit_val_batches=1.0 if validate else 0,
                     val_check_interval=accumulate, check_val_every_n_epoch=None, num_sanity_val_steps=0,
                     logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, use_distributed_sampler=False, callbacks=list(callbacks))


def build(task_name: str, corpus: str, cache: str, micro: int):
    from train.tasks import get_task

    cfg = compose_config(overrides(task_name, corpus, cache, micro))
    task = get_task(task_name)
    tok = task.tokenizer(cfg.data, None, None, Path(cfg.run_dir))
    dm = task.datamodule(cfg.data, cfg.task, tok)
    dm.prepare_data()
    dm.setup("fit")
    torch.manual_seed(0)
    model, _ = task.build_model(cfg.model, cfg.attention, cfg.stability, dm)
    for m in model.modules():  # the heads' own dropout too (token_cls' classifier dropout is 0.1 by default)
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    module = task.module(model, dm, cfg.task, cfg.trainer, cfg.optim, {})
    return cfg, dm, model, module


@torch.no_grad()
def exact_val_loss(task: str, dm, model, lm_coef: float) -> float:
    """The validation loss as the mean over every item of the split, one example at a time: the model's own loss
    (a mean over the example's items, as transformers computes it) times the example's item count, summed, divided
    by all items once; mc: lm_coef x the token mean + the example mean; qa: the mean over windows."""
    model.eval()
    if task == "lm":
        total, n = 0.0, 0
        for i in range(len(dm.val_dataset)):
            b = dm.val_dataset[i]
            items = b["input_ids"].size(1) - 1
            total += float(model(input_ids=b["input_ids"], labels=b["labels"]).loss) * items
            n += items
        return total / n
    sums, counts = {}, {}
    for f in dm.val_features:
        b = dm.model_inputs(dm.collator([f]))
        out = model(**b)
        if task == "token_cls":
            parts = {"tok": (out.loss, int((b["labels"] != -100).sum()))}
        elif task == "mc":
            parts = {"lm": (out.loss, int((b["labels"][..., 1:] != -100).sum())), "mc": (out.mc_loss, 1)}
        else:
            parts = {"all": (out.loss, 1)}
        for k, (loss, items) in parts.items():
            sums[k] = sums.get(k, 0.0) + float(loss) * items
            counts[k] = counts.get(k, 0) + items
    means = {k: sums[k] / counts[k] for k in sums}
    return lm_coef * means["lm"] + means["mc"] if task == "mc" else next(iter(means.values()))


def main(out: Path, corpus: str, cache: str, devices: int, cuts: list[str]) -> None:
    for task in TASKS:
        for cut in cuts:
            micro, accumulate = (int(x) for x in cut.split(":"))
            assert micro * accumulate * devices == GLOBAL_BATCH
            cfg, dm, model, module = build(task, corpus, cache, micro)
            val = trainer(devices, accumulate, validate=True)
            val.validate(module, datamodule=dm, verbose=False)
            val_loss = module.last_val_metrics["val/loss"]
            grads = Grads()
            fit = trainer(devices, accumulate, [grads])
            fit.fit(module, datamodule=dm)
            if fit.is_global_zero:
                torch.save({"grads": grads.grads, "train_loss": module.last_logged["train/loss"],
                            "val_loss": val_loss, "consumed_samples": dm.consumed_samples,
                            "val_size": len(dm.val_dataset) if task == "lm" else len(dm.val_features)},
                           out / f"{task}-{devices}x{micro}x{accumulate}.pt")
            if devices == 1 and cut == cuts[0]:
                _, dm, model, _ = build(task, corpus, cache, micro)
                torch.save({"val_loss": exact_val_loss(task, dm, model, cfg.task.lm_coef)}, out / f"{task}-exact.pt")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5:])
