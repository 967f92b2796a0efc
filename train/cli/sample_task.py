"""Write a small local lm_eval task to try `--include-path` / `eval.include_path` on, offline:

    python train/cli/sample_task.py my_tasks/ [--name my_lambada] [--num-docs 200]
    python train/cli/evaluate.py hf-out --tasks my_lambada --include-path my_tasks/ --device cpu

writes <folder>/<name>.yaml (lm_eval's task format, `dataset_path: json`) and <folder>/<name>.jsonl: sentences of the
embedded default corpus (data_pipelines.corpus: CPython's documentation and docstrings, made at run time, no
network), each scored as lambada_openai scores its documents — the log-likelihood of the last word given the rest
(lm_eval's lambada_openai.yaml: doc_to_text / doc_to_target; metrics perplexity and acc).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Optional

from train.cli import run_cli

# the lambada_openai recipe (lm_eval/tasks/lambada/lambada_openai.yaml) on a local JSONL of {"text": ...} lines
TASK_YAML = """\
# Written by train/cli/sample_task.py: the last word of each line of {jsonl_name} (sentences of the embedded corpus),
# scored as lm_eval's lambada_openai scores its documents.
task: {name}
dataset_path: json
dataset_kwargs:
  data_files: {{test: {data_file}}}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{text.split(' ')[:-1]|join(' ')}}}}"
doc_to_target: "{{{{' '+text.split(' ')[-1]}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_WORD = re.compile(r"^[A-Za-z]{3,}$")


def sample_sentences(num_docs: int, min_words: int = 8, max_words: int = 30) -> list[str]:
    """The first `num_docs` sentences of the embedded corpus with min_words..max_words words that end in a plain word
    and a full stop (the full stop dropped: the last word is the target), in corpus order; fewer when it has fewer."""
    from data_pipelines.corpus import build_corpus

    out: list[str] = []
    for doc in build_corpus():
        for para in doc.split("\n\n")[1:]:  # the first block is the document's title
            for sent in _SENTENCE_END.split(para.replace("\n", " ")):
                words = sent.split(" ")
                if sent.endswith(".") and min_words <= len(words) <= max_words and _WORD.match(words[-1][:-1]):
                    out.append(sent[:-1])
                    if len(out) == num_docs:
                        return out
    return out


def write_sample_task(folder: str | Path, name: str = "my_lambada", num_docs: int = 200) -> tuple[Path, Path]:
    """Write <folder>/<name>.yaml and <folder>/<name>.jsonl (`num_docs` lines); returns (yaml, jsonl). The YAML names
    the JSONL by its absolute path, so the task works from any working directory. Raises ValueError on a bad name or
    count."""
    if not re.fullmatch(r"[A-Za-z_][\w-]*", name):
        raise ValueError(f"--name {name!r} is not a task name lm_eval takes; use letters, digits, '_' and '-'.")
    if num_docs < 1:
        raise ValueError(f"--num-docs {num_docs} must be >= 1.")
    folder = Path(folder).expanduser().resolve()
    folder.mkdir(parents=True, exist_ok=True)
    jsonl, yaml = folder / f"{name}.jsonl", folder / f"{name}.yaml"
    jsonl.write_text("".join(json.dumps({"text": s}) + "\n" for s in sample_sentences(num_docs)))
    yaml.write_text(TASK_YAML.format(name=name, jsonl_name=jsonl.name, data_file=json.dumps(str(jsonl))))
    return yaml, jsonl


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", help="where to write <name>.yaml and <name>.jsonl (created if missing)")
    p.add_argument("--name", default="my_lambada", help="the task's name (default my_lambada)")
    p.add_argument("--num-docs", type=int, default=200, help="sentences in the JSONL (default 200)")
    args = p.parse_args(argv)

    def body() -> int:
        yaml, jsonl = write_sample_task(args.folder, args.name, args.num_docs)
        n = sum(1 for _ in jsonl.open())
        print(f"wrote {yaml} and {jsonl} ({n} sentences); score a model on it: python train/cli/evaluate.py "
              f"<hf-dir | run-dir> --tasks {args.name} --include-path {args.folder}")
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())

__all__ = ["main", "sample_sentences", "write_sample_task"]
