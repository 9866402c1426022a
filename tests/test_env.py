"""rlchat/Chat-v0 and rlchat/ChatTurn-v0: the Gymnasium contract, rewards, multi-turn users, truncation, O(1) steps."""

from __future__ import annotations

import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import envs
from envs.chat_env import INFO_PENDING_TURN, ChatEnv, PendingTurn
from envs.turn_env import ChatTurnEnv
from envs.users import ReplayUser, ScriptedUser, UserTurn, make_user
from rlchat.config import Config
from rlchat.data import Record
from rlchat.errors import ActionError, ConfigError, RLChatError, TokenizerError
from rlchat.rewards import RewardFunction, RewardResult
from rlchat.tokenizer import ChatTokenizer


@pytest.fixture(scope="module")
def tok() -> ChatTokenizer:
    return ChatTokenizer("cl100k_base", 4096)


def task(a: int, b: int) -> Record:
    return Record(
        messages=[{"role": "user", "content": f"What is {a} + {b}?"}, {"role": "assistant", "content": str(a + b)}],
        reference=str(a + b),
    )


TASKS = [task(3, 4), task(1, 1), task(2, 5), task(6, 2)]
MULTI = Record(
    messages=[
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Greetings!"},
        {"role": "assistant", "content": "Hello! What would you like to talk about?"},
        {"role": "user", "content": "Name the capital of France."},
        {"role": "assistant", "content": "Paris."},
    ]
)


def cfg(**overrides: object) -> Config:
    return Config().replace(**overrides)


def reply(env: ChatEnv, text: str) -> tuple:
    """Step the reply's tokens then <|end|>; returns the last step's result."""
    out = None
    for t in env.tokenizer.encode(text) + [env.tokenizer.eot_id]:
        out = env.step(t)
        if out[2] or out[3]:
            break
    return out


# ------------------------------------------------------------------------------------------- Gymnasium contract


@pytest.mark.parametrize("env_id", [envs.CHAT_ENV_ID, envs.CHAT_TURN_ENV_ID])
@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"env.multi_turn": True, "env.user": "scripted", "tokenizer.vocab_size": 4096},
        {"env.multi_turn": True, "env.user": "replay", "tokenizer.vocab_size": 512, "data.prompts": "builtin:chat"},
    ],
)
def test_check_env_passes_without_warnings(env_id: str, overrides: dict) -> None:
    kwargs = {"config_overrides": overrides} if overrides else {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any Gymnasium checker warning fails the test
        env = gym.make(env_id, **kwargs)
        check_env(env.unwrapped)
        env.close()


def test_make_without_arguments_uses_the_demo_task(tok: ChatTokenizer) -> None:
    env = gym.make("rlchat/Chat-v0")
    u = env.unwrapped
    assert isinstance(u, ChatEnv)
    assert u.tokenizer.n_vocab == 4096 and env.action_space == gym.spaces.Discrete(4096)
    assert len(u.records) > 100 and all(r.reference is not None for r in u.records)
    obs, info = env.reset(seed=3)
    assert obs["tokens"].shape == (512,) and obs["tokens"].dtype == np.int64
    assert obs["length"].shape == () and obs["length"].dtype == np.int64
    n = int(obs["length"])
    record = u.records[info["record_index"]]
    assert obs["tokens"][:n].tolist() == tok.render_prompt(record.prompt_messages())
    assert (obs["tokens"][n:] == tok.pad_id).all()
    # answering the reference ends the episode with reward 1
    _, reward, terminated, truncated, info = reply(u, record.reference)
    assert (reward, terminated, truncated) == (1.0, True, False)
    assert info["reward_components"] == {"verifiable": 1.0}
    assert isinstance(gym.make("rlchat/ChatTurn-v0").unwrapped, ChatTurnEnv)


def test_spaces_follow_the_config(tok: ChatTokenizer) -> None:
    env = ChatEnv(TASKS, tok, cfg(**{"env.max_context": 64, "env.max_turn_tokens": 16}))
    assert env.observation_space["tokens"] == gym.spaces.Box(0, 4095, (64,), np.int64)
    assert env.observation_space["length"] == gym.spaces.Box(0, 64, (), np.int64)
    turn = ChatTurnEnv(TASKS, tok, cfg(**{"env.max_turn_tokens": 8}))
    assert turn.action_space["tokens"] == gym.spaces.MultiDiscrete(np.full(7, 4096))
    assert turn.action_space["length"] == gym.spaces.Discrete(8)


def rollout(env: gym.Env, seed: int, episodes: int = 6) -> list:
    """A seeded random-policy trajectory: every observation, reward, flag and info."""
    env.action_space.seed(seed)
    policy_rng = np.random.default_rng(seed)
    out = []
    obs, info = env.reset(seed=seed)
    for _ in range(episodes):
        done = False
        out.append(("reset", obs["tokens"][: obs["length"]].tolist(), info))
        while not done:
            # bias towards <|end|> so turns end (and multi-turn users speak) within the budget
            a = env.action_space.sample()
            if isinstance(env.unwrapped, ChatEnv) and policy_rng.random() < 0.3:
                a = env.unwrapped.tokenizer.eot_id
            obs, r, term, trunc, info = env.step(a)
            out.append((obs["tokens"][: obs["length"]].tolist(), r, term, trunc, info))
            done = term or trunc
        obs, info = env.reset()
    return out


@pytest.mark.parametrize("env_cls", [ChatEnv, ChatTurnEnv])
def test_same_seed_same_trajectory(tok: ChatTokenizer, env_cls: type) -> None:
    c = cfg(**{"env.multi_turn": True, "env.user": "scripted", "env.max_turn_tokens": 6, "env.max_context": 96})
    a = rollout(env_cls(TASKS, tok, c), seed=7)
    b = rollout(env_cls(TASKS, tok, c), seed=7)
    assert a == b
    assert a != rollout(env_cls(TASKS, tok, c), seed=8)


# ------------------------------------------------------------------------------------------- single turn


def test_reward_is_scored_only_at_end_of_turn(tok: ChatTokenizer) -> None:
    seen = []

    def fake_reward(prompt, text, ids, record):
        seen.append((prompt, text, ids, record.reference))
        return RewardResult(total=0.25 * len(ids), components={"n": float(len(ids))})

    env = ChatEnv([task(3, 4)], tok, cfg(), reward=fake_reward)
    env.reset(seed=0)
    ids = tok.encode("It is 7")
    for t in ids:
        _, r, term, trunc, info = env.step(t)
        assert (r, term, trunc) == (0.0, False, False) and "reward_components" not in info
    _, r, term, trunc, info = env.step(tok.eot_id)
    assert (r, term, trunc) == (0.25 * len(ids), True, False)
    assert info == {"turn": 0, "record_index": 0, "reward_components": {"n": len(ids)}, "response_ids": ids}
    assert seen == [([{"role": "user", "content": "What is 3 + 4?"}], "It is 7", ids, "7")]
    with pytest.raises(RLChatError, match="call reset"):
        env.step(5)


def test_deferred_reward_hands_the_turn_to_the_caller(tok: ChatTokenizer) -> None:
    """defer_reward=True: reward 0 and the reward's exact inputs in info; scoring them equals the env's own score."""
    c = cfg(**{"reward.diversity": 1.0, "reward.ngram": 1})
    fn = RewardFunction(c.reward, tok)
    now, later = ChatEnv([task(3, 4)], tok, c, reward=fn), ChatEnv([task(3, 4)], tok, c, reward=fn, defer_reward=True)
    now.reset(seed=0)
    later.reset(seed=0)
    _, r_now, *_, info_now = reply(now, "7")
    obs, r_later, term, trunc, info_later = reply(later, "7")
    assert (r_later, term, trunc) == (0.0, True, False) and "reward_components" not in info_later
    turn = info_later[INFO_PENDING_TURN]
    assert turn == PendingTurn([{"role": "user", "content": "What is 3 + 4?"}], "7", tok.encode("7"), later._record)
    (scored,) = fn.score_batch([turn.prompt_messages], [turn.response_text], [turn.response_ids], [turn.record])
    assert scored.total == r_now == 2.0 and scored.components == info_now["reward_components"]
    # A standalone env scores a batch of one: the across-batch component is reported, and always 0.
    assert info_now["reward_components"] == {"verifiable": 1.0, "diversity": 1.0, "diversity_batch": 0.0}
    assert obs["tokens"][: obs["length"]].tolist() == now.context_ids.tolist()  # same trajectory either way


def test_deferred_reward_keeps_each_turns_prompt_in_multi_turn(tok: ChatTokenizer) -> None:
    c = cfg(**{"env.multi_turn": True, "env.user": "scripted", "env.max_turns": 2})
    env = ChatEnv([task(3, 4)], tok, c, defer_reward=True)
    env.reset(seed=0)
    _, r0, term, _, first = reply(env, "7")
    _, r1, term, _, second = reply(env, "9")
    assert (r0, r1, term) == (0.0, 0.0, True)
    a, b = first[INFO_PENDING_TURN], second[INFO_PENDING_TURN]
    assert a.prompt_messages == [{"role": "user", "content": "What is 3 + 4?"}] and a.record.reference == "7"
    assert b.prompt_messages == env.conversation[:-1] and b.prompt_messages[-1]["role"] == "user"
    assert b.record.reference == str(7 + int(b.prompt_messages[-1]["content"].split()[2]))  # "Now add c to that."


def _count_reward(prompt, text, ids, record) -> RewardResult:
    return RewardResult(total=0.5 * len(ids), components={"n": float(len(ids))})


@pytest.mark.parametrize("penalty", [0.0, -1.0])
def test_a_turn_cut_at_the_budget_is_scored_and_terminal(tok: ChatTokenizer, penalty: float) -> None:
    # Running to the budget is an outcome of the turn, not a cut-off episode: the cut text is scored, plus
    # reward.truncation_penalty, and the episode terminates (the learner does not bootstrap from its own value).
    c = cfg(**{"env.max_turn_tokens": 3, "reward.truncation_penalty": penalty})
    env = ChatEnv(TASKS, tok, c, reward=_count_reward)
    env.reset(seed=0)
    assert env.step(10)[1:4] == (0.0, False, False)
    assert env.step(11)[1:4] == (0.0, False, False)
    _, r, term, trunc, info = env.step(12)
    assert (r, term, trunc) == (1.5 + penalty, True, False)
    assert info["truncated_by"] == "turn_budget" and info["response_ids"] == [10, 11, 12]
    assert info["reward_components"] == {"n": 3.0}
    # deferred scoring (rollout workers): the penalty travels with the turn's reward inputs
    env = ChatEnv(TASKS, tok, c, reward=_count_reward, defer_reward=True)
    env.reset(seed=0)
    env.step(10), env.step(11)
    _, r, term, trunc, info = env.step(12)
    pending = info[INFO_PENDING_TURN]
    assert (r, term, trunc, pending.response_ids, pending.penalty) == (0.0, True, False, [10, 11, 12], penalty)


def test_single_turn_context_cut_is_scored_and_terminal(tok: ChatTokenizer) -> None:
    c = cfg(**{"env.max_context": 16, "env.max_turn_tokens": 15, "reward.truncation_penalty": -1.0})
    env = ChatEnv([task(3, 4)], tok, c, reward=_count_reward)
    obs, _ = env.reset(seed=0)
    room = 16 - int(obs["length"])
    for _ in range(room - 1):
        assert env.step(10)[2:4] == (False, False)
    obs, r, term, trunc, info = env.step(10)
    assert (term, trunc, info["truncated_by"], int(obs["length"])) == (True, False, "context", 16)
    assert r == 0.5 * room - 1.0


def test_multi_turn_context_cut_mid_turn_is_truncated_and_unscored(tok: ChatTokenizer) -> None:
    # the one cut the learner bootstraps from V: the conversation would have gone on, the context ran out
    c = cfg(**{"env.multi_turn": True, "env.user": "scripted", "env.max_context": 16, "env.max_turn_tokens": 15})
    env = ChatEnv([task(3, 4)], tok, c, reward=_count_reward)
    obs, _ = env.reset(seed=0)
    for _ in range(16 - int(obs["length"]) - 1):
        env.step(10)
    obs, r, term, trunc, info = env.step(10)
    assert (r, term, trunc, info["truncated_by"]) == (0.0, False, True, "context")
    assert "reward_components" not in info and INFO_PENDING_TURN not in info


def test_long_prompt_keeps_its_last_tokens(tok: ChatTokenizer, caplog: pytest.LogCaptureFixture) -> None:
    long = Record(messages=[{"role": "user", "content": "word " * 100}])
    env = ChatEnv([long], tok, cfg(**{"env.max_context": 32, "env.max_turn_tokens": 8}))
    obs, info = env.reset(seed=0)
    assert int(obs["length"]) == 31 and info["prompt_length"] == 31
    assert obs["tokens"][30] == tok.role_ids["assistant"]
    assert "does not fit env.max_context=32" in caplog.text


def test_step_is_o1_append_into_one_buffer(tok: ChatTokenizer) -> None:
    env = ChatEnv(TASKS, tok, cfg())
    obs0, _ = env.reset(seed=0)
    prefix = obs0["tokens"][: obs0["length"]].copy()
    obs1, *_ = env.step(42)
    obs2, *_ = env.step(43)
    assert obs1["tokens"] is obs0["tokens"] and obs2["tokens"] is obs0["tokens"]  # no copy per step
    n = int(obs0["length"])
    assert int(obs1["length"]) == n + 1 and int(obs2["length"]) == n + 2
    assert (obs2["tokens"][:n] == prefix).all() and obs2["tokens"][n : n + 2].tolist() == [42, 43]
    assert obs1["length"] is not obs2["length"]  # each observation keeps its own length
    obs3, _ = env.reset(seed=1)
    assert obs3["tokens"] is not obs0["tokens"]  # a new episode never overwrites observations already handed out
    assert obs0["tokens"][n : n + 2].tolist() == [42, 43]


def test_invalid_actions_and_options(tok: ChatTokenizer) -> None:
    env = ChatEnv(TASKS, tok, cfg())
    env.reset(seed=0)
    for bad in (4096, -1):
        with pytest.raises(ActionError, match=r"out of range; expected 0 <= id < 4096") as err:
            env.step(bad)
        assert isinstance(err.value, RLChatError) and isinstance(err.value, ValueError)
        assert not isinstance(err.value, TokenizerError)  # the action is wrong, not the tokenizer
        assert "same tokenizer config" in str(err.value)  # ... and the message says how to fix it
    with pytest.raises(ActionError, match="one integer token id"):
        env.step("x")
    assert env.step(1)[1:4] == (0.0, False, False)  # a rejected action leaves the episode usable
    _, info = env.reset(options={"record_index": 2})
    assert info["record_index"] == 2 and env.conversation == TASKS[2].prompt_messages()
    with pytest.raises(RLChatError, match="record_index"):
        env.reset(options={"record_index": 9})
    with pytest.raises(RLChatError, match="render_mode"):
        ChatEnv(TASKS, tok, render_mode="rgb_array")


def test_render_ansi(tok: ChatTokenizer) -> None:
    env = ChatEnv([task(3, 4)], tok, cfg(), render_mode="ansi")
    env.reset(seed=0)
    env.step(tok.encode("7")[0])
    assert env.render() == "<|user|>What is 3 + 4?<|end|><|assistant|>7"


def test_config_overrides_choose_the_tokenizer_and_data() -> None:
    """The env_config form RLlib passes: plain kwargs with dotted overrides."""
    env = gym.make(
        "rlchat/Chat-v0",
        data="builtin:chat",
        config_overrides={"tokenizer.vocab_size": 512, "env.max_context": 40, "env.max_turn_tokens": 4},
    ).unwrapped
    assert env.tokenizer.n_vocab == 512 and env.max_context == 40 and env.max_turn_tokens == 4
    assert all(r.reference is None for r in env.records[:20])
    with pytest.raises(ConfigError, match="unknown config key"):
        ChatEnv(TASKS, config_overrides={"env.nope": 1})


# ------------------------------------------------------------------------------------------- multi turn


def test_multi_turn_replay_appends_the_records_next_user_message(tok: ChatTokenizer) -> None:
    refs = []

    def fake_reward(prompt, text, ids, record):
        refs.append((len(prompt), record.reference))
        return RewardResult(1.0, {"one": 1.0})

    c = cfg(**{"env.multi_turn": True, "env.user": "replay", "env.max_turns": 3, "env.max_context": 128})
    env = ChatEnv([MULTI], tok, c, reward=fake_reward)
    obs, _ = env.reset(seed=0)
    assert obs["tokens"][: obs["length"]].tolist() == tok.render_prompt(MULTI.messages[:2])
    n_before = int(obs["length"])
    obs, r, term, trunc, info = reply(env, "Hi.")
    assert (r, term, trunc, info["turn"]) == (1.0, False, False, 0)
    assert info["user_message"] == "Name the capital of France."
    appended = tok.render_turn("user", "Name the capital of France.") + [tok.role_ids["assistant"]]
    start = n_before + len(tok.encode("Hi.")) + 1
    assert obs["tokens"][start : obs["length"]].tolist() == appended
    _, r, term, trunc, info = reply(env, "Paris.")
    assert (r, term, trunc, info["turn"]) == (1.0, True, False, 1)  # the record has no third user message
    # turn 1 sees the whole conversation and is scored against the record's own second reply
    assert refs == [(2, "Hello! What would you like to talk about?"), (4, "Paris.")]
    assert [m["role"] for m in env.conversation] == ["system", "user", "assistant", "user", "assistant"]


def test_multi_turn_scripted_user_pursues_goals(tok: ChatTokenizer) -> None:
    c = cfg(**{"env.multi_turn": True, "env.user": "scripted", "env.max_turns": 4, "env.max_context": 256})
    env = ChatEnv([task(3, 4)], tok, c)
    env.reset(seed=0)
    _, r, term, _, info = reply(env, "8")  # wrong -> the user asks again
    assert (r, term) == (0.0, False) and info["user_message"] == "That is not right. What is 3 + 4?"
    _, r, term, _, info = reply(env, "7")  # right -> a checked arithmetic follow-up
    assert (r, term) == (1.0, False)
    c_add = int(info["user_message"].removeprefix("Now add ").removesuffix(" to that."))
    assert 1 <= c_add <= 9
    _, r, term, _, info = reply(env, str(7 + c_add))
    assert (r, term, info["turn"]) == (1.0, False, 2)
    _, r, term, trunc, info = reply(env, "0")
    assert (r, term, trunc, info["turn"]) == (0.0, True, False, 3)  # max_turns reached


def test_scripted_user_gives_up_after_max_retries_and_asks_generic_follow_ups(tok: ChatTokenizer) -> None:
    user = ScriptedUser(max_retries=1)
    rng = np.random.default_rng(0)
    conv = [*task(3, 4).prompt_messages(), {"role": "assistant", "content": "9"}]
    assert user.reply(conv, task(3, 4), rng) == UserTurn("That is not right. What is 3 + 4?", "7")
    conv += [{"role": "user", "content": "That is not right. What is 3 + 4?"}, {"role": "assistant", "content": "9"}]
    nxt = user.reply(conv, task(3, 4), rng)  # out of retries: move on to a follow-up on the same reference
    assert nxt is not None and nxt.content.startswith("Now add ")
    chat = Record(messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}])
    generic = user.reply([*chat.prompt_messages(), {"role": "assistant", "content": "Hey"}], chat, rng)
    assert generic is not None and generic.reference is None and generic.content in user.follow_ups


def test_replay_user_ends_with_the_record_and_unknown_user_is_an_error() -> None:
    user = ReplayUser()
    assert user.opening(MULTI) == (MULTI.messages[:2], "Hello! What would you like to talk about?")
    # a record's reference stands for its last reply
    with_ref = Record(messages=MULTI.messages, reference="Paris")
    assert user.reply(MULTI.messages[:3], with_ref, np.random.default_rng(0)).reference == "Paris"
    assert ScriptedUser().opening(task(3, 4)) == (task(3, 4).prompt_messages(), "7")
    assert user.reply([*MULTI.messages], MULTI, np.random.default_rng(0)) is None
    assert isinstance(make_user("scripted"), ScriptedUser)
    with pytest.raises(ConfigError, match="env.user='bot'"):
        make_user("bot")


def test_multi_turn_truncates_when_the_user_message_does_not_fit(tok: ChatTokenizer) -> None:
    c = cfg(**{"env.multi_turn": True, "env.user": "replay", "env.max_context": 26, "env.max_turn_tokens": 8})
    env = ChatEnv([MULTI], tok, c, reward=lambda *a: RewardResult(0.5, {}))
    env.reset(seed=0)
    _, r, term, trunc, info = reply(env, "Hi.")
    assert (r, term, trunc, info["truncated_by"]) == (0.5, False, True, "context")


# ------------------------------------------------------------------------------------------- turn env


def test_turn_env_equals_token_env_trajectory(tok: ChatTokenizer) -> None:
    c = cfg(**{"env.multi_turn": True, "env.user": "scripted", "env.max_turns": 3, "env.max_context": 256})
    token_env, turn_env = ChatEnv(TASKS, tok, c), ChatTurnEnv(TASKS, tok, c)
    for env in (token_env, turn_env):
        env.reset(seed=11)
    for text in ["9", "7", "12"]:
        ids = tok.encode(text)
        a = reply(token_env, text)
        b = turn_env.step({"tokens": np.array(ids + [0] * (63 - len(ids))), "length": len(ids)})
        assert a[0]["tokens"][: a[0]["length"]].tolist() == b[0]["tokens"][: b[0]["length"]].tolist()
        assert a[1:] == b[1:]
        if a[2] or a[3]:
            break


def test_turn_env_reply_forms_and_limits(tok: ChatTokenizer) -> None:
    env = ChatTurnEnv([task(3, 4)], tok, cfg(**{"env.max_turn_tokens": 4}))
    env.reset(seed=0)
    # an <|end|> inside the reply ends it there; the rest is ignored
    _, r, term, trunc, info = env.step(tok.encode("7") + [tok.eot_id, 99])
    assert (r, term, trunc, info["response_ids"]) == (1.0, True, False, tok.encode("7"))
    env.reset(seed=0)
    _, r, term, _, info = env.step({"tokens": [0, 0, 0], "length": 0})  # empty reply
    assert (r, term, info["response_ids"]) == (0.0, True, [])
    env.reset(seed=0)
    with pytest.raises(ActionError, match="at most 3"):
        env.step([1, 2, 3, 4])
    with pytest.raises(ActionError, match="length=5"):
        env.step({"tokens": [1, 2, 3], "length": 5})
    with pytest.raises(ActionError, match="out of range"):  # the token env's check reaches turn-level callers
        env.step([4096])
    with pytest.raises(ConfigError, match="at least 2"):
        ChatTurnEnv([task(3, 4)], tok, cfg(**{"env.max_turn_tokens": 1}))
