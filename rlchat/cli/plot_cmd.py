"""``rlchat plot RUN_DIR``: draw a run's metrics (:func:`rlchat.core.metrics.plot_run`) and say where the files
went."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rlchat.core.errors import RLChatError
from rlchat.core.metrics import METRICS_FILE, plot_run


def plot_command(run_dir: str, **_: Any) -> int:
    """``rlchat plot RUN_DIR``: write the PNGs and print their paths."""
    path = Path(run_dir)
    if not (path / METRICS_FILE).is_file():
        raise RLChatError(
            f"{path}: no {METRICS_FILE}; expected a run directory written by rlchat sft/rm/train/tune "
            "(pass the directory printed at the start of the run)"
        )
    for p in plot_run(path):
        print(p)
    return 0
