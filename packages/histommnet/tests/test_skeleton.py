"""histommnet keeps the task packages' skeleton (``medcore.testing.skeleton``): the same module
names for the same roles, ``model.KIND`` and ``build_model(cfg)``, ``train.main``, and every
command ``histommnet.<module>:main`` installed under its own name."""

from __future__ import annotations

from histommnet.cli import train
from histommnet.config import HistoConfig
from histommnet.model import KIND, MMNet, build_model, checkpoint_kind, dry_run_config
from medcore.cli.dry_run import build_on_meta
from medcore.testing.skeleton import skeleton_problems


def test_histommnet_keeps_the_skeleton() -> None:
    assert skeleton_problems("histommnet") == []


def test_a_script_outside_the_command_table_is_named() -> None:
    scripts = {"histommnet-train": "histommnet.cli:train", "histommnet-fit": "histommnet.fit:run"}
    problems = skeleton_problems("histommnet", scripts)
    assert (
        "console script histommnet-fit: histommnet.fit:run is not a command of histommnet.cli"
        in problems
    )
    assert "histommnet.cli.predict: histommnet-predict is not an installed script" in problems


def test_kind_is_the_default_models_checkpoint_identity() -> None:
    cfg = HistoConfig()
    assert train.run == "histommnet.train:main"
    model = build_on_meta(lambda: build_model(dry_run_config(cfg)))
    assert isinstance(model, MMNet) and checkpoint_kind(model) == KIND == "histommnet.MMNet"
