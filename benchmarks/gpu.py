"""GPU, on a CUDA machine: tokens/s, MFU and peak memory of gpt2 (124M) and gpt2-xl training steps, ours vs
transformers.GPT2LMHeadModel inside the same Lightning loop.

Every configuration is one `lightning.Trainer.fit` of a minimal LightningModule (`LMModule` below) that wraps
either model with the same optimizer: fused AdamW (weight decay on Linear weights only, train.module.param_groups'
rule), grad clipping 1.0, bf16-mixed autocast, block 1024, random token ids (the values do not change the compute).
The grid: model {gpt2, gpt2-xl} x implementation {gpt2-forge, transformers} x attention {sdpa, flash} x
torch.compile {off, on}. Each configuration runs warm-up steps (compilation happens there), then timed steps between
two cuda.synchronize() calls; no host sync inside the step.

  tokens/s  = timed steps x batch x 1024 / seconds
  MFU       = gpt2.flops_per_token(config, 1024) x tokens/s / peak dense bf16 FLOP/s of the device
              flops_per_token = 6*N + 12*L*H*Q*T (PaLM appendix B), N = non-embedding parameters plus the lm_head
              matmul (V*C, tied to wte: real compute), as nanoGPT's estimate_mfu counts it
  peak mem  = torch.cuda.max_memory_allocated() over the configuration

"flash" is our attn_implementation="flash" (the flash-attn package if installed, else SDPA pinned to its flash
kernel); for transformers it is "flash_attention_2" when flash-attn is installed, else "sdpa" run inside
sdpa_kernel(FLASH_ATTENTION) -- the same kernel either way. An OOM is recorded, then retried once at half the
batch. A time budget (default 330 s, checked before each configuration; --quick 150 s) skips what does not fit,
so the whole run stays < 8 min on an H100.
Results go to benchmarks/results/<device-slug>-<date>.{json,md}.

    python benchmarks/gpu.py [--quick] [--budget-s 330] [--models gpt2 gpt2-xl] [--out benchmarks/results]

On a machine without CUDA it prints "no CUDA device: nothing to measure" and exits 0. `--smoke` runs the same code
on the CPU with the tiny preset (fp32, no fused AdamW, no compile) to check the script itself.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import json
import re
import sys
import time
import traceback
from pathlib import Path

import lightning as L
import torch

import gpt2
from common import NO_RECORD_HELP, machine_line  # benchmarks/common.py (run as a script, like the others)

RESULTS = Path(__file__).resolve().parent / "results"
BLOCK = 1024
# micro-batches that fit an 80 GB card with fp32 master weights + fused AdamW state (nanoGPT uses 12 for gpt2 on
# A100 40 GB; gpt2-xl: 1.56B params x 16 B of weights/grads/Adam state = 25 GB before activations)
BATCH = {"gpt2": 16, "gpt2-xl": 8, "tiny": 2}

# Peak dense bf16 tensor FLOP/s (no sparsity), from the vendor data sheets; matched against get_device_name().
PEAK_BF16 = (  # (substring, FLOP/s), first match wins: PCIe before the bare "H100"
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM5 ("NVIDIA H100 80GB HBM3")
    ("H200", 989e12),
    ("A100", 312e12),
)


def peak_flops(name: str) -> float | None:
    for key, flops in PEAK_BF16:
        if key.lower() in name.lower():
            return flops
    return None


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def flash_attn_installed() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def build_model(impl: str, preset: str, attn: str):
    """(model, our GPT2Config of the same architecture) -- ours or transformers', randomly initialised."""
    cfg = gpt2.GPT2Config.from_preset(preset, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                      attn_implementation=attn)
    if impl == "gpt2-forge":
        return gpt2.GPT2LMHeadModel(cfg), cfg
    import transformers

    hf_attn = "flash_attention_2" if attn == "flash" and flash_attn_installed() else "sdpa"
    hf_cfg = transformers.GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.n_positions, n_embd=cfg.n_embd,
                                     n_layer=cfg.n_layer, n_head=cfg.n_head, resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0)
    hf_cfg._attn_implementation = hf_attn  # noqa: SLF001 -- transformers' documented way before construction
    return transformers.GPT2LMHeadModel(hf_cfg), cfg


class LMModule(L.LightningModule):
    """The same step for both models: causal-LM loss (labels = inputs, shifted inside the model), fused AdamW."""

    def __init__(self, model: torch.nn.Module, *, fused: bool, flash_ctx: bool):
        super().__init__()
        self.model, self.fused, self.flash_ctx = model, fused, flash_ctx

    def training_step(self, batch, batch_idx):
        ctx = contextlib.nullcontext()
        if self.flash_ctx:  # transformers' sdpa pinned to the flash kernel (no flash-attn package here)
            from torch.nn.attention import SDPBackend, sdpa_kernel

            ctx = sdpa_kernel(SDPBackend.FLASH_ATTENTION)
        with ctx:
            return self.model(input_ids=batch, labels=batch).loss

    def configure_optimizers(self):
        from train.module import param_groups

        # conf/optim/adamw.yaml's betas and decay rule; the values do not change the speed
        return torch.optim.AdamW(param_groups(self.model, 0.1), lr=6e-4, betas=(0.9, 0.95), fused=self.fused)


class StepTimer(L.Callback):
    """Synchronize and start the clock before step `warmup`, stop after the last step (no sync in between)."""

    def __init__(self, warmup: int, steps: int):
        self.warmup, self.steps = warmup, steps
        self.t0 = self.t1 = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.warmup:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()  # the steady state; compile's one-off workspaces excluded
            self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == self.warmup + self.steps - 1:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.t1 = time.perf_counter()


def run_one(preset: str, impl: str, attn: str, compiled: bool, batch: int, warmup: int, steps: int,
            device: str) -> dict:
    on_cuda = device == "cuda"
    model, cfg = build_model(impl, preset, attn)
    flash_ctx = impl == "transformers" and attn == "flash" and not flash_attn_installed()
    if compiled:
        model = torch.compile(model)
    module = LMModule(model, fused=on_cuda, flash_ctx=flash_ctx)
    g = torch.Generator().manual_seed(0)
    data = [torch.randint(0, cfg.vocab_size, (batch, BLOCK if preset != "tiny" else cfg.n_positions), generator=g)
            for _ in range(4)]
    seq = data[0].shape[1]
    loader = torch.utils.data.DataLoader([data[i % len(data)] for i in range(warmup + steps)], batch_size=None,
                                         pin_memory=on_cuda)
    timer = StepTimer(warmup, steps)
    trainer = L.Trainer(accelerator="cuda" if on_cuda else "cpu", devices=1,
                        precision="bf16-mixed" if on_cuda else "32-true", max_steps=warmup + steps, max_epochs=-1,
                        gradient_clip_val=1.0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, callbacks=[timer])
    trainer.fit(module, train_dataloaders=loader)
    seconds = timer.t1 - timer.t0
    tok_s = steps * batch * seq / seconds
    return {
        "tokens_per_s": tok_s,
        "step_ms": 1e3 * seconds / steps,
        "flops_per_token": gpt2.flops_per_token(cfg, seq),
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if on_cuda else None,
        "batch": batch,
        "seq": seq,
        "hf_attn": None if impl == "gpt2-forge" else ("flash_attention_2" if attn == "flash" and not flash_ctx
                                                     else "sdpa" + ("[flash kernel]" if flash_ctx else "")),
    }


def cleanup() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    torch._dynamo.reset()


def grid(models: list[str], compile_options: list[bool]) -> list[tuple[str, str, str, bool]]:
    """Most informative first, so a spent budget drops the least: eager sdpa, then compiled flash, then the rest."""
    order = [("sdpa", False), ("flash", True), ("sdpa", True), ("flash", False)]
    return [(m, impl, attn, c) for m in models for attn, c in order if c in compile_options
            for impl in ("gpt2-forge", "transformers")]


def to_markdown(meta: dict, rows: list[dict]) -> str:
    peak = "n/a" if meta["peak_flops"] is None else f"{meta['peak_flops'] / 1e12:.0f} TFLOP/s bf16 dense"
    lines = [f"# GPU training-step benchmark: {meta['device']}", "", f"{meta['date']} | {meta['machine']}", "",
             f"MFU peak: {peak}; "
             f"{meta['precision']}, fused AdamW (CUDA), block {meta['block']}, {meta['warmup']} warm-up + "
             f"{meta['steps']} timed steps. "
             "FLOPs/token = 6N + 12LHQT with N = non-embedding params + lm_head (gpt2.flops_per_token).", "",
             "| model | impl | attention | compile | batch | tokens/s | MFU | peak mem GiB | step ms | note |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if "tokens_per_s" in r:
            mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f} %"
            mem = "n/a" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.1f}"
            lines.append(f"| {r['model']} | {r['impl']} | {r['attn']} | {r['compile']} | {r['batch']} | "
                         f"{r['tokens_per_s']:,.0f} | {mfu} | {mem} | {r['step_ms']:.1f} | {r.get('note', '')} |")
        else:
            lines.append(f"| {r['model']} | {r['impl']} | {r['attn']} | {r['compile']} | {r.get('batch', '')} | "
                         f"- | - | - | - | {r['status']} |")
    ratios = []
    for r in rows:
        if r["impl"] == "gpt2-forge" and "tokens_per_s" in r:
            for t in rows:
                if (t["impl"] == "transformers" and "tokens_per_s" in t
                        and (t["model"], t["attn"], t["compile"]) == (r["model"], r["attn"], r["compile"])):
                    ratios.append(f"- {r['model']} {r['attn']} compile={r['compile']}: ours / transformers = "
                                  f"{r['tokens_per_s'] / t['tokens_per_s']:.3f}x")
    return "\n".join(lines + ["", "Speed-ups (tokens/s):", *ratios, ""])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="few steps and a 150 s budget")
    p.add_argument("--models", nargs="+", default=None, choices=["gpt2", "gpt2-xl"])
    p.add_argument("--compile", choices=["both", "on", "off"], default="both")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--budget-s", type=float, default=None, help="stop starting new configurations after this")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--smoke", action="store_true", help="CPU, tiny preset: check the script, not the numbers")
    p.add_argument("--no-record", action="store_true", help=NO_RECORD_HELP)
    args = p.parse_args(argv)

    if not args.smoke and not torch.cuda.is_available():
        print("no CUDA device: nothing to measure")
        return 0
    device = "cpu" if args.smoke else "cuda"
    warmup = args.warmup or (3 if args.quick or args.smoke else 8)
    steps = args.steps or (5 if args.quick or args.smoke else 20)
    budget = args.budget_s or (150.0 if args.quick else 330.0)
    models = ["tiny"] if args.smoke else (args.models or ["gpt2", "gpt2-xl"])
    compile_options = {"both": [False, True], "on": [True], "off": [False]}[args.compile]
    if args.smoke:
        compile_options = [False]
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 leftovers outside autocast (nanoGPT does the same)
        torch.backends.cudnn.allow_tf32 = True
    name = torch.cuda.get_device_name() if device == "cuda" else f"cpu-smoke {torch.get_num_threads()} threads"
    peak = peak_flops(name) if device == "cuda" else None
    date = dt.datetime.now().strftime("%Y-%m-%d")
    meta = {"device": name, "date": date, "machine": machine_line(), "peak_flops": peak, "warmup": warmup,
            "steps": steps, "precision": "bf16-mixed" if device == "cuda" else "fp32 (smoke)",
            "block": 256 if args.smoke else BLOCK,
            "flash_attn_package": flash_attn_installed(), "budget_s": budget}
    print(meta["machine"], flush=True)
    rows: list[dict] = []
    start = time.perf_counter()
    for preset, impl, attn, compiled in grid(models, compile_options):
        row = {"model": preset, "impl": impl, "attn": attn, "compile": compiled}
        # gpt2 may use at most half the budget so that gpt2-xl is measured too
        limit = budget / 2 if preset == "gpt2" and len(models) > 1 else budget
        if time.perf_counter() - start > limit:
            rows.append({**row, "status": "skipped: time budget"})
            print(f"{preset:8s} {impl:12s} {attn:5s} compile={compiled!s:5s}: skipped (time budget)", flush=True)
            continue
        if attn == "flash" and device == "cpu":
            rows.append({**row, "status": "skipped: flash needs CUDA"})
            continue
        batch = BATCH[preset]
        for attempt in range(2):
            try:
                r = run_one(preset, impl, attn, compiled, batch, warmup, steps, device)
                r["mfu"] = None if peak is None else r["flops_per_token"] * r["tokens_per_s"] / peak
                if attempt:
                    r["note"] = f"OOM at batch {BATCH[preset]}"
                rows.append({**row, **r})
                mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f} %"
                mem = "n/a" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.1f} GiB"
                print(f"{preset:8s} {impl:12s} {attn:5s} compile={compiled!s:5s} batch {batch:2d}: "
                      f"{r['tokens_per_s']:10,.0f} tok/s  MFU {mfu}  peak {mem}", flush=True)
                break
            except torch.cuda.OutOfMemoryError:
                cleanup()
                if attempt or batch == 1:
                    tried = f"{BATCH[preset]} and {batch}" if attempt else f"{batch}"
                    rows.append({**row, "batch": batch, "status": f"OOM at batch {tried}"})
                    print(f"{preset} {impl} {attn} compile={compiled}: OOM at batch {batch}", flush=True)
                    break
                batch //= 2
            except Exception as e:  # noqa: BLE001 -- one broken configuration must not lose the others' numbers
                traceback.print_exc()
                rows.append({**row, "batch": batch, "status": f"error: {type(e).__name__}: {str(e)[:200]}"})
                break
        cleanup()
    meta["wall_s"] = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"{slug(name)}-{date}"
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    md = to_markdown(meta, rows)
    stem.with_suffix(".md").write_text(md)
    print("\n" + md)
    print(f"wrote {stem}.json and {stem}.md ({meta['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    from common import recorded  # benchmarks/common.py: appends this run to benchmarks/RESULTS.md

    with recorded("gpu") as rec:
        rc = main()
        rec.skip |= "--smoke" in sys.argv or not torch.cuda.is_available()  # a CPU check measures nothing
    sys.exit(rc)
