"""ctclip keeps the skeleton of every task package (medcore.testing.skeleton): its modules, the
model's ``KIND`` and ``build_model(cfg)``, ``train.main`` and its step/evaluation factories, and
one ``<module>:main`` per installed command."""

from medcore.testing.skeleton import skeleton_problems


def test_ctclip_keeps_the_package_skeleton() -> None:
    assert skeleton_problems("ctclip") == []
