"""Packaging: the console script works from any directory, and Ray worker processes import our top-level
packages (envs, tune, serve) -- not ray.tune / ray.serve, whose names they share."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROJECT_PACKAGES = ("envs", "tune", "serve", "rlchat")


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
        # Imported by name on purpose: which `tune` / `serve` a worker resolves is what this test checks (a bare
        # `import tune` / `import serve` is what CONVENTIONS.md rules out elsewhere: it reads like ray's).
        found = {name: str(importlib.import_module(name).__file__) for name in PROJECT_PACKAGES}
        return {**found, "cwd": os.getcwd(), "pid": str(os.getpid())}

    got = ray.get(where.remote())
    assert got["pid"] != str(os.getpid())  # really another process
    for name in PROJECT_PACKAGES:
        # the project's own package directory (ROOT/<name>/__init__.py), not ray.tune, ray.serve or a namesake
        # installed in site-packages
        assert Path(got[name]).resolve() == ROOT / name / "__init__.py", (name, got[name])
