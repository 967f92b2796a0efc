"""Chunked cross-entropy (gpt2/loss.py) against the unchunked LM loss: peak memory, equality, and time.

1. The loss alone at GPT-2's vocabulary: hidden states (8, 1024, 768) and the (50257, 768) LM head, forward +
   backward of `lm_loss(hidden @ W.T, labels)` (the unchunked path: the (8192, 50257) logits, 1.6 GB in fp32) against
   `chunked_lm_loss(hidden, W, labels, chunk)`. Each side runs in a fresh process (so one side's freed memory cannot
   serve the other): peak memory of the loss = the process's peak resident set during forward + backward (VmHWM,
   reset through /proc/self/clear_refs just before) minus its resident set before, with the inputs already built.
   Both sides save the loss and gradients; their relative differences (norm of the difference / norm) are printed.
   Target: peak memory >= 4x lower; differences <= 1e-6.
2. Time: the training step of the default run (demo model, 8 x 128 tokens, vocab 4096; forward + backward + fused
   AdamW) with loss_chunk_size=0 against the chunk size given, interleaved in one process, in CPU time of the process
   (load from other processes on a shared machine does not count); with --loss-time also the wall time of part 1's
   loss, forward + backward, both sides (common.interleaved). Target: step time within 5 %.

    python benchmarks/chunked_ce.py [--chunk 1024 --threads N --repeats 5 --loss-time]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from common import NO_RECORD_HELP, interleaved, machine_line, median, recorded, spread  # noqa: E402
from gpt2 import GPT2Config, GPT2LMHeadModel  # noqa: E402
from gpt2.compat import lm_loss  # noqa: E402
from gpt2.loss import chunked_lm_loss  # noqa: E402

B, T, C, V = 8, 1024, 768, 50257  # one GPT-2 micro-batch at the paper's context and vocabulary


def inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, C, generator=g).requires_grad_()
    weight = (torch.randn(V, C, generator=g) * 0.02).requires_grad_()
    labels = torch.randint(0, V, (B, T), generator=g)
    return hidden, weight, labels


def loss_of(side: str, hidden, weight, labels, chunk: int) -> torch.Tensor:
    if side == "chunked":
        return chunked_lm_loss(hidden, weight, labels, chunk)
    return lm_loss(hidden @ weight.t(), labels)


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key))


def measure_one(side: str, chunk: int, out: Path) -> None:
    """(in a fresh process) peak memory of one forward + backward of the loss; loss and gradients to `out`."""
    hidden, weight, labels = inputs()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set (Linux >= 4.0)
    before = _status_kb("VmRSS")
    loss = loss_of(side, hidden, weight, labels, chunk)
    loss.backward()
    peak = _status_kb("VmHWM")
    torch.save({"loss": loss.detach(), "grad_h": hidden.grad, "grad_w": weight.grad}, out / f"{side}.pt")
    (out / f"{side}.json").write_text(json.dumps({"peak_mb": (peak - before) / 1024}))


def memory_and_equality(chunk: int, threads: int) -> tuple[dict, dict]:
    with tempfile.TemporaryDirectory() as d:
        for side in ("unchunked", "chunked"):
            subprocess.run([sys.executable, __file__, "--one", side, "--chunk", str(chunk), "--out", d,
                            "--threads", str(threads)], check=True)
        peak = {s: json.loads((Path(d) / f"{s}.json").read_text())["peak_mb"] for s in ("unchunked", "chunked")}
        a, b = (torch.load(Path(d) / f"{s}.pt") for s in ("unchunked", "chunked"))
        rel = {k: ((b[k] - a[k]).norm() / a[k].norm()).item() for k in ("loss", "grad_h", "grad_w")}
    return peak, rel


def loss_times(chunk: int, repeats: int) -> dict[str, list[float]]:
    hidden, weight, labels = inputs()

    def run(side):
        def f():
            hidden.grad = weight.grad = None
            loss_of(side, hidden, weight, labels, chunk).backward()
        return f

    return interleaved({"unchunked": run("unchunked"), "chunked": run("chunked")}, repeats)


def step_times(chunk: int, repeats: int, steps: int = 10) -> dict[str, list[float]]:
    """CPU seconds (this process, all its threads: time.process_time, so load from other processes on a shared
    machine does not count) per `steps` training steps of the demo model (the default run's shape), both loss
    paths, interleaved with alternating order after one warm-up round."""
    fns = {}
    for side, size in (("unchunked", 0), ("chunked", chunk)):
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config.from_preset("demo", vocab_size=4096, loss_chunk_size=size, resid_pdrop=0.0,
                                                       embd_pdrop=0.0, attn_pdrop=0.0))
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, fused=True)
        x = torch.randint(0, 4096, (8, 128), generator=torch.Generator().manual_seed(1))

        def f(model=model, opt=opt, x=x):
            for _ in range(steps):
                model(input_ids=x, labels=x).loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
        fns[side] = f
    names = list(fns)
    for name in names:
        fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            t0 = time.process_time()
            fns[name]()
            times[name].append(time.process_time() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunk", type=int, default=1024, help="tokens per chunk")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--loss-time", action="store_true", help="also time the loss alone at the size of part 1 (slow on "
                                                              "a small CPU: ~1 TFLOP per forward + backward)")
    ap.add_argument("--one", choices=("unchunked", "chunked"), help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--no-record", action="store_true", help=NO_RECORD_HELP)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.one:
        measure_one(args.one, args.chunk, args.out)
        return
    with recorded("chunked_ce.py"):
        print(machine_line())
        print(f"loss of {B} x {T} tokens, vocab {V}, width {C}, chunk {args.chunk} tokens, forward + backward")
        peak, rel = memory_and_equality(args.chunk, args.threads)
        print(f"peak memory of the loss: unchunked {peak['unchunked']:.0f} MB, chunked {peak['chunked']:.0f} MB: "
              f"{peak['unchunked'] / peak['chunked']:.1f}x lower (target >= 4x)")
        print(f"relative difference, chunked vs unchunked: loss {rel['loss']:.2e}, d/d hidden {rel['grad_h']:.2e}, "
              f"d/d weight {rel['grad_w']:.2e} (target <= 1e-6)")
        if args.loss_time:
            lt = loss_times(args.chunk, args.repeats)
            print(f"loss forward + backward: unchunked {median(lt['unchunked']):.3f} s {spread(lt['unchunked'])}, "
                  f"chunked {median(lt['chunked']):.3f} s {spread(lt['chunked'])}: chunked/unchunked time "
                  f"{median(lt['chunked']) / median(lt['unchunked']):.3f}")
        st = step_times(args.chunk, args.repeats)
        print(f"demo training step (8 x 128 tokens, vocab 4096, fused AdamW), CPU s per 10 steps: unchunked "
              f"{median(st['unchunked']):.3f} s {spread(st['unchunked'])}, chunked {median(st['chunked']):.3f} s "
              f"{spread(st['chunked'])}: chunked/unchunked time {median(st['chunked']) / median(st['unchunked']):.3f} "
              f"(target <= 1.05)")


if __name__ == "__main__":
    main()
