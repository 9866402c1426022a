"""The built-in demo data sets (``builtin:task``, ``builtin:chat``, ``builtin:prefs``).

The JSONL files next to this module are written by ``python -m rlchat.demo_data.generate`` (deterministic, fixed
seed, nothing downloaded); see README.md here for what each set holds and why.
"""
