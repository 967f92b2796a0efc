"""Export a checkpoint (or a run's newest one) as a Hugging Face GPT-2 folder.

    python train/cli/export.py <checkpoint-or-run-dir> <out-dir> [--force]

The folder holds config.json, model.safetensors (HF key names and Conv1D layout), the tokenizer files and
generation_config.json, and loads as it is in transformers' Auto* classes and pipelines (train/checkpoint/export.py).
It is written into a temporary folder next to <out-dir> and renamed into place: an interrupted export leaves no half
folder.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from train.checkpoint.export import check_export_dir, export_hf, load_for_export
from train.checkpoint.layout import read_meta
from train.cli import run_cli


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="a checkpoints/step-N folder, or a run dir (its newest complete checkpoint)")
    p.add_argument("out", help="the HF folder to write")
    p.add_argument("--force", action="store_true", help="replace a non-empty out folder that is not an export")
    args = p.parse_args(argv)

    def body() -> int:
        check_export_dir(args.out, overwrite=args.force)  # before the checkpoint is loaded
        model, tok, step = load_for_export(args.src)
        data_task = read_meta(step).get("data_task")  # a fine-tuning run's: its input layout rides on the tokenizer
        if data_task:
            from data_pipelines.tasks import task_data

            tok = task_data(data_task).hf_tokenizer(tok)
        out = export_hf(model, tok, args.out, overwrite=args.force)
        print(f"exported {step} -> {out}")
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
