"""GPT2Config: HF defaults, validation messages, presets, JSON round trips with transformers; import hygiene."""

import json
import subprocess
import sys

import pytest
import transformers

import gpt2
from gpt2 import PRESETS, GPT2Config
from gpt2.modeling import flops_per_token

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: 1 thread is faster (conftest)


def test_every_hf_field_with_hf_default():
    hf = transformers.GPT2Config()
    ours = GPT2Config()
    hf_fields = hf.to_dict()
    gpt2_specific = ["vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner", "activation_function",
                     "resid_pdrop", "embd_pdrop", "attn_pdrop", "layer_norm_epsilon", "initializer_range",
                     "summary_type", "summary_use_proj", "summary_activation", "summary_proj_to_labels",
                     "summary_first_dropout", "scale_attn_weights", "use_cache", "bos_token_id", "eos_token_id",
                     "pad_token_id", "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn",
                     "add_cross_attention", "tie_word_embeddings"]
    assert set(gpt2_specific) <= set(hf_fields)
    for name in gpt2_specific + ["num_labels", "problem_type"]:
        assert getattr(ours, name) == getattr(hf, name), name
    assert ours.attn_implementation == "sdpa"


@pytest.mark.parametrize("kwargs,match", [
    (dict(n_embd=30, n_head=4), "divisible by n_head"),
    (dict(activation_function="gleu"), "unknown activation_function"),
    (dict(attn_implementation="flash2"), "attn_implementation"),
    (dict(resid_pdrop=1.5), "resid_pdrop"),
    (dict(n_layer=0), "n_layer"),
    (dict(summary_type="attn"), "summary_type"),
    (dict(problem_type="ranking"), "problem_type"),
    (dict(add_cross_attention=True), "add_cross_attention"),
    (dict(num_labels=3, id2label={0: "a", 1: "b"}), "disagrees"),
])
def test_validation_names_the_problem(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GPT2Config(**kwargs)


def test_presets():
    assert set(PRESETS) == {"tiny", "demo", "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"}
    xl = GPT2Config.from_preset("gpt2-xl")
    assert (xl.n_layer, xl.n_embd, xl.n_head) == (48, 1600, 25)
    tiny = GPT2Config.from_preset("tiny", vocab_size=300)
    assert tiny.vocab_size == 300 and tiny.n_layer == PRESETS["tiny"]["n_layer"]
    with pytest.raises(ValueError, match="unknown GPT-2 preset"):
        GPT2Config.from_preset("gpt3")


def test_flops_per_token_counts_match_a_built_model():
    cfg = GPT2Config(vocab_size=101, n_positions=32, n_embd=24, n_layer=3, n_head=3, n_inner=40)
    model = gpt2.GPT2LMHeadModel(cfg)
    N = model.num_parameters(exclude_embeddings=True) + cfg.vocab_size * cfg.n_embd  # + the lm_head matmul
    assert flops_per_token(cfg, 16) == 6 * N + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * 16
    assert model.num_parameters() == N + cfg.n_positions * cfg.n_embd


def test_json_round_trip_and_transformers_interop(tmp_path):
    cfg = GPT2Config(vocab_size=97, n_embd=24, n_head=3, n_layer=2, num_labels=3, pad_token_id=0,
                     reorder_and_upcast_attn=True, attn_implementation="eager")
    assert GPT2Config.from_dict(cfg.to_dict()) == cfg
    cfg.save_pretrained(tmp_path)
    on_disk = json.loads((tmp_path / "config.json").read_text())
    assert on_disk["model_type"] == "gpt2" and "attn_implementation" not in on_disk
    hf = transformers.GPT2Config.from_pretrained(tmp_path)
    assert (hf.n_embd, hf.num_labels, hf.pad_token_id, hf.reorder_and_upcast_attn) == (24, 3, 0, True)
    # transformers -> ours: id2label (string keys) gives num_labels; unknown keys ignored; overrides win
    hf.save_pretrained(tmp_path / "hf")
    back = GPT2Config.from_pretrained(tmp_path / "hf", attn_implementation="eager")
    assert back.num_labels == 3 and back.id2label[2] == "LABEL_2" and back.n_embd == 24
    assert GPT2Config.from_pretrained(tmp_path / "hf", num_labels=5).num_labels == 5
    assert GPT2Config.from_dict({"torch_dtype": "bfloat16", "future_key": 1}).dtype == "bfloat16"
    with pytest.raises(ValueError, match="model_type"):
        GPT2Config.from_dict({"model_type": "llama"})


def test_import_gpt2_pulls_no_training_stack():
    code = ("import sys, gpt2; bad = sorted({m.split('.')[0] for m in sys.modules} & "
            "{'transformers', 'lightning', 'pytorch_lightning', 'hydra', 'omegaconf', 'wandb', 'deepspeed', "
            "'datasets', 'huggingface_hub'}); print(','.join(bad)); assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
