"""Every doc the project points at exists: ``docs/...`` paths, relative Markdown links and cited sections.

Code comments, configs, the README and the docs send readers to ``docs/ppo.md``, ``docs/ARCHITECTURE.md#layers``
and so on; a renamed or never-written page turns those pointers into dead ends. Scanned: ``rlchat/ envs/ serve/
tune/ bench/ tests/ configs/`` (text files), ``Makefile``, ``pyproject.toml``, ``cluster.yaml``, ``README.md``
and ``docs/*.md``. Failures read ``file:line: docs/xyz.md does not exist``.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCANNED_DIRS = ("rlchat", "envs", "serve", "tune", "bench", "tests", "configs")
SCANNED_FILES = ("Makefile", "pyproject.toml", "cluster.yaml", "README.md")
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".txt", ".cfg", ".ini", ".json", ".html", ".js", ".css", ""}
SKIPPED_PARTS = {"__pycache__", ".venv", "node_modules", "fixtures"}

# A docs/ path that is not the tail of a longer path or URL (".../blob/main/docs/x.md" is someone else's repo).
DOCS_PATH = re.compile(r"(?<![\w./-])docs/[\w./-]*")
# A relative Markdown link target: [text](target) with no scheme.
MD_LINK = re.compile(r"\]\((?!https?:|mailto:|#)([^)\s]+)\)")
# A cited section: `ARCHITECTURE.md "Costs"`, `bench/README.md, "Serve load"` (the path may be in backticks).
SECTION_CITE = re.compile(r"((?:[\w.-]+/)*[\w.-]+\.md)`?,?\s+\"([^\"\n]{2,80})\"")


def scanned_files() -> list[Path]:
    files = [ROOT / name for name in SCANNED_FILES if (ROOT / name).is_file()]
    files += sorted((ROOT / "docs").glob("*.md"))
    for d in SCANNED_DIRS:
        for p in sorted((ROOT / d).rglob("*")):
            if p.is_file() and p.suffix in TEXT_SUFFIXES and not SKIPPED_PARTS.intersection(p.parts):
                files.append(p)
    return [p for p in files if p.resolve() != Path(__file__).resolve()]


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except (UnicodeDecodeError, OSError):
        return []


def _clean(target: str) -> str:
    """Drop an #anchor and the sentence punctuation a path may end with in prose (``see docs/ppo.md.``)."""
    return target.split("#", 1)[0].rstrip(".,:;")


def missing_docs_paths(files: list[Path], root: Path = ROOT) -> list[str]:
    """``file:line: docs/xyz.md does not exist`` for each docs/ path mentioned in ``files`` that is not there."""
    problems = []
    for f in files:
        for n, line in enumerate(_lines(f), 1):
            for m in DOCS_PATH.finditer(line):
                target = _clean(m.group(0))
                if not (root / target).exists():
                    problems.append(f"{f.relative_to(root)}:{n}: {target} does not exist")
    return problems


def missing_markdown_links(files: list[Path], root: Path = ROOT) -> list[str]:
    """Relative links of Markdown files (``[x](../rlchat/ppo.py#L12)``) whose target is not there."""
    problems = []
    for f in files:
        if f.suffix != ".md":
            continue
        for n, line in enumerate(_lines(f), 1):
            for m in MD_LINK.finditer(line):
                target = _clean(m.group(1))
                if target and not (f.parent / target).exists():
                    problems.append(f"{f.relative_to(root)}:{n}: {target} (link) does not exist")
    return problems


def _doc_for(name: str, root: Path) -> Path:
    """A cited Markdown file: a repository path as written, a bare name (``ARCHITECTURE.md``) under docs/."""
    return root / name if "/" in name else root / "docs" / name


def missing_sections(files: list[Path], root: Path = ROOT) -> list[str]:
    """Citations of a section by its title (``ARCHITECTURE.md "Costs"``) where the doc has no such heading."""
    problems = []
    for f in files:
        for n, line in enumerate(_lines(f), 1):
            for m in SECTION_CITE.finditer(line):
                doc, title = _doc_for(m.group(1), root), m.group(2).lower()
                if not doc.is_file():
                    continue  # the path checks report missing files
                headings = [h.lstrip("#").strip().lower() for h in _lines(doc) if h.startswith("#")]
                if not any(title in h for h in headings):
                    rel = doc.relative_to(root)
                    problems.append(f'{f.relative_to(root)}:{n}: {rel} has no section "{m.group(2)}"')
    return problems


def test_every_docs_path_exists():
    problems = missing_docs_paths(scanned_files())
    assert not problems, "dead links to docs/:\n" + "\n".join(problems)


def test_every_relative_markdown_link_exists():
    problems = missing_markdown_links(scanned_files())
    assert not problems, "dead Markdown links:\n" + "\n".join(problems)


def test_every_cited_section_exists():
    problems = missing_sections(scanned_files())
    assert not problems, "cited sections that do not exist:\n" + "\n".join(problems)


def test_the_checks_catch_what_they_are_for(tmp_path):
    """A missing page, a dead link and a missing section are each reported with file and line."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "real.md").write_text("# Real\n\n## Costs\n", encoding="utf-8")
    src = tmp_path / "mod.py"
    src.write_text(
        '"""See docs/real.md#costs and docs/real.md.\n\nAlso docs/gone.md#x, real.md "Costs", real.md "Nope"."""\n',
        encoding="utf-8",
    )
    md = tmp_path / "docs" / "page.md"
    md.write_text("[ok](real.md#costs) [bad](../nowhere.py#L3) [web](https://example.com/x)\n", encoding="utf-8")
    assert missing_docs_paths([src], tmp_path) == ["mod.py:3: docs/gone.md does not exist"]
    assert missing_markdown_links([md], tmp_path) == ["docs/page.md:1: ../nowhere.py (link) does not exist"]
    assert missing_sections([src], tmp_path) == ['mod.py:3: docs/real.md has no section "Nope"']
