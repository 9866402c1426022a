"""The implicit reward model (``rm.kind=implicit``): a causal LM scored by ``beta * log(pi / pi_start)``.

Checked against hand computations from full softmaxes: the score, the Bradley-Terry loss on it (DPO's), which
parameters train, the checkpoint round trip (with its frozen reference), and the scorer PPO uses (the reply's
tokens only). The end-to-end RLHF run on it is in tests/test_rlhf_gold.py.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from rlchat.checkpoint import load_reward_model, read_checkpoint, save_checkpoint
from rlchat.config import Config, load_config
from rlchat.errors import ConfigError
from rlchat.metrics import RM_ACCURACY, RM_LOSS, RM_MARGIN, RM_VAL_ACCURACY
from rlchat.model import IMPLICIT_REFERENCE_DIR, ImplicitRewardModel, PolicyValueModel, RewardModel
from rlchat.rewards import CheckpointRMScorer
from rlchat.stages import RMTask, StageLearner, prepare_rm_data, run_rm
from rlchat.tokenizer import ChatTokenizer

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
BETA = 0.5


@pytest.fixture(scope="module")
def cfg() -> Config:
    return load_config(
        DEMO,
        [
            "model.n_layer=1",
            "model.n_embd=32",
            "model.n_head=2",
            "model.precision=fp32",
            "rm.kind=implicit",
            f"rm.beta={BETA}",
            "rm.batch_size=8",
            "rm.epochs=1",
            "rm.max_steps=3",
            "checkpoint.every=0",
            "ray.learner_workers=0",
        ],
    )


@pytest.fixture(scope="module")
def tok(cfg) -> ChatTokenizer:
    return ChatTokenizer.from_config(cfg.tokenizer)


@pytest.fixture(scope="module")
def sft_ckpt(cfg, tok, tmp_path_factory) -> Path:
    torch.manual_seed(0)
    policy = PolicyValueModel.build(cfg, tok)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return save_checkpoint(
        tmp_path_factory.mktemp("sft") / "ckpt", model=policy, tokenizer=tok, config=cfg, stage="sft", step=1
    )


def _seq_logprob(lm, ids: list[int], start: int = 1) -> float:
    """sum_{t >= start} log p(ids[t] | ids[:t]) from one full softmax, no padding."""
    with torch.no_grad():
        logits = lm(torch.tensor([ids])).logits[0].double()  # (T, V)
    logp = F.log_softmax(logits, dim=-1)
    return float(sum(logp[t - 1, ids[t]] for t in range(start, len(ids))))


def _perturbed(model: ImplicitRewardModel, scale: float = 0.05) -> ImplicitRewardModel:
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.policy.parameters():
            p.add_(scale * torch.randn_like(p))
    return model


def test_a_fresh_implicit_reward_model_scores_zero_and_is_its_reference(cfg, tok, sft_ckpt):
    rm = ImplicitRewardModel.build(cfg.replace(**{"rm.init_from": str(sft_ckpt)}), tok)
    ids = torch.tensor([tok.render_conversation([{"role": "user", "content": "2+2?"}])[0]])
    assert rm(ids, torch.ones_like(ids)).tolist() == [0.0]
    assert not any(p.requires_grad for p in rm.reference.parameters())
    assert all(p.requires_grad for p in rm.policy.parameters()) and rm.beta == BETA


def test_implicit_reward_is_beta_times_the_log_ratio_by_hand_and_padding_free(cfg, tok, sft_ckpt):
    rm = _perturbed(ImplicitRewardModel.build(cfg.replace(**{"rm.init_from": str(sft_ckpt)}), tok)).eval()
    convs = [
        [{"role": "user", "content": "What is 3+4?"}, {"role": "assistant", "content": "7"}],
        [{"role": "user", "content": "Say hello"}, {"role": "assistant", "content": "Hello there, friend!"}],
    ]
    rows = [tok.render_conversation(c)[0] for c in convs]
    want = [BETA * (_seq_logprob(rm.policy.lm, r) - _seq_logprob(rm.reference.lm, r)) for r in rows]
    width = max(len(r) for r in rows)
    ids = torch.full((2, width), tok.pad_id)
    mask = torch.zeros((2, width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
    with torch.no_grad():
        got = rm(ids, mask)
    assert got.shape == (2,) and abs(want[0]) > 1e-3
    torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-4, atol=1e-5)
    # a reply mask scores only those tokens
    start = len(tok.render_prompt(convs[1][:1]))
    reply = torch.zeros_like(mask)
    reply[1, start : len(rows[1])] = 1
    only = BETA * (_seq_logprob(rm.policy.lm, rows[1], start) - _seq_logprob(rm.reference.lm, rows[1], start))
    with torch.no_grad():
        scored = float(rm(ids, mask, reply_mask=reply)[1])
    assert scored == pytest.approx(only, rel=1e-4, abs=1e-5)


def test_one_rm_step_is_the_dpo_loss_and_trains_the_policy_never_the_reference(cfg, tok, sft_ckpt):
    c = cfg.replace(**{"rm.init_from": str(sft_ckpt)})
    pairs, _ = prepare_rm_data(c, tok, c.rm.max_seq_len)
    learner = StageLearner(RMTask(pairs, "fp32"), c, tok)
    model = learner.model
    assert isinstance(model, ImplicitRewardModel)
    ref_before = {n: p.detach().clone() for n, p in model.reference.named_parameters()}
    pol_before = {n: p.detach().clone() for n, p in model.policy.named_parameters()}
    m = learner.step(learner.batch_rows(0))
    # policy == reference at the start: every pair's log-ratio difference is 0, the DPO loss log 2
    assert m[RM_LOSS] == pytest.approx(math.log(2.0), rel=1e-5)
    assert m[RM_ACCURACY] == 0.0 and m[RM_MARGIN] == pytest.approx(0.0, abs=1e-6)
    assert all(torch.equal(ref_before[n], p) for n, p in model.reference.named_parameters())
    changed = [n for n, p in model.policy.named_parameters() if not torch.equal(pol_before[n], p.detach())]
    assert "lm.transformer.h.0.attn.c_attn.weight" in changed
    # the optimizer holds the policy's parameters alone
    assert {id(p) for p in learner.params} == {id(p) for p in model.policy.parameters()}
    # the second step's loss is the DPO loss of the updated policy: below log 2 on the same rows
    assert learner.step(learner.batch_rows(0))[RM_LOSS] < math.log(2.0)


def test_implicit_rm_run_round_trips_and_the_scorer_scores_the_reply_alone(cfg, tok, sft_ckpt, tmp_path):
    run, m = run_rm(cfg.replace(**{"rm.init_from": str(sft_ckpt)}), run_dir=tmp_path / "rm", quiet=True, use_ray=False)
    assert 0.0 <= m[RM_VAL_ACCURACY] <= 1.0
    best = run / "checkpoints" / "best"
    assert (read_checkpoint(best).path / IMPLICIT_REFERENCE_DIR / "config.json").is_file()
    rm, _, _ = load_reward_model(best)
    assert isinstance(rm, ImplicitRewardModel) and rm.beta == BETA
    assert any(not torch.equal(a, b) for a, b in zip(rm.policy.parameters(), rm.reference.parameters()))
    prompt = [{"role": "user", "content": "What is 12+5?"}]
    replies = ["17", "The answer is 18."]
    got = CheckpointRMScorer(str(best))([prompt, prompt], replies)
    for reply, score in zip(replies, got):
        ids = tok.render_conversation([*prompt, {"role": "assistant", "content": reply}])[0]
        start = len(tok.render_prompt(prompt))  # the reply's text and end of turn, not the prompt's tokens
        want = BETA * (_seq_logprob(rm.policy.lm, ids, start) - _seq_logprob(rm.reference.lm, ids, start))
        assert score == pytest.approx(want, rel=1e-4, abs=1e-5)
    assert got[0] != got[1]


def test_implicit_rm_settings_are_checked(cfg, tok, tmp_path):
    with pytest.raises(ConfigError, match="rm.beta"):
        load_config(None, ["rm.beta=0"])
    with pytest.raises(ConfigError, match="rm.kind"):
        load_config(None, ["rm.kind=pairwise"])
    from transformers import BertConfig, BertModel

    BertModel(
        BertConfig(vocab_size=64, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)
    ).save_pretrained(tmp_path / "bert")
    with pytest.raises(ConfigError, match="causal LM"):
        ImplicitRewardModel.build(cfg.replace(**{"rm.name_or_path": str(tmp_path / "bert")}), tok)
    # the scalar kind is unchanged by the new key
    assert isinstance(RMTask.build_model(cfg.replace(**{"rm.kind": "scalar"}), tok), RewardModel)


def test_implicit_rm_resume_continues_step_exactly(cfg, sft_ckpt, tmp_path):
    """Resumed from its epoch-1 checkpoint (policy and reference restored), an interrupted run logs exactly the
    uninterrupted run's metrics."""
    small = cfg.replace(
        **{
            "rm.init_from": str(sft_ckpt),
            "rm.epochs": 2,
            "rm.max_steps": 0,
            "rm.batch_size": 64,
            "checkpoint.every": 1,
            "checkpoint.keep_last": 5,
        }
    )
    full, _ = run_rm(small, run_dir=tmp_path / "full", quiet=True, use_ray=False)
    half = tmp_path / "half"
    shutil.copytree(full, half)
    steps = sorted(int(p.name.split("_")[1]) for p in (half / "checkpoints").glob("step_*"))
    assert len(steps) >= 2, steps
    for s in steps[1:]:
        shutil.rmtree(half / "checkpoints" / f"step_{s:06d}")
    run_rm(small, run_dir=half, resume=True, quiet=True, use_ray=False)

    def lines(run: Path) -> dict[int, dict]:
        return {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}

    a, b = lines(full), lines(half)
    assert sorted(a) == sorted(b) and max(a) > steps[0]
    for step in a:
        for key in (RM_LOSS, RM_ACCURACY, RM_VAL_ACCURACY):
            assert b[step].get(key) == a[step].get(key), (step, key)


def test_a_padded_vocabulary_scores_the_same_after_a_round_trip(cfg, tok, tmp_path):
    """A pretrained LM's head often has more rows than the tokenizer's ids (padded vocabularies): the softmax runs
    over the tokenizer's ids in training, so it must after loading too (the saved model keeps its vocab_size)."""
    from rlchat.model import PolicyLM, build_tiny_lm

    torch.manual_seed(0)
    lm = build_tiny_lm(cfg.model, tok.n_vocab + 64)  # 64 padding rows beyond the tokenizer's ids
    rm = _perturbed(ImplicitRewardModel(PolicyLM(lm, precision="fp32", vocab_size=tok.n_vocab), beta=BETA)).eval()
    ids = torch.tensor(
        [tok.render_conversation([{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}])[0]]
    )
    mask = torch.ones_like(ids)
    rm.save_pretrained(tmp_path / "rm")
    back = ImplicitRewardModel.from_pretrained(tmp_path / "rm").eval()
    assert back.policy.vocab_size == back.reference.vocab_size == tok.n_vocab
    with torch.no_grad():
        torch.testing.assert_close(back(ids, mask), rm(ids, mask))
