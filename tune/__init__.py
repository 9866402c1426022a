"""rlchat tune package."""
