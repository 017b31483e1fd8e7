"""binensemble keeps the skeleton of every task package (medcore.testing.skeleton)."""

from __future__ import annotations

from medcore.testing.skeleton import skeleton_problems


def test_the_package_keeps_the_skeleton() -> None:
    assert skeleton_problems("binensemble") == []
