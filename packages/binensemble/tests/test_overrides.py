"""An override changes exactly what it names (issue 24): every key of every section of every
packaged config, ``--epochs``, ``--smoke`` and the READMEs' own ``--set`` examples."""

from pathlib import Path

import pytest

from binensemble.cli import train
from binensemble.config import BinEnsembleConfig
from binensemble.train import SMOKE_OVERRIDES as SMOKE
from medcore.cli.run_setup import SMOKE_OVERRIDES, load_run_config
from medcore.testing import (
    assert_epochs_set_only,
    assert_overrides_change_only_their_key,
    assert_readme_set_examples,
    assert_smoke_changes_only,
    config_diff,
    dry_run_config,
    package_readme_set_examples,
    packaged_configs,
)

PACKAGE = "binensemble"
CONFIGS = packaged_configs(PACKAGE)


def resolver(name: str):
    """What ``binensemble-train --config NAME ARGV`` resolves (the train command's own smoke list)."""

    def resolve(argv: list[str]) -> BinEnsembleConfig:
        args = train.parse_args(["--config", name, *argv])
        return load_run_config(args, BinEnsembleConfig, PACKAGE, "default", SMOKE)

    return resolve


def test_every_packaged_config_is_covered() -> None:
    assert CONFIGS == ["default", "full"]


@pytest.mark.parametrize("name", CONFIGS)
def test_each_override_changes_only_its_key(name: str) -> None:
    checked = assert_overrides_change_only_their_key(resolver(name))
    assert len(checked) > 80


@pytest.mark.parametrize("name", CONFIGS)
def test_epochs_sets_only_the_epochs(name: str, tmp_path: Path) -> None:
    changed = assert_epochs_set_only(resolver(name), BinEnsembleConfig.epochs_keys, 3)
    assert changed == ["trainer.epochs"]
    # End to end: the config.yaml a dry run writes differs in those keys only.
    base = dry_run_config(train, ["--config", name], tmp_path / "base")
    three = dry_run_config(train, ["--config", name, "--epochs", "3"], tmp_path / "three")
    assert sorted(config_diff(base, three)) == changed


@pytest.mark.parametrize("name", CONFIGS)
def test_smoke_keeps_the_research_structure(name: str) -> None:
    items = [*(f"{key}=1" for key in BinEnsembleConfig.epochs_keys), *SMOKE_OVERRIDES, *SMOKE]
    changed = assert_smoke_changes_only(resolver(name), items)
    assert changed["trainer.epochs"] == 1 and changed["data.demo"] == "small"


@pytest.mark.parametrize("name", CONFIGS)
def test_readme_set_examples_change_only_what_they_name(name: str) -> None:
    examples = package_readme_set_examples(Path(__file__).parents[1], PACKAGE)
    assert {"trainer.epochs=20", "selection.cv_folds=5"} <= set(examples)
    assert_readme_set_examples(resolver(name), examples)
