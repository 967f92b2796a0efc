"""DeepSpeed ZeRO (the deepspeed_* strategies of train/strategies/deepspeed.py): Lightning's DeepSpeedStrategy writing
our step-dir layout, on CUDA GPUs and on the CPU.

DeepSpeed saves its shards into `step-N.tmp-*`; rank 0 consolidates them into an fp32 `model.safetensors`
(deepspeed_config.py), adds config.json, training_state.pt (Lightning's loops, schedule, callbacks, data position) +
meta.json and publishes the folder with one rename, so export and `model.init_from` read a ZeRO checkpoint like any
other, and another strategy resumes it (train/checkpoint/universal.py). A checkpoint of another family, ZeRO stage or
world size is loaded through the universal training state (`load_universal_zero`). The DeepSpeed JSON itself comes
from deepspeed_config.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.strategies import DeepSpeedStrategy

from train.checkpoint import layout as ck
from train.checkpoint.io import DROPPED_KEYS
from train.adapters.lora import is_lora
from train.strategies.engines.elastic import AttemptProcessGroup

# what training_state.pt leaves to DeepSpeed's files: the weights and the optimizer partitions
_ENGINE_KEYS = ("state_dict", "optimizer_states", *DROPPED_KEYS)


def finalize_zero_checkpoint(tmp: Path, path: Path, model_config: Optional[dict], meta: dict[str, Any],
                             global_step: int, convert=None, training_state: Optional[dict] = None) -> Path:
    """Rank 0, after DeepSpeed wrote its shards into `tmp`: add model.safetensors (fp32, consolidated), config.json,
    training_state.pt and meta.json, then publish `tmp` as `path` with one rename (the same atomic step-dir contract
    as DirCheckpointIO).

    convert(checkpoint_dir, out_file): the consolidation; default deepspeed_config.zero_checkpoint_to_safetensors.
    training_state: Lightning's state besides weights and optimizer (loops, LR schedule, callbacks, data position),
    also inside DeepSpeed's own files; kept apart (weights_only-loadable) so another strategy can resume the run
    (train/checkpoint/universal.py).
    """
    from train.checkpoint.weights import to_plain

    if convert is None:
        from train.strategies.engines.deepspeed_config import zero_checkpoint_to_safetensors as convert
    tmp, path = Path(tmp), Path(path)
    if not (tmp / "latest").is_file():
        raise ck.CheckpointError(f"{tmp} holds no DeepSpeed checkpoint ('latest' missing); the save did not finish.")
    convert(tmp, tmp / ck.WEIGHTS_NAME)
    if training_state is not None:
        torch.save(to_plain(training_state, "training state"), tmp / ck.STATE_NAME)
    if model_config is not None:
        (tmp / ck.CONFIG_NAME).write_text(json.dumps(to_plain(model_config), indent=2, sort_keys=True) + "\n")
    meta = dict(meta or {})
    meta.update(format=ck.FORMAT, format_version=ck.FORMAT_VERSION, global_step=int(global_step),
                module_prefix=ck.MODULE_PREFIX, strategy=ck.ZERO_FAMILY)
    (tmp / ck.META_NAME).write_text(json.dumps(to_plain(meta), indent=2, sort_keys=True) + "\n")
    return ck.publish_dir(tmp, path)


def select_cpu_accelerator() -> None:
    """Make DeepSpeed use its CPU accelerator in this process and in the ranks Lightning launches from it.

    DeepSpeed picks its accelerator once per process, CUDA whenever a GPU is visible (deepspeed/accelerator/
    real_accelerator.py); `trainer.accelerator=cpu` on a GPU machine must not get CUDA tensors and NCCL. The
    DS_ACCELERATOR variable decides it for processes started from now on; a DeepSpeed already imported here is
    switched with its own `set_accelerator`.
    """
    os.environ["DS_ACCELERATOR"] = "cpu"
    if "deepspeed" in sys.modules:
        from deepspeed.accelerator import get_accelerator, set_accelerator

        if get_accelerator().device_name() != "cpu":
            from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

            set_accelerator(CPU_Accelerator())


class ZeroStrategy(AttemptProcessGroup, DeepSpeedStrategy):
    """DeepSpeed saves its shards into step-N.tmp-*, rank 0 consolidates them into model.safetensors, renames. Its
    process group is formed per torchrun restart attempt (engines/elastic.py).

    On the CPU (DeepSpeed's CPU accelerator, gloo), three small overrides get past Lightning 2.6's CUDA-only
    assumptions (1-3); on any device, a validate() after fit keeps the training engine (4) and the loss is
    divided by the accumulation once, not twice (5). Each override says why.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._fit_engine = None  # the training engine, kept for a trainer.validate() after fit (see below)

    @property
    def on_cpu(self) -> bool:
        return isinstance(self.accelerator, CPUAccelerator)

    def setup_environment(self) -> None:
        # 1. Lightning's DeepSpeedStrategy.setup_environment refuses every accelerator but CUDA; DeepSpeed itself
        #    trains on the CPU. Skip only that check (DDPStrategy's setup_environment does the rest).
        if self.on_cpu:
            super(DeepSpeedStrategy, self).setup_environment()
        else:
            super().setup_environment()

    def setup_distributed(self) -> None:
        if self.on_cpu:
            import deepspeed

            # 2. On the CPU, deepspeed.init_distributed JIT-compiles a shared-memory all-reduce
            #    (deepspeed_shm_comm: ~140 s on 2 cores, a hard failure without a C++ compiler) that only
            #    `inference_all_reduce` (tensor-parallel inference) uses; training goes through gloo. DeepSpeed
            #    builds it only when its table of compatible ops says so; that table is one cached dict whose
            #    edits persist (deepspeed/ops/__init__.py), so marking the op incompatible skips the build.
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        with self._cpu_device_index():
            super().setup_distributed()

    def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
        with self._cpu_device_index():
            return super()._setup_model_and_optimizer(model, optimizer, lr_scheduler)

    def _initialize_deepspeed_train(self, model) -> None:
        super()._initialize_deepspeed_train(model)
        self._fit_engine = self.model

    def _initialize_deepspeed_inference(self, model) -> None:
        # 4. trainer.validate() after fit: Lightning drops the training engine and builds an inference-only one
        #    (no optimizer, no checkpoint engine) around the already partitioned model, so a checkpoint saved
        #    after it fails ('NoneType' object has no attribute 'makedirs') and the optimizer state is gone.
        #    Validation inside fit runs through the training engine; a validate() after fit does too.
        engine = self._fit_engine
        if engine is not None and engine.module is model:
            self.model = engine
            return
        with self._cpu_device_index():
            super()._initialize_deepspeed_inference(model)

    @contextmanager
    def _cpu_device_index(self):
        """3. Lightning checks that device i has index i (`_validate_device_index_selection`) and passes
        `root_device.index` to deepspeed.initialize as `device_rank`, where the engine compares it with 0; a CPU
        device has index None, so the check fails and the engine raises TypeError (in fit, and again in a later
        trainer.validate(), which builds an inference engine). While those run, the CPU devices carry their
        local rank as index; DeepSpeed's CPU accelerator ignores the number (its set_device is a no-op)."""
        if not self.on_cpu:
            yield
            return
        devices = self.parallel_devices
        self.parallel_devices = [torch.device("cpu", i) for i in range(len(devices))]
        try:
            yield
        finally:
            self.parallel_devices = devices

    def backward(self, closure_loss, optimizer, *args, **kwargs):
        # 5. Lightning hands gradient accumulation to DeepSpeed but still divides each micro-batch's loss by
        # accumulate_grad_batches (its training closure), and DeepSpeed's engine.backward divides it again by
        # gradient_accumulation_steps unless told not to: k-step accumulation gave 1/k of DDP's gradients.
        # AdamW nearly hides a constant factor (up to eps), clipping does not. Divide once, like DDP.
        kwargs.setdefault("scale_wrt_gas", False)
        return super().backward(closure_loss, optimizer, *args, **kwargs)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: Optional[bool] = None) -> dict[str, Any]:
        # another family, stage or world size: the universal training state instead of DeepSpeed's loader, which
        # reads one partition file per rank of the writer's stage
        from train.strategies import native_resume

        path = Path(self.broadcast(str(checkpoint_path)))
        meta = ck.read_meta(path)
        spec = getattr(self, "strategy_spec", None)
        if spec is None or native_resume(meta, spec.name, self.world_size):
            return super().load_checkpoint(path, weights_only)
        return load_universal_zero(self, path, meta)

    checkpoint_writer = None  # a BackgroundWriter once use_async_save() is called (checkpoint.async_save)

    def use_async_save(self) -> None:
        """Consolidate and publish checkpoints in the background from now on (train/checkpoint/async_io.py).
        DeepSpeed's own writer (engine.save_checkpoint) still writes the ZeRO partitions before the loop goes on."""
        from lightning.pytorch.utilities import rank_zero_info

        from train.checkpoint.async_io import BackgroundWriter

        self.checkpoint_writer = BackgroundWriter()
        rank_zero_info("checkpoint.async_save: DeepSpeed writes its ZeRO partitions synchronously; model.safetensors "
                       "and the publish of each checkpoint are done in the background")

    def save_checkpoint(self, checkpoint: dict, filepath: Any, storage_options: Optional[Any] = None) -> None:
        from train.checkpoint.async_io import snapshot

        writer = self.checkpoint_writer
        if writer is not None:
            writer.wait()  # the previous checkpoint is published (or its error raised) first
        path = Path(self.broadcast(str(filepath)))
        tmp = Path(self.broadcast(str(path.parent / f"{path.name}.tmp-{os.getpid()}")))
        model_config = checkpoint.pop(ck.MODEL_CONFIG_KEY, None)
        meta = checkpoint.pop(ck.META_KEY, None) or {}
        step = int(checkpoint.get("global_step", 0))
        # a LoRA model's checkpoint holds what trains (DeepSpeed's own switch; the base comes from model.init_from),
        # and loads non-strictly (Lightning passes the module's strict_loading to engine.load_checkpoint)
        self.exclude_frozen_parameters = is_lora(self.lightning_module.model)
        super().save_checkpoint(checkpoint, tmp)  # every rank writes its ZeRO partition (a collective)
        self.barrier("zero-save")
        if self.is_global_zero:
            training = {k: v for k, v in checkpoint.items() if k not in _ENGINE_KEYS}
            if writer is None:
                finalize_zero_checkpoint(tmp, path, model_config, meta, step, training_state=training)
            else:  # the partitions are on disk; the consolidation reads them there, not the live engine
                writer.submit(_finalize_or_remove, tmp, path, model_config, meta, step, snapshot(training))
        self.barrier("zero-finalize")

    def teardown(self) -> None:
        try:
            if self.checkpoint_writer is not None:
                self.checkpoint_writer.close()  # the last checkpoint is published (or its error raised) first
        finally:
            super().teardown()


def _finalize_or_remove(tmp: Path, path: Path, model_config: Optional[dict], meta: dict[str, Any], step: int,
                        training: dict[str, Any]) -> None:
    """finalize_zero_checkpoint in the BackgroundWriter; a failure removes `tmp`, so nothing half-made is published."""
    import shutil

    try:
        finalize_zero_checkpoint(tmp, path, model_config, meta, step, training_state=training)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_universal_zero(strategy, path: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint of another family, ZeRO stage or world size (train/checkpoint/universal.py) into the DeepSpeed
    engine, through DeepSpeed's own API for partitioned state (deepspeed.utils.safe_set_full_fp32_param /
    safe_set_full_optimizer_state: each rank keeps its partition of the full value, any stage). Returns the training
    state Lightning restores (loops, LR schedule, callbacks, data position).

    Those setters write into AdamW's state, which torch creates at the first step; it is created here as DeepSpeed's
    own universal-checkpoint loader does (runtime/zero/stage3.py, load_hp_checkpoint_state_from_checkpoint_dir_stage3):
    the step, zero moments for each flat fp32 partition, and the saved group hyper-parameters (so the LR the schedule
    last set is the one the next step uses); for stages 1-2 each parameter's fragment is then linked to it with
    DeepSpeed's lazy_init_hp_params_optimizer_state, as the engine does after its first step.
    """
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state
    from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state

    from train.checkpoint.universal import read_universal
    from train.module import optimizer_param_names

    net = strategy.lightning_module.model
    state = read_universal(path, meta, optimizer_param_names(net))
    zero = strategy.deepspeed_engine.optimizer  # DeepSpeed's ZeRO optimizer around our torch AdamW
    adamw = zero.optimizer  # steps the flat fp32 partitions this rank owns
    moments = state.optimizer["state"]
    step = float(next(iter(moments.values()))["step"])
    stage3 = is_zero3(strategy)
    flats = zero.fp32_partitioned_groups_flat if stage3 else zero.single_partition_of_fp32_groups
    for flat in flats:  # torch's AdamW keeps `step` as a float32 scalar tensor (fused: on the parameter's device)
        adamw.state[flat] = {"step": torch.tensor(step, dtype=torch.float32, device=flat.device),
                             "exp_avg": torch.zeros_like(flat), "exp_avg_sq": torch.zeros_like(flat)}
    for group, saved in zip(adamw.param_groups, state.optimizer["param_groups"]):
        group.update({k: v for k, v in saved.items() if k != "params"})
    for i, lp_params in enumerate([] if stage3 else zero.bit16_groups):
        lazy_init_hp_params_optimizer_state(lp_params, flats[i], adamw.state)
    params = dict(net.named_parameters())  # a tied weight once, under its first name
    for name, p in params.items():
        safe_set_full_fp32_param(p, state.weights[name].float())
        for key in ("exp_avg", "exp_avg_sq"):
            safe_set_full_optimizer_state(p, moments[name][key].float(), key)
    # the module's own (low-precision) copy: whole on every rank under stages 1-2; stage 3 gathers, rank 0 writes
    # and DeepSpeed re-partitions on leaving the context
    gather = deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0) if stage3 \
        else contextlib.nullcontext()
    with gather, torch.no_grad():
        if strategy.is_global_zero or not stage3:
            for name, p in params.items():
                p.data.copy_(state.weights[name].to(p.dtype).reshape(p.shape))
    return dict(state.training, **{ck.META_KEY: meta})


def is_zero3(strategy) -> bool:
    """True for a DeepSpeed strategy at ZeRO stage 3 (parameters partitioned across ranks): ours or any subclass of
    Lightning's DeepSpeedStrategy (an isinstance check, so a subclass never silently skips the weight gathering)."""
    return isinstance(strategy, DeepSpeedStrategy) and strategy.zero_stage_3


__all__ = ["ZeroStrategy", "finalize_zero_checkpoint", "is_zero3", "load_universal_zero", "select_cpu_accelerator"]
