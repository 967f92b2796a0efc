"""Exports of real (tiny) runs work in transformers as they are, with no warning (issue 13, kind 2).

One short LM run on the embedded corpus and one fine-tuning run per head (from the LM's export) give the run
directories' hf/ folders; transformers then runs them the way its users do — the text-generation, text-classification
and token-classification pipelines with batch_size=2, AutoModelForQuestionAnswering (transformers 5 removed the
question-answering pipeline) and GPT2DoubleHeadsModel directly, and lm-evaluation-harness' hf backend — with padding
and truncation, and every result equals ours. Any warning (Python's, or a logged one from transformers or
lm-evaluation-harness) fails the test.
"""

from __future__ import annotations

import json
import logging
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

import gpt2
from train.config import register_configs
from train.job import train
from helpers import compose_config

transformers = pytest.importorskip("transformers")
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("single_thread")]

ROOT = Path(__file__).resolve().parents[1]
register_configs()
TEXTS = ["This module provides functions for working with paths.",
         "Return the value of the named attribute of object; if the attribute does not exist, the default is returned."]
STEPS = ["trainer.max_steps=4", "trainer.val_check_interval=4", "trainer.limit_val_batches=1",
         "checkpoint.every_n_steps=4"]


def run(run_dir: Path, cache: Path, *overrides: str) -> Path:
    cfg = compose_config([
        f"run_dir={run_dir}", f"data.cache_dir={cache}", f"task.data.cache_dir={cache}", "guard=off",
        "trainer.enable_progress_bar=false", "sample.max_new_tokens=4", *STEPS, *overrides])
    return Path(train(cfg)["hf_dir"])


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    """hf/ of an LM run and of a fine-tuning run per head (4 steps each: the point is the folder, not the skill)."""
    root, cache = tmp_path_factory.mktemp("runs"), tmp_path_factory.mktemp("cache")
    out = {"lm": run(root / "lm", cache, "data.block_size=32", "data.batch_size=4")}
    for task in ("cls", "token_cls", "qa", "mc"):
        out[task] = run(root / task, cache, f"task={task}", f"model.init_from={out['lm']}",
                        "task.data.demo_train_size=64", "task.data.demo_val_size=16", "task.data.batch_size=8")
    return out


@pytest.fixture(scope="module")
def long_text() -> str:
    """Longer than the tiny model's 256-token context, so truncation has to cut at model_max_length."""
    from data_pipelines.corpus import build_corpus

    return next(d for d in build_corpus() if len(d) > 4000)[:6000]


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(f"{record.name}: {record.getMessage()}")


@contextmanager
def no_warnings():
    """Fail on any Python warning or WARNING log record (transformers' own loggers do not propagate to the root, so
    the handler sits on theirs too) raised inside the block."""
    logging.Logger.warning_once.cache_clear()  # transformers' warn-once memory: a warning given earlier counts again
    handler = _Records()
    loggers = [logging.getLogger(name) for name in ("", "transformers", "lm_eval")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    found = [f"{w.category.__name__}: {w.message}" for w in caught] + handler.messages
    assert not found, found


def ours(cls_name: str, folder: Path):
    return getattr(gpt2, cls_name).from_pretrained(folder, dtype=torch.float32), gpt2.GPT2TokenizerFast.from_pretrained(
        folder)


def test_export_files_carry_pad_token_context_and_quiet_generation_config(exports):
    for task, folder in exports.items():
        cfg = json.loads((folder / "config.json").read_text())
        tok_cfg = json.loads((folder / "tokenizer_config.json").read_text())
        gen = json.loads((folder / "generation_config.json").read_text())
        assert tok_cfg["model_max_length"] == cfg["n_positions"] == 256, task
        pad_id = json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"].get(tok_cfg["pad_token"])
        assert pad_id == gen["pad_token_id"] == cfg["eos_token_id"], task
        if task != "lm":  # a fine-tuned head finds each row's last token by config.json's pad id
            assert cfg["pad_token_id"] == pad_id, task
        assert set(gen) == {"bos_token_id", "eos_token_id", "pad_token_id"}, task
        with no_warnings():
            tok = transformers.AutoTokenizer.from_pretrained(folder)
            enc = tok(TEXTS, padding=True, truncation=True)
        assert enc["input_ids"][0][-1] == pad_id and tok.model_max_length == 256


def test_text_generation_pipeline_and_generate(exports, long_text):
    folder = exports["lm"]
    prompts = [TEXTS[0], "If the", long_text[:300]]
    with no_warnings():
        pipe = transformers.pipeline("text-generation", model=str(folder))
        theirs = pipe(prompts, batch_size=2, max_new_tokens=8, do_sample=False)
        model, tok = transformers.AutoModelForCausalLM.from_pretrained(folder), pipe.tokenizer
        enc = tok(prompts[:2], padding=True, return_tensors="pt")  # the pipeline switched it to left padding
        generated = model.generate(**enc, max_new_tokens=6)
        assert len(tok(long_text, truncation=True)["input_ids"]) == 256  # cut at the model's context
    ours_pipe = gpt2.pipeline("text-generation", model=str(folder))
    assert ours_pipe(prompts, batch_size=2, max_new_tokens=8, do_sample=False) == theirs
    model_ours, _ = ours("GPT2LMHeadModel", folder)
    assert torch.equal(model_ours.generate(**enc, max_new_tokens=6), generated)


def test_text_classification_pipeline(exports, long_text):
    folder = exports["cls"]
    texts = [*TEXTS, long_text]  # the long one must be truncated at 256 tokens, else the model cannot run it
    with no_warnings():
        pipe = transformers.pipeline("text-classification", model=str(folder))
        theirs = pipe(texts, batch_size=2, truncation=True)
    model, tok = ours("GPT2ForSequenceClassification", folder)
    enc = tok(texts, padding=True, truncation=True, return_tensors="pt")
    assert enc["input_ids"].shape[1] == 256
    with torch.no_grad():
        probs = model(**enc).logits.softmax(-1)
    for row, result in zip(probs, theirs):
        assert result["label"] == model.config.id2label[int(row.argmax())]
        assert result["score"] == pytest.approx(float(row.max()), abs=1e-5)


def test_token_classification_pipeline(exports):
    folder = exports["token_cls"]
    with no_warnings():
        pipe = transformers.pipeline("token-classification", model=str(folder), aggregation_strategy="none",
                                     ignore_labels=[])
        theirs = pipe(TEXTS, batch_size=2)
    model, tok = ours("GPT2ForTokenClassification", folder)
    for text, tokens in zip(TEXTS, theirs):
        enc = tok(text, return_tensors="pt")
        with torch.no_grad():
            probs = model(**enc).logits.softmax(-1)[0]  # (T, num_labels)
        assert [t["index"] for t in tokens] == list(range(enc["input_ids"].shape[1]))
        for t in tokens:
            assert t["entity"] == model.config.id2label[int(probs[t["index"]].argmax())]
            assert t["score"] == pytest.approx(float(probs[t["index"]].max()), abs=1e-5)


def test_question_answering_model_with_pairs_padding_truncation(exports, long_text):
    folder = exports["qa"]
    questions, contexts = ["What does the module provide?", "What is returned?"], [TEXTS[0], long_text]
    with no_warnings():
        tok = transformers.AutoTokenizer.from_pretrained(folder)
        model = transformers.AutoModelForQuestionAnswering.from_pretrained(folder)
        enc = tok(questions, contexts, padding=True, truncation="only_second", return_tensors="pt")
        with torch.no_grad():
            theirs = model(**enc)
    assert enc["input_ids"].shape == (2, 256)
    model_ours, tok_ours = ours("GPT2ForQuestionAnswering", folder)
    enc_ours = tok_ours(questions, contexts, padding=True, truncation="only_second", return_tensors="pt")
    assert all(torch.equal(enc[k], enc_ours[k]) for k in ("input_ids", "attention_mask"))
    with torch.no_grad():
        out = model_ours(**enc_ours)
    torch.testing.assert_close(out.start_logits, theirs.start_logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(out.end_logits, theirs.end_logits, atol=1e-4, rtol=0)


def test_double_heads_model_with_padded_choices(exports):
    folder = exports["mc"]
    choices = ["The module provides paths.", "The module provides nothing at all, ever.", "Paths.", "It returns."]
    with no_warnings():
        tok = transformers.AutoTokenizer.from_pretrained(folder)
        model = transformers.GPT2DoubleHeadsModel.from_pretrained(folder)
        enc = tok(choices, padding=True, return_tensors="pt")
        mc_token_ids = (enc["attention_mask"].sum(-1) - 1)[None]  # each choice's last real token
        inputs = {k: v[None] for k, v in enc.items()}  # (1, n_choices, T)
        with torch.no_grad():
            theirs = model(**inputs, mc_token_ids=mc_token_ids)
    model_ours, _ = ours("GPT2DoubleHeadsModel", folder)
    with torch.no_grad():
        out = model_ours(**inputs, mc_token_ids=mc_token_ids)
    torch.testing.assert_close(out.mc_logits, theirs.mc_logits, atol=1e-4, rtol=0)
    real = enc["attention_mask"].bool()
    torch.testing.assert_close(out.logits[0][real], theirs.logits[0][real], atol=1e-4, rtol=0)


def test_lm_evaluation_harness_hf_backend_loads_the_export(exports):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    folder = exports["lm"]
    requests = [("This module", " provides functions."), ("If the", " value is None, the default is used.")]
    with no_warnings():
        lm = HFLM(pretrained=str(folder), device="cpu", batch_size=2)
        theirs = lm.loglikelihood([Instance(request_type="loglikelihood", doc={}, arguments=r, idx=i)
                                   for i, r in enumerate(requests)], disable_tqdm=True)
    model, tok = ours("GPT2LMHeadModel", folder)
    for (context, continuation), (logprob, greedy) in zip(requests, theirs):
        ctx, cont = tok.encode(context), tok.encode(continuation)
        with torch.no_grad():
            logp = model(torch.tensor([ctx + cont])).logits[0, len(ctx) - 1: -1].log_softmax(-1)  # (len(cont), V)
        assert logprob == pytest.approx(float(logp[range(len(cont)), cont].sum()), abs=1e-3)
        assert greedy == bool((logp.argmax(-1) == torch.tensor(cont)).all())
    assert lm_eval.__version__


# ------------------------------------------------------------------------------------------------ training's layout
def training_data(folder: Path, task: str):
    """The run's task data encoded as training encoded it: the run's tokenizer/ and its config.yaml's task.data."""
    from omegaconf import OmegaConf

    from data_pipelines.tasks import TaskDataModule

    run_dir = folder.parent
    cfg = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml").task.data)
    dm = TaskDataModule(task, cfg, gpt2.GPT2TokenizerFast.from_pretrained(run_dir / "tokenizer"))
    dm.prepare_data()
    dm.setup()
    return dm


def test_token_cls_export_gives_training_ids_and_predictions_to_pre_split_words_and_the_pipeline(exports):
    folder = exports["token_cls"]
    dm = training_data(folder, "token_cls")
    with no_warnings():
        tok = transformers.AutoTokenizer.from_pretrained(folder)
        model = transformers.AutoModelForTokenClassification.from_pretrained(folder)
        pipe = transformers.pipeline("token-classification", model=str(folder), aggregation_strategy="none",
                                     ignore_labels=[])
    trained, _ = ours("GPT2ForTokenClassification", folder)
    checked = 0
    for example, feature in zip(dm.val_examples, dm.val_features):
        enc = tok(example["tokens"], is_split_into_words=True, return_tensors="pt")
        if enc["input_ids"].shape[1] > len(feature["input_ids"]):
            continue  # cut at max_length in training
        assert enc["input_ids"][0].tolist() == feature["input_ids"]  # a space before every word, the first too
        with torch.no_grad():
            want = trained(torch.tensor([feature["input_ids"]])).logits.argmax(-1)[0]
            got = model(**enc).logits.argmax(-1)[0]
        assert torch.equal(got, want)
        piped = pipe(" ".join(example["tokens"]))  # the pipeline tokenizes the sentence: the same ids
        assert [t["entity"] for t in piped] == [model.config.id2label[int(i)] for i in want]
        checked += 1
    assert checked >= 10


def test_qa_export_gives_training_windows_and_spans_to_tokenizer_question_context(exports):
    folder = exports["qa"]
    dm = training_data(folder, "qa")
    with no_warnings():
        tok = transformers.AutoTokenizer.from_pretrained(folder)
        model = transformers.AutoModelForQuestionAnswering.from_pretrained(folder)
    trained, _ = ours("GPT2ForQuestionAnswering", folder)
    windows = [f["example_index"] for f in dm.val_features]
    checked = 0
    for feature in dm.val_features:
        example = dm.val_examples[feature["example_index"]]
        if windows.count(feature["example_index"]) > 1 or len(tok(example["question"])["input_ids"]) > \
                dm.cfg.max_question_length:
            continue  # a context cut into windows, or a question cut in training
        enc = tok(example["question"], example["context"], return_tensors="pt")  # transformers' documented call
        assert enc["input_ids"][0].tolist() == feature["input_ids"]  # [question][eos][context]
        with torch.no_grad():
            want = trained(torch.tensor([feature["input_ids"]]))
            got = model(**enc)
        assert int(got.start_logits.argmax()) == int(want.start_logits.argmax())
        assert int(got.end_logits.argmax()) == int(want.end_logits.argmax())
        checked += 1
    assert checked >= 10


def test_mc_export_lays_out_a_choice_as_training_did(exports):
    folder = exports["mc"]
    dm = training_data(folder, "mc")
    with no_warnings():
        tok = transformers.AutoTokenizer.from_pretrained(folder)
    example, feature = dm.val_examples[0], dm.val_features[0]
    enc = tok([example["context"]] * len(example["endings"]), [" " + e for e in example["endings"]])
    assert enc["input_ids"] == feature["input_ids"]  # context, " " + ending, eos
    assert [len(ids) - 1 for ids in enc["input_ids"]] == feature["mc_token_ids"]


def test_export_cli_gives_a_checkpoint_the_runs_tokenizer_layout(exports, tmp_path):
    from train.cli.export import main

    for task in ("token_cls", "qa", "mc"):
        assert main([str(exports[task].parent), str(tmp_path / task)]) == 0
        for name in ("tokenizer.json", "tokenizer_config.json"):
            assert (tmp_path / task / name).read_text() == (exports[task] / name).read_text(), (task, name)
