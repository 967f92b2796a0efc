"""The optimizers of the `optim` group: AdamW over decay / no-decay groups (optim=adamw), or Muon for the hidden weight
matrices with AdamW for the rest (optim=muon), both as ONE `torch.optim.Optimizer`, because Lightning's automatic
optimization steps one optimizer per step, and one LR scheduler (LambdaLR) drives every group of it.

References: minGPT's configure_optimizers (the decay split); torch.optim.Muon and its docstring (Jordan et al. 2024,
"Muon: An optimizer for hidden layers in neural networks"); modded-nanogpt's GPT-2 speedrun (which parameters Muon
takes: the 2-D matrices of the blocks; embeddings, LM head and scalars stay on Adam).
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float, exclude: Iterable[nn.Parameter] = ()) -> list[dict[str, Any]]:
    """Decay the weights of Linear layers only; biases, LayerNorm and embeddings (and the tied lm_head) are not
    decayed (minGPT's configure_optimizers; Mistral / HF Trainer exclude bias and LayerNorm). `exclude`: parameters
    another optimizer owns (left out of both groups). Empty groups are dropped."""
    decay, no_decay = [], []
    seen: set[int] = {id(p) for p in exclude}
    for module in model.modules():
        for pname, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            if isinstance(module, nn.Linear) and pname == "weight":
                decay.append(p)
            else:
                no_decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def hidden_matrices(model: nn.Module) -> list[nn.Parameter]:
    """The parameters Muon updates: every trainable 2-D weight inside the transformer blocks (`model.transformer.h`:
    attention c_attn / c_proj, MLP c_fc / c_proj), in module order. The embeddings, the LM head (tied to wte) and any
    task head are outside the blocks and stay on AdamW, as in modded-nanogpt. A model without `transformer.h`
    has none (ValueError from the caller's Muon: nothing to optimize)."""
    blocks = getattr(getattr(model, "transformer", model), "h", None)
    if blocks is None:
        return []
    return [p for p in blocks.parameters() if p.requires_grad and p.ndim == 2]


class MuonWithAdamW(torch.optim.Optimizer):
    """torch.optim.Muon over `muon_params` and torch.optim.AdamW over `adamw_groups`, stepped as one optimizer.

    `param_groups` is AdamW's groups followed by Muon's (the very dicts the two inner optimizers read, so an LR
    scheduler or clipping that walks `param_groups` reaches both; group 0 holds `optim.lr`, the logged lr, as
    under optim=adamw), and `state` is one dict the two share (their
    parameters are disjoint). So `state_dict()` / `load_state_dict()` are torch.optim.Optimizer's own, and a dict saved
    by one instance loads into another built over the same model: after loading, the inner optimizers are pointed at
    the loaded groups and state again. `step(closure)` calls the closure once (Lightning's forward + backward), then
    steps Muon and AdamW; parameters without a gradient are skipped by both (the loss guard's skipped update).

    Args:
        muon_params: 2-D parameters (ValueError from torch.optim.Muon for any other shape).
        adamw_groups: AdamW's parameter groups (e.g. `param_groups(model, wd, exclude=muon_params)`).
        muon: torch.optim.Muon's keyword arguments (lr, momentum, weight_decay, nesterov, ns_steps, adjust_lr_fn).
        adamw: torch.optim.AdamW's keyword arguments (lr, betas, eps, fused).
    """

    def __init__(self, muon_params: list[nn.Parameter], adamw_groups: list[dict[str, Any]], muon: dict[str, Any],
                 adamw: dict[str, Any]):
        self.muon = torch.optim.Muon(muon_params, **muon)
        self.adamw = torch.optim.AdamW(adamw_groups, **adamw)
        self.n_adamw_groups = len(self.adamw.param_groups)
        super().__init__(self.adamw.param_groups + self.muon.param_groups, defaults={})
        self._share()

    def _share(self) -> None:
        """Point the inner optimizers at this optimizer's group dicts and state (again, after a load replaced them)."""
        self.adamw.param_groups = self.param_groups[: self.n_adamw_groups]
        self.muon.param_groups = self.param_groups[self.n_adamw_groups:]
        self.muon.state = self.adamw.state = self.state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._share()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.muon.step()
        self.adamw.step()
        return loss


def _fused(model: nn.Module, fused: Optional[bool]) -> bool:
    if fused is not None:
        return fused
    return all(p.device.type in ("cuda", "cpu") and p.is_floating_point() for p in model.parameters())


def build_optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer:
    """The optim group's optimizer over `model` (train.config.OptimConfig / MuonConfig).

    optim=adamw: AdamW over `param_groups(model)`. optim=muon (`cfg.needs_whole_matrices`): `MuonWithAdamW`, Muon over
    `hidden_matrices(model)` with cfg.muon_* and AdamW over the rest with cfg.lr / betas / eps / weight_decay.
    fused=null: torch's single-kernel AdamW wherever it exists (CUDA and CPU): one pass over each parameter instead
    of foreach's several. Raises ValueError for optim=muon over sharded parameters (FSDP2 DTensors, ZeRO-3).
    """
    adamw = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=_fused(model, cfg.fused))
    if not cfg.needs_whole_matrices:
        return torch.optim.AdamW(param_groups(model, cfg.weight_decay), **adamw)
    matrices = hidden_matrices(model)
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) or hasattr(p, "ds_id") for p in matrices):  # train/job.py refuses this earlier
        raise ValueError("torch.optim.Muon orthogonalizes whole matrices, but these parameters are shards (FSDP2 "
                         "DTensors or DeepSpeed ZeRO-3 partitions); use optim=adamw with a sharding strategy.")
    muon = dict(lr=cfg.muon_lr, momentum=cfg.muon_momentum, weight_decay=cfg.muon_weight_decay,
                nesterov=cfg.nesterov, ns_steps=cfg.ns_steps, adjust_lr_fn=cfg.adjust_lr_fn)
    return MuonWithAdamW(matrices, param_groups(model, cfg.weight_decay, exclude=matrices), muon, adamw)


__all__ = ["MuonWithAdamW", "build_optimizer", "hidden_matrices", "param_groups"]
