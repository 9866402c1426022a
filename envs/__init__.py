"""rlchat envs package."""
