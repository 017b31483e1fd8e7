"""ctretrieval keeps the task-package skeleton (medcore.testing.skeleton): the same module for
the same role as the other packages, ``KIND`` and ``build_model(cfg)`` in ``model``, every
command a ``<module>:main`` installed under its name."""

from ctretrieval.cli import export, index, search, train
from medcore.testing.skeleton import skeleton_problems


def test_the_package_keeps_the_skeleton() -> None:
    assert skeleton_problems("ctretrieval") == []


def test_each_command_runs_the_main_of_its_own_module() -> None:
    runs = {c.prog: c.run for c in (train, index, search, export)}
    assert runs == {
        "ctretrieval-train": "ctretrieval.train:main",
        "ctretrieval-index": "ctretrieval.index:main",
        "ctretrieval-search": "ctretrieval.search:main",
        "ctretrieval-export": "ctretrieval.export:main",
    }
