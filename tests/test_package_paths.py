"""Files the package finds beside its own modules: a module that moves between layer packages must still find them
(the move into rlchat/core, rlchat/distributed and rlchat/cli broke all three once: `make demo` could not start)."""

from __future__ import annotations

from pathlib import Path

from rlchat.cli.demo import DEFAULT_CONFIG
from rlchat.core.config import load_config
from rlchat.core.data import BUILTIN, builtin_path, load_records
from rlchat.distributed.cluster import project_root

ROOT = Path(__file__).resolve().parents[1]


def test_builtin_data_sets_are_found_and_load():
    cfg = load_config(None)
    for name in BUILTIN:
        assert builtin_path(name).is_file(), name
        assert load_records(f"builtin:{name}", split="train", cfg=cfg), name


def test_the_demo_config_and_the_project_root_are_the_checkout_s():
    assert DEFAULT_CONFIG == ROOT / "configs" / "demo.yaml" and DEFAULT_CONFIG.is_file()
    assert project_root() == ROOT
