"""Fine-tuning task data (data_pipelines/tasks): column mapping, label maps, token alignment, qa windows, mc
sequences, offline demo sets and the clear errors — on local files shaped like the usual hub datasets."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from helpers import corpus_text
from data_pipelines.tasks import DEFAULT_COLUMNS, TaskDataConfig, TaskDataModule, build_demo, demo_files
from data_pipelines.tasks.qa import window_starts
from gpt2.tokenizer import GPT2TokenizerFast, train_tokenizer
from train.tasks.qa import postprocess_qa, squad_metrics



@pytest.fixture(scope="module")
def tok() -> GPT2TokenizerFast:
    # a small vocabulary, so most words are several sub-tokens (what the alignment tests need)
    return train_tokenizer(iter([corpus_text(100_000)]), vocab_size=400)


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def make_dm(task, tok, tmp_path, train_rows, val_rows=None, **cfg) -> TaskDataModule:
    train = write_jsonl(tmp_path / "train.jsonl", train_rows)
    val = write_jsonl(tmp_path / "val.jsonl", val_rows if val_rows is not None else train_rows)
    dm = TaskDataModule(task, TaskDataConfig(source="jsonl", path=train, val_path=val, cache_dir=str(tmp_path / "c"),
                                             **cfg), tok)
    dm.prepare_data()
    dm.setup()
    return dm


# ------------------------------------------------------------------------------------------------ cls
def test_cls_string_labels_sorted_deterministic_and_label_list_order(tok, tmp_path):
    rows = [{"text": f"line {i}", "label": lab} for i, lab in enumerate(["neg", "pos", "neutral", "pos", "neg"])]
    dm = make_dm("cls", tok, tmp_path, rows)
    assert dm.label2id == {"neg": 0, "neutral": 1, "pos": 2} and dm.num_labels == 3
    assert dm.id2label == {0: "neg", 1: "neutral", 2: "pos"}
    assert [f["labels"] for f in dm.train_features] == [0, 2, 1, 2, 0]
    # the same labels in another row order give the same map (every rank / every run agrees)
    (tmp_path / "reversed").mkdir()
    dm2 = make_dm("cls", tok, tmp_path / "reversed", rows[::-1])
    assert dm2.label2id == dm.label2id
    dm3 = make_dm("cls", tok, tmp_path, rows, label_list=["pos", "neutral", "neg"])
    assert dm3.label2id == {"pos": 0, "neutral": 1, "neg": 2}
    assert [f["labels"] for f in dm3.train_features] == [2, 0, 1, 0, 2]
    assert dm.problem_type == "single_label_classification"


def test_cls_unknown_and_out_of_range_labels_are_named(tok, tmp_path):
    train = [{"text": "a b", "label": "pos"}, {"text": "c d", "label": "neg"}]
    with pytest.raises(ValueError, match=r"unknown label 'meh'.*known labels are \['neg', 'pos'\]"):
        make_dm("cls", tok, tmp_path, train, [{"text": "e", "label": "meh"}])
    ints = [{"text": "a", "label": 0}, {"text": "b", "label": 1}]
    with pytest.raises(ValueError, match=r"label 5 is out of range for 2 labels"):
        make_dm("cls", tok, tmp_path, ints, [{"text": "c", "label": 5}])
    with pytest.raises(ValueError, match=r"label 2 is out of range for 2 labels"):
        make_dm("cls", tok, tmp_path, ints + [{"text": "c", "label": 2}], num_labels=2)
    with pytest.raises(ValueError, match=r"unknown label 'neutral'"):
        make_dm("cls", tok, tmp_path, train + [{"text": "e", "label": "neutral"}], label_list=["neg", "pos"])
    with pytest.raises(ValueError, match="problem_type=regression"):
        make_dm("cls", tok, tmp_path, [{"text": "a", "label": 0.25}, {"text": "b", "label": 1.5}])


def test_cls_glue_shaped_file_regression_and_batches(tok, tmp_path):
    # GLUE/SST-2 shape: sentence / label / idx — found through the default candidates, no overrides
    rows = [{"sentence": "it is good", "label": 1, "idx": 0},
            {"sentence": "it is not good at all", "label": 0, "idx": 1}]
    dm = make_dm("cls", tok, tmp_path, rows)
    assert dm.num_labels == 2 and dm.id2label == {0: "0", 1: "1"}
    tok.pad_token = None  # GPT-2 has no pad token: the collator pads with eos
    batch = next(iter(dm.val_dataloader()))
    assert batch["labels"].tolist() == [1, 0] and batch["labels"].dtype == torch.long
    n0 = len(tok.encode("it is good"))
    assert batch["input_ids"][0, :n0].tolist() == tok.encode("it is good")
    assert (batch["input_ids"][0, n0:] == tok.eos_token_id).all()
    assert batch["attention_mask"][0].tolist() == [1] * n0 + [0] * (batch["input_ids"].shape[1] - n0)
    assert set(dm.model_inputs(batch)) == {"input_ids", "attention_mask", "labels"}
    reg = [{"text": "x y", "score": 0.5}, {"text": "z", "score": 3.25}]
    dm = make_dm("cls", tok, tmp_path, reg, label_column="score", problem_type="regression")
    assert dm.num_labels == 1 and dm.problem_type == "regression" and dm.id2label is None
    batch = next(iter(dm.val_dataloader()))
    assert batch["labels"].dtype == torch.float32 and batch["labels"].tolist() == [0.5, 3.25]


def test_missing_column_error_lists_available_columns(tok, tmp_path):
    rows = [{"review": "nice", "stars": 1}]
    msg = r"no text column 'text' or 'sentence' \(columns: review, stars\).*set data.text_column"
    with pytest.raises(ValueError, match=msg):
        make_dm("cls", tok, tmp_path, rows)
    with pytest.raises(ValueError, match=r"no label column 'rating' \(columns: review, stars\).*label_column"):
        make_dm("cls", tok, tmp_path, rows, text_column="review", label_column="rating")
    dm = make_dm("cls", tok, tmp_path, rows + [{"review": "bad", "stars": 0}], text_column="review",
                 label_column="stars")
    assert dm.num_labels == 2


# ------------------------------------------------------------------------------------------------ token_cls
def test_token_labels_on_first_subtoken_match_transformers_split_words(tok, tmp_path):
    words = ["Thy", "kingdom", "overflows", "with", "gloriousness", "."]
    tags = ["B-LOC", "I-LOC", "O", "O", "B-MISC", "O"]
    dm = make_dm("token_cls", tok, tmp_path, [{"tokens": words, "tags": tags}])
    assert dm.id2label == {0: "B-LOC", 1: "B-MISC", 2: "I-LOC", 3: "O"}
    f = dm.train_features[0]
    pieces = [tok.encode(" " + w) for w in words]  # every word, the first too, with a leading space
    assert any(len(p) > 1 for p in pieces)  # the test means something only with multi-token words
    assert f["input_ids"] == [i for p in pieces for i in p]
    expected = []
    for p, t in zip(pieces, tags):
        expected += [dm.label2id[t]] + [-100] * (len(p) - 1)
    assert f["labels"] == expected
    # the same ids and word boundaries as transformers' GPT-2 tokenizer with is_split_into_words=True
    transformers = pytest.importorskip("transformers")
    tok.save_pretrained(str(tmp_path / "tok"))
    hf = transformers.GPT2TokenizerFast.from_pretrained(str(tmp_path / "tok"), add_prefix_space=True)
    enc = hf(words, is_split_into_words=True)
    assert enc["input_ids"] == f["input_ids"]
    word_ids = enc.word_ids()
    first = [i for i, w in enumerate(word_ids) if w is not None and (i == 0 or word_ids[i - 1] != w)]
    assert [i for i, y in enumerate(f["labels"]) if y != -100] == first
    batch = next(iter(dm.train_dataloader()))
    assert batch["labels"][0, : len(expected)].tolist() == expected


def test_token_cls_conll_shaped_int_tags_csv_strings_and_errors(tok, tmp_path):
    # CoNLL-2003 shape: tokens + ner_tags as ids (hub datasets carry the names as a ClassLabel; a file needs label_list)
    rows = [{"id": "0", "tokens": ["EU", "rejects", "German", "call"], "ner_tags": [3, 0, 7, 0]}]
    names = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]
    dm = make_dm("token_cls", tok, tmp_path, rows, label_list=names)
    assert dm.num_labels == 9 and dm.id2label[7] == "B-MISC"
    assert [y for y in dm.train_features[0]["labels"] if y != -100] == [3, 0, 7, 0]
    with pytest.raises(ValueError, match=r"label 12 is out of range for 9 labels"):
        make_dm("token_cls", tok, tmp_path, rows, [{"tokens": ["x"], "ner_tags": [12]}], label_list=names)
    with pytest.raises(ValueError, match=r"2 words in 'tokens' but 1 tags"):
        make_dm("token_cls", tok, tmp_path, [{"tokens": ["a", "b"], "tags": ["O"]}])
    # csv cells: a space-separated string or a JSON list
    path = tmp_path / "ner.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["words", "labels"])
        w.writerow(["call os.path now", '["O", "B-CODE", "O"]'])
        w.writerow(["see 3 items", "O B-NUM O"])
    cfg = TaskDataConfig(source="csv", path=str(path), val_path=str(path), tokens_column="words",
                         tags_column="labels", cache_dir=str(tmp_path / "c"))
    dm = TaskDataModule("token_cls", cfg, tok)
    dm.setup()
    assert dm.train_examples[1] == {"tokens": ["see", "3", "items"], "tags": ["O", "B-NUM", "O"]}
    assert dm.label2id == {"B-CODE": 0, "B-NUM": 1, "O": 2}


# ------------------------------------------------------------------------------------------------ qa
def _long_context_example(tok, cfg: TaskDataConfig):
    """A context of ~3 windows and an answer whose tokens straddle the end of the first window."""
    context = " ".join(f"word{i} is here" for i in range(60))
    question = "Where is it?"
    q_len = len(tok.encode(question))
    budget = cfg.max_length - q_len - 1  # context tokens per window
    offsets = tok(context, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    assert len(offsets) > 2 * budget
    # answer = the characters of context tokens budget-2 .. budget+1 (crosses the first window's end)
    a0 = offsets[budget - 2][0]
    while context[a0] == " ":
        a0 += 1
    a1 = offsets[budget + 1][1]
    return {"id": "long-1", "question": question, "context": context,
            "answers": {"text": [context[a0:a1]], "answer_start": [a0]}}, budget


def test_qa_answer_across_window_boundary_is_found_in_the_next_window(tok, tmp_path):
    cfg = dict(max_length=48, doc_stride=16, max_question_length=16)
    ex, budget = _long_context_example(tok, TaskDataConfig(**cfg))
    short = {"id": "s", "question": "Who?", "context": "Alas poor Yorick, I knew him.",
             "answers": {"text": ["Yorick"], "answer_start": [10]}}
    dm = make_dm("qa", tok, tmp_path, [ex, short], **cfg)
    feats = [f for f in dm.val_features if f["example_index"] == 0]
    n_ctx = len(tok.encode(ex["context"]))
    assert len(feats) == len(window_starts(n_ctx, budget, 16)) >= 3
    sep = feats[0]["no_answer_index"]
    assert feats[0]["input_ids"][sep] == tok.eos_token_id
    assert feats[0]["input_ids"][:sep] == tok.encode(ex["question"])
    # window 0 holds only part of the answer: labelled "no answer here" (the separator)
    assert (feats[0]["start_positions"], feats[0]["end_positions"]) == (sep, sep)
    # window 1 starts budget - doc_stride tokens later and holds the whole answer
    w1 = feats[1]
    assert w1["input_ids"][sep + 1 :] == tok.encode(ex["context"])[budget - 16 : 2 * budget - 16]
    s, e = w1["start_positions"], w1["end_positions"]
    assert sep < s <= e
    assert ex["context"][w1["offsets"][s][0] : w1["offsets"][e][1]] == ex["answers"]["text"][0]
    assert all(f["start_positions"] == f["no_answer_index"] for f in feats[2:])
    # consecutive windows share exactly doc_stride context tokens
    assert feats[0]["input_ids"][-16:] == w1["input_ids"][sep + 1 : sep + 17]
    # round trip: logits peaked at the labelled positions -> post-processing returns the exact answer text
    features, contexts, refs = dm.qa_eval_data()
    start = [torch.full((len(f["input_ids"]),), -10.0) for f in features]
    end = [torch.full((len(f["input_ids"]),), -10.0) for f in features]
    for i, f in enumerate(features):
        if f["start_positions"] != f["no_answer_index"]:
            start[i][f["start_positions"]] = end[i][f["end_positions"]] = 10.0
    preds = postprocess_qa(start, end, features, contexts)
    assert preds == [ex["answers"]["text"][0], "Yorick"]
    assert squad_metrics(preds, refs) == {"exact_match": 1.0, "f1": 1.0}
    batch = next(iter(dm.val_dataloader()))
    assert batch["example_index"].tolist()[:2] == [0, 0] and batch["feature_index"].tolist()[:2] == [0, 1]
    assert set(dm.model_inputs(batch)) == {"input_ids", "attention_mask", "start_positions", "end_positions"}


def test_qa_answer_not_in_context_names_the_example(tok, tmp_path):
    good = {"id": "q1", "question": "Who?", "context": "Alas poor Yorick.", "answers": {"text": ["Yorick"],
            "answer_start": [10]}}
    bad = {"id": "q7", "question": "Who?", "context": "Alas poor Yorick.", "answers": {"text": ["Hamlet"],
           "answer_start": [10]}}
    with pytest.raises(ValueError, match=r"qa example 'q7'.*'Hamlet' is not in the context at answer_start=10"):
        make_dm("qa", tok, tmp_path, [good], [good, bad])


def test_qa_squad_shaped_and_flat_columns(tok, tmp_path):
    # SQuAD shape (id, title, context, question, answers) and a flat csv (answer_text/answer_start) agree
    rows = [{"id": "5733be284776f41900661182", "title": "T", "context": "The cat sat on the mat.",
             "question": "Where did the cat sit?", "answers": {"text": ["the mat", "mat"], "answer_start": [15, 19]}}]
    dm = make_dm("qa", tok, tmp_path, rows)
    path = tmp_path / "flat.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["q", "ctx", "answer_text", "answer_start"])
        w.writerow(["Where did the cat sit?", "The cat sat on the mat.", "the mat", 15])
    cfg = TaskDataConfig(source="csv", path=str(path), val_path=str(path), question_column="q", context_column="ctx",
                         cache_dir=str(tmp_path / "c"))
    flat = TaskDataModule("qa", cfg, tok)
    flat.setup()
    for key in ("input_ids", "start_positions", "end_positions"):
        assert flat.train_features[0][key] == dm.train_features[0][key]
    assert dm.val_examples[0]["answers"]["text"] == ["the mat", "mat"]


# ------------------------------------------------------------------------------------------------ hub
def test_hub_source_glue_classlabel_and_squad_shapes(tok, tmp_path):
    """source=hub goes through load_dataset(name, config_name, split=...); a local dataset folder stands in for the
    hub repo (parquet files keep the features: SST-2's ClassLabel names become id2label; SQuAD's answers struct)."""
    import datasets

    sst2 = datasets.Features({"sentence": datasets.Value("string"), "label": datasets.ClassLabel(names=["negative", "positive"]),
                              "idx": datasets.Value("int32")})
    repo = tmp_path / "sst2"
    repo.mkdir()
    for split, n in (("train", 12), ("validation", 4)):
        rows = {"sentence": [f"a {'fine' if i % 2 else 'dull'} film {i}" for i in range(n)],
                "label": [i % 2 for i in range(n)], "idx": list(range(n))}
        datasets.Dataset.from_dict(rows, features=sst2).to_parquet(str(repo / f"{split}.parquet"))
    dm = TaskDataModule("cls", TaskDataConfig(source="hub", name=str(repo), cache_dir=str(tmp_path / "c")), tok)
    dm.prepare_data()
    dm.setup()
    # the label NAMES come from the ClassLabel feature (1 -> "positive"), not from the sorted ids
    assert dm.id2label == {0: "negative", 1: "positive"} and len(dm.val_examples) == 4
    assert [f["labels"] for f in dm.train_features[:4]] == [0, 1, 0, 1]

    squad = tmp_path / "squad"
    squad.mkdir()
    ctx = "The cat sat on the mat."
    for split in ("train", "validation"):
        datasets.Dataset.from_list([{"id": "q1", "title": "T", "context": ctx, "question": "Where did the cat sit?",
                                     "answers": {"text": ["the mat"], "answer_start": [15]}}]
                                   ).to_parquet(str(squad / f"{split}.parquet"))
    qa = TaskDataModule("qa", TaskDataConfig(source="hub", name=str(squad), cache_dir=str(tmp_path / "c")), tok)
    qa.setup()
    f = qa.train_features[0]
    answer = tok.decode(f["input_ids"][f["start_positions"] : f["end_positions"] + 1])
    assert answer.strip() == "the mat"


# ------------------------------------------------------------------------------------------------ mc
def test_mc_sequences_summary_tokens_lm_labels_and_swag_columns(tok, tmp_path):
    rows = [{"sent1": "The king enters.", "sent2": "He", "ending0": "sings.", "ending1": "weeps bitterly now.",
             "ending2": "sleeps.", "ending3": "leaves.", "label": 1}]  # SWAG shape
    dm = make_dm("mc", tok, tmp_path, rows)
    assert dm.num_choices == 4 and dm.train_examples[0]["context"] == "The king enters. He"
    f = dm.train_features[0]
    for k, e in enumerate(dm.train_examples[0]["endings"]):
        seq = tok.encode("The king enters. He") + tok.encode(" " + e) + [tok.eos_token_id]
        assert f["input_ids"][k] == seq and f["mc_token_ids"][k] == len(seq) - 1
    batch = next(iter(dm.train_dataloader()))
    B, C, T = batch["input_ids"].shape
    # the training stream is endless: a full batch of the one example, repeated (a new shuffle each pass)
    assert C == 4 and batch["mc_token_ids"].shape == (B, 4) and batch["mc_labels"].tolist() == [1] * B
    assert (batch["input_ids"] == batch["input_ids"][:1]).all()
    ids, lab = batch["input_ids"][0], batch["labels"][0]
    for k in range(4):
        n = f["mc_token_ids"][k] + 1
        assert ids[k, n - 1] == tok.eos_token_id and batch["attention_mask"][0, k, :n].all()
        assert lab[k, :n].tolist() == ids[k, :n].tolist() and (lab[k, n:] == -100).all()
    # truncation drops context from the left: the ending and its eos survive
    long = [{"context": "word " * 200, "endings": ["alpha beta", "gamma"], "label": 0}]
    dm = make_dm("mc", tok, tmp_path, long, max_length=16, mc_lm_labels="correct")
    f = dm.train_features[0]
    assert all(len(s) == 16 and s[-1] == tok.eos_token_id for s in f["input_ids"])
    assert f["input_ids"][0][-1 - len(tok.encode(" alpha beta")) : -1] == tok.encode(" alpha beta")
    assert f["labels"][1] == [-100] * 16 and f["labels"][0] == f["input_ids"][0]
    with pytest.raises(ValueError, match=r"label 3 is not a choice index 0\.\.1"):
        make_dm("mc", tok, tmp_path, [{"context": "a", "endings": ["b", "c"], "label": 3}])
    with pytest.raises(ValueError, match=r"3 endings, but the first row has 2"):
        make_dm("mc", tok, tmp_path, [{"context": "a", "endings": ["b", "c"], "label": 0},
                                      {"context": "a", "endings": ["b", "c", "d"], "label": 0}])


# ------------------------------------------------------------------------------------------------ config
def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="needs data.path"):
        TaskDataConfig(source="jsonl")
    with pytest.raises(ValueError, match="not a task data source"):
        TaskDataConfig(source="ftp")
    TaskDataConfig(max_length=16)  # fine for cls/token_cls/mc ...
    with pytest.raises(ValueError, match="max_question_length=48 leaves no room"):
        TaskDataModule("qa", TaskDataConfig(max_length=16), None)  # ... not for qa
    with pytest.raises(ValueError, match="doc_stride=100 must be smaller"):
        TaskDataModule("qa", TaskDataConfig(max_length=128, doc_stride=100), None)
    with pytest.raises(ValueError, match="unknown task 'ner'"):
        TaskDataModule("ner", TaskDataConfig(), None)
    assert DEFAULT_COLUMNS["token_cls"]["tags"] == ("tags", "ner_tags")


# ------------------------------------------------------------------------------------------------ demo sets
@pytest.fixture(scope="module")
def demos() -> dict:
    return {t: build_demo(t, seed=3, train_size=200, val_size=60) for t in ("cls", "token_cls", "qa", "mc")}


def test_demo_sets_are_deterministic_and_shaped(demos):
    assert build_demo("mc", seed=3, train_size=200, val_size=60) == demos["mc"]
    assert build_demo("mc", seed=4, train_size=200, val_size=60) != demos["mc"]
    for task, d in demos.items():
        assert len(d["train"]) == 200 and len(d["validation"]) == 60
    cls = demos["cls"]["train"]
    assert {e["label"] for e in cls} == {"original", "shuffled"}
    assert 0.35 < sum(e["label"] == "shuffled" for e in cls) / len(cls) < 0.65
    for e in cls:  # classes differ only in word order: same shape of punctuation and capitalisation
        assert e["text"][0].isupper() or not e["text"][0].isalpha()
        assert e["text"].endswith(".") and e["text"].count(" ") >= 7
    train_texts = {e["text"] for e in cls if e["label"] == "original"}
    assert not train_texts & {e["text"] for e in demos["cls"]["validation"]}  # no leak across splits
    for e in demos["token_cls"]["train"]:
        assert len(e["tokens"]) == len(e["tags"]) and set(e["tags"]) <= {"O", "B-CODE", "I-CODE", "B-NUM"}
        assert any(t != "O" for t in e["tags"])
    assert any("B-NUM" in e["tags"] for e in demos["token_cls"]["train"])
    from data_pipelines.tasks.demo import QA_QUESTIONS, bio_tags

    kinds = {q: k for k, q in QA_QUESTIONS.items()}
    for e in demos["qa"]["train"]:
        a, s = e["answers"]["text"][0], e["answers"]["answer_start"][0]
        assert e["context"][s : s + len(a)] == a and e["context"].count(a) == 1
        # the answer is the one entity of the asked kind, without the punctuation around it
        kind = kinds[e["question"]]
        tags = bio_tags(e["context"].split())
        assert sum(t == f"B-{kind}" for t in tags) == 1
        assert a[0] not in ",;:.!?\"" and a[-1] not in ",;:.!?\"" and a.count("(") == a.count(")")
    assert {e["question"] for e in demos["qa"]["train"]} == set(QA_QUESTIONS.values())
    labels = [e["label"] for e in demos["mc"]["train"]]
    assert set(labels) == {0, 1, 2, 3} and all(len(e["endings"]) == 4 for e in demos["mc"]["train"])
    assert all(len(set(e["endings"])) == 4 for e in demos["mc"]["train"])


def test_demo_files_cached_and_loaded_through_the_datamodule(tok, tmp_path):
    cfg = TaskDataConfig(source="demo", cache_dir=str(tmp_path), demo_train_size=64, demo_val_size=16, seed=3,
                         max_length=64, doc_stride=16, max_question_length=24, batch_size=4)
    a = demo_files("qa", tmp_path, 3, 64, 16)
    before = a[0].read_bytes()
    assert demo_files("qa", tmp_path, 3, 64, 16) == a and a[0].read_bytes() == before
    shapes = {}
    for task in ("cls", "token_cls", "qa", "mc"):
        dm = TaskDataModule(task, cfg, tok)
        dm.prepare_data()
        dm.setup()
        assert len(dm.train_examples) == 64 and len(dm.val_examples) == 16
        b = next(iter(dm.train_dataloader()))
        shapes[task] = tuple(b["input_ids"].shape[:-1])
        assert b["input_ids"].shape[-1] <= 64
    assert shapes == {"cls": (4,), "token_cls": (4,), "qa": (4,), "mc": (4, 4)}
    dm = TaskDataModule("cls", cfg, tok)
    dm.setup()
    assert dm.id2label == {0: "original", 1: "shuffled"}


def test_a_missing_task_data_file_is_named_by_its_own_key(tmp_path):
    """A fine-tune's data come from task.data.*: a missing file is named under that key (not the LM's data.path)."""
    from data_pipelines.tasks.loading import load_splits

    cfg = TaskDataConfig(source="jsonl", path=str(tmp_path / "train.jsonl"), cache_dir=str(tmp_path / "c"))
    with pytest.raises(FileNotFoundError, match=r"^task\.data\.path=.*train\.jsonl does not exist"):
        load_splits(cfg, cfg.path)
