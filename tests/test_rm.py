"""The reward-model stage: Bradley-Terry loss by hand, every trainable parameter moves, feedback files are read,
a clear error without preference pairs, and on Ray Train: pairwise accuracy on the demo preference pairs, with
the saved checkpoint scoring pairs exactly as the validation did (the scorer PPO and `rlchat eval` use).

One Ray Train fit for the module (~20 s of start-up here).
"""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from rlchat.checkpoint import find_best_checkpoint, read_checkpoint
from rlchat.config import Config, load_config
from rlchat.data import load_records
from rlchat.errors import ConfigError, DataError
from rlchat.metrics import RM_ACCURACY, RM_GRAD_NORM, RM_LOSS, RM_LR, RM_MARGIN, RM_VAL_ACCURACY, RM_VAL_LOSS
from rlchat.rewards import CheckpointRMScorer
from rlchat.stages import RMTask, StageLearner, prepare_rm_data, run_rm
from rlchat.tokenizer import ChatTokenizer

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


@pytest.fixture(scope="module")
def cfg() -> Config:
    return load_config(
        DEMO,
        [
            "data.preferences=builtin:prefs",
            "rm.epochs=2",
            "rm.batch_size=32",
            "rm.learning_rate=1e-3",
            "rm.warmup_steps=5",
            "model.precision=fp32",
            "ray.learner_workers=1",
            "ray.learner_cpus=1",
        ],
    )


@pytest.fixture(scope="module")
def tok(cfg) -> ChatTokenizer:
    return ChatTokenizer.from_config(cfg.tokenizer)


@pytest.fixture(scope="module")
def data(cfg, tok):
    return prepare_rm_data(cfg, tok, cfg.rm.max_seq_len)


# ------------------------------------------------------------------------------------------------ no Ray


def test_bradley_terry_loss_by_hand(cfg, tok, data):
    pairs, _ = data
    learner = StageLearner(RMTask(pairs, "fp32"), cfg, tok)
    before = copy.deepcopy(learner.model).eval()
    idx = learner.batch_rows(0)

    def score(rows) -> torch.Tensor:  # one row at a time: no padding involved
        out = []
        for ids, _ in rows:
            with torch.no_grad():
                out.append(before(torch.tensor(ids[None]).long(), torch.ones(1, len(ids)).long())[0])
        return torch.stack(out)

    diff = (score(pairs.train.rows(idx)) - score(pairs.train_rejected.rows(idx))).double()
    metrics = learner.step(idx)
    assert metrics[RM_LOSS] == pytest.approx(float(-F.logsigmoid(diff).mean()), rel=1e-5)
    assert metrics[RM_ACCURACY] == pytest.approx(float((diff > 0).double().mean()))
    assert metrics[RM_MARGIN] == pytest.approx(float(diff.mean()), rel=1e-4, abs=1e-6)


def test_every_trainable_rm_parameter_changes_in_one_step(cfg, tok, data):
    learner = StageLearner(RMTask(data[0], "fp32"), cfg, tok)
    before = {n: p.detach().clone() for n, p in learner.model.named_parameters()}
    learner.step(learner.batch_rows(0))
    params = dict(learner.model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    # the score bias cancels in r(chosen) - r(rejected): frozen, everything else trains
    assert trainable == set(params) - {"score_head.bias"} and "score_head.weight" in trainable
    changed = {n for n, p in params.items() if not torch.equal(before[n], p.detach())}
    assert changed == trainable


def test_chosen_and_rejected_are_rendered_with_the_chat_template(cfg, tok, data):
    pairs, counts = data
    records = load_records(cfg.data.preferences, "train", cfg)
    assert counts["train"] == len(records) == len(pairs.train) == len(pairs.train_rejected)
    rec = records[0]
    ids, _ = tok.render_conversation(rec.prompt_messages() + rec.chosen)
    assert pairs.train.row(0)[0].tolist() == ids[-cfg.rm.max_seq_len :]
    assert pairs.train.row(0)[0][-1] == tok.eot_id  # the score is read at the reply's end-of-turn token


def test_rm_reads_feedback_files_in_the_preference_format(cfg, tok, data, tmp_path):
    feedback = tmp_path / "feedback.jsonl"
    rows = [
        {"prompt": f"Feedback question {i}?", "chosen": f"A kind answer {i}.", "rejected": f"Go away {i}."}
        for i in range(20)
    ]
    feedback.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    _, base = data
    _, counts = prepare_rm_data(cfg.replace(**{"rm.feedback": [str(feedback)]}), tok, cfg.rm.max_seq_len)
    assert counts["train"] + counts["val"] == base["train"] + base["val"] + 20
    assert counts["val"] > base["val"]  # feedback is split train/val like any other source (val_fraction 0.1)


def test_rm_starts_from_the_sft_policy_trunk(cfg, tok, tmp_path):
    """rm.init_from: the reward model's trunk is the policy checkpoint's trunk, weight for weight (InstructGPT)."""
    from rlchat.checkpoint import save_checkpoint
    from rlchat.model import PolicyValueModel, RewardModel

    policy = PolicyValueModel.build(cfg, tok)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.01 * torch.randn_like(p))  # not the default init the tiny RM would get anyway
    ckpt = save_checkpoint(tmp_path / "sft", model=policy, tokenizer=tok, config=cfg, stage="sft", step=1)
    rm = RewardModel.build(cfg.replace(**{"rm.init_from": str(ckpt)}), tok)
    want = policy.lm.base_model.state_dict()
    got = rm.trunk.state_dict()
    assert set(got) == set(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)
    scratch = RewardModel.build(cfg, tok).trunk.state_dict()
    assert any(not torch.equal(scratch[k], want[k]) for k in want)
    with pytest.raises(ConfigError, match="keep one"):
        RewardModel.build(cfg.replace(**{"rm.init_from": str(ckpt), "rm.name_or_path": str(ckpt)}), tok)


def test_rm_validation_reports_margin_and_calibration(cfg, tok, data):
    task = RMTask(data[0], "fp32")  # prepare_rm_data returns (data, counts)
    from rlchat.model import RewardModel

    model = RewardModel.build(cfg, tok)
    m = task.validate(model, rank=0, world=1)
    assert set(m) >= {"rm/val_loss", "rm/val_accuracy", "rm/val_margin", "rm/val_ece"}
    assert 0.0 <= m["rm/val_ece"] <= 0.5 and math.isfinite(m["rm/val_margin"])


def test_validation_reports_data_preferences_accuracy_apart_from_feedback(cfg, tok, data, tmp_path):
    """With rm.feedback (or policy pairs) in the validation split, rm/val_accuracy_preferences is the accuracy on
    data.preferences' own pairs: the same number the reward model scores on them alone."""
    from rlchat.metrics import RM_VAL_ACCURACY_PREFERENCES
    from rlchat.model import RewardModel

    feedback = tmp_path / "feedback.jsonl"
    rows = [{"prompt": f"Question {i}?", "chosen": f"Yes {i}.", "rejected": f"No way {i}!"} for i in range(60)]
    feedback.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    mixed, counts = prepare_rm_data(cfg.replace(**{"rm.feedback": [str(feedback)]}), tok, cfg.rm.max_seq_len)
    assert counts["val"] > data[1]["val"] and set(mixed.val_source.tolist()) == {0, 1}
    torch.manual_seed(0)
    model = RewardModel.build(cfg, tok)
    alone = RMTask(data[0], "fp32").validate(model, rank=0, world=1)
    both = RMTask(mixed, "fp32").validate(model, rank=0, world=1)
    assert RM_VAL_ACCURACY_PREFERENCES not in alone  # one source: the plain accuracy says it
    assert both[RM_VAL_ACCURACY_PREFERENCES] == pytest.approx(alone[RM_VAL_ACCURACY])


def test_rm_policy_pairs_need_a_policy_and_are_made_once_per_run(cfg, tmp_path):
    from serve.testing import make_tiny_checkpoint

    with pytest.raises(ConfigError, match="rm.policy_samples=1"):
        cfg.replace(**{"rm.policy_samples": 1})
    with pytest.raises(ConfigError, match="rm.init_from is empty"):
        run_rm(cfg.replace(**{"rm.policy_samples": 2}), run_dir=tmp_path / "none", quiet=True, use_ray=False)
    policy = make_tiny_checkpoint(tmp_path / "policy", vocab_size=cfg.tokenizer.vocab_size)
    small = cfg.replace(
        **{
            "data.prompts": "builtin:task",
            "rm.policy_samples": 2,
            "rm.max_steps": 2,
            "rm.epochs": 1,
            "checkpoint.every": 0,
        }
    )
    # the pairs come from rm.init_from's policy; an untrained one answers nothing right: no pair, the file is empty
    # and training goes on with data.preferences alone (the pairing itself: tests/test_policy_pairs.py)
    run, m = run_rm(
        small.replace(**{"rm.init_from": str(policy)}), run_dir=tmp_path / "run", quiet=True, use_ray=False
    )
    from rlchat.stages import POLICY_PAIRS_FILE

    pairs = run / POLICY_PAIRS_FILE
    assert pairs.is_file() and pairs.read_text() == "" and m[RM_VAL_ACCURACY] >= 0.0


def test_rm_without_preference_pairs_says_why(cfg, tmp_path):
    bad = cfg.replace(**{"data.preferences": "builtin:chat"})
    with pytest.raises(DataError, match=r"no usable preference pairs.*\d+ are not preference records.*chosen"):
        run_rm(bad, run_dir=tmp_path / "run", quiet=True, use_ray=False)


def _metric_lines(run_dir: Path) -> dict[int, dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    return {r["step"]: r for r in records}


def test_rm_resume_in_process_continues_step_exactly(cfg, tmp_path):
    """Resumed from its epoch-1 checkpoint, an interrupted RM run logs exactly the uninterrupted run's metrics."""
    small = cfg.replace(**{"rm.max_steps": 0, "checkpoint.every": 1, "checkpoint.keep_last": 5})
    full, _ = run_rm(small, run_dir=tmp_path / "full", quiet=True, use_ray=False)
    half = tmp_path / "half"
    shutil.copytree(full, half)
    steps = sorted(int(p.name.split("_")[1]) for p in (half / "checkpoints").glob("step_*"))
    assert len(steps) >= 2, steps  # one checkpoint per epoch
    for s in steps[1:]:  # a crash after the first epoch's checkpoint: the later ones never happened
        shutil.rmtree(half / "checkpoints" / f"step_{s:06d}")
    run_rm(small, run_dir=half, resume=True, quiet=True, use_ray=False)
    a, b = _metric_lines(full), _metric_lines(half)
    assert sorted(a) == sorted(b) and max(a) > steps[0]
    for step in a:
        for key in (RM_LOSS, RM_ACCURACY, RM_GRAD_NORM, RM_LR, RM_VAL_LOSS, RM_VAL_ACCURACY):
            assert b[step].get(key) == a[step].get(key), (step, key)


# ------------------------------------------------------------------------------------------------ Ray Train


@pytest.fixture(scope="module")
def rm_run(ray_local, cfg, tmp_path_factory):
    return run_rm(cfg, run_dir=tmp_path_factory.mktemp("rm_ray") / "run", quiet=True)


@pytest.mark.slow
def test_rm_reaches_pairwise_accuracy_on_the_demo_pairs(rm_run):
    run_dir, final = rm_run
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    val = {r["step"]: r[RM_VAL_ACCURACY] for r in records if RM_VAL_ACCURACY in r}
    assert 0 in val and len(val) == 3  # before training, after epoch 1 and 2
    best = max(val.values())
    assert best >= 0.65, f"validation pairwise accuracy {val}"  # chance is 0.5
    assert best >= val[0] + 0.1
    assert all(math.isfinite(v) for r in records for k, v in r.items() if k.startswith("rm/"))
    assert final[RM_VAL_ACCURACY] == pytest.approx(val[max(val)])


@pytest.mark.slow
def test_rm_checkpoint_scores_pairs_like_its_validation(rm_run, cfg, tok):
    """The best checkpoint, loaded by the scorer PPO and `rlchat eval` use, ranks the validation pairs as the
    stage's validation did (same rendering, same last-token score)."""
    run_dir, _ = rm_run
    best = find_best_checkpoint(run_dir)
    ckpt = read_checkpoint(best, expect_tokenizer=tok, expect_stage="rm")
    scorer = CheckpointRMScorer(str(best))
    pairs = [r for r in load_records(cfg.data.preferences, "val", cfg) if r.is_preference]
    prompts = [r.prompt_messages() for r in pairs]
    chosen = scorer(prompts, [r.chosen[-1]["content"] for r in pairs])
    rejected = scorer(prompts, [r.rejected[-1]["content"] for r in pairs])
    accuracy = sum(c > r for c, r in zip(chosen, rejected)) / len(pairs)
    assert accuracy == pytest.approx(ckpt.metrics[RM_VAL_ACCURACY], abs=1.0 / len(pairs))
    # replies that are rude or off-format are the learnable half of the demo pairs
    easy = [c > r for rec, c, r in zip(pairs, chosen, rejected) if rec.meta.get("kind") != "wrong_answer"]
    assert sum(easy) / len(easy) >= 0.8
