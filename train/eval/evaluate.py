"""Score a model on lm-evaluation-harness tasks with our own GPT2LMHeadModel.

    python train/cli/evaluate.py <hf-dir | checkpoints/step-N | run-dir> --tasks hellaswag,lambada_openai,wikitext
        [--include-path DIR] [--num-fewshot K] [--limit N] [--batch-size B] [--device cpu|cuda] [--out FILE]

lm_eval does the benchmark (task registry, prompts, few-shot examples, metrics, aggregation: `simple_evaluate`);
train/eval/harness.py answers its requests with our model. The results table is lm_eval's (`make_table`), the JSON is
lm_eval's results dict, written to <run-dir>/eval/<timestamp>.json (a checkpoint or the hf/ export of a run: that run's
eval/; a standalone HF folder: its own eval/ subfolder) or to --out.

One GPU, or all GPUs of a node as lm_eval's data-parallel mode: `torchrun --nproc-per-node=8 train/cli/evaluate.py ...`
(or `accelerate launch`) — each process scores its share of the requests and rank 0 prints and writes the results.

`evaluate()` is the same thing as a function of a live model; `HarnessEval` (the `eval` group) calls it during
training on the live model every `every_n_steps` optimizer steps and once at the end, and logs eval/<task>/<metric>.

llm.c scores HellaSwag inside its training loop and every GPT-2 reproduction reports benchmark numbers next to its loss
curve; lm_eval does the benchmark (task registry, prompts, metrics, aggregation), train/eval/harness.py answers its
requests with our model.

- Rank 0 evaluates; the other ranks wait for its outcome (a broadcast, so an error on rank 0 stops every rank instead
  of leaving them at a barrier). Under FSDP2 / DeepSpeed ZeRO-3 every rank first takes part in gathering the full
  weights (train.strategies.full_state_dict), and rank 0 scores a plain copy built from them.
- The values go to every logger of the run (metrics.csv, W&B, TensorBoard) at the optimizer step they were measured
  at, and lm_eval's whole results dict (configs, versions, n-samples) to run_dir/eval/step-<N>.json.
- Resume: at a step that both evaluates and checkpoints, the evaluation runs first (this callback sits before
  StepCheckpoint, and its row is on disk before the checkpoint is published), so a run killed after checkpoint N and
  resumed from it has eval row N exactly once; the rows after N are dropped by MetricsCSV and the resumed run
  evaluates those steps again.
- The model is scored in eval mode and in its own dtype, under torch.inference_mode; its train/eval mode and the
  global random states are restored (train.eval.evaluate.evaluate), so evaluating does not change the training run.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

log = logging.getLogger(__name__)

LM_EVAL_HINT = "pip install 'gpt2-forge[eval]' (or pip install 'lm_eval>=0.4.9')"
# lm_eval's defaults (its CLI and simple_evaluate)
DEFAULT_BOOTSTRAP_ITERS = 100_000

# TaskManager indexes every task YAML it may load (thousands of names: seconds of work); the
# training loop evaluates repeatedly, so each index is built once per process.
_TASK_MANAGERS: dict[tuple, Any] = {}


class EvaluationError(ValueError):
    """Bad evaluation input (lm_eval missing, unknown task, broken task YAML); the message names the fix."""


def load_harness():
    """train.eval.harness, or EvaluationError naming the pip command when lm_eval is not installed."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise EvaluationError(f"lm-evaluation-harness is not installed; {LM_EVAL_HINT}.") from None
    from train.eval import harness as eval_harness

    return eval_harness


def evaluate(
    model: Any,
    tokenizer: Any = None,
    tasks: str | Sequence[str] = (),
    *,
    limit: Optional[int | float] = None,
    num_fewshot: Optional[int] = None,
    batch_size: int = 8,
    device: Optional[str] = None,
    include_path: Optional[str | os.PathLike | Sequence[str | os.PathLike]] = None,
    bootstrap_iters: int = DEFAULT_BOOTSTRAP_ITERS,
    log_samples: bool = False,
    max_gen_toks: Optional[int] = None,
    distributed: bool = False,
    show_progress: bool = False,
    seed: Optional[int] = None,
) -> Optional[dict[str, Any]]:
    """Run lm_eval's `simple_evaluate` on `tasks` with our model; returns lm_eval's results dict (None off rank 0).

    Args:
        model: a live `gpt2.GPT2LMHeadModel` (scored where it is, in eval mode; its train/eval mode is restored), or a
            path: an HF folder, a checkpoints/step-N folder, or a run dir (its newest checkpoint, else its hf/).
        tokenizer: the `gpt2.GPT2TokenizerFast` of a live model (a path brings its own).
        tasks: lm_eval task / group / tag names ("hellaswag,lambada_openai" or a list; globs as in lm_eval).
        limit: at most this many documents per task (a float < 1: that fraction), as lm_eval's --limit.
        num_fewshot: few-shot examples per prompt (default: each task's own setting, else 0).
        batch_size: requests per forward pass.
        device: where a model loaded from a path goes (default cuda when available); a live model stays put.
        include_path: folder(s) of extra task YAMLs (lm_eval's format), searched before the built-in tasks.
        bootstrap_iters: resamples for the stderr columns (lm_eval's 100000; 0 skips them).
        log_samples: keep every scored document in results["samples"].
        max_gen_toks: generation budget when a task gives none (lm_eval's 256).
        distributed: this process is one rank of a torch.distributed group that evaluates data-parallel.
        show_progress: tqdm bars per request type.
        seed: one seed for lm_eval's python / numpy / torch / few-shot generators (default: lm_eval's own, 0 / 1234 /
            1234 / 1234, so few-shot prompts are those of `lm_eval --model hf`). The caller's random states are
            restored afterwards, so evaluating inside a training run does not change its data order or dropout.
    Returns:
        lm_eval's results dict: "results" {task: {"<metric>,<filter>": value, "<metric>_stderr,<filter>": ...}},
        "groups", "configs", "versions", "n-shot", "higher_is_better", "n-samples", "config" (+ "samples").
        `metrics(results)` flattens it to {"<task>/<metric>": float}.
    Raises:
        EvaluationError (a ValueError) for a missing lm_eval install, an unknown task or a task YAML that does not
        parse; ValueError for a path that is not a model; the message names the fix.
    """
    harness = load_harness()
    from lm_eval import simple_evaluate
    from lm_eval.defaults import DEFAULT_OTHER_SEED, DEFAULT_RANDOM_SEED

    seeds = (DEFAULT_RANDOM_SEED, DEFAULT_OTHER_SEED) if seed is None else (seed, seed)
    states = _random_states()  # simple_evaluate seeds python / numpy / torch, and building tasks draws from them
    try:
        lm = harness.GPT2ForgeLM(model, tokenizer=tokenizer, batch_size=batch_size, device=device,
                                 max_gen_toks=max_gen_toks or harness.DEFAULT_MAX_GEN_TOKS, distributed=distributed,
                                 show_progress=show_progress)
        names = _task_names(tasks)
        with _quiet_lm_eval(show_progress):
            results = _with_task_manager(names, include_path, lambda task_manager: simple_evaluate(
                model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit, task_manager=task_manager,
                bootstrap_iters=bootstrap_iters, log_samples=log_samples, random_seed=seeds[0],
                numpy_random_seed=seeds[1], torch_random_seed=seeds[1], fewshot_random_seed=seeds[1],
            ))
    finally:
        _restore_random_states(states)
    if results is not None:
        results["config"]["model"] = harness.MODEL_NAME
        results["config"]["batch_size"] = batch_size
        results["config"]["device"] = str(lm.device)
        if not log_samples:
            results.pop("samples", None)
    return results


def offline_dataset_error(names: list[str], err: ConnectionError) -> FileNotFoundError:
    """The one sentence for lm_eval tasks `names` whose hub dataset is neither reachable nor in the datasets cache:
    the cache advice of data_pipelines.sources.hub_dataset_error, and a local task YAML as the alternative."""
    from data_pipelines.sources import hub_dataset_error

    return FileNotFoundError(hub_dataset_error(
        f"the dataset of lm_eval task(s) {', '.join(names)}", err,
        local="a task YAML of your own with dataset_path: json and local data files, loaded with --include-path / "
              "eval.include_path (python train/cli/sample_task.py writes one)"))


def metrics(results: dict[str, Any]) -> dict[str, float]:
    """{"<task>/<metric>": value} for every numeric metric of `results` (stderr columns left out); a filter other
    than lm_eval's "none" is appended: "gsm8k/exact_match_strict-match". What the training loop logs as eval/..."""
    out = {}
    for section in ("results", "groups"):
        for task, row in (results.get(section) or {}).items():
            for key, value in row.items():
                metric, _, filt = key.partition(",")
                if not filt or "_stderr" in metric or isinstance(value, bool) or not isinstance(value, (int, float)):
                    continue
                out[f"{task}/{metric}" if filt == "none" else f"{task}/{metric}_{filt}"] = float(value)
    return out


# ------------------------------------------------------------------------------------------------ tasks
def check_tasks(tasks: str | Sequence[str], include_path=None, *, option: str = "--include-path") -> list[str]:
    """The task names of `tasks`, once lm_eval is known to be installed and to know every one of them (a check up
    front, e.g. before a training run; the TaskManager it builds is reused by `evaluate`).

    `option`: what the messages call the include path ("eval.include_path" for the training config).
    Raises EvaluationError: lm_eval not installed, no task, an unknown task, a missing include path, or a task YAML
    there that does not parse (one sentence naming the fix).
    """
    load_harness()
    names = _task_names(tasks)
    next(_task_managers(names, include_path, option))  # the first manager that knows every name, else the error
    return names


def check_task_data(names: list[str], include_path=None, *, option: str = "--include-path") -> None:
    """Build lm_eval's task objects for `names` once, which loads their datasets (from the datasets cache, or the hub),
    so a task whose data cannot be had stops a training run before its first step instead of at its first
    evaluation, with the whole run's work lost. Raises FileNotFoundError (`offline_dataset_error`)."""
    from lm_eval.tasks import get_task_dict

    with _quiet_lm_eval(False):
        _with_task_manager(names, include_path, lambda task_manager: get_task_dict(names, task_manager), option)


def _with_task_manager(names: list[str], include_path, fn, option: str = "--include-path"):
    """fn(task_manager) with the first of `_task_managers` that builds `names`: the include path's alone, then the
    full index when an include-path task names a built-in one (lm_eval raises KeyError). A task's hub dataset that is
    offline and not in the datasets cache raises `offline_dataset_error` (FileNotFoundError)."""
    for task_manager in _task_managers(names, include_path, option):
        try:
            return fn(task_manager)
        except KeyError:
            if task_manager is _TASK_MANAGERS.get(_manager_key(include_path, True)):
                raise
        except ConnectionError as e:
            raise offline_dataset_error(names, e) from e


def _task_names(tasks: str | Sequence[str]) -> list[str]:
    items = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    names = [t.strip() for t in items if t and t.strip()]
    if not names:
        raise EvaluationError("no tasks given; pass e.g. --tasks hellaswag,lambada_openai.")
    return names


def _manager_key(include_path, defaults: bool) -> tuple:
    return tuple(str(p) for p in _include_paths(include_path)), defaults


def _manager(include_path, defaults: bool):
    """lm_eval's TaskManager over the include path (+ its built-in tasks with `defaults`), built once per process."""
    from lm_eval.tasks import TaskManager

    key = _manager_key(include_path, defaults)
    if key not in _TASK_MANAGERS:
        _TASK_MANAGERS[key] = TaskManager(include_path=list(key[0]) or None, include_defaults=defaults)
    return _TASK_MANAGERS[key]


def _task_managers(names: list[str], include_path, option: str = "--include-path"):
    """The TaskManager(s) to try for `names`: the include path alone when it defines every name (indexing lm_eval's
    built-in tasks costs ~10 s), then the full index. Raises EvaluationError for an unknown name or an include-path
    YAML that does not parse; `option` is what the messages call the include path."""
    paths = _include_paths(include_path, option)
    for p in paths:
        _check_yamls(p)

    def missing(tm) -> list[str]:
        return [n for n in names if not (n in tm.all_tasks or Path(n).is_file() or tm.match_tasks([n]))]

    if paths and not missing(tm := _manager(include_path, defaults=False)):
        yield tm
    tm = _manager(include_path, defaults=True)
    unknown = missing(tm)
    if unknown:
        where = f" or in {', '.join(map(str, paths))}" if paths else ""
        raise EvaluationError(
            f"unknown task {', '.join(repr(m) for m in unknown)}: not an lm_eval task, group or tag{where}; check "
            f"the spelling (`lm_eval ls tasks` lists them) or pass {option} with its YAML."
        )
    yield tm


def _include_paths(include_path, option: str = "--include-path") -> list[Path]:
    if include_path is None:
        return []
    items = [include_path] if isinstance(include_path, (str, os.PathLike)) else list(include_path)
    paths = []
    for item in items:
        for part in str(item).split(","):
            if part.strip():
                p = Path(part.strip()).expanduser()
                if not p.exists():
                    raise EvaluationError(f"{option} {p} does not exist; give a folder of task YAMLs.")
                paths.append(p.resolve())
    return paths


class _TaskYamlLoader:
    """yaml.SafeLoader that accepts lm_eval's custom tags (`!function utils.process_docs`) without running them."""

    @staticmethod
    def load(text: str) -> Any:
        import yaml

        class Loader(yaml.SafeLoader):
            pass

        Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
        return yaml.load(text, Loader=Loader)


def _check_yamls(root: Path) -> None:
    """Every *.yaml under an include path parses (lm_eval itself skips a broken one, and its task is then reported
    as unknown)."""
    import yaml

    files = [root] if root.is_file() else sorted(root.glob("**/*.yaml"))
    for f in files:
        try:
            _TaskYamlLoader.load(f.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            where = getattr(e, "problem_mark", None)
            at = f" at line {where.line + 1}" if where is not None else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise EvaluationError(f"task YAML {f} does not parse{at} ({problem}); fix it or remove it from the "
                                  f"include path.") from None


# ------------------------------------------------------------------------------------------------ side effects
def _random_states() -> tuple:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda


def _restore_random_states(states: tuple) -> None:
    py, npy, cpu, cuda = states
    random.setstate(py)
    np.random.set_state(npy)
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


class _quiet_lm_eval:
    """lm_eval logs every step at INFO; keep its warnings and errors only (unless progress is wanted)."""

    def __init__(self, verbose: bool):
        self.verbose = verbose

    def __enter__(self):
        self.logger = logging.getLogger("lm_eval")
        self.level = self.logger.level
        if not self.verbose:
            self.logger.setLevel(logging.WARNING)

    def __exit__(self, *exc):
        self.logger.setLevel(self.level)
        return False




def write_json(results: dict[str, Any], path: Path) -> Path:
    """lm_eval's results dict as JSON (its own encoder for numpy / non-serializable values), written atomically."""
    from lm_eval.utils import handle_non_serializable

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------------------------------------ during training
class HarnessEval(Callback):
    """lm_eval tasks on rank 0 every `every_n_steps` optimizer steps and at the end of training.

    Args:
        tokenizer: the run's `gpt2.GPT2TokenizerFast`.
        tasks: lm_eval task / group / tag names (checked up front by `check_tasks`).
        every_n_steps: optimizer steps between evaluations (step N evaluates when N % every_n_steps == 0).
        run_dir: the run directory; results JSON go to run_dir/eval/step-<N>.json.
        limit, num_fewshot, batch_size, include_path, max_gen_toks: as `train.eval.evaluate.evaluate` (lm_eval's terms).
        at_end: also evaluate the last step of a finished run when it is not a multiple of every_n_steps (like the
            final validation); a run stopped early (preemption) is not finished and is not evaluated.
    After fit, `evaluated` lists the steps evaluated by this process and `last_metrics` the newest eval/... values.
    """

    def __init__(self, tokenizer: Any, tasks: list[str], every_n_steps: int, run_dir: str | os.PathLike, *,
                 limit: Optional[int | float] = None, num_fewshot: Optional[int] = None, batch_size: int = 8,
                 include_path: Optional[str] = None, max_gen_toks: Optional[int] = None,
                 at_end: bool = True):
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps={every_n_steps} must be >= 1.")
        self.tokenizer = tokenizer
        self.tasks = list(tasks)
        self.every_n_steps = every_n_steps
        self.run_dir = Path(run_dir)
        self.kwargs = dict(limit=limit, num_fewshot=num_fewshot, batch_size=batch_size, include_path=include_path,
                           max_gen_toks=max_gen_toks)
        self.at_end = at_end
        self.evaluated: list[int] = []
        self.last_metrics: dict[str, float] = {}
        self._last_step = -1

    def on_train_start(self, trainer, pl_module) -> None:
        self._last_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self._last_step:  # inside an accumulation window
            return
        self._last_step = step
        if step % self.every_n_steps == 0:
            self.run(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        step = trainer.global_step
        finished = trainer.max_steps is not None and 0 < trainer.max_steps <= step
        if self.at_end and finished and step not in self.evaluated:
            self.run(trainer, pl_module)

    # -- one evaluation: every rank calls it (the weights may need gathering); rank 0 scores, logs and writes
    def run(self, trainer, pl_module) -> Optional[dict[str, float]]:
        step = trainer.global_step
        self.evaluated.append(step)
        log_train_step = getattr(pl_module, "log_train_step", None)
        if log_train_step is not None:
            log_train_step()  # the step's train row first: eval values merge into it
        was_training = pl_module.training
        model = eval_model(trainer, pl_module)  # every rank: FSDP2 / ZeRO-3 gather here
        values: Optional[dict[str, float]] = None
        error: Optional[str] = None
        if trainer.is_global_zero:
            try:
                values = self._evaluate_on_rank_zero(trainer, pl_module, model, step)
            except Exception as e:  # noqa: BLE001 - every rank must learn of it; rank 0 re-raises the original
                error = f"{type(e).__name__}: {e}"
                trainer.strategy.broadcast(error, src=0)
                raise
        error = trainer.strategy.broadcast(error, src=0)  # the other ranks wait here for rank 0's outcome
        if error is not None:
            raise RuntimeError(f"the in-training evaluation at step {step} failed on rank 0 ({error}).")
        pl_module.train(was_training)
        for cb in trainer.callbacks:  # the evaluation's time is not training throughput
            restart = getattr(cb, "restart_interval", None)
            if restart is not None:
                restart()
        return values

    def summary_fields(self) -> dict[str, Any]:
        """{"eval": {"step": N, "eval/<task>/<metric>": value, ...}} of the newest evaluation (rank 0); {} before."""
        return {"eval": {"step": self.evaluated[-1], **self.last_metrics}} if self.last_metrics else {}

    def _evaluate_on_rank_zero(self, trainer, pl_module, model, step: int) -> dict[str, float]:
        t0 = time.perf_counter()
        # bootstrap_iters=0: the stderr columns cost seconds to minutes per task and are not logged
        results = evaluate(model, self.tokenizer, self.tasks, bootstrap_iters=0, **self.kwargs)
        seconds = time.perf_counter() - t0
        values = {f"eval/{k}": v for k, v in metrics(results).items()}
        results["config"]["global_step"] = step
        write_json(results, self.run_dir / "eval" / f"step-{step}.json")
        # to every logger at this step, then flushed: row N is on disk before checkpoint N is published
        emit = getattr(pl_module, "emit_metrics", None)  # GPT2LitModule's: every logger, and last_logged
        if emit is not None:
            emit(values, step)
        else:
            for logger in trainer.loggers:
                logger.log_metrics(values, step=step)
        for logger in trainer.loggers:
            if hasattr(logger, "flush"):
                logger.flush()
        self.last_metrics = values
        shown = ", ".join(f"{k.removeprefix('eval/')}={v:.4g}" for k, v in values.items())
        log.info("eval at step %d (%.1f s): %s", step, seconds, shown)
        return values


def check_eval(eval_cfg, task_name: str) -> None:
    """Refuse up front, before any data is prepared, what cannot evaluate: a task without an LM head, lm_eval not
    installed, an unknown task name, a missing include path or a task YAML there that does not parse, a task whose
    dataset cannot be loaded (`check_task_data`). Raises ConfigError or FileNotFoundError (one sentence naming the
    fix). Builds the task index `HarnessEval` reuses (~10 s for lm_eval's
    built-in tasks; a task list that the include path alone defines skips it)."""
    from train.config import ConfigError

    if task_name != "lm":
        raise ConfigError(f"eval.tasks scores a language model, and task={task_name} trains a fine-tuning head; "
                          f"drop eval.tasks, or evaluate with task=lm.")
    try:
        names = check_tasks(eval_cfg.tasks, eval_cfg.include_path, option="eval.include_path")
    except EvaluationError as e:
        raise ConfigError(f"eval.tasks: {e}") from None
    check_task_data(names, eval_cfg.include_path, option="eval.include_path")


def build_eval(eval_cfg, tokenizer: Any, run_dir: Path, val_check_interval: int, fast_dev_run: bool = False):
    """The `eval` group -> a `HarnessEval` (None while eval.tasks is empty). every_n_steps=null follows the validation
    cadence; under trainer.fast_dev_run one document per task at the end (a smoke test of the wiring, as Lightning's
    fast_dev_run runs one batch of each loop)."""
    from train.config import ConfigError

    if not eval_cfg.tasks:
        return None
    if tokenizer is None:
        raise ConfigError("eval.tasks needs the run's tokenizer to turn task text into ids, and this run has "
                          "none (pre-tokenized data=tokens); set data.tokenizer=<tokenizer dir> or drop "
                          "eval.tasks.")
    return HarnessEval(tokenizer, eval_cfg.tasks, eval_cfg.every_n_steps or val_check_interval, run_dir,
                       limit=1 if fast_dev_run else eval_cfg.limit, num_fewshot=eval_cfg.num_fewshot,
                       batch_size=eval_cfg.batch_size, include_path=eval_cfg.include_path,
                       max_gen_toks=eval_cfg.max_gen_toks)


def eval_model(trainer, pl_module):
    """The network to score, on rank 0 (None elsewhere): the live `pl_module.model` where every rank holds a full
    replica (single device, DDP, DeepSpeed ZeRO-1/2); under FSDP2 and ZeRO-3 the plain copy of the gathered full
    weights that the export uses (`train.strategies.model_for_export`; call on every rank: the gather is a
    collective), moved to the training device in the dtype of the trained parameters."""
    from train.strategies import model_for_export

    net = model_for_export(trainer, pl_module)
    if net is None or net is pl_module.model:
        return net
    dtype = next(pl_module.model.parameters()).dtype  # the sharded parameters' dtype = the gathered weights'
    return net.to(device=pl_module.device, dtype=dtype).eval()


__all__ = ["EvaluationError", "HarnessEval", "build_eval", "check_eval", "check_task_data", "check_tasks", "eval_model",
           "evaluate", "load_harness", "metrics", "offline_dataset_error", "write_json"]
