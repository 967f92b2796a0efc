"""train/strategies/engines/deepspeed_config.py: the generated DeepSpeed JSON for every ZeRO option, and ZeRO checkpoint -> safetensors
through real DeepSpeed checkpoints (DeepSpeed's CPU accelerator over gloo: the fp32 ZeRO-1/2/3/3-offload ones the
session's 2-rank ZeRO runs wrote, and a bf16-mixed ZeRO-2 one written here by one process)."""

import json

import pytest
import torch

import gpt2
from train.strategies.deepspeed import STRATEGY_STAGES, deepspeed_config_for_strategy
from train.strategies.engines.deepspeed_config import deepspeed_config, strip_wrapper_prefix, zero_checkpoint_to_safetensors

PRECISIONS = ["32-true", "16-mixed", "bf16-mixed", "bf16-true"]


@pytest.mark.parametrize("strategy", list(STRATEGY_STAGES))
@pytest.mark.parametrize("precision", PRECISIONS)
def test_config_for_every_zero_option(strategy, precision):
    cfg = deepspeed_config_for_strategy(strategy, micro_batch_size=8, accumulate_grad_batches=4,
                                        gradient_clip_val=1.0, precision=precision, world_size=16)
    stage, offload = STRATEGY_STAGES[strategy]
    zero = cfg["zero_optimization"]
    # batch, accumulation and clipping are the trainer's numbers, and DeepSpeed's batch identity holds
    assert cfg["train_micro_batch_size_per_gpu"] == 8 and cfg["gradient_accumulation_steps"] == 4
    assert cfg["train_batch_size"] == 8 * 4 * 16
    assert cfg["gradient_clipping"] == 1.0
    assert zero["stage"] == stage and zero["overlap_comm"] and zero["contiguous_gradients"]
    assert zero["reduce_bucket_size"] > 0
    # precision sections follow the Lightning string
    assert ("fp16" in cfg) == precision.startswith("16")
    assert ("bf16" in cfg) == precision.startswith("bf16")
    if "fp16" in cfg:
        assert cfg["fp16"]["enabled"] and cfg["fp16"]["loss_scale"] == 0  # dynamic loss scaling
    # offload: optimizer and parameters to pinned CPU memory, only for zero3_offload
    assert ("offload_optimizer" in zero) == offload and ("offload_param" in zero) == offload
    if offload:
        assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
        assert zero["offload_param"] == {"device": "cpu", "pin_memory": True}
    assert zero.get("stage3_gather_16bit_weights_on_model_save", False) == (stage == 3)
    json.dumps(cfg)  # it is a JSON document


def test_config_is_accepted_by_deepspeed():
    """DeepSpeed's own config parser takes every generated variant (catches a misspelt or retired key)."""
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.config import DeepSpeedConfig

    for strategy in STRATEGY_STAGES:
        for precision in PRECISIONS:
            cfg = deepspeed_config_for_strategy(strategy, micro_batch_size=2, accumulate_grad_batches=3,
                                                gradient_clip_val=0.5, precision=precision, world_size=1)
            ds = DeepSpeedConfig(cfg)
            assert ds.zero_optimization_stage == STRATEGY_STAGES[strategy][0]
            assert ds.train_batch_size == 6 and ds.gradient_accumulation_steps == 3
            assert ds.gradient_clipping == 0.5
            assert ds.float16_config.enabled == precision.startswith("16")
            assert ds.bfloat16_config.enabled == precision.startswith("bf16")


def test_lightning_variant_leaves_accumulation_to_the_trainer():
    cfg = deepspeed_config(2, micro_batch_size=4, accumulate_grad_batches=8, for_lightning=True)
    # Lightning's DeepSpeedStrategy refuses a config with gradient_accumulation_steps and sets it from the Trainer
    assert "gradient_accumulation_steps" not in cfg and cfg["train_micro_batch_size_per_gpu"] == 4
    assert deepspeed_config(1, precision="32")["gradient_clipping"] == 0.0  # None -> off
    no_world = deepspeed_config(1)
    assert "train_batch_size" not in no_world


def test_offload_before_stage_3_moves_only_the_optimizer():
    zero = deepspeed_config(2, offload=True)["zero_optimization"]
    assert zero["offload_optimizer"]["device"] == "cpu" and "offload_param" not in zero  # ZeRO-Offload


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(stage=4), "ZeRO stage must be 1, 2 or 3"),
        (dict(stage=0), "use strategy=ddp"),
        (dict(stage=2, precision="fp8"), "precision='fp8' cannot run under DeepSpeed"),
        (dict(stage=2, micro_batch_size=0), "micro_batch_size must be a positive integer"),
        (dict(stage=2, accumulate_grad_batches=1.5), "accumulate_grad_batches must be a positive integer"),
        (dict(stage=2, gradient_clip_val=-1.0), "gradient_clip_val must be >= 0"),
        (dict(stage=3, offload="yes"), "offload must be true or false"),
    ],
)
def test_bad_values_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        deepspeed_config(**kwargs)
    with pytest.raises(ValueError, match="not a DeepSpeed strategy"):
        deepspeed_config_for_strategy("fsdp")


def test_strip_wrapper_prefix():
    sd = {"_forward_module.model.transformer.wte.weight": 1, "_forward_module.model.lm_head.weight": 2}
    assert strip_wrapper_prefix(sd) == {"transformer.wte.weight": 1, "lm_head.weight": 2}
    assert strip_wrapper_prefix({"transformer.wte.weight": 1}) == {"transformer.wte.weight": 1}
    with pytest.raises(ValueError, match="not a gpt2-forge GPT-2 checkpoint"):
        strip_wrapper_prefix({"encoder.weight": 1})


# ------------------------------------------------------------------------------------ real ZeRO checkpoints
# The ZeRO checkpoints of the session's DeepSpeed runs (tests/zero_runs.py, shared with tests/test_deepspeed_cpu.py):
# ZeRO-1/2/3/3-offload in fp32 on 2 ranks, the reference being each run's live weights at the end of fit (ZeRO-3's
# gathered from both ranks), and a bf16-mixed ZeRO-2 one from one process, against the module's own bf16 weights.
def _zero_checkpoint(zero_runs, name):
    """(ZeRO checkpoint folder, reference weights file, model config) for one parametrized case."""
    if name == "zero2-bf16-mixed":
        from zero_runs import SCRIPTS

        r = SCRIPTS[name]
        assert r.returncode == 0, f"DeepSpeed on CPU failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        cfg = gpt2.GPT2Config.from_preset("tiny", vocab_size=320, n_positions=64)
        return zero_runs / name / "checkpoint", zero_runs / name / "reference.safetensors", cfg
    from zero_runs import S

    step = zero_runs / name / "checkpoints" / f"step-{S}"  # the 2-rank run's last checkpoint, fp32
    cfg = gpt2.GPT2Config.from_dict(json.loads((step / "config.json").read_text()))
    return step, zero_runs / name / "probe" / "live.safetensors", cfg


@pytest.mark.slow  # it reads the session's DeepSpeed runs
@pytest.mark.parametrize("name", ["deepspeed_zero1", "zero2-uninterrupted", "deepspeed_zero3",
                                  "deepspeed_zero3_offload", "zero2-bf16-mixed"])
def test_zero_checkpoint_converts_to_our_safetensors(zero_runs, name, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    checkpoint_dir, reference_file, cfg = _zero_checkpoint(zero_runs, name)
    out_file = tmp_path / "model.safetensors"
    zero_checkpoint_to_safetensors(checkpoint_dir, out_file)

    with safe_open(str(out_file), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt"
    assert json.loads(meta["aliases"]) == {"lm_head.weight": "transformer.wte.weight"}  # tied: stored once
    converted = load_file(str(out_file))
    reference = load_file(str(reference_file))
    assert set(converted) == set(reference)  # our key names, no _forward_module./model. prefixes
    fp32 = not name.endswith("bf16-mixed")
    for k, ref in reference.items():
        assert converted[k].dtype == torch.float32
        if fp32:
            torch.testing.assert_close(converted[k], ref, rtol=0, atol=0, msg=k)
        else:  # the fp32 master weights vs the bf16 copy the module computes with
            torch.testing.assert_close(converted[k], ref, rtol=1e-2, atol=1e-2, msg=k)

    # the file loads into our model (strict) and gives the logits the trained weights give
    model = gpt2.GPT2LMHeadModel(cfg).eval()
    model.load_state_dict({**converted, "lm_head.weight": converted["transformer.wte.weight"]}, strict=True)
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()  # still tied
    ref_model = gpt2.GPT2LMHeadModel(cfg).eval()
    ref_model.load_state_dict({**reference, "lm_head.weight": reference["transformer.wte.weight"]}, strict=True)
    x = torch.randint(0, cfg.vocab_size, (1, 12))
    with torch.no_grad():
        tol = 0 if fp32 else 5e-2
        torch.testing.assert_close(model(x).logits, ref_model(x).logits, rtol=tol, atol=tol)


def test_conversion_errors_name_the_problem(tmp_path):
    pytest.importorskip("deepspeed")
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        zero_checkpoint_to_safetensors(tmp_path / "missing", tmp_path / "m.safetensors")
    (tmp_path / "ck" / "global_step3").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"no 'latest' file; pass tag= one of \['global_step3'\]"):
        zero_checkpoint_to_safetensors(tmp_path / "ck", tmp_path / "m.safetensors")
