"""The shape of the code, held: modules stay small, and a class that keeps many attributes says why."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SERVICES = Path(__file__).resolve().parents[2] / "services"
MAX_LINES = 500
MAX_ATTRIBUTES = 15
MODULES = sorted(SERVICES.rglob("*.py"))


def _attributes(cls: ast.ClassDef) -> set[str]:
    """Names a class keeps: its annotated class fields and every ``self.x = ...`` in its methods."""
    names = {s.target.id for s in cls.body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)}
    for node in ast.walk(cls):
        if isinstance(node, ast.Assign | ast.AnnAssign | ast.AugAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                for e in ast.walk(target):
                    if (
                        isinstance(e, ast.Attribute)
                        and isinstance(e.value, ast.Name)
                        and e.value.id == "self"
                    ):
                        names.add(e.attr)
    return names


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SERVICES)))
def test_modules_stay_under_the_limit(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.name}: {lines} lines; split it by concern"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SERVICES)))
def test_a_class_with_many_attributes_says_why(path: Path) -> None:
    source = path.read_text()
    for cls in (n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ClassDef)):
        names = _attributes(cls)
        if len(names) <= MAX_ATTRIBUTES:
            continue
        text = ast.get_source_segment(source, cls) or ""
        assert "attributes" in text.lower(), (
            f"{path.name}: {cls.name} keeps {len(names)} attributes and does not say why "
            f"({', '.join(sorted(names))})"
        )


def test_the_attribute_count_sees_fields_and_assignments() -> None:
    cls = ast.parse(
        "class A:\n    x: int\n    def __init__(self):\n        self.y = 1\n        self.z: int = 2\n"
        "    def f(self):\n        self.y += 1\n        self.w, self.v = 1, 2\n"
    ).body[0]
    assert isinstance(cls, ast.ClassDef)
    assert _attributes(cls) == {"x", "y", "z", "w", "v"}
