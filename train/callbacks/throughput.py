"""Throughput: tokens/s over each logging interval and MFU (model FLOPs utilisation, PaLM appendix B) on known GPUs."""

from __future__ import annotations

import time
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

# Peak dense bf16 tensor-core FLOP/s (vendor data sheets: A100 SXM 312 TFLOP/s, H100 SXM 989, H200 989).
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12}


def peak_flops(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_BF16_FLOPS.items():
        if key in name:
            return flops
    return None


def flops_per_token(config: Any, seq_len: int) -> float:
    """6N + 12·L·H·Q·T training FLOPs per token (N non-embedding params; PaLM appendix B); gpt2's if it has one."""
    try:
        from gpt2.modeling import flops_per_token as fpt

        return float(fpt(config, seq_len))
    except ImportError:
        pass
    d, L_, inner = config.n_embd, config.n_layer, (config.n_inner or 4 * config.n_embd)
    n = L_ * (4 * d * d + 4 * d + 2 * d * inner + inner + d + 4 * d)  # attn qkv+proj, mlp, 2 LayerNorms per block
    return 6.0 * n + 12.0 * L_ * config.n_head * (d // config.n_head) * seq_len


class Throughput(Callback):
    """tokens/s (all ranks) over each logging interval; MFU against the device's peak bf16 FLOP/s when known."""

    def __init__(self, log_every_n_steps: int):
        self.log_every_n_steps = log_every_n_steps
        self._t0: Optional[float] = None
        self._tokens = 0
        self._last_step = -1
        self._flops_per_token: Optional[float] = None
        self._peak: Optional[float] = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_step = trainer.global_step
        self._peak = peak_flops(pl_module.device)
        self._t0 = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._t0 is None:  # the first interval starts at the first batch (excludes start-up time)
            self._sync(pl_module)
            self._t0 = time.perf_counter()
            self._tokens = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        ids = batch["input_ids"]
        self._tokens += ids.numel() * trainer.world_size
        if self._flops_per_token is None:
            self._flops_per_token = flops_per_token(pl_module.model.config, ids.shape[1])
        step = trainer.global_step
        if step == self._last_step:
            return
        self._last_step = step
        if not (step % self.log_every_n_steps == 0 or step >= trainer.max_steps):
            return
        self._sync(pl_module)
        now = time.perf_counter()
        tps = self._tokens / max(now - self._t0, 1e-9)
        metrics = {"tokens_per_sec": tps}
        if self._peak:
            metrics["mfu"] = self._flops_per_token * tps / (self._peak * trainer.world_size)
        pl_module.emit_metrics(metrics, step)
        pl_module.log("tok/s", tps, prog_bar=True, logger=False, on_step=True, on_epoch=False)
        self._t0, self._tokens = now, 0

    def on_validation_end(self, trainer, pl_module) -> None:
        self._t0 = None  # validation time is not training throughput

    @staticmethod
    def _sync(pl_module) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
