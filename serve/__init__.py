"""rlchat serve package."""
