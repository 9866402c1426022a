"""The checkpoint format: atomic saves (SIGKILL), weights_only resume state with RNG, clear load errors,
keep-last + best retention, and loading in plain transformers."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from rlchat.checkpoint import (
    INDEX_FILE,
    CheckpointManager,
    capture_rng_state,
    find_best_checkpoint,
    load_policy,
    load_reward_model,
    read_checkpoint,
    resolve_checkpoint_dir,
    restore_rng_state,
    save_checkpoint,
)
from rlchat.config import Config
from rlchat.errors import CheckpointError
from rlchat.model import PolicyValueModel, RewardModel
from rlchat.tokenizer import ChatTokenizer

VOCAB = 4096


@pytest.fixture(scope="module")
def tok() -> ChatTokenizer:
    return ChatTokenizer("cl100k_base", VOCAB)


@pytest.fixture(scope="module")
def cfg() -> Config:
    return Config().replace(
        **{"tokenizer.vocab_size": VOCAB, "model.n_layer": 1, "model.n_embd": 32, "model.n_head": 2, "seed": 7}
    )


@pytest.fixture(scope="module")
def model(tok, cfg) -> PolicyValueModel:
    return PolicyValueModel.build(cfg, tok).eval()


def _save(path: Path, model, tok, cfg, step: int = 1, stage: str = "sft", **kw) -> Path:
    return save_checkpoint(path, model=model, tokenizer=tok, config=cfg, stage=stage, step=step, **kw)


# ----------------------------------------------------------------------------------------------- format and meta


def test_save_writes_hf_files_and_complete_meta(tmp_path, model, tok, cfg):
    path = _save(tmp_path / "ck", model, tok, cfg, step=12, weights_version=3, metrics={"sft/loss": 1.5, "x": np.nan})
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "meta.json", "rlchat_tokenizer.json", "tokenizer.json"} <= names
    assert not any(p.suffix in (".bin", ".pkl") for p in path.iterdir())  # no pickled weights
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no temp dir left behind

    meta = json.loads((path / "meta.json").read_text())  # strict JSON (no NaN / Infinity literals)
    assert meta["stage"] == "sft" and meta["step"] == 12 and meta["weights_version"] == 3
    assert meta["metrics"] == {"sft/loss": 1.5, "x": None}
    assert meta["tokenizer"]["vocab_size"] == VOCAB and meta["tokenizer"]["special_tokens"]["<|end|>"] == tok.eot_id
    assert meta["versions"]["torch"] == torch.__version__ and meta["versions"]["transformers"]
    assert meta["files"]["model.safetensors"] == (path / "model.safetensors").stat().st_size
    assert meta["has_train_state"] is False and meta["created"]

    ckpt = read_checkpoint(path, expect_tokenizer=tok, expect_stage="sft")
    assert ckpt.config == cfg  # includes data.min_quality=-inf, stored as the string "-inf"
    assert ckpt.config.data.min_quality == float("-inf")
    assert ckpt.step == 12 and ckpt.weights_version == 3 and ckpt.stage == "sft"
    assert ckpt.tokenizer.encode("hello world") == tok.encode("hello world")
    assert ckpt.load_train_state() is None


def test_loads_in_plain_transformers_with_same_logits_and_token_ids(tmp_path, model, tok, cfg):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = _save(tmp_path / "ck", model, tok, cfg)
    hf = AutoModelForCausalLM.from_pretrained(path).eval()
    hf_tok = AutoTokenizer.from_pretrained(path)
    messages = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "What is 2+2? Ünïcödé 🙂"}]
    ids = tok.render_prompt(messages)
    # the exported chat template and special tokens give exactly rlchat's ids
    assert hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == tok.decode(ids)
    assert hf_tok(tok.decode(ids), add_special_tokens=False)["input_ids"] == ids
    assert hf_tok.decode(ids) == tok.decode(ids)
    x = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model.lm(x).logits)
    # HF generation stops where rlchat does (<|end|>) and pads with <|pad|> without extra arguments
    assert hf.generation_config.eos_token_id == tok.eot_id
    assert hf.generation_config.pad_token_id == tok.pad_id


def test_hf_greedy_reply_equals_rlchat_engine(tmp_path, model, tok, cfg):
    from transformers import AutoModelForCausalLM

    from rlchat.generation import GenerationEngine, SamplingParams

    path = _save(tmp_path / "ck", model, tok, cfg)
    hf = AutoModelForCausalLM.from_pretrained(path).eval()
    policy, ptok, _ = load_policy(path)
    engine = GenerationEngine(policy.eval(), ptok)
    prompts = [
        tok.render_prompt([{"role": "user", "content": text}])
        for text in ("What is 2+2?", "Tell me a story about a cat.", "héllo 🙂")
    ]
    res = engine.generate(prompts, SamplingParams(temperature=0, max_new_tokens=16))
    for prompt, tokens in zip(prompts, res.tokens):
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=16)
        assert out[0, len(prompt) :].tolist() == tokens
    # stopping agrees too: make the engine's 5th greedy token an extra stop id on both sides
    stop = res.tokens[0][4]
    res = engine.generate(prompts[:1], SamplingParams(temperature=0, max_new_tokens=16, stop_token_ids=(stop,)))
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([prompts[0]]), do_sample=False, max_new_tokens=16, eos_token_id=[tok.eot_id, stop]
        )
    assert out[0, len(prompts[0]) :].tolist() == res.tokens[0] and res.tokens[0][-1] == stop


# ----------------------------------------------------------------------------------------------- resume state


def test_train_state_round_trip_weights_only_and_rng_replay(tmp_path, model, tok, cfg):
    model = PolicyValueModel.build(cfg, tok)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.5, total_iters=10)
    x = torch.tensor([[1, 2, 3, 4]])
    out = model(x, torch.ones_like(x))
    (out.logprobs.sum() + out.values.sum()).backward()
    opt.step()
    sched.step()
    opt.zero_grad()

    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)  # leaves a cached gaussian in python's state
    np.random.normal()  # and in numpy's
    order = torch.randperm(10)
    state = {
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "rng": capture_rng_state(),
        "kl": {"coef": 0.05, "history": [0.1, 0.2]},
        "data": {"epoch": 1, "position": 17, "order": order},
    }
    expected = (torch.rand(5), np.random.rand(5), [random.random() for _ in range(5)], random.gauss(0, 1))
    expected_normal = np.random.normal(size=3)

    path = _save(tmp_path / "ck", model, tok, cfg, train_state=state)
    loaded = torch.load(path / "train_state.pt", weights_only=True)  # the file itself is weights_only-safe
    assert loaded["data"]["position"] == 17 and loaded["kl"] == {"coef": 0.05, "history": [0.1, 0.2]}
    loaded = read_checkpoint(path).load_train_state()
    assert torch.equal(loaded["data"]["order"], state["data"]["order"])
    assert loaded["scheduler"] == sched.state_dict()

    # the optimizer continues exactly: its state tensors are equal after loading into a fresh optimizer
    opt2 = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt2.load_state_dict(loaded["optimizer"])
    for p in model.parameters():
        if p not in opt.state:
            continue
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt2.state[p][k], opt.state[p][k])

    # RNG replay: scramble every generator, restore, and draw the same numbers
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    restore_rng_state(loaded["rng"])
    assert torch.equal(torch.rand(5), expected[0])
    np.testing.assert_array_equal(np.random.rand(5), expected[1])
    assert [random.random() for _ in range(5)] == expected[2]
    assert random.gauss(0, 1) == expected[3]
    np.testing.assert_array_equal(np.random.normal(size=3), expected_normal)


def test_train_state_that_needs_pickle_is_rejected_before_writing(tmp_path, model, tok, cfg):
    with pytest.raises(TypeError, match=r"train_state\['data'\]\['order'\].*numpy.*torch.from_numpy"):
        _save(tmp_path / "ck", model, tok, cfg, train_state={"data": {"order": np.arange(3)}})
    with pytest.raises(TypeError, match=r"train_state\['fn'\]"):
        _save(tmp_path / "ck", model, tok, cfg, train_state={"fn": lambda: 0})
    assert list(tmp_path.iterdir()) == []  # nothing half-written


# ----------------------------------------------------------------------------------------------- load errors


def test_read_checkpoint_errors_say_what_and_how_to_fix(tmp_path, model, tok, cfg):
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        read_checkpoint(tmp_path / "nope")
    (tmp_path / "hf_only").mkdir()
    with pytest.raises(CheckpointError, match="no meta.json, so this is not a complete rlchat checkpoint"):
        read_checkpoint(tmp_path / "hf_only")

    good = _save(tmp_path / "good", model, tok, cfg, stage="rm")
    with pytest.raises(CheckpointError, match=r"a reward-model checkpoint \(stage 'rm'\); expected stage 'sft' or"):
        read_checkpoint(good, expect_stage=("sft", "ppo"))

    other = ChatTokenizer("cl100k_base", 8192)
    with pytest.raises(CheckpointError, match=r"tokenizer differs.*n_vocab=4096, expected 8192.*vocab_size=4096"):
        read_checkpoint(good, expect_tokenizer=other)

    def broken(name: str) -> Path:
        return Path(shutil.copytree(good, tmp_path / name))

    p = broken("corrupt")
    text = (p / "meta.json").read_text()
    (p / "meta.json").write_text(text[: len(text) // 2])
    with pytest.raises(CheckpointError, match=r"meta.json:\d+:\d+: corrupt meta.json"):
        read_checkpoint(p)

    p = broken("newer")
    meta = json.loads((p / "meta.json").read_text())
    (p / "meta.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(CheckpointError, match="format 99 is newer than this rlchat reads"):
        read_checkpoint(p)

    p = broken("badconfig")
    (p / "meta.json").write_text(json.dumps({**meta, "config": {**meta["config"], "ppo": {"clip_coef": 5}}}))
    with pytest.raises(CheckpointError, match=r"config is incompatible.*ppo.clip_coef=5"):
        read_checkpoint(p)

    p = broken("noweights")
    (p / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing model.safetensors"):
        read_checkpoint(p)

    p = broken("truncated")
    with open(p / "model.safetensors", "r+b") as f:
        f.truncate(100)
    with pytest.raises(CheckpointError, match=r"model.safetensors: 100 bytes, expected \d+.*truncated"):
        read_checkpoint(p)

    p = broken("badstate")
    (p / "train_state.pt").write_bytes(b"garbage")
    meta["files"]["train_state.pt"] = 7
    (p / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="cannot load the resume state"):
        read_checkpoint(p).load_train_state()


def test_load_policy_and_reward_model_give_identical_outputs(tmp_path, model, tok, cfg):
    x = torch.tensor([tok.render_prompt([{"role": "user", "content": "hi there"}]) + [5, 6, 7]])
    m = torch.ones_like(x)
    path = _save(tmp_path / "pol", model, tok, cfg, stage="ppo", weights_version=4)
    loaded, loaded_tok, ckpt = load_policy(path, expect_tokenizer=tok)
    assert isinstance(loaded, PolicyValueModel) and ckpt.weights_version == 4
    assert loaded_tok.render_prompt([{"role": "user", "content": "x"}]) == tok.render_prompt(
        [{"role": "user", "content": "x"}]
    )
    with torch.no_grad():
        a, b = model(x, m), loaded.eval()(x, m)
    torch.testing.assert_close(a.logprobs, b.logprobs, rtol=0, atol=0)
    torch.testing.assert_close(a.values, b.values, rtol=0, atol=0)
    with pytest.raises(CheckpointError, match="a PPO policy checkpoint .* expected stage 'rm'"):
        load_reward_model(path)
    # a DDP-style wrapper (.module) is unwrapped: the saved weights are the inner model's
    wrapped = _save(tmp_path / "wrapped", SimpleNamespace(module=model), tok, cfg, stage="sft")
    assert read_checkpoint(wrapped).meta["model_class"] == "PolicyValueModel"
    with torch.no_grad():
        torch.testing.assert_close(load_policy(wrapped)[0].eval()(x, m).values, a.values, rtol=0, atol=0)

    rm = RewardModel.build(cfg, tok).eval()
    rm_path = _save(tmp_path / "rm", rm, tok, cfg, stage="rm", metrics={"rm/val_accuracy": 0.75})
    loaded_rm, _, rm_ckpt = load_reward_model(rm_path)
    assert rm_ckpt.metrics == {"rm/val_accuracy": 0.75}
    with torch.no_grad():
        torch.testing.assert_close(rm(x, m), loaded_rm.eval()(x, m), rtol=0, atol=0)
    with pytest.raises(CheckpointError, match="a reward-model checkpoint"):
        load_policy(rm_path)


# ----------------------------------------------------------------------------------------------- retention


def test_manager_keeps_last_plus_best_and_survives_a_new_process(tmp_path, model, tok, cfg):
    mgr = CheckpointManager(tmp_path, keep_last=2, best_metric="val/acc", best_mode="max")
    values = [0.1, 0.9, 0.3, 0.2, 0.5]
    for step, v in enumerate(values, 1):
        path = mgr.save(step * 10, model=model, tokenizer=tok, config=cfg, stage="sft", metrics={"val/acc": v})
        assert path.name == f"step_{step * 10:06d}"
    ckpts = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if not p.name.startswith(".") and p.is_dir()) == [
        "step_000020",
        "step_000040",
        "step_000050",
    ]
    assert mgr.latest() == ckpts / "step_000050" and mgr.best() == ckpts / "step_000020"
    index = json.loads((ckpts / INDEX_FILE).read_text())
    assert index["latest"] == "step_000050" and index["best"] == "step_000020" and index["best_value"] == 0.9
    assert index["best_metric"] == "val/acc" and index["best_mode"] == "max"
    assert [c["step"] for c in index["checkpoints"]] == [20, 40, 50]

    # a resumed run (new manager) sees the same state; a later, better checkpoint takes over as best
    mgr2 = CheckpointManager(tmp_path, keep_last=2, best_metric="val/acc", best_mode="max")
    assert mgr2.latest() == mgr.latest() and mgr2.best() == mgr.best()
    mgr2.save(60, model=model, tokenizer=tok, config=cfg, stage="sft", metrics={"val/acc": 0.95})
    assert mgr2.best() == ckpts / "step_000060"
    assert not (ckpts / "step_000020").exists() and (ckpts / "step_000050").exists()

    # serve --from-run / best / latest aliases find it from the run directory alone (index.json, no symlinks)
    assert find_best_checkpoint(tmp_path) == ckpts / "step_000060"
    assert resolve_checkpoint_dir(ckpts / "best") == ckpts / "step_000060"
    assert resolve_checkpoint_dir(ckpts / "latest") == ckpts / "step_000060"
    assert read_checkpoint(tmp_path).step == 60


def test_manager_min_mode_missing_metric_and_keep_last_zero(tmp_path, model, tok, cfg, caplog):
    mgr = CheckpointManager(tmp_path / "a", keep_last=0, best_metric="sft/val_loss", best_mode="min")
    for step, v in [(1, 2.0), (2, 1.0), (3, 1.5), (4, float("nan"))]:
        mgr.save(step, model=model, tokenizer=tok, config=cfg, stage="sft", metrics={"sft/val_loss": v})
    # keep_last=0: only the best and the newest (needed to resume) remain; NaN is never best
    assert sorted(p.name for p in (tmp_path / "a/checkpoints").glob("step_*")) == ["step_000002", "step_000004"]
    assert mgr.best().name == "step_000002" and mgr.latest().name == "step_000004"

    with caplog.at_level("WARNING"):
        mgr = CheckpointManager(tmp_path / "b", keep_last=1, best_metric="eval/reward_mean")
        mgr.save(1, model=model, tokenizer=tok, config=cfg, stage="ppo", metrics={"rollout/reward_mean": 0.1})
        mgr.save(2, model=model, tokenizer=tok, config=cfg, stage="ppo")
    assert "best_metric='eval/reward_mean' is not among the metrics" in caplog.text
    assert mgr.best().name == "step_000002" == mgr.latest().name  # no metric anywhere: best is the latest

    sft_default = CheckpointManager.from_config(tmp_path / "c", cfg, "sft")
    assert (sft_default.best_metric, sft_default.best_mode) == ("sft/val_loss", "min")
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        find_best_checkpoint(tmp_path / "c")


def test_overwrite_same_step_replaces_it_cleanly(tmp_path, model, tok, cfg):
    mgr = CheckpointManager(tmp_path, keep_last=2, best_metric="m")
    mgr.save(5, model=model, tokenizer=tok, config=cfg, stage="sft", metrics={"m": 1.0})
    mgr.save(5, model=model, tokenizer=tok, config=cfg, stage="sft", metrics={"m": 2.0})
    assert read_checkpoint(tmp_path / "checkpoints/step_000005").metrics == {"m": 2.0}
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["index.json", "step_000005"]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_new_manager_sweeps_leftovers_of_crashed_saves(tmp_path, model, tok, cfg):
    mgr = CheckpointManager(tmp_path, keep_last=2, best_metric="m")
    good = mgr.save(1, model=model, tokenizer=tok, config=cfg, stage="sft", metrics={"m": 1.0})
    ckpts = tmp_path / "checkpoints"
    pid = _dead_pid()
    partial = ckpts / f".step_000002.partial-{pid}-0123abcd"
    shutil.copytree(good, partial)  # even a partial that looks complete never counts
    (partial / "meta.json").unlink()
    # a crash between the two renames of an overwrite: the old copy is the only one and is put back
    old = ckpts / f".step_000003.old-{pid}-0123abcd"
    shutil.copytree(good, old)
    live = ckpts / f".step_000004.partial-{os.getpid()}-0123abcd"  # a save in progress in a live process
    live.mkdir()
    assert mgr.latest() == good

    CheckpointManager(tmp_path, keep_last=2, best_metric="m")
    assert not partial.exists() and not old.exists() and live.exists()
    assert (ckpts / "step_000003/meta.json").is_file()


# ----------------------------------------------------------------------------------------------- SIGKILL during save

_CHILD = textwrap.dedent(
    """
    import sys, time, torch
    from transformers import GPT2Config, GPT2LMHeadModel
    from rlchat.checkpoint import CheckpointManager
    from rlchat.config import Config
    from rlchat.tokenizer import ChatTokenizer

    torch.set_num_threads(1)
    run_dir, mode = sys.argv[1], sys.argv[2]
    tok = ChatTokenizer("cl100k_base", 4096)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=tok.n_vocab, n_positions=64))
    cfg = Config().replace(**{"tokenizer.vocab_size": 4096})
    mgr = CheckpointManager(run_dir, keep_last=2, best_metric="m")
    big = {"blob": torch.randn(500_000)}  # ~2 MB of resume state per save
    def save(step):
        mgr.save(step, model=model, tokenizer=tok, config=cfg, stage="sft", metrics={"m": float(step)},
                 train_state=big)
    save(1)
    if mode == "slow":
        real = torch.save
        def slow_save(obj, f, *a, **k):  # write part of the file, then hang: the kill lands mid-write
            with open(f, "wb") as fh:
                fh.write(b"x" * 4096)
            print("MIDSAVE", flush=True)
            time.sleep(120)
        torch.save = slow_save
        save(2)
    else:
        print("LOOP", flush=True)
        step = 2
        while True:
            save(step)
            step += 1
    """
)


def _check_after_kill(run_dir: Path) -> CheckpointManager:
    ckpts = run_dir / "checkpoints"
    for d in ckpts.glob("step_*"):  # every directory under a final name is complete and loads
        ckpt = read_checkpoint(d, expect_stage="sft")
        assert ckpt.load_train_state()["blob"].shape == (500_000,)
    mgr = CheckpointManager(run_dir, keep_last=2, best_metric="m")  # sweeps the dead process's partials
    assert not [p for p in ckpts.iterdir() if ".partial-" in p.name or ".trash-" in p.name]
    latest = mgr.latest()
    assert latest is not None
    assert read_checkpoint(latest).load_train_state()["blob"].shape == (500_000,)
    return mgr


def _spawn(run_dir: Path, mode: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(run_dir), mode], stdout=subprocess.PIPE, text=True, env=env
    )


def test_sigkill_mid_write_leaves_previous_checkpoint_loadable(tmp_path):
    proc = _spawn(tmp_path, "slow")
    try:
        assert proc.stdout.readline().strip() == "MIDSAVE"
        ckpts = tmp_path / "checkpoints"
        assert [p.name for p in ckpts.glob(".step_000002.partial-*")]  # the save is in flight
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert not (ckpts / "step_000002").exists()
    mgr = _check_after_kill(tmp_path)
    assert mgr.latest() == ckpts / "step_000001"


def test_sigkill_at_random_moments_of_a_save_loop(tmp_path):
    proc = _spawn(tmp_path, "loop")
    try:
        assert proc.stdout.readline().strip() == "LOOP"
        time.sleep(random.Random(os.getpid()).uniform(0.3, 1.5))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    mgr = _check_after_kill(tmp_path)
    assert read_checkpoint(mgr.latest()).step >= 1
