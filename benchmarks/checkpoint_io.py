"""Checkpoint benchmark: save / load GB/s of gpt2-medium-sized weights (355M params, fp32, 1.42 GB).

    python benchmarks/checkpoint_io.py            # gpt2-medium dims, 3 interleaved repeats    (~1.5 min, 2 cores)
    python benchmarks/checkpoint_io.py --quick    # 6 of the 24 layers (~0.6 GB), 2 repeats    (~25 s)

Rows, each timed in the same process on the same weights, repeats interleaved with alternating order, median:
  save  ours      `model.save_pretrained(dir)`: HF key names, Conv1D transposes, safetensors
  save  baseline  `torch.save(model.state_dict(), path)` (pickle)
                  (the call's latency, as a user sees it; --fsync adds an fsync so the bytes are on disk — then
                  both sides are bound by the disk, not by the code)
  load  ours      `GPT2LMHeadModel.from_pretrained(dir)` end to end: config, safetensors read, key map, transposes,
                  a meta-device model with the tensors assigned
  load  raw       `safetensors.torch.load_file` alone (mmap'd: pages are read when first touched, so this is the
                  cost of opening the file, not of reading it)
  load  baseline  `torch.load(path, weights_only=True)` (read into memory, not mmap'd)
Loads run with the page cache warm (every file is read once before timing). GB/s = bytes of the weight file / s.
Weights come from a meta-device build + `to_empty` + a cheap fill (no 355M-parameter normal_ init).
Keeps at most ~2 copies of the weights alive (peak RSS printed; < 6 GB at gpt2-medium).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile

import torch
from common import NO_RECORD_HELP, interleaved, machine_line, median, spread  # benchmarks/common.py (run as a script)


def fsync_tree(path: str) -> None:
    files = [os.path.join(path, n) for n in os.listdir(path)] if os.path.isdir(path) else [path]
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def weight_bytes(path: str) -> int:
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path) if n.endswith(".safetensors"))
    return os.path.getsize(path)


def build(cfg):
    import gpt2

    with torch.device("meta"):
        model = gpt2.GPT2LMHeadModel(cfg)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):  # cheap deterministic values: every tensor differs
            p.copy_(torch.arange(p.numel(), dtype=torch.float32).view(p.shape).mul_(1e-7).add_(i * 1e-3).sin_())
    model.tie_weights()
    return model.eval()


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux -> GB


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-layer", type=int, default=24)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", default=None, help="where to write (default: a temp dir under $TMPDIR)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--fsync", action="store_true", help="fsync every saved file inside the timed save")
    p.add_argument("--quick", action="store_true", help="6 layers, 2 repeats")
    p.add_argument("--no-record", action="store_true", help=NO_RECORD_HELP)
    args = p.parse_args(argv)
    if args.quick:
        args.n_layer, args.repeats = 6, 2
    if args.threads:
        torch.set_num_threads(args.threads)

    from safetensors.torch import load_file

    import gpt2

    cfg = gpt2.GPT2Config.from_preset("gpt2-medium", n_layer=args.n_layer)
    model = build(cfg)
    n_params = model.num_parameters()
    print(machine_line())
    print(f"gpt2-medium dims (24 x 1024, 16 heads, vocab 50257) with {cfg.n_layer} layers: "
          f"{n_params / 1e6:.0f}M params, "
          f"fp32; {args.repeats} interleaved repeats (median), page cache warm for loads, "
          f"saves {'with' if args.fsync else 'without'} fsync")

    root = tempfile.mkdtemp(prefix="ckpt-io-", dir=args.dir)
    ours_dir, pt_path = os.path.join(root, "hf"), os.path.join(root, "model.pt")
    try:
        def save_ours():
            model.save_pretrained(ours_dir)
            if args.fsync:
                fsync_tree(ours_dir)

        def save_torch():
            torch.save(model.state_dict(), pt_path)
            if args.fsync:
                fsync_tree(pt_path)

        ts = interleaved({"ours": save_ours, "torch": save_torch}, repeats=args.repeats, warmup=1)
        st_bytes, pt_bytes = weight_bytes(ours_dir), weight_bytes(pt_path)
        del model  # loads below build their own copies; keep at most two alive

        # sanity: what we load equals what we saved (spot check one transposed tensor through the HF layout)
        check = gpt2.GPT2LMHeadModel.from_pretrained(ours_dir)
        ref = build(cfg)
        torch.testing.assert_close(check.transformer.h[0].attn.c_attn.weight, ref.transformer.h[0].attn.c_attn.weight,
                                   rtol=0, atol=0)
        # nn.Linear layout for real: a transposed view of the (in, out) file tensor would "load" without the transpose
        bad = [n for n, t in check.state_dict().items() if not t.is_contiguous()]
        assert not bad, f"from_pretrained returned non-contiguous weights: {bad[:3]}"
        del check, ref

        tl = interleaved({
            "ours": lambda: gpt2.GPT2LMHeadModel.from_pretrained(ours_dir),
            "raw": lambda: load_file(os.path.join(ours_dir, "model.safetensors")),
            "torch": lambda: torch.load(pt_path, weights_only=True),
        }, repeats=args.repeats, warmup=1)  # the warm-up round reads every file once: page cache warm
    finally:
        shutil.rmtree(root, ignore_errors=True)

    def gbps(nbytes, times):
        return nbytes / median(times) / 1e9

    rows = [
        ("save", "ours: save_pretrained (safetensors, HF layout)", st_bytes, ts["ours"]),
        ("save", "baseline: torch.save(state_dict)", pt_bytes, ts["torch"]),
        ("load", "ours: from_pretrained end to end", st_bytes, tl["ours"]),
        ("load", "safetensors load_file alone", st_bytes, tl["raw"]),
        ("load", "baseline: torch.load(weights_only=True)", pt_bytes, tl["torch"]),
    ]
    print()
    print("| op | what | GB | s (median) [min..max] | GB/s |")
    print("|---|---|---:|---:|---:|")
    for op, what, nbytes, times in rows:
        print(f"| {op} | {what} | {nbytes / 1e9:.2f} | {median(times):.3f} {spread(times)} "
              f"| {gbps(nbytes, times):.2f} |")
    print()
    print(f"save: ours / torch.save = {gbps(st_bytes, ts['ours']) / gbps(pt_bytes, ts['torch']):.2f}x   "
          f"load: ours / torch.load = {gbps(st_bytes, tl['ours']) / gbps(pt_bytes, tl['torch']):.2f}x   "
          f"(GB/s ratios; > 1 = ours faster)")
    print(f"peak RSS of this process: {peak_rss_gb():.2f} GB")


if __name__ == "__main__":
    from common import recorded  # benchmarks/common.py: appends this run to benchmarks/RESULTS.md

    with recorded("checkpoint_io"):
        main()
