"""The repository stands on its own: what its files point to is in it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
#: Text files a reader follows references in.
TEXT_SUFFIXES = {".md", ".py", ".yml", ".yaml", ".toml", ".properties", ".sql", ".lua"}
SKIPPED_DIRS = {".git", ".mypy_cache", ".pytest_cache", ".ruff_cache", "__pycache__", "build"}

#: A relative link of a Markdown file: ``[text](path)`` or ``[text](path#anchor)``.
_LINK_RE = re.compile(r"\]\((?!https?://|mailto:|#)([^)#\s]+)(?:#[^)]*)?\)")
#: A path climbing out of its folder to a Markdown file: ``../../docs/x.md``.
_CLIMB_RE = re.compile(r"(?:\.\./)+[\w./-]+\.md")
#: A folder outside the repository that some files once named.
_OUTSIDE_RE = re.compile(r"(?<![\w.-])(?:/work/)?shared/(?:docs|fixtures|hooks)\b|/work/")


def text_files() -> list[Path]:
    files = [
        path
        for path in ROOT.rglob("*")
        if path.is_file()
        and (path.suffix in TEXT_SUFFIXES or path.name in {"Dockerfile", "run"})
        and not SKIPPED_DIRS & set(path.relative_to(ROOT).parts)
        and path != Path(__file__)  # its patterns name what they look for
    ]
    assert files
    return sorted(files)


@pytest.mark.parametrize("path", text_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_references_stay_inside_the_repository(path: Path) -> None:
    text = path.read_text(encoding="utf-8", errors="replace")
    outside = [m.group(0) for m in _OUTSIDE_RE.finditer(text)]
    assert not outside, f"{path.relative_to(ROOT)} refers to files outside the repository"
    targets = _CLIMB_RE.findall(text)
    if path.suffix == ".md":
        targets += _LINK_RE.findall(text)
    missing = [t for t in targets if not (path.parent / t).exists()]
    assert not missing, f"{path.relative_to(ROOT)} points to missing files: {missing}"
