"""What does Lightning cost? tokens/s of train/run.py's training path vs a bare PyTorch loop.

Same model (gpt2.GPT2LMHeadModel at nanoGPT's CPU shakespeare-char dims: 4 layers, 4 heads, 128 wide, block 64,
batch 12, dropout 0), same char-level batches (the embedded default corpus), same AdamW groups / warm-up+cosine
schedule / grad clipping 1.0 / fused AdamW / loss synced to the host every 10 steps. The Lightning side is
`train.trainer.build_trainer` + `train.module.GPT2LitModule`, exactly as `train/run.py` builds them (progress bar,
throughput, RNG, seed callbacks, metrics.csv logger). Both run in one process and are interleaved in chunks of 10
steps (a callback runs the bare loop on the same batches after each Lightning chunk), so machine noise hits both
alike; warm-up steps are not timed.

    python benchmarks/overhead.py [--chunks 20 --chunk 10 --warmup 5 --threads N --no-progress-bar] [overrides]

Prints the ratio in wall time and in process CPU time; on a shared machine run it with --threads 1 and read the CPU
time ratio (the wall time also counts the moments other processes hold the cores).

`--floor` adds two more fits, each interleaved with its own bare loop in the same way: a minimal LightningModule
(forward + loss in `training_step`, the same optimizer, schedule and clipping; no callback, logger, progress bar or
checkpointing) under Lightning's automatic optimization (gradients freed after the optimizer step, as
GPT2LitModule), and the same module under manual optimization (`manual_backward`, clip, step, schedule and zero_grad
written in `training_step`). They separate what Lightning's
loop costs by itself at these dims from what train/run.py's module and callbacks add.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir

import gpt2
from common import NO_RECORD_HELP  # benchmarks/common.py (run as a script)
from train.config import register_configs, to_config
from train.cli.malloc import tune_glibc_malloc
from train.module import GPT2LitModule, WarmupDecay, build_optimizer
from train.strategies import build_strategy, check_hardware
from train.trainer import build_trainer

ROOT = Path(__file__).resolve().parents[1]
N_LAYER, N_HEAD, N_EMBD, BLOCK, BATCH = 4, 4, 128, 64, 12  # nanoGPT config/train_shakespeare_char.py, CPU variant


def char_batches(n: int, seed: int = 0) -> tuple[list[dict[str, torch.Tensor]], int]:
    """n char-level batches of the embedded default corpus (data_pipelines.corpus: ships with Python)."""
    from data_pipelines.corpus import build_corpus

    text = "\n\n".join(build_corpus())[:1_115_394]  # tiny Shakespeare's length, as nanoGPT's recipe
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([index[c] for c in text[:200_000]], dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ix = torch.randint(len(data) - BLOCK, (BATCH,), generator=g)
        x = torch.stack([data[i : i + BLOCK] for i in ix])  # (B, T)
        out.append({"input_ids": x, "labels": x})
    return out, len(chars)


def make_model(vocab: int) -> gpt2.GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = gpt2.GPT2Config(vocab_size=vocab, n_positions=BLOCK, n_embd=N_EMBD, n_layer=N_LAYER, n_head=N_HEAD,
                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return gpt2.GPT2LMHeadModel(cfg)


class BareLoop:
    """The same training step as GPT2LitModule + Trainer, hand-written: forward, backward, clip, AdamW, schedule."""

    def __init__(self, vocab: int, optim_cfg, total_steps: int, log_every: int):
        self.model = make_model(vocab).train()
        self.opt = build_optimizer(self.model, optim_cfg)  # the very optimizer GPT2LitModule builds
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, WarmupDecay(optim_cfg.warmup_steps, total_steps, optim_cfg.min_lr_ratio)
        )
        self.log_every, self.i = log_every, 0

    def step(self, b: dict[str, torch.Tensor]) -> None:
        loss = self.model(input_ids=b["input_ids"], labels=b["labels"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.i += 1
        if self.i % self.log_every == 0:
            loss.item()  # the same host sync as the module's logging interval


class Interleave(L.Callback):
    """After every `chunk` Lightning steps, run the same `chunk` batches through each hand-written side (e.g. the
    bare loop), rotating the order of the sides by one each chunk, timing each in wall and process CPU seconds.

    Lightning time of a chunk = time from the end of the previous chunk's last side to the end of this chunk's
    last Lightning step (hooks, progress bar, logging included); all sides of a chunk see the same machine load.
    CPU time (all threads of the process) does not count the time other processes take the cores: on a shared
    machine with one torch thread it is the steadier measure.
    """

    def __init__(self, sides: list[BareLoop], batches, warmup: int, chunk: int):
        self.sides, self.batches, self.warmup, self.chunk = sides, batches, warmup, chunk
        self.mark = (0.0, 0.0)
        self.light_s: list[tuple[float, float]] = []  # (wall, CPU) per chunk
        self.side_s: list[list[tuple[float, float]]] = [[] for _ in sides]

    @staticmethod
    def _now() -> tuple[float, float]:
        return time.perf_counter(), time.process_time()

    @staticmethod
    def _since(mark: tuple[float, float]) -> tuple[float, float]:
        wall, cpu = Interleave._now()
        return wall - mark[0], cpu - mark[1]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        done = batch_idx + 1
        if done < self.warmup:
            return
        if done == self.warmup:  # warm every side up on the same batches, then start the clock
            for side in self.sides:
                for b in self.batches[: self.warmup]:
                    side.step(b)
            self.mark = self._now()
            return
        if (done - self.warmup) % self.chunk:
            return
        self.light_s.append(self._since(self.mark))
        r = (len(self.light_s) - 1) % len(self.sides)
        order = list(range(len(self.sides)))
        for i in order[r:] + order[:r]:
            t0 = self._now()
            for b in self.batches[done - self.chunk : done]:
                self.sides[i].step(b)
            self.side_s[i].append(self._since(t0))
        self.mark = self._now()


class FloorModule(L.LightningModule):
    """The least a LightningModule can do with this model: training_step = forward + loss; optimizer, schedule and
    clipping as GPT2LitModule's. `manual=True`: Lightning's manual optimization, the update written out here."""

    def __init__(self, vocab: int, optim_cfg, total_steps: int, manual: bool):
        super().__init__()
        self.model = make_model(vocab).train()
        self.optim_cfg, self.total_steps = optim_cfg, total_steps
        self.automatic_optimization = not manual

    def training_step(self, b: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.model(input_ids=b["input_ids"], labels=b["labels"]).loss
        if not self.automatic_optimization:
            opt, sched = self.optimizers(), self.lr_schedulers()
            self.manual_backward(loss)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        return loss

    # automatic optimization frees the gradients after optimizer.step(), as GPT2LitModule does (see there): the floor
    # is Lightning's loop at its cheapest for this module, not a closure order train/run.py no longer uses
    frees_grads_after_step = GPT2LitModule.frees_grads_after_step
    optimizer_step = GPT2LitModule.optimizer_step
    optimizer_zero_grad = GPT2LitModule.optimizer_zero_grad

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)

    def configure_optimizers(self):
        cfg = self.optim_cfg
        opt = build_optimizer(self.model, cfg)
        schedule = WarmupDecay(cfg.warmup_steps, self.total_steps, cfg.min_lr_ratio)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def floor_ratios(vocab: int, optim_cfg, batches, steps: int, args, manual: bool) -> list[tuple[float, float]]:
    """(bare / Lightning) per chunk, (wall, CPU), for FloorModule against a fresh bare loop on the same batches."""
    bare = BareLoop(vocab, optim_cfg, steps, 10)
    inter = Interleave([bare], batches, args.warmup, args.chunk)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, gradient_clip_val=None if manual else 1.0, callbacks=[inter])
    module = FloorModule(vocab, optim_cfg, steps, manual)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(_Loader(batches), batch_size=None))
    return [(b[0] / lt[0], b[1] / lt[1]) for lt, b in zip(inter.light_s, inter.side_s[0])]


class _Loader(torch.utils.data.IterableDataset):
    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--chunks", type=int, default=20, help="number of interleaved chunks")
    p.add_argument("--chunk", type=int, default=10, help="optimizer steps per chunk (each side)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--no-progress-bar", action="store_true", help="time Lightning without its tqdm bar")
    p.add_argument("--floor", action="store_true",
                   help="also time a minimal LightningModule (automatic and manual optimization) against the bare loop")
    p.add_argument("overrides", nargs="*", help="extra config overrides for the Lightning side, e.g. guard=off")
    p.add_argument("--no-record", action="store_true", help=NO_RECORD_HELP)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tune_glibc_malloc()  # as train/run.py does (both sides share this process, so both run with it)
    register_configs()
    tmp = Path(tempfile.mkdtemp(prefix="overhead-"))
    steps = args.warmup + args.chunks * args.chunk
    overrides = [f"run_dir={tmp}", f"trainer.max_steps={steps}", "trainer.val_check_interval=1000000",
                 "trainer.limit_val_batches=0", "trainer.log_every_n_steps=10", "trainer.accelerator=cpu",
                 "trainer.devices=1", f"trainer.enable_progress_bar={not args.no_progress_bar}",
                 f"data.block_size={BLOCK}", f"data.batch_size={BATCH}", "optim.warmup_steps=10",
                 *args.overrides]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = to_config(compose(config_name="config", overrides=overrides))
    batches, vocab = char_batches(steps)
    print(f"model {N_LAYER}x{N_EMBD} ({N_HEAD} heads), block {BLOCK}, batch {BATCH}, vocab {vocab} (chars), "
          f"{args.chunks} interleaved chunks of {args.chunk} steps ({args.warmup} warm-up), torch threads "
          f"{torch.get_num_threads()}", flush=True)

    from train.callbacks.loggers import MetricsCSV

    bare = BareLoop(vocab, cfg.optim, steps, cfg.trainer.log_every_n_steps)
    inter = Interleave([bare], batches, args.warmup, args.chunk)
    module = GPT2LitModule(make_model(vocab), cfg.optim, max_steps=steps,
                           log_every_n_steps=cfg.trainer.log_every_n_steps)
    hardware = check_hardware(cfg.strategy, cfg.trainer)
    strategy = build_strategy(cfg.strategy, cfg.trainer, cfg.data.batch_size, hardware)
    L.seed_everything(cfg.seed, verbose=False)  # StepSeed reseeds each micro-batch from it
    trainer = build_trainer(cfg.trainer, cfg.guard, strategy, hardware.precision, tmp, [MetricsCSV(tmp)],
                            extra_callbacks=[inter])
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(_Loader(batches), batch_size=None))

    tokens = args.chunk * BATCH * BLOCK
    light, bare_s = inter.light_s, inter.side_s[0]
    for i, (lt, b) in enumerate(zip(light, bare_s)):
        print(f"chunk {i + 1:2d}: bare {tokens / b[0]:8.0f} tok/s   train/run.py path {tokens / lt[0]:8.0f} tok/s   "
              f"ratio {b[0] / lt[0]:.3f} (CPU time {b[1] / lt[1]:.3f})", file=sys.stderr)
    n = len(light) * tokens
    for k, what in ((0, "wall"), (1, "CPU ")):
        tb, tl = sum(b[k] for b in bare_s), sum(lt[k] for lt in light)
        med = statistics.median([b[k] / lt[k] for lt, b in zip(light, bare_s)])
        print(f"{what}: bare PyTorch loop {n / tb:8.0f} tokens/s, train/run.py path {n / tl:8.0f} tokens/s; ratio "
              f"(train/run.py / bare): total {tb / tl:.3f}, median of chunks {med:.3f} -> Lightning overhead "
              f"{100 * (1 - tb / tl):+.1f} %")
    if args.floor:
        for manual in (False, True):
            ratios = floor_ratios(vocab, cfg.optim, batches, steps, args, manual)
            what = "manual" if manual else "automatic"
            print(f"Lightning floor ({what} optimization, minimal module, nothing else): median of chunks bare / "
                  f"Lightning {statistics.median(r[0] for r in ratios):.3f} wall, "
                  f"{statistics.median(r[1] for r in ratios):.3f} CPU")
    return 0


if __name__ == "__main__":
    from common import recorded  # benchmarks/common.py: appends this run to benchmarks/RESULTS.md

    with recorded("overhead"):
        rc = main()
    sys.exit(rc)
