"""The package keeps the skeleton every task package shares (medcore.testing.skeleton)."""

from medcore.testing.skeleton import skeleton_problems


def test_package_keeps_the_skeleton() -> None:
    assert skeleton_problems("cxrlandmarks") == []
