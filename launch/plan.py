"""Memory per GPU of a GPT-2 training run under each strategy, and which strategy / micro-batch / activation
checkpointing to pick — from the config alone (the model is never built).

    python launch/plan.py model=gpt2-xl gpus=8 gpu_mem_gb=80 [micro_batch=8 seq=1024 precision=bf16-mixed nodes=1
                          attention=sdpa activation_checkpointing=auto optim=adamw dropout=0.0
                          loss_chunk_size=1024 vocab_size=50257]

`gpus` is GPUs per node (like `trainer.devices`); the data-parallel world is `gpus x nodes`. The model is the one
`train/run.py model=<name>` trains: the preset's shape with the run's defaults (model.dropout=0, the LM loss in chunks
of model.loss_chunk_size=1024 tokens); `dropout`, `loss_chunk_size` and `vocab_size` override them. The printout
names the memory model it uses (bytes per parameter, optimizer, activation formula).

The model of memory, per GPU (Ψ = parameter count, N = world size, e = bytes per activation element):

* parameters / gradients / optimizer state, by strategy and precision:
  - Lightning mixed precision (`bf16-mixed`, `16-mixed`, `32`) under DDP keeps fp32 weights and gradients and
    AdamW's two fp32 moments: 4Ψ + 4Ψ + 8Ψ (plus one 4-byte `step` scalar per tensor). `bf16-true`: 2Ψ + 2Ψ + 4Ψ.
    `optim=muon` (train/module.py MuonWithAdamW, DDP only: Muon needs whole matrices): torch.optim.Muon keeps one
    momentum buffer for the four 2-D weights of each block, AdamW its two moments for the rest.
    `gradient_as_bucket_view=True` (DDPConfig's default) makes DDP's all-reduce buckets views of the gradients,
    so they cost nothing extra.
  - FSDP2 (`fully_shard`, FULL_SHARD over all N ranks): the same bytes divided by N, plus the working set of
    unsharded tensors: the root group (embeddings; not resharded after forward) and two blocks (the one computing and
    the one prefetched) in the compute dtype, and their unsharded gradients in fp32 (reduce dtype).
  - DeepSpeed ZeRO (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion Parameter
    Models", §5 / Fig. 1): with 16-bit training 2Ψ weights + 2Ψ gradients + KΨ optimizer state, K = 12
    (fp32 master + momentum + variance). Stage 1 partitions the KΨ, stage 2 also the gradients, stage 3 also the
    weights: 2Ψ + 2Ψ + KΨ/N, 2Ψ + (2 + K)Ψ/N, (2 + 2 + K)Ψ/N. In fp32 the weights and gradients take 4Ψ each and
    K stays 12: every stage clones its fp32 master partition (see `estimate`). ZeRO-2's gradient partition
    (`grads_in_partition`, contiguous_gradients) holds the whole gradient of every tensor that overlaps the rank's
    partition, so a tensor spanning several partitions (the token embedding) is held whole by each of those ranks
    (`zero2_gradient_partition`): more than 2Ψ/N, e.g. 3.3x for gpt2 on 8 ranks. Measured per rank on CPU runs
    (tests/test_deepspeed_cpu.py).
    Buffers: stages 1/2 allocate `reduce_bucket_size` gradient elements (twice with `overlap_comm`,
    deepspeed/runtime/zero/stage_1_and_2.py); stage 3 holds the gathered weights of the live modules
    (the embeddings, or two blocks) and one reduce bucket.
  - ZeRO-3 with offload: ZeRO-Infinity / ZeRO-Offload — fp32 master weights, moments and gradients, the 16-bit
    weight and gradient partitions live in CPU memory (reported as host bytes); the GPU keeps the stage-3 working
    set.
* activations per micro-batch (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
  Models", §4.1, Eq. 1, no tensor/sequence parallelism): per layer s·b·h·(34 + 5·a·s/h) bytes with 16-bit
  activations — 34 = 16 two-byte tensors (2 bytes x 16 = 32) + 2 one-byte dropout masks; the 5·a·s²·b term is the
  softmax output, its dropout mask and the dropped-out probabilities. Generalised to e bytes per element:
  s·b·h·(16e + 2) + a·s²·b·(2e + 1). Under autocast (`bf16-mixed`, `16-mixed` over fp32 weights: DDP, FSDP)
  LayerNorm runs in fp32, so its two inputs per layer (the residual stream) take 4 bytes, and every matmul also saves
  the 16-bit copy of its weight (e bytes x the block's four matrices); DeepSpeed's bf16/fp16 modes cast the module
  itself, so everything is e bytes there. Flash / memory-efficient attention (`attention=sdpa|flash`, Dao et al. 2022)
  never stores the s x s matrices, so the a·s² term disappears (CPU SDPA does so too, except with attention
  dropout, where it falls back to the math kernel). Outside the layers: the embedding output and its dropout mask,
  the final LayerNorm and LM-head inputs (s·b·h·(2e + 1)), and the LM loss. On whole logits: the fp32 log-softmax
  that cross-entropy saves (4·s·b·v) and, at the start of backward, the fp32 gradients of its output and input
  (8·s·b·v). In chunks (gpt2/loss.py, the run's default; not under ZeRO-3, whose partitioned LM head is
  gathered only by a call of the module): the gradients of the hidden states (in place of the LM-head input) and of
  the v x h LM-head weight (v·h·w, weights' dtype), computed in forward, and the transient of one chunk's logits and
  log-softmax (8·chunk·v: the logits' fp32 copy and its log-softmax). Dropout masks are counted only when the
  dropout probability is > 0. With activation checkpointing of every block (our `gradient_checkpointing_enable`),
  only each block's input (s·b·h·e per layer; 4 bytes under autocast) is kept, plus one block's full activations
  while it is recomputed — after the loss's transients are freed, so the peak adds the larger of the two.
  Measured on CPU, in fp32 and under bf16 autocast, for the tiny and demo models (saved tensors and the peak of live
  tensors, tests/test_launch_plan.py).

The estimates are sums of these terms (a conservative peak: transient step-time buffers and the CUDA caching
allocator's fragmentation are not modelled; the 10 % headroom is for them and the CUDA context).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from functools import lru_cache

import torch

from gpt2 import ATTENTION_BACKENDS, DEFAULT_ATTENTION, PRESETS, GPT2Config, GPT2LMHeadModel
# the run's model defaults (dropout, loss_chunk_size): dataclass defaults, no Lightning import
from train.config import ModelConfig
from train.strategies import get_spec, strategy_specs
# DeepSpeed bucket sizes: the numbers train/strategies/engines/deepspeed_config.py writes into the DeepSpeed JSON (a pure module: importing
# it pulls in neither Lightning nor DeepSpeed)
from train.strategies.engines.deepspeed_config import REDUCE_BUCKET_SIZE

GiB = 1024**3

# The strategies the plan compares, from train/strategies' registry, in its order of preference: the least
# communication first, the most (host offload) last (StrategySpec.plan_rank).
SPECS = sorted((s for s in strategy_specs().values() if s.plan_rank is not None), key=lambda s: s.plan_rank)
STRATEGIES = tuple(s.name for s in SPECS)
ALONE = tuple(s.name for s in SPECS if s.zero_stage == 0 or s.offload)  # what helps a single rank
PRECISIONS = ("32", "32-true", "16-mixed", "bf16-mixed", "bf16-true")
OPTIMIZERS = ("adamw", "muon")  # the `optim` group (conf/optim)
MICRO_BATCHES = (64, 32, 16, 8, 4, 2, 1)  # powers of two tried, largest first


# ----------------------------------------------------------------------------------------------------- counting
def count_parameters(cfg: GPT2Config) -> dict[str, int]:
    """Parameters of GPT2LMHeadModel by part, counted from the config (no model is built).

    Embeddings V·h + P·h; per block two LayerNorms (2·2h), fused QKV (h·3h + 3h), attention output (h·h + h),
    MLP (h·I + I + I·h + h); final LayerNorm 2h; the LM head is tied to wte (GPT-2) unless tie_word_embeddings=False.
    """
    h, v, p, L, inner = cfg.n_embd, cfg.vocab_size, cfg.n_positions, cfg.n_layer, cfg.inner_dim
    block = 2 * 2 * h + (h * 3 * h + 3 * h) + (h * h + h) + (h * inner + inner) + (inner * h + h)
    parts = {
        "wte": v * h,
        "wpe": p * h,
        "blocks": L * block,
        "ln_f": 2 * h,
        "lm_head": 0 if cfg.tie_word_embeddings else v * h,
    }
    parts["block"] = block  # one block (not added to the total)
    parts["block_matrices"] = h * 3 * h + h * h + h * inner + inner * h  # its 2-D weights (Muon's, optim=muon)
    parts["total"] = parts["wte"] + parts["wpe"] + parts["blocks"] + parts["ln_f"] + parts["lm_head"]
    # weights, biases of LN/attn/MLP: 12 tensors a block; wte, wpe, ln_f.{weight,bias} (+ lm_head if untied)
    parts["tensors"] = 12 * L + 4 + (0 if cfg.tie_word_embeddings else 1)
    return parts


def activation_bytes(cfg: GPT2Config, micro_batch: int, seq: int, act_bytes: int, attention: str,
                     checkpointing: bool, peak: bool = True, chunked_loss: bool | None = None,
                     param_bytes: int = 4, autocast: bool = False) -> int:
    """Activation memory of one micro-batch on one GPU, bytes (see the module docstring for the formula and sources).

    peak=False: only what autograd saves during forward (measurable on CPU with saved-tensor hooks);
    peak=True adds the larger transient: the loss's logits-sized buffers or, with checkpointing, one recomputed block.
    chunked_loss: whether the LM loss runs chunk by chunk (gpt2/loss.py); None -> `cfg.loss_chunk_size > 0`.
    param_bytes: bytes per element of the weights (the chunked loss saves the LM head's gradient in their dtype).
    autocast: mixed precision over fp32 weights (`16-mixed`, `bf16-mixed`): act_bytes is the matmuls' dtype, but
    LayerNorm runs in fp32, so the residual stream (the LayerNorm inputs) stays fp32, and each matmul saves the
    act_bytes copy of its weight (torch.autocast's op lists: layer_norm runs in fp32, linear/matmul in 16 bits).
    """
    s, b, h, a, L, v = seq, micro_batch, cfg.n_embd, cfg.n_head, cfg.n_layer, cfg.vocab_size
    e = act_bytes
    r = 4 if autocast else e  # bytes of the residual stream
    sbh = s * b * h
    chunked = cfg.loss_chunk_size > 0 if chunked_loss is None else chunked_loss
    # Korthikanti Eq. 1 linear terms: 16 tensors of e bytes (2 LN inputs, QKV input, Q/K/V, attention output,
    # MLP input, 4h pre- and post-GeLU) + the two residual-dropout masks (1 byte each) = 34·sbh at e = 2
    per_layer = sbh * (14 * e + 2 * r + 2 * (cfg.resid_pdrop > 0))
    if autocast:  # the 16-bit copies of the block's four matrices
        per_layer += e * count_parameters(cfg)["block_matrices"]
    if ATTENTION_BACKENDS[attention].materializes_scores:  # the s x s probabilities (+ dropout mask, output): 5·a·s²·b
        per_layer += a * s * s * b * (e + (2 * e + 1 - e) * (cfg.attn_pdrop > 0))
    # outside the blocks: the ln_f input, the embedding-dropout mask, then the loss
    outside = sbh * (r + (cfg.embd_pdrop > 0))
    if chunked:
        # gpt2/loss.py LinearCrossEntropy saves no logits: the gradients of the hidden states (s·b·h, in the ln_f
        # output's dtype) and of the (v, h) LM head weight (in the weights' dtype), computed in forward
        outside += sbh * r + v * h * param_bytes
    else:  # the lm_head input, cross-entropy's fp32 log-softmax (and autocast's 16-bit copy of the LM head weight)
        outside += sbh * e + 4 * s * b * v + (v * h * e if autocast else 0)
    saved = (L * sbh * r if checkpointing else L * per_layer) + outside
    if not peak:
        return saved
    if chunked:
        # forward: one chunk's logits as fp32 (`.float()`) and their fp32 log-softmax; backward: the scaled copies
        # of the two saved gradients
        loss = max(min(cfg.loss_chunk_size, s * b) * v * 8, sbh * r + v * h * param_bytes)
    else:  # backward starts with the fp32 gradients of the log-softmax's output and input (the logits' fp32 copy);
        # their cast to the logits' dtype follows once the first is freed
        loss = 8 * s * b * v
    # with checkpointing, the last block is recomputed after the loss's buffers are freed: the larger of the two
    return saved + max(loss, per_layer if checkpointing else 0)


# ----------------------------------------------------------------------------------------------------- results
@dataclass
class Estimate:
    """Bytes per GPU of one strategy (and host bytes per GPU for CPU offload)."""

    strategy: str
    params: int
    grads: int
    optimizer: int
    buffers: int
    activations: int
    cpu: int = 0  # host memory per GPU (offloaded state)
    fits: bool = False

    @property
    def states(self) -> int:  # parameters + gradients + optimizer state
        return self.params + self.grads + self.optimizer

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.buffers + self.activations


@dataclass
class Recommendation:
    strategy: str | None  # None: nothing fits, even offloaded at micro-batch 1 with checkpointing
    micro_batch: int | None
    activation_checkpointing: bool | None
    reason: str


@dataclass
class Plan:
    model: str
    config: GPT2Config
    n_params: int
    gpus: int
    nodes: int
    world_size: int
    gpu_mem_gb: float
    micro_batch: int
    seq: int
    precision: str
    attention: str
    activation_checkpointing: bool
    headroom: float
    estimates: dict[str, Estimate]
    max_micro_batch: dict[str, dict[bool, int]]  # strategy -> {checkpointing: largest power of two that fits (0: none)}
    recommendation: Recommendation
    optim: str = "adamw"
    budget_bytes: int = field(init=False)

    def __post_init__(self):
        self.budget_bytes = int(self.gpu_mem_gb * GiB * (1 - self.headroom))


# ----------------------------------------------------------------------------------------------------- the model
def _normalize_precision(precision: str) -> str:
    p = str(precision)
    p = {"32-true": "32", "16": "16-mixed", "bf16": "bf16-mixed"}.get(p, p)
    if p not in ("32", "16-mixed", "bf16-mixed", "bf16-true"):
        raise ValueError(f"precision={precision!r} is not supported by the planner; use one of {', '.join(PRECISIONS)}.")
    return p


def optimizer_bytes(cfg: GPT2Config, optim: str, weight_bytes: int, shards: int = 1) -> int:
    """Bytes of torch optimizer state on one rank, weights of `weight_bytes` bytes per element sharded over `shards`
    ranks (FSDP2: each rank's moments are those of its shards; the `step` scalars are per tensor on every rank).

    adamw: torch.optim.AdamW's exp_avg + exp_avg_sq (2 tensors like each weight) and a 4-byte float32 `step`
    per parameter tensor (torch/optim/adam.py `_init_group`). muon: train/module.py MuonWithAdamW — torch.optim.Muon's
    one `momentum_buffer` per hidden matrix (the four 2-D weights of each block; torch/optim/_muon.py), AdamW as above
    over the rest. Raises ValueError for another name.
    """
    if optim not in OPTIMIZERS:
        raise ValueError(f"optim={optim!r} is unknown; choose one of {', '.join(OPTIMIZERS)}.")
    counts = count_parameters(cfg)
    muon = cfg.n_layer * counts["block_matrices"] if optim == "muon" else 0
    adamw_tensors = counts["tensors"] - (4 * cfg.n_layer if optim == "muon" else 0)
    return _ceil_div(2 * weight_bytes * (counts["total"] - muon) + weight_bytes * muon, shards) + 4 * adamw_tensors


def estimate(cfg: GPT2Config, strategy: str, world_size: int, micro_batch: int, seq: int, precision: str = "bf16-mixed",
             attention: str = DEFAULT_ATTENTION, activation_checkpointing: bool = False, optim: str = "adamw"
             ) -> Estimate:
    """Bytes per GPU of `strategy` for this model and run shape (no fit decision: see `plan`).

    optim=muon only runs where the optimizer gets whole matrices (StrategySpec.optimizer_params; ValueError elsewhere,
    as train/strategies.check_optimizer refuses it).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}.")
    precision = _normalize_precision(precision)
    spec = get_spec(strategy)
    if optim != "adamw" and spec.optimizer_params != "whole":
        raise ValueError(f"optim={optim} cannot run under strategy={strategy} (it needs whole weight matrices).")
    counts = count_parameters(cfg)
    P, N = counts["total"], world_size
    emb, blk = counts["wte"] + counts["wpe"] + counts["lm_head"], counts["block"]
    act_e = 4 if precision == "32" else 2
    if spec.engine == "torch":
        # Lightning's mixed precision is autocast over fp32 weights; bf16-true keeps everything in bf16
        w = 2 if precision == "bf16-true" else 4
        acts = activation_bytes(cfg, micro_batch, seq, act_e, attention, activation_checkpointing, param_bytes=w,
                                autocast=precision in ("16-mixed", "bf16-mixed"))
        params, grads, optim_b = w * P, w * P, optimizer_bytes(cfg, optim, w)
        if spec.zero_stage == 0:  # DDP: a full replica of everything
            return Estimate(strategy, params, grads, optim_b, 0, acts)
        # FSDP2: shards of everything + the unsharded working set (root group + 2 blocks) in the compute dtype and
        # their unsharded gradients in the reduce dtype (fp32 unless bf16-true)
        compute = 4 if precision == "32" else 2
        working = emb + 2 * blk
        buffers = working * compute + working * w
        return Estimate(strategy, _ceil_div(params, N), _ceil_div(grads, N), optimizer_bytes(cfg, optim, w, N),
                        buffers, acts)

    # DeepSpeed ZeRO
    w = 4 if precision == "32" else 2  # weights and gradients in the engine's dtype
    # ZeRO-3's partitioned lm_head weight is gathered only by a call of the lm_head module, so the model computes
    # the loss on whole logits there (gpt2/modeling.py GPT2LMHeadModel._chunked_loss)
    acts = activation_bytes(cfg, micro_batch, seq, act_e, attention, activation_checkpointing,
                            chunked_loss=False if spec.zero_stage == 3 else None, param_bytes=w)  # no autocast
    # optimizer bytes per parameter: fp32 master + momentum + variance, in fp32 too: ZeRO-1/2 `.clone()` the master
    # partition (stage_1_and_2.py `single_partition_of_fp32_groups`), and ZeRO-3 (stage3.py
    # `_create_fp32_partitions`) would reuse its fp32 partitions only if `tensor.device == self.device`, which compares
    # a torch.device with the str `current_device_name()` and so is False: it clones as well (measured, K = 12)
    K = 12
    bucket = REDUCE_BUCKET_SIZE * w
    gathered = max(emb, 2 * blk) * w  # stage 3: weights of the live modules, gathered from all ranks
    if spec.zero_stage == 1:
        return Estimate(strategy, w * P, w * P, _ceil_div(K * P, N), 2 * bucket, acts)
    if spec.zero_stage == 2:
        return Estimate(strategy, w * P, w * zero2_gradient_partition(cfg, N), _ceil_div(K * P, N), 2 * bucket, acts)
    if not spec.offload:
        return Estimate(strategy, _ceil_div(w * P, N), _ceil_div(w * P, N), _ceil_div(K * P, N),
                        gathered + bucket, acts)
    # stage 3 with offload: weights, gradients and optimizer state in host memory (stage3.py: with the optimizer
    # offloaded `self.device` is the CPU, so `grad_partitions_flat_buffer` is there, and `_setup_for_real_optimizer`
    # gives each fp32 master partition an fp32 `.grad` buffer of its own besides)
    cpu = _ceil_div(w * P, N) + _ceil_div(w * P, N) + _ceil_div(4 * P, N) + _ceil_div(K * P, N)
    return Estimate(strategy, 0, 0, 0, gathered + bucket, acts, cpu=cpu)


@lru_cache(maxsize=16)
def _optimizer_groups(n_layer: int, n_embd: int, n_head: int, n_inner: int | None, vocab_size: int,
                      n_positions: int, tie_word_embeddings: bool) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Element counts of the parameters of train/module.py's two optimizer groups, in order: the weights of the
    nn.Linear layers, then the rest (module order, a tied weight once), from a model built on the meta device."""
    with torch.device("meta"):
        model = GPT2LMHeadModel(GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_inner=n_inner,
                                           vocab_size=vocab_size, n_positions=n_positions,
                                           tie_word_embeddings=tie_word_embeddings))
    groups: dict[bool, list[int]] = {True: [], False: []}
    seen: set[int] = set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                groups[isinstance(module, torch.nn.Linear) and name == "weight"].append(p.numel())
    return tuple(groups[True]), tuple(groups[False])


def zero2_gradient_partition(cfg: GPT2Config, world_size: int, rank: int | None = None) -> int:
    """Elements of the gradient partition buffer of `rank` (None: the fullest rank) under DeepSpeed ZeRO-2
    (contiguous_gradients, our default): `grads_in_partition` holds the whole gradient of every parameter that overlaps the rank's
    partition (deepspeed/runtime/zero/stage_1_and_2.py `copy_grads_in_partition` sizes it by `params_in_partition`),
    so a large tensor across a partition boundary (GPT-2's token embedding) is held whole by each rank it spans.

    The partitions: each optimizer parameter group (train/module.py `param_groups`: the weights of nn.Linear layers,
    then the rest, in module order, a tied weight once) flattened, padded to a multiple of 2 x world_size elements
    (`nccl_start_alignment_factor`) and cut into world_size equal parts. The model is built on the meta device.
    """
    held = [0] * world_size
    for sizes in _optimizer_groups(cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_inner, cfg.vocab_size,
                                   cfg.n_positions, cfg.tie_word_embeddings):
        part = _ceil_div(sum(sizes), 2 * world_size) * 2  # padded group / world_size
        start = 0
        for n in sizes:
            for r in range(world_size):
                if start < (r + 1) * part and start + n > r * part:
                    held[r] += n
            start += n
    return max(held) if rank is None else held[rank]


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def run_config(model: str, **config_overrides) -> GPT2Config:
    """The GPT2Config `train/run.py model=<model>` trains: the preset's shape with the run's defaults for what the
    preset leaves to the run (train.config.ModelConfig: dropout, loss_chunk_size), then `config_overrides` (any
    GPT2Config field, e.g. vocab_size=4096 for the 4096-token tokenizer of the embedded demo corpus)."""
    run_defaults = dict(resid_pdrop=ModelConfig.dropout, embd_pdrop=ModelConfig.dropout,
                        attn_pdrop=ModelConfig.dropout, loss_chunk_size=ModelConfig.loss_chunk_size)
    return GPT2Config.from_preset(model, **{**run_defaults, **config_overrides})


def plan(model: str = "gpt2", gpus: int = 1, gpu_mem_gb: float = 80.0, micro_batch: int | None = None,
         seq: int | None = None, precision: str = "bf16-mixed", nodes: int = 1, attention: str = DEFAULT_ATTENTION,
         activation_checkpointing: bool | None = None, headroom: float = 0.10, optim: str = "adamw",
         **config_overrides) -> Plan:
    """Estimate every strategy and recommend one.

    model: a preset name (gpt2.PRESETS), with the training run's defaults (`run_config`); config_overrides change its
    fields (e.g. vocab_size=...). optim: adamw or muon (muon: only the strategies that hand it whole matrices).
    micro_batch: None -> the recommended (largest fitting) micro-batch is used for the table; an int fixes it.
    activation_checkpointing: None -> decided by the recommendation; True/False fixes it.
    """
    if model not in PRESETS:
        raise ValueError(f"unknown model {model!r}; choose one of {', '.join(PRESETS)}.")
    for name, val in (("gpus", gpus), ("nodes", nodes)):
        if not (isinstance(val, int) and val >= 1):
            raise ValueError(f"{name} must be a positive integer, got {val!r}.")
    if not gpu_mem_gb > 0:
        raise ValueError(f"gpu_mem_gb must be positive, got {gpu_mem_gb!r}.")
    if micro_batch is not None and not (isinstance(micro_batch, int) and micro_batch >= 1):
        raise ValueError(f"micro_batch must be a positive integer, got {micro_batch!r}.")
    if attention not in ATTENTION_BACKENDS:
        raise ValueError(f"attention={attention!r} is unknown; choose one of {', '.join(ATTENTION_BACKENDS)}.")
    if not 0 <= headroom < 1:
        raise ValueError(f"headroom must be in [0, 1), got {headroom!r}.")
    if optim not in OPTIMIZERS:
        raise ValueError(f"optim={optim!r} is unknown; choose one of {', '.join(OPTIMIZERS)}.")
    precision = _normalize_precision(precision)
    cfg = run_config(model, **config_overrides)
    able = tuple(s for s in STRATEGIES if optim == "adamw" or get_spec(s).optimizer_params == "whole")
    seq = cfg.n_positions if seq is None else seq
    if not (isinstance(seq, int) and 1 <= seq <= cfg.n_positions):
        raise ValueError(f"seq must be an integer in [1, n_positions={cfg.n_positions}], got {seq!r}.")
    world = gpus * nodes
    budget = int(gpu_mem_gb * GiB * (1 - headroom))

    def fits(strategy: str, mb: int, ckpt: bool) -> bool:
        return estimate(cfg, strategy, world, mb, seq, precision, attention, ckpt, optim).total <= budget

    ckpt_choices = (False, True) if activation_checkpointing is None else (activation_checkpointing,)
    sizes = MICRO_BATCHES if micro_batch is None else (micro_batch,)
    max_mb = {s: {c: next((mb for mb in MICRO_BATCHES if fits(s, mb, c)), 0) for c in (False, True)}
              for s in able}

    rec = Recommendation(None, None, None,
                         f"nothing fits in {gpu_mem_gb:g} GB per GPU with {headroom:.0%} headroom, even offloaded; "
                         f"use more GPUs, a shorter seq, or a smaller model.")
    for s in able if world > 1 else [s for s in ALONE if s in able]:  # sharding needs >1 rank to help
        for ckpt in ckpt_choices:
            mb = next((m for m in sizes if fits(s, m, ckpt)), None)
            if mb is not None:
                why = "the cheapest strategy (least communication) that fits"
                if ckpt:
                    why += "; activations only fit when every block is recomputed in backward"
                rec = Recommendation(s, mb, ckpt, why)
                break
        if rec.strategy is not None:
            break

    shown_ckpt = rec.activation_checkpointing if activation_checkpointing is None else activation_checkpointing
    shown_ckpt = bool(shown_ckpt)
    shown_mb = micro_batch or rec.micro_batch or 1
    ests = {s: estimate(cfg, s, world, shown_mb, seq, precision, attention, shown_ckpt, optim) for s in able}
    for e in ests.values():
        e.fits = e.total <= budget
    return Plan(model, cfg, count_parameters(cfg)["total"], gpus, nodes, world, gpu_mem_gb, shown_mb, seq, precision,
                attention, shown_ckpt, headroom, ests, max_mb, rec, optim)


# ----------------------------------------------------------------------------------------------------- printing
def memory_model(p: Plan) -> list[str]:
    """The memory model behind the table, in words: what is counted per parameter and per activation element."""
    c = p.config
    torch_w = 2 if p.precision == "bf16-true" else 4
    ds_w = 4 if p.precision == "32" else 2
    opt = optimizer_bytes(c, p.optim, torch_w) / p.n_params
    moments = ("AdamW: 2 moments" if p.optim == "adamw"
               else "Muon: 1 momentum for the block matrices, AdamW: 2 for the rest")
    e = 4 if p.precision == "32" else 2
    scores = "stores" if ATTENTION_BACKENDS[p.attention].materializes_scores else "does not store"
    loss = (f"LM loss in chunks of {c.loss_chunk_size} tokens (gpt2/loss.py; ZeRO-3: on whole logits)"
            if c.loss_chunk_size > 0 else "LM loss on whole logits (fp32 log-softmax)")
    return [
        f"memory model: bytes per parameter (weights + gradients + optimizer state, before sharding) "
        f"DDP/FSDP {torch_w} + {torch_w} + {opt:.2f} (optim={p.optim}, {moments}, +4 B step per AdamW tensor); "
        f"DeepSpeed {ds_w} + {ds_w} + 12 (fp32 master + 2 moments; ZeRO-2: whole gradients of the tensors "
        f"overlapping a rank's partition)",
        f"activations: Korthikanti et al. 2022 Eq. 1 at {e} B per element, dropout {c.resid_pdrop:g}/{c.attn_pdrop:g}/"
        f"{c.embd_pdrop:g} (resid/attn/embd), attention={p.attention} {scores} the s x s scores, {loss}",
    ]


def format_plan(p: Plan) -> str:
    g = lambda b: f"{b / GiB:8.2f}"  # noqa: E731
    lines = [
        f"{p.model}: {p.n_params / 1e6:,.1f}M parameters (n_layer={p.config.n_layer}, n_embd={p.config.n_embd}, "
        f"n_head={p.config.n_head}, vocab={p.config.vocab_size}), {p.gpus} GPU(s) x {p.nodes} node(s) = "
        f"{p.world_size} rank(s), {p.gpu_mem_gb:g} GB each (budget {p.budget_bytes / GiB:.1f} GiB after "
        f"{p.headroom:.0%} headroom)",
        f"precision={p.precision} attention={p.attention} optim={p.optim} seq={p.seq} micro_batch={p.micro_batch} "
        f"activation_checkpointing={p.activation_checkpointing}   (GiB per GPU)",
        *memory_model(p),
        "",
        f"{'strategy':<25}{'params':>8}{'grads':>9}{'optim':>9}{'buffers':>9}{'activ.':>9}{'total':>9}"
        f"{'host':>9}  fits  max micro-batch (no ckpt / ckpt)",
    ]
    for s, e in p.estimates.items():
        mm = p.max_micro_batch[s]
        lines.append(f"{s:<25}{g(e.params)}{g(e.grads):>9}{g(e.optimizer):>9}{g(e.buffers):>9}{g(e.activations):>9}"
                     f"{g(e.total):>9}{g(e.cpu):>9}  {'yes ' if e.fits else 'no  '}  "
                     f"{mm[False] or '-'} / {mm[True] or '-'}")
    r = p.recommendation
    lines.append("")
    if r.strategy is None:
        lines.append(f"recommendation: {r.reason}")
    else:
        lines.append(f"recommendation: strategy={r.strategy} data.batch_size={r.micro_batch} "
                     f"trainer.activation_checkpointing={str(r.activation_checkpointing).lower()}  ({r.reason})")
    return "\n".join(lines)


_INT_KEYS = {"gpus", "nodes", "micro_batch", "seq", "vocab_size", "loss_chunk_size"}
_FLOAT_KEYS = {"gpu_mem_gb", "headroom", "dropout"}
_STR_KEYS = {"model", "precision", "attention", "optim"}
_KEYS = _INT_KEYS | _FLOAT_KEYS | _STR_KEYS | {"activation_checkpointing"}


def parse_args(argv: list[str]) -> dict:
    """key=value arguments (Hydra-like) -> plan() keyword arguments; a bad one raises ValueError naming it."""
    kw: dict = {}
    for arg in argv:
        if arg in ("-h", "--help"):
            raise SystemExit(__doc__.split("\n\n")[1] if __doc__ else "")
        key, sep, val = arg.partition("=")
        if not sep or not val:
            raise ValueError(f"argument {arg!r} is not key=value; write e.g. model=gpt2-xl gpus=8 gpu_mem_gb=80.")
        if key not in _KEYS:
            raise ValueError(f"unknown key {key!r}; the keys are {', '.join(sorted(_KEYS))}.")
        try:
            if key in _INT_KEYS:
                kw[key] = int(val)
            elif key in _FLOAT_KEYS:
                kw[key] = float(val)
            elif key == "activation_checkpointing":
                kw[key] = {"true": True, "false": False, "auto": None}[val.lower()]
            else:
                kw[key] = val
        except (ValueError, KeyError):
            kind = "an integer" if key in _INT_KEYS else "a number" if key in _FLOAT_KEYS else "true, false or auto"
            raise ValueError(f"{key}={val!r} is not valid; it must be {kind}.") from None
    if "dropout" in kw:  # model.dropout of a run: the three dropout probabilities of GPT2Config
        kw.update(dict.fromkeys(("resid_pdrop", "embd_pdrop", "attn_pdrop"), kw.pop("dropout")))
    return kw


def main(argv: list[str] | None = None) -> int:
    try:
        p = plan(**parse_args(sys.argv[1:] if argv is None else argv))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_plan(p))
    return 0


if __name__ == "__main__":
    sys.exit(main())
