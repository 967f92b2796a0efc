"""Data pipeline benchmark: ours vs the common `datasets.map(GPT2TokenizerFast) + group_texts` recipe.

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

    python benchmarks/data_pipeline.py prepare [--mb 500] [--num-proc 2] [--gpt2-vocab gpt2.tiktoken] [--rss-mb 2000]

3. Preparation at OpenWebText scale: MB/s per process of `data_pipelines/prepare.py data=jsonl
   data.num_proc=N` vs nanoGPT's openwebtext/prepare.py recipe (`load_dataset` + `train_test_split` +
   `datasets.map` of tiktoken's `encode_ordinary` with `num_proc=N`, then one memmap) on the same locally generated
   JSON-lines corpus (documents assembled from the embedded CPython-documentation corpus) with the same vocabulary:
   OpenAI's GPT-2 (`--gpt2-vocab`: the `gpt2.tiktoken` file `pip download openai-whisper --no-deps` ships in
   whisper/assets/; found by itself when the `whisper` package is installed), else a 50257-token BPE trained on
   the corpus. Each side runs in its own process (so peak RSS is its own): ours with N and 1 processes, nanoGPT's
   with N. Prints MB/s, the ratios (targets: ours/nanoGPT >= 1.5x at the same N, ours N=2 / N=1 >= 1.7x), peak RSS
   and the load average. `--rss-mb 2000` also prepares a corpus of that size to show that peak RSS does not grow
   with the corpus (target < 1.5 GB per process).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import NO_RECORD_HELP  # benchmarks/common.py (run as a script)


def main() -> None:
    if sys.argv[1:2] == ["prepare"]:
        return prepare_main(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=50.0, help="corpus size in MB (--text repeated)")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--batch", type=int, default=12)
    ap.add_argument("--text", default=None, help="source text file to repeat (default: the embedded corpus)")
    ap.add_argument("--no-record", action="store_true", help=NO_RECORD_HELP)
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
                         block_size=args.block, batch_size=args.batch, val_fraction=0.0)
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
                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
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


# ------------------------------------------------------------------------------------ 3. preparation
def find_gpt2_tiktoken(path: str | None) -> Path | None:
    """OpenAI's GPT-2 ranks: `path`, else whisper/assets/gpt2.tiktoken of an installed `openai-whisper`."""
    if path:
        return Path(path)
    import importlib.util

    spec = importlib.util.find_spec("whisper")  # located, not imported (whisper imports torch and numba)
    if spec and spec.submodule_search_locations:
        cand = Path(list(spec.submodule_search_locations)[0]) / "assets" / "gpt2.tiktoken"
        return cand if cand.is_file() else None
    return None


def gpt2_tokenizer_from_tiktoken(ranks_file: Path, out: Path) -> None:
    """Write vocab.json + merges.txt of OpenAI's GPT-2 from tiktoken's ranks file (a few lines, no library does it:
    tiktoken only goes the other way, and transformers' TikTokenConverter emits every split of a token as a merge).

    GPT-2's merge for a token is the last step of its own BPE with only lower ranks allowed (tiktoken's
    `data_gym_to_mergeable_bpe_ranks` builds the ranks from the merges in exactly that order).
    """
    from tiktoken.load import load_tiktoken_bpe

    from data_pipelines.fast_bpe import bytes_to_unicode

    ranks = load_tiktoken_bpe(str(ranks_file))
    tab = bytes_to_unicode()
    name = lambda b: "".join(tab[c] for c in b)  # noqa: E731

    def last_merge(token: bytes) -> tuple[bytes, bytes]:
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:
            best = min((ranks.get(parts[i] + parts[i + 1], 1 << 62), i) for i in range(len(parts) - 1))
            if best[0] >= ranks[token]:
                break
            i = best[1]
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        assert len(parts) == 2, f"{token!r} is not reachable with lower ranks"
        return parts[0], parts[1]

    merges = [last_merge(t) for t, _ in sorted(ranks.items(), key=lambda kv: kv[1]) if len(t) > 1]
    out.mkdir(parents=True, exist_ok=True)
    vocab = {name(t): r for t, r in ranks.items()} | {"<|endoftext|>": len(ranks)}
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{name(a)} {name(b)}\n" for a, b in merges))


def write_corpus(out: Path, mb: float, files: int, seed: int = 0) -> float:
    """OpenWebText-like JSON lines: documents of 1-12 paragraphs drawn from the embedded corpus; returns MB written."""
    import random

    from data_pipelines.corpus import build_corpus

    paras = [p for d in build_corpus() for p in d.split("\n\n") if len(p) > 40]
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    target = int(mb * 1e6 / files)
    total = 0
    for k in range(files):
        with open(out / f"part-{k:03d}.jsonl", "w", encoding="utf-8") as f:
            size = 0
            while size < target:
                doc = "\n\n".join(rng.choice(paras) for _ in range(rng.randint(1, 12)))
                line = json.dumps({"text": doc}, ensure_ascii=False) + "\n"
                f.write(line)
                size += len(line.encode())
            total += size
    return total / 1e6


def _side(side: str, corpus: str, tok_dir: str, work: str, num_proc: str) -> dict:
    """Run one side once in this (fresh) process; returns seconds, tokens and peak RSS of this process + children."""
    import time

    from data_pipelines.shards import peak_rss_mb

    n = int(num_proc)
    t0 = time.perf_counter()
    if side == "ours":
        from data_pipelines import DataConfig
        from data_pipelines.cache import read_token_dir
        from data_pipelines.prepare import prepare

        cfg = DataConfig(source="jsonl", path=corpus, tokenizer=tok_dir, cache_dir=work, num_proc=n,
                         val_fraction=0.0005)
        data = read_token_dir(cfg, prepare(cfg))
        tokens = data.train.num_tokens + data.val.num_tokens
        engine = json.loads((data.root / "index.json").read_text())["encoder"]
    else:  # nanoGPT data/openwebtext/prepare.py, with local files instead of load_dataset("openwebtext")
        import datasets
        import numpy as np
        import tiktoken

        from data_pipelines.fast_bpe import GPT2_PATTERN
        from gpt2.tokenizer import GPT2TokenizerFast
        from data_pipelines.fast_bpe import to_tiktoken

        datasets.disable_progress_bars()
        # tiktoken.get_encoding("gpt2") is this Encoding (the same ranks, pattern and special token); it downloads
        # its file, which a machine without internet cannot, so the ranks come from our tokenizer (equal to
        # OpenAI's file when --gpt2-vocab was used: checked in prepare_main)
        ours = to_tiktoken(GPT2TokenizerFast.from_pretrained(tok_dir).backend_tokenizer)
        enc = tiktoken.Encoding("gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ours._mergeable_ranks,
                                special_tokens={"<|endoftext|>": ours.eot_token})
        files = sorted(str(p) for p in Path(corpus).glob("*.jsonl"))
        dataset = datasets.load_dataset("json", data_files=files, num_proc=n, cache_dir=work)
        split_dataset = dataset["train"].train_test_split(test_size=0.0005, seed=2357, shuffle=True)
        split_dataset["val"] = split_dataset.pop("test")

        def process(example):
            ids = enc.encode_ordinary(example["text"])
            ids.append(enc.eot_token)
            return {"ids": ids, "len": len(ids)}

        tokenized = split_dataset.map(process, remove_columns=["text"], num_proc=n)
        tokens = 0
        for split, dset in tokenized.items():
            arr_len = np.sum(dset["len"], dtype=np.uint64)
            arr = np.memmap(Path(work) / f"{split}.bin", dtype=np.uint16, mode="w+", shape=(arr_len,))
            idx = 0
            total_batches = min(1024, len(dset))  # nanoGPT's 1024, capped for a small val split
            for batch_idx in range(total_batches):
                batch = dset.shard(num_shards=total_batches, index=batch_idx, contiguous=True).with_format("numpy")
                arr_batch = np.concatenate(batch["ids"])
                arr[idx : idx + len(arr_batch)] = arr_batch
                idx += len(arr_batch)
            arr.flush()
            tokens += int(arr_len)
        engine = f"tiktoken {tiktoken.__version__}"
    return {"seconds": time.perf_counter() - t0, "tokens": tokens, "engine": engine, **peak_rss_mb()}


def _run_side(side: str, corpus: Path, tok_dir: Path, work: Path, n: int) -> dict:
    load = os.getloadavg()[0]
    r = subprocess.run([sys.executable, __file__, "_side", side, str(corpus), str(tok_dir), str(work), str(n)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{side} (num_proc={n}) failed:\n{r.stderr[-3000:]}")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out["load"] = (load + os.getloadavg()[0]) / 2
    return out


def prepare_main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="benchmarks/data_pipeline.py prepare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=500.0, help="corpus size in MB (>= 500 for a stable rate)")
    ap.add_argument("--files", type=int, default=8, help="JSON-lines files the corpus is split into")
    ap.add_argument("--num-proc", type=int, default=2)
    ap.add_argument("--gpt2-vocab", default=None, help="OpenAI's gpt2.tiktoken (default: whisper's, if installed)")
    ap.add_argument("--rss-mb", type=float, default=0.0, help="also prepare a corpus of this size, for peak RSS")
    ap.add_argument("--skip-baseline", action="store_true", help="only our side (e.g. for the RSS run)")
    ap.add_argument("--workdir", default=None, help="where the corpora and outputs go (default: a temp dir)")
    ap.add_argument("--no-record", action="store_true", help=NO_RECORD_HELP)
    args = ap.parse_args(argv)

    import tempfile

    from gpt2.tokenizer import GPT2TokenizerFast, train_tokenizer

    print(f"cpus: {os.cpu_count()}, load average at start: {os.getloadavg()[0]:.1f} (other processes distort "
          f"MB/s and scaling; quote this line with the figures)")
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        mb = write_corpus(tmp / "corpus", args.mb, args.files)
        vocab_file = find_gpt2_tiktoken(args.gpt2_vocab)
        if vocab_file is not None:
            gpt2_tokenizer_from_tiktoken(vocab_file, tmp / "tok")
            tok = GPT2TokenizerFast.from_pretrained(str(tmp / "tok"))
            from tiktoken.load import load_tiktoken_bpe

            from data_pipelines.fast_bpe import to_tiktoken

            same = to_tiktoken(tok.backend_tokenizer)._mergeable_ranks == load_tiktoken_bpe(str(vocab_file))
            assert same, "our converter does not reproduce OpenAI's ranks"
            vocab = f"OpenAI GPT-2 ({vocab_file}; our tokenizer -> tiktoken gives OpenAI's ranks: {same})"
        else:
            texts = (json.loads(line)["text"] for line in open(tmp / "corpus" / "part-000.jsonl", encoding="utf-8"))
            tok = train_tokenizer(itertools.islice(texts, 3000), vocab_size=50257)
            tok.save_pretrained(str(tmp / "tok"))
            vocab = "a 50257-token BPE trained on the corpus (no gpt2.tiktoken found: see --gpt2-vocab)"
        print(f"corpus: {mb:.0f} MB in {args.files} JSON-lines files; vocabulary: {vocab}")

        n = args.num_proc
        runs = {}
        order = [("ours", n), ("nanogpt", n), ("ours", 1)] if not args.skip_baseline else [("ours", n), ("ours", 1)]
        for side, k in order:
            r = runs[(side, k)] = _run_side(side, tmp / "corpus", tmp / "tok", tmp / f"{side}-{k}", k)
            print(f"{side:8s} num_proc={k}: {r['seconds']:7.1f} s  {mb / r['seconds']:6.2f} MB/s  "
                  f"{mb / r['seconds'] / k:6.2f} MB/s per process  {r['tokens']:,} tokens  ({r['engine']})  "
                  f"peak RSS {r['peak_rss_mb']:.0f} MB, largest child {r['peak_worker_rss_mb']:.0f} MB  "
                  f"load {r['load']:.1f}", flush=True)
            shutil.rmtree(tmp / f"{side}-{k}", ignore_errors=True)
        ours_n, ours_1 = runs[("ours", n)], runs[("ours", 1)]
        if ("nanogpt", n) in runs:
            base = runs[("nanogpt", n)]
            assert base["tokens"] == ours_n["tokens"], "the two recipes wrote different token counts"
            print(f"ours / nanoGPT at num_proc={n}: {base['seconds'] / ours_n['seconds']:.2f}x  (target >= 1.5x)")
        print(f"scaling 1 -> {n} processes: {ours_1['seconds'] / ours_n['seconds']:.2f}x  (target >= 1.7x for 2)")
        shutil.rmtree(tmp / "corpus")
        if args.rss_mb:
            big = write_corpus(tmp / "big", args.rss_mb, max(args.files, int(args.rss_mb // 250)), seed=1)
            r = _run_side("ours", tmp / "big", tmp / "tok", tmp / "ours-big", n)
            print(f"ours     num_proc={n} on {big:.0f} MB: {r['seconds']:7.1f} s  {big / r['seconds']:6.2f} MB/s  "
                  f"peak RSS {r['peak_rss_mb']:.0f} MB, largest worker {r['peak_worker_rss_mb']:.0f} MB "
                  f"(target < 1500 MB per process; {mb:.0f} MB corpus: {ours_n['peak_rss_mb']:.0f} / "
                  f"{ours_n['peak_worker_rss_mb']:.0f} MB)  load {r['load']:.1f}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["_side"]:  # one side of the preparation benchmark, in a fresh process: not a result alone
        print(json.dumps(_side(*sys.argv[2:])))
        sys.exit(0)
    from common import recorded  # benchmarks/common.py: appends this run to benchmarks/RESULTS.md

    with recorded("data_pipeline"):
        main()
