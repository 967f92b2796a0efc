"""Generation benchmark: new tokens/s of gpt2.GPT2LMHeadModel.generate (KV cache) vs
transformers' `generate`, the same weights, greedy, batch 1 and a left-padded batch 8.

    python benchmarks/generation.py            # both configs, batch 1 and 8, 96 new tokens    (~1.5 min, 2 cores)
    python benchmarks/generation.py --quick    # one config, 32 new tokens                      (~15 s)

Configs: "small" (6 layers x 384, 6 heads) and "gpt2-4L" (GPT-2 124M widths — 768, 12 heads, vocab 50257 — with 4
layers instead of 12). Our model is saved with save_pretrained and loaded by transformers.GPT2LMHeadModel
.from_pretrained (sdpa on both sides), so both run the same weights; the outputs are checked to be equal token for
token before anything is timed. Prompts are ~32 random token ids (batch 8: lengths 17..32, left-padded, as a
tokenizer with padding_side="left" gives them). eos is GPT-2's 50256 on both sides, so both check for it every step.
Each (config, batch) is timed `--repeats` times, interleaved ours/theirs with alternating order; medians reported.
On CPU at batch <= 3 our decode loop runs on (in, out) copies of the weights that each generate() call builds and
frees (gpt2/generation.py); the timings include building them.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from common import NO_RECORD_HELP, interleaved, machine_line, median, spread  # benchmarks/common.py (run as a script)

CONFIGS = {
    "small": dict(n_layer=6, n_embd=384, n_head=6),
    "gpt2-4L": dict(n_layer=4, n_embd=768, n_head=12),
}


def prompts(batch: int, length: int, vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), left-padded with 50256 when batch > 1 (row i is shorter by 2*i tokens)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab - 1, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    if batch > 1:
        for i in range(batch):
            mask[i, : (2 * i) % (length // 2 + 1)] = 0
    return ids.masked_fill(mask == 0, 50256), mask


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--new-tokens", type=int, default=96)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--quick", action="store_true", help="small config, 32 new tokens, 3 repeats")
    p.add_argument("--no-record", action="store_true", help=NO_RECORD_HELP)
    args = p.parse_args(argv)
    if args.quick:
        args.configs, args.new_tokens, args.repeats = ["small"], 32, 3
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers

    import gpt2

    print(machine_line())
    print(f"greedy, {args.new_tokens} new tokens, prompt {args.prompt_len} tokens, {args.repeats} interleaved repeats "
          f"(median), sdpa on both sides")
    rows = []
    for name in args.configs:
        torch.manual_seed(0)
        cfg = gpt2.GPT2Config(**CONFIGS[name], attn_implementation="sdpa")
        ours = gpt2.GPT2LMHeadModel(cfg).eval()
        with tempfile.TemporaryDirectory() as d:
            ours.save_pretrained(d)
            theirs = transformers.GPT2LMHeadModel.from_pretrained(d, attn_implementation="sdpa",
                                                                  dtype=torch.float32).eval()
        for batch in args.batches:
            ids, mask = prompts(batch, args.prompt_len, cfg.vocab_size)
            kw = dict(attention_mask=mask, max_new_tokens=args.new_tokens, eos_token_id=50256, pad_token_id=50256)

            def run_ours():
                return ours.generate(ids, **kw)

            def run_theirs():
                with torch.inference_mode():
                    return theirs.generate(ids, do_sample=False, **kw)

            a = run_ours()
            b = run_theirs()
            if not torch.equal(a, b):
                raise SystemExit(f"{name} batch {batch}: our greedy tokens differ from transformers' — not comparable")
            new = batch * (a.shape[1] - ids.shape[1])  # tokens generated (equal on both sides, checked above)
            t = interleaved({"ours": run_ours, "theirs": run_theirs}, repeats=args.repeats, warmup=0)
            to, tt = median(t["ours"]), median(t["theirs"])
            rows.append((name, batch, new / to, new / tt, tt / to))
            print(f"{name:8s} batch {batch}: gpt2-forge {new / to:8.1f} tok/s {spread(t['ours'])} s "
                  f"| transformers {new / tt:8.1f} tok/s {spread(t['theirs'])} s | "
                  f"ratio {tt / to:.2f}x", flush=True)

    print()
    print("| config | batch | gpt2-forge tok/s | transformers tok/s | ratio |")
    print("|---|---:|---:|---:|---:|")
    for name, batch, o, t, r in rows:
        print(f"| {name} ({CONFIGS[name]['n_layer']}x{CONFIGS[name]['n_embd']}) | {batch} | {o:.1f} | {t:.1f} | "
              f"{r:.2f}x |")


if __name__ == "__main__":
    from common import recorded  # benchmarks/common.py: appends this run to benchmarks/RESULTS.md

    with recorded("generation"):
        main()
