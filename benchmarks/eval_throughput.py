"""Evaluation throughput: requests/s of our lm-evaluation-harness backend (train/eval/harness.py,
"gpt2-forge") vs lm_eval's own `hf` backend (HFLM on transformers' GPT2LMHeadModel), same weights, same requests,
same batch size, CPU.

    python benchmarks/eval_throughput.py            # GPT-2 124M shape, 16 docs per task, 3 repeats  (~6 min, 2 cores)
    python benchmarks/eval_throughput.py --quick    # 4 of its 12 layers, 8 docs per task, 2 repeats   (~1 min)

The model is a seeded random GPT-2 (vocab 50257, n_positions 1024; --config gpt2-4L keeps the widths with 4 layers),
saved with save_pretrained next to a byte-level BPE trained on the generated text; both backends load that one
folder. Four local tasks written at run time (lm_eval's YAML format, `dataset_path: json`) give one request type
each, shaped like the standard benchmarks: hellaswag-like multiple choice (4 endings of ~20 tokens after a ~60-token
context), lambada-like last-word loglikelihood (~80-token passages), wikitext-like loglikelihood_rolling (documents
of ~400-1800 tokens: one to two 1024-token windows) and a triviaqa-like generate_until (greedy, stop at "\\n",
max_gen_toks 32; a random model rarely stops, so most requests generate all 32). lm_eval builds the requests once
(TaskManager.load + build_all_requests); each backend's `loglikelihood` / `loglikelihood_rolling` / `generate_until`
is then timed on them, `--repeats` times, interleaved with alternating order (benchmarks/common.py). Before timing,
the outputs are checked: log-likelihoods within 1e-4 relative, greedy flags and generated strings equal.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import tempfile
from pathlib import Path

import torch
from common import NO_RECORD_HELP, interleaved, machine_line, median, spread  # benchmarks/common.py (run as a script)

CONFIGS = {
    "gpt2": dict(n_layer=12, n_embd=768, n_head=12),
    "gpt2-4L": dict(n_layer=4, n_embd=768, n_head=12),
}
WORDS = ("the of and to in is was for on that with as by at from his her an which had were are be this it its "
         "river city king music water light summer garden stone market winter letter doctor island window forest "
         "engine bridge castle school theatre village painter soldier teacher captain harbour station mountain "
         "opened closed carried followed painted wrote built sailed crossed signed watched returned visited "
         "quickly slowly quietly early late north south old new small large red green silver golden").split()


def text(rng: random.Random, n_words: int) -> str:
    words = [rng.choice(WORDS) for _ in range(n_words)]
    for i in range(rng.randint(8, 14), n_words, rng.randint(8, 14)):
        words[i - 1] += "."
    return " ".join(words)


def write_tasks(d: Path, docs: int, seed: int = 0) -> list[str]:
    """Four task YAMLs + JSONL files in `d`; returns the task names."""
    rng = random.Random(seed)
    rows = {
        "bench_mc": [{"ctx": text(rng, 45), "endings": [text(rng, 15) for _ in range(4)], "label": rng.randrange(4)}
                     for _ in range(docs)],
        "bench_ll": [{"text": text(rng, 60)} for _ in range(docs)],
        "bench_roll": [{"page": text(rng, rng.randint(300, 1300))} for _ in range(max(2, docs // 4))],
        "bench_gen": [{"question": text(rng, 25), "answer": rng.choice(WORDS)} for _ in range(docs)],
    }
    spec = {
        "bench_mc": 'output_type: multiple_choice\ndoc_to_text: "{{ctx}}"\ndoc_to_choice: "{{endings}}"\n'
                    'doc_to_target: "{{label}}"\nmetric_list:\n  - metric: acc\n',
        "bench_ll": "output_type: loglikelihood\ndoc_to_text: \"{{text.split(' ')[:-1]|join(' ')}}\"\n"
                    "doc_to_target: \"{{' '+text.split(' ')[-1]}}\"\nmetric_list:\n  - metric: acc\n",
        "bench_roll": 'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{page}}"\n'
                      "metric_list:\n  - metric: word_perplexity\n",
        "bench_gen": 'output_type: generate_until\ndoc_to_text: "Question: {{question}}\\nAnswer:"\n'
                     'doc_to_target: "{{answer}}"\ngeneration_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 32\n'
                     "  do_sample: false\nmetric_list:\n  - metric: exact_match\n",
    }
    for name, docs_ in rows.items():
        data = d / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in docs_))
        (d / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  cache_dir: {d / 'datasets'}\n  data_files:\n"
            f"    test: {data}\ntest_split: test\n{spec[name]}"
        )
    return list(rows)


def build_model_dir(d: Path, config: str, corpus: str) -> Path:
    import gpt2

    torch.manual_seed(0)
    cfg = gpt2.GPT2Config(vocab_size=50257, n_positions=1024, **CONFIGS[config])
    model = gpt2.GPT2LMHeadModel(cfg).eval()
    tok = gpt2.train_tokenizer([corpus], vocab_size=1024)
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def requests_by_type(task_manager, names: list[str]) -> dict[str, list]:
    """lm_eval's Instances of every task, grouped by request type, built once."""
    loaded = task_manager.load(names)
    out: dict[str, list] = {}
    for task in loaded["tasks"].values():
        task.build_all_requests(limit=None, rank=0, world_size=1)
        for inst in task.instances:
            out.setdefault(inst.request_type, []).append(inst)
    return out


def quiet(method, instances):
    """An HFLM call without its progress bars (its loglikelihood_rolling shows one per batch whatever it is told)."""
    with open(os.devnull, "w") as null, contextlib.redirect_stderr(null):
        return method(instances, disable_tqdm=True)


def check_equal(kind: str, ours: list, theirs: list) -> None:
    if kind == "generate_until":
        bad = sum(a != b for a, b in zip(ours, theirs))
    elif kind == "loglikelihood_rolling":
        bad = sum(abs(a - b) > 1e-4 * abs(b) for a, b in zip(ours, theirs))
    else:
        bad = sum(abs(a[0] - b[0]) > 1e-4 * abs(b[0]) or a[1] != b[1] for a, b in zip(ours, theirs))
    print(f"  {kind}: {len(ours)} requests, {'outputs equal' if not bad else f'{bad} outputs DIFFER'}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="gpt2", choices=list(CONFIGS))
    p.add_argument("--docs", type=int, default=16, help="documents per task (rolling: a quarter, at least 2)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--quick", action="store_true", help="gpt2-4L, 8 docs per task, 2 repeats")
    p.add_argument("--no-record", action="store_true", help=NO_RECORD_HELP)
    args = p.parse_args(argv)
    if args.quick:
        args.config, args.docs, args.repeats = "gpt2-4L", 8, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from train.eval.harness import GPT2ForgeLM

    print(machine_line())
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "tasks").mkdir()
        names = write_tasks(tmp / "tasks", args.docs)
        corpus = " ".join(text(random.Random(s), 400) for s in range(20))
        model_dir = build_model_dir(tmp / "model", args.config, corpus)
        reqs = requests_by_type(TaskManager(include_path=str(tmp / "tasks"), include_defaults=False), names)
        ours = GPT2ForgeLM(str(model_dir), batch_size=args.batch_size, device="cpu", show_progress=False)
        hf = HFLM(pretrained=str(model_dir), batch_size=args.batch_size, device="cpu", dtype="float32")
        print(f"config {args.config} ({sum(p.numel() for p in ours.model.parameters()) / 1e6:.0f} M parameters), "
              f"batch size {args.batch_size}, {args.repeats} repeats, interleaved")
        print("checking outputs:")
        for kind, instances in reqs.items():
            check_equal(kind, getattr(ours, kind)(instances), quiet(getattr(hf, kind), instances))

        print(f"{'request type':24} {'n':>5} {'ours req/s':>11} {'hf req/s':>11} {'ours/hf':>8}   seconds ours | hf")
        total = {"ours": 0.0, "hf": 0.0}
        n_total = 0
        for kind, instances in reqs.items():
            times = interleaved({"ours": lambda: getattr(ours, kind)(instances),
                                 "hf": lambda: quiet(getattr(hf, kind), instances)},
                                repeats=args.repeats, warmup=0)
            mo, mh = median(times["ours"]), median(times["hf"])
            total["ours"] += mo
            total["hf"] += mh
            n_total += len(instances)
            print(f"{kind:24} {len(instances):5d} {len(instances) / mo:11.2f} {len(instances) / mh:11.2f} "
                  f"{mh / mo:7.2f}x   {spread(times['ours'])} | {spread(times['hf'])}")
        print(f"{'all four tasks':24} {n_total:5d} {n_total / total['ours']:11.2f} {n_total / total['hf']:11.2f} "
              f"{total['hf'] / total['ours']:7.2f}x   (sum of the medians)")


if __name__ == "__main__":
    from common import recorded  # benchmarks/common.py: appends this run to benchmarks/RESULTS.md

    with recorded("eval_throughput"):
        main()
