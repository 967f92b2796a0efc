"""train/cli/evaluate.py: lm-evaluation-harness tasks scored with our model give lm_eval's own `hf` backend's numbers.

A tiny model is trained for a few hundred steps (train(cfg), ~10 s) on made-up facts ("alice lives in paris."), so
that it gets some answers right and some wrong; four local tasks of lm_eval's four output types are built from the same
facts at run time (`dataset_path: json`, no network). Ours and lm_eval's `hf` backend (transformers) score the same
hf/ export with the same batch size.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import compose_config

pytest.importorskip("lm_eval")

from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

import train.cli.evaluate as ev_cli  # noqa: E402
import train.eval.evaluate as ev  # noqa: E402
from train.config import register_configs  # noqa: E402
from train.eval.harness import GPT2ForgeLM, load_model  # noqa: E402
from train.job import train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
register_configs()

NAMES = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy", "mallory", "oscar",
         "peggy", "rupert", "sybil", "trent", "victor", "walter"]
CITIES = ["paris", "rome", "oslo", "lima", "cairo", "delhi", "tokyo", "quito", "dakar", "hanoi", "kyiv", "bern"]
FOODS = ["tea", "rice", "bread", "soup", "fish", "figs"]
CITY = {n: CITIES[i % len(CITIES)] for i, n in enumerate(NAMES)}
FOOD = {n: FOODS[i * 5 % len(FOODS)] for i, n in enumerate(NAMES)}
TASKS = ["forge_mc", "forge_ll", "forge_roll", "forge_gen"]
N_POSITIONS = 64
BATCH = 4


def facts(n: int, seed: int) -> str:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        p = rng.choice(NAMES)
        out.append(rng.choice([f"{p} lives in {CITY[p]}.", f"{p} likes {FOOD[p]}.", f"in {CITY[p]} {p} eats {FOOD[p]}."]))
    return " ".join(out)


def write_tasks(d: Path, cache: Path) -> Path:
    """forge_mc (multiple_choice), forge_ll (loglikelihood), forge_roll (loglikelihood_rolling, one document ~9x
    n_positions), forge_gen (greedy generate_until, 2-shot, stop at ".") as lm_eval YAMLs + JSONL files in `d`."""
    d.mkdir(parents=True, exist_ok=True)
    rng = random.Random(1)
    mc = []
    for n in NAMES:
        choices = rng.sample([c for c in CITIES if c != CITY[n]], 2) + [CITY[n]]
        rng.shuffle(choices)
        mc.append({"query": f"{n} lives in", "choices": [" " + c for c in choices], "gold": choices.index(CITY[n])})
    rows = {
        "mc": mc,
        "ll": [{"text": f"{n} likes {FOOD[n]}"} for n in NAMES],
        "roll": [{"page": facts(k, s)} for s, k in enumerate([2, 7, 30, 90])],
        "gen": [{"question": ("so " if i % 3 == 0 else "") + f"{n} lives in", "answer": CITY[n]}
                for i, n in enumerate(NAMES)],
        "gen_shots": [{"question": f"{n} likes", "answer": FOOD[n]} for n in NAMES[:6]],
    }
    for name, docs in rows.items():
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in docs))

    def data(*splits: str) -> str:
        files = "".join(f"    {s}: {d / (f + '.jsonl')}\n" for s, f in splits)
        return f"dataset_path: json\ndataset_kwargs:\n  cache_dir: {cache}\n  data_files:\n{files}test_split: test\n"

    (d / "forge_mc.yaml").write_text("task: forge_mc\n" + data(("test", "mc")) + """output_type: multiple_choice
doc_to_text: "{{query}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{gold}}"
target_delimiter: ""
metric_list:
  - metric: acc
  - metric: acc_norm
""")
    (d / "forge_ll.yaml").write_text("task: forge_ll\n" + data(("test", "ll")) + """output_type: loglikelihood
doc_to_text: "{{text.split(' ')[:-1]|join(' ')}}"
doc_to_target: "{{' '+text.split(' ')[-1]}}"
metric_list:
  - metric: perplexity
  - metric: acc
""")
    (d / "forge_roll.yaml").write_text("task: forge_roll\n" + data(("test", "roll")) + """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{page}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
""")
    (d / "forge_gen.yaml").write_text("task: forge_gen\n" + data(("test", "gen"), ("train", "gen_shots")) + """\
output_type: generate_until
fewshot_split: train
num_fewshot: 2
doc_to_text: "{{question}}"
doc_to_target: "{{answer}}"
generation_kwargs:
  until: ["."]
  max_gen_toks: 10
  do_sample: false
filter_list:
  - name: strip
    filter:
      - function: remove_whitespace
      - function: take_first
metric_list:
  - metric: exact_match
""")
    return d


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A trained tiny run (checkpoints/ + hf/) and the four task YAMLs."""
    root = tmp_path_factory.mktemp("eval")
    corpus = root / "facts.txt"
    corpus.write_text("\n".join(facts(40, s) for s in range(200)))
    run_dir = root / "run"
    overrides = [
        "data=text", f"data.path={corpus}", f"data.cache_dir={root / 'cache'}", "data.vocab_size=320",
        "data.block_size=32", "data.batch_size=16", "data.val_fraction=0.1",
        "model.n_layer=2", "model.n_head=2", "model.n_embd=64", f"model.n_positions={N_POSITIONS}",
        "trainer.max_steps=200", "trainer.val_check_interval=200", "trainer.limit_val_batches=1",
        "trainer.log_every_n_steps=50", "trainer.enable_progress_bar=false", "checkpoint.every_n_steps=200",
        "optim.lr=1e-2", "optim.warmup_steps=5", "sample.max_new_tokens=4", f"run_dir={run_dir}",
    ]
    cfg = compose_config(overrides)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 64-wide model gains nothing from a second thread on a shared 2-core machine
    try:
        train(cfg)
        tasks = write_tasks(root / "tasks", root / "datasets")
        yield {"run": run_dir, "hf": run_dir / "hf", "step": run_dir / "checkpoints" / "step-200", "tasks": tasks}
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def both(world):
    """(ours, hf): lm_eval results of our backend and lm_eval's `hf` backend on the same export, every sample kept."""
    ours = ev.evaluate(str(world["hf"]), tasks=TASKS, include_path=world["tasks"], batch_size=BATCH, device="cpu",
                       bootstrap_iters=0, log_samples=True)
    task_manager = TaskManager(include_path=str(world["tasks"]), include_defaults=False)
    hf = simple_evaluate(model="hf", model_args={"pretrained": str(world["hf"]), "dtype": "float32"}, tasks=TASKS,
                         device="cpu", batch_size=BATCH, task_manager=task_manager, bootstrap_iters=0)
    return ours, hf


def per_doc(results: dict, task: str) -> dict[int, dict]:
    return {s["doc_id"]: s for s in results["samples"][task]}


def test_metrics_equal_hf_backend_on_all_four_output_types(both):
    ours, hf = both
    got, want = ev.metrics(ours), ev.metrics(hf)
    assert set(got) == set(want) == {
        "forge_mc/acc", "forge_mc/acc_norm", "forge_ll/perplexity", "forge_ll/acc", "forge_roll/word_perplexity",
        "forge_roll/byte_perplexity", "forge_roll/bits_per_byte", "forge_gen/exact_match_strip"}
    for key, value in want.items():
        if "perplexity" in key or "bits_per_byte" in key:
            assert got[key] == pytest.approx(value, rel=1e-4), key
        else:
            assert got[key] == value, key  # accuracy and exact match: equal
    # the model learnt some facts and not others, so the equalities above are not between two trivial scores
    assert 0 < got["forge_gen/exact_match_strip"] < 1 and 1 / 3 < got["forge_mc/acc"]
    assert ours["n-shot"]["forge_gen"] == 2 and ours["config"]["model"] == "gpt2-forge"


def test_every_request_equals_hf_backend(both):
    """Per document: multiple-choice and loglikelihood log-probs within 1e-4 relative with equal is-greedy flags,
    rolling log-likelihoods within 1e-4, generated strings identical (left-padded batches, stop at ".")."""
    ours, hf = both
    for task in ("forge_mc", "forge_ll", "forge_roll"):
        a, b = per_doc(ours, task), per_doc(hf, task)
        assert a.keys() == b.keys()
        for doc_id in a:
            for (ra,), (rb,) in zip(a[doc_id]["resps"], b[doc_id]["resps"], strict=True):
                if task == "forge_roll":
                    assert ra == pytest.approx(rb, rel=1e-4)
                else:
                    assert ra[0] == pytest.approx(rb[0], rel=1e-4, abs=1e-6) and ra[1] == rb[1], (task, doc_id)
    a, b = per_doc(ours, "forge_gen"), per_doc(hf, "forge_gen")
    assert [a[i]["resps"] for i in sorted(a)] == [b[i]["resps"] for i in sorted(b)]
    assert any(s["resps"][0][0].strip() == s["target"] for s in a.values())


def test_long_document_is_scored_in_sliding_windows_like_hf(both, world):
    ours, hf = both
    _, tok, _, _ = load_model(world["hf"])
    docs = per_doc(ours, "forge_roll")
    longest = max(docs, key=lambda i: len(docs[i]["doc"]["page"]))
    n_tokens = len(tok.encode(docs[longest]["doc"]["page"]))
    assert n_tokens > 5 * N_POSITIONS  # several windows
    ll_ours, ll_hf = docs[longest]["resps"][0][0], per_doc(hf, "forge_roll")[longest]["resps"][0][0]
    assert ll_ours == pytest.approx(ll_hf, rel=1e-4)
    assert -ll_ours / n_tokens < math.log(320)  # every token scored once, better than uniform over the vocabulary


@pytest.fixture(scope="module")
def two_backends(world):
    from lm_eval.models.huggingface import HFLM

    ours = GPT2ForgeLM(str(world["hf"]), batch_size=3, device="cpu", show_progress=False)
    hf = HFLM(pretrained=str(world["hf"]), batch_size=3, device="cpu", dtype="float32")
    return ours, hf


def requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def test_edge_cases_of_tokenization_and_truncation_equal_hf_backend(two_backends):
    """The corners of HFLM's request handling: an empty context (scored after the prefix token), trailing spaces
    moved into the continuation, a context that starts with <|endoftext|>, inputs longer than n_positions cut from the
    left, one-token continuations sharing a context, and prompts longer than n_positions - max_gen_toks."""
    ours, hf = two_backends
    long_ctx = facts(30, 7)  # ~180 tokens > n_positions = 64
    ll = requests("loglikelihood", [
        ("", "alice lives in paris."), ("alice lives in ", "paris."), ("bob likes", " tea"), ("bob likes", " fish"),
        ("<|endoftext|>carol", " lives in"), (long_ctx, " dave likes soup."), (long_ctx, " so"), ("in", " rome"),
    ])
    for (a, ga), (b, gb) in zip(ours.loglikelihood(ll), hf.loglikelihood(ll, disable_tqdm=True), strict=True):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-5) and ga == gb
    gen = requests("generate_until", [
        (long_ctx + " erin lives in", {"until": ["."], "max_gen_toks": 8, "do_sample": False}),
        ("frank", {"until": [" in", "."], "max_gen_toks": 6}),
        ("so grace lives in", {"until": ["."], "max_gen_toks": 8, "do_sample": False}),
        ("heidi likes", {"until": ["\n"], "max_gen_toks": 4}),
    ])
    assert ours.generate_until(gen) == hf.generate_until(gen, disable_tqdm=True)
    roll = requests("loglikelihood_rolling", [(facts(n, n),) for n in (1, 10, 25)])
    for a, b in zip(ours.loglikelihood_rolling(roll), hf.loglikelihood_rolling(roll, disable_tqdm=True), strict=True):
        assert a == pytest.approx(b, rel=1e-4)


def test_live_model_in_training_keeps_its_mode_and_the_random_state(world, both):
    """What the training loop hands over: a live model + tokenizer. Same numbers as from the folder; the model is
    back in train mode and the global RNGs are untouched (simple_evaluate seeds them), so a resumed run is unchanged."""
    model, tok, _, _ = load_model(world["step"])
    model.train()
    torch.manual_seed(123)
    random.seed(123)
    before = torch.get_rng_state(), random.getstate()
    res = ev.evaluate(model, tok, "forge_mc,forge_ll", include_path=world["tasks"], batch_size=BATCH, bootstrap_iters=0)
    assert model.training and all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[1]
    ours_from_folder = ev.metrics(both[0])
    for key, value in ev.metrics(res).items():  # the checkpoint of step 200 is the export
        assert value == pytest.approx(ours_from_folder[key], rel=1e-5), key
    assert set(ev.metrics(res)) == {"forge_mc/acc", "forge_mc/acc_norm", "forge_ll/perplexity", "forge_ll/acc"}


def test_model_paths_resolve(world, tmp_path):
    run, hf, step = world["run"], world["hf"], world["step"]
    assert load_model(run)[2:] == (step, run)  # run dir -> newest checkpoint
    assert load_model(run / "checkpoints")[2:] == (step, run)
    assert load_model(step)[2:] == (step, run)
    assert load_model(hf)[2:] == (hf, run)  # a run's export belongs to the run
    lone = tmp_path / "copy"  # a run dir without checkpoints: its hf/ export
    (lone / "hf").mkdir(parents=True)
    for f in hf.iterdir():
        (lone / "hf" / f.name).write_bytes(f.read_bytes())
    model, _, resolved, run_dir = load_model(lone)
    assert (resolved, run_dir) == (lone / "hf", lone)
    assert ev_cli.default_output(resolved, run_dir).parent == lone / "eval"
    assert ev_cli.default_output(hf, None).parent == hf / "eval"  # a standalone HF folder: beside its weights


def test_cli_prints_lm_eval_table_and_writes_json_into_the_run(world, capsys):
    """A run's hf/ export is evaluated into the run's eval/ folder (run dirs and checkpoints: test_model_paths_resolve;
    the script itself runs in test_data_parallel_over_two_processes_equals_one)."""
    rc = ev_cli.main([str(world["hf"]), "--tasks", "forge_mc,forge_gen", "--include-path", str(world["tasks"]),
                  "--limit", "6", "--num-fewshot", "1", "--batch-size", "3", "--device", "cpu",
                  "--bootstrap-iters", "0"])
    out, err = capsys.readouterr()
    assert rc == 0, err[-3000:]
    assert "|Tasks|Version|Filter|n-shot|Metric|" in out.replace(" ", "")  # lm_eval's make_table
    assert "forge_mc" in out and "exact_match" in out
    path = Path(out.strip().splitlines()[-1].removeprefix("results: "))
    assert path.parent == world["run"] / "eval" and path.suffix == ".json"
    res = json.loads(path.read_text())
    assert res["config"]["model_source"] == str(world["hf"]) and res["config"]["limit"] == 6
    assert res["n-shot"]["forge_mc"] == 1 and res["n-samples"]["forge_mc"]["effective"] == 6
    assert "samples" not in res


def test_data_parallel_over_two_processes_equals_one(world, both, tmp_path):
    """torchrun --nproc-per-node=2 (gloo on CPU, as NCCL on a GPU node): each rank scores half of the documents and
    rank 0 writes the gathered results, equal to the single-process run. 0-shot tasks: lm_eval draws few-shot
    examples from one random stream per task and process, so under data parallelism each rank's shots differ from a
    single process's (any lm_eval backend)."""
    out = tmp_path / "dp.json"
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         str(ROOT / "train" / "cli" / "evaluate.py"), str(world["hf"]), "--tasks", "forge_mc,forge_ll,forge_roll",
         "--include-path", str(world["tasks"]), "--batch-size", str(BATCH), "--device", "cpu",
         "--bootstrap-iters", "0", "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
        env=dict(os.environ, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1"),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("results: ") == 1  # rank 0 alone reports
    got, single = ev.metrics(json.loads(out.read_text())), ev.metrics(both[0])
    assert set(got) == {k for k in single if k.split("/")[0] in ("forge_mc", "forge_ll", "forge_roll")}
    for key, value in got.items():
        assert value == pytest.approx(single[key], rel=1e-5), key


def run_main(capsys, *argv: str) -> tuple[int, str]:
    rc = ev_cli.main(list(argv))
    err = capsys.readouterr().err.strip()
    return rc, err


def test_bad_inputs_are_one_clear_sentence(world, tmp_path, capsys, monkeypatch):
    tasks = ("--tasks", "forge_mc", "--include-path", str(world["tasks"]), "--device", "cpu")
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "notes.txt").write_text("hello")
    broken = tmp_path / "broken_tasks"
    broken.mkdir()
    (broken / "mine.yaml").write_text("task: mine\ndoc_to_text: [unclosed\n")
    cases = [
        ((str(world["hf"]), "--tasks", "no_such_task_xyz", "--include-path", str(world["tasks"])), "unknown task"),
        ((str(world["hf"]), "--tasks", "mine", "--include-path", str(broken)), "mine.yaml does not parse at line"),
        ((str(empty), *tasks), "is not a model"),
        ((str(tmp_path / "notes.txt"), *tasks), "is not a model"),
        ((str(tmp_path / "missing"), *tasks), "does not exist"),
        ((str(world["hf"]), "--tasks", "forge_mc", "--include-path", str(tmp_path / "nowhere")), "does not exist"),
    ]
    for argv, needle in cases:
        rc, err = run_main(capsys, *argv)
        assert rc == 1 and needle in err and len(err.splitlines()) == 1, (argv, err)
        assert err.startswith("error: ") and "Traceback" not in err, err
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` raises ImportError: not installed
    rc, err = run_main(capsys, str(world["hf"]), *tasks)
    assert rc == 1 and "lm-evaluation-harness is not installed" in err and "pip install" in err, err


def test_registered_under_its_own_name(world):
    from lm_eval.api.registry import get_model

    cls = get_model("gpt2-forge")
    assert cls is GPT2ForgeLM
    lm = cls.create_from_arg_string(f"pretrained={world['hf']},batch_size=2", {"device": "cpu"})
    assert type(lm.model).__module__.startswith("gpt2.")  # our model, not transformers'
    assert lm.max_length == N_POSITIONS and lm.batch_size == 2


def test_generate_stopping_criteria_match_transformers(world):
    """gpt2 generate(stopping_criteria=...) finishes a row the way transformers' StoppingCriteria do."""
    transformers = pytest.importorskip("transformers")
    ours, tok, _, _ = load_model(world["hf"])
    theirs = transformers.GPT2LMHeadModel.from_pretrained(str(world["hf"])).eval()

    class AfterTwoOnRowZero(transformers.StoppingCriteria):
        def __init__(self, prompt_len):
            self.prompt_len = prompt_len

        def __call__(self, input_ids, scores, **kwargs):
            done = torch.zeros(input_ids.size(0), dtype=torch.bool)
            done[0] = input_ids.size(1) - self.prompt_len >= 2
            return done

    ids = torch.tensor([tok.encode("alice lives in"), tok.encode("bob lives in")])
    # with an eos id set, transformers pads the rows a criterion finished (as lm_eval's hf backend always runs it)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    a = ours.generate(ids, stopping_criteria=[AfterTwoOnRowZero(ids.size(1))], **kw)
    b = theirs.generate(ids, stopping_criteria=transformers.StoppingCriteriaList([AfterTwoOnRowZero(ids.size(1))]),
                        attention_mask=torch.ones_like(ids), **kw)
    assert torch.equal(a, b)
    assert (a[0, ids.size(1) + 2:] == tok.eos_token_id).all() and a.size(1) == ids.size(1) + 8
