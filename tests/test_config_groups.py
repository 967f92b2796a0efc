"""Every option of every config group composes onto the typed schema and instantiates; bad overrides are named."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf.errors import OmegaConfBaseException

import gpt2
from train.config import (
    AttentionConfig,
    CheckpointConfig,
    Config,
    ConfigError,
    EvalConfig,
    LoggerConfig,
    ModelConfig,
    OptimConfig,
    PeftConfig,
    StabilityConfig,
    StrategyConfig,
    TaskConfig,
    TrainerConfig,
    register_configs,
    to_config,
)
from train.tasks.model import build_model_config

CONF = Path(__file__).resolve().parents[1] / "conf"
register_configs()

SCHEMAS = {
    "model": ModelConfig,
    "attention": AttentionConfig,
    "stability": StabilityConfig,
    "task": TaskConfig,
    "strategy": StrategyConfig,
    "trainer": TrainerConfig,
    "optim": OptimConfig,
    "logger": LoggerConfig,
    "checkpoint": CheckpointConfig,
    "eval": EvalConfig,
    "peft": PeftConfig,
}
# Presets with mandatory (???) values get them from the user; give test values.
REQUIRED = {
    ("experiment", "shakespeare-finetune"): ["model.init_from=some-hf-dir", "data.path=input.txt"],
    **{("data", s): ["data.path=some-data"] for s in ("text", "jsonl", "csv", "parquet", "tokens")},
    ("data", "hub"): ["data.name=some/dataset"],
    ("peft", "lora"): ["model.init_from=some-hf-dir"],
}


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.fixture(scope="module", autouse=True)
def _hydra():
    """One Hydra initialisation for the whole module (composition itself is cheap)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield


def _compose(overrides: list[str]):
    return compose(config_name="config", overrides=overrides)


ALL = [(g, o) for g in sorted(p.name for p in CONF.iterdir() if p.is_dir()) for o in _options(g)]


def test_every_group_has_options():
    groups = {g for g, _ in ALL}
    assert {"model", "attention", "stability", "task", "data", "strategy", "trainer", "optim", "logger",
            "checkpoint", "experiment", "debug"} <= groups
    assert {"tiny", "demo", "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"} <= set(_options("model"))
    assert {"eager", "sdpa", "flash"} <= set(_options("attention"))


@pytest.mark.parametrize("group,option", ALL, ids=[f"{g}={o}" for g, o in ALL])
def test_option_composes_and_instantiates(group, option):
    cfg = to_config(_compose([f"{group}={option}", *REQUIRED.get((group, option), [])]))
    assert isinstance(cfg, Config)
    if group in SCHEMAS:
        node = getattr(cfg, group)
        assert isinstance(node, SCHEMAS[group])
    if group in SCHEMAS or group == "data":
        _assert_sets_only_differences(group, option, type(getattr(cfg, group)))
    # every composed config builds a model config (cheap: no weights)
    mc = build_model_config(cfg.model, cfg.attention, cfg.stability, vocab_size=4096, eos_token_id=0)
    assert mc.n_layer == cfg.model.n_layer


def _default_of(f: dataclasses.Field):
    value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    value = getattr(value, "value", value)  # a str enum as its string
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


def _assert_sets_only_differences(group: str, option: str, schema: type) -> None:
    """An option's YAML sets only fields of its dataclass, each to a value other than the dataclass's default (the
    defaults live in one place; `name` names the option)."""
    text = yaml.safe_load((CONF / group / f"{option}.yaml").read_text()) or {}
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key, value in text.items():
        if key == "defaults":
            continue
        assert key in fields, f"{group}/{option}.yaml sets {key}, which {schema.__name__} does not have"
        default = _default_of(fields[key])
        if isinstance(value, dict) and isinstance(default, dict):
            same = [k for k, v in value.items() if default.get(k) == v]
            assert not same, f"{group}/{option}.yaml repeats the defaults of {key}.{same}"
        elif key != "name" or group == "data":
            assert value != default, f"{group}/{option}.yaml repeats the default {key}={value!r}"



@pytest.mark.parametrize("size", ["tiny", "demo", "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"])
def test_model_sizes_build_on_meta(size):
    cfg = to_config(_compose([f"model={size}"]))
    mc = build_model_config(cfg.model, cfg.attention, cfg.stability, vocab_size=50257, eos_token_id=50256)
    with torch.device("meta"):
        model = gpt2.GPT2LMHeadModel(mc)
    n = sum(p.numel() for p in model.parameters())
    expected = {"gpt2": 124.4e6, "gpt2-medium": 354.8e6, "gpt2-large": 774.0e6, "gpt2-xl": 1557.6e6}
    if size in expected:  # the published parameter counts of the four GPT-2 sizes (tied embeddings counted once)
        assert abs(n - expected[size]) / expected[size] < 0.01, n
    for k, v in gpt2.PRESETS[size].items():  # conf/model/<size>.yaml agrees with the library's preset
        assert getattr(mc, k) == v, (size, k)


def test_default_config_is_the_cpu_demo():
    cfg = to_config(_compose([]))
    assert cfg.model.name == "demo" and cfg.task.name == "lm" and cfg.strategy.name == "auto"
    assert cfg.data.block_size <= cfg.model.n_positions
    assert cfg.resume is None and cfg.run_dir.startswith("outputs/")


def test_experiment_overrides_groups():
    cfg = to_config(_compose(["experiment=gpt2-owt"]))
    assert cfg.model.n_layer == 12 and cfg.stability.scale_attn_by_inverse_layer_idx
    assert cfg.optim.lr == 6e-4 and cfg.optim.betas == [0.9, 0.95] and cfg.optim.weight_decay == 0.1
    # 8 GPUs x 16 micro x 4 accumulation = 512 sequences x 1024 tokens (Mistral)
    assert cfg.trainer.devices * cfg.data.batch_size * cfg.trainer.accumulate_grad_batches == 512
    assert cfg.data.block_size == 1024 and cfg.trainer.max_steps == 400_000


def test_multiple_loggers_merge():
    cfg = to_config(_compose(["logger=[wandb,tensorboard]"]))
    assert cfg.logger.wandb and cfg.logger.tensorboard


@pytest.mark.parametrize(
    "override,needle",
    [
        ("trainer.max_step=5", "max_step"),  # unknown key
        ("trainer.max_steps=abc", "max_steps"),  # wrong type
        ("model=gpt5", "gpt5"),  # unknown group option
        ("optim.betas=0.9", "betas"),
    ],
)
def test_bad_override_named_at_composition(override, needle):
    with pytest.raises((ConfigCompositionException, OmegaConfBaseException)) as ei:
        _compose([override])
    assert needle in str(ei.value) or needle in str(ei.value.__cause__)


@pytest.mark.parametrize(
    "override,needle",
    [
        ("trainer.max_steps=0", "trainer.max_steps"),
        ("model.n_head=5", "model.n_embd"),  # 192 is not a multiple of 5
        ("optim.lr=-1", "optim.lr"),
        ("trainer.precision=fp8", "trainer.precision"),
        ("data.block_size=512", "data.block_size"),  # > the demo model's n_positions=256
        ("attention.implementation=magic", "attention.implementation"),
        ("task.name=translate", "task.name"),
        # a key the schema lacks, re-entered with the `+` Hydra's own message suggests: refused, not ignored
        ("+trainer.max_step=5", "trainer.max_step is not a setting (TrainerConfig has no 'max_step'); did you mean "
                                "trainer.max_steps?"),
        ("+data.blok_size=5", "did you mean data.block_size?"),
        ("+seeed=1", "seeed is not a setting (Config has no 'seeed')"),
    ],
)
def test_bad_value_named_at_instantiation(override, needle):
    with pytest.raises(Exception) as ei:
        to_config(_compose([override]))
    msg = str(ei.value)
    assert needle in msg, msg
    assert isinstance(ei.value, (ConfigError, ValueError, OmegaConfBaseException))


def test_lm_data_override_on_a_finetune_is_refused(caplog):
    """`data.*` chooses the LM corpus; a fine-tuning task trains on `task.data.*`. While the task data is its demo,
    an LM-data override would leave the task training on the demo data: the run stops naming the key, with or
    without a tokenizer to take. The LM task and a fine-tune on its own data are left alone."""
    from train.config import check_overrides

    over = ["task=cls", "data=jsonl", "data.path=my.jsonl"]
    with pytest.raises(ConfigError, match=r"data=jsonl would leave it training on its demo data; set "
                                          r"task\.data\.source=jsonl task\.data\.path=\.\.\."):
        check_overrides(to_config(_compose(over)), over)
    over += ["model.init_from=runs/lm/hf"]
    with pytest.raises(ConfigError, match=r"task=cls fine-tunes on task\.data\.\*, not on data\.\*"):
        check_overrides(to_config(_compose(over)), over)
    for fine in (["task=lm", "data=jsonl", "data.path=my.jsonl"],
                 ["task=cls", "task.data.source=jsonl", "task.data.path=c.jsonl", "data=text", "data.path=corpus.txt",
                  "model.init_from=runs/lm/hf"]):
        caplog.clear()
        check_overrides(to_config(_compose(fine)), fine)
        assert not caplog.records
