"""launch/plan.py: parameter counts against real models, memory estimates against measured bytes, the recommendation."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import gpt2
from launch.plan import (
    GiB,
    STRATEGIES,
    activation_bytes,
    count_parameters,
    estimate,
    format_plan,
    optimizer_bytes,
    parse_args,
    plan,
    run_config,
    zero2_gradient_partition,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("preset", list(gpt2.PRESETS))
@pytest.mark.parametrize("tied", [True, False])
def test_parameter_count_matches_meta_model(preset, tied):
    cfg = gpt2.GPT2Config.from_preset(preset, tie_word_embeddings=tied)
    with torch.device("meta"):  # no memory, no init cost: even gpt2-xl builds instantly
        model = gpt2.GPT2LMHeadModel(cfg)
    unique = {id(p): p for p in model.parameters()}  # a tied lm_head is the same Parameter as wte
    counts = count_parameters(cfg)
    assert counts["total"] == sum(p.numel() for p in unique.values())
    assert counts["tensors"] == len(unique)
    assert counts["block"] == sum(p.numel() for p in model.transformer.h[0].parameters())


@pytest.mark.parametrize("preset,optim", [("tiny", "adamw"), ("gpt2", "adamw"), ("tiny", "muon"), ("demo", "muon")])
def test_state_estimate_matches_real_optimizer_step(preset, optim):
    """fp32 single process (ddp, world 1), the run's own optimizer (train/module.py build_optimizer: AdamW, or
    MuonWithAdamW for optim=muon): the bytes of params, grads and optimizer state after one real optimizer step
    (tests/state_bytes.py, unique storages) within 5 % of the estimate for `optim`."""
    from state_bytes import held_bytes
    from train.config import MuonConfig, OptimConfig
    from train.module import build_optimizer

    torch.manual_seed(0)
    cfg = run_config(preset)
    model = gpt2.GPT2LMHeadModel(cfg)
    opt = build_optimizer(model, MuonConfig() if optim == "muon" else OptimConfig())
    x = torch.randint(0, cfg.vocab_size, (1, 8))
    model(x, labels=x).loss.backward()
    opt.step()
    measured = held_bytes(None, model, opt)
    est = estimate(cfg, "ddp", world_size=1, micro_batch=1, seq=8, precision="32", optim=optim)
    for part in ("params", "grads", "optimizer"):
        m, e = measured[part], getattr(est, part)
        assert abs(e - m) <= 0.05 * m, f"{part}: estimated {e} bytes, measured {m}"
    assert est.optimizer == optimizer_bytes(cfg, optim, 4)
    if optim == "muon":  # one momentum instead of two moments for the block matrices
        assert est.optimizer < estimate(cfg, "ddp", 1, 1, 8, "32").optimizer
        with pytest.raises(ValueError, match="optim=muon cannot run under strategy=fsdp"):
            estimate(cfg, "fsdp", 2, 1, 8, "32", optim="muon")


def _saved_activation_bytes(cfg, b, s, checkpointing):
    """Bytes autograd keeps for backward after one training forward (unique storages, parameters excluded)."""
    torch.manual_seed(0)
    model = gpt2.GPT2LMHeadModel(cfg).train()
    if checkpointing:
        model.gradient_checkpointing_enable()
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in param_ptrs:
            storages[st.data_ptr()] = st.nbytes()
        return t

    x = torch.randint(0, cfg.vocab_size, (b, s))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(x, labels=x).loss
    loss.backward()
    return sum(storages.values())


@pytest.mark.parametrize(
    "attention,pdrop,checkpointing",
    [("sdpa", 0.0, False), ("eager", 0.0, False), ("eager", 0.1, False), ("sdpa", 0.0, True), ("eager", 0.1, True)],
)
def test_saved_activation_estimate_matches_autograd(attention, pdrop, checkpointing):
    """The stored-for-backward part of the activation estimate (fp32 on CPU) within 15 % of what autograd saves.

    CPU SDPA falls back to the math kernel when dropout is on, so flash-style sdpa is measured without dropout.
    """
    cfg = gpt2.GPT2Config.from_preset("tiny", vocab_size=512, attn_implementation=attention,
                                      resid_pdrop=pdrop, embd_pdrop=pdrop, attn_pdrop=pdrop)
    b, s = 4, 128
    measured = _saved_activation_bytes(cfg, b, s, checkpointing)
    est = activation_bytes(cfg, b, s, 4, attention, checkpointing, peak=False)
    assert abs(est - measured) <= 0.15 * measured, f"estimated {est}, measured {measured}"


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensors alive over time while it is active: each storage an op creates (parameters' storages
    excluded) counts from its creation until torch frees it (a weak reference to the storage expires). `peak(drop)`:
    the largest sum over time, leaving out the storages in `drop` (the gradients the backward leaves behind)."""

    def __init__(self, exclude: set[int]):
        super().__init__()
        self.exclude, self.live, self.events, self.n = exclude, {}, [], 0

    def sweep(self) -> None:
        for ptr, (ref, i, nbytes) in list(self.live.items()):
            if ref.expired():
                del self.live[ptr]
                self.events.append((i, -nbytes))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.sweep()
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.layout != torch.strided:  # a sparse embedding gradient
                continue
            st = t.untyped_storage()
            if st.nbytes() and st.data_ptr() not in self.exclude and st.data_ptr() not in self.live:
                self.n += 1
                self.live[st.data_ptr()] = (StorageWeakRef(st), self.n, st.nbytes())
                self.events.append((self.n, st.nbytes()))
        return out

    def peak(self, drop: set[int]) -> int:
        dropped = {self.live[p][1] for p in drop if p in self.live}
        now = top = 0
        for i, nbytes in self.events:
            if i not in dropped:
                now += nbytes
                top = max(top, now)
        return top


def _peak_activation_bytes(cfg, b, s, checkpointing):
    """Peak bytes of the tensors a training forward + backward of one micro-batch allocates, the parameters'
    gradients left out (fp32 on CPU): launch/plan.py's activation figure with peak=True."""
    torch.manual_seed(0)
    model = gpt2.GPT2LMHeadModel(cfg).train()
    if checkpointing:
        model.gradient_checkpointing_enable()
    x = torch.randint(0, cfg.vocab_size, (b, s))
    with LiveBytes({p.untyped_storage().data_ptr() for p in model.parameters()}) as live:
        model(x, labels=x).loss.backward()
    live.sweep()
    return live.peak({p.grad.untyped_storage().data_ptr() for p in model.parameters() if p.grad is not None})


@pytest.mark.parametrize("preset", ["tiny", "demo"])
@pytest.mark.parametrize("loss_chunk_size", [1024, 0])  # the run's default; 0: whole logits (as under ZeRO-3)
@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("precision", ["32", "bf16-mixed"])
def test_activation_estimate_of_the_run_models_matches_measurement(single_thread, preset, loss_chunk_size,
                                                                   checkpointing, precision):
    """The models `train/run.py model=tiny|demo` trains (run_config: dropout 0, sdpa, the 4096-token tokenizer of
    the embedded corpus) at the default micro-batch 8 x 128 tokens (conf/data/default.yaml), on CPU in fp32 and under
    bf16 autocast (what Lightning's bf16-mixed runs): what autograd saves within 15 % of activation_bytes(peak=False),
    and the peak of live tensors within 15 % of activation_bytes(peak=True)."""
    cfg = run_config(preset, vocab_size=4096, loss_chunk_size=loss_chunk_size)
    b, s, mixed = 8, 128, precision == "bf16-mixed"
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mixed):
        measured = {False: _saved_activation_bytes(cfg, b, s, checkpointing),
                    True: _peak_activation_bytes(cfg, b, s, checkpointing)}
    for peak, m in measured.items():
        est = activation_bytes(cfg, b, s, 2 if mixed else 4, cfg.attn_implementation, checkpointing, peak=peak,
                               autocast=mixed)
        assert abs(est - m) <= 0.15 * m, f"peak={peak}: estimated {est}, measured {m}"


def test_korthikanti_formula_at_16_bit():
    """At 2 bytes with dropout on, one layer is s·b·h·(34 + 5·a·s/h) (eager) and s·b·h·34 with flash attention."""
    cfg = gpt2.GPT2Config.from_preset("gpt2")  # HF dropout defaults: 0.1 everywhere
    s, b, h, a, L = 1024, 2, cfg.n_embd, cfg.n_head, cfg.n_layer
    one_layer = lambda attn: (activation_bytes(cfg, b, s, 2, attn, False, peak=False)  # noqa: E731
                              - activation_bytes(cfg.__class__(**{**cfg.__dict__, "n_layer": L - 1}), b, s, 2, attn,
                                                 False, peak=False))
    assert one_layer("eager") == s * b * h * 34 + 5 * a * s * s * b
    assert one_layer("flash") == one_layer("sdpa") == s * b * h * 34


def test_zero_stages_shard_as_the_zero_paper_says():
    cfg = run_config("gpt2-xl")  # the run's model: the LM loss in chunks
    P, N = count_parameters(cfg)["total"], 8
    e = {s: estimate(cfg, s, N, 1, 1024, "bf16-mixed") for s in STRATEGIES}
    # ZeRO paper Fig. 1 with K = 12: 2Ψ + 2Ψ + KΨ/N, 2Ψ + (2+K)Ψ/N, (2+2+K)Ψ/N
    assert e["deepspeed_zero1"].states == pytest.approx(4 * P + 12 * P / N, rel=1e-6)
    # ZeRO-2: DeepSpeed's gradient partition holds the whole gradients of the tensors overlapping it (the token
    # embedding spans every rank's part of its group): more than the paper's 2Ψ/N
    z2 = e["deepspeed_zero2"]
    assert z2.states == pytest.approx(2 * P + 12 * P / N + z2.grads, rel=1e-6)
    assert z2.grads == 2 * zero2_gradient_partition(cfg, N) and z2.grads > 2 * P / N
    assert zero2_gradient_partition(cfg, N) > count_parameters(cfg)["wte"]
    assert e["deepspeed_zero3"].states == pytest.approx(16 * P / N, rel=1e-6)
    assert e["ddp"].states > e["deepspeed_zero1"].states > e["deepspeed_zero2"].states > e["deepspeed_zero3"].states
    off = e["deepspeed_zero3_offload"]
    assert off.states == 0 and off.cpu > 16 * P / N and off.total < e["deepspeed_zero3"].total
    # the same activations where the same model runs: autocast over fp32 weights (DDP, FSDP), a bf16 module (ZeRO-1/2);
    # ZeRO-3 more: its partitioned LM head makes the model compute the loss on whole logits (no chunks)
    assert e["ddp"].activations == e["fsdp"].activations
    assert e["deepspeed_zero1"].activations == e["deepspeed_zero2"].activations < e["deepspeed_zero3"].activations
    assert e["deepspeed_zero3"].activations == e["deepspeed_zero3_offload"].activations


def test_more_gpus_shard_more_and_checkpointing_saves_activations():
    cfg = gpt2.GPT2Config.from_preset("gpt2-large")
    assert estimate(cfg, "fsdp", 16, 1, 1024).states < estimate(cfg, "fsdp", 4, 1, 1024).states
    assert estimate(cfg, "ddp", 16, 1, 1024).states == estimate(cfg, "ddp", 4, 1, 1024).states
    with_ckpt = estimate(cfg, "ddp", 1, 8, 1024, activation_checkpointing=True).activations
    assert with_ckpt < 0.5 * estimate(cfg, "ddp", 1, 8, 1024).activations


def test_recommendation_is_cheapest_fitting_strategy():
    p = plan("gpt2-xl", gpus=8, gpu_mem_gb=80)
    r = p.recommendation
    assert r.strategy in STRATEGIES and 1 <= r.micro_batch <= 64 and r.micro_batch & (r.micro_batch - 1) == 0
    chosen = estimate(p.config, r.strategy, 8, r.micro_batch, 1024, activation_checkpointing=r.activation_checkpointing)
    assert chosen.total <= p.budget_bytes
    if r.micro_batch < 64:  # the next power of two does not fit
        bigger = estimate(p.config, r.strategy, 8, 2 * r.micro_batch, 1024,
                          activation_checkpointing=r.activation_checkpointing)
        assert bigger.total > p.budget_bytes
    for cheaper in STRATEGIES[: STRATEGIES.index(r.strategy)]:  # every cheaper strategy fails even at micro-batch 1
        assert estimate(p.config, cheaper, 8, 1, 1024, activation_checkpointing=True).total > p.budget_bytes


def test_small_gpus_push_the_recommendation_to_sharding_and_checkpointing():
    big = plan("gpt2-xl", gpus=8, gpu_mem_gb=80).recommendation
    small = plan("gpt2-xl", gpus=8, gpu_mem_gb=16).recommendation
    assert STRATEGIES.index(small.strategy) > STRATEGIES.index("ddp")  # 1.5B x 16 B = 25 GB of states: no DDP
    assert (small.micro_batch, small.activation_checkpointing) != (big.micro_batch, big.activation_checkpointing)
    one_gpu = plan("gpt2-xl", gpus=1, gpu_mem_gb=24).recommendation
    assert one_gpu.strategy == "deepspeed_zero3_offload"
    none = plan("gpt2-xl", gpus=1, gpu_mem_gb=1).recommendation
    assert none.strategy is None and "nothing fits" in none.reason


def test_cli_prints_table_and_recommendation():
    out = subprocess.run([sys.executable, str(ROOT / "launch/plan.py"), "model=gpt2-xl", "gpus=8", "gpu_mem_gb=80"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for s in STRATEGIES:
        assert s in out.stdout
    assert "recommendation: strategy=" in out.stdout and "data.batch_size=" in out.stdout
    # the model behind the figures is printed: optimizer, bytes per parameter, the activation formula and loss
    assert "optim=adamw" in out.stdout and "memory model: bytes per parameter" in out.stdout
    assert "Korthikanti" in out.stdout and "LM loss in chunks of 1024 tokens" in out.stdout
    muon = subprocess.run([sys.executable, str(ROOT / "launch/plan.py"), "model=gpt2", "gpus=8", "optim=muon",
                           "dropout=0.1"], capture_output=True, text=True, timeout=120)
    assert muon.returncode == 0, muon.stderr
    assert "optim=muon" in muon.stdout and "Muon: 1 momentum" in muon.stdout and "dropout 0.1/0.1/0.1" in muon.stdout
    rows = {line.split()[0] for line in muon.stdout.splitlines() if line.split() and line.split()[0] in STRATEGIES}
    assert rows == {"ddp"}  # the only planned strategy that hands Muon whole matrices


def test_bad_arguments_fail_with_one_sentence():
    out = subprocess.run([sys.executable, str(ROOT / "launch/plan.py"), "model=gpt2", "gpu=8"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "unknown key 'gpu'" in out.stderr and "Traceback" not in out.stderr
    with pytest.raises(ValueError, match="gpus=.*integer"):
        parse_args(["gpus=eight"])
    with pytest.raises(ValueError, match="not key=value"):
        parse_args(["gpt2-xl"])
    with pytest.raises(ValueError, match="unknown model 'gpt3'"):
        plan("gpt3")
    with pytest.raises(ValueError, match="precision='fp8'"):
        plan("gpt2", precision="fp8")
    with pytest.raises(ValueError, match="seq must be"):
        plan("gpt2", seq=4096)


def test_format_plan_gib_columns_add_up():
    p = plan("gpt2", gpus=2, gpu_mem_gb=40, micro_batch=4)
    text = format_plan(p)
    row = next(line for line in text.splitlines() if line.startswith("ddp "))
    params, grads, optim, buffers, acts, total = map(float, row.split()[1:7])
    assert total == pytest.approx(params + grads + optim + buffers + acts, abs=0.03)
    assert p.estimates["ddp"].total / GiB == pytest.approx(total, abs=0.01)
