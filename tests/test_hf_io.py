"""HF folder I/O: key map round trip, Conv1D transposes, sharding, old buffers, dtype="auto", no pickle, init."""

import json
import math
import os
import warnings

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import gpt2
from gpt2.hf_io import CONV1D_TRANSPOSED, convert_hf_state_dict, from_hf_state_dict, to_hf_state_dict

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: 1 thread is faster (conftest)

CFG = dict(vocab_size=97, n_positions=24, n_embd=30, n_layer=3, n_head=5, bos_token_id=1, eos_token_id=2,
           pad_token_id=0)


def tiny(cls=gpt2.GPT2LMHeadModel, **kw):
    torch.manual_seed(0)
    return cls(gpt2.GPT2Config(**{**CFG, **kw})).eval()


def test_key_map_round_trip_is_identity_and_matches_transformers_names():
    for cls in (gpt2.GPT2Model, gpt2.GPT2LMHeadModel, gpt2.GPT2DoubleHeadsModel, gpt2.GPT2ForQuestionAnswering):
        ours = tiny(cls)
        hf_sd = to_hf_state_dict(ours)
        theirs = getattr(transformers, cls.__name__)(transformers.GPT2Config(**CFG))
        theirs_keys = {k for k in theirs.state_dict() if k != "lm_head.weight"}  # tied, not saved
        assert set(hf_sd) == theirs_keys
        for k, t in theirs.state_dict().items():  # Conv1D (in, out) shapes
            if k in hf_sd:
                assert hf_sd[k].shape == t.shape, k
        back, unexpected = convert_hf_state_dict(hf_sd, with_trunk_prefix=cls is not gpt2.GPT2Model)
        assert not unexpected
        for k, t in ours.state_dict().items():
            if k == "lm_head.weight":
                continue
            assert torch.equal(back[k], t), k
    assert {k.split(".", 2)[-1] for k in CONV1D_TRANSPOSED} == {"attn.c_attn.weight", "attn.c_proj.weight",
                                                                "mlp.c_fc.weight", "mlp.c_proj.weight"}


def test_saved_folder_format(tmp_path):
    tiny().save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    with safe_open(tmp_path / "model.safetensors", framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert "lm_head.weight" not in f.keys()  # tied
        assert f.get_tensor("transformer.h.0.attn.c_attn.weight").shape == (30, 90)  # Conv1D (in, out)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architectures"] == ["GPT2LMHeadModel"] and cfg["dtype"] == "float32"


def test_sharded_save_and_load_both_ways(tmp_path):
    ours = tiny()
    ours.save_pretrained(tmp_path / "ours", max_shard_size="20KB")
    files = os.listdir(tmp_path / "ours")
    assert "model.safetensors.index.json" in files and "model.safetensors" not in files
    shards = [f for f in files if f.startswith("model-")]
    assert len(shards) > 2
    index = json.loads((tmp_path / "ours" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    ids = torch.randint(3, 97, (2, 7))
    ref = ours(ids).logits
    torch.testing.assert_close(gpt2.GPT2LMHeadModel.from_pretrained(tmp_path / "ours")(ids).logits, ref, atol=0, rtol=0)
    theirs = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "ours").eval()
    torch.testing.assert_close(theirs(ids).logits, ref, atol=1e-5, rtol=0)
    # transformers' sharded folder -> ours
    theirs.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    assert "model.safetensors.index.json" in os.listdir(tmp_path / "hf")
    torch.testing.assert_close(gpt2.GPT2LMHeadModel.from_pretrained(tmp_path / "hf")(ids).logits, ref, atol=1e-5, rtol=0)
    # re-saving unsharded removes the stale shards
    ours.save_pretrained(tmp_path / "ours")
    assert sorted(os.listdir(tmp_path / "ours")) == ["config.json", "model.safetensors"]


def test_old_checkpoint_with_attn_bias_buffers_loads(tmp_path):
    ours = tiny()
    sd = to_hf_state_dict(ours)
    for i in range(3):  # what transformers < 4.2x saved: the causal mask and masked_bias per block
        sd[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(24, 24)).view(1, 1, 24, 24)
        sd[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    ours.config.save_pretrained(tmp_path)
    ids = torch.randint(3, 97, (1, 7))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the buffers are expected: no "unknown tensors" warning
        loaded = gpt2.GPT2LMHeadModel.from_pretrained(tmp_path)
    torch.testing.assert_close(loaded(ids).logits, ours(ids).logits, atol=0, rtol=0)


def test_trunk_and_heads_load_across_folders(tmp_path):
    lm = tiny()
    lm.save_pretrained(tmp_path / "lm")
    ids = torch.randint(3, 97, (2, 7))
    trunk = gpt2.GPT2Model.from_pretrained(tmp_path / "lm")  # drops lm_head, strips "transformer."
    torch.testing.assert_close(trunk(ids).last_hidden_state, lm.transformer(ids).last_hidden_state, atol=0, rtol=0)
    trunk.save_pretrained(tmp_path / "trunk")  # HF trunk format: no prefix
    with safe_open(tmp_path / "trunk" / "model.safetensors", framework="pt") as f:
        assert "wte.weight" in f.keys()
    hf_trunk = transformers.GPT2Model.from_pretrained(tmp_path / "trunk").eval()
    torch.testing.assert_close(hf_trunk(ids).last_hidden_state, trunk(ids).last_hidden_state, atol=1e-5, rtol=0)
    with pytest.warns(UserWarning, match="newly initialized.*score.weight"):
        cls_model = gpt2.GPT2ForSequenceClassification.from_pretrained(tmp_path / "trunk", num_labels=4)
    assert cls_model.score.weight.shape == (4, 30) and cls_model.score.weight.std() > 0
    torch.testing.assert_close(cls_model.transformer.wte.weight, lm.transformer.wte.weight, atol=0, rtol=0)


def test_dtype_auto_keeps_saved_dtype(tmp_path):
    tiny().to(torch.bfloat16).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    assert gpt2.GPT2LMHeadModel.from_pretrained(tmp_path, dtype="auto").dtype == torch.bfloat16
    assert gpt2.GPT2LMHeadModel.from_pretrained(tmp_path, dtype=torch.float32).dtype == torch.float32
    assert gpt2.GPT2LMHeadModel.from_pretrained(tmp_path, torch_dtype=torch.float16).dtype == torch.float16
    # no dtype in config.json -> the safetensors dtype
    cfg = json.loads((tmp_path / "config.json").read_text())
    del cfg["dtype"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    m = gpt2.GPT2LMHeadModel.from_pretrained(tmp_path)
    assert m.dtype == torch.bfloat16 and m.lm_head.weight is m.transformer.wte.weight


def test_untied_lm_head_round_trip(tmp_path):
    ours = tiny(tie_word_embeddings=False)
    assert ours.lm_head.weight is not ours.transformer.wte.weight
    ours.save_pretrained(tmp_path)
    assert "lm_head.weight" in load_file(tmp_path / "model.safetensors")
    back = gpt2.GPT2LMHeadModel.from_pretrained(tmp_path)
    torch.testing.assert_close(back.lm_head.weight, ours.lm_head.weight, atol=0, rtol=0)


def test_tied_weight_stored_under_the_head_name_loads_without_a_false_warning(tmp_path):
    """A tied checkpoint that stores the shared matrix as lm_head.weight (not transformer.wte.weight) is the same model:
    it loads with transformers' logits and no "newly initialized" warning."""
    torch.manual_seed(0)
    cfg = gpt2.GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=16, vocab_size=50)
    ours = gpt2.GPT2LMHeadModel(cfg).eval()
    ours.save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    sd["lm_head.weight"] = sd.pop("transformer.wte.weight")
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a "newly initialized" warning fails the test
        again = gpt2.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    theirs = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, ours(ids).logits)
        torch.testing.assert_close(again(ids).logits, theirs(ids).logits, rtol=1e-5, atol=1e-5)


def test_refuses_pickle_and_reports_bad_folders(tmp_path):
    tiny().config.save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match="pickle"):
        gpt2.GPT2LMHeadModel.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        gpt2.GPT2LMHeadModel.from_pretrained(str(tmp_path / "nope"))
    (tmp_path / "pytorch_model.bin").unlink()
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="corrupt"):
        gpt2.GPT2LMHeadModel.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="safetensors only"):
        tiny().save_pretrained(tmp_path / "x", safe_serialization=False)


def test_shape_mismatch_is_a_clear_error(tmp_path):
    tiny().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="does not describe these weights"):
        gpt2.GPT2LMHeadModel.from_pretrained(tmp_path, vocab_size=50)
    with pytest.raises(ValueError, match="does not describe"):
        from_hf_state_dict(tiny(n_embd=20, n_head=5), to_hf_state_dict(tiny()))


def test_gpt2_init_statistics_and_meta_device_build():
    cfg = gpt2.GPT2Config(vocab_size=500, n_positions=64, n_embd=256, n_layer=8, n_head=4)
    with torch.device("meta"):
        model = gpt2.GPT2LMHeadModel(cfg)
    model.to_empty(device="cpu")
    model.init_weights()  # torchtitan order: build on meta -> materialize -> init
    assert model.lm_head.weight is model.transformer.wte.weight
    block = model.transformer.h[3]
    assert abs(block.attn.c_attn.weight.std().item() - 0.02) < 0.002
    resid = 0.02 / math.sqrt(2 * cfg.n_layer)  # GPT-2 paper: residual projections scaled by 1/sqrt(N)
    assert abs(block.attn.c_proj.weight.std().item() - resid) < 0.1 * resid
    assert abs(block.mlp.c_proj.weight.std().item() - resid) < 0.1 * resid
    assert torch.all(block.attn.c_attn.bias == 0) and torch.all(block.ln_1.weight == 1)
    assert isinstance(model.transformer.h, torch.nn.ModuleList) and isinstance(block, gpt2.modeling.GPT2Block)


def test_from_pretrained_skips_meta_init_and_leaves_torch_init_intact(tmp_path):
    """from_pretrained builds its model on the meta device with torch.nn.init switched off (transformers'
    no_init_weights): the meta kernels of normal_ / uniform_ would import torch._dynamo (~1 s of every load on a 2-core
    CPU). In a fresh process: the loaded logits equal the saved model's, torch._dynamo was not imported, and
    torch.nn.init works again afterwards."""
    import subprocess
    import sys

    ours = tiny()
    ours.save_pretrained(tmp_path)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.save(ours(ids).logits, tmp_path / "logits.pt")
    code = f"""
import sys, torch, gpt2
model = gpt2.GPT2LMHeadModel.from_pretrained({str(tmp_path)!r}).eval()
with torch.no_grad():
    assert torch.equal(model(torch.tensor([[1, 2, 3, 4]])).logits, torch.load({str(tmp_path / "logits.pt")!r}))
assert "torch._dynamo" not in sys.modules, "from_pretrained imported torch._dynamo"
w = torch.empty(64, 64)
torch.nn.init.normal_(w, std=0.02)
assert 0.015 < w.std().item() < 0.025  # the real initializer again
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
