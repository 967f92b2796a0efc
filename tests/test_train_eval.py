"""In-training evaluation (the `eval` group, train/eval/evaluate.py): lm_eval tasks scored on the live model at
the configured optimizer steps and at the end, logged as eval/<task>/<metric> rows equal to a standalone
`train/cli/evaluate.py` on the checkpoint of the same step; a SIGKILLed run resumed with resume=auto has every eval row
exactly once; off, nothing of lm_eval is imported; bad values get one sentence.

One tiny run (2 layers, 64 wide) trains 25 steps on test_evaluate's made-up facts and evaluates three local tasks of
three output types (multiple choice, rolling perplexity, greedy generation; 6 documents each) at steps 10, 20 and 25.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

from test_evaluate import facts, write_tasks  # noqa: E402
from test_train_resume import last_step  # noqa: E402

from helpers import compose_config, sigkill_when  # noqa: E402
import train.cli.evaluate as ev_cli  # noqa: E402
import train.eval.evaluate as ev  # noqa: E402
from train.config import ConfigError, register_configs  # noqa: E402
from train.callbacks.loggers import read_metrics  # noqa: E402
from train.job import train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
register_configs()
TASKS = ["forge_mc", "forge_roll", "forge_gen"]
EVAL_STEPS = [10, 20, 25]  # every 10 steps, and the end of a 25-step run (like the final validation)
KEYS = {"forge_mc/acc", "forge_mc/acc_norm", "forge_roll/word_perplexity", "forge_roll/byte_perplexity",
        "forge_roll/bits_per_byte", "forge_gen/exact_match_strip"}


def overrides(world: dict, run_dir: Path, *extra: str) -> list[str]:
    return [
        "data=text", f"data.path={world['corpus']}", f"data.cache_dir={world['cache']}", "data.vocab_size=320",
        "data.block_size=32", "data.batch_size=16", "data.val_fraction=0.1",
        "model.n_layer=2", "model.n_head=2", "model.n_embd=64", "model.n_positions=64", "model.dropout=0.1",
        "trainer.max_steps=25", "trainer.val_check_interval=10", "trainer.limit_val_batches=1",
        "trainer.log_every_n_steps=5", "trainer.enable_progress_bar=false",
        "checkpoint.every_n_steps=5", "checkpoint.keep_last=0", "optim.lr=1e-2", "optim.warmup_steps=5",
        "sample.max_new_tokens=4", f"run_dir={run_dir}",
        f"eval.tasks=[{','.join(TASKS)}]", f"eval.include_path={world['tasks']}", "eval.every_n_steps=10",
        "eval.limit=6", "eval.batch_size=4", *extra,
    ]


def config(args: list[str]):
    return compose_config(args)


def eval_rows(run_dir: Path) -> dict[int, dict[str, float]]:
    """{step: {task/metric: value}} of metrics.csv rows holding eval values; fails on a step written twice."""
    rows = read_metrics(run_dir / "metrics.csv")
    steps = [int(r["step"]) for r in rows]
    assert len(steps) == len(set(steps)), f"duplicated rows: {steps}"
    out = {}
    for r in rows:
        values = {k.removeprefix("eval/"): v for k, v in r.items() if k.startswith("eval/") and v is not None}
        if values:
            out[int(r["step"])] = values
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_eval")
    corpus = root / "facts.txt"
    corpus.write_text("\n".join(facts(40, s) for s in range(200)))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 64-wide model gains nothing from a second thread on a shared 2-core machine
    try:
        yield {"root": root, "corpus": corpus, "cache": root / "cache", "tasks": write_tasks(root / "tasks",
                                                                                              root / "datasets")}
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def run(world):
    """The uninterrupted run, with TensorBoard besides metrics.csv."""
    run_dir = world["root"] / "run"
    summary = train(config(overrides(world, run_dir, "logger=tensorboard")))
    return run_dir, summary


def test_eval_rows_at_the_configured_steps_equal_a_standalone_evaluate(run, world, capsys):
    run_dir, summary = run
    rows = eval_rows(run_dir)
    assert sorted(rows) == EVAL_STEPS
    assert all(set(v) == KEYS for v in rows.values())
    # the model learnt something between step 10 and the end: not the same numbers three times
    assert rows[25]["forge_roll/word_perplexity"] < rows[10]["forge_roll/word_perplexity"]
    for step in EVAL_STEPS:
        ckpt = run_dir / "checkpoints" / f"step-{step}"
        out = world["root"] / f"standalone-{step}.json"
        rc = ev_cli.main([str(ckpt), "--tasks", ",".join(TASKS), "--include-path", str(world["tasks"]), "--limit", "6",
                      "--batch-size", "4", "--device", "cpu", "--bootstrap-iters", "0", "--out", str(out)])
        assert rc == 0, capsys.readouterr().err[-2000:]
        standalone = ev.metrics(json.loads(out.read_text()))
        assert set(standalone) == KEYS
        for key, value in standalone.items():  # metrics.csv keeps 8 significant digits
            assert rows[step][key] == pytest.approx(value, rel=1e-7, abs=1e-12), (step, key)
        # lm_eval's whole results dict of that step sits in the run's eval/ folder
        logged = ev.metrics(json.loads((run_dir / "eval" / f"step-{step}.json").read_text()))
        assert logged == pytest.approx(standalone, rel=1e-9)
    assert sorted(p.name for p in (run_dir / "eval").iterdir()) == sorted(f"step-{s}.json" for s in EVAL_STEPS)
    assert summary["global_step"] == 25 and (run_dir / "hf" / "model.safetensors").is_file()
    assert summary["eval"] == {"step": 25, **{f"eval/{k}": pytest.approx(v, rel=1e-7) for k, v in rows[25].items()}}
    capsys.readouterr()


def test_every_logger_gets_the_eval_values_and_the_plot_a_second_panel(run):
    from matplotlib.image import imread
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _ = run
    rows = eval_rows(run_dir)
    acc = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    for key in ("forge_mc/acc", "forge_roll/bits_per_byte"):
        events = acc.Scalars(f"eval/{key}")
        assert [e.step for e in events] == EVAL_STEPS
        assert [e.value for e in events] == pytest.approx([rows[s][key] for s in EVAL_STEPS], rel=1e-6)
    # plots/loss.png: the loss panel (7 x 4.5 in) gains the eval panel below it (7 x 8 in at 110 dpi)
    assert imread(run_dir / "plots" / "loss.png").shape[0] == 8 * 110


def test_sigkill_then_resume_auto_has_every_eval_row_once(run, world, tmp_path):
    """The victim dies the moment checkpoint step-10 (an eval step) is published, or a little later; resumed with
    resume=auto it ends with eval rows at 10, 20 and 25, once each, equal to the uninterrupted run's."""
    ref_dir, _ = run
    run_dir = tmp_path / "victim"
    log = tmp_path / "victim.log"
    # one thread, as this process's runs: the same float reductions, so the resumed scores equal the reference's
    victim = subprocess.Popen([sys.executable, str(ROOT / "train" / "run.py"), *overrides(world, run_dir)], cwd=ROOT,
                              env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=open(log, "w"),
                              stderr=subprocess.STDOUT)
    sigkill_when(victim, lambda: last_step(run_dir) >= 10, log, "a step-10 checkpoint")
    killed_at, killed = last_step(run_dir), time.time()
    assert 10 <= killed_at < 25, f"the victim must die mid-run (last checkpoint: step-{killed_at})"
    # eval row 10 reached the disk before checkpoint step-10 was published
    assert 10 in eval_rows(run_dir)

    train(config(overrides(world, run_dir, "resume=auto")))
    rows, ref = eval_rows(run_dir), eval_rows(ref_dir)
    assert sorted(rows) == EVAL_STEPS
    for step in EVAL_STEPS:  # exact resume: the same weights, the same scores
        assert rows[step] == ref[step], step
    # the steps up to the checkpoint were not evaluated again; those after it were
    redone = {s for s in EVAL_STEPS if (run_dir / "eval" / f"step-{s}.json").stat().st_mtime > killed}
    assert redone == {s for s in EVAL_STEPS if s > killed_at}
    steps = [int(r["step"]) for r in read_metrics(run_dir / "metrics.csv")]
    assert steps == [int(r["step"]) for r in read_metrics(ref_dir / "metrics.csv")]


OFF_PROBE = r"""
import json, sys
import train.trainer
seen = []
build = train.trainer.build_trainer
def spy(*args, **kwargs):
    trainer = build(*args, **kwargs)
    seen.extend(type(cb).__name__ for cb in trainer.callbacks)
    return trainer
train.trainer.build_trainer = spy
from hydra import compose, initialize_config_dir
from train.config import register_configs, to_config
from train.job import train
register_configs()
with initialize_config_dir(config_dir=sys.argv[1], version_base="1.3"):
    cfg = to_config(compose(config_name="config", overrides=sys.argv[2:]))
train(cfg)
print(json.dumps({"lm_eval": sorted(m for m in sys.modules if m.split(".")[0] == "lm_eval"), "callbacks": seen}))
"""


def test_off_by_default_imports_nothing_and_on_leaves_training_unchanged(run, world, tmp_path):
    """The same run without eval.*, in a fresh process: no lm_eval module is imported and no HarnessEval added; and
    its losses equal the evaluated run's, string for string (dropout on: evaluating in between changed neither the
    train/eval mode nor the random streams of the training)."""
    args = [a for a in overrides(world, tmp_path / "off") if not a.startswith("eval.")]
    assert not config(args).eval.tasks  # off is the default
    r = subprocess.run([sys.executable, "-c", OFF_PROBE, str(ROOT / "conf"), *args], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report["lm_eval"] == []
    assert "StepCheckpoint" in report["callbacks"] and "HarnessEval" not in report["callbacks"]
    assert not (tmp_path / "off" / "eval").exists()
    off = {int(r["step"]): r for r in read_metrics(tmp_path / "off" / "metrics.csv")}
    on = {int(r["step"]): r for r in read_metrics(run[0] / "metrics.csv")}
    assert not [k for k in off[1] if k.startswith("eval/")]
    assert sorted(off) == sorted(on)
    for step in off:
        for key in ("train/loss", "val/loss", "lr"):
            assert off[step][key] == on[step][key], (step, key)


@pytest.mark.parametrize("extra,needle", [
    (["eval.every_n_steps=0"], "eval.every_n_steps=0 must be >= 1"),
    (["eval.limit=-3"], "eval.limit=-3.0 must be a whole number of documents per task"),
    (["eval.limit=2.5"], "eval.limit=2.5 must be a whole number"),
    (["eval.batch_size=0"], "eval.batch_size=0 must be >= 1"),
    (["eval.num_fewshot=-1"], "eval.num_fewshot=-1 must be >= 0"),
    (["eval.tasks=[forge_mc,no_such_task_xyz]"], "unknown task 'no_such_task_xyz'"),
    (["eval.include_path={tmp}/nowhere"], "eval.include_path {tmp}/nowhere does not exist"),
    (["task=cls"], "eval.tasks scores a language model, and task=cls trains a fine-tuning head"),
])
def test_bad_eval_config_is_one_sentence_before_anything_runs(world, tmp_path, extra, needle):
    run_dir = tmp_path / "bad"
    extra, needle = [e.format(tmp=tmp_path) for e in extra], needle.format(tmp=tmp_path)
    with pytest.raises(ConfigError) as ei:
        train(config(overrides(world, run_dir, *extra)))
    msg = str(ei.value)
    assert needle in msg and len(msg.splitlines()) == 1, msg
    assert not (run_dir / "config.yaml").exists()  # refused before the run wrote or prepared anything
