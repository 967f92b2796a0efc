"""What does Lightning cost? tokens/s of train/run.py's training path vs a bare PyTorch loop.

Same model (gpt2.GPT2LMHeadModel at nanoGPT's CPU shakespeare-char dims: 4 layers, 4 heads, 128 wide, block 64,
batch 12, dropout 0), same char-level batches of the embedded default corpus (its first 200k characters), same AdamW groups / warm-up+cosine schedule /
grad clipping 1.0 / fused AdamW / loss synced to the host every 10 steps. The Lightning side is `train.trainer.build_trainer` +
`train.module.GPT2LitModule`, exactly as `train/run.py` builds them (progress bar, throughput, RNG, seed callbacks,
metrics.csv logger). Both run in one process and are interleaved in chunks of 10 steps (a callback runs the bare
loop on the same batches after each Lightning chunk), so machine noise hits both alike; warm-up steps are not timed.

    python benchmarks/overhead.py [--chunks 20 --chunk 10 --warmup 5 --threads N --no-progress-bar]
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
from common import corpus_text  # benchmarks/common.py (run as a script, like the others)
from train.config import register_configs, to_config
from train.module import GPT2LitModule, WarmupDecay, build_optimizer
from train.trainer import build_trainer

ROOT = Path(__file__).resolve().parents[1]
N_LAYER, N_HEAD, N_EMBD, BLOCK, BATCH = 4, 4, 128, 64, 12  # nanoGPT config/train_shakespeare_char.py, CPU variant


def char_batches(n: int, seed: int = 0) -> tuple[list[dict[str, torch.Tensor]], int]:
    text = corpus_text(200_000)
    chars = sorted(set(text))
    data = torch.tensor([chars.index(c) for c in text], dtype=torch.long)
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
                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)  # fmt: skip
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
    bare loop), rotating the order of the sides by one each chunk, timing each.

    Lightning time of a chunk = wall time from the end of the previous chunk's last side to the end of this chunk's
    last Lightning step (hooks, progress bar, logging included); all sides of a chunk see the same machine load.
    """

    def __init__(self, sides: list[BareLoop], batches, warmup: int, chunk: int):
        self.sides, self.batches, self.warmup, self.chunk = sides, batches, warmup, chunk
        self.mark = 0.0
        self.light_s: list[float] = []
        self.side_s: list[list[float]] = [[] for _ in sides]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        done = batch_idx + 1
        if done < self.warmup:
            return
        if done == self.warmup:  # warm every side up on the same batches, then start the clock
            for side in self.sides:
                for b in self.batches[: self.warmup]:
                    side.step(b)
            self.mark = time.perf_counter()
            return
        if (done - self.warmup) % self.chunk:
            return
        self.light_s.append(time.perf_counter() - self.mark)
        r = (len(self.light_s) - 1) % len(self.sides)
        order = list(range(len(self.sides)))
        for i in order[r:] + order[:r]:
            t0 = time.perf_counter()
            for b in self.batches[done - self.chunk : done]:
                self.sides[i].step(b)
            self.side_s[i].append(time.perf_counter() - t0)
        self.mark = time.perf_counter()


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
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    register_configs()
    tmp = Path(tempfile.mkdtemp(prefix="overhead-"))
    steps = args.warmup + args.chunks * args.chunk
    overrides = [f"run_dir={tmp}", f"trainer.max_steps={steps}", "trainer.val_check_interval=1000000",
                 "trainer.limit_val_batches=0", "trainer.log_every_n_steps=10", "trainer.accelerator=cpu",
                 "trainer.devices=1", f"trainer.enable_progress_bar={not args.no_progress_bar}",
                 f"data.block_size={BLOCK}", f"data.batch_size={BATCH}", "optim.warmup_steps=10"]  # fmt: skip
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = to_config(compose(config_name="config", overrides=overrides))
    batches, vocab = char_batches(steps)
    print(f"model {N_LAYER}x{N_EMBD} ({N_HEAD} heads), block {BLOCK}, batch {BATCH}, vocab {vocab} (chars), "
          f"{args.chunks} interleaved chunks of {args.chunk} steps ({args.warmup} warm-up), torch threads "
          f"{torch.get_num_threads()}", flush=True)  # fmt: skip

    from train.loggers import MetricsCSV

    bare = BareLoop(vocab, cfg.optim, steps, cfg.trainer.log_every_n_steps)
    inter = Interleave([bare], batches, args.warmup, args.chunk)
    module = GPT2LitModule(make_model(vocab), cfg.optim, max_steps=steps,
                           log_every_n_steps=cfg.trainer.log_every_n_steps)  # fmt: skip
    trainer = build_trainer(cfg, tmp, [MetricsCSV(tmp)], extra_callbacks=[inter])
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(_Loader(batches), batch_size=None))

    tokens = args.chunk * BATCH * BLOCK
    ratios = [b / lt for lt, b in zip(inter.light_s, inter.side_s[0])]  # tokens/s ratio = time ratio inverted
    for i, (lt, b) in enumerate(zip(inter.light_s, inter.side_s[0])):
        print(f"chunk {i + 1:2d}: bare {tokens / b:8.0f} tok/s   train/run.py path {tokens / lt:8.0f} tok/s   "
              f"ratio {b / lt:.3f}", file=sys.stderr)  # fmt: skip
    tb, tl = sum(inter.side_s[0]), sum(inter.light_s)
    n = len(ratios) * tokens
    print(f"bare PyTorch loop : {n / tb:9.0f} tokens/s")
    print(f"train/run.py path : {n / tl:9.0f} tokens/s")
    print(f"ratio (train/run.py / bare): total {tb / tl:.3f}, median of chunks {statistics.median(ratios):.3f}"
          f"  -> Lightning overhead {100 * (1 - tb / tl):+.1f} %")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
