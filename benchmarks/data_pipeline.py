"""Data pipeline benchmark (issue 6, item 2): ours vs the common `datasets.map(GPT2TokenizerFast) + group_texts` recipe.

    python benchmarks/data_pipeline.py [--mb 50] [--vocab 4096] [--block 64] [--batch 12]

1. Tokenize + pack MB/s on a text repeated to >= --mb MB (the embedded default corpus, or --text FILE), same
   tokenizer for both:
   - ours: `prepare(DataConfig(source="text", path=..., tokenizer=...))` (batched parallel `encode_batch_fast`,
     flat uint16 stream written to disk; blocks are cut at read time);
   - baseline: HF `run_clm.py`'s recipe: `load_dataset("text")`, `.map(tokenizer(examples["text"]), batched=True)`
     with `transformers.GPT2TokenizerFast`, then `.map(group_texts, batched=True)` into `--block` tokens.
2. Dataloader delivery vs consumption at the tiny config (nanoGPT's CPU shakespeare-char dims: 4 layers, 4 heads,
   128 wide, block 64, batch 12): batches/s out of `LMDataModule.train_dataloader()` vs training steps/s
   (forward + backward + AdamW) of `gpt2.GPT2LMHeadModel` on the same batches.
Prints each figure and the ratio (targets: >= 2x and >= 20x).
"""

from __future__ import annotations

import argparse
import itertools
import os
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=50.0, help="corpus size in MB (--text repeated)")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--batch", type=int, default=12)
    ap.add_argument("--text", default=None, help="source text file to repeat (default: the embedded corpus)")
    args = ap.parse_args()

    import datasets
    import torch

    from data_pipelines import DataConfig, LMDataModule
    from data_pipelines.prepare import prepare
    from gpt2.tokenizer import train_tokenizer

    datasets.disable_progress_bars()
    print(f"torch threads: {torch.get_num_threads()}, cpus: {os.cpu_count()}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.text:
            text = Path(args.text).read_text(encoding="utf-8")
        else:
            from data_pipelines.corpus import build_corpus

            text = "\n\n".join(build_corpus())
        reps = max(1, int(-(-args.mb * 1e6 // len(text.encode()))))
        corpus = tmp / "corpus.txt"
        with open(corpus, "w", encoding="utf-8") as f:
            for _ in range(reps):
                f.write(text)
        mb = corpus.stat().st_size / 1e6
        tok = train_tokenizer(iter([text]), vocab_size=args.vocab)
        tok.save_pretrained(str(tmp / "tok"))
        name = Path(args.text).name if args.text else "the embedded corpus"
        print(f"corpus: {mb:.1f} MB ({reps} x {name}), vocab {len(tok)}")

        # ---- ours
        t0 = time.perf_counter()
        cfg = DataConfig(source="text", path=str(corpus), tokenizer=str(tmp / "tok"), cache_dir=str(tmp / "c"),
                         block_size=args.block, batch_size=args.batch, val_fraction=0.0)  # fmt: skip
        root = prepare(cfg)
        ours_s = time.perf_counter() - t0
        n_ours = (root / "train.bin").stat().st_size // 2
        print(f"ours:     {ours_s:7.2f} s  {mb / ours_s:7.2f} MB/s  ({n_ours:,} tokens)")

        # ---- baseline: transformers run_clm.py recipe
        from transformers import GPT2TokenizerFast as HFTok

        t0 = time.perf_counter()
        hf_tok = HFTok.from_pretrained(str(tmp / "tok"))
        raw = datasets.load_dataset("text", data_files=str(corpus), split="train", cache_dir=str(tmp / "hf"))
        tokenized = raw.map(lambda ex: hf_tok(ex["text"]), batched=True, remove_columns=["text"])
        block = args.block

        def group_texts(examples):
            concatenated = {k: list(itertools.chain(*examples[k])) for k in examples}
            total = (len(concatenated["input_ids"]) // block) * block
            result = {k: [t[i : i + block] for i in range(0, total, block)] for k, t in concatenated.items()}
            result["labels"] = result["input_ids"].copy()
            return result

        grouped = tokenized.map(group_texts, batched=True)
        base_s = time.perf_counter() - t0
        print(f"baseline: {base_s:7.2f} s  {mb / base_s:7.2f} MB/s  ({len(grouped) * block:,} tokens in blocks)")
        print(f"tokenize+pack speed-up: {base_s / ours_s:.2f}x  (target >= 2x)")

        # ---- dataloader delivery vs training consumption (tiny config)
        dm = LMDataModule(cfg)
        dm.prepare_data()
        dm.setup()
        it = iter(dm.train_dataloader())
        next(it)
        n = 3000
        t0 = time.perf_counter()
        for _ in range(n):
            batch = next(it)
        load_bps = n / (time.perf_counter() - t0)

        from gpt2 import GPT2Config, GPT2LMHeadModel

        mcfg = GPT2Config(vocab_size=len(tok), n_positions=max(256, block), n_layer=4, n_head=4, n_embd=128,
                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
        model = GPT2LMHeadModel(mcfg)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        steps = 30
        for i in range(steps + 3):  # 3 warm-up steps
            if i == 3:
                t0 = time.perf_counter()
            batch = next(it)
            loss = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        train_bps = steps / (time.perf_counter() - t0)
        tok_per_batch = args.batch * block
        print(f"dataloader: {load_bps:9.0f} batches/s ({load_bps * tok_per_batch:,.0f} tokens/s)")
        print(f"training:   {train_bps:9.1f} steps/s   ({train_bps * tok_per_batch:,.0f} tokens/s)")
        print(f"delivery / consumption: {load_bps / train_bps:.0f}x  (target >= 20x)")


if __name__ == "__main__":
    main()
