"""rlchat's Gymnasium environments; importing this package registers them.

- ``rlchat/Chat-v0`` (:class:`envs.chat_env.ChatEnv`): one action = one token id of the assistant reply.
- ``rlchat/ChatTurn-v0`` (:class:`envs.turn_env.ChatTurnEnv`): one action = one whole assistant reply.

Usage::

    import gymnasium as gym
    import envs  # registers the ids

    env = gym.make("rlchat/Chat-v0")  # the built-in arithmetic task, 4096-id demo vocabulary
    env = gym.make("rlchat/Chat-v0", config_overrides={"env.multi_turn": True, "env.user": "scripted"})

Where the package has not been imported (e.g. a Ray worker process), ``gym.make("envs:rlchat/Chat-v0")`` imports
it first. Keyword arguments of ``gym.make`` (and RLlib's ``env_config`` keys) go to the env constructor.
"""

from __future__ import annotations

from gymnasium.envs.registration import register, registry

CHAT_ENV_ID = "rlchat/Chat-v0"
CHAT_TURN_ENV_ID = "rlchat/ChatTurn-v0"

# Guarded so a re-import (importlib.reload, a second package path) does not trigger Gymnasium's override warning.
if CHAT_ENV_ID not in registry:
    register(id=CHAT_ENV_ID, entry_point="envs.chat_env:ChatEnv")
if CHAT_TURN_ENV_ID not in registry:
    register(id=CHAT_TURN_ENV_ID, entry_point="envs.turn_env:ChatTurnEnv")

__all__ = ["CHAT_ENV_ID", "CHAT_TURN_ENV_ID", "ChatEnv", "ChatTurnEnv", "ReplayUser", "ScriptedUser", "UserTurn"]


def __getattr__(name: str):  # lazy: `import envs` only registers ids; the classes load on first use
    if name == "ChatEnv":
        from envs.chat_env import ChatEnv

        return ChatEnv
    if name == "ChatTurnEnv":
        from envs.turn_env import ChatTurnEnv

        return ChatTurnEnv
    if name in ("ReplayUser", "ScriptedUser", "UserTurn"):
        from envs import users

        return getattr(users, name)
    raise AttributeError(f"module 'envs' has no attribute {name!r}")
