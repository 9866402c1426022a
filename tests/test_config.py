"""The one config schema: YAML round trip, dotted overrides, errors that name key / value / expectation."""

from __future__ import annotations

import re
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
        (
            "ppo.clip_cof=0.1",
            ["unknown config key 'ppo.clip_cof'", "(given ppo.clip_cof=0.1)", "did you mean 'ppo.clip_coef'"],
        ),
        ("ppo.clip_coef=abc", ["ppo.clip_coef='abc'", "expected a number"]),
        ("ppo.clip_coef=1.5", ["ppo.clip_coef=1.5", "(0, 1)"]),
        ("model.arch=bert", ["model.arch='bert'", "one of 'gpt2', 'llama', 'qwen2'"]),
        ("ppo.update_epochs=1.5", ["ppo.update_epochs=1.5", "an integer"]),
        ("ppo.norm_adv=maybe", ["ppo.norm_adv='maybe'", "boolean"]),
        ("nosuch.key=1", ["unknown config key 'nosuch'", "(given nosuch.key=1)"]),
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
    with pytest.raises(
        ConfigError, match=r"unknown.yaml:2: unknown config key 'ppo.clipcoef' \(given ppo.clipcoef=0.1\)"
    ):
        load_config(unknown)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_a_config_path_typed_outside_the_checkout_points_at_the_checkouts_copy(tmp_path, monkeypatch):
    """README commands name configs/demo.yaml relative to the repository root; typed in another directory, the
    error named the missing file and suggested that same path. Now it names the copy that exists."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as e:
        load_config("configs/demo.yaml")
    assert str(ROOT / "configs" / "demo.yaml") in str(e.value) and str(tmp_path) in str(e.value), str(e.value)


def test_config_errors_blame_the_right_source_with_its_line(tmp_path):
    """A bad key or value in the file names file:line; one in a command-line override names the override, not
    the file (which does not contain it); an unclosed bracket is placed where it opened; a tab gets its fix."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("ppo:\n  clip_coef: 0.1\n\nsft:\n  epochs: 2\n  epoch: 25\n  lr: abc\n")
    with pytest.raises(ConfigError) as e:
        load_config(cfg)
    assert str(e.value).startswith(f"{cfg}:6: unknown config key 'sft.epoch'"), str(e.value)
    cfg.write_text("ppo:\n  clip_coef: 0.1\n\nsft:\n  epochs: two\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(cfg))}:5: sft.epochs='two': expected an integer"):
        load_config(cfg)
    cfg.write_text("ppo:\n  clip_coef: 0.1\n")
    for override, start in (
        ("sft.epoch=1", "override sft.epoch=1: unknown config key 'sft.epoch'"),
        ("ppo.iterations=two", "override ppo.iterations=two: ppo.iterations='two': expected an integer"),
        ("ppo.clip_coef=1.5", "override ppo.clip_coef=1.5: ppo.clip_coef=1.5"),  # in the file too: the override's
    ):
        with pytest.raises(ConfigError) as e:
            load_config(cfg, [override])
        assert str(e.value).startswith(start) and str(cfg) not in str(e.value), str(e.value)
    cfg.write_text("ppo:\n  clip_coef: 0.1\nmodel:\n  n_layer: [2\n  n_embd: 64\n")
    with pytest.raises(ConfigError) as e:
        load_config(cfg)
    assert f"{cfg}:5: invalid YAML" in str(e.value) and "line 4" in str(e.value), str(e.value)
    cfg.write_text("ppo:\n\tclip_coef: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(cfg)
    assert f"{cfg}:2: invalid YAML" in str(e.value) and "indent with spaces" in str(e.value), str(e.value)
    # a missing comma inside a closed multi-line list is not an unclosed bracket: the line where it is missing
    cfg.write_text('reward:\n  safety_patterns: [\n    "a",\n    "b"\n    "c",\n  ]\n')
    with pytest.raises(ConfigError) as e:
        load_config(cfg)
    assert f"{cfg}:5: invalid YAML" in str(e.value) and "line 2" in str(e.value), str(e.value)
    # an error without a line mark (a control character) still names its line
    cfg.write_text("ppo:\n  clip_coef: 0.1\x07\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(cfg))}:2: invalid YAML"):
        load_config(cfg)
    # a renamed key (ppo.kl_target -> ppo.adaptive_kl_target) is blamed where it was written, under its old name
    cfg.write_text("ppo:\n  iterations: 2\n\n  kl_target: abc\n")
    with pytest.warns(FutureWarning), pytest.raises(ConfigError) as e:
        load_config(cfg)
    assert str(e.value).startswith(f"{cfg}:4: "), str(e.value)
    cfg.write_text("ppo:\n  iterations: 2\n")
    with pytest.warns(FutureWarning), pytest.raises(ConfigError) as e:
        load_config(cfg, ["ppo.kl_target=abc"])
    assert str(e.value).startswith("override ppo.kl_target=abc: "), str(e.value)
    # a section set to a non-mapping: in the file, its line; by an override, the override
    cfg.write_text("sft:\n  epochs: 2\nppo: 5\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(cfg))}:3: ppo=5: expected a mapping"):
        load_config(cfg)
    cfg.write_text("sft:\n  epochs: 2\n")
    with pytest.raises(ConfigError, match=r"^override ppo=5: ppo=5: expected a mapping"):
        load_config(cfg, ["ppo=5"])


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


def test_docs_config_table_is_the_generated_one(capsys):
    """Not just every key: defaults and meanings too, exactly as `rlchat config keys --markdown` prints them."""
    from rlchat.cli import config_keys

    config_keys(markdown=True)
    table = capsys.readouterr().out
    text = (ROOT / "docs" / "config.md").read_text(encoding="utf-8")
    assert text.endswith(table), (
        "docs/config.md's table differs from the schema; regenerate it: keep the prose above the table and replace "
        "the table with the output of `rlchat config keys --markdown`"
    )


# ---------------------------------------------------------------------------------------------- review findings


@pytest.mark.parametrize("raw", [".nan", "nan", ".inf", "inf", "-.inf", "-inf", "'NaN'"])
@pytest.mark.parametrize("key", ["ppo.vf_coef", "serve.batch_wait_timeout_s", "reward.plugins.m:f"])
def test_non_finite_floats_are_refused_naming_key_and_value(key, raw):
    override = f"reward.plugins={{'m:f': {raw}}}" if key.startswith("reward.plugins") else f"{key}={raw}"
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    msg = str(e.value)
    assert msg.startswith(f"{key}=") and "expected a finite number" in msg, msg
    value = msg[len(key) + 1 : msg.index(": expected")]  # the value as given: nan, inf, 'inf', 'NaN', ...
    assert value.strip("'").lower().lstrip("-.") in ("nan", "inf"), msg


def test_non_finite_floats_in_yaml_and_in_python(tmp_path):
    f = tmp_path / "nan.yaml"
    f.write_text("ppo:\n  ent_coef: .nan\n")
    with pytest.raises(ConfigError, match=r"nan.yaml:2: ppo.ent_coef=nan: expected a finite number, found NaN"):
        load_config(f)
    from rlchat.config import PPOConfig

    with pytest.raises(ConfigError, match=r"ppo.adaptive_kl_target=inf: expected a finite number"):
        Config(ppo=PPOConfig(adaptive_kl_target=float("inf")))  # built in Python: no parser ran


def test_infinite_default_round_trips_but_other_infinities_do_not(tmp_path):
    # data.min_quality's default -inf means "no threshold"; YAML (-.inf) and checkpoint meta ("-inf") carry it
    assert load_config(None, ["data.min_quality=-.inf"]).data.min_quality == float("-inf")
    assert load_config(None, ["data.min_quality='-inf'"]).data.min_quality == float("-inf")
    save_config(Config(), tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == Config()
    with pytest.raises(ConfigError, match=r"data.min_quality='inf': .*only infinite value data.min_quality accepts"):
        load_config(None, ["data.min_quality='inf'"])
    with pytest.raises(ConfigError, match=r"data.min_quality=nan"):
        load_config(None, ["data.min_quality=.nan"])


@pytest.mark.parametrize(
    "overrides, fragments",
    [
        (["ppo.vf_coef=-0.5"], ["ppo.vf_coef=-0.5", "non-negative", "critic", "use 0.5"]),
        (["ppo.ent_coef=-0.01"], ["ppo.ent_coef=-0.01", "non-negative", "collapse", "use 0.0"]),
        (["ppo.max_grad_norm=0"], ["ppo.max_grad_norm=0.0", "positive", "zeroes every update", "use 0.5-1.0"]),
        (["sft.max_grad_norm=-1"], ["sft.max_grad_norm=-1.0", "positive"]),
        (["rm.max_grad_norm=0"], ["rm.max_grad_norm=0.0", "positive"]),
        (["ppo.target_kl=-0.01"], ["ppo.target_kl=-0.01", "0 = off", "silently disable", "use 0 to disable"]),
        (["ppo.kl_coef=-0.1"], ["ppo.kl_coef=-0.1", "non-negative", "reference", "use 0 to disable"]),
        (
            ["ppo.adaptive_kl=true", "ppo.adaptive_kl_target=0"],
            ["ppo.adaptive_kl_target=0.0", "positive target", "adaptive_kl=false"],
        ),
        (["ppo.adaptive_kl=true", "ppo.kl_horizon=0"], ["ppo.kl_horizon=0", "positive horizon", "10000"]),
        (["ppo.adaptive_kl=true", "ppo.kl_coef=0"], ["ppo.kl_coef=0.0", "can never move", "use e.g. 0.05"]),
        (["ppo.weight_decay=-1"], ["ppo.weight_decay=-1.0", "non-negative"]),
        (["ppo.max_ref_kl=-1"], ["ppo.max_ref_kl=-1.0", "guardrail", "0 = off"]),
        (["ppo.min_entropy=-1"], ["ppo.min_entropy=-1.0", "guardrail"]),
        (["ppo.max_repetition=1.5"], ["ppo.max_repetition=1.5", "[0, 1]"]),
        (["data.max_line_bytes=0"], ["data.max_line_bytes=0", "positive number of bytes", "1048576"]),
    ],
)
def test_ppo_coefficient_ranges_say_what_why_and_fix(overrides, fragments):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    for frag in fragments:
        assert frag in str(e.value), str(e.value)


def test_boundary_values_of_ppo_coefficients_are_accepted():
    cfg = load_config(
        None,
        [
            "ppo.vf_coef=0",
            "ppo.ent_coef=0",
            "ppo.target_kl=0",
            "ppo.kl_coef=0",
            "ppo.adaptive_kl_target=0",
            "ppo.max_ref_kl=0",
        ],
    )
    assert cfg.ppo.adaptive_kl_target == 0.0  # unused while ppo.adaptive_kl is false
    assert load_config(
        None, ["ppo.adaptive_kl=true", "ppo.adaptive_kl_target=0.5", "ppo.kl_horizon=1"]
    ).ppo.adaptive_kl


@pytest.mark.parametrize("override", ["rollout.top_k=40", "rollout.top_k=1", "rollout.top_p=0.9", "rollout.top_k=-1"])
def test_rollout_filtering_is_refused_for_ppo(override):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    msg = str(e.value)
    assert msg.startswith(override.split("=")[0] + "=")
    assert "PPO ratio" in msg and "set rollout.top_k=0 and rollout.top_p=1.0" in msg


def test_rollout_temperature_and_unfiltered_sampling_are_fine():
    cfg = load_config(None, ["rollout.temperature=0.7", "rollout.top_k=0", "rollout.top_p=1.0"])
    assert (cfg.rollout.temperature, cfg.rollout.top_k, cfg.rollout.top_p) == (0.7, 0, 1.0)


# Decoding parameters are not part of the schema, but they raise the same ConfigError style, and the chat CLI, Serve
# and batch generation show these messages to users as they are (tests/test_generation.py covers the engine).
@pytest.mark.parametrize(
    "field, value, fix",
    [
        ("max_new_tokens", 0, "max_new_tokens=64"),
        ("min_new_tokens", -1, "use 0"),
        ("temperature", -0.5, "0 for greedy decoding"),
        ("temperature", float("nan"), "use 1.0"),
        ("top_k", -1, "use 0 to sample from every token"),
        ("top_p", 0.0, "use 1.0 to turn nucleus sampling off"),
        ("top_p", 1.5, "e.g. 0.9"),
        ("repetition_penalty", 0.0, "use 1.0 to turn it off"),
        ("num_beams", 0, "e.g. 4 for beam search"),
        ("stop_strings", ("END", ""), "remove the empty string"),
    ],
)
def test_sampling_params_errors_say_how_to_fix(field, value, fix):
    from rlchat.generation import SamplingParams

    with pytest.raises(ConfigError) as e:
        SamplingParams(**{field: value})
    msg = str(e.value)
    assert msg.startswith(f"SamplingParams.{field}={value!r}: expected "), msg
    assert fix in msg.split("; ", 1)[1], msg


def test_ppo_refuses_a_context_the_model_cannot_hold(tmp_path):
    # env.max_context bounds every conversation the env builds (prompt + replies of up to env.max_turn_tokens);
    # the policy must hold that many positions, or the first long prompt fails mid-run. Checked when PPO starts
    # (check_ppo_config), since only PPO steps the env: an SFT config may well use a short model.
    from rlchat.checkpoint import save_checkpoint
    from rlchat.learner import check_ppo_config
    from rlchat.model import PolicyValueModel
    from rlchat.tokenizer import ChatTokenizer

    gpu = load_config(ROOT / "configs" / "gpu.yaml")
    check_ppo_config(gpu)  # 1024 context, 1024 positions
    with pytest.raises(ConfigError) as e:
        check_ppo_config(gpu.replace(**{"env.max_context": 2048}))
    msg = str(e.value)
    for fragment in ("env.max_context=2048", "model.n_positions (1024)", "env.max_turn_tokens=128", "lower env."):
        assert fragment in msg, msg
    Config().replace(**{"model.n_positions": 64})  # not PPO: no refusal at construction
    # a local pretrained model: the positions of its config.json
    model_dir = tmp_path / "hf"
    model_dir.mkdir()
    (model_dir / "config.json").write_text('{"model_type": "llama", "max_position_embeddings": 64}')
    small = {"env.max_context": 128, "env.max_turn_tokens": 16, "model.name_or_path": str(model_dir)}
    with pytest.raises(ConfigError, match=r"env\.max_context=128: expected at most .*hf.* \(64\)"):
        check_ppo_config(Config().replace(**small))
    check_ppo_config(Config().replace(**{**small, "model.name_or_path": "org/some-hub-model"}))  # unknown: not checked
    # the checkpoint PPO starts from (checkpoint.init_from)
    tiny = Config().replace(**{"tokenizer.vocab_size": 4096, "model.n_layer": 1, "model.n_embd": 32})
    tiny = tiny.replace(
        **{"model.n_head": 2, "model.n_positions": 64, "env.max_context": 64, "env.max_turn_tokens": 8}
    )
    tok = ChatTokenizer.from_config(tiny.tokenizer)
    ckpt = save_checkpoint(
        tmp_path / "ckpt", model=PolicyValueModel.build(tiny, tok), tokenizer=tok, config=tiny, stage="sft", step=1
    )
    check_ppo_config(tiny.replace(**{"checkpoint.init_from": str(ckpt)}))
    with pytest.raises(ConfigError, match=r"env\.max_context=128: expected at most .*ckpt.* \(64\)"):
        check_ppo_config(tiny.replace(**{"checkpoint.init_from": str(ckpt), "env.max_context": 128}))


def test_k3_is_refused_in_the_reward_and_offered_as_a_loss_term():
    # k3 as a detached per-token reward: its score-function gradient is not the KL's gradient (~0 near the
    # reference; Shah et al. 2025, "A Comedy of Estimators"). As a loss term (GRPO) it is differentiated directly.
    with pytest.raises(ConfigError) as e:
        Config().replace(**{"ppo.kl_estimator": "k3"})
    msg = str(e.value)
    for fragment in ("ppo.kl_estimator='k3'", "biased gradient", "ppo.kl_in_loss=true", "ppo.kl_estimator=k1"):
        assert fragment in msg, msg
    assert Config().replace(**{"ppo.kl_estimator": "k3", "ppo.kl_in_loss": True}).ppo.kl_in_loss
    with pytest.raises(ConfigError, match=r"ppo\.kl_in_loss=True.*zero expected gradient.*ppo\.kl_estimator=k3"):
        Config().replace(**{"ppo.kl_in_loss": True})  # k1 as a loss term


def test_tune_spaces_do_not_sweep_the_kl_estimator_as_an_equivalent_choice(tmp_path):
    from tune.sweep import load_space

    base = load_config(ROOT / "configs" / "demo.yaml")
    for path in sorted((ROOT / "tune" / "spaces").glob("*.yaml")):
        assert "ppo.kl_estimator" not in load_space(path, base).params, path
    space = tmp_path / "space.yaml"
    space.write_text("ppo.kl_estimator: {choice: [k1, k3]}\n")
    with pytest.raises(ConfigError, match=r"value 'k3' .* not valid with the base config: .*ppo\.kl_in_loss=true"):
        load_space(space, base)


def test_renamed_kl_target_is_accepted_with_a_deprecation_warning(tmp_path) -> None:
    """ppo.kl_target (the adaptive controller's target) is now ppo.adaptive_kl_target; the old key still works, with
    a one-line FutureWarning, from YAML and from key=value; giving both is an error."""
    with pytest.warns(FutureWarning, match=r"ppo.kl_target is renamed ppo.adaptive_kl_target"):
        assert load_config(None, ["ppo.kl_target=3.5"]).ppo.adaptive_kl_target == 3.5
    old = tmp_path / "old.yaml"
    old.write_text("ppo:\n  kl_target: 2.5\n", encoding="utf-8")
    with pytest.warns(FutureWarning, match="renamed"):
        assert load_config(old).ppo.adaptive_kl_target == 2.5
    both = tmp_path / "both.yaml"
    both.write_text("ppo:\n  kl_target: 2.5\n  adaptive_kl_target: 3.0\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="both set"):
        load_config(both)


def test_overrides_may_follow_flags_on_the_command_line(capsys):
    """``rlchat serve CKPT --port 8123 serve.max_batch_size=1`` failed with "unrecognized arguments": argparse
    stops filling the overrides at the first flag. Overrides are taken wherever they stand; anything else unknown
    is still an error."""
    from rlchat.cli.parser import main

    config = str(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")
    assert main(["config", "show", "ppo.clip_coef=0.15", "--config", config, "ppo.iterations=7"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["ppo"]["clip_coef"] == 0.15 and shown["ppo"]["iterations"] == 7
    with pytest.raises(SystemExit) as exit_:
        main(["config", "show", "--config", config, "--no-such-flag"])
    assert exit_.value.code == 2 and "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


def test_a_command_piped_into_head_ends_quietly(tmp_path):
    """``rlchat config keys | head -1`` ended in a ``BrokenPipeError`` traceback once ``head`` closed the pipe."""
    rlchat = Path(sys.executable).with_name("rlchat")
    out = subprocess.run(
        f"'{rlchat}' config keys | head -1", shell=True, capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert out.stdout.startswith("seed") and "Traceback" not in out.stderr and "BrokenPipe" not in out.stderr, out
