"""Plain helpers shared by test modules (fixtures live in conftest.py). Import as `from helpers import ...`:
pytest puts tests/ on sys.path (rootdir-relative "prepend" import mode)."""

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def compose_config(overrides):
    """conf/config.yaml composed with `overrides` (Hydra's syntax, as on the command line) -> the validated
    `train.config.Config`, exactly what train/run.py hands to `train()`. Raises ConfigError / Hydra's errors as the
    command line would."""
    from hydra import compose, initialize_config_dir

    from train.config import register_configs, to_config

    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return to_config(compose(config_name="config", overrides=list(overrides)))


def corpus_text(n_chars: int) -> str:
    """The first `n_chars` characters of the embedded default corpus (data_pipelines.corpus: CPython's documentation
    topics and standard-library docstrings, prose only), its documents joined by blank lines.

    Varied English made at run time from the Python running the tests, so no test reads a file outside the
    repository; built once per process (~2 s). Raises ValueError when the corpus is shorter than `n_chars`.
    """
    from data_pipelines.corpus import build_corpus

    text = "\n\n".join(build_corpus())
    if len(text) < n_chars:
        raise ValueError(f"the embedded corpus has {len(text)} characters, fewer than the {n_chars} asked")
    return text[:n_chars]


@torch.no_grad()
def randomize(model, seed=0):
    """Weights large enough that attention is not uniform and every parameter matters (init std 0.02 is too flat).

    Returns the model in eval mode; a test that needs dropout calls .train() itself.
    """
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g) * 0.15
        p.copy_(1.0 + noise if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")) else noise * 2)
    return model.eval()


def sigkill_when(proc: subprocess.Popen, ready: Callable[[], bool], log: Path, what: str, timeout: float = 240) -> None:
    """Poll `ready()` while `proc` (logging to `log`) runs, then SIGKILL it and reap it. Fails with the log's tail if
    the process exits first, or when `what` has not happened within `timeout` seconds; never leaves it running."""
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, f"{what} did not happen within {timeout:.0f} s"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def tiny_base(d: Path, n_positions: int = 64) -> Path:
    """An untrained tiny GPT-2 LM with a 512-token BPE, as an HF folder: a base for runs whose test does not need a
    trained one (made in a second)."""
    from data_pipelines.corpus import build_corpus
    from gpt2 import GPT2Config, GPT2LMHeadModel
    from gpt2.tokenizer import train_tokenizer

    tok = train_tokenizer(build_corpus()[:200], vocab_size=512)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=n_positions, n_embd=32, n_layer=2, n_head=2,
                               bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)).save_pretrained(str(d))
    tok.save_pretrained(str(d))
    return d
