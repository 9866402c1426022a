"""The layer rules of docs/ARCHITECTURE.md hold, and their check can fail.

The rules are import-linter contracts in ``pyproject.toml`` (``[tool.importlinter]``), also run by ``make lint``:
the core imports no Ray, Tune, Serve, envs, distributed layer or CLI; envs only the core; serve the core plus
``rlchat.distributed.cluster``; tune the core and the distributed layer; nothing imports the CLI; code inside the
layers never imports an old ``rlchat.<module>`` alias. Here: they are kept on the real tree; a copy of the tree with
one forbidden import injected (inside a function, where a module-level-only check would miss it) breaks exactly the
right contract; the serve and new-paths contracts cover every module they must; and every old ``rlchat.<module>``
path is the moved module itself.
"""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("rlchat", "envs", "tune", "serve")
LINT_IMPORTS = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")

needs_linter = pytest.mark.skipif(
    LINT_IMPORTS is None, reason="import-linter not installed (pip install -e '.[test]')"
)


def _lint(cwd: Path) -> subprocess.CompletedProcess[str]:
    # grimp reads the packages from sys.path: the tree under test goes first
    env = {"PYTHONPATH": str(cwd), "PATH": str(Path(sys.executable).parent)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


@needs_linter
def test_the_tree_keeps_every_layer_contract() -> None:
    out = _lint(ROOT)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "broken" not in out.stdout.lower().replace("0 broken", "")


@needs_linter
def test_a_forbidden_import_inside_a_function_breaks_the_core_contract(tmp_path: Path) -> None:
    """A copy of the tree where a core module imports Ray lazily, inside a function: lint-imports fails and names
    the contract and the line (also for envs, which reach Ray through that core module); tune's stays kept."""
    for name in PACKAGES:
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__", "static"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    victim = tmp_path / "rlchat" / "core" / "errors.py"
    victim.write_text(
        victim.read_text(encoding="utf-8") + "\n\ndef _sneaky() -> None:\n    import ray.util\n", encoding="utf-8"
    )
    out = _lint(tmp_path)
    assert out.returncode != 0, out.stdout[-4000:]
    assert "rlchat.core imports no Ray, Tune, Serve, envs, distributed layer or CLI BROKEN" in out.stdout
    assert "rlchat.core.errors -> ray (l." in out.stdout  # the line of the import inside the function
    assert "envs (Gymnasium envs) import only the core BROKEN" in out.stdout  # indirectly, through the core
    assert "tune imports the core and the distributed layer, never Serve or the CLI KEPT" in out.stdout

    # and the CLI rule: the distributed layer importing the CLI, again only inside a function
    victim.write_text((ROOT / "rlchat" / "core" / "errors.py").read_text(encoding="utf-8"), encoding="utf-8")
    trainer = tmp_path / "rlchat" / "distributed" / "trainer.py"
    trainer.write_text(
        trainer.read_text(encoding="utf-8") + "\n\ndef _main() -> None:\n    from rlchat.cli import main\n",
        encoding="utf-8",
    )
    out = _lint(tmp_path)
    assert out.returncode != 0 and "nothing imports rlchat.cli but rlchat/__main__.py BROKEN" in out.stdout


def test_the_serve_contract_covers_every_distributed_module_but_cluster() -> None:
    """Serve may use rlchat.distributed.cluster only; the contract lists the others, so a new module must be added."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["importlinter"]
    serve = next(c for c in config["contracts"] if c["id"] == "serve-uses-the-core")
    modules = {f"rlchat.distributed.{p.stem}" for p in (ROOT / "rlchat" / "distributed").glob("*.py")}
    modules -= {"rlchat.distributed.__init__", "rlchat.distributed.cluster"}
    assert modules <= set(serve["forbidden_modules"]), sorted(modules - set(serve["forbidden_modules"]))


def test_the_new_paths_contract_covers_every_old_module_path() -> None:
    """Code inside the layers imports moved modules by their new paths: the contract forbids every alias, so a
    module moved later must be added to it."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["importlinter"]
    contract = next(c for c in config["contracts"] if c["id"] == "layers-import-the-new-paths")
    aliases = {
        f"rlchat.{p.stem}"
        for layer in ("core", "distributed", "cli")
        for p in (ROOT / "rlchat" / layer).glob("*.py")
        if not p.stem.startswith("_") and (ROOT / "rlchat" / p.name).is_file()
    }
    assert len(aliases) >= 29
    assert aliases <= set(contract["forbidden_modules"]), sorted(aliases - set(contract["forbidden_modules"]))
    assert set(contract["source_modules"]) == {"rlchat.core", "rlchat.distributed", "rlchat.cli", *PACKAGES[1:]}


def test_every_old_module_path_is_the_moved_module() -> None:
    """``rlchat.<module>`` imports keep working: each old path is an alias of the module in its layer (same object,
    so private names and ``monkeypatch.setattr("rlchat.x.y", ...)`` reach the real module)."""
    moved = 0
    for layer in ("core", "distributed", "cli"):
        for p in sorted((ROOT / "rlchat" / layer).glob("*.py")):
            if p.stem.startswith("_") or not (ROOT / "rlchat" / p.name).is_file():
                continue
            old = importlib.import_module(f"rlchat.{p.stem}")
            assert old is importlib.import_module(f"rlchat.{layer}.{p.stem}"), p.stem
            moved += 1
    assert moved >= 29


def test_python_dash_m_rlchat_and_the_console_script_target() -> None:
    out = subprocess.run([sys.executable, "-m", "rlchat", "--version"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("rlchat "), out.stderr[-2000:]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]
    module, func = scripts["rlchat"].split(":")
    assert callable(getattr(importlib.import_module(module), func))
