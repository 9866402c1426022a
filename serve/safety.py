"""The optional safety filter of the Serve endpoint (``serve.safety_filter``): the reward library's safety component
as a yes/no check on reply text, and what a withheld reply shows instead."""

from rlchat.core.config import RewardConfig
from rlchat.core.tokenizer import ChatTokenizer

WITHHELD_NOTICE = "[withheld: the safety filter flagged this reply]"
SAFETY_HOLDBACK_CHARS = 64
"""With the safety filter on, streaming keeps this many characters unsent until the filter has seen them."""


class SafetyFilter:
    """The reward library's safety component as a yes/no check on reply text.

    Args:
        reward: the reward config whose ``safety_patterns`` / ``safety_classifier`` define "unsafe".
        tokenizer: the policy's tokenizer (the reward function wants one).
    """

    def __init__(self, reward: RewardConfig, tokenizer: ChatTokenizer) -> None:
        from rlchat.core.rewards import RewardFunction

        only_safety = RewardConfig(
            verifiable=0.0,
            safety=1.0,
            safety_patterns=reward.safety_patterns,
            safety_classifier=reward.safety_classifier,
        )
        self._fn = RewardFunction(only_safety, tokenizer)

    def flagged(self, text: str) -> bool:
        return bool(text) and self._fn([], text, []).components["safety"] < 0
