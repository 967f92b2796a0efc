"""Samples of an LM: `sample` (prompt -> text, as `python train/cli/generate.py` prints it) and `write_samples`
(run_dir/samples.txt at the end of an LM run: a greedy and a sampled continuation of each configured prompt)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

# torch is imported where it is used: a wrong option is refused before its ~1 s import


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
                         top_k=sample_cfg.top_k, top_p=sample_cfg.top_p, seed=sample_cfg.seed + i)
        knobs = f"temperature={sample_cfg.temperature}, top_k={sample_cfg.top_k}, top_p={sample_cfg.top_p}"
        parts.append(f"=== prompt {prompt!r} | greedy\n{greedy}\n\n=== prompt {prompt!r} | sampled ({knobs})\n{sampled}\n")
    model.train(was_training)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text("\n".join(parts), encoding="utf-8")
    os.replace(tmp, path)
    return path


__all__ = ["sample", "write_samples"]
