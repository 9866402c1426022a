"""Packaging: the console script works from any directory, and Ray worker processes import our top-level
packages (envs, tune, serve) -- not ray.tune / ray.serve, whose names they share."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_console_script_from_any_directory(tmp_path):
    exe = shutil.which("rlchat") or str(Path(sys.executable).with_name("rlchat"))
    out = subprocess.run([exe, "--version"], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.strip().startswith("rlchat ")
    helped = subprocess.run([exe, "--help"], cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    for command in ("demo", "data", "sft", "rm", "train", "serve", "chat", "tune", "eval"):
        assert command in helped


def test_ray_workers_import_project_packages(ray_local, tmp_path):
    ray = ray_local

    @ray.remote(num_cpus=0)
    def where() -> dict[str, str]:
        import os

        import envs
        import rlchat
        import serve
        import tune

        return {
            "envs": envs.__file__,
            "tune": tune.__file__,
            "serve": serve.__file__,
            "rlchat": rlchat.__file__,
            "cwd": os.getcwd(),
            "pid": str(os.getpid()),
        }

    got = ray.get(where.remote())
    import os

    assert got["pid"] != str(os.getpid())  # really another process
    for name in ("envs", "tune", "serve", "rlchat"):
        assert Path(got[name]).resolve().is_relative_to(ROOT), got[name]
        assert "ray" not in Path(got[name]).parts[-2]
