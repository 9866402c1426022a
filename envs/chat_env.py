"""``rlchat/Chat-v0``: a chat conversation as a token-level Gymnasium environment.

One action is one token id of the assistant's reply; the observation is the conversation's token ids so far.
The env owns the reward and termination contract that rollouts and the learner share (docs/ARCHITECTURE.md "Env").

Spaces (``V = tokenizer.n_vocab``, ``C = env.max_context``)::

    action_space      = Discrete(V)                                   # the next token id of the assistant reply
    observation_space = Dict({
        "tokens": Box(0, V - 1, shape=(C,), dtype=int64),             # ids of the conversation, pad_id after length
        "length": Box(0, C, shape=(), dtype=int64),                   # how many leading entries of tokens are real
    })

Episode (``reset`` -> ``step`` x N):

1. ``reset(seed=...)`` draws a record with the env's RNG (or takes ``options={"record_index": i}``) and renders its
   prompt with :meth:`ChatTokenizer.render_prompt` (ends with the assistant start token) into the buffer.
2. ``step(token)`` appends the token. When the token is ``tokenizer.eot_id`` the assistant turn ends: the reply is
   scored by the composite reward (``reward`` = the weighted total; ``info["reward_components"]`` = every component,
   unweighted; ``info["response_ids"]`` = the reply's ids without the end-of-turn token). Every other step has
   reward 0. A standalone env scores each reply on its own, so the across-batch component ``diversity_batch`` is 0
   (a batch of one has nothing to compare against); see ``defer_reward`` below for batch scoring.
3. Single-turn (``env.multi_turn: false``): the episode is ``terminated`` at the end of the turn. Multi-turn: the
   simulated user (``envs/users.py``) answers; its message is appended as observation tokens the policy did not
   choose (``render_turn("user", text)`` + the assistant start token) and the next turn begins; ``terminated`` after
   ``env.max_turns`` assistant turns or when the user ends the conversation.
4. A turn that reaches ``env.max_turn_tokens`` tokens without ending, or fills the context to ``env.max_context``,
   is cut (``info["truncated_by"]`` says which limit). Running into a limit is an outcome of the turn, like TRL's
   ``missing_eos_penalty`` case: the cut text is scored as a reply, plus ``reward.truncation_penalty`` (<= 0), and the
   episode is ``terminated`` -- the learner does not bootstrap from its own value, which would make running to the
   budget free. The one exception is a context cut in multi-turn mode (mid-turn, or no room for the user's next
   message): the conversation would have gone on, so the episode is ``truncated`` (Gymnasium's time-limit case), the
   unfinished turn is not scored and the learner bootstraps from the value there.

``info`` always has ``turn`` (0-based index of the assistant turn the step belongs to) and ``record_index``.

Cost: ``step`` is O(1) in the context length. ``reset`` allocates one buffer per episode and ``step`` writes one
entry and returns **that same buffer** (no per-step copy). Entries before ``length`` never change within an episode,
so an observation kept by the caller stays valid when read with its own ``length``; entries at or after
``length`` may be filled by later steps, so copy ``tokens`` if you need them frozen. ``bench/env_step.py`` measures
steps/s at 64- and 2048-token contexts.

Construction (every argument optional; ``gymnasium.make("rlchat/Chat-v0")`` runs the built-in demo task)::

    ChatEnv(records=None, tokenizer=None, config=None, reward=None, user=None, render_mode=None,
            data=None, config_overrides=None, defer_reward=False)

- ``config``: a :class:`rlchat.core.config.Config` (default: the schema defaults); ``config_overrides``: dotted keys
  applied on top (``{"env.max_turn_tokens": 8}``) — the form RLlib's ``env_config`` and YAML can carry.
- ``records``: a list of :class:`rlchat.core.data.Record`; otherwise ``load_records(data or cfg.data.prompts)``.
- ``tokenizer``: a :class:`ChatTokenizer`; otherwise from ``cfg.tokenizer`` when a config or overrides were given,
  else the 4096-id demo vocabulary ``ChatTokenizer("cl100k_base", 4096)``.
- ``reward``: any callable with :class:`rlchat.core.rewards.RewardFunction`'s ``__call__`` signature; otherwise
  ``RewardFunction(cfg.reward, tokenizer)``.
- ``user``: a :class:`envs.users.SimulatedUser`; otherwise the one named by ``cfg.env.user``.
- ``defer_reward``: when True the env does not score a finished turn itself: that step's reward is 0, there is no
  ``info["reward_components"]``, and ``info["pending_turn"]`` holds a :class:`PendingTurn` (the reward's inputs)
  for the caller to score later, together with other envs' turns, via ``RewardFunction.score_batch``. Rollout
  workers do this so that batch-level components (``diversity_batch``) compare the replies of the whole batch and
  model-backed components run one forward per batch. Trajectories are unchanged (users never see rewards).

This module imports the rlchat core only (never Ray), so any Gymnasium library can use the env.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from envs.users import SimulatedUser, make_user
from rlchat.core.config import Config
from rlchat.core.errors import ActionError, DataError, RLChatError
from rlchat.core.rewards import RewardFunction, RewardResult
from rlchat.core.tokenizer import ChatTokenizer

if TYPE_CHECKING:
    from rlchat.core.data import Record

logger = logging.getLogger(__name__)

Message = dict[str, str]
Obs = dict[str, np.ndarray]

DEMO_ENCODING = "cl100k_base"
DEMO_VOCAB_SIZE = 4096
"""The small-vocabulary demo tokenizer used when neither a tokenizer nor a config is given."""

RewardFn = Callable[..., RewardResult]

INFO_REWARD_COMPONENTS = "reward_components"
"""``info`` key of a scored turn's unweighted reward components."""
INFO_PENDING_TURN = "pending_turn"
"""``info`` key of a finished turn left unscored (``defer_reward=True``): a :class:`PendingTurn`."""


@dataclass(frozen=True)
class PendingTurn:
    """The inputs of one assistant turn's reward, exactly as the env would have passed them to ``reward_fn``.

    Attributes:
        prompt_messages: the conversation the reply answers (everything before it).
        response_text: the reply decoded without special tokens.
        response_ids: the reply's token ids without the end-of-turn token.
        record: the record the turn is scored against (its ``reference`` is this turn's reference answer).
        penalty: added to the scored total: ``reward.truncation_penalty`` for a turn cut by a limit, else 0.
    """

    prompt_messages: list[Message]
    response_text: str
    response_ids: list[int]
    record: Any
    penalty: float = 0.0


def resolve_config(config: Config | None, config_overrides: Mapping[str, Any] | None) -> Config:
    """The env's config: ``config`` (or the defaults) with dotted-key overrides applied."""
    cfg = config if config is not None else Config()
    return cfg.replace(**dict(config_overrides)) if config_overrides else cfg


def _with_reference(record: Any, reference: str | None) -> Any:
    """The record as seen by the reward of a later turn: same record, that turn's reference answer."""
    if dataclasses.is_dataclass(record) and not isinstance(record, type):
        return dataclasses.replace(record, reference=reference)
    return _RecordView(record, reference)


class _RecordView:
    """A non-dataclass record with its ``reference`` replaced (attribute access falls through)."""

    def __init__(self, record: Any, reference: str | None) -> None:
        self._record = record
        self.reference = reference

    def __getattr__(self, name: str) -> Any:
        return getattr(self._record, name)


class ChatEnv(gym.Env[Obs, int]):
    """Token-level chat environment (see the module docstring for spaces, episode and construction)."""

    metadata = {"render_modes": ["ansi", "human"], "render_fps": 4}

    def __init__(
        self,
        records: Sequence[Record] | None = None,
        tokenizer: ChatTokenizer | None = None,
        config: Config | None = None,
        reward: RewardFn | None = None,
        user: SimulatedUser | None = None,
        render_mode: str | None = None,
        data: str | None = None,
        config_overrides: Mapping[str, Any] | None = None,
        defer_reward: bool = False,
    ) -> None:
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise RLChatError(f"render_mode={render_mode!r}: expected None or one of {self.metadata['render_modes']}")
        self.render_mode = render_mode
        self.cfg = resolve_config(config, config_overrides)
        if tokenizer is None:
            if config is None and not config_overrides:
                tokenizer = ChatTokenizer(DEMO_ENCODING, DEMO_VOCAB_SIZE)
            else:
                tokenizer = ChatTokenizer.from_config(self.cfg.tokenizer)
        self.tokenizer = tokenizer
        if records is None:
            from rlchat.core.data import load_records  # lazy: the data layer pulls in pyarrow

            records = load_records(data or self.cfg.data.prompts, cfg=self.cfg)
        self.records = list(records)
        if not self.records:
            raise DataError(f"ChatEnv: no records (data={data or self.cfg.data.prompts!r}); pass a non-empty dataset")
        self.reward_fn: RewardFn = reward if reward is not None else RewardFunction(self.cfg.reward, tokenizer)
        self.user: SimulatedUser = user if user is not None else make_user(self.cfg.env.user)
        self.defer_reward = bool(defer_reward)

        e = self.cfg.env
        self.max_context = e.max_context
        self.max_turn_tokens = e.max_turn_tokens
        self.multi_turn = e.multi_turn
        self.max_turns = e.max_turns if e.multi_turn else 1
        n_vocab = tokenizer.n_vocab
        self.action_space = spaces.Discrete(n_vocab)
        self.observation_space = spaces.Dict(
            {
                "tokens": spaces.Box(0, n_vocab - 1, shape=(self.max_context,), dtype=np.int64),
                "length": spaces.Box(0, self.max_context, shape=(), dtype=np.int64),
            }
        )
        self._eot = tokenizer.eot_id
        self._n_vocab = n_vocab
        self._assistant_id = tokenizer.role_ids["assistant"]
        self._warned_long_prompt = False
        # Episode state (set by reset).
        self._buf = np.full(self.max_context, tokenizer.pad_id, dtype=np.int64)
        self._len = 0
        self._turn = 0
        self._turn_ids: list[int] = []
        self._conversation: list[Message] = []
        self._record: Any = None
        self._turn_record: Any = None
        self._record_index = -1
        self._done = True

    # ------------------------------------------------------------------------------------------------ Gymnasium API
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Obs, dict[str, Any]]:
        """Start an episode on a record drawn with the env's RNG (or ``options["record_index"]``).

        Returns:
            obs: ``{"tokens": (C,) int64, "length": () int64}`` holding the rendered prompt.
            info: ``record_index``, ``turn`` (0), ``prompt_length``.
        """
        super().reset(seed=seed)
        if options and options.get("record_index") is not None:
            idx = int(options["record_index"])
            if not 0 <= idx < len(self.records):
                raise DataError(f"reset(options={{'record_index': {idx}}}): expected 0 <= index < {len(self.records)}")
        else:
            idx = int(self.np_random.integers(len(self.records)))
        record = self.records[idx]
        if self.multi_turn:
            messages, reference = self.user.opening(record)
            turn_record = (
                record if reference == getattr(record, "reference", None) else _with_reference(record, reference)
            )
        else:
            messages, turn_record = [dict(m) for m in record.prompt_messages()], record
        ids = self.tokenizer.render_prompt(messages)
        if len(ids) >= self.max_context:
            # Keep the newest tokens (they end with the assistant start token) so at least one can be generated.
            if not self._warned_long_prompt:
                logger.warning(
                    "record %d: prompt of %d tokens does not fit env.max_context=%d; keeping its last %d tokens. "
                    "Raise env.max_context or drop long prompts with data.max_conversation_tokens to silence this",
                    idx,
                    len(ids),
                    self.max_context,
                    self.max_context - 1,
                )
                self._warned_long_prompt = True
            ids = ids[-(self.max_context - 1) :]
        # One fresh buffer per episode: observations handed out in earlier episodes are never overwritten.
        self._buf = np.full(self.max_context, self.tokenizer.pad_id, dtype=np.int64)
        self._buf[: len(ids)] = ids
        self._len = len(ids)
        self._turn = 0
        self._turn_ids = []
        self._conversation = messages
        self._record = record
        self._turn_record = turn_record
        self._record_index = idx
        self._done = False
        if self.render_mode == "human":
            self.render()
        return self._obs(), {"record_index": idx, "turn": 0, "prompt_length": len(ids)}

    def step(self, action: int) -> tuple[Obs, float, bool, bool, dict[str, Any]]:
        """Append one token of the assistant reply (see the module docstring for rewards and episode ends)."""
        if self._done:
            raise RLChatError("ChatEnv.step() called after the episode ended (terminated or truncated); call reset()")
        try:
            token = int(action)
        except (TypeError, ValueError):
            raise ActionError(
                f"ChatEnv.step({action!r}): expected one integer token id (the action space is "
                f"Discrete({self._n_vocab})); pass the id of the next token, e.g. env.step(int(token))"
            ) from None
        if not 0 <= token < self._n_vocab:
            raise ActionError(
                f"ChatEnv.step({token}): token id out of range; expected 0 <= id < {self._n_vocab} (the env's "
                "action space is Discrete(tokenizer.n_vocab)). The policy's vocabulary is probably larger than the "
                "env's tokenizer: build both from the same tokenizer config, or mask logits beyond n_vocab"
            )
        # 1. append: O(1), no copy of the context
        self._buf[self._len] = token
        self._len += 1
        self._turn_ids.append(token)
        info: dict[str, Any] = {"turn": self._turn, "record_index": self._record_index}
        reward = 0.0
        terminated = truncated = False
        if token == self._eot:
            # 2. the assistant's turn ended: score it, then let the user speak or end the episode
            reward = self._end_turn(info)
            terminated, truncated = self._next_user_turn(info)
        elif len(self._turn_ids) >= self.max_turn_tokens or self._len >= self.max_context:
            # 3. the turn was cut by a limit: scored and terminal, except a multi-turn context cut (bootstrapped)
            info["truncated_by"] = "turn_budget" if len(self._turn_ids) >= self.max_turn_tokens else "context"
            if info["truncated_by"] == "context" and self.multi_turn:
                truncated = True
                info["response_ids"] = list(self._turn_ids)
            else:
                reward = self._end_turn(info, cut=True)
                terminated = True
        self._done = terminated or truncated
        if self.render_mode == "human":
            self.render()
        return self._obs(), reward, terminated, truncated, info

    def render(self) -> str | None:  # type: ignore[override]  # ansi frames are text
        """``ansi``: the conversation so far as text (special tokens shown); ``human``: print it."""
        if self.render_mode is None:
            gym.logger.warn("ChatEnv.render() called without a render_mode; pass render_mode='ansi' or 'human'")
            return None
        text = self.tokenizer.decode(self._buf[: self._len])
        if self.render_mode == "human":
            print(text)
            return None
        return text

    # ------------------------------------------------------------------------------------------------ helpers
    def _obs(self) -> Obs:
        return {"tokens": self._buf, "length": np.array(self._len, dtype=np.int64)}

    def _end_turn(self, info: dict[str, Any], cut: bool = False) -> float:
        """Score the finished turn (or hand its reward inputs to the caller when ``defer_reward``).

        Args:
            cut: the turn was cut by a limit (no end-of-turn token to strip); ``reward.truncation_penalty`` is added.
        """
        content = list(self._turn_ids) if cut else self._turn_ids[:-1]
        penalty = self.cfg.reward.truncation_penalty if cut else 0.0
        text = self.tokenizer.decode(content, skip_special=True)
        prompt = self._conversation
        # A new list, never an in-place append: a PendingTurn keeps ``prompt`` as it was when the reply was given.
        self._conversation = prompt + [{"role": "assistant", "content": text}]
        info["response_ids"] = list(content)
        if self.defer_reward:
            info[INFO_PENDING_TURN] = PendingTurn(prompt, text, list(content), self._turn_record, penalty)
            return 0.0
        result = self.reward_fn(prompt, text, content, self._turn_record)
        info[INFO_REWARD_COMPONENTS] = dict(result.components)
        return float(result.total) + penalty

    def _next_user_turn(self, info: dict[str, Any]) -> tuple[bool, bool]:
        """After a scored turn: (terminated, truncated), appending the user's next message when the episode goes on."""
        if self._turn + 1 >= self.max_turns:
            return True, False
        nxt = self.user.reply(self._conversation, self._record, self.np_random)
        if nxt is None:
            return True, False
        ids = self.tokenizer.render_turn("user", nxt.content) + [self._assistant_id]
        if self._len + len(ids) >= self.max_context:  # no room for the message plus one assistant token
            info["truncated_by"] = "context"
            return False, True
        self._buf[self._len : self._len + len(ids)] = ids
        self._len += len(ids)
        self._conversation = self._conversation + [{"role": "user", "content": nxt.content}]
        self._turn += 1
        self._turn_ids = []
        self._turn_record = _with_reference(self._record, nxt.reference)
        info["user_message"] = nxt.content
        return False, False

    # ------------------------------------------------------------------------------------------------ inspection
    @property
    def conversation(self) -> list[Message]:
        """The episode's messages so far (prompt, scored assistant replies, user turns)."""
        return list(self._conversation)

    @property
    def context_ids(self) -> np.ndarray:
        """(length,) view of the real tokens of the current observation."""
        return self._buf[: self._len]
