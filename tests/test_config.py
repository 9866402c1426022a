"""The one config schema: YAML round trip, dotted overrides, errors that name key / value / expectation."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rlchat.config import (
    Config,
    describe_keys,
    field_docs,
    from_dict,
    load_config,
    parse_override,
    save_config,
    to_yaml,
)
from rlchat.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_valid_and_frozen():
    cfg = Config()
    assert cfg.ppo.clip_coef == 0.2
    with pytest.raises(AttributeError):
        cfg.ppo.clip_coef = 0.3  # type: ignore[misc]


def test_yaml_round_trip(tmp_path):
    cfg = load_config(ROOT / "configs" / "demo.yaml", ["ppo.clip_coef=0.1", "reward.plugins={'m:f': 0.5}"])
    save_config(cfg, tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert again == cfg
    assert again.reward.plugins == {"m:f": 0.5}
    assert again.tokenizer.vocab_size == 4096


def test_overrides_are_typed():
    cfg = load_config(None, ["ppo.learning_rate=1e-4", "ppo.norm_adv=false", "data.blocklist=[a, b]", "seed=7"])
    assert cfg.ppo.learning_rate == pytest.approx(1e-4) and isinstance(cfg.ppo.learning_rate, float)
    assert cfg.ppo.norm_adv is False
    assert cfg.data.blocklist == ("a", "b")
    assert cfg.seed == 7
    assert parse_override("model.name_or_path=") == ("model.name_or_path", "")


def test_flat_and_replace_use_dotted_keys():
    cfg = Config()
    flat = cfg.flat()
    assert flat["ppo.clip_coef"] == 0.2 and "reward.plugins" in flat
    assert cfg.replace(**{"ppo.clip_coef": 0.3}).ppo.clip_coef == 0.3
    assert from_dict(yaml.safe_load(to_yaml(cfg))) == cfg


@pytest.mark.parametrize(
    "override, fragments",
    [
        ("ppo.clip_cof=0.1", ["unknown config key 'ppo.clip_cof'", "did you mean 'ppo.clip_coef'"]),
        ("ppo.clip_coef=abc", ["ppo.clip_coef='abc'", "expected a number"]),
        ("ppo.clip_coef=1.5", ["ppo.clip_coef=1.5", "(0, 1)"]),
        ("model.arch=bert", ["model.arch='bert'", "one of 'gpt2', 'llama', 'qwen2'"]),
        ("ppo.update_epochs=1.5", ["ppo.update_epochs=1.5", "an integer"]),
        ("ppo.norm_adv=maybe", ["ppo.norm_adv='maybe'", "boolean"]),
        ("nosuch.key=1", ["unknown config key 'nosuch'"]),
        ("ppo.num_minibatches=7", ["ppo.num_minibatches=7", "divisor"]),
        ("novalue", ["expected key=value"]),
    ],
)
def test_bad_values_raise_config_error(override, fragments):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    for frag in fragments:
        assert frag in str(e.value)


def test_yaml_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("ppo:\n  clip_coef: 0.1\n  gamma: [1,\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: invalid YAML"):
        load_config(bad)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("ppo:\n  clipcoef: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown.yaml: unknown config key 'ppo.clipcoef'"):
        load_config(unknown)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_every_field_is_documented():
    rows = describe_keys()
    assert len(rows) > 100
    missing = [key for key, _, doc in rows if not doc]
    assert missing == []
    assert "Surrogate clipping" in field_docs(type(Config().ppo))["clip_coef"]


def test_cli_config_show_from_any_directory(tmp_path):
    demo = ROOT / "configs" / "demo.yaml"
    out = subprocess.run(
        [sys.executable, "-m", "rlchat.cli", "config", "show", "--config", str(demo), "ppo.clip_coef=0.15"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    shown = yaml.safe_load(out)
    assert shown["ppo"]["clip_coef"] == 0.15 and shown["tokenizer"]["vocab_size"] == 4096
    bad = subprocess.run(
        [sys.executable, "-m", "rlchat.cli", "config", "show", "ppo.clip_coef=9"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "ppo.clip_coef=9" in bad.stderr and "Traceback" not in bad.stderr


def test_docs_config_table_lists_every_key():
    text = (ROOT / "docs" / "config.md").read_text(encoding="utf-8")
    missing = [key for key, _, _ in describe_keys() if f"| `{key}` |" not in text]
    assert missing == [], f"docs/config.md is missing {missing}; regenerate the table from `rlchat config keys`"
