"""The SFT stage: masked loss by hand, every trainable parameter moves, gradient accumulation, exact resume in
process, and on Ray Train: validation perplexity falls by a set margin, the run directory and best checkpoint,
and a resume on 2 DDP workers (gloo) that reproduces the uninterrupted 1-worker run within 1e-5.

Ray Train runs are few (one fit per stage costs ~20 s here): one 1-worker fit shared by the module, one 2-worker
resume of it.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from rlchat.checkpoint import find_best_checkpoint, load_policy, read_checkpoint
from rlchat.cli.stages_cmd import sft_command
from rlchat.config import Config, load_config
from rlchat.data import load_records
from rlchat.errors import CheckpointError, ConfigError, DataError
from rlchat.evaluation import teacher_forced_metrics
from rlchat.metrics import SFT_GRAD_NORM, SFT_LOSS, SFT_LR, SFT_VAL_ACCURACY, SFT_VAL_LOSS, SFT_VAL_PERPLEXITY
from rlchat.stages import SFTTask, StageLearner, prepare_sft_data, run_sft
from rlchat.tokenizer import ChatTokenizer

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
COMPARED = (SFT_LOSS, SFT_GRAD_NORM, SFT_LR, SFT_VAL_LOSS, SFT_VAL_PERPLEXITY, SFT_VAL_ACCURACY)


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory) -> Path:
    """Every third demo conversation (~250): two short epochs of 13 steps."""
    from rlchat.data import builtin_path

    lines = builtin_path("chat").read_text(encoding="utf-8").splitlines()[::3]
    path = tmp_path_factory.mktemp("sft_data") / "chat.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def cfg(chat_file) -> Config:
    return load_config(
        DEMO,
        [
            f"data.sft={chat_file}",
            "sft.epochs=2",
            "sft.batch_size=16",
            "sft.learning_rate=3e-3",
            "sft.warmup_steps=3",
            "sft.max_seq_len=256",
            "model.precision=fp32",
            "checkpoint.every=1",
            "checkpoint.keep_last=5",
            "ray.learner_workers=1",
            "ray.learner_cpus=1",
            "ray.learner_threads=1",
        ],
    )


@pytest.fixture(scope="module")
def tok(cfg) -> ChatTokenizer:
    return ChatTokenizer.from_config(cfg.tokenizer)


@pytest.fixture(scope="module")
def data(cfg, tok):
    return prepare_sft_data(cfg, tok, cfg.sft.max_seq_len)[0]


def _records(run_dir: Path) -> dict[int, dict]:
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps)), f"one line per step, in order: {steps}"
    return {r["step"]: r for r in records}


# ------------------------------------------------------------------------------------------------ no Ray


def test_sft_loss_is_the_mean_nll_of_assistant_tokens_only(cfg, tok, data):
    learner = StageLearner(SFTTask(data), cfg, tok)
    before = copy.deepcopy(learner.model.lm).eval()
    idx = learner.batch_rows(0)
    nll, count = 0.0, 0
    for ids, mask in data.train.rows(idx):
        x = torch.tensor(ids.astype(np.int64))
        with torch.no_grad():
            logp = torch.log_softmax(before(x[None]).logits[0].double(), -1)  # (T, V)
        scored = torch.tensor(mask[1:] != 0)  # the chat template's loss mask: assistant text and its <|end|>
        nll -= float(logp[:-1].gather(1, x[1:, None]).squeeze(1)[scored].sum())
        count += int(scored.sum())
    metrics = learner.step(idx)
    assert metrics[SFT_LOSS] == pytest.approx(nll / count, rel=1e-5)
    assert metrics[SFT_LR] == pytest.approx(cfg.sft.learning_rate / cfg.sft.warmup_steps)  # warm-up step 1 of 3


def test_every_trainable_parameter_changes_in_one_step(cfg, tok, data):
    learner = StageLearner(SFTTask(data), cfg, tok)
    before = {n: p.detach().clone() for n, p in learner.model.named_parameters()}
    metrics = learner.step(learner.batch_rows(0))
    assert all(math.isfinite(v) for v in metrics.values())
    trainable = {n for n, p in learner.model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("lm.") for n in trainable)
    for name, p in learner.model.named_parameters():
        changed = not torch.equal(before[name], p.detach())
        assert changed == (name in trainable), f"{name}: changed={changed}, trainable={name in trainable}"
    assert not learner.model.value_head.weight.requires_grad  # SFT leaves the value head to PPO


def test_gradient_accumulation_equals_one_batch(cfg, tok, data):
    one = StageLearner(SFTTask(data), cfg, tok)
    four = StageLearner(SFTTask(data), cfg.replace(**{"sft.grad_accum_steps": 4}), tok)
    idx = one.batch_rows(0)
    m1, m4 = one.step(idx), four.step(idx)
    assert m4[SFT_LOSS] == pytest.approx(m1[SFT_LOSS], rel=1e-6)
    assert m4[SFT_GRAD_NORM] == pytest.approx(m1[SFT_GRAD_NORM], rel=1e-5)
    # gradients (left in .grad by the step), not the updated weights: Adam's first step is ~lr * sign(g), which
    # turns float noise in near-zero gradient entries into full-size differences
    for (name, a), b in zip(one.model.named_parameters(), four.model.parameters()):
        if a.requires_grad:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-7, msg=name)


def test_sft_on_preference_only_data_says_why_nothing_is_usable(cfg, tmp_path):
    bad = cfg.replace(**{"data.sft": "builtin:prefs"})
    with pytest.raises(DataError, match=r"no usable SFT conversations.*\d+ preference pairs.*rlchat rm"):
        run_sft(bad, run_dir=tmp_path / "run", quiet=True, use_ray=False)


def test_resume_in_process_continues_step_exactly(cfg, tmp_path):
    """An interrupted run resumed from its epoch-1 checkpoint logs exactly the uninterrupted run's metrics."""
    full, _ = run_sft(cfg, run_dir=tmp_path / "full", quiet=True, use_ray=False)
    half = tmp_path / "half"
    shutil.copytree(full, half)
    _cut_after_first_epoch(half)
    run_sft(cfg, run_dir=half, resume=True, quiet=True, use_ray=False)
    a, b = _records(full), _records(half)
    assert sorted(a) == sorted(b)
    for step in a:
        for key in COMPARED:
            assert b[step].get(key) == a[step].get(key), (step, key)
    # resuming a finished run trains nothing and reports its last checkpoint's metrics
    before = (half / "metrics.jsonl").read_text(encoding="utf-8")
    _, final = run_sft(cfg, run_dir=half, resume=True, quiet=True, use_ray=False)
    assert (half / "metrics.jsonl").read_text(encoding="utf-8") == before
    assert final[SFT_VAL_LOSS] == a[max(a)][SFT_VAL_LOSS]


def test_in_process_stage_trains_with_the_learner_thread_budget(cfg, tmp_path, monkeypatch):
    """use_ray=False trains in this process with ray.learner_threads, as the in-process PPO learner does (it once
    inherited whatever an earlier sampler had left)."""
    seen = []
    real = StageLearner.train_steps

    def spy(self, n=1):
        seen.append(torch.get_num_threads())
        return real(self, n)

    monkeypatch.setattr(StageLearner, "train_steps", spy)
    torch.set_num_threads(1)
    run_sft(cfg.replace(**{"ray.learner_threads": 2, "sft.max_steps": 2}), tmp_path / "run", quiet=True, use_ray=False)
    assert seen and set(seen) == {2}


def test_zero_learner_workers_trains_the_stage_in_the_driver_process(cfg, tmp_path, monkeypatch):
    """ray.learner_workers=0 means what it means for PPO: no Ray Train worker group (once a ConfigError from it)."""
    from rlchat.distributed import rank_group

    def no_group(*a, **k):
        raise AssertionError("a Ray Train rank group was started")

    monkeypatch.setattr(rank_group.RankGroup, "__init__", no_group)
    run, final = run_sft(cfg.replace(**{"ray.learner_workers": 0, "sft.max_steps": 2}), tmp_path / "run", quiet=True)
    assert find_best_checkpoint(run) is not None and math.isfinite(final[SFT_VAL_LOSS])
    assert sorted(_records(run)) == [0, 1, 2]


def test_sft_command_resume_errors_say_what_to_do(tmp_path):
    with pytest.raises(CheckpointError, match="no config.yaml"):
        sft_command(resume=str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="drop --run-dir"):
        sft_command(resume=str(tmp_path / "a"), run_dir=str(tmp_path / "b"))


def _cut_after_first_epoch(run_dir: Path) -> int:
    """Simulate a crash after the first epoch's checkpoint: later checkpoints gone (metrics lines stay)."""
    steps = sorted(int(p.name.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*"))
    assert len(steps) >= 2
    for s in steps[1:]:
        shutil.rmtree(run_dir / "checkpoints" / f"step_{s:06d}")
    return steps[0]


# ------------------------------------------------------------------------------------------------ Ray Train


@pytest.fixture(scope="module")
def sft_run(ray_local, cfg, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("sft_ray") / "run"
    path, final = run_sft(cfg, run_dir=run_dir, quiet=True)
    return path, final


@pytest.mark.slow
def test_sft_lowers_validation_perplexity_tenfold(sft_run, cfg):
    run_dir, final = sft_run
    records = _records(run_dir)
    steps_per_epoch = (len(load_records(cfg.data.sft, "train", cfg)) // cfg.sft.batch_size) or 1
    assert max(records) == 2 * steps_per_epoch
    initial, last = records[0][SFT_VAL_PERPLEXITY], records[max(records)][SFT_VAL_PERPLEXITY]
    assert initial > 1000  # a random model over a 4096-token vocabulary
    assert last < initial / 10, f"validation perplexity {initial:.1f} -> {last:.1f}"
    assert final[SFT_VAL_PERPLEXITY] == pytest.approx(last)
    assert all(math.isfinite(v) for r in records.values() for k, v in r.items() if k.startswith("sft/"))


@pytest.mark.slow
def test_sft_run_directory_and_best_checkpoint(sft_run, cfg, tok):
    run_dir, _ = sft_run
    assert (run_dir / "config.yaml").is_file() and (run_dir / "logs" / "sft.log").is_file()
    assert any((run_dir / "tensorboard").iterdir())
    records = _records(run_dir)
    val_steps = [s for s, r in records.items() if SFT_VAL_LOSS in r and s > 0]
    best = find_best_checkpoint(run_dir)
    best_step = min(val_steps, key=lambda s: records[s][SFT_VAL_LOSS])
    assert read_checkpoint(best).step == best_step
    # the stage's validation is teacher_forced_metrics on the validation conversations, at the saved weights
    model, _, ckpt = load_policy(best, expect_tokenizer=tok)
    assert ckpt.metrics[SFT_VAL_LOSS] == pytest.approx(records[best_step][SFT_VAL_LOSS])
    assert ckpt.load_train_state()["step"] == best_step
    val = [r.messages for r in load_records(cfg.data.sft, "val", cfg)]
    tf = teacher_forced_metrics(model.eval(), tok, val)
    assert tf["perplexity"] == pytest.approx(records[best_step][SFT_VAL_PERPLEXITY], rel=1e-4)
    assert tf["accuracy"] == pytest.approx(records[best_step][SFT_VAL_ACCURACY], abs=1e-6)


@pytest.mark.slow
def test_resume_on_two_ddp_workers_matches_the_one_worker_run(sft_run, cfg, tmp_path):
    """Resume from the epoch-1 checkpoint with 2 gloo DDP workers: same data order, same global batches, so
    every later step's loss, grad norm, LR and validation equal the uninterrupted 1-worker run's (1e-5)."""
    run_dir, _ = sft_run
    resumed = tmp_path / "resumed"
    shutil.copytree(run_dir, resumed, ignore=shutil.ignore_patterns("ray_train"))
    cut = _cut_after_first_epoch(resumed)
    run_sft(cfg.replace(**{"ray.learner_workers": 2}), run_dir=resumed, resume=True, quiet=True)
    assert read_checkpoint(find_best_checkpoint(resumed)).load_train_state()["world"] == 2
    a, b = _records(run_dir), _records(resumed)
    assert sorted(a) == sorted(b)
    later = [s for s in a if s > cut]
    assert later
    for step in later:
        for key in COMPARED:
            if key in a[step]:
                assert b[step][key] == pytest.approx(a[step][key], rel=1e-5, abs=1e-5), (step, key)
