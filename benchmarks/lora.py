"""LoRA vs full fine-tuning of gpt2-medium on the CPU: trainable parameters, optimizer-state bytes, peak RSS and step
time, side by side.

    python benchmarks/lora.py                 # gpt2-medium (24 x 1024), batch 1 x 128, 3 timed steps, 2 rounds
    python benchmarks/lora.py --n-layer 4     # a shallower model of the same width (a quick look)

Each side runs in a process of its own (peak RSS is per process), the rounds alternate the order (full, LoRA, then
LoRA, full, ...), and the median over the rounds is reported. Both sides are what a run trains: the model
(gpt2.GPT2LMHeadModel, weights from a cheap deterministic fill instead of a download), `train.adapters.lora.wrap`
with the peft group's defaults at r=8 for LoRA (peft's LoRA on c_attn, c_proj, c_fc; the tied lm_head frozen with the base),
the run's AdamW (`train.module.build_optimizer`, conf/optim/adamw.yaml), one forward + backward + optimizer step per
step. Optimizer-state bytes: every tensor in the optimizer's state after the first step (AdamW: exp_avg, exp_avg_sq).
Peak RSS: the process' ru_maxrss at the end (model, gradients, optimizer state, activations, the Python runtime).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def side(kind: str, args: argparse.Namespace) -> dict:
    """One side in this process: its figures as a dict."""
    import torch

    sys.path.insert(0, str(ROOT))
    import gpt2
    from train.config import OptimConfig, PeftConfig
    from train.adapters.lora import wrap
    from train.module import build_optimizer

    torch.manual_seed(0)
    cfg = gpt2.GPT2Config(vocab_size=50257, n_positions=1024, n_embd=args.n_embd, n_layer=args.n_layer,
                          n_head=args.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    with torch.device("meta"):
        model = gpt2.GPT2LMHeadModel(cfg)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):  # cheap deterministic values instead of a 355M normal_ init
            p.copy_(torch.arange(p.numel(), dtype=torch.float32).view(p.shape).mul_(1e-7).add_(i * 1e-3).sin_()
                    .mul_(0.02))
    model.tie_weights()
    model = wrap(model, PeftConfig(method="lora" if kind == "lora" else "none", r=args.r, alpha=2 * args.r))
    model.train()
    opt = build_optimizer(model, OptimConfig())
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.block), generator=torch.Generator().manual_seed(0))
    times = []
    for step in range(args.steps + 1):  # the first step allocates the optimizer state: not timed
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step:
            times.append(time.perf_counter() - t0)
    state = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
    return {"params": sum(p.numel() for p in model.parameters()),
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "state_bytes": state, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "step_s": statistics.median(times), "loss": float(loss)}


def main() -> None:
    from common import NO_RECORD_HELP, machine_line, recorded  # benchmarks/common.py (run as a script)

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-layer", type=int, default=24)
    p.add_argument("--n-embd", type=int, default=1024)
    p.add_argument("--n-head", type=int, default=16)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--steps", type=int, default=3, help="timed steps per side and round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--no-record", action="store_true", help=NO_RECORD_HELP)
    p.add_argument("--side", choices=("full", "lora"), help=argparse.SUPPRESS)  # a child process' side
    args = p.parse_args()
    if args.side:
        print(json.dumps(side(args.side, args)))
        return
    child = [a for a in sys.argv[1:] if a != "--no-record"]
    runs: dict[str, list[dict]] = {"full": [], "lora": []}
    with recorded("lora") as rec:
        rec.skip = args.no_record
        print(machine_line())
        print("load average at start: %.1f %.1f %.1f" % os.getloadavg())
        print(f"model {args.n_layer} x {args.n_embd} (vocab 50257), batch {args.batch} x {args.block}, "
              f"LoRA r={args.r} on c_attn/c_proj/c_fc, AdamW; {args.steps} timed steps x {args.rounds} rounds")
        for i in range(args.rounds):
            for kind in (("full", "lora") if i % 2 == 0 else ("lora", "full")):
                out = subprocess.run([sys.executable, __file__, *child, "--side", kind], capture_output=True,
                                     text=True, check=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
                runs[kind].append(json.loads(out.stdout.strip().splitlines()[-1]))
        med = {k: {f: statistics.median(r[f] for r in v) for f in v[0]} for k, v in runs.items()}
        f, lo = med["full"], med["lora"]
        rows = [("trainable parameters", f"{f['trainable'] / 1e6:,.1f} M", f"{lo['trainable'] / 1e6:,.2f} M",
                 f["trainable"] / lo["trainable"]),
                ("optimizer state", f"{f['state_bytes'] / 2**20:,.0f} MiB", f"{lo['state_bytes'] / 2**20:,.1f} MiB",
                 f["state_bytes"] / lo["state_bytes"]),
                ("peak RSS", f"{f['peak_rss'] / 2**30:.2f} GiB", f"{lo['peak_rss'] / 2**30:.2f} GiB",
                 f["peak_rss"] / lo["peak_rss"]),
                ("step time (median)", f"{f['step_s']:.2f} s", f"{lo['step_s']:.2f} s", f["step_s"] / lo["step_s"])]
        print(f"{'':22s} {'full FT':>14s} {'LoRA r=' + str(args.r):>14s} {'full / LoRA':>12s}")
        for name, a, b, ratio in rows:
            print(f"{name:22s} {a:>14s} {b:>14s} {ratio:>11.2f}x")
        print("load average at end: %.1f %.1f %.1f" % os.getloadavg())
        print("step times per round (s): full " + ", ".join(f"{r['step_s']:.2f}" for r in runs["full"])
              + "; LoRA " + ", ".join(f"{r['step_s']:.2f}" for r in runs["lora"]))


if __name__ == "__main__":
    main()
