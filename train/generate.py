"""Sample text from an HF folder or one of our checkpoints.

    python train/generate.py <hf-dir-or-checkpoint-or-run-dir> --prompt "..." [--max-new-tokens N]
        [--temperature T --top-k K --top-p P --seed S --greedy --num-samples N]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Optional

# torch is imported where it is used: a wrong path or option is refused before its ~1 s import


def load_model_and_tokenizer(src: str | os.PathLike):
    """An HF folder (config.json + weights + tokenizer files) or a checkpoint / run dir of ours."""
    p = Path(src).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist; give an HF folder, a checkpoints/step-N folder or a run dir.")
    if (p / "config.json").is_file() and not (p / "meta.json").is_file():
        if not ((p / "tokenizer.json").is_file() or (p / "vocab.json").is_file()):
            raise FileNotFoundError(f"{p} has no tokenizer files (tokenizer.json or vocab.json + merges.txt).")
        import torch

        from gpt2 import GPT2LMHeadModel, GPT2TokenizerFast

        return GPT2LMHeadModel.from_pretrained(str(p), dtype=torch.float32), GPT2TokenizerFast.from_pretrained(str(p))
    from train.export import load_for_export

    model, tok, step = load_for_export(p)  # checks the folder before it imports torch
    from gpt2 import GPT2LMHeadModel

    if not isinstance(model, GPT2LMHeadModel):
        raise ValueError(f"{step} holds a {type(model).__name__} (a fine-tuned task head), which does not generate "
                         f"text; sample from an LM run or checkpoint instead.")
    return model, tok


def sample(
    model: Any,
    tokenizer: Any,
    prompt: str,
    max_new_tokens: int = 50,
    greedy: bool = False,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    seed: int = 0,
) -> str:
    """prompt + generated continuation, as text. An empty prompt starts from <|endoftext|>.

    top_k / top_p None: generate's default (the model's generation_config.json, else transformers' top_k=50 and no
    top-p); top_k=0: no top-k filtering (transformers' and OpenAI's meaning). Greedy passes no sampling settings.
    """
    import torch

    model.eval()
    device = next(model.parameters()).device
    ids = tokenizer.encode(prompt) if prompt else []
    if not ids:
        ids = [model.config.eos_token_id if model.config.eos_token_id is not None else 0]
    room = model.config.n_positions - len(ids)
    if room <= 0:
        raise ValueError(
            f"the prompt is {len(ids)} tokens, the model's n_positions is {model.config.n_positions}; shorten it."
        )
    n_new = min(max_new_tokens, room)
    if n_new <= 0:  # generate() refuses max_new_tokens=0, as transformers does; the answer is the prompt
        return tokenizer.decode(ids, skip_special_tokens=False)
    knobs: dict[str, Any] = {"do_sample": False}
    if not greedy:
        knobs = {"do_sample": True, "temperature": temperature}
        knobs.update({k: v for k, v in (("top_k", top_k), ("top_p", top_p)) if v is not None})
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids], dtype=torch.long, device=device),
            max_new_tokens=n_new,
            eos_token_id=None,  # None = no eos stop (transformers' meaning): a demo keeps going to max_new_tokens
            generator=gen,
            **knobs,
        )
    return tokenizer.decode(out[0].tolist(), skip_special_tokens=False)


def write_samples(model: Any, tokenizer: Any, sample_cfg: Any, path: str | os.PathLike) -> Path:
    """samples.txt: a greedy and a sampled continuation of each configured prompt."""
    path = Path(path)
    was_training = model.training
    parts = []
    for i, prompt in enumerate(sample_cfg.prompts):
        greedy = sample(model, tokenizer, prompt, sample_cfg.max_new_tokens, greedy=True)
        sampled = sample(model, tokenizer, prompt, sample_cfg.max_new_tokens, temperature=sample_cfg.temperature,
                         top_k=sample_cfg.top_k, top_p=sample_cfg.top_p, seed=sample_cfg.seed + i)  # fmt: skip
        knobs = f"temperature={sample_cfg.temperature}, top_k={sample_cfg.top_k}, top_p={sample_cfg.top_p}"
        parts.append(f"=== prompt {prompt!r} | greedy\n{greedy}\n\n=== prompt {prompt!r} | sampled ({knobs})\n{sampled}\n")
    model.train(was_training)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text("\n".join(parts), encoding="utf-8")
    os.replace(tmp, path)
    return path


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description="Sample text from an HF folder or a gpt2-forge checkpoint.")
    p.add_argument("src", help="HF folder, checkpoints/step-N folder, or run dir")
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
    try:
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
                          temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed + i)  # fmt: skip
            if args.num_samples > 1:
                print(f"--- sample {i + 1}")
            print(text)
    except (ValueError, OSError, KeyError) as e:
        if os.environ.get("GPT2_FORGE_DEBUG") == "1" or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
