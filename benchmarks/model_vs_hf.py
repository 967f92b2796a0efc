"""Forward+backward time of gpt2.GPT2LMHeadModel vs transformers' (attn_implementation="sdpa"), same weights/batch.

    python benchmarks/model_vs_hf.py --n-layer 4 --n-embd 256 --n-head 4 --seq 256 --batch 8

Repeats are interleaved (ours, theirs, ours, ...) so drifting machine load hits both alike; the median is reported.
Prints one line per model and the speedup (theirs / ours; > 1 means ours is faster). Needs transformers (dev extra).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from common import NO_RECORD_HELP  # benchmarks/common.py (run as a script)


def step_time(model, ids) -> float:
    t0 = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=256)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=50257)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-record", action="store_true", help=NO_RECORD_HELP)
    args = p.parse_args(argv)

    import transformers

    import gpt2

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    # dropout off on both sides: the comparison is about compute, and RNG-driven masks would differ anyway
    cfg = gpt2.GPT2Config(vocab_size=args.vocab_size, n_positions=max(1024, args.seq), n_embd=args.n_embd,
                          n_layer=args.n_layer, n_head=args.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                          bos_token_id=0, eos_token_id=0, attn_implementation="sdpa")
    ours = gpt2.GPT2LMHeadModel(cfg).train()
    with tempfile.TemporaryDirectory() as d:
        ours.save_pretrained(d)
        theirs = transformers.GPT2LMHeadModel.from_pretrained(d, attn_implementation="sdpa", dtype=torch.float32)
        theirs.train()
    ids = torch.randint(0, args.vocab_size, (args.batch, args.seq))

    with torch.no_grad():  # same weights -> same loss (sanity check that the two really compute the same thing)
        lo, lt = ours(ids, labels=ids).loss.item(), theirs(input_ids=ids, labels=ids).loss.item()
    assert abs(lo - lt) < 1e-4, (lo, lt)

    for _ in range(args.warmup):
        step_time(ours, ids), step_time(theirs, ids)
    t_ours, t_theirs = [], []
    for r in range(args.repeats):
        pair = [(ours, t_ours), (theirs, t_theirs)]
        for model, sink in (pair if r % 2 == 0 else pair[::-1]):
            sink.append(step_time(model, ids))

    mo, mt = statistics.median(t_ours), statistics.median(t_theirs)
    tokens = args.batch * args.seq
    print(f"config: n_layer={args.n_layer} n_embd={args.n_embd} n_head={args.n_head} vocab={args.vocab_size} "
          f"batch={args.batch} seq={args.seq} threads={torch.get_num_threads()} repeats={args.repeats} (median)")
    print(f"gpt2-forge   fwd+bwd: {mo * 1e3:8.1f} ms  ({tokens / mo:,.0f} tok/s)")
    print(f"transformers fwd+bwd: {mt * 1e3:8.1f} ms  ({tokens / mt:,.0f} tok/s)  [sdpa, v{transformers.__version__}]")
    print(f"speedup (transformers / gpt2-forge): {mt / mo:.3f}x")


if __name__ == "__main__":
    from common import recorded  # benchmarks/common.py: appends this run to benchmarks/RESULTS.md

    with recorded("model_vs_hf"):
        main()
