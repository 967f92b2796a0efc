"""conf/data/*.yaml mirror DataConfig; Hydra catches bad keys/values at composition; the prepare.py CLI."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from data_pipelines.config import SOURCES, DataConfig, register_configs, to_data_config

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
FIELDS = [f.name for f in dataclasses.fields(DataConfig)]


@pytest.fixture
def hydra_prepare():
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield
    GlobalHydra.instance().clear()


def test_one_yaml_per_source_setting_only_what_differs():
    """One YAML per source; each sets only fields of DataConfig, in the dataclass's order, and names its source
    (`default` is the dataclass's own default source, so its YAML leaves it out)."""
    assert sorted(p.stem for p in (CONF / "data").glob("*.yaml")) == sorted(SOURCES)
    for src in SOURCES:
        y = yaml.safe_load((CONF / "data" / f"{src}.yaml").read_text()) or {}
        assert list(y) == [f for f in FIELDS if f in y], src  # a subset, in the dataclass's order
        assert y.get("source", DataConfig.source.value) == src


@pytest.mark.parametrize("option", SOURCES)
def test_every_option_composes_to_a_valid_config(option, hydra_prepare, tmp_path):
    overrides = [f"data={option}"]
    if option in ("text", "jsonl", "csv", "parquet", "tokens"):
        overrides.append(f"data.path={tmp_path}")
    if option == "hub":
        overrides.append("data.name=wikitext")
    cfg = compose(config_name="prepare", overrides=overrides)
    dc = to_data_config(cfg.data)
    assert isinstance(dc, DataConfig) and dc.source == option


def test_bad_key_and_bad_value_fail_at_composition(hydra_prepare):
    with pytest.raises(Exception, match="batchsize"):
        compose(config_name="prepare", overrides=["data.batchsize=8"])
    with pytest.raises(Exception, match="data.source"):
        compose(config_name="prepare", overrides=["data.source=bogus"])
    with pytest.raises(Exception, match="data.block_size"):
        compose(config_name="prepare", overrides=["data.block_size=abc"])


def test_unknown_key_in_plain_dict_is_named():
    with pytest.raises(ValueError, match="batchsize"):
        to_data_config({"batchsize": 3})


def _cli(*args, cwd=ROOT):
    return subprocess.run(
        [sys.executable, str(ROOT / "data_pipelines" / "prepare.py"), *args],
        capture_output=True, text=True, cwd=cwd, timeout=120,
    )


def test_prepare_cli_writes_tokens_and_reports_errors(tmp_path):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": f"document number {i}. " * 20}) + "\n" for i in range(50)))
    r = _cli("data=jsonl", f"data.path={tmp_path / 'a.jsonl'}", "data.vocab_size=300", f"data.cache_dir={tmp_path}/c",
             "data.block_size=16", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out_dir = Path(r.stdout.split("tokens written to ")[1].split()[0])
    meta = json.loads((out_dir / "index.json").read_text())
    assert f"train: {meta['num_tokens']['train']:,} tokens" in r.stdout and meta["vocab_size"] == 300
    assert not (tmp_path / "outputs").exists() and not (tmp_path / ".hydra").exists()  # nothing but the cache
    bad = _cli("data=text", f"data.path={tmp_path / 'missing.txt'}", cwd=tmp_path)
    assert bad.returncode != 0 and "missing.txt does not exist" in bad.stderr and "Traceback" not in bad.stderr
