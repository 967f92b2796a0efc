"""Sample text from an HF folder, a LoRA adapter folder (PEFT format, on the base its config names) or one of our
checkpoints.

    python train/cli/generate.py <hf-dir-or-adapter-dir-or-checkpoint-or-run-dir> --prompt "..." [--max-new-tokens N]
        [--temperature T --top-k K --top-p P --seed S --greedy --num-samples N]
"""

from __future__ import annotations

import sys
from typing import Optional

# torch is imported where it is used: a wrong path or option is refused before its ~1 s import
from data_pipelines.cli import ArgumentParser
from train.checkpoint.export import load_model_and_tokenizer
from train.cli import run_cli
from train.eval.samples import sample


def main(argv: Optional[list[str]] = None) -> int:
    p = ArgumentParser(description="Sample text from an HF folder or a gpt2-forge checkpoint.")
    p.add_argument("src", help="HF folder, LoRA adapter folder, checkpoints/step-N folder, or run dir")
    p.add_argument("--prompt", default="", help="text to continue (empty: start from <|endoftext|>)")
    p.add_argument("--max-new-tokens", type=int, default=50)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None,
                   help="keep the K most likely tokens; 0 = no top-k (default: the model's generation config, else 50 "
                        "as in transformers)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1] (default: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--greedy", action="store_true", help="argmax decoding instead of sampling")
    p.add_argument("--num-samples", type=int, default=1)
    args = p.parse_args(argv)

    def body() -> int:
        if args.max_new_tokens < 0:
            raise ValueError(f"--max-new-tokens={args.max_new_tokens} must be >= 0.")
        if args.temperature <= 0:
            raise ValueError(f"--temperature={args.temperature} must be positive (use --greedy for argmax).")
        if args.top_p is not None and not 0 < args.top_p <= 1:
            raise ValueError(f"--top-p={args.top_p} must be in (0, 1].")
        if args.top_k is not None and args.top_k < 0:
            raise ValueError(f"--top-k={args.top_k} must be >= 0 (0 = no top-k filtering).")
        if args.num_samples < 1:
            raise ValueError(f"--num-samples={args.num_samples} must be >= 1.")
        model, tok = load_model_and_tokenizer(args.src)
        for i in range(args.num_samples):
            text = sample(model, tok, args.prompt, args.max_new_tokens, greedy=args.greedy,
                          temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed + i)
            if args.num_samples > 1:
                print(f"--- sample {i + 1}")
            print(text)
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
