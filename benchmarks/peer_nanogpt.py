"""Ours against nanoGPT on nanoGPT's own CPU recipe: per-step time and start-up of the whole `python train/run.py`.

nanoGPT's shakespeare-char recipe with the CPU overrides of its README (`config/train_shakespeare_char.py
--device=cpu --compile=False --eval_iters=20 --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4
--n_embd=128 --dropout=0.0`), evaluated only at step 0 and saving no checkpoint, against our `python train/run.py
data=tokens` on the same `train.bin`/`val.bin` and the same dims, activation and hyper-parameters (lr 1e-3, beta2
0.99, 100 warm-up steps, cosine to lr/10), validation and periodic checkpoints off. Both are launched as the user
launches them: one fresh process per run, timed from `Popen` to exit.

The models: nanoGPT's MLP uses exact GELU (`nn.GELU()`), so ours runs `model.activation_function=gelu` too (GPT-2's
own `gelu_new` is the tanh approximation, whose CPU kernel costs ~4x erf's forward at these shapes; pass
`model.activation_function=gelu_new` after the checkout path to time it). One difference stays: nanoGPT's recipe
runs `bias=False`, GPT-2 has a bias in every Linear and LayerNorm (ours keeps them: the weights are transformers'
GPT-2), 52 parameter tensors against 27 and a bias add + bias gradient per projection on our side.

- per-step time = (wall(long) - wall(short)) / (long - short), default long 600 and short 100 steps: start-up and
  tear-down (imports, data, model, nanoGPT's step-0 evaluation, our export) cancel;
- start-up = launch -> end of the first optimizer step: nanoGPT's `iter 0:` line on stdout, our step-1 row in
  metrics.csv. nanoGPT's start-up is also given without its step-0 evaluation (20+20 batches), which our side skips;
- rounds are interleaved and the order of the four runs flips every round, so load from other processes hits both
  sides alike; the ratio ours/nanoGPT (speed: > 1 means ours is faster) is taken per round, then its median, min, max.

The data: nanoGPT's own `data/shakespeare_char/prepare.py`, run unchanged on a copy of the checkout, with its
`input.txt` written beforehand from this repository's embedded default corpus (`data_pipelines.corpus`; the script
downloads tiny Shakespeare only when input.txt is missing, and this benchmark needs no network). The default length
is tiny Shakespeare's, 1,115,394 characters.

    python benchmarks/peer_nanogpt.py <nanoGPT checkout> [--rounds 5 --short 100 --long 600 --threads N]

Needs only the checkout (train.py, model.py, configurator.py, config/, data/shakespeare_char/prepare.py) and numpy;
nothing is written into the checkout (it is copied to a temporary folder, removed at the end unless --keep).
"""

from __future__ import annotations

import argparse
import math
import os
import pickle
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import NO_RECORD_HELP, machine_line  # noqa: E402  benchmarks/common.py (run as a script)

TINY_SHAKESPEARE_CHARS = 1_115_394
DIMS = {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 64, "batch_size": 12}


def nanogpt_args(steps: int, out_dir: Path) -> list[str]:
    """nanoGPT's README CPU command for shakespeare-char, `steps` optimizer steps, evaluation only at step 0."""
    d = DIMS
    return ["train.py", "config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=20",
            "--log_interval=1", f"--block_size={d['block_size']}", f"--batch_size={d['batch_size']}",
            f"--n_layer={d['n_layer']}", f"--n_head={d['n_head']}", f"--n_embd={d['n_embd']}",
            # nanoGPT runs iterations 0..max_iters: max_iters + 1 steps (the extra one cancels in the difference)
            # lr_decay_iters > warmup_iters (100): nanoGPT's get_lr divides by their difference
            f"--max_iters={steps}", f"--lr_decay_iters={max(steps, 101)}", "--dropout=0.0",
            "--eval_interval=100000000",  # step 0 only; it saves only when iter_num > 0: no checkpoint
            f"--out_dir={out_dir}"]


def ours_args(steps: int, data_dir: Path, vocab: int, run_dir: Path, root: Path = ROOT) -> list[str]:
    """`train/run.py` with the same data, dims and hyper-parameters; validation and periodic checkpoints off."""
    d = DIMS
    return [str(root / "train" / "run.py"), "data=tokens", f"data.path={data_dir}", f"data.vocab_size={vocab}",
            f"data.block_size={d['block_size']}", f"data.batch_size={d['batch_size']}",
            f"model.n_layer={d['n_layer']}", f"model.n_head={d['n_head']}", f"model.n_embd={d['n_embd']}",
            f"model.n_positions={d['block_size']}", "model.dropout=0.0", "model.activation_function=gelu",
            "optim.lr=1e-3", "optim.betas=[0.9,0.99]", "optim.warmup_steps=100", "optim.min_lr_ratio=0.1",
            f"trainer.max_steps={steps}", "trainer.accelerator=cpu", "trainer.devices=1",
            "trainer.limit_val_batches=0", "checkpoint.every_n_steps=100000000", f"run_dir={run_dir}"]


def write_input_text(path: Path, n_chars: int) -> None:
    """The embedded default corpus (CPython's documentation; ships with Python), cut to `n_chars` characters."""
    from data_pipelines.corpus import build_corpus

    text = "\n\n".join(build_corpus())
    path.write_text(text[:n_chars], encoding="utf-8")


def prepare_nanogpt(checkout: Path, work: Path, n_chars: int) -> tuple[Path, int]:
    """Copy the checkout to `work`, write input.txt, run nanoGPT's prepare.py there; (copy, vocab size)."""
    need = ["train.py", "model.py", "configurator.py", "config/train_shakespeare_char.py",
            "data/shakespeare_char/prepare.py"]
    missing = [n for n in need if not (checkout / n).is_file()]
    if missing:
        sys.exit(f"error: {checkout} is not a nanoGPT checkout (no {missing[0]}); pass the folder holding train.py.")
    nano = work / "nanogpt"
    for n in need:
        (nano / n).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(checkout / n, nano / n)
    data = nano / "data" / "shakespeare_char"
    write_input_text(data / "input.txt", n_chars)
    env = dict(os.environ)
    try:
        import requests  # noqa: F401 - prepare.py imports it; with input.txt present it never calls it
    except ImportError:  # a stand-in that fails loudly if prepare.py ever tried to download
        stub = work / "stub"
        stub.mkdir(exist_ok=True)
        (stub / "requests.py").write_text("def get(*a, **k):\n    raise RuntimeError('no network in this benchmark')\n")
        env["PYTHONPATH"] = os.pathsep.join([str(stub), env.get("PYTHONPATH", "")])
    subprocess.run([sys.executable, "prepare.py"], cwd=data, env=env, check=True, stdout=subprocess.DEVNULL)
    with open(data / "meta.pkl", "rb") as f:
        vocab = int(pickle.load(f)["vocab_size"])
    return nano, vocab


class Run:
    """One timed process: wall and CPU seconds (user + system, all threads), and both at its first optimizer step;
    its minor page faults."""

    def __init__(self, cmd: list[str], cwd: Path, env: dict, first_step: Callable[["Run"], bool]):
        self.cmd, self.cwd, self.env, self.first_step = cmd, cwd, env, first_step
        self.lines: list[tuple[float, str]] = []
        self.wall = self.cpu = self.startup = self.startup_cpu = float("nan")
        self.minor_faults = 0

    def go(self) -> "Run":
        t0 = time.perf_counter()
        proc = subprocess.Popen(self.cmd, cwd=self.cwd, env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1)

        def read() -> None:
            for line in proc.stdout:
                self.lines.append((time.perf_counter() - t0, line.rstrip("\n")))

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        while True:  # poll for the first step (ours writes its step-1 row to metrics.csv) until the process exits
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if math.isnan(self.startup) and self.first_step(self):
                self.startup, self.startup_cpu = time.perf_counter() - t0, _cpu_seconds(proc.pid)
            time.sleep(0.005)
        self.wall = time.perf_counter() - t0
        self.cpu = usage.ru_utime + usage.ru_stime
        self.minor_faults = usage.ru_minflt  # pages the kernel had to map (and zero) for the process
        proc.returncode = os.waitstatus_to_exitcode(status)
        reader.join()
        if proc.returncode != 0:
            tail = "\n".join(line for _, line in self.lines[-15:])
            sys.exit(f"error: {' '.join(self.cmd[:3])} ... exited with {proc.returncode}:\n{tail}")
        return self


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a running process so far (Linux /proc; NaN elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def nanogpt_first_step(run: Run) -> bool:
    return any(line.startswith("iter 0:") for _, line in run.lines)


def nanogpt_eval_seconds(run: Run) -> float:
    """Seconds of nanoGPT's step-0 evaluation: from the line printed before it to its `step 0:` line."""
    for i, (t, line) in enumerate(run.lines):
        if line.startswith("step 0:") and i > 0:
            return t - run.lines[i - 1][0]
    return float("nan")


def ours_first_step(metrics: Path):
    def check(_run: Run) -> bool:
        try:
            return re.search(r"^1,", metrics.read_text(), re.M) is not None
        except OSError:
            return False

    return check


def load() -> str:
    return "load %.2f %.2f %.2f" % os.getloadavg()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("nanogpt", type=Path, help="a nanoGPT checkout (the folder holding train.py)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (each: 2 runs per side)")
    p.add_argument("--short", type=int, default=100, help="optimizer steps of the short runs")
    p.add_argument("--long", type=int, default=600, help="optimizer steps of the long runs")
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for both sides (default: torch's)")
    p.add_argument("--chars", type=int, default=TINY_SHAKESPEARE_CHARS, help="characters of text in input.txt")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (data, run outputs)")
    p.add_argument("--compare", type=Path, default=None,
                   help="another checkout of this repository (e.g. main) run as a third side in the same rounds, "
                        "with its own .venv if it has one: the effect of a change, measured interleaved")
    p.add_argument("ours_args", nargs="*", help="extra overrides for our side(s), e.g. guard=off")
    p.add_argument("--no-record", action="store_true", help=NO_RECORD_HELP)
    args = p.parse_args()
    if args.compare is not None:
        args.compare = args.compare.expanduser().resolve()
        if not (args.compare / "train" / "run.py").is_file():
            sys.exit(f"error: --compare {args.compare} has no train/run.py; pass a checkout of this repository.")
    if not args.long > args.short > 0:
        sys.exit("error: --long must be greater than --short, and both positive.")
    checkout = args.nanogpt.expanduser().resolve()
    if not checkout.is_dir():
        sys.exit(f"error: {checkout} does not exist; pass the path of a nanoGPT checkout.")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)

    print(machine_line(), flush=True)
    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(), flush=True)
    work = Path(tempfile.mkdtemp(prefix="peer-nanogpt-"))
    try:
        nano, vocab = prepare_nanogpt(checkout, work, args.chars)
        data = nano / "data" / "shakespeare_char"
        print(f"data: {args.chars:,} characters of the embedded corpus -> nanoGPT's prepare.py, vocab {vocab}; "
              f"model {DIMS['n_layer']}x{DIMS['n_embd']} ({DIMS['n_head']} heads), block {DIMS['block_size']}, "
              f"batch {DIMS['batch_size']}; {args.rounds} rounds of {args.short} + {args.long} steps per side; "
              f"threads per run: {args.threads or 'torch default'}", flush=True)

        def nano_run(steps: int, tag: str) -> Run:
            return Run([sys.executable, *nanogpt_args(steps, work / f"out-{tag}")], nano, env, nanogpt_first_step)

        def ours_run(steps: int, tag: str, root: Path = ROOT, python: str = sys.executable) -> Run:
            run_dir = work / f"{'ours' if root == ROOT else 'compared'}-{tag}"
            # the checkout's own packages first (an editable install may point at another checkout)
            run_env = dict(env, PYTHONPATH=os.pathsep.join([str(root), env.get("PYTHONPATH", "")]))
            return Run([python, *ours_args(steps, data, vocab, run_dir, root), *args.ours_args], root, run_env,
                       ours_first_step(run_dir / "metrics.csv"))

        def compared_run(steps: int, tag: str) -> Run:
            python = args.compare / ".venv" / "bin" / "python"
            return ours_run(steps, tag, args.compare, str(python) if python.exists() else sys.executable)

        # one untimed run per side: page cache, .pyc files, our first read of the token folder
        nano_run(5, "warm").go()
        ours_run(5, "warm").go()
        if args.compare:
            compared_run(5, "warm").go()
        sides = {"nanoGPT": nano_run, "ours": ours_run}
        if args.compare:
            sides["compared"] = compared_run
        names = list(sides)
        wall_ms: dict[str, list[float]] = {s: [] for s in names}
        cpu_ms: dict[str, list[float]] = {s: [] for s in names}
        faults: dict[str, list[float]] = {s: [] for s in names}
        start_s: dict[str, list[float]] = {s: [] for s in names}
        start_cpu: dict[str, list[float]] = {s: [] for s in names}
        nano_eval: list[float] = []
        span = args.long - args.short
        for r in range(args.rounds):
            order = names if r % 2 == 0 else names[::-1]
            runs: dict[tuple[str, int], Run] = {}
            for side, steps in [(s, args.short) for s in order] + [(s, args.long) for s in order[::-1]]:
                run = runs[side, steps] = sides[side](steps, f"{r}-{steps}").go()
                start_s[side].append(run.startup)
                start_cpu[side].append(run.startup_cpu)
                if side == "nanoGPT":
                    nano_eval.append(nanogpt_eval_seconds(run))
            for s in names:
                wall_ms[s].append(1000 * (runs[s, args.long].wall - runs[s, args.short].wall) / span)
                cpu_ms[s].append(1000 * (runs[s, args.long].cpu - runs[s, args.short].cpu) / span)
                faults[s].append((runs[s, args.long].minor_faults - runs[s, args.short].minor_faults) / span)
            parts = [f"{s} {wall_ms[s][-1]:6.2f} ms/step ({cpu_ms[s][-1]:6.2f} CPU)" for s in names]
            parts += [f"{s}/nanoGPT {wall_ms['nanoGPT'][-1] / wall_ms[s][-1]:.3f}x" for s in names[1:]]
            print(f"round {r + 1}: {', '.join(parts)}; {load()}", flush=True)

        med = statistics.median
        print(f"\nmedians of {args.rounds} rounds; speed = nanoGPT's time per step / ours (> 1: ours is faster)")
        for s in names:
            print(f"  {s:9s} per step {med(wall_ms[s]):7.2f} ms wall, {med(cpu_ms[s]):7.2f} ms CPU, "
                  f"{med(faults[s]):6.0f} minor page faults; start-up {med(start_s[s]):5.2f} s wall, "
                  f"{med(start_cpu[s]):5.2f} s CPU")
        def speed(label: str, base: list[float], side: list[float]) -> None:  # per-round ratios base / side
            x = [b / o for b, o in zip(base, side)]
            print(f"  speed {label}: median {med(x):.3f}x  min {min(x):.3f}x  max {max(x):.3f}x  "
                  f"(rounds: {', '.join(f'{v:.3f}' for v in x)})")

        for s in names[1:]:
            for label, per in (("wall", wall_ms), ("CPU ", cpu_ms)):
                speed(f"{s}/nanoGPT ({label})", per["nanoGPT"], per[s])
        if args.compare:  # the effect of the change, round by round (both ours, so no model difference)
            speed("ours/compared (wall)", wall_ms["compared"], wall_ms["ours"])
        nano_start = med(start_s["nanoGPT"])
        nano_noeval = med([t - e for t, e in zip(start_s["nanoGPT"], nano_eval)])
        print(f"  start-up = launch -> first optimizer step done; nanoGPT's includes its step-0 evaluation "
              f"({med(nano_eval):.2f} s; without it {nano_noeval:.2f} s)")
        for s in names[1:]:
            d = med(start_s[s]) - nano_start
            print(f"  start-up {s} - nanoGPT: {d:+.2f} s ({d + nano_start - nano_noeval:+.2f} s against nanoGPT "
                  f"without its evaluation)")
        print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    from common import recorded  # benchmarks/common.py: appends this run to benchmarks/RESULTS.md

    with recorded("peer_nanogpt"):
        rc = main()
    sys.exit(rc)
