"""Training step, CPU: tokens/s of our model under train/run.py's path vs a bare loop vs transformers in that loop.

Four sides, one process, the same batches in the same order:
  (a) gpt2.GPT2LMHeadModel trained by `train.trainer.build_trainer` + `train.module.GPT2LitModule`, built exactly as
      benchmarks/overhead.py builds them (callbacks, progress bar, metrics.csv logger, AdamW groups, warm-up+cosine);
  (b) the same model in overhead.py's hand-written loop (forward, backward, clip 1.0, AdamW, schedule, a host sync
      every log interval) with the optimizer (a) builds (`train.module.build_optimizer`: fused AdamW);
  (c) transformers.GPT2LMHeadModel (attn_implementation="sdpa", our initial weights via save_pretrained /
      from_pretrained) in that loop with `torch.optim.AdamW` as a hand-written loop gets it (no `fused` argument:
      torch's default, the foreach implementation);
  (d) transformers' model in (b)'s loop exactly, fused AdamW included: the model-only comparison.
The Lightning run drives; after every chunk of steps a callback runs the same batches through (b), (c) and (d),
rotating their order each chunk (benchmarks/common.py), so machine load hits all sides alike. Dropout is off
everywhere. Reported: the median over chunks of tokens/s per side and of the per-chunk ratios a/c (what training
with gpt2-forge gains over transformers' model in a plain PyTorch loop; target >= 1.10), a/d (the same
optimizer on both sides: what the model alone gains; no target) and a/b (Lightning's overhead; target >= 0.95),
for two configs:
  nanogpt-char  4 layers, 4 heads, 128 wide, block 64, batch 12, char vocab of the embedded corpus (nanoGPT
                config/train_shakespeare_char.py, CPU variant; overhead.py's config)
  gpt2-width    2 layers, 12 heads, 768 wide, block 128, batch 4, vocab 50257 (GPT-2's width and vocabulary, few
                layers; the ids are the embedded corpus' bytes: the token values do not change the compute)

    python benchmarks/train_step.py [--quick] [--threads N] [--config nanogpt-char|gpt2-width] [--profile]

With --threads 1 on 2 cores the default takes ~4 min and --quick ~90 s. On a shared machine use --threads 1: more
threads than free cores oversubscribe them, and both sides slow down unevenly.
--profile skips the timing and prints torch.profiler's top operators for one training step of (b) and (c).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir

import gpt2
from common import NO_RECORD_HELP, corpus_text, machine_line  # benchmarks/common.py (run as a script)
from overhead import ROOT, BareLoop, Interleave, _Loader, char_batches
from train.config import register_configs, to_config
from train.module import GPT2LitModule, WarmupDecay, build_optimizer, param_groups
from train.strategies import build_strategy, check_hardware
from train.trainer import build_trainer


@dataclass(frozen=True)
class Spec:
    name: str
    n_layer: int
    n_head: int
    n_embd: int
    block: int
    batch: int
    vocab: int | None  # None: the character vocabulary of the corpus
    chunks: int  # default timing: interleaved chunks x steps per chunk (each side)
    chunk: int
    quick_chunks: int
    quick_chunk: int


# step times on the 2-core dev box (--threads 1) sized these: the default run ~3 min, --quick ~70 s
SPECS = {
    "nanogpt-char": Spec("nanogpt-char", 4, 4, 128, 64, 12, None, 20, 10, 8, 5),
    "gpt2-width": Spec("gpt2-width", 2, 12, 768, 128, 4, 50257, 6, 2, 3, 1),
}
WARMUP = 3


def batches_for(spec: Spec, n: int, seed: int = 0) -> tuple[list[dict[str, torch.Tensor]], int]:
    """`n` batches {input_ids, labels} of random windows of the embedded default corpus, and the vocabulary size."""
    if spec.vocab is None:
        import overhead as oh

        assert (oh.BLOCK, oh.BATCH) == (spec.block, spec.batch), "nanogpt-char must match overhead.py's dims"
        return char_batches(n, seed)
    raw = corpus_text(200_000).encode("utf-8")[:200_000]
    data = torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ix = torch.randint(len(data) - spec.block, (spec.batch,), generator=g)
        x = torch.stack([data[i : i + spec.block] for i in ix])  # (B, T)
        out.append({"input_ids": x, "labels": x})
    return out, spec.vocab


def make_ours(spec: Spec, vocab: int) -> gpt2.GPT2LMHeadModel:
    torch.manual_seed(0)  # (a), (b) and, through save_pretrained, (c) start from these same weights
    cfg = gpt2.GPT2Config(vocab_size=vocab, n_positions=spec.block, n_embd=spec.n_embd, n_layer=spec.n_layer,
                          n_head=spec.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                          eos_token_id=0, attn_implementation="sdpa")
    return gpt2.GPT2LMHeadModel(cfg)


def make_theirs(ours: gpt2.GPT2LMHeadModel):
    import transformers

    with tempfile.TemporaryDirectory() as d:
        ours.save_pretrained(d)
        return transformers.GPT2LMHeadModel.from_pretrained(d, attn_implementation="sdpa", dtype=torch.float32)


class Loop(BareLoop):
    """overhead.py's bare loop (its `step` unchanged) around a given model, e.g. transformers'.

    framework_optimizer: the AdamW GPT2LitModule builds (fused); else `torch.optim.AdamW` with torch's defaults, as a
    hand-written loop has it."""

    def __init__(self, model: torch.nn.Module, optim_cfg, total_steps: int, log_every: int,
                 framework_optimizer: bool = True):
        self.model = model.train()
        if framework_optimizer:
            self.opt = build_optimizer(self.model, optim_cfg)
        else:
            self.opt = torch.optim.AdamW(param_groups(self.model, optim_cfg.weight_decay), lr=optim_cfg.lr,
                                         betas=tuple(optim_cfg.betas), eps=optim_cfg.eps)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, WarmupDecay(optim_cfg.warmup_steps, total_steps, optim_cfg.min_lr_ratio)
        )
        self.log_every, self.i = log_every, 0


def compose_cfg(run_dir: Path, spec: Spec, steps: int):
    """The run config as train/run.py composes it, with overhead.py's overrides (no validation, log every 10)."""
    overrides = [f"run_dir={run_dir}", f"trainer.max_steps={steps}", "trainer.val_check_interval=1000000",
                 "trainer.limit_val_batches=0", "trainer.log_every_n_steps=10", "trainer.accelerator=cpu",
                 "trainer.devices=1", f"data.block_size={spec.block}", f"data.batch_size={spec.batch}",
                 "optim.warmup_steps=10"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return to_config(compose(config_name="config", overrides=overrides))


def run_config(spec: Spec, chunks: int, chunk: int) -> dict[str, float]:
    from train.callbacks.loggers import MetricsCSV

    tmp = Path(tempfile.mkdtemp(prefix=f"train-step-{spec.name}-"))
    steps = WARMUP + chunks * chunk
    cfg = compose_cfg(tmp, spec, steps)
    batches, vocab = batches_for(spec, steps)
    ours_bare = make_ours(spec, vocab)
    theirs = make_theirs(ours_bare)
    ids = batches[0]["input_ids"]
    with torch.no_grad():  # same weights -> same loss: the sides really compute the same thing
        lo, lt = ours_bare(input_ids=ids, labels=ids).loss.item(), theirs(input_ids=ids, labels=ids).loss.item()
    assert abs(lo - lt) < 1e-4, f"ours and transformers disagree on the first loss: {lo} vs {lt}"

    log_every = cfg.trainer.log_every_n_steps
    theirs_fused = make_theirs(ours_bare)
    sides = [Loop(ours_bare, cfg.optim, steps, log_every),  # (b)
             Loop(theirs, cfg.optim, steps, log_every, framework_optimizer=False),  # (c)
             Loop(theirs_fused, cfg.optim, steps, log_every)]  # (d): (b)'s loop exactly
    inter = Interleave(sides, batches, WARMUP, chunk)
    module = GPT2LitModule(make_ours(spec, vocab), cfg.optim, max_steps=steps, log_every_n_steps=log_every)
    hardware = check_hardware(cfg.strategy, cfg.trainer)
    strategy = build_strategy(cfg.strategy, cfg.trainer, cfg.data.batch_size, hardware)
    L.seed_everything(cfg.seed, verbose=False)  # StepSeed reseeds each micro-batch from it
    trainer = build_trainer(cfg.trainer, cfg.guard, strategy, hardware.precision, tmp, [MetricsCSV(tmp)],
                            extra_callbacks=[inter])
    print(f"[{spec.name}] {spec.n_layer}x{spec.n_embd} ({spec.n_head} heads), block {spec.block}, batch "
          f"{spec.batch}, vocab {vocab}; {chunks} interleaved chunks of {chunk} steps ({WARMUP} warm-up)",
          file=sys.stderr, flush=True)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(_Loader(batches), batch_size=None))

    tokens = chunk * spec.batch * spec.block
    a, (b, c, d) = inter.light_s, inter.side_s
    assert len(a) == len(b) == len(c) == len(d) == chunks, (len(a), len(b), len(c), len(d))

    def ratio(num, den):  # tokens/s ratio num/den per chunk = time ratio den/num
        rs = [td / tn for tn, td in zip(num, den)]
        return statistics.median(rs), f"{min(rs):.2f}..{max(rs):.2f}"

    out = {k: statistics.median(tokens / t for t in v) for k, v in (("a", a), ("b", b), ("c", c), ("d", d))}
    (out["a/c"], out["a/c range"]), (out["a/d"], out["a/d range"]) = ratio(a, c), ratio(a, d)
    out["a/b"] = ratio(a, b)[0]
    return out


def profile(spec: Spec, top: int) -> None:
    """torch.profiler's operator table for one step of (b) and of (c), after two warm-up steps each."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    register_configs()
    cfg = compose_cfg(Path(tempfile.mkdtemp(prefix="train-step-prof-")), spec, 10)
    batches, vocab = batches_for(spec, 3)
    ours = make_ours(spec, vocab)
    theirs = make_theirs(ours)
    for name, model in (("gpt2-forge", ours), ("transformers", theirs)):
        loop = Loop(model, cfg.optim, 10, 10)
        loop.step(batches[0]), loop.step(batches[1])
        with prof(activities=[ProfilerActivity.CPU]) as p:
            loop.step(batches[2])
        print(f"\n=== {spec.name}: {name}, one training step ===")
        print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="few chunks (~70 s with --threads 1)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--config", choices=list(SPECS), action="append", help="run only these (repeatable)")
    p.add_argument("--chunks", type=int, default=None, help="override the config's number of chunks")
    p.add_argument("--profile", action="store_true", help="print profiler tables for one step instead of timing")
    p.add_argument("--top", type=int, default=15, help="rows of the profiler table")
    p.add_argument("--no-record", action="store_true", help=NO_RECORD_HELP)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    specs = [SPECS[n] for n in (args.config or SPECS)]
    if args.profile:
        for spec in specs:
            profile(spec, args.top)
        return 0
    register_configs()
    print(machine_line())
    rows = []
    t0 = time.perf_counter()
    for spec in specs:
        chunks = args.chunks or (spec.quick_chunks if args.quick else spec.chunks)
        r = run_config(spec, chunks, spec.quick_chunk if args.quick else spec.chunk)
        rows.append(f"| {spec.name} | {r['a']:,.0f} | {r['b']:,.0f} | {r['c']:,.0f} | {r['d']:,.0f} | {r['a/c']:.3f} "
                    f"({r['a/c range']}) | {r['a/d']:.3f} ({r['a/d range']}) | {r['a/b']:.3f} |")
        print(rows[-1], file=sys.stderr, flush=True)
    print(f"\n{time.perf_counter() - t0:.0f} s; tokens/s and ratios are medians over interleaved chunks\n")
    print("| config | (a) ours, train/run.py tok/s | (b) ours, bare loop tok/s | (c) transformers, bare loop, "
          "torch's default AdamW tok/s | (d) transformers, (b)'s loop tok/s | a/c (target >= 1.10; chunk range) | "
          "a/d (model only) | a/b (target >= 0.95) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    from common import recorded  # benchmarks/common.py: appends this run to benchmarks/RESULTS.md

    with recorded("train_step"):
        rc = main()
    sys.exit(rc)
