"""Score a model on lm-evaluation-harness tasks with our own GPT2LMHeadModel.

    python train/cli/evaluate.py <hf-dir | adapter-dir | checkpoints/step-N | run-dir>
        --tasks hellaswag,lambada_openai,wikitext
        [--include-path DIR] [--num-fewshot K] [--limit N] [--batch-size B] [--device cpu|cuda] [--out FILE]

lm_eval does the benchmark (task registry, prompts, few-shot examples, metrics, aggregation: `simple_evaluate`);
train/eval/harness.py answers its requests with our model (train/eval/evaluate.py). The results table is lm_eval's
(`make_table`), the JSON is lm_eval's results dict, written to <run-dir>/eval/<timestamp>.json (a checkpoint or the
hf/ export of a run: that run's eval/; a standalone HF folder: its own eval/ subfolder) or to --out.

One GPU, or all GPUs of a node as lm_eval's data-parallel mode: `torchrun --nproc-per-node=8 train/cli/evaluate.py
...` (or `accelerate launch`) — each process scores its share of the requests and rank 0 prints and writes the results.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from data_pipelines.cli import ArgumentParser
from train.checkpoint.export import EVAL_DIR
from train.cli import run_cli
from train.eval.evaluate import DEFAULT_BOOTSTRAP_ITERS, evaluate, load_harness, write_json


def default_output(resolved: Path, run_dir: Optional[Path], now: Optional[float] = None) -> Path:
    """<run-dir>/eval/<timestamp>.json, or <hf-dir>/eval/<timestamp>.json for a model outside a run."""
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S", time.localtime(now))
    return (run_dir if run_dir is not None else resolved) / EVAL_DIR / f"{stamp}.json"


def _init_distributed() -> tuple[bool, Optional[str]]:
    """Under torchrun / accelerate launch (WORLD_SIZE > 1): join the process group; (distributed, device)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False, None
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        torch.distributed.init_process_group("nccl")
        return True, f"cuda:{local_rank}"
    torch.distributed.init_process_group("gloo")
    return True, "cpu"


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not >= 1")
    return value


def _limit(text: str) -> float | int:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not > 0")
    return int(value) if value >= 1 else value


def main(argv: Optional[list[str]] = None) -> int:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="HF folder, LoRA adapter folder (on the base its adapter_config.json names), "
                                "checkpoints/step-N folder, or run dir (its newest checkpoint, else hf/)")
    p.add_argument("--tasks", required=True, help="comma-separated lm_eval task / group / tag names")
    p.add_argument("--include-path", default=None, help="folder(s) of extra task YAMLs, comma-separated")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: the task's own)")
    p.add_argument("--limit", type=_limit, default=None, help="documents per task (< 1: a fraction)")
    p.add_argument("--batch-size", type=_positive_int, default=8)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when available)")
    p.add_argument("--out", default=None, help="results JSON (default <run-dir>/eval/<timestamp>.json)")
    p.add_argument("--bootstrap-iters", type=int, default=DEFAULT_BOOTSTRAP_ITERS, help="0 skips the stderrs")
    p.add_argument("--log-samples", action="store_true", help="keep every scored document in the JSON")
    p.add_argument("--seed", type=int, default=None, help="one seed for all of lm_eval's (default: its 0 / 1234)")
    args = p.parse_args(argv)

    def body() -> int:
        if args.num_fewshot is not None and args.num_fewshot < 0:
            raise ValueError(f"--num-fewshot={args.num_fewshot} must be >= 0.")
        if args.device is not None and not (args.device == "cpu" or args.device.split(":")[0] == "cuda"):
            raise ValueError(f"--device={args.device!r} is not cpu, cuda or cuda:N.")
        if args.device is not None and args.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device={args.device} but this machine has no CUDA device; use --device cpu.")
        harness = load_harness()
        distributed, dp_device = _init_distributed()
        model, tok, resolved, run_dir = harness.load_model(args.src, dp_device or args.device or
                                                           ("cuda" if torch.cuda.is_available() else "cpu"))
        t0 = time.time()
        results = evaluate(
            model, tok, args.tasks, limit=args.limit, num_fewshot=args.num_fewshot, batch_size=args.batch_size,
            include_path=args.include_path, bootstrap_iters=args.bootstrap_iters, log_samples=args.log_samples,
            distributed=distributed, show_progress=True, seed=args.seed,
        )
        if distributed:
            # lm_eval's evaluator returns on the other ranks right after its last gather; a rank that tears its gloo
            # group down while rank 0 is still in that gather aborts it: every rank leaves the collectives together
            torch.distributed.barrier()
        if results is None:  # another rank: rank 0 reports
            return 0
        results["config"]["model_source"] = str(resolved)
        from lm_eval.utils import make_table

        out = Path(args.out).expanduser() if args.out else default_output(resolved, run_dir, t0)
        write_json(results, out)
        print(f"{harness.MODEL_NAME} ({resolved}), limit: {args.limit}, num_fewshot: {args.num_fewshot}, "
              f"batch_size: {args.batch_size}, device: {results['config']['device']}, "
              f"{time.time() - t0:.1f} s")
        print(make_table(results))
        if results.get("groups"):
            print(make_table(results, "groups"))
        print(f"results: {out}")
        return 0

    try:
        return run_cli(body)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
