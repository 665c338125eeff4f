"""The README's Python examples run as written."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_example_runs(code, capsys):
    exec(compile(code, str(README), "exec"), {"__name__": "readme"})


ROOT = README.parent
PUBLIC_TEXT = (
    [README]
    + sorted((ROOT / "skfedmm").rglob("*.py"))
    + sorted(p for p in (ROOT / "doc").rglob("*") if p.suffix in (".md", ".rst", ".py")
             # (not what a docs build generates: doc/.gitignore)
             and not {"_build", "generated", "auto_examples"} & set(p.parts))
    + sorted((ROOT / "examples").glob("*.py"))
)


@pytest.mark.parametrize("path", PUBLIC_TEXT, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_internal_references(path):
    """Public pages speak to users: no issue numbers or design-document sections."""
    text = path.read_text()
    found = re.findall(r"\((?:see )?issue \d+\)|\bissue \d+\b|design section \d", text, flags=re.I)
    assert not found, found
