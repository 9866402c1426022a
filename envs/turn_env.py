"""``rlchat/ChatTurn-v0``: the chat environment stepped one whole assistant turn at a time.

For agents that produce a complete reply per decision (a sampler with its own decoding loop, a bandit over
canned replies, a search procedure) rather than one token per step. It wraps a :class:`envs.chat_env.ChatEnv` and
replays the reply through it token by token, so rewards, user turns, termination and truncation are exactly those
of ``rlchat/Chat-v0`` — a turn-level trajectory equals the token-level one for the same seed and tokens.

Spaces (``V = tokenizer.n_vocab``, ``T = env.max_turn_tokens``, ``C = env.max_context``)::

    action_space = Dict({
        "tokens": MultiDiscrete([V] * (T - 1)),   # the reply's token ids; entries at or after length are ignored
        "length": Discrete(T),                    # how many leading entries of tokens form the reply (0..T-1)
    })
    observation_space = the token env's: Dict({"tokens": Box(0, V-1, (C,), int64), "length": Box(0, C, (), int64)})

Why this action space: a reply is a variable-length integer sequence. ``Sequence(Discrete(V))`` says that most
directly, but few RL libraries can batch, flatten or sample it (RLlib and SB3 cannot). A fixed-size array plus a
length is the same encoding the observation uses, works with every library that handles ``Dict``, and
``MultiDiscrete`` rather than an integer ``Box`` states that each entry is a categorical token (``check_env``
would also warn about a non-normalised ``Box`` action).

A turn action is the reply's *content*: the env closes the turn with the end-of-turn token itself, so at most
``T - 1`` content tokens fit the per-turn budget and a turn action is never truncated by it (only the context limit
can truncate). An end-of-turn id inside the content ends the reply there; the rest is ignored. For convenience
``step`` also accepts a plain sequence of token ids (``env.step(tokenizer.encode("7"))``).

``reward`` is the turn's reward; ``info`` is the token env's info of the turn's last token (``reward_components``,
``response_ids``, ``turn``, ``record_index``, and ``user_message`` / ``truncated_by`` when present).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from envs.chat_env import ChatEnv, Obs, RewardFn
from envs.users import SimulatedUser
from rlchat.core.config import Config
from rlchat.core.errors import ActionError, ConfigError
from rlchat.core.tokenizer import ChatTokenizer

if TYPE_CHECKING:
    from rlchat.core.data import Record


class ChatTurnEnv(gym.Env[Obs, dict[str, Any]]):
    """Turn-level chat environment; same constructor arguments as :class:`ChatEnv` (see the module docstring)."""

    metadata = ChatEnv.metadata

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
        self.token_env = ChatEnv(
            records, tokenizer, config, reward, user, render_mode, data, config_overrides, defer_reward=defer_reward
        )
        self.render_mode = render_mode
        self.tokenizer = self.token_env.tokenizer
        self.cfg = self.token_env.cfg
        t = self.token_env.max_turn_tokens
        if t < 2:
            raise ConfigError(
                f"env.max_turn_tokens={t}: rlchat/ChatTurn-v0 needs at least 2 (one content token plus the "
                "end-of-turn token); raise env.max_turn_tokens"
            )
        self.max_reply_tokens = t - 1
        self.action_space = spaces.Dict(
            {
                "tokens": spaces.MultiDiscrete(np.full(t - 1, self.tokenizer.n_vocab, dtype=np.int64)),
                "length": spaces.Discrete(t),
            }
        )
        self.observation_space = self.token_env.observation_space

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Obs, dict[str, Any]]:
        """Same as :meth:`ChatEnv.reset`; the seed drives the token env's RNG (records, simulated user)."""
        super().reset(seed=seed)
        return self.token_env.reset(seed=seed, options=options)

    def step(self, action: Mapping[str, Any] | Sequence[int] | np.ndarray) -> tuple[Obs, float, bool, bool, dict]:
        """Play one whole assistant reply; returns the turn's reward and the token env's last info."""
        reply = self._reply_ids(action)
        eot = self.tokenizer.eot_id
        if eot in reply:
            reply = reply[: reply.index(eot)]
        total = 0.0
        obs: Obs
        info: dict[str, Any] = {}
        terminated = truncated = False
        for token in [*reply, eot]:
            obs, reward, terminated, truncated, info = self.token_env.step(token)
            total += reward
            if terminated or truncated:
                break
        return obs, total, terminated, truncated, info

    def render(self) -> str | None:  # type: ignore[override]  # ansi frames are text
        return self.token_env.render()

    def close(self) -> None:
        self.token_env.close()

    def _reply_ids(self, action: Mapping[str, Any] | Sequence[int] | np.ndarray) -> list[int]:
        if isinstance(action, Mapping):
            try:
                length = int(action["length"])
                tokens = np.asarray(action["tokens"]).reshape(-1)
            except (KeyError, TypeError, ValueError):
                raise ActionError(
                    f"ChatTurnEnv.step: expected {{'tokens': int array, 'length': int}} or a list of token ids, "
                    f"got a mapping with keys {sorted(action)}"
                ) from None
            if not 0 <= length <= min(len(tokens), self.max_reply_tokens):
                raise ActionError(
                    f"ChatTurnEnv.step: length={length} with {len(tokens)} tokens; expected "
                    f"0 <= length <= {min(len(tokens), self.max_reply_tokens)}; set length to the number of leading "
                    "entries of tokens that form the reply"
                )
            return [int(x) for x in tokens[:length]]
        ids = [int(x) for x in np.asarray(action).reshape(-1)]
        if len(ids) > self.max_reply_tokens:
            raise ActionError(
                f"ChatTurnEnv.step: a reply of {len(ids)} tokens; expected at most {self.max_reply_tokens} "
                "(env.max_turn_tokens - 1, the end-of-turn token takes the last slot); shorten the reply or raise "
                "env.max_turn_tokens"
            )
        return ids
