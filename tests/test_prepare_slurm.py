"""launch/slurm.py --prepare: a Slurm array of preparation tasks plus an index step (scripts everywhere; the real
jobs on the local cluster that .ci/slurm-up.sh starts, skipped where there is none)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_pipelines import DataConfig
from data_pipelines.prepare import prepare
from gpt2.tokenizer import train_tokenizer
from launch.slurm import PrepareSpec, SlurmError, main, render_prepare_scripts

ROOT = Path(__file__).resolve().parents[1]


def test_prepare_scripts_run_one_share_per_task_then_the_index(tmp_path):
    spec = PrepareSpec(["data=jsonl", "data.path=a.jsonl", f"run_dir={tmp_path}"], array=3, cpus_per_task=4,
                       workdir=tmp_path)  # fmt: skip
    array, index = render_prepare_scripts(spec)
    assert "#SBATCH --array=0-2" in array and "#SBATCH --cpus-per-task=4" in array
    assert "num_tasks=3 task_index=$SLURM_ARRAY_TASK_ID" in array and '"data.num_proc=${SLURM_CPUS_PER_TASK:-1}"' in array
    assert "--array" not in index and "num_tasks" not in index and "data.path=a.jsonl" in index
    assert f"cd {tmp_path}" in array and "run_dir" not in array.split("prepare.py")[1]
    with pytest.raises(SlurmError, match="set by the launcher"):
        PrepareSpec(["data=jsonl", "task_index=1"], array=2)
    with pytest.raises(SlurmError, match="give the data"):
        PrepareSpec([], array=2)
    assert main(["--array", "2", "--dry-run", "--", "data=jsonl"]) == 2  # --array without --prepare


def _slurm_up() -> bool:
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return False
    try:
        r = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0 and any(s in r.stdout for s in ("idle", "mixed", "alloc"))


def _state(job_id: str) -> str:
    r = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30)
    states = [kv.split("=", 1)[1] for kv in r.stdout.split() if kv.startswith("JobState=")]
    return states[0] if states else "UNKNOWN"


@pytest.mark.skipif(not _slurm_up(), reason="no running Slurm cluster (start one with .ci/slurm-up.sh)")
def test_two_array_tasks_and_the_index_step_equal_one_process(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    docs = [f"Document {i}: it's line {i} of the corpus, naïve café {i * 31}.\n" * (5 + i % 40) for i in range(240)]
    for k in range(3):  # three files (units) for the 2 tasks, and small shards so each unit has several
        (corpus / f"{k}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[80 * k : 80 * k + 80]))
    tok = train_tokenizer(iter(docs), vocab_size=400)
    tok.save_pretrained(str(tmp_path / "tok"))
    data = ["data=jsonl", f"data.path={corpus}", f"data.tokenizer={tmp_path / 'tok'}", "data.shard_size_mb=0.02"]
    r = subprocess.run(
        [sys.executable, str(ROOT / "launch/slurm.py"), "--prepare", "--array", "2", "--cpus-per-task", "1",
         "--job-name", "gpt2-forge-test-prepare", "--", *data, f"data.cache_dir={tmp_path / 'cache'}",
         f"run_dir={tmp_path / 'run'}"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    index_job = r.stdout.strip()
    deadline = time.monotonic() + 300
    while _state(index_job) not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY"):
        assert time.monotonic() < deadline, f"index job {index_job} not finished in 300 s"
        time.sleep(2)
    logs = {p.name: p.read_text() for p in (tmp_path / "run" / "slurm").glob("*.out")}
    assert _state(index_job) == "COMPLETED", logs
    tasks = [t for name, t in logs.items() if name.startswith("prepare_")]
    assert len(tasks) == 2 and all("shard(s)" in t and "task " in t and " of 2 done" in t for t in tasks)
    # each task encoded shards of its own (none left for the index step) ...
    assert all(int(t.split(" shard(s)")[0].split()[-1]) > 0 for t in tasks)
    (index_log,) = [t for name, t in logs.items() if name.startswith("index_")]
    assert "  0 shard(s)" in index_log and "tokens written to" in index_log
    # ... and the folder is, shard for shard, what one process writes
    (root,) = (tmp_path / "cache" / "tokens").glob("*")
    one = prepare(DataConfig(source="jsonl", path=str(corpus), tokenizer=str(tmp_path / "tok"), shard_size_mb=0.02,
                             cache_dir=str(tmp_path / "one")))  # fmt: skip
    shards = lambda d: {f.name: f.read_bytes() for f in sorted((d / "shards").glob("*.bin"))}  # noqa: E731
    assert len(shards(one)) > 3 and shards(root) == shards(one)
    a, b = (json.loads((d / "index.json").read_text()) for d in (root, one))
    assert a["splits"] == b["splits"] and a["num_tokens"] == b["num_tokens"]
